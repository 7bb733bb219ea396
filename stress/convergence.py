"""Every process's store converges to the log: writers, two compactors and a follower.

    python stress/convergence.py                          # 3 seeds x disk,tmpfs x 3 s
    python stress/convergence.py --seeds 5 --seconds 5
    python stress/convergence.py --seed 7 --fs tmpfs --keep --trace   # one round, kept

Each round puts these processes on one shared, initially empty log:

* ``--writers`` writer processes (default 3), each with one or two threads.  Each
  opens its own ``DiskPersister``, replays into its own ``MemoryStore`` and starts a
  watcher into it, then persists random SETs, DELs and batches of both over a small key
  space (``--keys``, default 50, of two itemTypes) for ``--seconds`` (or ``--count``
  events a thread).  Like any application with a watcher, a writer never applies its
  own events: the watcher hands them to the store.  One thread of the first writer
  also compacts every 0.5-1 s.
* a compactor process: ``DiskPersister(path).compact()`` every 0.5-1 s, and once more
  after the writers stopped, so that the final state too went through a compaction;
* a read-only follower: ``DiskPersister(path, read_only=True)``, replay and a watcher.

Once the writers and the compactor have stopped, every process with a store waits
(bounded) until its store is stable and equal to a fresh replay of the log made in that
process, then reports the keys where the two differ, with examples.  The parent checks
that every fresh replay is the same as its own; that the log is clean (``python -m
marshal_persist check`` exits 0, no ``.torn`` file, no temp file left); and that the
last word on every key is the last event some writer thread acknowledged on that key.
A thread's events reach the file in the order it persisted them, so anything else
(a value nobody wrote, or one a later acknowledged event of the same thread should have
replaced) means an acknowledged event was lost.

Each round prints ``seed S fs F: writers W, events E, compactions C, differing keys D``;
the end ``rounds: R, differing keys: D``; the exit status is 1 if D > 0 or a round
failed.  Every wait is bounded and every child has a hard timeout (the parent kills
it, and the child's own alarm fires too), so the script always ends.  ``run()`` is the
same thing for a test: it returns the differing keys and raises ``ConvergenceFailure``
if a round failed.  Standard library only.
"""

import argparse
import hashlib
import json
import os
import queue
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import marshal_persist as mp  # noqa: E402

TYPES = ("Alpha", "Beta")
LOG_NAME = "events.jsonl"
STARTUP_LIMIT = 20.0  # seconds for every child to open, replay and start its watcher
STOP_SLACK = 15.0  # past --seconds, for the last write or compaction of a round to return
SETTLE_LIMIT = 8.0  # a store that has not converged by then is reported as it is
STABLE_UNEQUAL = 2.0  # a store unchanged this long will not change any more: stop waiting
EXIT_LIMIT = 10.0  # for the children to exit once they reported


class ConvergenceFailure(Exception):
    """A round failed for another reason than differing keys (a child hung or crashed,
    the log is not clean, an acknowledged event is lost)."""


# --- what the writers write ----------------------------------------------------------------


def key_space(count):
    """``count`` keys, alternating between the two itemTypes."""
    return [(TYPES[i % 2], "k%03d" % i) for i in range(count)]


def key_name(key):
    return "%s:%s" % key


def stamp(key, tag, seq):
    """What a SET carries besides its writer and sequence: tied to its key, so a value
    moved to another key, or mixed from two events, is not taken for one somebody wrote."""
    return "%s/%s/%d" % (key_name(key), tag, seq)


def make_event(rng, key, tag, seq):
    """A SET (70%) or a DEL of ``key``; both name the thread ``tag`` and its ``seq``."""
    item = {"id": key[1], "by": tag, "seq": seq}
    if rng.random() < 0.3:
        return {"item": item, "changeType": "DEL", "itemType": key[0]}
    item["check"] = stamp(key, tag, seq)
    return {"item": item, "changeType": "SET", "itemType": key[0]}


# --- the child processes ---------------------------------------------------------------------

_SAY = threading.Lock()


def say(**message):
    """One JSON line to the parent."""
    with _SAY:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


