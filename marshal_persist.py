"""A durable, append-only JSONL event log: the marshal daemon's persister in Python.

Format
    One event per line, compact JSON (no spaces, UTF-8, non-ASCII kept) and a
    single ``\\n``, byte-compatible both ways with the Rust marshal-daemon::

        {"item":{"id":"s-1"},"changeType":"SET","itemType":"Session",...}

    ``item`` is an object whose ``id`` (a non-empty string) is the identity,
    ``changeType`` is exactly ``"SET"`` or ``"DEL"``, ``itemType`` a string;
    ``createdAt``, ``tx``, ``sourceId`` and ``options`` are optional.
    The identity of an entity is ``(itemType, item.id)``; the last line wins.

Guarantees
    * ``persist`` returns only after the line is on disk (fdatasync), so a
      ``kill -9`` or a crash never loses an acknowledged event.  Power loss is
      covered where fdatasync reaches the platter (Linux; macOS needs
      ``F_FULLFSYNC``, which this module does not issue).  Concurrent calls
      share one write and one fsync (group commit).
    * A failed write or sync raises ``PersistError`` and leaves no partial
      record behind; a torn last line left by a crash is moved to
      ``<log>.torn`` at the next open, never glued to the next event.
    * Replay skips and counts bad lines; no file content can make it raise.
    * Appends always land in the file the path names now: a log that was
      replaced is reopened, a deleted one is recreated from the live state,
      and a log truncated or replaced under a running watcher is given back
      the live entities it lost.
    * ``compact`` rewrites the log to its live state atomically, while other
      processes go on writing.

Data flows top to bottom: errors and health, paths and migration, encoding
and validation, the write path, the read path (replay, tail), the watcher,
``MemoryStore``, and the command line.
"""

from __future__ import annotations

import json
import os
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover - never runs; for type checkers only
    from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar

    Event = Dict[str, Any]
    ApplyBatch = Callable[[List[Event]], Optional[int]]
    Key = Tuple[str, str]
    T = TypeVar("T")

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "default_state_dir",
    "default_log_path",
    "migrate_from_claude_coord",
    "PersistError",
    "PersistHealth",
    "DiskPersister",
    "Watcher",
    "MemoryStore",
    "main",
]

LOG_NAME = "events.jsonl"
_CHUNK = 1 << 20
_DEFAULT_MAX_LINE = 16 << 20
_LATE_WRITER_SECONDS = 5.0  # how long a replaced log is watched for writers that do not lock
_datasync = getattr(os, "fdatasync", os.fsync)
_HAS_LOCKF = hasattr(os, "lockf")
_APPEND = os.O_RDWR | os.O_APPEND  # descriptors are not inherited by children (PEP 446)


# --- errors and health ------------------------------------------------------


class PersistError(Exception):
    """An event could not be made durable (bad event, or a failed write or sync)."""

    def __init__(self, entity_type: str, message: str) -> None:
        super().__init__(entity_type, message)
        self.entity_type = entity_type
        self.message = message

    def __str__(self) -> str:
        return "persist failed for %s: %s" % (self.entity_type, self.message)


class PersistHealth:
    """Thread-safe counters of the write path, as myko's ``PersistHealth``.

    ``queued`` counts events between ``record_enqueue`` and their outcome;
    every outcome (success, error, or a dropped invalid event) takes one off.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.queued = 0
        self.total_persisted = 0
        self.total_errors = 0
        self.total_dropped = 0
        self.consecutive_errors = 0
        self.last_error = None  # type: Optional[str]

    @property
    def healthy(self) -> bool:
        """True while the last write did not fail."""
        return self.consecutive_errors == 0

    def record_enqueue(self) -> None:
        """An event entered ``persist``."""
        with self._lock:
            self.queued += 1

    def record_success(self) -> None:
        """An event is durable."""
        with self._lock:
            self.queued -= 1
            self.total_persisted += 1
            self.consecutive_errors = 0

    def record_error(self, message: str) -> None:
        """A write or sync failed: the disk (or the file) is unhealthy."""
        with self._lock:
            self.queued -= 1
            self.total_errors += 1
            self.consecutive_errors += 1
            self.last_error = message

    def record_dropped(self, message: str) -> None:
        """An invalid event was refused; it says nothing about the disk."""
        with self._lock:
            self.queued -= 1
            self.total_dropped += 1
            self.last_error = message

    def as_dict(self) -> Dict[str, Any]:
        """A consistent snapshot of every counter, plus ``healthy``."""
        with self._lock:
            return {
                "queued": self.queued,
                "total_persisted": self.total_persisted,
                "total_errors": self.total_errors,
                "total_dropped": self.total_dropped,
                "consecutive_errors": self.consecutive_errors,
                "last_error": self.last_error,
                "healthy": self.consecutive_errors == 0,
            }


# --- paths and migration ----------------------------------------------------


def default_state_dir() -> str:
    """``$MARSHAL_STATE_DIR``, else ``$HOME/.local/state/marshal``, else ``.marshal``."""
    override = os.environ.get("MARSHAL_STATE_DIR")
    if override:
        return override
    home = os.environ.get("HOME")
    if home:
        return os.path.join(home, ".local", "state", "marshal")
    return ".marshal"


def default_log_path() -> str:
    """The log the marshal daemon uses: ``default_state_dir()/events.jsonl``."""
    return os.path.join(default_state_dir(), LOG_NAME)


def _legacy_log_path() -> Optional[str]:
    override = os.environ.get("CLAUDE_COORD_STATE_DIR")
    if override:
        return os.path.join(override, LOG_NAME)
    home = os.environ.get("HOME")
    if home:
        return os.path.join(home, ".local", "state", "claude-coord", LOG_NAME)
    return None


def migrate_from_claude_coord(new_log_path: str, logger: Any = None) -> bool:
    """Move the claude-coord era log to ``new_log_path``; True when it moved.

    The legacy log is ``$CLAUDE_COORD_STATE_DIR/events.jsonl``, else
    ``~/.local/state/claude-coord/events.jsonl``.  It moves only when the new
    path does not exist; when both exist, both are left alone with a warning
    (the new one is preferred).  A second call is a no-op.  Across
    filesystems the file is copied durably, then the old one removed.
    """
    old = _legacy_log_path()
    if old is None or not os.path.exists(old):
        return False
    if os.path.exists(new_log_path):
        if not os.path.samefile(old, new_log_path):
            _say(logger, "warning", "[migrate] both legacy (%s) and current (%s) event logs "
                 "exist; leaving both in place (current is preferred)" % (old, new_log_path))
        return False
    _make_dirs(os.path.dirname(new_log_path))
    _say(logger, "info", "[migrate] moving event log: %s -> %s" % (old, new_log_path))
    try:
        os.link(old, new_log_path)  # unlike rename, never clobbers a log created meanwhile
        _fsync_dir(os.path.dirname(new_log_path))
    except FileExistsError:
        return False
    except OSError:  # another filesystem (EXDEV), or one without hard links
        src = os.open(old, os.O_RDONLY)
        try:
            os.close(_write_durably(new_log_path, _read_chunks(src, 0), clobber=False))
        finally:
            os.close(src)
    os.unlink(old)
    _fsync_dir(os.path.dirname(old))
    return True


def _say(logger: Any, level: str, message: str) -> None:
    if logger is not None:
        getattr(logger, level)(message)


def _make_dirs(path: str) -> None:
    """Create missing directories as 0o700, whatever the umask."""
    if not path or os.path.isdir(path):
        return
    _make_dirs(os.path.dirname(os.path.abspath(path)))
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    os.chmod(path, 0o700)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_dir(path: str) -> None:
    """Make a create, rename or unlink in ``path`` durable."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: str, chunks: Iterable[bytes], clobber: bool) -> int:
    """Write ``chunks`` to a new file at ``path`` atomically and durably.

    The recipe: a temp file beside ``path`` (0o600), written and fsynced, then
    moved into place (``os.replace`` when ``clobber``, else ``os.link``, which
    raises ``FileExistsError`` rather than overwrite), then the directory
    fsynced.  A crash leaves either the old state or the new, never a mix.
    Returns a read/append descriptor of the new file.
    """
    tmp = "%s.%d.%d.tmp" % (path, os.getpid(), threading.get_ident())
    fd = os.open(tmp, _APPEND | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        pending = []  # type: List[bytes]
        size = 0
        for chunk in chunks:
            pending.append(chunk)
            size += len(chunk)
            if size >= _CHUNK:
                _write_all(fd, b"".join(pending))
                pending, size = [], 0
        _write_all(fd, b"".join(pending))
        os.fsync(fd)
        if clobber:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(path))
    return fd


