"""Power-loss crash states of marshal_persist, explored one by one (after SQLite's crash
tests, ALICE, OSDI'14, and CrashMonkey, OSDI'18).

    python stress/power_loss.py                   # every workload; exit 1 on any violation
    python stress/power_loss.py --mutants         # and the fsync mutation table
    python stress/power_loss.py --module PATH     # explore another copy of the module
    python stress/power_loss.py --record NAME     # print one workload's trace as JSON lines

Record.  A workload runs in a child process in which ``marshal_persist.os``, and every
module-level alias of an ``os`` function (such as ``_datasync``), is a proxy that
forwards to the real ``os`` and logs each call that changes the file system: open
(flags, mode, whether it created or truncated), write and pwrite (the bytes, and the
offset they landed at: for O_APPEND the size before), ftruncate, fsync, fdatasync,
close, dup, rename, replace, link, unlink, mkdir, rmdir, symlink.  The workload logs
an ``ack`` whenever ``persist`` returns, and marks such as where a compaction begins.

Model.  A power cut after any call of the trace leaves, for each file, its content at
its last fsync or fdatasync plus any prefix of the writes and truncations since, the
last one possibly torn at a 512-byte boundary of the file (the first and last such
boundary of a write stand for all); for each directory, its entries at its last fsync
plus any prefix of the creates, links, unlinks, renames and mkdirs since.  Files and
directories choose independently; a name exists only if every directory entry on its
path survived.  A kill -9 after any call leaves what the page cache has: a restart
(migrate when the workload does, open, replay, persist one event) is recorded on that
state, and power cuts inside the restart are explored as well, on top of whatever
the first run had left unsynced.

Check.  Each distinct disk image is opened in a fresh process, forked from a server
that imported the module once: migrate (for migration workloads), ``DiskPersister``,
``replay``, a ``persist``, a reopen.  A state violates when opening or replaying
raised; an acknowledged event is missing or older than acknowledged; an event that
was never written appears; a complete line of the log does not parse (a glued line);
a power cut during a compaction shows other than the live state, complete; the
persist after recovery fails or does not survive the reopen.  Workload rules add: a
migration that returned stays done, a torn line moved aside is kept somewhere, an
event whose persist raised does not come back; and what a restart's replay returned
is owed from then on like an acknowledged event (the process relies on it: it must
not trust names or bytes that were never made durable).

Mutants.  ``--mutants`` makes, for each call of ``os.fsync``, ``os.fdatasync`` or a
helper that only syncs (``_datasync``, ``_fsync_dir``...), a copy of the module with
just that call made a no-op, explores it, and reports whether some workload then
shows a kind of violation the module itself does not.

Standard library only.
"""

import argparse
import ast
import base64
import errno
import fcntl
import importlib.util
import itertools
import json
import os
import random
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODULE = os.path.join(os.path.dirname(HERE), "marshal_persist.py")

BLOCK = 512  # the sector size: a write torn by a power cut stops at such a boundary
TEARS_PER_WRITE = 2  # torn variants per write: its first and last inner boundary
STATES_PER_POINT = 64  # above this many combinations a crash point is sampled
CHILD_TIMEOUT = 30.0  # seconds a recording or a check may take (a hang is a finding)
ITEM_TYPE = "T"
POST_V = 99999  # the event each check persists after recovery
RESTART_V = 10001  # the event a restart persists; above every workload's own

# --- events -----------------------------------------------------------------


def make_event(key, v, change="SET"):
    """An event whose ``item.v`` is unique in a whole exploration, so a replayed value
    says which write it came from."""
    item = {"id": key, "v": v}
    if change == "SET":
        item["pad"] = "p" * 48  # lines of ~100 bytes: batches and compactions cross 512-byte boundaries
    return {"item": item, "changeType": change, "itemType": ITEM_TYPE}


def encode_line(event):
    return (json.dumps(event, separators=(",", ":")) + "\n").encode()