class Commands:
    """Words from the parent on stdin, one a line.  Read raw, so that ``select`` sees
    every byte: a buffered reader could hold a word that ``select`` no longer reports."""

    def __init__(self):
        self.buffer = b""

    def next(self, timeout=None):
        """The next word; None on timeout; "" at EOF (the parent is gone)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([0], [], [], left)[0]:
                return None
            chunk = os.read(0, 4096)
            if not chunk:
                return ""
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode().strip()

    def expect(self, word):
        got = self.next()
        if got != word:
            raise SystemExit("expected %r from the parent, got %r" % (word, got))


class Notes:
    """The persister's logger: keeps its warnings, and counts the reloads after which the
    store keeps entities the log no longer mentions (each one a possible divergence)."""

    KEPT = re.compile(r"(\d+) entities it no longer mentions stay")

    def __init__(self, name, echo):
        self.name = name
        self.echo = echo
        self.warnings = []
        self.reloads_keeping = 0

    def warning(self, message):
        self.warnings.append(message)
        self._echo("warning", message)

    def info(self, message):
        kept = self.KEPT.search(message)
        if kept and int(kept.group(1)):
            self.reloads_keeping += 1
        self._echo("info", message)

    def _echo(self, level, message):
        if self.echo:
            sys.stderr.write("%.6f %s %s %s\n" % (time.time(), self.name, level, message))
            sys.stderr.flush()


def how_marked(event):
    options = event.get("options") or {}
    if options.get("own"):
        return "own"
    return "restored" if options.get("preventRelationshipUpdates") else "tailed"


class TracedStore(mp.MemoryStore):
    """A MemoryStore that, with a trace file, records every batch it is given (kind,
    key, writer, sequence, how the persister marked it), so a divergence can be followed."""

    def __init__(self, trace_path=None):
        super().__init__()
        self._trace = open(trace_path, "a") if trace_path else None  # noqa: SIM115 - open for the process

    def apply_batch(self, events):
        if self._trace is not None:
            summary = [[e["changeType"], key_name((e["itemType"], e["item"]["id"])),
                        e["item"].get("by"), e["item"].get("seq"), how_marked(e)] for e in events]
            self._trace.write(json.dumps({"t": round(time.time(), 6), "events": summary}) + "\n")
            self._trace.flush()
        return super().apply_batch(events)


def snapshot(store):
    """``{"Type:id": item}`` of a store, through its public API."""
    return {key_name((kind, item["id"])): item for kind in TYPES for item in store.items(kind)}


def fresh_replay(path):
    """The state a restart would see now: a new read-only persister, a new store."""
    store = mp.MemoryStore()
    with mp.DiskPersister(path, read_only=True) as log:
        log.replay(store.apply_batch)
    return snapshot(store)


def digest(state):
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


def differences(mine, log_state, limit=3):
    """The keys where the store and the log differ, and a few examples."""
    keys = sorted(k for k in set(mine) | set(log_state) if mine.get(k) != log_state.get(k))
    examples = [{"key": k, "store": mine.get(k), "log": log_state.get(k)} for k in keys[:limit]]
    return keys, examples


def settle(store, path, interval):
    """Wait for the watcher to catch up with a log nobody changes any more: until the
    store equals a fresh replay and has stayed so for a few polls, or has stayed unequal
    long enough that it never will; bounded by SETTLE_LIMIT."""
    start = time.monotonic()
    previous, since = None, start
    while True:
        mine, log_state = snapshot(store), fresh_replay(path)
        now = time.monotonic()
        if mine != previous:
            previous, since = mine, now
        stable = now - since
        if (mine == log_state and stable >= 3 * interval) or stable >= STABLE_UNEQUAL \
                or now - start >= SETTLE_LIMIT:
            break
        time.sleep(interval / 2)
    keys, examples = differences(mine, log_state)
    return {"differing": len(keys), "examples": examples, "digest": digest(log_state),
            "size": len(mine), "waited": round(now - start, 3)}


def watcher_figures(watcher, notes):
    return {"applied": watcher.applied, "reloads": watcher.reloads, "errors": watcher.errors,
            "malformed": watcher.malformed, "reloads_keeping": notes.reloads_keeping,
            "warnings": notes.warnings[:5]}


class Worker(threading.Thread):
    """One writer thread: random SETs, DELs and batches until ``stop_at`` or ``count``
    events.  ``last`` is its last acknowledged word on each key, ``[kind, seq, called,
    returned]``: when its persist was called and when it returned, on the monotonic clock,
    which all processes share (CLOCK_MONOTONIC)."""

    def __init__(self, log, tag, rng, keys, stop_at, count, compacts):
        super().__init__(name=tag, daemon=True)
        self.log, self.tag, self.rng, self.keys = log, tag, rng, keys
        self.stop_at, self.count, self.compacts = stop_at, count, compacts
        self.acked = 0  # events acknowledged; their seqs are 0 .. acked - 1
        self.last = {}
        self.compactions = 0
        self.error = None

    def run(self):
        try:
            self._loop()
        except Exception as exc:  # reported: a persist or compaction that raises fails the round
            self.error = "%s: %s: %s" % (self.tag, type(exc).__name__, exc)

    def _loop(self):
        rng = self.rng
        next_compaction = time.monotonic() + rng.uniform(0.5, 1.0)
        while time.monotonic() < self.stop_at and (self.count is None or self.acked < self.count):
            size = rng.randint(2, 6) if rng.random() < 0.3 else 1
            events = [make_event(rng, rng.choice(self.keys), self.tag, self.acked + i) for i in range(size)]
            called = time.monotonic()
            if size == 1:
                self.log.persist(events[0])
            else:
                self.log.persist_batch(events)
            returned = time.monotonic()
            for event in events:  # acknowledged: from now on the log owes them
                self.last[key_name((event["itemType"], event["item"]["id"]))] = \
                    [event["changeType"], event["item"]["seq"], called, returned]
            self.acked += size
            if self.compacts and time.monotonic() >= next_compaction:
                self.log.compact()
                self.compactions += 1
                next_compaction = time.monotonic() + rng.uniform(0.5, 1.0)
            if rng.random() < 0.05:  # now and then a pause, so the interleavings vary
                time.sleep(rng.uniform(0, 0.003))


def open_with_store(cfg, read_only):
    """Open the log, replay it into a new store and start a watcher into that store."""
    notes = Notes(cfg["name"], cfg["trace"] is not None)
    store = TracedStore(cfg["trace"])
    log = mp.DiskPersister(cfg["path"], logger=notes, read_only=read_only)
    log.replay(store.apply_batch)
    watcher = log.start_watcher(store.apply_batch, interval=cfg["interval"])
    return log, store, watcher, notes


def writer_child(cfg, commands):
    log, store, watcher, notes = open_with_store(cfg, read_only=False)
    say(ready=len(store))
    commands.expect("go")
    keys = key_space(cfg["keys"])
    stop_at = time.monotonic() + cfg["seconds"]
    workers = [Worker(log, "w%dt%d" % (cfg["index"], t), random.Random("%s/%d" % (cfg["seed"], t)), keys,
                      stop_at, cfg["count"], cfg["compacts"] and t == 0) for t in range(cfg["threads"])]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()  # a hung persist is ended by the alarm and the parent's timeout
    say(done={"events": sum(w.acked for w in workers), "compactions": sum(w.compactions for w in workers),
              "threads": {w.tag: {"acked": w.acked, "last": w.last} for w in workers},
              "errors": [w.error for w in workers if w.error]})
    commands.expect("settle")
    result = settle(store, cfg["path"], cfg["interval"])
    result["watcher"] = watcher_figures(watcher, notes)
    say(result=result)
    log.close()


def follower_child(cfg, commands):
    log, store, watcher, notes = open_with_store(cfg, read_only=True)
    say(ready=len(store))
    commands.expect("go")
    commands.expect("settle")
    result = settle(store, cfg["path"], cfg["interval"])
    result["watcher"] = watcher_figures(watcher, notes)
    say(result=result)
    log.close()


def compactor_child(cfg, commands):
    """Compact every 0.5-1 s with a persister of its own each time, until told to stop;
    then once more, so that the final state too has been through a compaction (a line it
    dropped would otherwise be hidden by the writes after it)."""
    rng = random.Random(cfg["seed"])
    notes = Notes(cfg["name"], cfg["trace"] is not None)
    say(ready=0)
    commands.expect("go")
    count = 0
    while True:
        word = commands.next(timeout=rng.uniform(0.5, 1.0))
        if word == "":  # the parent is gone
            return
        with mp.DiskPersister(cfg["path"], logger=notes) as log:
            log.compact()
        count += 1
        if word == "stop":
            break
    say(done={"compactions": count, "warnings": notes.warnings[:5]})


def child_main(cfg):
    # The parent kills a child that overstays; the alarm ends it even if the parent is gone.
    signal.alarm(int(cfg["hard_limit"]) + 1)
    role = {"writer": writer_child, "follower": follower_child, "compactor": compactor_child}[cfg["role"]]
    try:
        role(cfg, Commands())
    except Exception as exc:
        say(error="%s: %s: %s" % (cfg["name"], type(exc).__name__, exc))
        raise
    return 0


# --- the parent: one round -------------------------------------------------------------------


class Child:
    """A child process, its stdin for words and a thread that forwards its stdout lines
    (parsed) to the round's inbox, then an ``eof`` message."""

    def __init__(self, name, cfg, folder, inbox):
        self.name = name
        self.err_path = os.path.join(folder, name + ".err")
        with open(self.err_path, "w") as err:
            command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)]
            self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         text=True, bufsize=1, cwd=ROOT)
        self.reader = threading.Thread(target=self._forward, args=(inbox,), daemon=True)
        self.reader.start()

    def _forward(self, inbox):
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                message = {"noise": line.rstrip()}
            inbox.put((self, message))
        inbox.put((self, {"eof": True}))

    def send(self, word):
        try:
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it is gone: the wait for its answer reports that

    def stderr_tail(self, lines=5):
        try:
            with open(self.err_path) as f:
                return " | ".join(f.read().strip().splitlines()[-lines:])
        except OSError:
            return ""

    def finish(self, deadline):
        """Wait for it to exit until ``deadline``, then kill it; True if it exited by itself."""
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            exited = True
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            exited = False
        self.reader.join(5.0)  # at its EOF now; closing the pipe under it would make it raise
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        return exited


