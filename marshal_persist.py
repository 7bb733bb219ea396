"""A durable, append-only JSONL event log: the marshal daemon's persister in Python.

Format
    One event per line: compact JSON (UTF-8, non-ASCII kept) and a single
    ``\\n``, byte-compatible both ways with the Rust marshal-daemon::

        {"item":{"id":"s-1"},"changeType":"SET","itemType":"Session",...}

    ``item`` is an object whose ``id`` (a non-empty string) is the identity,
    ``changeType`` is exactly ``"SET"`` or ``"DEL"``, ``itemType`` a string;
    ``createdAt``, ``tx``, ``sourceId`` and ``options`` are optional.
    The identity of an entity is ``(itemType, item.id)``; the last line wins.

Guarantees
    * ``persist`` returns only once the line, the file's size and every
      directory entry on the log's path are durable (fdatasync and directory
      fsyncs), so neither ``kill -9`` nor a power cut loses an acknowledged
      event.  Concurrent calls share one write and one fdatasync.
    * A refused or failed event raises and leaves nothing behind.  No line is
      ever glued to another: not to a torn line left by a crash (it goes to
      ``<log>.torn`` at the next open), nor to a line that a writer which does
      not lock is writing at the same moment.
    * Replay skips and counts bad lines; no file content makes it raise.
    * Appends land in the file the path names now: a replaced log is
      reopened, a deleted one recreated from the live state.
    * The watcher hands the store every event in file order, this process's
      own included, so the store ends up as a fresh replay would leave it.
    * ``compact`` rewrites the log to its live state atomically, and keeps
      the bytes it cannot parse in ``<log>.torn``.

Data flows top to bottom: errors and health, paths and migration, encoding
and validation, the write path, the read path, the watcher,
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
    ApplyBatch = Callable[[List[Any]], Any]
    Key = Tuple[str, str]
    Entry = Tuple[bytes, Event, str]  # a line, its event, and how it is marked
    T = TypeVar("T")

__version__ = "0.2.0"

__all__ = ["__version__", "default_state_dir", "default_log_path", "migrate_from_claude_coord",
           "PersistError", "PersistHealth", "DiskPersister", "Watcher", "MemoryStore", "main"]

LOG_NAME = "events.jsonl"
_CHUNK = 1 << 20
_DEFAULT_MAX_LINE = 16 << 20
_TOMBSTONES = 1000
_COMPACT_ABOVE = 1 << 20
_APPEND = os.O_RDWR | os.O_APPEND  # descriptors are not inherited by children (PEP 446)
# lockf fails with these where the filesystem has no locks (ENOLCK, EOPNOTSUPP/ENOTSUP).
_NO_LOCKS = (77, 45) if os.uname().sysname == "Darwin" else (37, 95)


# --- errors and health ------------------------------------------------------


class PersistError(Exception):
    """An event was not made durable: it was refused, or its write or sync failed."""

    def __init__(self, entity_type: str, message: str) -> None:
        super().__init__(entity_type, message)
        self.entity_type = entity_type
        self.message = message

    def __str__(self) -> str:
        return "persist failed for %s: %s" % (self.entity_type, self.message)


class PersistHealth:
    """Thread-safe counters of the write path, with myko's semantics.

    ``queued`` counts events between ``record_enqueue`` and their outcome;
    every outcome takes one off (unlike myko, a dropped event too).  A
    dropped (refused) event counts as an error, as in myko, and also in
    ``total_dropped``.  Healthy means no error since the last success.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.queued = 0
        self.total_persisted = 0
        self.total_errors = 0
        self.total_dropped = 0
        self.consecutive_errors = 0
        self.last_error = None  # type: Optional[str]
        self._recent = []  # type: List[List[int]]  # [tenth of a second, events persisted then], the last 10

    @property
    def healthy(self) -> bool:
        """True while no error happened since the last success."""
        return self.consecutive_errors == 0

    def record_enqueue(self, count: int = 1) -> None:
        """``count`` events entered ``persist``."""
        with self._lock:
            self.queued += count

    def record_success(self) -> None:
        """An event is durable."""
        self.record_success_batch(1)

    def record_success_batch(self, count: int) -> None:
        """``count`` events are durable; a success clears the last error."""
        tick = int(os.times().elapsed * 10)
        with self._lock:
            self.queued -= count
            self.total_persisted += count
            if self.consecutive_errors:
                self.consecutive_errors = 0
                self.last_error = None
            if self._recent and self._recent[-1][0] == tick:
                self._recent[-1][1] += count
            else:
                self._recent = [r for r in self._recent if r[0] > tick - 10] + [[tick, count]]

    def record_error(self, message: str, dequeue: bool = True) -> None:
        """A write or sync failed."""
        with self._lock:
            self.queued -= dequeue
            self.total_errors += 1
            self.consecutive_errors += 1
            self.last_error = message

    def record_error_no_dequeue(self, message: str) -> None:
        """A write failed and the event stays queued (it will be retried)."""
        self.record_error(message, dequeue=False)

    def record_dropped(self, message: str) -> None:
        """An invalid event was refused."""
        self.record_error(message)
        with self._lock:
            self.total_dropped += 1

    def writes_per_second(self) -> float:
        """Events persisted in the last second."""
        tick = int(os.times().elapsed * 10)
        with self._lock:
            return float(sum(count for when, count in self._recent if when > tick - 10))

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
    """``$MARSHAL_STATE_DIR`` (if set and not empty), else
    ``$HOME/.local/state/marshal``, else ``.marshal``."""
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


def migrate_from_claude_coord(new_log_path: Any, logger: Any = None) -> bool:
    """Move the log of claude-coord (the daemon's former name) to
    ``new_log_path``; True when it moved.

    The legacy log is ``$CLAUDE_COORD_STATE_DIR/events.jsonl``, else
    ``~/.local/state/claude-coord/events.jsonl``.  It moves only when the new
    path does not exist; when both exist, both are left alone with a warning
    (the new one is preferred), unless they hold the same bytes (a move that
    was interrupted), which finishes the move.  The new name and every
    directory above it are durable before the old name is removed; without
    hard links (or across filesystems) the file is copied durably.
    """
    new = os.path.abspath(_fspath(new_log_path))
    old = _legacy_log_path()
    if old is None or not os.path.exists(old):
        return False
    if os.path.exists(new) and not _same_content(old, new):
        _say(logger, "warning", "[migrate] both legacy (%s) and current (%s) event logs "
             "exist; leaving both in place (current is preferred)" % (old, new))
        return False
    _say(logger, "info", "[migrate] moving event log: %s -> %s" % (old, new))
    if not os.path.exists(new):
        _make_dirs(os.path.dirname(new))
        try:
            os.link(old, new)  # unlike rename, never clobbers a log created meanwhile
        except FileExistsError:
            return False
        except OSError:  # another filesystem (EXDEV), or one without hard links
            with open(old, "rb") as src, _device_lock(os.stat(os.path.dirname(new)).st_dev):
                os.close(_write_durably(new, iter(lambda: src.read(_CHUNK), b""), clobber=False))
    _sync_path(new)
    os.unlink(old)
    _fsync_dir(os.path.dirname(old))
    return True


def _fspath(path: Any) -> str:
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError("the log path must be a str or an os.PathLike of str, not %s"
                        % type(path).__name__)
    return path