# --- encoding and validation ------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError("%s is not JSON (the Rust reader rejects it)" % name)


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range (the Rust reader rejects it)")
    return value


_MAX_DEPTH = 127  # serde_json's recursion limit: the Rust reader rejects deeper JSON
_TOO_DEEP = "nesting too deep: more than %d levels (the Rust reader's limit)" % _MAX_DEPTH


def _too_deep(line: bytes, value: Any) -> bool:
    """Whether ``value`` (parsed from or encoded as ``line``) nests deeper than
    the Rust reader allows; counting brackets first keeps the common case cheap."""
    if line.count(b"{") + line.count(b"[") <= _MAX_DEPTH:
        return False
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > _MAX_DEPTH:
            return True
        children = node.values() if type(node) is dict else node if type(node) is list else ()
        stack.extend((child, depth + 1) for child in children if type(child) in (dict, list))
    return False


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_OPTION_FLAGS = ("preventRelationshipUpdates", "preventPersist")


def _event_problem(event: Any) -> Optional[str]:
    """Why ``event`` is not an event the Rust daemon would accept, or None."""
    if type(event) is not dict:
        return "not a JSON object"
    if type(event.get("itemType")) is not str:
        return "itemType is missing or not a string"
    if event.get("changeType") not in ("SET", "DEL"):
        return "changeType is not exactly SET or DEL"
    item = event.get("item")
    if type(item) is not dict:
        return "item is missing or not an object"
    item_id = item.get("id")
    if type(item_id) is not str or not item_id:
        return "item.id is missing, empty or not a string"
    for key in ("createdAt", "tx"):
        if key in event and type(event[key]) is not str:
            return "%s is not a string" % key
    if event.get("sourceId") is not None and type(event["sourceId"]) is not str:
        return "sourceId is not a string or null"
    options = event.get("options")
    if options is not None:
        if type(options) is not dict:
            return "options is not an object"
        for flag in _OPTION_FLAGS:
            if flag in options and type(options[flag]) is not bool:
                return "options.%s is not a boolean" % flag
        if options.get("fromPeer") is not None and type(options["fromPeer"]) is not bool:
            return "options.fromPeer is not a boolean or null"
    return None


def _encode_event(event: Any) -> bytes:
    """The event's log line, ``\\n`` included; raises PersistError if it is invalid."""
    problem = _event_problem(event)
    if problem is None:
        try:
            line = (_ENCODER.encode(event) + "\n").encode("utf-8")
        except (TypeError, ValueError, RecursionError) as exc:
            problem = "not serializable as JSON: %s" % exc
        else:
            if not _too_deep(line, event):
                return line
            problem = _TOO_DEEP
    entity_type = event.get("itemType") if isinstance(event, dict) else None
    raise PersistError(entity_type if isinstance(entity_type, str) else "<unknown>", problem)