def collect(inbox, children, kind, deadline):
    """``{child: message[kind]}`` from each of ``children`` before ``deadline``; raises
    ConvergenceFailure if one reports an error, exits first, or is late."""
    waiting, got = set(children), {}
    while waiting:
        try:
            child, message = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            names = ", ".join(sorted(c.name for c in waiting))
            raise ConvergenceFailure("timed out waiting for %s from %s" % (kind, names)) from None
        if "error" in message:
            raise ConvergenceFailure(message["error"])
        if child in waiting and "eof" in message:
            raise ConvergenceFailure("%s exited before it reported %s: %s"
                                     % (child.name, kind, child.stderr_tail()))
        if child in waiting and kind in message:
            got[child] = message[kind]
            waiting.discard(child)
    return got


def child_configs(seed, path, seconds, writers, keys, count, trace_dir, hard_limit):
    """What each child is told: its role, its own random stream, its watcher interval."""
    rng = random.Random(seed)
    base = {"path": path, "seconds": seconds, "keys": keys, "count": count, "hard_limit": hard_limit}

    def config(name, role, **more):
        cfg = dict(base, name=name, role=role, seed="%d/%s" % (seed, name),
                   interval=rng.choice((0.05, 0.1, 0.15)),
                   trace=os.path.join(trace_dir, name + ".trace") if trace_dir else None)
        cfg.update(more)
        return cfg

    configs = [config("writer%d" % i, "writer", index=i, threads=rng.randint(1, 2), compacts=i == 0)
               for i in range(writers)]
    return configs + [config("compactor", "compactor"), config("follower", "follower")]