def parse_event(raw):
    """``(key, changeType, v)`` of a log line, or None if it is not a whole event."""
    try:
        event = json.loads(raw.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError is one too
        return None
    if type(event) is not dict or event.get("changeType") not in ("SET", "DEL"):
        return None
    item = event.get("item")
    if type(item) is not dict or type(item.get("id")) is not str or type(event.get("itemType")) is not str:
        return None
    return "%s/%s" % (event["itemType"], item["id"]), event["changeType"], item.get("v")


def log_events(data):
    """The events of a log's bytes, in order: its complete lines, and an unterminated
    last line when it is a whole event (the module keeps that one, terminated)."""
    *lines, tail = data.split(b"\n")
    parsed = [parse_event(line) for line in lines if line.strip()]
    if tail.strip():
        parsed.append(parse_event(tail))
    return [p for p in parsed if p is not None]


def first_glued_line(data):
    """A complete, non-blank line that is not an event (two lines glued, or garbage);
    the unterminated last line is a torn tail and allowed."""
    offset = 0
    for line in data.split(b"\n")[:-1]:
        if line.strip() and parse_event(line) is None:
            return "a complete line that is not an event at byte %d: %r" % (offset, line[:80])
        offset += len(line) + 1
    return None


# --- workloads ----------------------------------------------------------------


class Run:
    """What a workload (or a restart) works with: the module, under the tracer; ``fs``,
    the traced ``os``, for what an outside program does; and helpers that persist and
    log the acknowledgement once ``persist`` has returned."""

    def __init__(self, mp, tracer, workload, root, first_v):
        self.mp = mp
        self.fs = tracer.os
        self.tracer = tracer
        self.workload = workload
        self.root = root
        self.path = workload.log if workload.relative else os.path.join(root, workload.log)
        self._v = itertools.count(first_v)  # next() is atomic: threads may share it

    def at(self, rel):
        return os.path.join(self.root, rel)

    def next_v(self):
        return next(self._v)

    def open(self):
        return self.mp.DiskPersister(self.path)

    def persist(self, log, key, change="SET", v=None):
        event = make_event(key, self.next_v() if v is None else v, change)
        log.persist(event)
        self.tracer.ack([event])
        return event

    def batch(self, log, specs):
        events = [make_event(key, self.next_v(), change) for key, change in specs]
        log.persist_batch(events)
        self.tracer.ack(events)

    def mark(self, name, **fields):
        self.tracer.log("mark", name=name, **fields)


def single_persists(run):
    """The log is created in an existing directory; three persists, one overwriting."""
    log = run.open()
    for key in ("a", "b", "a"):
        run.persist(log, key)
    log.close()


def batches(run):
    """Two persist_batch calls, the first 1,200 bytes (torn at 512 and 1,024), the
    second overwriting, deleting, and overwriting a line from before."""
    log = run.open()
    run.batch(log, [("k%d" % i, "SET") for i in range(10)])
    run.batch(log, [("k1", "SET"), ("k2", "DEL"), ("base0", "SET")])
    log.close()


def group_commit(run):
    """Three threads persist at once, so writes and syncs are shared."""
    log = run.open()
    start = threading.Barrier(3)
    errors = []

    def writer(thread):
        try:
            start.wait()
            for i in range(3):  # values fixed per thread, whatever order the threads run in
                run.persist(log, "t%d-%d" % (thread, i % 2), v=101 + 10 * thread + i)
        except BaseException as exc:  # re-raised in the main thread: a failed writer is a finding
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    log.close()


def compaction(run):
    """Persists (one a DEL), a compaction of a log twice its live size, persists."""
    log = run.open()
    run.persist(log, "c0")
    run.persist(log, "c5")
    run.persist(log, "c1", "DEL")
    run.mark("compact-begin")
    log.compact()
    run.mark("compact-end")
    run.persist(log, "c2")
    run.persist(log, "c6")
    log.close()


def compaction_beside_appender(run):
    """A program that holds the log open (a shell `>>`, which takes no lock) appends a
    line and syncs it just after compaction's rename: the line, written to the old file,
    must be in the new log, durably, once compaction returns."""
    log = run.open()
    run.persist(log, "c0")
    run.persist(log, "c1", "DEL")
    fs, path = run.fs, run.at(run.workload.log)
    fd = fs.open(path, os.O_WRONLY | os.O_APPEND)
    real = run.mp._write_durably
    event = make_event("late", run.next_v())

    def rename_then_append(*args, **kwargs):
        new_fd = real(*args, **kwargs)
        fs.write(fd, encode_line(event))
        fs.fsync(fd)
        return new_fd

    run.mp._write_durably = rename_then_append
    try:
        log.compact()
    finally:
        run.mp._write_durably = real
    run.tracer.ack([event])
    fs.close(fd)
    run.persist(log, "c2")
    log.close()


def open_and_persist(run):
    """For the torn-tail workloads: the open repairs the last line, then one persist."""
    log = run.open()
    run.persist(log, "after-repair")
    log.close()


def deleted_log(run):
    """The log is removed while open; the next persist recreates it from the live state."""
    log = run.open()
    run.persist(log, "d1")
    # An outside `rm`: until the module recreates the log, a crash may lose what it held.
    run.mark("outside-delete")
    run.fs.unlink(run.at(run.workload.log))
    run.persist(log, "d2")
    run.persist(log, "d1")
    log.close()


def deleted_dir(run):
    """The log's directory is removed while open (an outside `rm -r`); the next persist
    makes the directory again and recreates the log in it from the live state."""
    log = run.open()
    run.persist(log, "d1")
    run.mark("outside-delete")
    run.fs.unlink(run.at(run.workload.log))
    run.fs.rmdir(run.at(os.path.dirname(run.workload.log)))
    run.persist(log, "d2")
    log.close()


def persist_two(run):
    """Two persists: with a log path whose directories are missing, or relative."""
    log = run.open()
    run.persist(log, "n1")
    run.persist(log, "n2")
    log.close()


def unsynced_dir(run):
    # The program made the directory just before: its entry is not durable yet.
    run.fs.mkdir(run.at(os.path.dirname(run.workload.log)), 0o700)
    persist_two(run)


def migrate(run):
    """migrate_from_claude_coord, then a persist to the moved log."""
    moved = run.mp.migrate_from_claude_coord(run.path)
    run.mark("migrated", moved=bool(moved))
    log = run.open()
    run.persist(log, "m-new")
    log.close()


def migrate_into_unsynced_dir(run):
    run.fs.mkdir(run.at(os.path.dirname(run.workload.log)), 0o700)
    migrate(run)


def migrate_by_copy(run):
    # Another file system: the hard link fails, so the module copies the log durably.
    run.tracer.fail(("link",), errno.EXDEV)
    migrate(run)


def replaced_log(run):
    log = run.open()
    run.persist(log, "r1")
    # An outside program writes a new log (everything, plus a line of its own), syncs it,
    # and renames it over the log, but does not fsync the directory: the module must
    # notice, and make the new name durable before it acknowledges anything on top.
    fs, path = run.fs, run.at(run.workload.log)
    with open(path, "rb") as f:
        content = f.read()
    fd = fs.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    fs.write(fd, content + encode_line(make_event("outside", run.next_v())))
    fs.fsync(fd)
    fs.close(fd)
    fs.rename(path + ".new", path)
    run.persist(log, "r2")
    run.persist(log, "r1")
    log.close()


def failed_sync(run):
    """An fdatasync fails (EIO, injected): persist raises, and the event must not come back."""
    log = run.open()
    run.persist(log, "f1")
    run.tracer.fail(("fsync", "fdatasync"), errno.EIO)
    event = make_event("f2", run.next_v())
    try:
        log.persist(event)
    except run.mp.PersistError:
        run.mark("failed", v=event["item"]["v"])  # from here on it must never come back
    else:
        run.tracer.ack([event])
    run.persist(log, "f3")
    log.close()


def restart(run):
    """What a process started after a kill -9 does: migrate (if the workload does),
    open, replay, persist one event.  What replay returned is relied on from then on."""
    if run.workload.legacy:
        run.mp.migrate_from_claude_coord(run.path)
    log = run.open()
    live = {}
    log.replay(lambda events: live.update(live_of(events)))
    run.mark("replayed", live=live)
    run.persist(log, "restart")
    log.close()


def live_of(events):
    return {"%s/%s" % (e["itemType"], e["item"]["id"]): e["item"].get("v")
            for e in events if e["changeType"] == "SET"}


def _write(root, rel, data):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _lines(keys, first_v=1):
    return b"".join(encode_line(make_event(key, v)) for v, key in enumerate(keys, first_v))


def setup_dir(rel):
    return lambda root: os.makedirs(os.path.join(root, rel))


def setup_log(keys, tail=b"", rel="log/events.jsonl"):
    return lambda root: _write(root, rel, _lines(keys) + tail)


TORN_FRAGMENT = encode_line(make_event("torn", 50))[:37]  # half a line, as a crash mid-write leaves
WHOLE_LAST_LINE = encode_line(make_event("whole", 51))[:-1]  # a whole event without its newline


class Workload:
    """A scenario: ``setup`` makes the durable starting state (not recorded), ``run``
    is recorded; ``log`` is the log's path from the scratch root."""

    def __init__(self, name, run, setup=None, log="log/events.jsonl", relative=False,
                 legacy=False, fragment=None, threads=False):
        self.name = name
        self.run = run
        self.setup = setup or (lambda root: None)
        self.log = log
        self.relative = relative  # chdir into the root and pass ``log`` as a relative path
        self.legacy = legacy  # $CLAUDE_COORD_STATE_DIR is <root>/legacy, holding a log
        self.fragment = fragment  # a torn line the open must keep (in the log or .torn)
        self.threads = threads  # its trace varies from run to run


LEGACY = setup_log(["old0", "old1", "old0"], rel="legacy/events.jsonl")

WORKLOADS = [
    Workload("single_persists", single_persists, setup_dir("log")),
    Workload("persist_batch", batches, setup_log(["base0", "base1"])),
    Workload("group_commit", group_commit, setup_log(["base0"]), threads=True),
    Workload("compaction", compaction, setup_log(["c0", "c1", "c2", "c3", "c0", "c1", "c2", "c3"])),
    Workload("compaction_beside_appender", compaction_beside_appender, setup_log(["c0", "c1", "c2", "c0"])),
    Workload("torn_tail", open_and_persist, setup_log(["x0", "x1", "x2"], TORN_FRAGMENT),
             fragment=TORN_FRAGMENT),
    Workload("unterminated_event", open_and_persist, setup_log(["x0", "x1"], WHOLE_LAST_LINE)),
    Workload("deleted_log", deleted_log, setup_log(["d0", "d1"])),
    Workload("deleted_dir", deleted_dir, setup_log(["d0", "d1"])),
    Workload("new_nested_dir", persist_two, log="a/b/events.jsonl"),
    Workload("unsynced_dir", unsynced_dir, log="d/events.jsonl"),
    Workload("relative_path", persist_two, log="events.jsonl", relative=True),
    Workload("relative_nested", persist_two, log="logs/events.jsonl", relative=True),
    Workload("migrate_new_dir", migrate, LEGACY, log="state/marshal/events.jsonl", legacy=True),
    Workload("migrate_existing_dir", migrate, lambda root: (LEGACY(root), setup_dir("state")(root)),
             log="state/events.jsonl", legacy=True),
    Workload("migrate_unsynced_dir", migrate_into_unsynced_dir, LEGACY, log="state/events.jsonl",
             legacy=True),
    Workload("migrate_by_copy", migrate_by_copy, LEGACY, log="state/marshal/events.jsonl", legacy=True),
    Workload("replaced_log", replaced_log, setup_log(["r0", "r1"])),
    Workload("failed_sync", failed_sync, setup_log(["f0"])),
]
BY_NAME = {w.name: w for w in WORKLOADS}

# --- trees: a disk's content as a value ------------------------------------------
#
# A tree is ``(dirs, files, links, symlinks)``: sorted tuples of relative paths, of
# (path, bytes), of (path, the first path of the same inode) for extra hard links,
# and of (path, target).  Being a hashable value, it deduplicates crash states.


def make_tree(dirs, inodes, symlinks):
    """``inodes`` maps each file's inode to ``(paths, content)``."""
    files, links = [], []
    for paths, content in inodes.values():
        first = min(paths)
        files.append((first, bytes(content)))
        links += [(p, first) for p in paths if p != first]
    return tuple(sorted(dirs)), tuple(sorted(files)), tuple(sorted(links)), tuple(sorted(symlinks))


def snapshot(root):
    """The tree of a real directory."""
    dirs, inodes, symlinks = [], {}, []
    for top, subdirs, names in os.walk(root):
        rel = os.path.relpath(top, root)
        prefix = "" if rel == "." else rel + "/"
        for name in subdirs + names:
            path = os.path.join(top, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                symlinks.append((prefix + name, os.readlink(path)))
            elif stat.S_ISDIR(st.st_mode):
                dirs.append(prefix + name)
            else:
                entry = inodes.setdefault(st.st_ino, ([], None))
                entry[0].append(prefix + name)
                if entry[1] is None:
                    with open(path, "rb") as f:
                        inodes[st.st_ino] = (entry[0], f.read())
    return make_tree(dirs, inodes, symlinks)


def materialize(tree, root):
    dirs, files, links, symlinks = tree
    os.makedirs(root, exist_ok=True)
    for rel in dirs:
        os.mkdir(os.path.join(root, rel))
    for rel, content in files:
        with open(os.path.join(root, rel), "wb") as f:
            f.write(content)
    for rel, first in links:
        os.link(os.path.join(root, first), os.path.join(root, rel))
    for rel, target in symlinks:
        os.symlink(target, os.path.join(root, rel))


def tree_file(tree, rel):
    """The content at ``rel`` in a tree, or None."""
    for path, content in tree[1]:
        if path == rel:
            return content
    for path, first in tree[2]:
        if path == rel:
            return tree_file(tree, first)
    return None


def encode_tree(tree):
    dirs, files, links, symlinks = tree
    return [list(dirs), [[p, base64.b64encode(c).decode()] for p, c in files],
            [list(x) for x in links], [list(x) for x in symlinks]]


def decode_tree(data):
    dirs, files, links, symlinks = data
    return (tuple(dirs), tuple((p, base64.b64decode(c)) for p, c in files),
            tuple(tuple(x) for x in links), tuple(tuple(x) for x in symlinks))


# --- recording: the traced os -------------------------------------------------------


class Tracer:
    """The log of one process's file-system calls under ``root``, and its fd table.

    One lock serializes every traced call with its logging, so that the trace's order
    is the order the calls took effect in, whatever the threads."""

    def __init__(self, root):
        self.root = os.path.realpath(root)
        self.ops = []
        self.lock = threading.RLock()
        self.fds = {}  # fd -> the root-relative path it was opened as (None: outside the root)
        self.faults = []  # [(names, errno)]: the next call of one of ``names`` fails
        self.os = TracedOs(self)

    def rel(self, path, dir_fd=None):
        """``path`` relative to the root ("." for the root), or None outside it."""
        path = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.readlink("/proc/self/fd/%d" % dir_fd), path)
        full = os.path.abspath(path)
        if full == self.root:
            return "."
        if full.startswith(self.root + "/"):
            return full[len(self.root) + 1:]
        return None

    def fd_path(self, fd):
        """The path behind ``fd``; a descriptor the tracer did not see opened (the module
        used something other than os.open) is adopted through /proc."""
        if fd not in self.fds:
            try:
                rel = self.rel(os.readlink("/proc/self/fd/%d" % fd))
            except OSError:
                rel = None
            self.fds[fd] = rel
            if rel is not None:
                self.log("adopt", fd=fd, path=rel)
        return self.fds[fd]

    def log(self, op, **fields):
        entry = {"op": op}
        entry.update(fields)
        self.ops.append(entry)

    def ack(self, events):
        with self.lock:
            self.log("ack", events=[["%s/%s" % (e["itemType"], e["item"]["id"]), e["changeType"],
                                     e["item"]["v"]] for e in events])

    def fail(self, names, code):
        self.faults.append((names, code))

    def maybe_fail(self, name):
        for fault in self.faults:
            if name in fault[0]:
                self.faults.remove(fault)
                self.log("fault", call=name, errno=fault[1])
                raise OSError(fault[1], os.strerror(fault[1]))


def _b64(data):
    return base64.b64encode(bytes(data)).decode()


class TracedOs:
    """Forwards every attribute to ``os``; the calls that change the file system are
    logged with what the model needs."""

    def __init__(self, tracer):
        self._t = tracer

    def __getattr__(self, name):
        return getattr(os, name)

    def open(self, path, flags, mode=0o777, *, dir_fd=None):
        t = self._t
        with t.lock:
            rel = t.rel(path, dir_fd)
            existed = os.path.lexists(os.path.join(t.root, rel)) if rel is not None else True
            t.maybe_fail("open")
            fd = os.open(path, flags, mode, dir_fd=dir_fd)
            t.fds[fd] = rel
            if rel is not None:
                t.log("open", path=rel, fd=fd, flags=flags, mode=mode,
                      created=not existed, truncated=existed and bool(flags & os.O_TRUNC),
                      dir=stat.S_ISDIR(os.fstat(fd).st_mode))
            return fd

    def _write(self, name, fd, data, offset=None):
        t = self._t
        with t.lock:
            rel = t.fd_path(fd)
            if offset is None:  # where the bytes land: an O_APPEND write goes to the end
                append = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
                at = os.fstat(fd).st_size if append else os.lseek(fd, 0, os.SEEK_CUR)
            else:
                at = offset
            t.maybe_fail(name)
            n = os.write(fd, data) if offset is None else os.pwrite(fd, data, offset)
            if rel is not None and n:
                t.log("write", fd=fd, path=rel, offset=at, data=_b64(memoryview(data)[:n]))
            return n

    def write(self, fd, data):
        return self._write("write", fd, data)

    def pwrite(self, fd, data, offset):
        return self._write("pwrite", fd, data, offset)

    def _fd_call(self, name, fd, *args):
        t = self._t
        with t.lock:
            rel = t.fd_path(fd)
            t.maybe_fail(name)
            result = getattr(os, name)(fd, *args)
            if rel is not None:
                t.log(name, fd=fd, path=rel, args=list(args))
            if name == "close":
                del t.fds[fd]
            return result

    def fsync(self, fd):
        return self._fd_call("fsync", fd)

    def fdatasync(self, fd):
        return self._fd_call("fdatasync", fd)

    def ftruncate(self, fd, length):
        return self._fd_call("ftruncate", fd, length)

    def close(self, fd):
        return self._fd_call("close", fd)

    def dup(self, fd):
        t = self._t
        with t.lock:
            rel = t.fd_path(fd)
            new = os.dup(fd)
            t.fds[new] = rel
            if rel is not None:
                t.log("dup", fd=fd, new=new, path=rel)
            return new

    def dup2(self, fd, fd2, inheritable=True):
        t = self._t
        with t.lock:
            rel = t.fd_path(fd)
            if t.fds.get(fd2) is not None:
                t.log("close", fd=fd2, path=t.fds[fd2], args=[])
            new = os.dup2(fd, fd2, inheritable)
            t.fds[new] = rel
            if rel is not None:
                t.log("dup", fd=fd, new=new, path=rel)
            return new

    def _path_call(self, name, logged, paths, call, **fields):
        t = self._t
        with t.lock:
            rels = [t.rel(p) for p in paths]
            t.maybe_fail(name)
            result = call()
            if all(r is not None for r in rels):
                t.log(logged, paths=rels, **fields)
            elif any(r is not None for r in rels):
                raise RuntimeError("%s across the scratch root is not modelled: %r" % (name, paths))
            return result

    def rename(self, src, dst, **kw):
        return self._path_call("rename", "rename", [src, dst], lambda: os.rename(src, dst, **kw))

    def replace(self, src, dst, **kw):
        return self._path_call("replace", "rename", [src, dst], lambda: os.replace(src, dst, **kw))

    def link(self, src, dst, **kw):
        return self._path_call("link", "link", [src, dst], lambda: os.link(src, dst, **kw))

    def unlink(self, path, **kw):
        return self._path_call("unlink", "unlink", [path], lambda: os.unlink(path, **kw))

    def remove(self, path, **kw):
        return self._path_call("remove", "unlink", [path], lambda: os.remove(path, **kw))

    def rmdir(self, path, **kw):
        return self._path_call("rmdir", "unlink", [path], lambda: os.rmdir(path, **kw))

    def mkdir(self, path, mode=0o777, **kw):
        return self._path_call("mkdir", "mkdir", [path], lambda: os.mkdir(path, mode, **kw))

    def symlink(self, src, dst, *args, **kw):
        return self._path_call("symlink", "symlink", [dst], lambda: os.symlink(src, dst, *args, **kw),
                               target=os.fsdecode(src))

    def truncate(self, path, length):
        if isinstance(path, int):
            return self.ftruncate(path, length)
        return self._path_call("truncate", "truncate", [path], lambda: os.truncate(path, length),
                               args=[length])

    def mutant_reached(self):
        """What a mutant calls instead of the sync it lost (see ``mutate``)."""
        with self._t.lock:
            self._t.log("reached")

    def makedirs(self, name, mode=0o777, exist_ok=False):
        # os.makedirs calls the real os.mkdir; this one goes through the traced one.
        head, tail = os.path.split(name)
        if not tail:
            head, tail = os.path.split(head)
        if head and tail and not os.path.exists(head):
            try:
                self.makedirs(head, exist_ok=exist_ok)
            except FileExistsError:
                pass
        try:
            self.mkdir(name, mode)
        except OSError:
            if not exist_ok or not os.path.isdir(name):
                raise


def install(module, tracer):
    """Point ``module.os`` at the traced os, and every module-level alias of an ``os``
    function (``_datasync = os.fdatasync``, ``from os import fsync``) at its traced
    twin.  Returns what it replaced, for the report."""
    os_names = {}
    for name in dir(os):
        value = getattr(os, name)
        if callable(value) and not isinstance(value, type):
            os_names.setdefault(id(value), name)
    replaced = []
    for name, value in list(vars(module).items()):
        if value is os:
            setattr(module, name, tracer.os)
            replaced.append(name)
        elif callable(value) and not isinstance(value, type) and (
                id(value) in os_names or getattr(value, "__module__", None) in ("posix", "os")):
            os_name = os_names.get(id(value), getattr(value, "__name__", name))
            setattr(module, name, getattr(tracer.os, os_name))
            replaced.append("%s=os.%s" % (name, os_name))
    return replaced


def load_module(path):
    spec = importlib.util.spec_from_file_location("marshal_persist", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["marshal_persist"] = module
    spec.loader.exec_module(module)
    return module


def record(mp, workload, root, phase, start_tree=None):
    """Run a workload (``phase`` "run": from its setup) or a restart (from
    ``start_tree``, a kill -9 state) under the tracer, in this process."""
    if start_tree is None:
        os.makedirs(root)
        workload.setup(root)
    else:
        materialize(start_tree, root)
    root = os.path.realpath(root)  # the path the module sees is the one the tracer matches
    baseline = snapshot(root)
    os.chdir(root)
    if workload.legacy:
        os.environ["CLAUDE_COORD_STATE_DIR"] = os.path.join(root, "legacy")
    tracer = Tracer(root)
    wrapped = install(mp, tracer)
    run = Run(mp, tracer, workload, root, RESTART_V if phase == "restart" else 101)
    (restart if phase == "restart" else workload.run)(run)
    return {"baseline": encode_tree(baseline), "final": encode_tree(snapshot(root)),
            "ops": tracer.ops, "wrapped": wrapped}


# --- checking one disk image (in a fresh process) -------------------------------------


def check_image(mp, workload, root, tree):
    """Recover a crash state as the next start would, and persist on top of it;
    returns what was seen, for the explorer to judge."""
    materialize(tree, root)
    root = os.path.realpath(root)
    os.chdir(root)
    if workload.legacy:
        os.environ["CLAUDE_COORD_STATE_DIR"] = os.path.join(root, "legacy")
    path = workload.log if workload.relative else os.path.join(root, workload.log)
    facts = {}
    try:
        if workload.legacy:
            mp.migrate_from_claude_coord(path)
        log = mp.DiskPersister(path)
        live = {}
        log.replay(lambda events: live.update(live_of(events)))
    except Exception as exc:
        facts["error"] = "recovery raised %s: %s" % (type(exc).__name__, exc)
        return facts
    with open(path, "rb") as f:
        events = log_events(f.read())
    facts["live"] = live
    facts["last"] = {key: [change, v] for key, change, v in events}
    facts["vs"] = sorted({v for _, _, v in events if isinstance(v, int)})
    post = make_event("post-recovery", POST_V)
    try:
        log.persist(post)
        log.close()
        with open(path, "rb") as f:
            data = f.read()
        problem = first_glued_line(data) or (data and not data.endswith(b"\n") and "the log does not "
                                             "end with a newline after a persist")
        if problem:
            facts["post"] = "after recovery and a persist, " + problem
        again = {}
        log = mp.DiskPersister(path)
        log.replay(lambda events: again.update(live_of(events)))
        log.close()
        expected = dict(live, **{"%s/post-recovery" % ITEM_TYPE: POST_V})
        if again != expected:
            facts["post"] = "a persist after recovery, then a reopen: " + _diff(again, expected)
    except Exception as exc:
        facts["post"] = "the persist after recovery raised %s: %s" % (type(exc).__name__, exc)
    return facts


def _diff(got, want):
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    changed = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    parts = ["missing " + ", ".join(missing)] if missing else []
    parts += ["extra " + ", ".join(extra)] if extra else []
    parts += ["%s=%s not %s" % (k, got[k], want[k]) for k in changed]
    return "; ".join(parts) or "equal"


# --- the fork server: one import of the module, a fresh process per job -----------------


def serve(module_path, scratch):
    """Answer JSON requests on stdin, one line each, running each in a forked child."""
    mp = load_module(module_path)
    jobs = itertools.count()
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        request = json.loads(line)
        root = os.path.join(scratch, "%d-%d" % (os.getpid(), next(jobs)))
        result = run_forked(root, handle, mp, request, root)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


def handle(mp, request, root):
    workload = BY_NAME[request["workload"]]
    tree = decode_tree(request["tree"]) if request.get("tree") is not None else None
    if request["kind"] == "check":
        return check_image(mp, workload, root, tree)
    return record(mp, workload, root, request["phase"], tree)


def run_forked(root, job, *args):
    """``job(*args)`` in a forked child; its JSON result, or {"crash": why}.  The
    child's scratch directory ``root`` is removed after it."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # stdout is the server's answer channel
        try:
            result = job(*args)
        except BaseException:
            result = {"crash": traceback.format_exc(limit=8)}
        data = json.dumps(result).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(write_end, view):]
        os._exit(0)
    os.close(write_end)
    chunks, deadline = [], time.monotonic() + CHILD_TIMEOUT
    while True:
        ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            chunks = [json.dumps({"crash": "no answer within %d s (hung?)" % CHILD_TIMEOUT}).encode()]
            break
        chunk = os.read(read_end, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    shutil.rmtree(root, ignore_errors=True)
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        return {"crash": "the child died without an answer"}


class Pool:
    """Servers for one module; ``map`` spreads requests over them."""

    def __init__(self, module_path, scratch, jobs):
        self.servers = [subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", "--module", module_path,
             "--scratch", scratch], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(jobs)]

    def map(self, requests):
        results = [None] * len(requests)
        todo = iter(enumerate(requests))
        lock = threading.Lock()

        def work(server):
            while True:
                with lock:
                    item = next(todo, None)
                if item is None:
                    return
                try:
                    server.stdin.write(json.dumps(item[1]) + "\n")
                    server.stdin.flush()
                    answer = server.stdout.readline()
                except OSError:  # it died (a module that does not import, say): see its stderr
                    answer = ""
                results[item[0]] = json.loads(answer) if answer else {"crash": "the server died"}

        threads = [threading.Thread(target=work, args=(s,)) for s in self.servers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results

    def close(self):
        for server in self.servers:
            try:
                server.stdin.close()
            except OSError:
                pass
            server.wait()


# --- the model: what each file and directory holds, durably and in the page cache ---------


class File:
    """``data``: the page cache's content; ``durable``: at the last fsync; ``ops``: the
    writes ("w", offset, bytes) and truncations ("t", length) since."""

    __slots__ = ("data", "durable", "ops")

    def __init__(self, data=b""):
        self.data = self.durable = data
        self.ops = []

    def clone(self):
        twin = File(self.data)
        twin.durable, twin.ops = self.durable, list(self.ops)
        return twin

    def apply(self, op):
        self.ops.append(op)
        self.data = _apply(self.data, op)

    def sync(self):
        self.durable, self.ops = self.data, []

    def choices(self):
        """What a power cut may leave: (how many ops survive, torn at which offset)."""
        out = [(0, None)]
        for k, op in enumerate(self.ops, 1):
            if op[0] == "w":
                out += [(k, tear) for tear in _tears(op[1], len(op[2]))]
            out.append((k, None))
        return out

    def survivor(self, k, tear=None):
        data = self.durable
        for i, op in enumerate(self.ops[:k]):
            if tear is not None and i == k - 1:
                op = ("w", op[1], op[2][:tear - op[1]])
            data = _apply(data, op)
        return data


def _apply(data, op):
    if op[0] == "t":
        return data[:op[1]] + b"\0" * (op[1] - len(data))
    _, offset, chunk = op
    data = data + b"\0" * (offset - len(data))
    return data[:offset] + chunk + data[offset + len(chunk):]


def _tears(offset, size):
    inside = range((offset // BLOCK + 1) * BLOCK, offset + size, BLOCK)
    return list(inside) if len(inside) <= TEARS_PER_WRITE else [inside[0], inside[-1]]


class Dir:
    """``entries``: the page cache's names; ``durable``: at the last fsync of the
    directory; ``ops``: the changes since, each a list of (name, inode or None) edits
    that take effect together (a rename within the directory is one)."""

    __slots__ = ("entries", "durable", "ops")

    def __init__(self):
        self.entries, self.durable, self.ops = {}, {}, []

    def clone(self):
        twin = Dir()
        twin.entries, twin.durable, twin.ops = dict(self.entries), self.durable, list(self.ops)
        return twin

    def change(self, *edits):
        for name, ino in edits:
            if ino is None:
                self.entries.pop(name, None)
            else:
                self.entries[name] = ino
        self.ops.append(edits)

    def sync(self):
        self.durable, self.ops = dict(self.entries), []

    def survivors(self, k):
        entries = dict(self.durable)
        for edits in self.ops[:k]:
            for name, ino in edits:
                if ino is None:
                    entries.pop(name, None)
                else:
                    entries[name] = ino
        return entries


class Symlink:
    __slots__ = ("target",)

    def __init__(self, target):
        self.target = target

    def clone(self):
        return self


class ModelError(Exception):
    """The trace does not fit the model (a bug here, or a call the proxy missed)."""


class Sim:
    """The file system a trace builds, inode by inode, from a durable starting tree."""

    def __init__(self, tree=None):
        self.inodes = {}
        self.fds = {}
        self.root = self._new(Dir())
        if tree is not None:
            self._load(tree)

    def _new(self, node):
        ino = len(self.inodes) + 1
        while ino in self.inodes:
            ino += 1
        self.inodes[ino] = node
        return ino

    def _load(self, tree):
        dirs, files, links, symlinks = tree
        for rel in dirs:
            parent, name = self.parent(rel)
            parent.entries[name] = self._new(Dir())
        for rel, content in files:
            parent, name = self.parent(rel)
            parent.entries[name] = self._new(File(content))
        for rel, first in links:
            parent, name = self.parent(rel)
            parent.entries[name] = self.lookup(first)
        for rel, target in symlinks:
            parent, name = self.parent(rel)
            parent.entries[name] = self._new(Symlink(target))
        for node in self.inodes.values():
            if isinstance(node, Dir):
                node.sync()

    def clone(self):
        twin = Sim.__new__(Sim)
        twin.inodes = {ino: node.clone() for ino, node in self.inodes.items()}
        twin.fds, twin.root = dict(self.fds), self.root
        return twin

    def lookup(self, rel):
        ino = self.root
        for part in ([] if rel == "." else rel.split("/")):
            node = self.inodes[ino]
            if isinstance(node, Symlink):
                raise ModelError("a path through a symbolic link is not modelled: %s" % rel)
            if not isinstance(node, Dir) or part not in node.entries:
                return None
            ino = node.entries[part]
        return ino

    def parent(self, rel):
        head, _, name = rel.rpartition("/")
        ino = self.lookup(head or ".")
        if ino is None or not isinstance(self.inodes[ino], Dir):
            raise ModelError("no directory for %s in the model" % rel)
        return self.inodes[ino], name

    def node_at(self, rel):
        ino = self.lookup(rel)
        if ino is None:
            raise ModelError("%s is not in the model" % rel)
        return ino

    def apply(self, op):
        """One traced call; marks and acks change nothing on disk."""
        kind = op["op"]
        if kind == "open":
            self._open(op)
        elif kind == "adopt":
            self.fds[op["fd"]] = self.node_at(op["path"])
        elif kind in ("write", "ftruncate", "truncate"):
            ino = self.node_at(op["paths"][0]) if kind == "truncate" else self._fd(op)
            node = self.inodes[ino]
            if not isinstance(node, File):
                raise ModelError("%s on a non-file" % kind)
            if kind == "write":  # past the end, it leaves a hole of zeros, as the disk does
                node.apply(("w", op["offset"], op["data"]))
            else:
                node.apply(("t", op["args"][0]))
        elif kind in ("fsync", "fdatasync"):
            self.inodes[self._fd(op)].sync()  # a directory: its entries; a file: data and size
        elif kind == "close":
            self.fds.pop(op["fd"], None)
        elif kind == "dup":
            self.fds[op["new"]] = self._fd(op)
        elif kind == "rename":
            self._rename(*op["paths"])
        elif kind == "link":
            parent, name = self.parent(op["paths"][1])
            parent.change((name, self.node_at(op["paths"][0])))
        elif kind == "unlink":
            parent, name = self.parent(op["paths"][0])
            if name not in parent.entries:
                raise ModelError("unlink of %s, which the model does not have" % op["paths"][0])
            parent.change((name, None))
        elif kind == "mkdir":
            parent, name = self.parent(op["paths"][0])
            parent.change((name, self._new(Dir())))
        elif kind == "symlink":
            parent, name = self.parent(op["paths"][0])
            parent.change((name, self._new(Symlink(op["target"]))))

    def _fd(self, op):
        if op["fd"] not in self.fds:
            raise ModelError("%s on fd %d, which the model never saw opened" % (op["op"], op["fd"]))
        return self.fds[op["fd"]]

    def _open(self, op):
        ino = self.lookup(op["path"])
        if op["created"]:
            if ino is not None:
                raise ModelError("open created %s, which the model already had" % op["path"])
            parent, name = self.parent(op["path"])
            ino = self._new(File())
            parent.change((name, ino))
        elif ino is None:
            raise ModelError("open of %s, which the model does not have" % op["path"])
        elif op["truncated"]:
            self.inodes[ino].apply(("t", 0))
        self.fds[op["fd"]] = ino

    def _rename(self, src, dst):
        source, old = self.parent(src)
        target, new = self.parent(dst)
        ino = source.entries.get(old)
        if ino is None:
            raise ModelError("rename of %s, which the model does not have" % src)
        if target.entries.get(new) == ino:
            return  # two names of one file: rename does nothing
        if source is target:
            source.change((old, None), (new, ino))
        else:  # each directory on its own: the entry may survive in both or in neither
            target.change((new, ino))
            source.change((old, None))

    # --- crash states ---

    def tree(self, choice=None):
        """The page cache's tree (``choice`` None), or what a power cut leaves when
        ``choice`` says how much of each inode's pending changes survived."""
        dirs, inodes, symlinks = [], {}, []

        def walk(ino, prefix, depth):
            node = self.inodes[ino]
            entries = node.entries if choice is None else node.survivors(choice.get(ino, (0,))[0])
            for name in sorted(entries):
                child, path = entries[name], prefix + name
                kid = self.inodes[child]
                if isinstance(kid, Dir) and depth < 32:
                    dirs.append(path)
                    walk(child, path + "/", depth + 1)
                elif isinstance(kid, File):
                    if child not in inodes:
                        content = kid.data if choice is None else kid.survivor(*choice.get(child, (0, None)))
                        inodes[child] = ([], content)
                    inodes[child][0].append(path)
                elif isinstance(kid, Symlink):
                    symlinks.append((path, kid.target))

        walk(self.root, "", 0)
        return make_tree(dirs, inodes, symlinks)

    def pending(self):
        """Every inode with unsynced changes a power cut could reveal, as its choices."""
        seen, stack, dims = set(), [self.root], []
        while stack:
            ino = stack.pop()
            if ino in seen:
                continue
            seen.add(ino)
            node = self.inodes[ino]
            if isinstance(node, Dir):
                names = set(node.durable.values()) | set(node.entries.values())
                names |= {i for edits in node.ops for _, i in edits if i is not None}
                stack.extend(sorted(names))
                if node.ops:
                    dims.append([(ino, k, None) for k in range(len(node.ops) + 1)])
            elif isinstance(node, File) and node.ops:
                dims.append([(ino, k, tear) for k, tear in node.choices()])
        return sorted(dims)

    def power_cuts(self, rng, cap=STATES_PER_POINT):
        """The distinct trees a power cut may leave now."""
        trees = {}
        for combo in _pick(self.pending(), cap, rng):
            trees[self.tree({ino: (k, tear) for ino, k, tear in combo})] = None
        return list(trees)


def _pick(dims, cap, rng):
    """Every combination of the dimensions' choices, or, above ``cap``, all but one of
    them at their extremes, each choice of the one, then random ones up to ``cap``."""
    total = 1
    for dim in dims:
        total *= len(dim)
    if total <= cap:
        return list(itertools.product(*dims))
    chosen = {}
    for extreme in ([d[-1] for d in dims], [d[0] for d in dims]):
        for i, dim in enumerate(dims):
            for c in dim:
                chosen[tuple(extreme[:i] + [c] + extreme[i + 1:])] = None
    while len(chosen) < cap:
        chosen[tuple(rng.choice(d) for d in dims)] = None
    return list(chosen)


# --- what a state must show -------------------------------------------------------------


class Expect:
    """What the trace so far promises about a crash state."""

    __slots__ = ("acked", "suspended", "written", "failed", "window", "moved")

    def __init__(self):
        self.acked = {}  # key -> (changeType, v, why it is owed) of its latest owed event
        self.suspended = False  # an outside rm: nothing is owed until the next ack
        self.written = set()  # every v that reached a write
        self.failed = set()  # v of events whose persist raised: never to come back
        self.window = None  # inside a compaction: the live state every cut must show
        self.moved = False  # the migration returned: the legacy log must stay gone

    @classmethod
    def from_baseline(cls, tree, workload):
        exp = cls()
        for rel in (["legacy/events.jsonl"] if workload.legacy else []) + [workload.log]:
            data = tree_file(tree, rel)
            for key, change, v in log_events(data or b""):
                exp.acked[key] = (change, v, "acknowledged")  # durable from the start
            exp.written |= {int(v) for v in re.findall(rb'"v":(\d+)', data or b"")}
        return exp

    def copy(self):
        twin = Expect.__new__(Expect)
        for name in self.__slots__:
            value = getattr(self, name)
            setattr(twin, name, value.copy() if isinstance(value, (dict, set)) else value)
        return twin

    def see(self, op):
        kind = op["op"]
        if kind == "write":
            self.written |= {int(v) for v in re.findall(rb'"v":(\d+)', op["data"])}
        elif kind == "ack":
            self.suspended, self.window = False, None
            for key, change, v in op["events"]:
                self.acked[key] = (change, v, "acknowledged")
        elif kind == "mark":
            name = op["name"]
            if name == "compact-begin":
                self.window = {k: v for k, (change, v, _) in self.acked.items() if change == "SET"}
            elif name == "compact-end":
                self.window = None
            elif name == "outside-delete":
                self.suspended = True
            elif name == "migrated":
                self.moved = op["moved"]
            elif name == "failed":
                self.failed.add(op["v"])
            elif name == "replayed":  # the restart relies on it from now on: it is owed
                for key, v in op["live"].items():
                    if key not in self.acked or self.acked[key][1] < v:
                        self.acked[key] = ("SET", v, "replayed by the restart")

    def required(self):
        return {} if self.suspended else self.acked

    def after_kill(self):
        """What a restart after a kill -9 owes: a compaction the kill cut short is over
        (what it held is acknowledged anyway), and what an outside rm took before the
        killed process could recreate the log is gone for good."""
        twin = self.copy()
        twin.window = None
        if twin.suspended:
            twin.acked, twin.suspended = {}, False
        return twin


def inspect_tree(tree, workload):
    """What the crash state shows before any recovery runs on it."""
    problems = []
    log = tree_file(tree, workload.log)
    glued = first_glued_line(log or b"")
    if glued:
        problems.append("in the log as the power cut left it, " + glued)
    legacy = workload.legacy and tree_file(tree, "legacy/events.jsonl") is not None
    if workload.fragment is not None:
        kept = (log or b"") + (tree_file(tree, workload.log + ".torn") or b"")
        if workload.fragment not in kept:
            problems.append("the torn line is lost: in neither the log nor %s.torn" % workload.log)
    return problems, legacy


def _last_line(text):
    return (text.strip().splitlines() or [""])[-1]


def judge(exp, pre, facts):
    """The violations of one crash state: a list of messages, empty when it is right."""
    problems, legacy_back = pre
    messages = list(problems)
    if exp.moved and legacy_back:
        messages.append("the legacy log is back although the migration had returned")
    if "crash" in facts:
        return messages + ["the check itself failed: " + _last_line(facts["crash"])]
    if "error" in facts:
        return messages + [facts["error"]]
    live, last = facts["live"], facts["last"]
    for key, (change, v, why) in sorted(exp.required().items()):
        got = live.get(key)
        newer_del = key in last and last[key][0] == "DEL" and last[key][1] > v
        if change == "SET" and got is None and not newer_del:
            messages.append("%s=%d, %s, is lost" % (key, v, why))
        elif change == "SET" and got is not None and got < v:
            messages.append("%s=%d, %s, went back to %d" % (key, v, why, got))
        elif change == "DEL" and got is not None and got < v:
            messages.append("the deletion of %s (v=%d), %s, is undone: %d is back" % (key, v, why, got))
    for v in facts["vs"]:
        if v not in exp.written:
            messages.append("an event that was never written appears (v=%d)" % v)
        if v in exp.failed:
            messages.append("the event whose persist raised came back (v=%d)" % v)
    if exp.window is not None and live != exp.window:
        messages.append("a power cut during compaction: live state %s" % _diff(live, exp.window))
    if "post" in facts:
        messages.append(facts["post"])
    return messages


# --- the explorer ---------------------------------------------------------------------------


NOT_ON_DISK = ("ack", "mark")  # trace records that change no file


def describe(op):
    kind = op["op"]
    if kind == "write":
        return "write(%s, %d bytes at %d)" % (op["path"], len(op["data"]), op["offset"])
    if kind == "open":
        return "open(%s%s)" % (op["path"], ", created" if op["created"] else "")
    if kind in ("fsync", "fdatasync", "close", "ftruncate", "dup", "adopt"):
        return "%s(%s%s)" % (kind, op["path"], "".join(", %s" % a for a in op.get("args", [])))
    if kind == "ack":
        return "ack " + ", ".join("%s %s=%d" % (c, k, v) for k, c, v in op["events"])
    if kind == "mark":
        return "mark " + op["name"]
    if kind == "reached":
        return "the removed sync"
    if kind == "fault":
        return "injected %s failure of %s" % (errno.errorcode.get(op["errno"], op["errno"]), op["call"])
    return "%s(%s)" % (kind, ", ".join(op.get("paths", [])))


class WorkloadReport:
    def __init__(self, name):
        self.name = name
        self.calls = 0  # traced calls of the first run
        self.points = 0  # crash points: after each call, of the run and of every restart
        self.states = 0  # (crash point, distinct state) pairs judged
        self.images = 0  # distinct disk images recovered in a fresh process
        self.reached = 0  # in a mutant: how often the recordings ran its removed call
        self.wrapped = []  # the module's names the tracer replaced (os, aliases of its functions)
        self.violations = []  # (where, messages)
        self.error = None  # the workload could not be explored at all
        self.facts = {}  # tree -> (what it shows before recovery, what recovery saw)


class Explorer:
    """Explores workloads against one copy of the module."""

    def __init__(self, module_path, scratch, jobs=2, cap=STATES_PER_POINT):
        self.module_path = module_path
        self.cap = cap
        self.pool = Pool(module_path, scratch, jobs)

    def close(self):
        self.pool.close()

    def explore(self, workload, enough=None):
        """A WorkloadReport; stops early once ``enough(violations so far)`` is true."""
        report = WorkloadReport(workload.name)
        try:
            self._explore(workload, report, enough or (lambda violations: False))
        except ModelError as exc:
            report.error = "the model cannot follow the trace: %s" % exc
        return report

    def _explore(self, w, report, enough):
        rec = self.pool.map([{"kind": "record", "workload": w.name, "phase": "run"}])[0]
        if "crash" in rec:
            report.violations.append(("the workload itself", ["raised: " + rec["crash"].strip()]))
            return
        ops = self._load(rec, report)
        report.wrapped = rec["wrapped"]
        report.calls = sum(op["op"] not in NOT_ON_DISK for op in ops)
        sim = Sim(decode_tree(rec["baseline"]))
        exp = Expect.from_baseline(decode_tree(rec["baseline"]), w)
        states, kills = [], []
        trees = volatile = None  # unchanged by acks and marks: only the expectations grow
        for i in range(len(ops) + 1):
            where = "after #%d %s" % (i, describe(ops[i - 1])) if i else "before the first call"
            if trees is None:
                trees = sim.power_cuts(random.Random("%s:%d" % (w.name, i)), self.cap)
                volatile = sim.tree()
            here = exp.copy()
            report.points += 1
            states += [("power cut " + where, tree, here) for tree in trees]
            states.append(("kill -9 " + where, volatile, here))
            kills.append((i, where, sim.clone(), here, volatile))
            if i < len(ops):
                sim.apply(ops[i])
                exp.see(ops[i])
                if ops[i]["op"] not in NOT_ON_DISK:
                    trees = None
        _same_as_disk(sim, rec["final"], "the run")
        if self._judge(w, states, report, enough):
            return
        self._restarts(w, kills, report, enough)

    def _restarts(self, w, kills, report, enough):
        """After each kill -9: a restart recorded on the page cache's state, and power cuts
        inside it, on top of what the first run left unsynced."""
        volatile = list(dict.fromkeys(k[4] for k in kills))
        recs = self.pool.map([{"kind": "record", "workload": w.name, "phase": "restart",
                               "tree": encode_tree(t)} for t in volatile])
        by_tree = dict(zip(volatile, recs))
        for rec in recs:
            if "crash" not in rec:
                rec["ops"] = self._load(rec, report)
        states = []
        for i, where, sim, exp, tree in kills:
            rec = by_tree[tree]
            label = "kill -9 " + where + ", restart"
            if "crash" in rec:
                report.violations.append((label, ["the restart raised: " + _last_line(rec["crash"])]))
                continue
            sim.fds = {}  # the killed process's descriptors are gone
            exp = exp.after_kill()
            trees = None
            for j, op in enumerate(rec["ops"]):
                sim.apply(op)
                exp.see(op)
                if op["op"] not in NOT_ON_DISK or trees is None:
                    trees = sim.power_cuts(random.Random("%s:%d:%d" % (w.name, i, j)), self.cap)
                report.points += 1
                here = exp.copy()
                states += [("%s, power cut after restart #%d %s" % (label, j + 1, describe(op)), t, here)
                           for t in trees]
            _same_as_disk(sim, rec["final"], "a restart")
        self._judge(w, states, report, enough)

    @staticmethod
    def _load(rec, report):
        """The trace's records, bytes decoded; the marks a mutant leaves (and injected
        faults) are counted and dropped: they are no calls, so no crash points."""
        ops = []
        for op in rec["ops"]:
            if op["op"] == "reached":
                report.reached += 1
            elif op["op"] != "fault":
                if "data" in op:
                    op["data"] = base64.b64decode(op["data"])
                ops.append(op)
        return ops

    def _judge(self, w, states, report, enough):
        """Check every new image in a fresh process, then judge each state; True when
        the violations found are ``enough``."""
        cache = report.facts
        new = [t for t in dict.fromkeys(t for _, t, _ in states) if t not in cache]
        results = self.pool.map([{"kind": "check", "workload": w.name, "tree": encode_tree(t)}
                                 for t in new])
        for tree, facts in zip(new, results):
            cache[tree] = (inspect_tree(tree, w), facts)
        report.images = len(cache)
        seen = set()
        for where, tree, exp in states:
            if (where, tree) in seen:
                continue
            seen.add((where, tree))
            report.states += 1
            messages = judge(exp, *cache[tree])
            if messages:
                report.violations.append((where, messages))
        return enough(report.violations)


def _same_as_disk(sim, final, what):
    """The model's page cache must match the real directory the recording left: if
    not, the module changed files through a call the proxy does not see."""
    real = decode_tree(final)
    model = sim.tree()
    if model != real:
        raise ModelError("after %s, the model and the disk differ: model %s, disk %s" % (
            what, _tree_summary(model), _tree_summary(real)))


def _tree_summary(tree):
    return "dirs %s, files %s" % (list(tree[0]), ["%s (%d bytes)" % (p, len(c)) for p, c in tree[1]])


def scratch_base():
    """/dev/shm when there is one: every state is written and read back many times."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def explore_all(module_path, workloads=None, jobs=2, cap=STATES_PER_POINT, scratch=None):
    """Explore ``workloads`` (all by default); a list of WorkloadReport."""
    own = scratch is None
    scratch = scratch or tempfile.mkdtemp(prefix="power-loss-", dir=scratch_base())
    explorer = Explorer(os.path.abspath(module_path), scratch, jobs, cap)
    try:
        return [explorer.explore(w) for w in workloads or WORKLOADS]
    finally:
        explorer.close()
        if own:
            shutil.rmtree(scratch, ignore_errors=True)


# --- mutation check ---------------------------------------------------------------------------


MUTATING = {"write", "pwrite", "writev", "ftruncate", "truncate", "rename", "replace", "link",
            "unlink", "remove", "mkdir", "makedirs", "rmdir", "symlink"}


def _called(node):
    """The calls anywhere in ``node``: ("os", name) for ``os.name(...)``, else ("", name)
    (``f.write``, ``self._fsync_dir``, ``_datasync``), so ``os.close`` is not taken for a
    method named close."""
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            func = sub.func
            if isinstance(func, ast.Attribute):
                names.add(("os" if getattr(func.value, "id", None) == "os" else "", func.attr))
            elif isinstance(func, ast.Name):
                names.add(("", func.id))
    return names


def sync_helpers(tree):
    """Names that stand for a sync: module-level aliases of ``os.fsync`` or
    ``os.fdatasync`` (``_datasync = getattr(os, "fdatasync", os.fsync)``), and
    functions named for syncing (``_fsync_dir``, ``_sync_path``, ``_datasync``) that
    end in a sync and change nothing themselves (so not ``_sync_written``, which may
    cut a failed write back, nor ``_write_and_sync``)."""
    aliases = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(sub, ast.Attribute) and sub.attr in ("fsync", "fdatasync")
                and getattr(sub.value, "id", None) == "os" for sub in ast.walk(node.value)):
            aliases |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    calls = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            calls[node.name] = calls.get(node.name, set()) | _called(node)
    syncs = {("os", "fsync"), ("os", "fdatasync")} | {("", a) for a in aliases}
    mutating = {(where, name) for where in ("os", "") for name in MUTATING}

    def reaches(name, targets, seen):
        if name in seen or name not in calls:
            return False
        seen.add(name)
        return bool(calls[name] & targets) or any(
            reaches(callee, targets, seen) for where, callee in calls[name] if not where)

    named = {name for name in calls if "sync" in name.lower()
             and reaches(name, syncs, set()) and not reaches(name, mutating, set())}
    return aliases | named


def sync_call_sites(source):
    """Every call of ``os.fsync``, ``os.fdatasync`` or a sync helper (see
    ``sync_helpers``): a list of (label, line, start column, end column) of the
    called expression, labelled by the enclosing function and the call's text."""
    tree = ast.parse(source)
    helpers = sync_helpers(tree)
    sites, counts = [], {}

    def is_sync(func):
        if isinstance(func, ast.Attribute):
            on_os = getattr(func.value, "id", None) == "os"
            return func.attr in (("fsync", "fdatasync") if on_os else helpers)
        return getattr(func, "id", None) in helpers

    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, scope + [child.name])
                continue
            if isinstance(child, ast.Call) and is_sync(child.func) \
                    and child.func.lineno == child.func.end_lineno:
                text = " ".join(ast.get_source_segment(source, child).split())
                label = "%s: %s" % (".".join(scope) or "<module>", text)
                counts[label] = counts.get(label, 0) + 1
                if counts[label] > 1:
                    label += " (#%d)" % counts[label]
                sites.append((label, child.func.lineno, child.func.col_offset, child.func.end_col_offset))
            visit(child, scope)

    visit(tree, [])
    return sites


NO_OP = b'(lambda *_a, **_k: getattr(os, "mutant_reached", lambda: None)())'


def mutate(source, site):
    """``source`` with the call at ``site`` made a no-op (its arguments still evaluated)
    that leaves a "reached" mark in a recorded trace, to tell a mutant no workload
    runs from one that runs but is not caught."""
    _, line, start, end = site
    lines = source.splitlines(True)
    raw = lines[line - 1].encode("utf-8")  # ast columns count bytes
    lines[line - 1] = (raw[:start] + NO_OP + raw[end:]).decode("utf-8")
    return "".join(lines)


def _kinds(violations):
    """Each violation as (where, without numbers or temp names, and a message): the
    same for a mutant and the module wherever in the trace it happens, so the two
    can be compared even when the module as it is has violations of its own."""
    kinds = set()
    for where, messages in violations:
        where = re.sub(r"\d+", "N", re.sub(r"(\.[0-9a-f]+)+\.tmp\b", ".tmp", where))
        kinds |= {(where, message) for message in messages}
    return kinds


def _hunt(mutant, explorer, before):
    """Explore workload after workload until one shows a kind of violation the module
    as it is never shows there (``before``: workload -> kinds), and stop there.
    Workloads whose trace varies from run to run (threads) come last."""
    reached = 0
    for w in sorted(WORKLOADS, key=lambda w: w.threads):
        report = explorer.explore(w, lambda found, w=w: bool(_kinds(found) - before[w.name]))
        reached += report.reached
        new = [v for v in report.violations if _kinds([v]) - before[w.name]]
        if report.error or new:
            where, messages = new[0] if new else ("", [report.error])
            mutant.caught = True
            mutant.where = "%s: %s: %s" % (w.name, where, messages[0])
            return
    mutant.caught = False
    mutant.reached = reached
    mutant.where = ("no workload runs it" if not reached else
                    "runs %d times in the recordings, yet no crash state shows it" % reached)


class Mutant:
    def __init__(self, label, line):
        self.label = label
        self.line = line
        self.caught = None
        self.where = ""  # the first violation that caught it, or why not
        self.reached = None  # how often the recordings ran the removed call, when all ran


def mutation_check(module_path, jobs=2, cap=STATES_PER_POINT, baseline=None):
    """For each sync call site, explore a copy of the module without it; a mutant is
    caught when a workload shows a violation the module as it is does not show there
    (with a clean module: any violation)."""
    with open(module_path, encoding="utf-8") as f:
        source = f.read()
    scratch = tempfile.mkdtemp(prefix="power-loss-mutants-", dir=scratch_base())
    try:
        if baseline is None:
            baseline = explore_all(module_path, jobs=jobs, cap=cap, scratch=scratch)
        before = {r.name: _kinds(r.violations) for r in baseline}
        mutants = []
        for n, site in enumerate(sync_call_sites(source)):
            mutant = Mutant(site[0], site[1])
            mutants.append(mutant)
            path = os.path.join(scratch, "mutant%d" % n, "marshal_persist.py")
            os.makedirs(os.path.dirname(path))
            with open(path, "w", encoding="utf-8") as f:
                f.write(mutate(source, site))
            explorer = Explorer(path, scratch, jobs, cap)
            try:
                _hunt(mutant, explorer, before)
            finally:
                explorer.close()
        return mutants
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- the command line ---------------------------------------------------------------------------


def print_report(reports, seconds, module_path, examples, out=sys.stdout):
    out.write("power-loss crash states of %s\n" % module_path)
    wrapped = sorted({name for r in reports for name in r.wrapped})
    out.write("traced through the module's %s\n\n" % ", ".join(wrapped or ["(nothing?)"]))
    out.write("%-22s %6s %7s %7s %7s %11s %7s %9s\n" % (
        "workload", "calls", "points", "states", "images", "violations", "in run", "after -9"))
    for r in reports:
        in_run = sum(where.startswith("power cut") for where, _ in r.violations)
        out.write("%-22s %6d %7d %7d %7d %11s %7d %9d\n" % (
            r.name, r.calls, r.points, r.states, r.images, "ERROR" if r.error else len(r.violations),
            in_run, len(r.violations) - in_run))
    total = sum(len(r.violations) for r in reports)
    out.write("(in run: a power cut during the workload; after -9: the kill -9 state, or a power cut "
              "in the restart after it)\n")
    out.write("\nworkloads: %d, crash points: %d, states checked: %d (%d disk images, each recovered "
              "in a fresh process), violations: %d, %.1f s\n" % (
                  len(reports), sum(r.points for r in reports), sum(r.states for r in reports),
                  sum(r.images for r in reports), total, seconds))
    for r in reports:
        if r.error:
            out.write("\n%s: %s\n" % (r.name, r.error))
        if r.violations:
            out.write("\n%s: %d violating states, e.g.\n" % (r.name, len(r.violations)))
            for where, messages in _examples(r.violations, examples):
                out.write("  %s\n    %s\n" % (where, "\n    ".join(messages)))


def _examples(violations, count):
    """A few violations, with different first messages where there are."""
    picked, kinds = [], set()
    for where, messages in violations:
        kind = re.sub(r"\d+", "N", messages[0])
        if kind not in kinds:
            kinds.add(kind)
            picked.append((where, messages))
    return picked[:count]


def print_mutants(mutants, out=sys.stdout):
    out.write("\nmutants: each removes one sync call\n")
    for m in mutants:
        out.write("  %-7s line %-5d %s\n          %s\n" % ("caught" if m.caught else "MISSED", m.line,
                                                        m.label, m.where))
    out.write("caught %d of %d\n" % (sum(m.caught for m in mutants), len(mutants)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", default=DEFAULT_MODULE, help="the marshal_persist.py to explore")
    parser.add_argument("--workload", action="append", choices=sorted(BY_NAME),
                        help="only this workload (repeatable)")
    parser.add_argument("--mutants", action="store_true", help="also run the fsync mutation check")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 2),
                        help="check processes at once")
    parser.add_argument("--cap", type=int, default=STATES_PER_POINT,
                        help="combinations per crash point before sampling")
    parser.add_argument("--examples", type=int, default=4, help="violations shown per workload")
    parser.add_argument("--record", metavar="NAME", choices=sorted(BY_NAME),
                        help="record one workload here and print its trace as JSON lines")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    module_path = os.path.abspath(args.module)
    if args.serve:
        serve(module_path, args.scratch)
        return 0
    if args.record:
        root = os.path.join(tempfile.mkdtemp(prefix="power-loss-", dir=scratch_base()), "root")
        try:
            rec = record(load_module(module_path), BY_NAME[args.record], root, "run")
        finally:
            shutil.rmtree(os.path.dirname(root), ignore_errors=True)
        for op in rec["ops"]:
            if "data" in op:  # readable rather than base64
                op["data"] = base64.b64decode(op["data"]).decode("utf-8", "backslashreplace")
            print(json.dumps(op))
        return 0
    started = time.monotonic()
    workloads = [BY_NAME[name] for name in args.workload] if args.workload else WORKLOADS
    reports = explore_all(module_path, workloads, args.jobs, args.cap)
    print_report(reports, time.monotonic() - started, args.module, args.examples)
    failed = any(r.violations or r.error for r in reports)
    if args.mutants:
        mutants = mutation_check(module_path, args.jobs, args.cap, baseline=reports)
        print_mutants(mutants)
        sys.stdout.write("%.1f s in all\n" % (time.monotonic() - started))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