def _parse_line(line: bytes) -> Tuple[Optional[Event], str]:
    """``(event, "")`` for a valid log line, else ``(None, reason)``."""
    try:
        event = _DECODER.decode(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "invalid UTF-8"
    except RecursionError:
        return None, "nesting too deep"
    except ValueError as exc:  # JSONDecodeError, NaN, 1e400, over-long integers
        return None, "not JSON: %s" % exc
    problem = _event_problem(event)
    if problem is not None:
        return None, problem
    if _too_deep(line, event):
        return None, _TOO_DEEP
    return event, ""


def _mark(event: Event, restored: bool) -> Event:
    """Flag an event read from disk so the store neither persists it again nor,
    when restored from a snapshot, re-runs its relationship cascades."""
    options = event.get("options") or {}
    options["preventPersist"] = True
    if restored:
        options["preventRelationshipUpdates"] = True
    options.setdefault("preventRelationshipUpdates", False)
    options.setdefault("fromPeer", None)
    event["options"] = options
    return event


def _key(event: Event) -> Key:
    return event["itemType"], event["item"]["id"]


def _remember(live: Dict[Key, bytes], key: Key, is_set: bool, line: bytes) -> None:
    """The dedup rule: the last word on a key wins and moves the key to the end
    (file order of last occurrence); a DEL forgets it, so memory follows live
    entities."""
    live.pop(key, None)
    if is_set:
        live[key] = line


# --- the write path ---------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a short write is no error)."""
    view = data  # type: Any
    while True:
        written = os.write(fd, view)
        if written == len(view):
            return
        if written <= 0:
            raise OSError("write made no progress")
        view = memoryview(view)[written:]


def _cut_back(fd: int, start: int, data: bytes) -> None:
    """After a failed append of ``data`` at ``start``: remove what of it reached
    the file, but only while nothing else was appended after it."""
    try:
        size = os.fstat(fd).st_size
        if start < size <= start + len(data) and os.pread(fd, size - start, start) == data[: size - start]:
            os.ftruncate(fd, start)
            os.fsync(fd)
    except OSError:
        pass  # the next open's torn-tail repair and never-glue rule still cover it


def _identity(st: os.stat_result) -> Tuple[int, int]:
    return st.st_dev, st.st_ino


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ignore(*args: object) -> None:
    pass


def _stat_or_none(path: str) -> Optional[os.stat_result]:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


class _Queued:
    """One ``persist`` call's events and their lines, waiting in the
    group-commit queue; ``next`` is the writer to wake after this one."""

    __slots__ = ("events", "lines", "data", "wake", "done", "error", "next")

    def __init__(self, events: List[Event], lines: List[bytes]) -> None:
        self.events = events
        self.lines = lines
        self.data = b"".join(lines)
        self.wake = threading.Lock()
        self.wake.acquire()
        self.done = False
        self.error = None  # type: Optional[BaseException]
        self.next = None  # type: Optional[_Queued]


def _wake(queued: Optional[_Queued]) -> None:
    if queued is not None:
        queued.wake.release()


class DiskPersister:
    """The event log at ``path``: ``persist`` appends, ``replay`` restores,
    ``start_watcher`` follows what other programs do to the file, ``compact``
    rewrites it to its live state.

    Opening creates missing directories (0o700) and the file (0o600),
    repairs a torn last line and removes temp files a killed compaction left.
    With ``read_only=True`` nothing is created, repaired, locked or written:
    the file must exist and ``persist`` raises.  Lines longer than
    ``max_line_bytes`` are skipped without being read whole.  With
    ``compact_ratio`` set, ``replay`` first compacts a log over 1 MiB that is
    at least that many times larger than its live state.  One
    ``DiskPersister`` per file per process: POSIX locks do not serialize two
    descriptors of one process.
    """

    def __init__(self, path: str, *, logger: Any = None, read_only: bool = False,
                 max_line_bytes: int = _DEFAULT_MAX_LINE, compact_ratio: Optional[float] = None) -> None:
        self.path = path
        self.health = PersistHealth()
        self.read_only = read_only
        self.max_line_bytes = max_line_bytes
        self.compact_ratio = compact_ratio
        self._logger = logger
        self._lock = threading.Lock()  # the file, its descriptors and the watcher's tail
        self._queue_lock = threading.Lock()  # the group-commit queue only
        self._queue = []  # type: List[_Queued]
        self._tail = None  # type: Optional[_Tail]
        self._watcher = None  # type: Optional[Watcher]
        self._replaced = []  # type: List[List[Any]]  # [fd, read up to, keep until]
        self._end = -1  # where this process's last write ended (skips the never-glue read)
        self._fd = os.open(path, os.O_RDONLY) if read_only else self._open_or_create()  # type: Optional[int]
        self._ident = _identity(os.fstat(self._fd))  # a descriptor's file never changes: fstat once
        if not read_only:
            try:
                self._locked(self._repair_torn_tail)
                self._remove_stale_temp_files()
            except BaseException:
                os.close(self._fd)
                raise

    def __enter__(self) -> DiskPersister:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the watcher, if any, and close the file. Idempotent."""
        watcher = self._watcher
        if watcher is not None:
            watcher.stop()
        with self._lock:
            if self._replaced and self._fd is not None:
                try:
                    self._locked(_ignore)  # a last look for late writes to a replaced log
                except OSError as exc:
                    self._warn("could not check the replaced log for late writes: %s" % exc)
            for fd in [self._fd, self._tail.fd if self._tail else None] + [r[0] for r in self._replaced]:
                if fd is not None:
                    os.close(fd)
            self._fd = None
            self._tail = None
            self._replaced = []

    def _warn(self, message: str) -> None:
        _say(self._logger, "warning", "[marshal-persist] %s: %s" % (self.path, message))

    def _info(self, message: str) -> None:
        _say(self._logger, "info", "[marshal-persist] %s: %s" % (self.path, message))

    def _checked_fd(self) -> int:
        if self._fd is None:
            raise ValueError("I/O on a closed DiskPersister")
        return self._fd

    def _open_or_create(self) -> int:
        _make_dirs(os.path.dirname(self.path))
        try:
            fd = os.open(self.path, _APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return os.open(self.path, _APPEND)
        os.fchmod(fd, 0o600)
        _fsync_dir(os.path.dirname(self.path))
        return fd

    def _remove_stale_temp_files(self) -> None:
        """Remove ``<log>.<pid>.<thread>.tmp`` files whose process is gone."""
        folder, name = os.path.split(self.path)
        for entry in os.listdir(folder or "."):
            parts = entry[len(name) + 1:].split(".")
            if entry.startswith(name + ".") and len(parts) == 3 and parts[2] == "tmp" \
                    and parts[0].isdigit() and not _process_exists(int(parts[0])):
                os.unlink(os.path.join(folder, entry))
                self._info("removed %s, left by a compaction that did not finish" % entry)

    # --- the write path -------------------------------------------------------

    def _lockf(self, fd: int, how: str) -> None:
        """Lock or unlock the whole file against cooperating processes.

        ``lockf`` counts from the current offset, which an O_APPEND write
        moves: unlocking seeks back to 0 first, so lock and unlock name one
        range, and every descriptor is at offset 0 whenever it is unlocked."""
        if _HAS_LOCKF:
            if how == "unlock":
                os.lseek(fd, 0, os.SEEK_SET)
            os.lockf(fd, os.F_LOCK if how == "lock" else os.F_ULOCK, 0)

    def _locked(self, action: Callable[[int, int], T]) -> T:
        """``action(fd, size)`` under the ``lockf`` lock of the file the path
        names now: reopened if it was replaced, recreated if it was deleted.
        Call with ``self._lock`` held (or before any other thread can run)."""
        while True:
            fd = self._checked_fd()
            self._lockf(fd, "lock")
            st = _stat_or_none(self.path)
            if st is not None and _identity(st) == self._ident:
                break
            self._lockf(fd, "unlock")
            new_fd = None
            if st is None:
                new_fd = self._write_live(_scan(fd, self.max_line_bytes, _ignore), clobber=False)
            if new_fd is None:
                try:
                    new_fd = os.open(self.path, _APPEND)
                except FileNotFoundError:
                    continue
                self._info("the log was replaced; appending to the new file")
            os.close(fd)
            self._switch_to(new_fd)
        try:
            if self._replaced:
                self._carry_over(fd)
                return action(fd, os.fstat(fd).st_size)
            return action(fd, st.st_size)
        finally:
            self._lockf(fd, "unlock")
            if fd != self._fd:  # the action swapped in a new file (compaction)
                os.close(fd)

    def _switch_to(self, fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)  # a new file's writes left it at its end
        self._fd = fd
        self._end = -1
        self._ident = _identity(os.fstat(fd))

    def _write_live(self, scan: _Scan, clobber: bool) -> Optional[int]:
        """Write the live lines of ``scan`` as a new file at the path, atomically
        and durably: over the log (``clobber``, compaction) or where it was
        deleted (None if another process recreated it first)."""
        _make_dirs(os.path.dirname(self.path))
        try:
            fd = _write_durably(self.path, (line + b"\n" for line in scan.live.values()), clobber)
        except FileExistsError:
            return None
        if not clobber:
            self._warn("the log was deleted; recreated it with its %d live entities" % len(scan.live))
        return fd

    def _repair_torn_tail(self, fd: int, size: int) -> None:
        """A last line without ``\\n``: terminate it if it is a whole event,
        else move it to ``<log>.torn`` and cut it off, so nothing is glued."""
        start = _after_last_newline(fd, size)
        if start == size:
            return
        if _last_fragment(fd, start, size, self.max_line_bytes)[1] is not None:
            _write_all(fd, b"\n")
            _datasync(fd)
            self._info("terminated the unfinished last line at byte %d" % start)
            return
        self._keep_in_torn_file(_read_chunks(fd, start, size))
        os.ftruncate(fd, start)
        os.fsync(fd)
        self._warn("moved a torn last line (%d bytes at byte %d) to %s.torn"
                   % (size - start, start, self.path))

    def _keep_in_torn_file(self, chunks: Iterable[bytes]) -> None:
        """Append bytes the log cannot use, and a ``\\n``, to ``<log>.torn``
        (0o600), durably, so that nothing is thrown away silently."""
        torn = os.open(self.path + ".torn", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.fchmod(torn, 0o600)
            for chunk in chunks:
                _write_all(torn, chunk)
            _write_all(torn, b"\n")
            os.fsync(torn)
        finally:
            os.close(torn)
        _fsync_dir(os.path.dirname(self.path))

    def persist(self, event: Event) -> None:
        """Append ``event`` and return once it is durable; else raise PersistError.

        An invalid event is refused before anything is written.  Concurrent
        calls share one write and one fsync (group commit)."""
        self._commit([event])

    def persist_batch(self, events: Iterable[Event]) -> None:
        """Append ``events`` with one write and one fsync, in order, and return
        once all are durable.  If any is invalid, none is written."""
        self._commit(list(events))

    def _commit(self, events: List[Event]) -> None:
        for _ in events:
            self.health.record_enqueue()
        try:
            lines = [_encode_event(event) for event in events]  # outside every lock
        except PersistError as exc:
            for _ in events:
                self.health.record_dropped(exc.message)
            self._warn("refused an event: %s" % exc)
            raise
        if not events:
            return
        try:
            error = self._write_in_group(_Queued(events, lines))
        except BaseException as exc:  # interrupted: not known to be durable
            for _ in events:
                self.health.record_error("interrupted: %r" % exc)
            raise
        if error is not None:
            failure = PersistError(events[0]["itemType"], "write/fsync: %s" % error)
            for _ in events:
                self.health.record_error(failure.message)
            self._warn(str(failure))
            raise failure
        for _ in events:
            self.health.record_success()

    def _write_in_group(self, mine: _Queued) -> Optional[BaseException]:
        """Group commit: queue ``mine``; the writer at the head of the queue
        leads, writing everything queued with one write and one fsync while
        later writers queue behind it, then wakes the next leader and
        exactly the writers it covered: the first of them, which wakes the
        second, and so on, so that they do not all fight the next leader for
        the GIL at once.  A lone writer skips the queue.  Returns the error
        of this write, if any.
        """
        if not self._queue and self._lock.acquire(blocking=False):
            try:  # nobody to share the write with: the queue would only cost time
                return self._append([mine])
            finally:
                self._lock.release()
        with self._queue_lock:
            self._queue.append(mine)
            leads = len(self._queue) == 1
        if not leads:
            try:
                mine.wake.acquire()  # released once: covered by a leader, or made the leader
            except BaseException:  # Ctrl-C: finish the hand-off, so that no writer waits forever
                mine.wake.acquire()
                if mine.done:
                    _wake(mine.next)
                else:  # made the leader: it heads the queue
                    self._hand_over(1)
                raise
            if mine.done:
                _wake(mine.next)
                return mine.error
        group = [mine]
        error = None  # type: Optional[BaseException]
        try:
            with self._lock:
                error = self._append(group, self._queue)
        except BaseException as exc:  # even then, the writers behind must not wait forever
            error = exc
            raise
        finally:
            self._hand_over(len(group))  # first, so the next fsync starts sooner
            for queued, after in zip(group[1:], group[2:] + [None]):
                queued.error, queued.done, queued.next = error, True, after
            _wake(group[1] if len(group) > 1 else None)
        return error

    def _append(self, group: List[_Queued], queue: Optional[List[_Queued]] = None) -> Optional[Exception]:
        """Write the lines of ``group`` with one write and one fsync; returns
        the error, if any.  With ``queue``, ``group`` becomes all of it at the
        last moment, so that late arrivals join in.  Call with ``self._lock``."""

        def write_group(fd: int, size: int) -> Tuple[int, int, bytes]:
            if queue is not None:
                with self._queue_lock:
                    group[:] = queue
            return self._write_locked(fd, size, b"".join([queued.data for queued in group]))

        try:
            if self.read_only:
                raise ValueError("the log was opened read-only")
            self._sync_written(*self._locked(write_group))
        except (OSError, ValueError) as exc:
            return exc
        if self._tail is not None:
            for queued in group:
                self._tail.learn(queued.events, queued.lines)
        return None

    def _hand_over(self, count: int) -> None:
        """Take the ``count`` writers a leader dealt with off the queue and
        make the next one in line the leader."""
        with self._queue_lock:
            del self._queue[:count]
            next_leader = self._queue[0] if self._queue else None
        _wake(next_leader)

    def _write_locked(self, fd: int, size: int, data: bytes) -> Tuple[int, int, bytes]:
        """Append ``data`` to the locked ``fd`` of ``size`` bytes; returns
        ``(fd, end, data)``, ``data`` as written, for ``_sync_written``."""
        if size and size != self._end and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # never glue onto a torn line
        try:
            _write_all(fd, data)
        except OSError:
            _cut_back(fd, size, data)
            raise
        return fd, os.lseek(fd, 0, os.SEEK_CUR), data

    def _sync_written(self, fd: int, end: int, data: bytes, own: bool = True) -> None:
        """fdatasync what ``_write_locked`` wrote; on failure cut it back off.

        The sync needs no ``lockf``: other processes may write meanwhile."""
        try:
            _datasync(fd)
        except OSError:
            self._lockf(fd, "lock")
            try:
                _cut_back(fd, end - len(data), data)
            finally:
                self._lockf(fd, "unlock")
            raise
        self._end = end  # the file ends with our newline while its size is this
        tail = self._tail
        if tail is None or not own:
            return
        if tail.ident == self._ident and end - len(data) == tail.pos and not tail.own:
            tail.pos = end  # nothing foreign in between: consumed at once
            tail.last = data[data.rfind(b"\n", 0, len(data) - 1) + 1:]
        else:
            tail.own.append((self._ident, end - len(data), end))

    # --- compaction -------------------------------------------------------------

    def compact(self) -> Dict[str, Any]:
        """Rewrite the log to its live state, atomically; returns figures.

        The live SET lines, as stored, in the file order of their last
        occurrence, go to a temp file that replaces the log (the durable
        rename recipe), so a crash leaves the old log or the new one.
        Malformed lines are kept in ``<log>.torn``.  Both locks are held
        throughout, so no ``DiskPersister`` appends to the old file after it
        was read; lines appended meanwhile by writers that do not lock are
        carried over.  This process's watcher goes on without a
        reload; watchers elsewhere see a new file and reload it.
        """
        if self.read_only:
            raise ValueError("the log was opened read-only")
        started = os.times().elapsed
        with self._lock:

            def rewrite(fd: int, size: int) -> Tuple[_Scan, int]:
                malformed = []  # type: List[bytes]

                def keep(lineno: int, offset: int, reason: str) -> None:
                    self._warn_line(lineno, offset, reason)
                    line = next(iter(_Lines(fd, offset, self.max_line_bytes)))[1]
                    malformed.append(line if line is not None else b"(a line too long to keep)")

                scan = _scan(fd, self.max_line_bytes, keep)
                if malformed:
                    self._keep_in_torn_file([b"\n".join(malformed)])
                    self._warn("kept %d malformed lines in %s.torn" % (len(malformed), self.path))
                return scan, self._compact_locked(fd, scan)

            scan, carried = self._locked(rewrite)
            size_after = os.fstat(self._checked_fd()).st_size
        figures = {
            "lines_before": scan.lines, "bytes_before": scan.end,
            "lines_after": len(scan.live) + carried, "bytes_after": size_after,
            "live": len(scan.live), "seconds": round(os.times().elapsed - started, 6),
        }
        self._info("compacted: %(lines_before)d lines, %(bytes_before)d bytes -> "
                   "%(lines_after)d lines, %(bytes_after)d bytes" % figures)
        return figures

    def _compact_locked(self, old_fd: int, scan: _Scan) -> int:
        tail = self._tail
        follows = tail is not None and tail.ident == self._ident
        if tail is not None and follows:
            # The watcher must still apply what it had not read of the old file.
            tail.read_appended(self.max_line_bytes, self._warn, stop=scan.end)
        new_fd = self._write_live(scan, clobber=True)
        assert new_fd is not None  # os.replace never finds the target in the way
        live_end, last = _end_and_last_line(new_fd)
        self._switch_to(new_fd)  # the old descriptor is closed once its lock is released
        if tail is not None and follows:
            self._set_tail(_Tail(os.dup(new_fd), live_end, last))
        self._replaced.append([os.dup(old_fd), scan.end, os.times().elapsed + _LATE_WRITER_SECONDS])
        return self._carry_over(new_fd)

    def _carry_over(self, fd: int) -> int:
        """Copy lines appended to a log this process replaced, after it was
        read, into the current log ``fd`` (locked); returns how many.

        A writer that does not lock (a shell ``>>``) may have opened the old
        file just before the swap and write into it just after, so the old
        file is checked again at every locked operation for a while."""
        now = os.times().elapsed
        carried = 0
        for replaced in list(self._replaced):
            old_fd, start, deadline = replaced
            lines = _Lines(old_fd, start, self.max_line_bytes)
            found = [line + b"\n" for _, line in lines if line is not None]
            data = b"".join(found)
            carried += len(found)
            replaced[1] = lines.end
            if data:  # foreign lines: the watcher must apply them, so not marked as own
                self._sync_written(*self._write_locked(fd, os.fstat(fd).st_size, data), own=False)
                self._info("carried %d bytes written to the replaced log over" % len(data))
            if now > deadline:
                os.close(old_fd)
                self._replaced.remove(replaced)
        return carried

    # --- the read path: replay ------------------------------------------------

    def replay(self, apply_batch: ApplyBatch) -> int:
        """Restore the live state: the latest SET of every ``(itemType, id)``
        not deleted since, in the file order of that line, marked
        ``preventPersist`` and ``preventRelationshipUpdates``, handed to
        ``apply_batch`` in one call.  Returns what ``apply_batch`` returned
        (``None`` counts as all).  Malformed lines are skipped and logged; an
        exception from ``apply_batch`` propagates.
        """
        with self._lock:
            fd = self._checked_fd()
            scan = _scan(fd, self.max_line_bytes, self._warn_line)
            # A copy: persists in other threads update the tail's while this builds the events.
            self._set_tail(_Tail(os.dup(fd), scan.end, scan.last), inherit=False).known = dict(scan.live)
        if self.compact_ratio is not None and not self.read_only and scan.end > 1 << 20 \
                and scan.end >= self.compact_ratio * scan.live_bytes():
            self.compact()
        events = scan.events()
        self._info("replayed %d lines: %d malformed, %d live" % (scan.lines, scan.malformed, len(events)))
        applied = apply_batch(events)
        return len(events) if applied is None else applied

    def _warn_line(self, lineno: int, offset: int, reason: str) -> None:
        self._warn("skipped line %d (byte %d): %s" % (lineno, offset, reason))

    def _set_tail(self, tail: _Tail, inherit: bool = True) -> _Tail:
        """Make ``tail`` the watcher's; it ``inherit``s the events read but not
        yet applied, and the live lines known, of the one it replaces."""
        old = self._tail
        if old is not None:
            os.close(old.fd)
            if inherit:
                tail.pending, tail.known = old.pending, old.known
        self._tail = tail
        return tail

    def start_watcher(self, apply_batch: ApplyBatch, interval: float = 0.15) -> Watcher:
        """Follow the file from where ``replay`` ended (or from its current end)
        in a daemon thread; see ``Watcher``."""
        with self._lock:
            fd = self._checked_fd()
            if self._watcher is not None:
                raise RuntimeError("a watcher is already running for %s" % self.path)
            if self._tail is None:
                self._set_tail(_Tail(os.dup(fd), *_end_and_last_line(fd)))
            self._watcher = Watcher(self, apply_batch, interval)
        self._watcher._thread.start()
        return self._watcher


# --- the read path: lines, scans, tails ---------------------------------------


def _read_chunks(fd: int, start: int, end: Optional[int] = None) -> Iterator[bytes]:
    """The bytes of ``fd`` from ``start`` to ``end`` (or to EOF), in chunks."""
    pos = start
    while end is None or pos < end:
        chunk = os.pread(fd, _CHUNK if end is None else min(_CHUNK, end - pos), pos)
        if not chunk:
            return
        pos += len(chunk)
        yield chunk


class _Lines:
    """Iterate ``(offset, line)`` over the complete lines of ``fd`` from
    ``start`` (to ``stop``, or to EOF), each without its ``\\n``.  A line
    longer than ``max_line`` comes as ``(offset, None)`` and is never held
    whole; an unfinished last line is not yielded.  ``end`` is always just
    past the last line yielded, so a caller knows exactly what it has
    consumed even while others append."""

    def __init__(self, fd: int, start: int, max_line: int, stop: Optional[int] = None) -> None:
        self.fd = fd
        self.end = start
        self.max_line = max_line
        self.stop = stop

    def __iter__(self) -> Iterator[Tuple[int, Optional[bytes]]]:
        max_line = self.max_line
        offset = self.end  # where the pending line begins
        pending = []  # type: List[bytes]
        pending_size = 0
        for chunk in _read_chunks(self.fd, offset, self.stop):
            lines = chunk.split(b"\n")
            if len(lines) == 1:
                pending_size += len(chunk)
                if pending_size <= max_line:
                    pending.append(chunk)
                else:
                    pending.clear()
                continue
            head = lines[0]
            size = pending_size + len(head)
            offset += size + 1
            self.end = offset
            yield offset - size - 1, (None if size > max_line else b"".join(pending) + head)
            for line in lines[1:-1]:
                offset += len(line) + 1
                self.end = offset
                yield offset - len(line) - 1, (line if len(line) <= max_line else None)
            last = lines[-1]
            pending = [last]
            pending_size = len(last)


def _after_last_newline(fd: int, end: int) -> int:
    """The offset just past the last ``\\n`` before ``end`` (0 if none)."""
    pos = end
    while pos > 0:
        size = min(_CHUNK, pos)
        found = os.pread(fd, size, pos - size).rfind(b"\n")
        if found >= 0:
            return pos - size + found + 1
        pos -= size
    return 0


def _last_fragment(fd: int, start: int, end: int, max_line: int) -> Tuple[bytes, Optional[Event]]:
    """The unterminated last line of ``fd``, ``[start, end)``, and the event
    it holds if it is whole and only lacks its ``\n`` (else it is torn).  A
    fragment longer than ``max_line`` is not read: it counts as torn."""
    if not start < end <= start + max_line:
        return b"", None
    fragment = os.pread(fd, end - start, start)
    return fragment, _parse_line(fragment)[0]


def _end_and_last_line(fd: int) -> Tuple[int, bytes]:
    """Where the file's complete lines end, and the last of them with its ``\\n``."""
    end = _after_last_newline(fd, os.fstat(fd).st_size)
    start = _after_last_newline(fd, end - 1) if end else 0
    return end, os.pread(fd, end - start, start)


class _Scan:
    """A pass over a log: the live lines by key, in the file order of their
    last occurrence; counts; and where the complete lines end.  With
    ``deletions``, also the last line of every key whose last word is a DEL."""

    def __init__(self, deletions: bool = False) -> None:
        self.live = {}  # type: Dict[Key, bytes]
        self.deleted = {} if deletions else None  # type: Optional[Dict[Key, bytes]]
        self.lines = 0
        self.malformed = 0
        self.end = 0
        self.last = b""

    def keep(self, event: Event, line: bytes) -> None:
        """Record ``event`` (parsed from ``line``) as the latest of its key."""
        key, is_set = _key(event), event["changeType"] == "SET"
        _remember(self.live, key, is_set, line)
        if self.deleted is not None:
            _remember(self.deleted, key, not is_set, line)

    def live_bytes(self) -> int:
        """The size of a log holding only the live lines."""
        return sum(len(line) + 1 for line in self.live.values())

    def events(self) -> List[Event]:
        """The live events (then any deletions), parsed again and marked as restored."""
        lines = list(self.live.values())
        if self.deleted:
            lines += self.deleted.values()
        return [_mark(_parse_line(line)[0], restored=True)  # type: ignore[arg-type]
                for line in lines]


def _scan(fd: int, max_line: int, on_malformed: Callable[[int, int, str], None],
          deletions: bool = False) -> _Scan:
    """Stream the whole file once, deduplicating as it goes."""
    scan = _Scan(deletions)
    lines = _Lines(fd, 0, max_line)
    line = None  # type: Optional[bytes]
    for lineno, (offset, line) in enumerate(lines, 1):
        if line is None:
            event, reason = None, "longer than %d bytes" % max_line
        elif not line or line.isspace():
            continue
        else:
            event, reason = _parse_line(line)
        scan.lines += 1
        if event is None:
            scan.malformed += 1
            on_malformed(lineno, offset, reason)
        else:
            scan.keep(event, line)  # type: ignore[arg-type]
    scan.end = lines.end
    scan.last = line + b"\n" if line is not None else b""
    return scan


class _Tail:
    """How far the watcher has read one file: up to ``pos``, whose last line
    was ``last``.  ``own`` lists ``(identity, start, end)`` of this process's
    appends past ``pos``, which must not be applied again; ``pending`` holds
    events read on the watcher's behalf (by a compaction) not yet applied.
    ``known`` is the live line of every entity this process has replayed,
    written or read since, in the order of their last occurrence: what a
    log that lost them is given back."""

    __slots__ = ("fd", "ident", "pos", "last", "own", "pending", "known", "missing")

    def __init__(self, fd: int, pos: int, last: bytes) -> None:
        self.fd = fd
        self.ident = _identity(os.fstat(fd))
        self.pos = pos
        self.last = last
        self.own = []  # type: List[Tuple[Tuple[int, int], int, int]]
        self.pending = []  # type: List[Event]
        self.known = {}  # type: Dict[Key, bytes]
        self.missing = False

    def learn(self, events: List[Event], lines: List[bytes]) -> None:
        """Record each event, as its line, as the latest word on its key."""
        for event, line in zip(events, lines):
            _remember(self.known, _key(event), event["changeType"] == "SET", line.rstrip(b"\n"))

    def intact(self) -> bool:
        """Whether the bytes before ``pos`` are still the last line read."""
        size = len(self.last)
        return not size or os.pread(self.fd, size, self.pos - size) == self.last

    def read_appended(self, max_line: int, warn: Callable[[str], None], stop: Optional[int] = None) -> int:
        """Add the foreign events of the complete lines past ``pos`` (up to
        ``stop``) to ``pending``, in file order; returns how many lines were
        malformed."""
        own = [(start, end) for ident, start, end in self.own if ident == self.ident]
        self.own = []  # every own append ends before the file's last complete line
        malformed = 0
        lines = _Lines(self.fd, self.pos, max_line, stop)
        line = None  # type: Optional[bytes]
        for offset, line in lines:
            while own and own[0][1] <= offset:
                del own[0]
            if own and own[0][0] <= offset or line is not None and (not line or line.isspace()):
                continue
            event, reason = _parse_line(line) if line is not None else (None, "line too long")
            if event is None:
                malformed += 1
                warn("skipped the line at byte %d: %s" % (offset, reason))
            else:
                self.learn([event], [line])  # type: ignore[list-item]
                self.pending.append(_mark(event, restored=False))
        if lines.end != self.pos:
            self.pos = lines.end
            self.last = line + b"\n" if line is not None else b""
        return malformed


# --- the watcher ------------------------------------------------------------


class Watcher:
    """A daemon thread that polls the log every ``interval`` seconds.

    * The file grew: complete lines past the last one read are applied in
      file order (SETs and DELs, marked ``preventPersist``); this process's
      own appends are skipped; a half-written line waits for its end.
    * The file was replaced (new inode): the old file's unread lines are
      applied, then the new file is reloaded from the top: its live entities,
      then the DELs it records (entities it does not mention are kept).
    * The file shrank or the last line read changed: reloaded from the top.
    * After a reload, the live entities this process knows that the file no
      longer mentions are appended back to it, so the log agrees with the
      store and a restart loses nothing (not by a read-only persister).
    * The file was deleted: recreated from the live state read through the
      still-open descriptor (a read-only persister waits for it to return).

    Nothing kills the thread: a store that raises, a malformed line or an
    I/O error is logged and counted in ``errors`` or ``malformed``.
    ``applied`` counts events handed to the store, ``reloads`` full reloads.
    """

    def __init__(self, persister: DiskPersister, apply_batch: ApplyBatch, interval: float) -> None:
        self.interval = interval
        self.applied = 0
        self.malformed = 0
        self.errors = 0
        self.reloads = 0
        self._persister = persister
        self._apply_batch = apply_batch
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="marshal-persist-watcher", daemon=True)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def is_alive(self) -> bool:
        """True while the thread runs."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """End the thread; returns within ``interval`` + 1 s. Idempotent."""
        self._stopping.set()
        if self._thread is not threading.current_thread() and self._thread.ident is not None:
            self._thread.join(self.interval + 1.0)
        p = self._persister
        if p._watcher is self:
            p._watcher = None

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        p = self._persister
        try:
            with p._lock:
                if p._tail is None or self._stopping.is_set():
                    return
                if p._replaced:
                    p._locked(_ignore)  # carries late writes to a replaced log over
                events = self._read_changes(p, p._tail)
        except Exception as exc:  # I/O errors above all; none may end the thread
            self.errors += 1
            p._warn("watcher: %s: %s" % (type(exc).__name__, exc))
            return
        if not events:
            return
        try:
            applied = self._apply_batch(events)
        except Exception as exc:  # the store's failure must not kill the thread
            self.errors += 1
            p._warn("watcher: apply_batch failed on %d events: %r" % (len(events), exc))
            return
        self.applied += len(events) if applied is None else applied

    def _read_changes(self, p: DiskPersister, tail: _Tail) -> List[Event]:
        st = _stat_or_none(p.path)
        if st is not None and _identity(st) == tail.ident:
            if st.st_size < tail.pos or not tail.intact():
                p._warn("truncated or rewritten in place (was %d bytes, now %d); reloading"
                        % (tail.pos, st.st_size))
                self._reload(p, tail)
            elif st.st_size > tail.pos:
                self.malformed += tail.read_appended(p.max_line_bytes, p._warn)
        else:
            self.malformed += tail.read_appended(p.max_line_bytes, p._warn)  # the old file's rest
            tail = self._follow_path(p, tail, st)
        events, tail.pending = tail.pending, []
        return events

    def _follow_path(self, p: DiskPersister, tail: _Tail, st: Optional[os.stat_result]) -> _Tail:
        """The path no longer names the file read so far: recreate a deleted
        log, or reload the new file from the top; returns the tail to use."""
        if st is None and p.read_only:
            if not tail.missing:
                p._warn("the log was deleted; waiting for it to come back")
            tail.missing = True
            return tail
        if st is None:
            new_fd = p._write_live(_scan(tail.fd, p.max_line_bytes, _ignore), clobber=False)
            if new_fd is not None:  # the store has all of it already: no reload
                return p._set_tail(_Tail(new_fd, *_end_and_last_line(new_fd)))
        try:
            new_fd = os.open(p.path, os.O_RDONLY)
        except FileNotFoundError:
            return tail  # gone again; the next tick sees to it
        p._warn("the log was replaced; reloading it from the top")
        new = p._set_tail(_Tail(new_fd, 0, b""))
        self._reload(p, new)
        return new

    def _reload(self, p: DiskPersister, tail: _Tail) -> None:
        self.reloads += 1
        # Deletions too: a DEL that landed before the reload would otherwise be missed.
        scan = _scan(tail.fd, p.max_line_bytes, p._warn_line, deletions=True)
        self.malformed += scan.malformed
        tail.pos, tail.last, tail.own, tail.missing = scan.end, scan.last, [], False
        tail.pending += scan.events()
        lost = [(key, line) for key, line in tail.known.items()
                if key not in scan.live and key not in scan.deleted]  # type: ignore[operator]
        tail.known = dict(scan.live)
        if lost and not p.read_only:
            # The store keeps what the file no longer has (as the Rust does); so
            # that a restart agrees with it and loses nothing, the log gets it back.
            data = b"".join(line + b"\n" for _, line in lost)
            p._sync_written(*p._locked(lambda fd, size: p._write_locked(fd, size, data)))
            tail.known.update(lost)
            p._warn("gave the log back %d live entities it no longer had" % len(lost))


# --- MemoryStore --------------------------------------------------------------


class MemoryStore:
    """A ready, thread-safe store of items keyed by ``(itemType, id)``.

    Pass ``store.apply_batch`` to ``replay`` and ``start_watcher``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items = {}  # type: Dict[Key, Dict[str, Any]]

    def apply_batch(self, events: List[Event]) -> int:
        """Apply events in order (SET upserts the item, DEL removes it); returns
        how many it applied."""
        with self._lock:
            for event in events:
                key = _key(event)
                if event["changeType"] == "SET":
                    self._items[key] = event["item"]
                else:
                    self._items.pop(key, None)
        return len(events)

    def get(self, item_type: str, id: str) -> Optional[Dict[str, Any]]:
        """The item stored under ``(item_type, id)``, or None."""
        with self._lock:
            return self._items.get((item_type, id))

    def items(self, item_type: Optional[str] = None) -> List[Dict[str, Any]]:
        """Every item, or those of one ``item_type``, in insertion order."""
        with self._lock:
            return [item for (kind, _), item in self._items.items()
                    if item_type is None or kind == item_type]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