def drive(children, inbox, seconds, deadline):
    """Start, stop and settle the children; returns (writers' done, compactor's done,
    results of the processes with a store)."""
    writers = [c for c in children if c.name.startswith("writer")]
    compactor = next(c for c in children if c.name == "compactor")
    stores = [c for c in children if c is not compactor]
    collect(inbox, children, "ready", min(deadline, time.monotonic() + STARTUP_LIMIT))
    for child in children:
        child.send("go")
    done = collect(inbox, writers, "done", min(deadline, time.monotonic() + seconds + STOP_SLACK))
    compactor.send("stop")
    compactor_done = collect(inbox, [compactor], "done", min(deadline, time.monotonic() + STOP_SLACK))
    # Nothing changes the log from here on: every store must now reach what a replay gives.
    for child in stores:
        child.send("settle")
    results = collect(inbox, stores, "result", min(deadline, time.monotonic() + SETTLE_LIMIT + STOP_SLACK))
    return done, compactor_done[compactor], results


def check_log(path):
    """What is wrong with the log's file and its folder: malformed lines (``check``),
    lines a compaction set aside, temp files left behind."""
    problems = []
    try:
        out = subprocess.run([sys.executable, "-m", "marshal_persist", "check", path], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
        if out.returncode != 0:
            tail = " | ".join(out.stdout.splitlines()[-5:])
            problems.append("check exited %d: %s" % (out.returncode, tail))
    except subprocess.TimeoutExpired:
        problems.append("check did not finish in 60 s")
    if os.path.exists(path + ".torn"):
        problems.append("%s.torn exists: a compaction set malformed lines aside" % LOG_NAME)
    left = [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")]
    if left:
        problems.append("temp files left: %s" % ", ".join(left))
    return problems


def lost_events(final, done, keys):
    """Keys whose last word is not what the writers' acknowledgements allow.

    A thread persists one event after the other, so the last line on a key is the last
    event some thread acknowledged on it; and not one of a thread whose last event on it
    was acknowledged before another thread's last event on it was even called (that one
    is later in the file).  Anything else (a value nobody wrote, an older value of a
    thread, a delete where only SETs can be last) means an acknowledged event was lost."""
    threads = {}
    for report in done.values():
        threads.update(report["threads"])
    lost = []
    for key in map(key_name, keys):
        lasts = {tag: t["last"][key] for tag, t in threads.items() if key in t["last"]}
        # The last words no other last word certainly follows: the possible last lines.
        latest = {tag: last for tag, last in lasts.items()
                  if not any(other[2] > last[3] for other in lasts.values())}
        item = final.get(key)
        if item is None:
            ok = not lasts or any(last[0] == "DEL" for last in latest.values())
            what = "deleted"
        else:
            tag, seq = item.get("by"), item.get("seq")
            ok = tag in latest and latest[tag][:2] == ["SET", seq] \
                and item.get("check") == stamp(tuple(key.split(":", 1)), tag, seq)
            what = json.dumps(item)
        if not ok:
            lost.append("%s is %s, but the possible last words are %s"
                        % (key, what, {tag: last[:2] for tag, last in latest.items()}))
    return lost


def round_verdict(path, done, results, keys):
    """The failures found once the round ran: the log, lost events, replays that disagree,
    persist or watcher errors."""
    failures = check_log(path)
    final = fresh_replay(path)
    lost = lost_events(final, done, keys)
    if lost:
        failures.append("%d keys lost an acknowledged event, e.g. %s" % (len(lost), "; ".join(lost[:3])))
    for child, result in results.items():
        if result["digest"] != digest(final):
            failures.append("%s: its fresh replay differs from the parent's" % child.name)
        figures = result["watcher"]
        if figures["errors"] or figures["malformed"]:
            failures.append("%s: watcher errors %d, malformed lines %d, warnings: %s"
                            % (child.name, figures["errors"], figures["malformed"], figures["warnings"]))
    for report in done.values():
        failures.extend(report["errors"])
    return failures


def run_round(seed, fs, folder, seconds, writers, keys, count, trace):
    """One round in ``folder``; returns (events, compactions, differing keys, examples,
    failures, notes)."""
    path = os.path.join(folder, "log", LOG_NAME)
    os.mkdir(os.path.dirname(path))
    mp.DiskPersister(path).close()  # the follower opens it read-only: it must exist
    trace_dir = folder if trace else None
    hard_limit = seconds + STARTUP_LIMIT + 2 * STOP_SLACK + SETTLE_LIMIT + EXIT_LIMIT
    deadline = time.monotonic() + hard_limit
    inbox = queue.Queue()
    children = [Child(cfg["name"], cfg, folder, inbox)
                for cfg in child_configs(seed, path, seconds, writers, keys, count, trace_dir, hard_limit)]
    failures, done, compactor_done, results = [], {}, {}, {}
    exit_by = time.monotonic()  # after a failure the others wait for words that never come: kill them now
    try:
        done, compactor_done, results = drive(children, inbox, seconds, deadline)
        exit_by = min(deadline, time.monotonic() + EXIT_LIMIT)
    except ConvergenceFailure as exc:
        failures.append(str(exc))
    finally:
        hung = [c.name for c in children if not c.finish(exit_by)]
    if hung and not failures:
        failures.append("did not exit after reporting, killed: %s" % ", ".join(hung))
    if not failures:
        failures = round_verdict(path, done, results, key_space(keys))
    events = sum(r["events"] for r in done.values())
    compactions = sum(r["compactions"] for r in done.values()) + compactor_done.get("compactions", 0)
    differing = sum(r["differing"] for r in results.values())
    examples = ["%s %s: store %s, log %s" % (c.name, e["key"], json.dumps(e["store"]), json.dumps(e["log"]))
                for c, r in sorted(results.items(), key=lambda cr: cr[0].name) for e in r["examples"]]
    notes = ["%s: %d reloads, after %d of them the store kept entities the log no longer mentions; "
             "waited %.2f s"
             % (c.name, r["watcher"]["reloads"], r["watcher"]["reloads_keeping"], r["waited"])
             for c, r in sorted(results.items(), key=lambda cr: cr[0].name) if r["differing"]]
    return events, compactions, differing, examples, failures, notes


# --- the parent: where, and all rounds -------------------------------------------------------


def fs_type(folder):
    """The type of the filesystem ``folder`` is on, from /proc/mounts (None elsewhere)."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[1:3] for line in f]
    except OSError:
        return None
    folder = os.path.realpath(folder)
    best, kind = "", None
    for point, fstype in mounts:
        point = point.replace("\\040", " ")
        inside = folder == point or folder.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def base_folder(fs):
    """Where rounds on ``fs`` make their temp dirs: for "disk", next to the repo (or in
    it, or the temp dir), whichever is writable and not a tmpfs, since /tmp often is one;
    for "tmpfs", /dev/shm.  None if there is no such place."""
    candidates = ["/dev/shm"] if fs == "tmpfs" else [os.path.dirname(ROOT), ROOT, tempfile.gettempdir()]
    for folder in candidates:
        if os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK) \
                and (fs_type(folder) == "tmpfs") == (fs == "tmpfs"):
            return folder
    return None


def report_round(seed, fs, writers, outcome, folder, keep):
    """Print the round's line and its details; returns (differing keys, failures)."""
    events, compactions, differing, examples, failures, notes = outcome
    print("seed %s fs %s: writers %d, events %d, compactions %d, differing keys %d"
          % (seed, fs, writers, events, compactions, differing), flush=True)
    for line in examples:
        print("    differing: " + line)
    for line in notes:
        print("    " + line)
    for failure in failures:
        print("    FAILED: " + failure)
    if keep and (failures or differing):
        print("    kept in " + folder)
    sys.stdout.flush()
    return differing, ["seed %s fs %s: %s" % (seed, fs, f) for f in failures]


def run(seeds=3, fs_list=("disk", "tmpfs"), seconds=3.0, writers=3, keys=50, count=None,
        keep=False, trace=False):
    """Run ``seeds`` rounds (a count, or the seeds themselves) on each filesystem of
    ``fs_list`` ("disk", "tmpfs"); print a line a round and a total; return the total of
    differing keys.  Raises ConvergenceFailure, after all rounds, if any failed."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    fs_list = fs_list.split(",") if isinstance(fs_list, str) else list(fs_list)
    total, failures, rounds, failed_rounds = 0, [], 0, 0
    for seed in seed_list:
        for fs in fs_list:
            base = base_folder(fs)
            if base is None:
                print("seed %s fs %s: skipped, no writable %s here" % (seed, fs, fs), flush=True)
                continue
            folder = tempfile.mkdtemp(prefix="marshal-convergence-", dir=base)
            outcome = run_round(seed, fs, folder, seconds, writers, keys, count, trace)
            differing, failed = report_round(seed, fs, writers, outcome, folder, keep)
            total, rounds = total + differing, rounds + 1
            failures += failed
            failed_rounds += bool(failed)
            if not (keep and (failed or differing)):
                shutil.rmtree(folder, ignore_errors=True)
    print("rounds: %d, differing keys: %d%s" % (rounds, total, ", failed rounds: %d" % failed_rounds
                                                 if failed_rounds else ""), flush=True)
    if failures:
        raise ConvergenceFailure("; ".join(failures))
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3,
                        help="rounds per filesystem, seeds 0..N-1 (default 3)")
    parser.add_argument("--seed", type=int, action="append", help="run this seed (repeatable) instead")
    parser.add_argument("--fs", default="disk,tmpfs", help="filesystems: disk, tmpfs (default both)")
    parser.add_argument("--seconds", type=float, default=3.0, help="writing time per round (default 3)")
    parser.add_argument("--writers", type=int, default=3, help="writer processes (default 3)")
    parser.add_argument("--keys", type=int, default=50, help="size of the key space (default 50)")
    parser.add_argument("--count", type=int, default=None, help="stop each thread after this many events")
    parser.add_argument("--keep", action="store_true", help="keep the folder of a round that found something")
    parser.add_argument("--trace", action="store_true",
                        help="each child records what its store was given, and the persister's notes")
    args = parser.parse_args(argv)
    try:
        total = run(args.seed or args.seeds, args.fs, args.seconds, args.writers, args.keys, args.count,
                    args.keep, args.trace)
    except ConvergenceFailure:
        return 1
    return 1 if total else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child_main(json.loads(sys.argv[2])))
    sys.exit(main())