def _same_content(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` hold the same bytes; ``b``, a log, is opened
    and closed under its device's lock (see ``_device_lock``)."""
    with _device_lock(os.stat(b).st_dev), open(a, "rb") as fa, open(b, "rb") as fb:
        if os.path.samestat(os.fstat(fa.fileno()), os.fstat(fb.fileno())):
            return True
        while True:
            chunk = fa.read(_CHUNK)
            if chunk != fb.read(_CHUNK):
                return False
            if not chunk:
                return True


def _say(logger: Any, level: str, message: str) -> None:
    if logger is not None:
        getattr(logger, level)(message)


def _make_dirs(path: str) -> None:
    """Create missing directories as 0o700, whatever the umask, and make
    their entries durable."""
    if os.path.isdir(path):
        return
    _make_dirs(os.path.dirname(path))
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    os.chmod(path, 0o700)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    """Make a create, rename or unlink in the directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_path(path: str) -> None:
    """Make the entry of ``path`` durable, and the entry of every directory
    above it: any of them may have been created by a process that was killed
    before it synced them.  Directories this process may not read were not
    made by it, and are skipped."""
    folder = os.path.dirname(path)
    while True:
        try:
            _fsync_dir(folder)
        except PermissionError:
            pass
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


# fdatasync where the platform has it (it skips the inode's times), else fsync.
_datasync = getattr(os, "fdatasync", os.fsync)


def _lockf(fd: int, op: int) -> None:
    """``lockf`` of the whole file.  It counts from the current offset, which
    an O_APPEND write moves: unlocking seeks back to 0 first, so that every
    descriptor is at offset 0 whenever it is unlocked, and lock and unlock
    name one range."""
    if op == os.F_ULOCK:
        os.lseek(fd, 0, os.SEEK_SET)
    os.lockf(fd, op, 0)


def _write_durably(path: str, chunks: Iterable[bytes], clobber: bool,
                   like: Optional[os.stat_result] = None, more: Callable[[], bytes] = bytes) -> int:
    """Write ``chunks`` to a new file at ``path`` atomically and durably.

    The recipe: a temp file beside ``path`` (mode 0o600, or the mode and
    owner of ``like``), locked while in use (the caller unlocks it), written
    and fsynced (then what ``more`` gives, synced, until it gives nothing),
    takes the name: ``os.replace`` when ``clobber``, else
    ``os.link``, which raises ``FileExistsError`` rather than overwrite; then
    the directory is fsynced.  A crash leaves the old state or the new, never
    a mix.  Returns a read/append descriptor of the new file.
    """
    folder = os.path.dirname(path)
    tmp = "%s.%s.tmp" % (path, os.urandom(8).hex())
    try:
        fd = os.open(tmp, _APPEND | os.O_CREAT | os.O_EXCL, 0o600)
    except PermissionError as exc:
        raise PermissionError(exc.errno, "cannot create a file here", folder) from None
    try:
        try:  # marks it as in use, see DiskPersister._sweep_temp_files
            _lockf(fd, os.F_LOCK)
        except OSError:
            pass  # a filesystem without locks
        _take_mode_and_owner(fd, like, path)
        pending = []  # type: List[bytes]
        size = 0
        for chunk in chunks:
            pending.append(chunk)
            size += len(chunk)
            if size >= _CHUNK:
                _write_all(fd, b"".join(pending))
                pending, size = [], 0
        _write_all(fd, b"".join(pending))
        while True:  # synced, then whatever more() gives, until it gives nothing
            os.fsync(fd)
            extra = more()
            if not extra:
                break
            _write_all(fd, extra)
        if clobber:
            os.replace(tmp, path)
        else:
            _link_or_rename(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass  # gone once it took the name
        raise
    return fd


def _link_or_rename(tmp: str, path: str) -> None:
    """Give ``tmp`` the name ``path`` unless it is taken (FileExistsError).
    Without hard links, a rename after a look: the only way there is."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(path):
            raise FileExistsError(17, "File exists", path) from None
        os.rename(tmp, path)
    else:
        os.unlink(tmp)


def _take_mode_and_owner(fd: int, like: Optional[os.stat_result], path: str) -> None:
    """Give a new file the mode of ``like`` (0o600 without it, whatever the
    umask) and its owner and group, so that the daemon that owns the log can
    still open it; refuse rather than hand the log to another owner."""
    os.fchmod(fd, 0o600 if like is None else like.st_mode & 0o7777)
    if like is None:
        return
    mine = os.fstat(fd)
    if (mine.st_uid, mine.st_gid) != (like.st_uid, like.st_gid):
        try:
            os.fchown(fd, like.st_uid, like.st_gid)
        except PermissionError:
            raise PermissionError(1, "the log belongs to uid %d, gid %d; run this as that user "
                                  "(or root) so that the rewritten log keeps its owner"
                                  % (like.st_uid, like.st_gid), path) from None
        os.fchmod(fd, like.st_mode & 0o7777)  # chown clears set-id bits


# --- encoding and validation ------------------------------------------------


def _out_of_range(value: float) -> float:
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range (the Rust reader rejects it)")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError("%s is not JSON (the Rust reader rejects it)" % name)


_MAX_DEPTH = 127  # serde_json's recursion limit: the Rust reader rejects deeper JSON
_TOO_DEEP = "nesting too deep: more than %d levels (the Rust reader's limit)" % _MAX_DEPTH
_F64_DIGITS = 309  # an integer with fewer digits is within f64's range
_DIGITS_AS_ZEROS = bytes.maketrans(b"123456789", b"000000000")
# Unicode White_Space, which Rust's str::trim removes: a line of only these is blank.
_WHITESPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006" \
              "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=lambda t: _out_of_range(float(t)))
_SCAN = _DECODER.scan_once  # type: ignore[attr-defined]  # the C scanner behind decode(), minus two regexes
_CHECKING_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_DECODER.parse_float,
                                     parse_int=lambda t: _out_of_range(float(t)) and int(t))
_KNOWN_KEYS = {"item", "changeType", "itemType", "createdAt", "tx", "sourceId", "options"}
_OPTION_KEYS = {"preventRelationshipUpdates", "preventPersist", "fromPeer"}


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
        for flag in ("preventRelationshipUpdates", "preventPersist"):
            if flag in options and type(options[flag]) is not bool:
                return "options.%s is not a boolean" % flag
        if options.get("fromPeer") is not None and type(options["fromPeer"]) is not bool:
            return "options.fromPeer is not a boolean or null"
    return None


def _line_problem(line: bytes, event: Event) -> Optional[str]:
    """What the Rust reader rejects in a line that Python's json accepts:
    nesting over 127 levels, an integer beyond f64, a lone surrogate, a
    known key twice.  Cheap tests on the bytes come first: only a line of
    256 bytes can nest 128 levels, only one with a run of 309 digits holds
    such an integer, and each key ends in ``":``, which a string can hold
    only after a backslash, so a line with no more of them than its objects
    have keys repeats none."""
    if len(line) >= 2 * (_MAX_DEPTH + 1) and line.count(b"{") + line.count(b"[") > _MAX_DEPTH:
        stack = [(event, 1)]  # type: List[Tuple[Any, int]]
        while stack:
            node, depth = stack.pop()
            if depth > _MAX_DEPTH:
                return _TOO_DEEP
            children = node.values() if type(node) is dict else node if type(node) is list else ()
            stack.extend((child, depth + 1) for child in children if type(child) in (dict, list))
    if len(line) >= _F64_DIGITS and b"0" * _F64_DIGITS in line.translate(_DIGITS_AS_ZEROS):
        try:
            _CHECKING_DECODER.decode(line.decode("utf-8"))
        except ValueError as exc:
            return str(exc)
    if b"\\u" in line:
        try:
            _ENCODER.encode(event).encode("utf-8")
        except UnicodeEncodeError:
            return "a \\u escape is half a surrogate pair"
    if _repeats_a_key(line, event):
        repeated = []  # type: List[str]

        def pairs(found: List[Tuple[str, Any]]) -> Dict[str, Any]:
            keys = [key for key, _ in found]
            known = _KNOWN_KEYS if "item" in keys else _OPTION_KEYS
            repeated.extend(key for key in keys if keys.count(key) > 1 and key in known)
            return dict(found)

        json.JSONDecoder(object_pairs_hook=pairs).decode(line.decode("utf-8"))
        if repeated:
            return "the key %s appears twice" % repeated[0]
    return None


def _repeats_a_key(line: bytes, event: Event) -> bool:
    """Whether ``line`` may hold a key twice: it has more ``":`` than its objects have keys."""
    return line.count(b'":') > len(event) + len(event["item"]) + len(event.get("options") or ())


def _snapshot(event: Any) -> Any:
    """A copy of what validation looks at, so that a thread changing the
    caller's dict cannot slip an unchecked value between check and encoding."""
    if type(event) is not dict:
        return event
    snap = dict(event)
    for key in ("item", "options"):
        if type(snap.get(key)) is dict:
            snap[key] = dict(snap[key])
    return snap


def _encode_event(event: Any, max_line: int) -> bytes:
    """The line of an event (a snapshot), ``\n`` included; raises
    PersistError if the Rust reader or replay would not take it back."""
    problem = _event_problem(event)
    if problem is None and "own" in (event.get("options") or ()):
        problem = "options.own is the reader's mark of this process's own events, never persisted"
    if problem is None:
        try:
            line = (_ENCODER.encode(event) + "\n").encode("utf-8")  # refuses a lone surrogate too
        except (TypeError, ValueError, RecursionError) as exc:
            problem = "not serializable as JSON: %s" % exc
        else:  # a dict has no key twice and encoding refused a lone surrogate: the rest needs length
            problem = _line_problem(line, event) if len(line) >= 2 * (_MAX_DEPTH + 1) else None
            if problem is None and len(line) > max_line + 1:
                problem = "its line of %d bytes is longer than max_line_bytes (%d)" % (
                    len(line) - 1, max_line)
        if problem is None:
            return line
    entity_type = event.get("itemType") if isinstance(event, dict) else None
    raise PersistError(entity_type if isinstance(entity_type, str) else "<unknown>", problem)


def _parse_line(line: bytes) -> Tuple[Optional[Event], str]:
    """``(event, "")`` for a valid log line (without its ``\n``), else
    ``(None, reason)``."""
    try:
        text = line.decode("utf-8")
        event, end = _SCAN(text, 0)
        if end != len(text):
            raise ValueError("more after the value")  # white space, or not: decode() tells
    except UnicodeDecodeError:
        return None, "invalid UTF-8"
    except RecursionError:
        return None, _TOO_DEEP
    except (StopIteration, ValueError):
        try:
            event = _DECODER.decode(text)
        except RecursionError:
            return None, _TOO_DEEP
        except json.JSONDecodeError as exc:
            if line.startswith(b"\xef\xbb\xbf"):
                return None, "starts with a byte order mark"
            return None, "not JSON: %s (column %d)" % (exc.msg, exc.colno)
        except ValueError as exc:  # NaN, 1e400, an integer beyond Python's digit limit
            return None, "not JSON: %s" % exc
    problem = _event_problem(event)
    long_enough = len(line) >= 2 * (_MAX_DEPTH + 1)
    if problem is None and (long_enough or b"\\u" in line or _repeats_a_key(line, event)):
        problem = _line_problem(line, event)  # only where the bytes leave room for one
    if problem is not None:
        return None, problem
    return event, ""


def _decode_valid(line: bytes) -> Event:
    """The event of a line ``_parse_line`` accepted: no checks again."""
    text = line.decode("utf-8")
    try:
        return _SCAN(text, 0)[0]  # type: ignore[no-any-return]
    except StopIteration:  # white space before it
        return _DECODER.decode(text)  # type: ignore[no-any-return]


def _is_blank(line: bytes) -> bool:
    """Whether the Rust reader skips ``line`` as blank (Unicode white space only)."""
    if line[:1] == b"{":
        return False
    try:
        return not line.decode("utf-8").strip(_WHITESPACE)
    except UnicodeDecodeError:
        return False


def _mark(event: Event, how: str) -> Event:
    """Flag an event read from disk (in place: it was parsed for the store)
    so that the store does not persist it again; one ``restored`` from a
    snapshot does not re-run its relationship cascades either; one this
    process wrote is flagged ``own``."""
    options = event.get("options")
    if options is None:
        options = event["options"] = {}
    options["preventPersist"] = True
    if how == "restored":
        options["preventRelationshipUpdates"] = True
    options.setdefault("preventRelationshipUpdates", False)
    options.setdefault("fromPeer", None)
    if how == "own":
        options["own"] = True
    else:  # only the origin of a line says it is own, never the line
        options.pop("own", None)
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

# POSIX record locks belong to a process, not to a descriptor: two descriptors
# of one file in one process do not exclude each other, and closing either
# drops the process's lock.  So every DiskPersister in this process takes one
# lock per filesystem around every lockf, every switch to another file and
# every close of a log's descriptor.  A table by inode, as SQLite keeps, would
# have to follow each compaction's new inode; by device, every spelling of a
# path, a symlink, a hard link and every later inode of a log land on one
# lock, and only logs on one filesystem wait for each other.
_DEVICE_LOCKS = {}  # type: Dict[int, Any]
_DEVICE_LOCKS_GUARD = threading.Lock()


def _device_lock(device: int) -> Any:
    with _DEVICE_LOCKS_GUARD:
        return _DEVICE_LOCKS.setdefault(device, threading.Lock())


# A child of fork() gets every lock of this module in the state the parent's
# threads held it, and none of those threads to release it; lockf locks are
# not inherited at all.  So the child starts with new locks, and a persister
# it inherited refuses work (see _check_open): it must open its own.
_forks = 0


def _after_fork_in_child() -> None:
    global _forks, _DEVICE_LOCKS_GUARD
    _forks += 1
    _DEVICE_LOCKS.clear()
    _DEVICE_LOCKS_GUARD = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a short write is no error)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError("write made no progress")
        view = view[written:]


def _append(fd: int, data: bytes) -> Tuple[int, int]:
    """Append ``data``; returns where it starts and where the file ended after
    it.  ``end - start > len(data)`` when a short write let another writer's
    bytes in between."""
    written = os.write(fd, data)  # O_APPEND: the kernel places it at the end, whole
    end = os.lseek(fd, 0, os.SEEK_CUR)
    start = end - written
    while written < len(data):  # a short write: a signal, or a full disk
        step = os.write(fd, data[written:])
        if step <= 0:
            raise OSError("write made no progress")
        written += step
        end = os.lseek(fd, 0, os.SEEK_CUR)
    return start, end


def _cut_back(fd: int, before: int, data: bytes) -> None:
    """Remove what of ``data`` reached the file, which was ``before`` bytes
    long when it was appended, while nothing follows it: all of it at the
    end, or the part of it that starts at ``before``."""
    try:
        size = os.fstat(fd).st_size
        for start in (size - len(data), before):
            length = size - start
            if start >= before and 0 < length <= len(data) and os.pread(fd, length, start) == data[:length]:
                os.ftruncate(fd, start)
                os.fsync(fd)
                return
    except OSError:
        pass  # the next open's torn-tail repair and the never-glue rule still cover it


def _size(fd: int, size: int) -> int:
    return size


def _identity(st: os.stat_result) -> Tuple[int, int]:
    return st.st_dev, st.st_ino


def _stat_or_none(path: str) -> Optional[os.stat_result]:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


_INTERRUPTED = KeyboardInterrupt("the thread writing it was interrupted")


class _Group:
    """Events waiting for one write and one fdatasync (see ``DiskPersister._commit``)."""

    __slots__ = ("writers", "taken", "error", "turn")

    def __init__(self) -> None:
        self.writers = []  # type: List[Tuple[List[bytes], List[Event]]]  # each one's lines and events
        self.taken = False
        # Failed until its sync returns: an interruption anywhere before cannot pass for success.
        self.error = _INTERRUPTED  # type: Optional[BaseException]
        self.turn = threading.Lock()  # held by the one of its writers that is writing or looking


class DiskPersister:
    """The event log at ``path``: ``persist`` appends, ``replay`` restores,
    ``start_watcher`` follows the file, ``compact`` rewrites it to its live
    state.

    The path is made absolute and its symlinks resolved at open, so that a
    later ``chdir`` or a symlinked state directory changes nothing.  Opening
    creates missing directories (0o700) and the file (0o600), makes the log
    and every directory entry above it durable, repairs a torn last line and
    removes temp files a killed compaction left.  With ``read_only=True``
    nothing is created, repaired, locked or written.  ``persist`` refuses an
    event whose line is longer than ``max_line_bytes``; replay skips such
    lines without reading them whole.  With ``compact_ratio`` set, a log
    over 1 MiB is compacted once it is that many times its live state: by
    ``replay``, and by the ``persist`` that makes it so.  ``logger`` is any object with ``warning(msg)`` and
    ``info(msg)`` (a ``logging.Logger``); without one, nothing is logged.
    Any number of ``DiskPersister`` objects, threads and processes may share
    one file.
    """

    def __init__(self, path: Any, *, logger: Any = None, read_only: bool = False,
                 max_line_bytes: int = _DEFAULT_MAX_LINE, compact_ratio: Optional[float] = None,
                 any_file: bool = False) -> None:
        if logger is not None and not all(callable(getattr(logger, m, None)) for m in ("warning", "info")):
            raise TypeError("logger must have warning() and info() methods")
        if type(max_line_bytes) is not int or max_line_bytes <= 0:
            raise ValueError("max_line_bytes must be a positive int")
        if compact_ratio is not None and not compact_ratio > 1:
            raise ValueError("compact_ratio must be greater than 1")
        self.path = os.path.realpath(_fspath(path))
        self.health = PersistHealth()
        self.read_only = read_only
        self.max_line_bytes = max_line_bytes
        self.compact_ratio = compact_ratio
        self._logger = logger
        self._notes = []  # type: List[Tuple[str, str]]  # logged once no lock is held
        self._can_lock = not read_only
        self._closed = False
        self._forks = _forks  # a child of fork() inherits this object, not its locks
        self._group = None  # type: Optional[_Group]  # the group new events join
        self._group_lock = threading.Lock()
        self._end = -1  # where this process's last write ended
        self._name_synced = True  # whether the log's directory entry is known to be durable
        self._compact_at = None  # type: Optional[int]  # the size at which a persist compacts
        self._tail = _Tail(self)  # everything the read side knows
        # The log's descriptor, what the watcher read, and lockf (see _device_lock).
        if read_only:  # its descriptor is opened, like every one of the log, under the device's lock
            self._lock = _device_lock(os.stat(self.path).st_dev)
            with self._lock:
                self._fd = self._open()
        else:
            _make_dirs(os.path.dirname(self.path))
            self._lock = _device_lock(os.stat(os.path.dirname(self.path)).st_dev)
            with self._lock:
                self._fd = self._open()
        self._ident = _identity(os.fstat(self._fd))
        try:
            if not read_only:
                with self._lock:
                    if not any_file:
                        self._refuse_a_file_that_is_no_log()
                    self._probe_lockf()
                    self._locked(self._repair_torn_tail)
                    self._sweep_temp_files()
                os.fsync(self._fd)  # what a restart replays must be durable before it is relied on
                _sync_path(self.path)
                self._compact_when(os.fstat(self._fd).st_size)
        except BaseException:
            self.close()
            raise
        self._flush_notes()

    def __enter__(self) -> DiskPersister:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the watcher, wait for a store call in progress (unless called
        from it), and close the file.  Idempotent; each step is, so a call
        that an exception (Ctrl-C) cut short is finished by the next one."""
        if self._forks != _forks:  # in a child of fork(): no thread of the parent's is here to wait for
            self._closed, self._tail = True, _Tail(self)
            self._lock = _device_lock(os.fstat(self._fd).st_dev) if self._fd >= 0 else threading.Lock()
            self._forks = _forks  # the lock is the child's own, shared with the persisters it opens
        with self._lock:  # a watcher that starts now sees it closed
            self._closed = True
            watcher = self._tail.watcher
        if watcher is not None:
            watcher.stop()
        self._tail.wait_for_delivery()
        with self._lock:
            # Forgotten before it is closed: a signal lands only after a call returns, and a
            # number kept past its close could name another file by the next close().
            fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)
        self._flush_notes()

    def _note(self, level: str, message: str) -> None:
        self._notes.append((level, "[marshal-persist] %s: %s" % (self.path, message)))

    def _flush_notes(self) -> None:
        """Log what was noted: never while a lock is held, so that a logging
        handler that persists, or just takes long, blocks nothing."""
        while self._notes:
            try:
                level, message = self._notes.pop(0)
            except IndexError:
                return
            _say(self._logger, level, message)

    def _check_open(self) -> None:
        if self._forks != _forks:
            raise ValueError("this DiskPersister was opened before os.fork(); open a new one in the child")
        if self._closed:
            raise ValueError("I/O operation on a closed DiskPersister")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise ValueError("this DiskPersister is read-only")

    # --- opening ------------------------------------------------------------------

    def _open(self) -> int:
        if self.read_only:
            fd = os.open(self.path, os.O_RDONLY)
            if os.path.isdir(self.path):
                os.close(fd)
                raise IsADirectoryError(21, "is a directory, not a log file", self.path)
            return fd
        self._adopt_orphan_temp_file()
        try:
            fd = os.open(self.path, _APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            fd = -1
        if fd < 0:  # outside the handler: an error opening it is not "during" another
            return os.open(self.path, _APPEND)
        os.fchmod(fd, 0o600)
        return fd

    def _temp_files(self) -> List[str]:
        folder, name = os.path.split(self.path)
        hexdigits = set("0123456789abcdef")
        return [os.path.join(folder, entry) for entry in os.listdir(folder)
                if entry.startswith(name + ".") and entry.endswith(".tmp")
                and len(entry) == len(name) + 21 and set(entry[len(name) + 1:-4]) <= hexdigits]

    def _adopt_orphan_temp_file(self) -> None:
        """A log that is missing while a temp file is left: the temp file may
        be the only copy (a recreation cut short by a power loss), so it
        becomes the log."""
        if os.path.lexists(self.path):
            return
        for tmp in self._temp_files():
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return
            except OSError:
                continue
            self._note("warning", "the log was missing; took %s, left by an unfinished write, as the log"
                       % os.path.basename(tmp))
            return

    def _sweep_temp_files(self) -> None:
        """Remove temp files that no process is writing (a writer holds a lock
        on its temp file; this process's own writers hold ``self._lock``)."""
        for tmp in self._temp_files():
            try:
                fd = os.open(tmp, os.O_RDWR)
            except OSError:
                continue
            try:
                _lockf(fd, os.F_TLOCK)
                os.unlink(tmp)
                self._note("info", "removed %s, left by a write that did not finish" % os.path.basename(tmp))
            except OSError:
                pass  # in use by a live process, or not ours to remove
            finally:
                os.close(fd)

    def _refuse_a_file_that_is_no_log(self) -> None:
        """Appending would damage a README or a binary file opened by mistake:
        refuse a file whose first line (within its first MiB) is not a JSON
        object with ``changeType``, before anything is written."""
        head = os.pread(self._fd, _CHUNK, 0).lstrip()
        first, newline, _ = head.partition(b"\n")
        try:
            event = json.loads(first) if first else {"changeType": None}
        except ValueError:
            event = None
        if "changeType" in event if type(event) is dict else not newline and first[:1] == b"{":
            return  # a log, or one whose first line is torn by a crash or too long to look at
        raise ValueError("%s does not look like an event log: its first line is not a JSON object with "
                         "changeType; nothing was written (any_file=True, or --force, writes to it anyway)"
                         % self.path)

    def _probe_lockf(self) -> None:
        try:
            _lockf(self._fd, os.F_LOCK)
            _lockf(self._fd, os.F_ULOCK)
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            self._can_lock = False
            self._note("warning", "the filesystem has no file locks (%s); writers in other "
                       "processes are not kept apart" % exc.strerror)

    # --- following the path -------------------------------------------------------

    def _locked(self, action: Callable[[int, int], T]) -> T:
        """``action(fd, size)`` with ``fd`` the file the path names now and
        its size, under its ``lockf`` lock: a replaced log is reopened, a
        deleted one recreated from this descriptor's live state first.  Call
        with ``self._lock``.  A read-only persister takes no lock and waits
        for a deleted log."""
        while True:
            self._check_open()
            fd = self._fd
            try:  # the lock inside: an interruption as it returns still unlocks
                if self._can_lock:
                    _lockf(fd, os.F_LOCK)
                st = _stat_or_none(self.path)
                if st is not None and _identity(st) == self._ident:
                    if not self._name_synced:  # here, so that the sync cannot widen a race with a compactor
                        _fsync_dir(os.path.dirname(self.path))
                        self._name_synced = True
                    return action(fd, st.st_size)
                new_fd, ours, old_end = self._replacement(fd, st)
                if new_fd is None:  # read-only, and the log is gone: go on with what it was
                    return action(fd, os.fstat(fd).st_size)
                self._switch_to(new_fd, ours, old_end)
            finally:
                if self._can_lock:
                    _lockf(fd, os.F_ULOCK)
                if fd != self._fd:  # switched to a new file (or compaction did)
                    os.close(fd)
                    if self._can_lock:  # one this process wrote comes locked (see _write_durably)
                        _lockf(self._fd, os.F_ULOCK)

    def _replacement(self, fd: int, st: Optional[os.stat_result]) -> Tuple[Optional[int], bool, int]:
        """The descriptor of the file the path names now, whether this
        process wrote it (recreating the deleted log from ``fd``), and how
        much of ``fd`` went into it."""
        old_end = os.fstat(fd).st_size
        if self.read_only:
            try:
                return os.open(self.path, os.O_RDONLY), False, old_end
            except FileNotFoundError:
                return None, False, old_end
        if st is None:
            _make_dirs(os.path.dirname(self.path))
            scan = _scan(fd, self.max_line_bytes, lambda *args: None)
            try:
                new_fd = _write_durably(self.path, (line + b"\n" for line in scan.live.values()), False,
                                        os.fstat(fd))
            except FileExistsError:
                pass  # another process recreated it first
            else:
                self._note("warning", "the log was deleted; recreated it with its %d live entities"
                           % len(scan.live))
                return new_fd, True, scan.end
        self._note("info", "the log was replaced; following the new file")
        return os.open(self.path, _APPEND), False, old_end

    def _switch_to(self, fd: int, ours: bool, old_end: int) -> None:
        """Make ``fd`` the log; ``ours`` if this process wrote it from the
        old file's content up to ``old_end``."""
        old_fd, self._fd, self._ident, self._end = self._fd, fd, _identity(os.fstat(fd)), -1
        self._tail.switched(old_fd, old_end, fd, ours)
        # The new name must be durable before anything is acknowledged (a file this process wrote
        # has its name made durable already); synced under the new file's lock, see _locked.
        self._name_synced = ours or self.read_only

    def _repair_torn_tail(self, fd: int, size: int) -> None:
        """A last line without ``\\n``: terminate it if it is a whole event,
        else, if it is the start of one that a crash cut short, move it to
        ``<log>.torn`` and cut it off.  Other bytes (a file that is no log)
        are left as they are; the next append is not glued to them anyway.
        The open's fsync of the log makes the repair durable."""
        start = _after_last_newline(fd, size)
        if start == size or os.pread(fd, 1, start) != b"{":
            return
        if _Lines(fd, start, self.max_line_bytes, size).unfinished()[2] is not None:
            _write_all(fd, b"\n")
            self._note("info", "terminated the unfinished last line at byte %d" % start)
            return
        self._keep_in_torn_file(fd, [(start, size - start)])
        os.ftruncate(fd, start)
        self._note("warning", "moved a torn last line (%d bytes at byte %d) to %s.torn"
                   % (size - start, start, self.path))

    def _keep_in_torn_file(self, fd: int, ranges: List[Tuple[int, int]]) -> None:
        """Append the byte ranges of ``fd`` that the log cannot use to
        ``<log>.torn`` (0o600), whole, each with a ``\\n``, durably: nothing
        is thrown away silently."""
        torn = os.open(self.path + ".torn", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            for start, length in ranges:
                for chunk in _read_chunks(fd, start, start + length):
                    _write_all(torn, chunk)
                _write_all(torn, b"\n")
            os.fsync(torn)
        finally:
            os.close(torn)
        _fsync_dir(os.path.dirname(self.path))

    def startup_healthcheck(self) -> Optional[str]:
        """What a server should know before it starts: None when the
        directory is writable, the log opens for appending and its lock
        works; else the reason."""
        try:
            self._check_writable()
            if not os.access(os.path.dirname(self.path), os.W_OK):
                return "the directory %s is not writable" % os.path.dirname(self.path)
            with self._lock:
                os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND))
                self._locked(_size)
        except (OSError, ValueError) as exc:
            return "%s: %s" % (type(exc).__name__, exc)
        return None

    # --- persist ------------------------------------------------------------------

    def persist(self, event: Event) -> None:
        """Append ``event`` and return once it is durable; else raise
        PersistError.  An invalid event is refused before anything is
        written.  Concurrent calls share one write and one fdatasync."""
        self._commit([event])

    def persist_batch(self, events: Iterable[Event]) -> None:
        """Append ``events`` with one write and one fdatasync, in order, and
        return once all are durable.  If any is invalid, none is written."""
        if isinstance(events, (dict, str, bytes)):
            raise TypeError("persist_batch takes a list of events, not %s" % type(events).__name__)
        self._commit(list(events))

    def _commit(self, events: List[Event]) -> None:
        """Group commit: every writer adds its lines to the open group, then
        waits for the group's turn lock; the first to get it writes the whole
        group (under the file lock, which closes the group), the others find
        it done, one after another.  Writers wait only in ``with`` blocks on
        locks, never for a particular thread to signal, so an exception
        anywhere (Ctrl-C) cannot leave a writer waiting forever."""
        if self._closed or self.read_only or self._forks != _forks:
            self._check_writable()
        self.health.record_enqueue(len(events))
        try:
            snapshots = [_snapshot(event) for event in events]
            lines = [_encode_event(snap, self.max_line_bytes) for snap in snapshots]
        except PersistError as exc:
            for _ in events:
                self.health.record_dropped(exc.message)
            raise
        if not events:
            return
        mine = (lines, snapshots)
        with self._group_lock:
            group = self._group
            if group is None:
                group = self._group = _Group()
            group.writers.append(mine)
        try:
            with group.turn:
                if not group.taken:
                    with self._lock:
                        self._write_group(group)
        except BaseException:  # Ctrl-C while waiting: events nobody took yet are not written later
            with self._group_lock:
                if not group.taken:
                    group.writers = [writer for writer in group.writers if writer is not mine]
                    for _ in events:
                        self.health.record_error("interrupted before it was written")
            raise
        if self._notes:
            self._flush_notes()
        if isinstance(group.error, ValueError):  # closed meanwhile: misuse, not a failed write
            raise ValueError(str(group.error))
        if group.error is not None:
            raise PersistError(events[0]["itemType"], "write/fsync: %s" % group.error)
        self._tail.deliver()

    def _write_group(self, group: _Group) -> None:
        """Write and sync ``group``; its outcome is in ``group.error``, an
        interruption until the sync succeeded.  Call with ``self._lock``."""
        with self._group_lock:
            group.taken = True
            self._group = None
        # Until the sync returns, the group has failed (see _Group): if this
        # thread is interrupted (Ctrl-C), the writers it covers learn so.
        # After it, an interruption fails nobody: the events are durable.
        count = sum(len(events) for _, events in group.writers)
        try:
            self._locked(lambda fd, size: self._write_and_sync(fd, size, group))
        except (OSError, ValueError) as exc:
            if group.error is _INTERRUPTED:
                group.error = exc
            else:  # after the sync (reading back for the watcher): the events are durable
                self._note("warning", "after a write: %s: %s" % (type(exc).__name__, exc))
        finally:
            if group.error is None:
                self.health.record_success_batch(count)
            elif isinstance(group.error, ValueError):  # see _commit
                self.health.record_enqueue(-count)
            else:
                for _ in range(count):
                    self.health.record_error("write/fsync: %s" % group.error)
                self._note("warning", "could not persist %d events: %s" % (count, group.error))
        if group.error is None and self._compact_at is not None and self._end >= self._compact_at:
            try:  # the events are durable already: a compaction that fails fails no writer
                self._locked(lambda fd, size: self._compact_locked(fd, False))
            except (OSError, ValueError) as exc:
                self._compact_at = None
                self._note("warning", "could not compact: %s" % exc)

    def _write_and_sync(self, fd: int, size: int, group: _Group) -> None:
        """One write and one fdatasync to ``fd`` (``size`` bytes before them),
        then the read side learns what was written.

        Never glue: the byte before the line must be a ``\\n``.  That is known
        after the write, not before it (a writer that does not lock, like the
        Rust daemon, writes its JSON and its ``\\n`` separately, and may have
        written only the first): if it is not, the glued line is left for
        ``.torn``, and a clean copy of the other writer's event (if whole) and
        of ours follows it.

        Failed means absent: each copy is noted before it is written, and on
        any exception before the sync returned (an interruption right after a
        write included) what reached the file is taken back."""
        data = copy = b"".join(line for lines, _ in group.writers for line in lines)
        appended = [copy]
        rescued = []  # type: List[bytes]
        try:
            start, end = _append(fd, copy)
            while end - start != len(copy) or (start and start != self._end
                                               and os.pread(fd, 1, start - 1) != b"\n"):
                fragment_start = _after_last_newline(fd, start)
                _, fragment, event = _Lines(fd, fragment_start, self.max_line_bytes, start).unfinished()
                if event is not None:
                    rescued.append(fragment + b"\n")
                copy = b"".join(rescued) + data
                self._note("warning", "a line that another program was writing without a lock at byte "
                           "%d was cut by this one; wrote both again" % fragment_start)
                appended.append(copy)
                start, end = _append(fd, copy)
            _datasync(fd)
            group.error = None
        except BaseException:
            _cut_back(fd, size, b"".join(appended))
            raise
        self._end = end
        self._tail.wrote(fd, end - len(data), end, group.writers)

    # --- compaction ---------------------------------------------------------------

    def compact(self, force: bool = False) -> Dict[str, Any]:
        """Rewrite the log to its live state, atomically; returns figures.

        The live SET lines, as stored, in the file order of their last
        occurrence, then the latest DELs (see ``_Scan.kept``), go to a
        temp file that replaces the log (the durable rename recipe) with the
        log's mode, owner and group.  Malformed and over-long lines are kept
        whole in ``<log>.torn``.  A log with other hard links is refused, and
        so is a file that does not look like a log (no valid line, or more
        malformed lines than valid ones) unless ``force``.  Both locks are
        held throughout, so every writer that locks waits; lines that
        writers which do not lock append before the swap are carried over,
        after everything else."""
        self._check_writable()
        started = os.times().elapsed
        try:
            with self._lock:
                figures = self._locked(lambda fd, size: self._compact_locked(fd, force))
        finally:
            self._flush_notes()
        figures["seconds"] = round(os.times().elapsed - started, 6)
        self._note("info", "compacted: %(lines_before)d lines, %(bytes_before)d bytes -> "
                   "%(lines_after)d lines, %(bytes_after)d bytes" % figures)
        self._flush_notes()
        self._tail.deliver()
        return figures

    def _compact_locked(self, fd: int, force: bool) -> Dict[str, Any]:
        st = os.fstat(fd)
        if st.st_nlink > 1:
            raise ValueError("%s has %d hard links; compacting would split them (remove the other "
                             "links first)" % (self.path, st.st_nlink))
        bad = []  # type: List[Tuple[int, int]]
        scan = _scan(fd, self.max_line_bytes, lambda _, offset, length, __: bad.append((offset, length)),
                     deletions=True)
        if not force:
            scan.check_looks_like_a_log(self.path)
        carried = []  # type: List[bytes]
        kept = scan.kept()
        read_to = [scan.end]
        saved = [0]  # how many of ``bad`` are in the .torn file

        def late() -> bytes:
            """What writers that do not lock appended since the last look, kept
            after everything else (no key is reordered).  Asked after each sync
            of the copy and once after the rename, until nothing came; bytes to
            keep in ``.torn`` are saved before a look, never after the last."""
            while True:
                lines = _Lines(fd, read_to[0], self.max_line_bytes)
                found = []  # type: List[bytes]
                for offset, line in lines:
                    if line is None:
                        bad.append((offset, lines.end - 1 - offset))
                    elif not _is_blank(line):
                        found.append(line)
                read_to[0] = lines.end
                if not found:  # an unterminated last line: whole, or torn
                    size, fragment, event = lines.unfinished()
                    if event is not None:
                        found.append(fragment)
                    elif size:
                        bad.append((read_to[0], size))
                    read_to[0] += size
                    if not size and os.fstat(fd).st_size > read_to[0]:
                        continue  # whole lines came while it looked: look again
                if found:
                    carried.extend(found)
                    return b"".join(line + b"\n" for line in found)
                if saved[0] == len(bad):
                    return b""
                self._keep_in_torn_file(fd, bad[saved[0]:])
                saved[0] = len(bad)

        new_fd = _write_durably(self.path, (line + b"\n" for line in kept), True, st, late)
        try:  # a writer that had the old file open may have appended to it during the rename
            extra = late()
            while extra:
                _write_all(new_fd, extra)
                _datasync(new_fd)
                extra = late()
        finally:
            self._switch_to(new_fd, True, read_to[0])
        if bad:
            self._note("warning", "kept %s in %s.torn" % (_plural(len(bad), "malformed line"), self.path))
        self._compact_when(os.fstat(new_fd).st_size)
        return {"lines_before": scan.lines + len(carried), "bytes_before": os.fstat(fd).st_size,
                "lines_after": len(kept) + len(carried),
                "bytes_after": os.fstat(new_fd).st_size,
                "live": len(scan.live), "malformed": len(bad)}

    # --- the read path ----------------------------------------------------------------

    def replay(self, apply_batch: ApplyBatch) -> int:
        """Restore the live state: the latest SET of every ``(itemType, id)``
        not deleted since, in the file order of that line, marked
        ``preventPersist`` and ``preventRelationshipUpdates``, handed to
        ``apply_batch`` in one call.  Returns what ``apply_batch`` returned
        (anything but an int counts as all).  Malformed lines are skipped and
        logged; an exception from ``apply_batch`` propagates.  A watcher
        started afterwards goes on from where the replay ended.
        """
        scan = self._replay_scan()
        events = scan.events()
        applied = apply_batch(events)
        return applied if type(applied) is int else len(events)

    def _replay_scan(self) -> _Scan:
        self._check_open()  # before the lock, which may be a parent's (see _after_fork_in_child)
        try:
            with self._lock:
                size = self._locked(_size)  # what is durable, see _Tail.poll
                scan = _scan(self._fd, self.max_line_bytes, self._skipped, stop=size)
                self._tail.start(scan)
        finally:
            self._flush_notes()
        if self.compact_ratio is not None and not self.read_only and scan.end > _COMPACT_ABOVE \
                and scan.end >= self.compact_ratio * scan.live_bytes():
            self.compact()
        elif self.compact_ratio is not None:
            self._compact_when(scan.live_bytes())
        self._note("info", "replayed %s: %d malformed, %d live"
                   % (_plural(scan.lines, "line"), scan.malformed, len(scan.live)))
        self._flush_notes()
        return scan

    def _compact_when(self, size: int) -> None:
        """With ``compact_ratio``, the persist that makes the log that many
        times ``size`` (its size at open, its live state at the last replay
        or its size after the last compaction), and over 1 MiB, compacts it."""
        if self.compact_ratio is not None and not self.read_only:
            self._compact_at = max(_COMPACT_ABOVE, int(self.compact_ratio * size))

    def _skipped(self, lineno: int, offset: int, length: int, reason: str) -> None:
        self._note("warning", "skipped line %d (byte %d): %s" % (lineno, offset, reason))

    def start_watcher(self, apply_batch: ApplyBatch, interval: float = 0.15, lines: bool = False) -> Watcher:
        """Follow the file in a daemon thread, from where ``replay`` ended (or
        from its current end); see ``Watcher``.  With ``lines=True``,
        ``apply_batch`` gets the lines as stored instead of events."""
        if not interval > 0:
            raise ValueError("interval must be a positive number of seconds")
        self._check_open()
        watcher = Watcher(self, apply_batch, interval, lines)
        with self._lock:
            size = self._locked(_size)
            self._tail.follow(watcher, self._fd, size)
            watcher._thread.start()
        return watcher


# --- the read path: lines, scans --------------------------------------------------


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
    ``start`` to ``stop`` (or EOF), each without its ``\\n``.  A line longer than
    ``max_line`` comes as ``(offset, None)`` and is never held whole.  ``end``
    is always just past the last line yielded, so a caller knows exactly what
    it has consumed even while others append; ``unfinished()`` tells what
    follows it.  Every reader of the log goes through this class."""

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

    def unfinished(self) -> Tuple[int, bytes, Optional[Event]]:
        """The size of what follows ``end`` (to ``stop`` or EOF) without a
        ``\\n``, its bytes, and its event if it is a whole one that only lacks
        the ``\\n`` (else it is torn).  Over ``max_line`` bytes, it is not read."""
        stop = os.fstat(self.fd).st_size if self.stop is None else self.stop
        size = max(0, stop - self.end)
        if not 0 < size <= self.max_line:
            return size, b"", None
        fragment = os.pread(self.fd, size, self.end)
        if b"\n" in fragment:  # whole lines were appended since the iteration ended: none is unfinished
            return 0, b"", None
        return size, fragment, _parse_line(fragment)[0]


def _after_last_newline(fd: int, end: int, floor: int = 0) -> int:
    """The offset just past the last ``\\n`` of ``fd`` in ``[floor, end)``, or
    ``floor`` if there is none."""
    pos = end
    while pos > floor:
        size = min(1 << 16, pos - floor)
        found = os.pread(fd, size, pos - size).rfind(b"\n")
        if found >= 0:
            return pos - size + found + 1
        pos -= size
    return floor


def _line_before(fd: int, end: int, max_line: int) -> bytes:
    """The line that ends just before ``end`` with its ``\\n``; empty at the
    start of the file, or when it is longer than ``max_line`` (never read whole)."""
    floor = max(0, end - 2 - max_line)
    start = _after_last_newline(fd, end - 1, floor) if end else 0
    return b"" if start == floor > 0 else os.pread(fd, end - start, start)


class _Scan:
    """A pass over a log: the live lines by key, in the file order of their
    last occurrence; counts; and where the complete lines end.  With
    ``deletions``, also the last line of every key whose last word is a DEL,
    in the same order."""

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

    def kept(self) -> List[bytes]:
        """What compaction keeps: the live lines, then the most recent DELs,
        as many as there are live entities (at least 1,000).  A watcher that
        never saw the file a DEL was written to (it was replaced twice between
        two looks) learns of the deletion from them; it can miss one only if
        more deletions than that came in between."""
        assert self.deleted is not None
        return list(self.live.values()) + list(self.deleted.values())[-max(_TOMBSTONES, len(self.live)):]

    def check_looks_like_a_log(self, path: str) -> None:
        """Compaction's refusal of a file that is no log: no valid line, or
        more malformed lines than valid ones."""
        valid = self.lines - self.malformed
        if self.lines and (not valid or self.malformed > valid):
            raise ValueError("%s does not look like an event log: %d of its %d lines are malformed; compact "
                             "it anyway with force=True (--force)" % (path, self.malformed, self.lines))

    def live_bytes(self) -> int:
        """The size of a log holding only the live lines."""
        return sum(len(line) + 1 for line in self.live.values())

    def entries(self) -> List[Entry]:
        """The live lines (then any deletions), parsed again (they were checked)."""
        lines = list(self.live.values())
        if self.deleted:
            lines += self.deleted.values()
        return [(line, _decode_valid(line), "restored") for line in lines]

    def events(self) -> List[Event]:
        """The live events, marked as restored."""
        return [_mark(event, how) for _, event, how in self.entries()]


def _scan(fd: int, max_line: int, on_malformed: Callable[[int, int, int, str], None],
          deletions: bool = False, stop: Optional[int] = None) -> _Scan:
    """Stream the file once (to ``stop``), deduplicating as it goes;
    ``on_malformed(lineno, offset, length, reason)`` hears of each bad line."""
    scan = _Scan(deletions)
    lines = _Lines(fd, 0, max_line, stop)
    line = None  # type: Optional[bytes]
    for lineno, (offset, line) in enumerate(lines, 1):
        if line is None:
            event, reason = None, "longer than %d bytes" % max_line
        elif line[:1] != b"{" and _is_blank(line):
            continue
        else:
            event, reason = _parse_line(line)
        scan.lines += 1
        if event is None:
            scan.malformed += 1
            on_malformed(lineno, offset, lines.end - 1 - offset, reason)
        else:
            scan.keep(event, line)  # type: ignore[arg-type]
    scan.end = lines.end
    scan.last = line + b"\n" if line is not None else b""
    return scan


# --- the read path: following ---------------------------------------------------


class _Tail:
    """Everything the read side knows of the log, and all the code that reads
    it for a store and hands it over.

    ``pos`` is where reading stopped, just past a complete line (None until
    a replay or a watcher places it); ``last`` is the line before it, to see a
    file rewritten in place; ``size``, the file's size at the last look, so
    that a file that did not change is not read; ``reload_due``, that the log
    is now a file this process did not write.  ``queue`` holds ``(line,
    event, how)`` read but not yet handed over; ``keys``, what the store was
    given.  The writer tells it, under the persister's lock, only what it
    wrote (``wrote``) and that the log is another file (``switched``); the
    watcher's thread calls ``poll``; ``deliver`` hands the queue over.
    ``_read`` is the one place that moves ``pos`` forward, and it looks for a
    truncation first, so it is seen whoever moves first."""

    def __init__(self, persister: DiskPersister) -> None:
        self._p = persister
        self.pos = None  # type: Optional[int]
        self.last = b""
        self.size = -1
        self.reload_due = False
        self.queue = []  # type: List[Entry]
        self.keys = set()  # type: set[Key]
        self.watcher = None  # type: Optional[Watcher]
        self._deliver_lock = threading.Lock()
        self._deliverer = None  # type: Optional[int]

    def start(self, scan: _Scan) -> None:
        """A replay read the file to ``scan.end``: follow from there."""
        self.pos, self.last, self.keys = scan.end, scan.last, set(scan.live)
        self.size, self.reload_due = -1, False

    def follow(self, watcher: Watcher, fd: int, size: int) -> None:
        """Hand what is read to ``watcher`` from now on; without a replay,
        from the file's last complete line (``size``, noted under the lock)."""
        if self.watcher is not None:
            raise RuntimeError("a watcher is already running for %s" % self._p.path)
        if self.pos is None:
            self.pos = _after_last_newline(fd, size)
            self.last, self.size = _line_before(fd, self.pos, self._p.max_line_bytes), size
        self.watcher = watcher

    def wrote(self, fd: int, start: int, end: int, writers: List[Tuple[List[bytes], List[Event]]]) -> None:
        """This process wrote and synced the ``(lines, events)`` of ``writers``
        at ``[start, end)``, under the lock: what others wrote before them is
        read first."""
        if self.watcher is None or self.pos is None:
            return  # read when a watcher starts, as lines of the file
        self._read(fd, start)
        for lines, events in writers:
            self.queue += zip(lines, events, ["own"] * len(lines))
            self.keys.update(map(_key, events))
        self.pos, self.last = end, writers[-1][0][-1]

    def switched(self, old_fd: int, old_end: int, new_fd: int, ours: bool) -> None:
        """The log is ``new_fd`` now.  While following, the old file's unread
        lines up to ``old_end`` come first (read under its lock, so they are
        durable); a new file that this process wrote holds what the store is
        given already, any other is reloaded at the next read."""
        if self.pos is None:
            return
        if self.watcher is not None:
            self._read(old_fd, old_end)
        if ours and self.watcher is not None:
            self.pos = os.fstat(new_fd).st_size
            self.last = _line_before(new_fd, self.pos, self._p.max_line_bytes)
        else:
            self.reload_due = True
        self.size = -1

    def poll(self) -> None:
        """One look at the file, from the watcher's thread.  A file whose
        identity and size did not change costs one ``stat``.  Otherwise its
        size is noted under its ``lockf`` lock, which no writer that locks
        holds mid-write: every byte below it was written by one that finished
        (synced, or cut back).  It is read up to there after the lock is
        released, so that a long parse holds no other process back."""
        p = self._p
        st = _stat_or_none(p.path)
        if st is not None and _identity(st) == p._ident and st.st_size == self.size:
            return
        with p._lock:
            if self.watcher is None:
                return
            size = p._locked(_size)  # follows a replaced or deleted log
            self._read(p._fd, size)
            self.size = size
        p._flush_notes()
        self.deliver(wait=False)

    def _read(self, fd: int, stop: int) -> None:
        """Queue the events of the complete lines from ``pos`` to ``stop``; a
        file that replaced the one read, shrank below ``pos`` or changed
        before it is reloaded instead."""
        assert self.pos is not None
        pos, last = self.pos, self.last
        if self.reload_due or stop < pos or last and os.pread(fd, len(last), pos - len(last)) != last:
            if not self.reload_due:
                self._p._note("warning", "truncated or rewritten in place (was %d bytes, now %d); reloading"
                              % (pos, stop))
            self._reload(fd, stop)
            return
        lines = _Lines(fd, pos, self._p.max_line_bytes, stop)
        line = None  # type: Optional[bytes]
        for offset, line in lines:
            if line is not None and _is_blank(line):
                continue
            event, reason = _parse_line(line) if line is not None else (None, "line too long")
            if event is None:
                if self.watcher is not None:
                    self.watcher.malformed += 1
                self._p._note("warning", "skipped the line at byte %d: %s" % (offset, reason))
            else:
                self.queue.append((line, event, "tailed"))  # type: ignore[arg-type]
                self.keys.add(_key(event))
        if lines.end != pos:
            self.pos, self.last = lines.end, (line + b"\n" if line is not None else b"")

    def _reload(self, fd: int, stop: int) -> None:
        """Queue the live entities of the file to ``stop`` and the DELs it
        records; entities it no longer mentions stay in the store, as in the Rust."""
        scan = _scan(fd, self._p.max_line_bytes, self._p._skipped, deletions=True, stop=stop)
        assert scan.deleted is not None
        kept = len(self.keys - set(scan.live) - set(scan.deleted))
        self.queue += scan.entries()
        self.keys = set(scan.live)
        self.pos, self.last, self.reload_due = scan.end, scan.last, False
        if self.watcher is not None:
            self.watcher.reloads += 1
            self.watcher.malformed += scan.malformed
        self._p._note("info", "reloaded the log: %d live entities; %d entities it no longer mentions "
                      "stay in the store" % (len(scan.live), kept))

    def deliver(self, wait: bool = True) -> None:
        """Hand the queue to the store, in file order, one call at a time.
        An entry leaves the queue only once the call that got it returned,
        so an exception anywhere (Ctrl-C) loses nothing: the next delivery
        hands it over.  A store call that persists does not call the store
        again from inside itself, and the watcher's thread does not wait (a
        store call on a writer's thread may be stopping it): the running
        delivery hands over what they added."""
        if self.watcher is None or self._deliverer == threading.get_ident():
            return
        if wait:
            with self._deliver_lock:
                self._deliver_all()
        elif self._deliver_lock.acquire(blocking=False):  # no Ctrl-C reaches this thread
            try:
                self._deliver_all()
            finally:
                self._deliver_lock.release()
        self._p._flush_notes()

    def _deliver_all(self) -> None:
        self._deliverer = threading.get_ident()
        try:
            while True:
                entries = self.queue[:]  # appended to under the persister's lock; taken from the front only
                watcher = self.watcher
                if not entries or watcher is None:
                    return
                watcher._hand_over(entries)
                del self.queue[:len(entries)]
        finally:
            self._deliverer = None

    def wait_for_delivery(self) -> None:
        """Return once no store call is in progress (at once from inside one)."""
        if self._deliverer != threading.get_ident():
            with self._deliver_lock:
                pass


# --- the watcher ------------------------------------------------------------


class Watcher:
    """A daemon thread that polls the log every ``interval`` seconds; its
    persister's read side hands the store, through ``apply_batch``, every
    event of the file in file order, this process's own ones included, before
    ``persist`` returns (see the README for replaced, truncated and deleted
    files).  With ``lines=True``, ``apply_batch`` gets the lines as stored
    (bytes without ``\\n``) instead of events.  Nothing kills the thread: a
    store that raises, a malformed line, an I/O error is logged and counted
    in ``errors`` or ``malformed``; ``applied`` counts events handed to the
    store, ``reloads`` full reloads.
    """

    def __init__(self, persister: DiskPersister, apply_batch: ApplyBatch, interval: float,
                 lines: bool = False) -> None:
        self.interval = interval
        self.applied = 0
        self.malformed = 0
        self.errors = 0
        self.reloads = 0
        self._persister = persister
        self._apply_batch = apply_batch
        self._lines = lines
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
        """End the thread, after the store call it may be making.  Idempotent."""
        self._stopping.set()
        p = self._persister
        if p._forks != _forks:
            return  # in a child of fork(): the thread and its locks stayed with the parent
        if self._thread is not threading.current_thread() and self._thread.ident is not None:
            self._thread.join()
        with p._lock:  # last: a stop cut short is still this persister's watcher, stopped again by close
            if p._tail.watcher is self:
                p._tail.watcher = None

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                self._persister._tail.poll()
            except BaseException as exc:  # I/O errors above all, a store's SystemExit: none ends the thread
                self.errors += 1
                self._persister._note("warning", "watcher: %s: %s" % (type(exc).__name__, exc))
                self._persister._flush_notes()

    def _hand_over(self, entries: List[Entry]) -> None:
        if self._lines:  # own lines come with their \n
            batch = [line.rstrip(b"\n") for line, _, _ in entries]  # type: List[Any]
        else:  # own events are parsed from their lines: the caller may change its dicts afterwards
            batch = [_mark(json.loads(line) if how == "own" else event, how) for line, event, how in entries]
        try:
            applied = self._apply_batch(batch)
        except Exception as exc:  # the store's failure must not end the thread or fail a persist
            self.errors += 1
            self._persister._note("warning", "watcher: apply_batch failed on %d events: %r"
                                  % (len(batch), exc))
            return
        self.applied += applied if type(applied) is int else len(batch)

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


class _OutputError(Exception):
    """Standard output could not be written (not the log's fault)."""


class _Output:
    """Standard output, whose write errors are told apart from the log's."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str = "") -> None:
        try:
            if text:
                self.stream.write(text)
            else:
                self.stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _OutputError(exc.strerror or str(exc)) from None

    flush = write


class _WarningsTo:
    """A logger that writes warnings, one a line, to a text stream."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def warning(self, message: str) -> None:
        self.stream.write(message + "\n")
        self.stream.flush()

    def info(self, message: str) -> None:
        pass


def _plural(count: int, word: str) -> str:
    return "%d %s%s" % (count, word, "" if count == 1 else "es" if word.endswith("s") else "s")


def _read_log(path: str, on_malformed: Callable[[int, int, int, str], None],
              deletions: bool = False) -> Tuple[_Scan, str]:
    """Scan the log read-only, as a writer would see it after its torn-tail
    repair; the second value describes an unterminated last line, if any."""
    with DiskPersister(path, read_only=True) as reader:
        fd = reader._fd
        scan = _scan(fd, _DEFAULT_MAX_LINE, on_malformed, deletions)
        size, fragment, event = _Lines(fd, scan.end, _DEFAULT_MAX_LINE).unfinished()
    if not size:
        return scan, ""
    if event is None:
        return scan, "torn tail at byte %d: %d bytes of an unfinished write" % (scan.end, size)
    scan.keep(event, fragment)
    scan.lines += 1
    return scan, "the last line (byte %d) is a whole event without its newline" % scan.end


def _count_by_type(keys: Iterable[Key]) -> Dict[str, int]:
    counts = {}  # type: Dict[str, int]
    for item_type, _ in keys:
        counts[item_type] = counts.get(item_type, 0) + 1
    return dict(sorted(counts.items()))


def _cli_replay(args: Any, out: _Output, err: Any) -> int:
    scan, tail_note = _read_log(args.path, lambda *_: None)
    keys = [key for key in scan.live if args.type is None or key[0] == args.type]
    counts = _count_by_type(keys)
    if args.summary:
        for item_type, count in counts.items():
            out.write("%s\t%d\n" % (item_type, count))
        return 0
    for key in keys:
        out.write(scan.live[key].decode("utf-8") + "\n")
    out.flush()
    per_type = ", ".join("%s %d" % pair for pair in counts.items())
    err.write("%s: %s, %d malformed, %d live%s\n" % (args.path, _plural(scan.lines, "line"), scan.malformed,
                                                   len(keys), " (%s)" % per_type if per_type else ""))
    if tail_note:
        err.write("note: %s\n" % tail_note)
    return 0


def _cli_check(args: Any, out: _Output, err: Any) -> int:
    problems = []  # type: List[str]
    scan, tail_note = _read_log(args.path, lambda lineno, offset, length, reason: problems.append(
        "line %d (byte %d): %s\n" % (lineno, offset, reason)))
    torn = tail_note.startswith("torn")
    status = 1 if scan.malformed or torn else 0
    args.status = status  # what a closed pipe still reports
    for problem in problems:
        out.write(problem)
    if tail_note:
        out.write(tail_note + "\n")
    out.write("%s: %s, %d malformed%s: %s\n" % (
        args.path, _plural(scan.lines, "line"), scan.malformed, ", torn tail" if torn else "",
        "problems found" if status else "clean"))
    if os.path.exists(args.path + ".torn"):
        out.write("%s.torn: %d bytes set aside from this log (nothing reads it; inspect it, then delete it)\n"
                  % (args.path, os.path.getsize(args.path + ".torn")))
    return status


def _cli_follow(args: Any, out: _Output, err: Any) -> int:
    import select
    import sys

    failed = []  # type: List[BaseException]

    def show(lines: List[bytes]) -> None:
        if failed:
            return
        try:
            for line in lines:
                if args.type is None or json.loads(line)["itemType"] == args.type:
                    out.write(line.decode("utf-8") + "\n")
            out.flush()
        except (OSError, _OutputError) as exc:  # a closed pipe above all: the command ends
            failed.append(exc)

    with DiskPersister(args.path, logger=_WarningsTo(err), read_only=True) as persister:
        scan = persister._replay_scan()
        if not args.changes_only:
            show(list(scan.live.values()))
        err.write("%s: %d live; following (Ctrl-C to stop)\n" % (args.path, len(scan.live)))
        err.flush()
        # Like tail -f, end once the reader of the output is gone, without waiting for a line
        # to fail on: with no events asked for, poll reports only an error or a hang-up.
        output = select.poll()
        output.register(sys.stdout.fileno(), 0)
        with persister.start_watcher(show, args.interval, lines=True):
            while not failed:  # until Ctrl-C (see main)
                if output.poll(500):
                    raise BrokenPipeError(32, "the reader of the output went away")
        raise failed[0]


def _cli_compact(args: Any, out: _Output, err: Any) -> int:
    if args.dry_run:
        scan, _ = _read_log(args.path, lambda *_: None, deletions=True)
        if not args.force:
            scan.check_looks_like_a_log(args.path)
        kept = scan.kept()
        out.write("%s: would compact %s, %d bytes -> %s, %d bytes (dry run: nothing changed)\n"
                  % (args.path, _plural(scan.lines, "line"), scan.end, _plural(len(kept), "line"),
                     sum(len(line) + 1 for line in kept)))
        return 0
    os.stat(args.path)  # never create the log it was asked to compact: a missing one is an error
    if os.path.isdir(args.path):
        raise IsADirectoryError(21, "is a directory, not a log file", args.path)
    with DiskPersister(args.path, logger=_WarningsTo(err), any_file=args.force) as persister:
        figures = persister.compact(force=args.force)
    out.write("%s: %s, %d bytes -> %s, %d bytes in %.3f s\n" % (
        args.path, _plural(figures["lines_before"], "line"), figures["bytes_before"],
        _plural(figures["lines_after"], "line"), figures["bytes_after"], figures["seconds"]))
    return 0


def _cli_append(args: Any, out: _Output, err: Any) -> int:
    import sys

    if args.event is not None and not args.event.strip():
        raise _BadInput("the event is empty")
    try:  # split on \n alone: the module writes U+2028, U+0085 and the like raw inside strings
        texts = [args.event] if args.event is not None else sys.stdin.buffer.read().decode().split("\n")
    except UnicodeDecodeError as exc:
        raise _BadInput("the input is not UTF-8: %s" % exc) from None
    events = []  # type: List[Event]
    for number, text in enumerate(texts, 1):
        if not text.strip():
            continue
        where = "the event" if args.event is not None else "input line %d" % number
        try:
            event = json.loads(text)
        except ValueError as exc:
            raise _BadInput("%s is not JSON: %s" % (where, exc)) from None
        if type(event) is dict and type(event.get("options")) is dict:
            event["options"].pop("own", None)  # the reader's mark, as replay prints it: never persisted
        try:
            _encode_event(_snapshot(event), _DEFAULT_MAX_LINE)
        except PersistError as exc:
            raise _BadInput("%s: %s" % (where, exc.message)) from None
        events.append(event)
    with DiskPersister(args.path, logger=_WarningsTo(err), any_file=args.force) as persister:
        persister.persist_batch(events)
    out.write("appended %s to %s\n" % (_plural(len(events), "event"), args.path))
    return 0


class _BadInput(Exception):
    """What ``append`` was given is not an event."""


def _positive_seconds(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number of seconds, not %r" % text)
    return value


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: ``marshal-persist replay|check|follow|compact|append [PATH]``.

    Returns the exit status: 0 done (``check``: clean), 1 ``check`` found
    problems, 2 the log could not be read or written, or bad input."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="marshal-persist",
        description="Inspect, compact or append to a marshal events.jsonl log. replay, check and "
                    "follow only read: they never create, repair or lock the file. PATH defaults "
                    "to %s." % default_log_path())
    parser.add_argument("-V", "--version", action="version", version="%(prog)s " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    sub = {}  # type: Dict[str, argparse.ArgumentParser]
    sub["replay"] = commands.add_parser(
        "replay", help="print the live entities as JSONL",
        description="Print the live entities (the surviving SET lines, as stored) as JSONL on "
                    "stdout and a summary (lines, malformed, live per itemType) on stderr.")
    sub["replay"].add_argument("--summary", action="store_true",
                               help="print only the live count per itemType, one 'TYPE<TAB>N' a line")
    sub["check"] = commands.add_parser(
        "check", help="list malformed lines and a torn tail",
        description="List every malformed line (number, byte offset, reason) and a torn last "
                    "line. Exit 1 when it found any, 0 when the log is clean.")
    sub["follow"] = commands.add_parser(
        "follow", help="print the live entities, then every change",
        description="Print the live entities (as replay does), then every line appended to the "
                    "log, as stored, until Ctrl-C; after the log is replaced or truncated, its "
                    "live entities and recorded deletions again.")
    sub["follow"].add_argument("--changes-only", action="store_true", help="skip the live entities")
    sub["follow"].add_argument("--interval", type=_positive_seconds, default=0.15, metavar="SECONDS",
                               help="how often to poll the file (default: 0.15)")
    sub["compact"] = commands.add_parser(
        "compact", help="rewrite the log to its live state",
        description="Rewrite the log to its live entities and print lines and bytes before and "
                    "after. Atomic: a crash leaves the old log or the new one. Malformed lines go "
                    "to PATH.torn. Safe beside any program that writes through marshal-persist; "
                    "stop programs that append without its lock (the Rust marshal-daemon, a "
                    "shell >>) first: what they write during the swap can be lost.")
    sub["compact"].add_argument("--dry-run", action="store_true",
                                help="print what it would do and change nothing")
    sub["compact"].add_argument("--force", action="store_true",
                                help="compact even a file that does not look like an event log")
    sub["append"] = commands.add_parser(
        "append", help="append events read from stdin (JSON lines), durably",
        description="Validate events given as JSON lines on stdin (or one with --event) and "
                    "append them with the log's lock and an fsync; print how many. Any invalid "
                    "event: exit 2 and nothing is written. Use it instead of `echo ... >> log`, "
                    "which can be lost to a compaction.")
    sub["append"].add_argument("--event", "-e", metavar="JSON",
                               help="append this one event instead of reading stdin")
    sub["append"].add_argument("--force", action="store_true",
                               help="append even to a file whose first line is not an event")
    for command in sub.values():
        command.add_argument("path", nargs="?", metavar="PATH", help="the log")
    for name in ("replay", "follow"):
        sub[name].add_argument("--type", metavar="T", help="only entities whose itemType is T")
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub[args.command].error("unrecognized arguments: %s" % " ".join(extra))
    if args.path == "":
        sub[args.command].error("PATH is empty (leave it out for %s)" % default_log_path())
    args.path = args.path or default_log_path()
    args.status = 0
    run = {"replay": _cli_replay, "check": _cli_check, "follow": _cli_follow,
           "compact": _cli_compact, "append": _cli_append}[args.command]
    out = _Output(sys.stdout)
    try:
        status = run(args, out, sys.stderr)
        out.flush()
        return status
    except BrokenPipeError:  # a reader such as `head` went away: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(args.status)
    except _OutputError as exc:
        sys.stderr.write("marshal-persist: cannot write the output: %s\n" % exc)
    except _BadInput as exc:
        sys.stderr.write("marshal-persist: %s\n" % exc)
    except (ValueError, PersistError) as exc:
        sys.stderr.write("marshal-persist: %s\n" % exc)
    except OSError as exc:
        sys.stderr.write("marshal-persist: %s: %s\n" % (exc.filename or args.path, exc.strerror or exc))
    except KeyboardInterrupt:  # the way to stop follow; anything else was cut short
        return 0 if args.command == "follow" else 130
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