# --- the command line ---------------------------------------------------------


class _StreamLogger:
    """A logger that writes each message as a line to a text stream."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def warning(self, message: str) -> None:
        self.stream.write(message + "\n")
        self.stream.flush()

    info = warning


def _open_for_reading(path: str) -> int:
    """A read-only descriptor of the log; OSError with a clear strerror otherwise."""
    fd = os.open(path, os.O_RDONLY)
    if os.path.isdir(path):
        os.close(fd)
        raise IsADirectoryError(21, "is a directory, not a log file")
    return fd


def _read_log(path: str, on_malformed: Callable[[int, int, str], None]) -> Tuple[_Scan, str]:
    """Scan the log read-only, as a writer would see it after its torn-tail
    repair; the second value describes an unterminated last line, if any."""
    fd = _open_for_reading(path)
    try:
        scan = _scan(fd, _DEFAULT_MAX_LINE, on_malformed)
        size = os.fstat(fd).st_size - scan.end
        fragment, event = _last_fragment(fd, scan.end, scan.end + size, _DEFAULT_MAX_LINE)
    finally:
        os.close(fd)
    if not size:
        return scan, ""
    if event is None:
        return scan, "torn tail at byte %d: %d bytes of an unfinished write" % (scan.end, size)
    scan.keep(event, fragment)
    return scan, "the last line (byte %d) is a whole event without its newline" % scan.end


def _count_by_type(keys: Iterable[Key]) -> Dict[str, int]:
    counts = {}  # type: Dict[str, int]
    for item_type, _ in keys:
        counts[item_type] = counts.get(item_type, 0) + 1
    return dict(sorted(counts.items()))


def _cli_replay(args: Any, out: Any, err: Any) -> int:
    scan, tail_note = _read_log(args.path, _ignore)
    keys = [key for key in scan.live if args.type is None or key[0] == args.type]
    counts = _count_by_type(keys)
    if args.summary:
        for item_type, count in counts.items():
            out.write("%s\t%d\n" % (item_type, count))
        return 0
    for key in keys:
        out.write(scan.live[key].decode("utf-8") + "\n")
    per_type = ", ".join("%s %d" % pair for pair in counts.items())
    err.write("%s: %d lines, %d malformed, %d live%s\n" % (
        args.path, scan.lines, scan.malformed, len(keys), " (%s)" % per_type if per_type else ""))
    if tail_note:
        err.write("note: %s\n" % tail_note)
    return 0


def _cli_check(args: Any, out: Any, err: Any) -> int:
    def report(lineno: int, offset: int, reason: str) -> None:
        out.write("line %d (byte %d): %s\n" % (lineno, offset, reason))

    scan, tail_note = _read_log(args.path, report)
    torn = tail_note.startswith("torn")
    if tail_note:
        out.write(tail_note + "\n")
    verdict = "problems found" if scan.malformed or torn else "clean"
    out.write("%s: %d lines, %d malformed%s: %s\n" % (
        args.path, scan.lines, scan.malformed, ", torn tail" if torn else "", verdict))
    return 1 if scan.malformed or torn else 0


def _cli_follow(args: Any, out: Any, err: Any) -> int:
    def show(events: List[Event]) -> int:
        for event in events:
            if args.type is None or event["itemType"] == args.type:
                out.write(_ENCODER.encode(event) + "\n")
        out.flush()
        return len(events)

    with DiskPersister(args.path, logger=_StreamLogger(err), read_only=True) as persister:
        live = persister.replay(len)
        err.write("%s: %d live entities; following (Ctrl-C to stop)\n" % (args.path, live))
        err.flush()
        watcher = persister.start_watcher(show, interval=args.interval)
        try:
            while watcher.is_alive():
                threading.Event().wait(0.5)
        except KeyboardInterrupt:
            pass
    return 0


def _cli_compact(args: Any, out: Any, err: Any) -> int:
    if args.dry_run:
        scan, _ = _read_log(args.path, _ignore)
        out.write("%s: would compact %d lines, %d bytes -> %d lines, %d bytes (dry run: nothing changed)\n"
                  % (args.path, scan.lines, scan.end, len(scan.live), scan.live_bytes()))
        return 0
    os.close(_open_for_reading(args.path))  # never create the log it was asked to compact
    with DiskPersister(args.path, logger=_StreamLogger(err)) as persister:
        figures = persister.compact()
    out.write("%s: %d lines, %d bytes -> %d lines, %d bytes in %.3f s\n" % (
        args.path, figures["lines_before"], figures["bytes_before"], figures["lines_after"],
        figures["bytes_after"], figures["seconds"]))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: ``marshal-persist replay|check|follow|compact [PATH]``.

    Returns the exit status: 0 done (``check``: clean), 1 ``check`` found
    problems, 2 the log could not be read (or compacted)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="marshal-persist",
        description="Inspect or compact a marshal events.jsonl log. replay, check and follow only "
                    "read: they never create, repair or lock the file. PATH defaults to %s."
                    % default_log_path())
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    replay = commands.add_parser(
        "replay", help="print the live entities as JSONL",
        description="Print the live entities (the surviving SET lines, as stored) as JSONL on "
                    "stdout and a summary (lines, malformed, live per itemType) on stderr.")
    replay.add_argument("--summary", action="store_true",
                        help="print only the live count per itemType, one 'TYPE<TAB>N' a line")
    check = commands.add_parser(
        "check", help="list malformed lines and a torn tail",
        description="List every malformed line (number, byte offset, reason) and a torn last "
                    "line. Exit 1 when it found any, 0 when the log is clean.")
    follow = commands.add_parser(
        "follow", help="print each event the watcher applies",
        description="Replay, then print as JSONL each event the watcher applies (appends, and "
                    "every live entity again after a replacement or truncation) until Ctrl-C.")
    follow.add_argument("--interval", type=float, default=0.15, metavar="SECONDS",
                        help="how often to poll the file (default: 0.15)")
    compact = commands.add_parser(
        "compact", help="rewrite the log to its live state",
        description="Rewrite the log to its live entities and print lines and bytes before and "
                    "after. Atomic: a crash leaves the old log or the new one. Safe against any "
                    "DiskPersister and any appender that writes whole lines; stop a program that "
                    "holds the file open without locking it (such as the Rust marshal-daemon) first.")
    compact.add_argument("--dry-run", action="store_true",
                         help="print what it would do and change nothing")
    for sub in (replay, check, follow, compact):
        sub.add_argument("path", nargs="?", metavar="PATH", help="the log")
    for sub in (replay, follow):
        sub.add_argument("--type", metavar="T", help="only entities whose itemType is T")
    args = parser.parse_args(argv)
    args.path = args.path or default_log_path()
    run = {"replay": _cli_replay, "check": _cli_check, "follow": _cli_follow,
           "compact": _cli_compact}[args.command]
    try:
        return run(args, sys.stdout, sys.stderr)
    except BrokenPipeError:  # a reader such as `head` went away: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        sys.stderr.write("marshal-persist: %s: %s\n" % (args.path, exc.strerror or exc))
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
