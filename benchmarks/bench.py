"""Hold marshal_persist against the limits of this machine and against the
durable stores a Python program would use instead.

    python benchmarks/bench.py                # the full run (about 5 minutes)
    python benchmarks/bench.py --quick        # a smaller run, about a minute
    python benchmarks/bench.py --check-sync   # strace: does every store sync per write?

Every figure is the median of several rounds, and in every round each system
runs once, one after another, so that a slow phase of a noisy disk hits them
all alike: the ratios are the result, not the absolute numbers.  The peers
(LevelDB, LMDB, RocksDB, apsw; see requirements.txt) are optional: a missing
one is skipped with a note.  marshal_persist itself is used through its
public API only.

Durability is the same for every system: a write counts only once it is on
disk.  How that was checked (``--check-sync`` repeats it): each system makes
0 and then 200 single writes from one thread in a child process under
``strace -f -c -e trace=fsync,fdatasync,msync,sync_file_range``; the
difference of the two counts over 200 must be at least 1.  Found here
(Linux 6.18, ext4, strace 6.1, the versions in requirements.txt): the bare
loop, persist, LevelDB put(sync=True), LMDB with a txn per write, sqlite3
and apsw in WAL mode with synchronous=FULL: 1.00 fdatasync per write;
RocksDB with WriteOptions.sync: 1.01 fdatasync and 0.01 fsync per write.
LMDB also writes its meta page through a second descriptor opened with
O_DSYNC (seen with strace -e trace=openat,pwrite64).  The stores' default
settings are kept otherwise (LevelDB and RocksDB compress their tables).
"""

import argparse
import json
import os
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

TMPFS = "/dev/shm"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import marshal_persist as mp  # noqa: E402

SYNC_CALLS = ("fsync", "fdatasync", "msync", "sync_file_range")
CHUNK = 1000  # events per durable chunk when the recovery history is written


def event(rng, entities, n, delete_share=0.05):
    entity = rng.randrange(entities)
    kind = "Session" if entity % 4 == 0 else "Message"
    change = "DEL" if rng.random() < delete_share else "SET"
    item = {"id": "%s-%06d" % (kind[0].lower(), entity), "n": n,
            "state": rng.choice(("sent", "delivered", "read")), "from": "s-%04d" % rng.randrange(500)}
    item["body"] = "x" * max(0, 64 - len(json.dumps(item)))  # about 200 bytes a line
    return {"item": item, "changeType": change, "itemType": kind,
            "createdAt": "2026-11-28T12:00:00.000000000+00:00", "tx": "t%d" % n, "sourceId": None}


def dumps(e):
    return json.dumps(e, separators=(",", ":"), ensure_ascii=False)


ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # dumps() builds one per call


def encode(e):
    """One log line, as the format defines it (compact JSON, UTF-8, newline)."""
    return ENCODER.encode(e).encode() + b"\n"


def key_of(e):
    return "%s/%s" % (e["itemType"], e["item"]["id"])


def latest_per_key(events):
    latest = {}
    for e in events:
        if e["changeType"] == "SET":
            latest[key_of(e)] = e
        else:
            latest.pop(key_of(e), None)
    return latest


def interleaved_times(runs, methods):
    """Median seconds of each method over ``runs`` rounds in which every
    method runs once, in order.  ``methods`` maps a name to a function that
    prepares a run and returns ``(work, cleanup)``; only ``work()`` is timed."""
    times = {name: [] for name in methods}
    for _ in range(runs):
        for name, prepare in methods.items():
            work, cleanup = prepare()
            start = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - start)
            cleanup()
    return {name: statistics.median(values) for name, values in times.items()}


def interleaved_rates(runs, count, methods):
    """Events per second of each method: ``count`` over its median time."""
    return {name: count / seconds for name, seconds in interleaved_times(runs, methods).items()}


def in_threads(work, parts):
    """Run ``work(part)`` for each part in its own thread and wait for all."""
    workers = [threading.Thread(target=work, args=(part,)) for part in parts]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def fresh(folder, name):
    path = os.path.join(folder, name)
    for leftover in (path, path + "-wal", path + "-shm"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    return path


def fresh_dir(folder, name):
    path = os.path.join(folder, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def disk_bytes(folder):
    """Space the files under ``folder`` take on disk (allocated blocks)."""
    total = 0
    for parent, _, names in os.walk(folder):
        for name in names:
            total += os.lstat(os.path.join(parent, name)).st_blocks * 512
    return total


def durable_copy(source, target):
    """Copy a closed store and fsync the copy, so that no writeback of it is
    left to run while its recovery is timed (its pages stay cached)."""
    shutil.copytree(source, target)
    for parent, _, names in os.walk(target):
        for name in names:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


# --- the stores -------------------------------------------------------------------------------------
#
# Each keeps the latest value of every key (itemType/id) in a folder of its own.  ``writers(n)``
# gives n functions, one per thread, each of which makes one event durable and returns;
# ``write_chunk`` makes a list of events durable at once (the history for the recovery figures);
# ``load`` reads everything into a dict, the latest event per key, decoded, as a replay does.


class Persist:
    label = "marshal_persist"
    needs = None

    def __init__(self, folder, compact_ratio=None, module=mp):  # module: another copy, for compare.py
        self.log = module.DiskPersister(os.path.join(folder, "events.jsonl"), compact_ratio=compact_ratio)

    def writers(self, threads):
        return [self.log.persist] * threads

    def write_chunk(self, events):
        self.log.persist_batch(events)

    def load(self):
        latest = {}

        def apply_batch(events):
            latest.update({(e["itemType"], e["item"]["id"]): e for e in events})
        self.log.replay(apply_batch)
        return latest

    def close(self):
        self.log.close()


class LevelDB:
    label = "LevelDB (plyvel), put(sync=True)"
    needs = "plyvel"

    def __init__(self, folder):
        import plyvel
        self.db = plyvel.DB(folder, create_if_missing=True)

    def writers(self, threads):
        put = self.db.put

        def write(e):
            put(key_of(e).encode(), dumps(e).encode(), sync=True)
        return [write] * threads

    def write_chunk(self, events):
        with self.db.write_batch(sync=True) as batch:
            for e in events:
                if e["changeType"] == "SET":
                    batch.put(key_of(e).encode(), dumps(e).encode())
                else:
                    batch.delete(key_of(e).encode())

    def load(self):
        return {key: json.loads(value) for key, value in self.db}

    def close(self):
        self.db.close()


class LMDB:
    label = "LMDB (py-lmdb), sync=True, a txn per write"
    needs = "lmdb"

    def __init__(self, folder):
        import lmdb
        self.env = lmdb.open(folder, map_size=1 << 30, sync=True, metasync=True)

    def writers(self, threads):
        begin = self.env.begin

        def write(e):
            with begin(write=True) as txn:
                txn.put(key_of(e).encode(), dumps(e).encode())
        return [write] * threads

    def write_chunk(self, events):
        with self.env.begin(write=True) as txn:
            for e in events:
                if e["changeType"] == "SET":
                    txn.put(key_of(e).encode(), dumps(e).encode())
                else:
                    txn.delete(key_of(e).encode())

    def load(self):
        with self.env.begin() as txn:
            return {key: json.loads(value) for key, value in txn.cursor()}

    def close(self):
        self.env.close()


class RocksDB:
    label = "RocksDB (rocksdict), WriteOptions sync"
    needs = "rocksdict"

    def __init__(self, folder):
        import rocksdict
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        self.db = rocksdict.Rdict(folder, options)
        self.sync = rocksdict.WriteOptions()
        self.sync.sync = True
        self.new_batch = lambda: rocksdict.WriteBatch(raw_mode=True)

    def writers(self, threads):
        put, sync = self.db.put, self.sync

        def write(e):
            put(key_of(e).encode(), dumps(e).encode(), sync)
        return [write] * threads

    def write_chunk(self, events):
        batch = self.new_batch()
        for e in events:
            if e["changeType"] == "SET":
                batch.put(key_of(e).encode(), dumps(e).encode())
            else:
                batch.delete(key_of(e).encode())
        self.db.write(batch, self.sync)

    def load(self):
        return {key: json.loads(value) for key, value in self.db.items()}

    def close(self):
        self.db.close()


UPSERT = "INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)"
SCHEMA = "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID"


class SQLite:
    """sqlite3 in WAL mode, synchronous=FULL (the WAL is synced at every
    commit), autocommit: each write is its own transaction."""

    label = "sqlite3 WAL synchronous=FULL, a connection per thread"
    needs = "sqlite3"
    shared = False

    def __init__(self, folder):
        self.path = os.path.join(folder, "kv.sqlite")
        self.db = self.connect()
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(SCHEMA)
        self.more = []

    def connect(self):
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA synchronous=FULL")
        return db

    def writers(self, threads):
        if self.shared:
            db, lock = self.db, threading.Lock()

            def write(e):
                with lock:
                    db.execute(UPSERT, (key_of(e), dumps(e)))
            return [write] * threads
        self.more = [self.connect() for _ in range(threads - 1)]
        return [self.writer(db) for db in [self.db, *self.more]]

    @staticmethod
    def writer(db):
        def write(e):
            db.execute(UPSERT, (key_of(e), dumps(e)))
        return write

    def write_chunk(self, events):
        self.db.execute("BEGIN IMMEDIATE")
        for e in events:
            if e["changeType"] == "SET":
                self.db.execute(UPSERT, (key_of(e), dumps(e)))
            else:
                self.db.execute("DELETE FROM kv WHERE k = ?", (key_of(e),))
        self.db.execute("COMMIT")

    def load(self):
        return {key: json.loads(value) for key, value in self.db.execute("SELECT k, v FROM kv")}

    def close(self):
        for db in [*self.more, self.db]:
            db.close()


class SQLiteShared(SQLite):
    label = "sqlite3 WAL synchronous=FULL, one connection behind a lock"
    shared = True


class APSW(SQLite):
    label = "apsw WAL synchronous=FULL, a connection per thread"
    needs = "apsw"

    def connect(self):
        import apsw
        db = apsw.Connection(self.path)
        db.setbusytimeout(60000)
        db.execute("PRAGMA synchronous=FULL")
        return db


class Skeleton:
    """The smallest group commit in Python, a bound for ``persist``: each
    writer encodes its event and joins the open group; the first to take the
    group's turn writes the group with one ``os.write`` and one ``fdatasync``,
    the others find it done, as ``persist`` does.  No validation, health,
    watcher, never-glue check or error handling."""
    label = "group commit skeleton: encode, one write + fdatasync per group"
    needs = None

    def __init__(self, folder):
        self.path = os.path.join(folder, "events.jsonl")
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        st = os.fstat(self.fd)
        self.ident = st.st_dev, st.st_ino
        self.lock, self.joining, self.group = threading.Lock(), threading.Lock(), None

    def writers(self, threads):
        return [self.write] * threads

    def write(self, e):
        line = encode(e)
        with self.joining:
            group = self.group
            if group is None:
                group = self.group = {"lines": [], "taken": False, "turn": threading.Lock()}
            group["lines"].append(line)
        with group["turn"]:
            if not group["taken"]:
                with self.lock:
                    with self.joining:
                        group["taken"], self.group = True, None
                    self.write_group(b"".join(group["lines"]))

    def write_group(self, data):
        os.write(self.fd, data)
        os.fdatasync(self.fd)

    def close(self):
        os.close(self.fd)


class LockedSkeleton(Skeleton):
    """The skeleton plus the system calls a log shared with other processes
    makes per group: ``lockf``, ``stat`` of the path against the descriptor,
    the offset after the write, and the unlock."""
    label = "the same + lockf, stat, offset per group"

    def write_group(self, data):
        os.lockf(self.fd, os.F_LOCK, 0)
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) != self.ident:
                raise RuntimeError("the log was replaced")
            os.write(self.fd, data)
            os.lseek(self.fd, 0, os.SEEK_CUR)
            os.fdatasync(self.fd)
        finally:
            os.lseek(self.fd, 0, os.SEEK_SET)
            os.lockf(self.fd, os.F_ULOCK, 0)


STORES = {"persist": Persist, "skeleton": Skeleton, "locked_skeleton": LockedSkeleton,
          "leveldb": LevelDB, "lmdb": LMDB, "rocksdb": RocksDB,
          "sqlite": SQLite, "sqlite_shared": SQLiteShared, "apsw": APSW}
PEERS = ["leveldb", "lmdb", "rocksdb", "sqlite", "sqlite_shared", "apsw"]


def missing(name):
    """Why the store ``name`` cannot run here, or None."""
    needs = STORES[name].needs
    if needs is None:
        return None
    try:
        __import__(needs)
    except ImportError as exc:
        return "%s is not installed (%s); pip install -r benchmarks/requirements.txt" % (needs, exc)
    return None


# --- 1. durable single writes -----------------------------------------------------------------------


def bare_writes(folder, lines):
    """The physical reference, as a method for ``interleaved_times``: one
    ``os.write`` and one ``fdatasync`` per pre-encoded line, one thread."""
    def prepare():
        fd = os.open(fresh(folder, "bare.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

        def work():
            for data in lines:
                os.write(fd, data)
                os.fdatasync(fd)
        return work, lambda: os.close(fd)
    return prepare


def store_writes(folder, open_store, threads, events):
    """A method for ``interleaved_times``: ``events`` written by ``threads``
    writers of the store ``open_store(path)`` makes in a fresh folder."""
    def prepare():
        path = fresh_dir(folder, "store")
        store = open_store(path)
        writers = store.writers(threads)

        def cleanup():
            store.close()
            shutil.rmtree(path)
        return lambda: run_writes(writers, events), cleanup
    return prepare


def durable_writes(folder, count, runs, peers):
    rng = random.Random(1)
    events = [event(rng, 1000, n, delete_share=0) for n in range(count)]

    def batches(size):
        def prepare():
            log = mp.DiskPersister(fresh(folder, "batch.jsonl"))

            def work():
                for i in range(0, count, size):
                    log.persist_batch(events[i:i + size])
            return work, log.close
        return prepare

    def stored(name, threads, where=folder):
        return store_writes(where, STORES[name], threads, events)

    methods = {"bare": bare_writes(folder, [encode(e) for e in events])}
    for name in ("skeleton", "locked_skeleton", "persist"):
        methods[name + "/1"] = stored(name, 1)
        methods[name + "/8"] = stored(name, 8)
    tmpfs = tempfile.mkdtemp(prefix=".scratch-marshal-bench-", dir=TMPFS) if os.path.isdir(TMPFS) else None
    if tmpfs:  # where fsync costs nothing: what the CPU allows
        methods["persist/8 tmpfs"] = stored("persist", 8, where=tmpfs)
    methods["batch100"] = batches(100)
    for name in peers:
        if name != "sqlite_shared":  # with one thread, the same as sqlite
            methods[name + "/1"] = stored(name, 1)
        methods[name + "/8"] = stored(name, 8)
    try:
        return interleaved_rates(runs, count, methods)
    finally:
        if tmpfs:
            shutil.rmtree(tmpfs)


# --- 2. recovery after a history ------------------------------------------------------------------


def bare_replay(path):
    latest = {}
    with open(path, "rb") as f:
        for text in f:
            e = json.loads(text)
            key = (e["itemType"], e["item"]["id"])
            if e["changeType"] == "SET":
                latest[key] = e
            else:
                latest.pop(key, None)
    return latest


def recovery_figures(folder, count, keys, chunk, runs, peers):
    """Write the same history into every store, in durable chunks (with
    compact_ratio=4 the persists that make the log 4x compact it as it is
    written); then time, on a fresh copy in each round, the first
    open-and-read-all after it and a second one on the same copy."""
    rng = random.Random(4)
    history = [event(rng, keys, n) for n in range(count)]
    live = len(latest_per_key(history))
    systems = {"persist c4": ("persist", {"compact_ratio": 4}), "persist": ("persist", {})}
    systems.update((name, (name, {})) for name in peers if name != "sqlite_shared")
    written, sizes = {}, {}
    for system, (name, options) in systems.items():
        written[system] = fresh_dir(folder, "history-" + system.replace(" ", "-"))
        start = time.perf_counter()
        store = STORES[name](written[system], **options)
        for i in range(0, count, chunk):
            store.write_chunk(history[i:i + chunk])
        store.close()
        sizes[system] = {"history": disk_bytes(written[system]), "recovered": [],
                         "writing": time.perf_counter() - start}

    def recover(path, name, options):
        store = STORES[name](path, **options)
        got = len(store.load())
        store.close()
        if got != live:
            raise RuntimeError("%s recovered %d keys, not %d" % (name, got, live))

    def first(system):
        def prepare():
            path = os.path.join(folder, "copy-" + system.replace(" ", "-"))
            durable_copy(written[system], path)
            return lambda: recover(path, *systems[system]), lambda: None
        return prepare

    def again(system):
        def prepare():
            path = os.path.join(folder, "copy-" + system.replace(" ", "-"))

            def cleanup():
                sizes[system]["recovered"].append(disk_bytes(path))
                shutil.rmtree(path)
            return lambda: recover(path, *systems[system]), cleanup
        return prepare

    log = os.path.join(written["persist"], "events.jsonl")
    methods = {"bare": lambda: (lambda: bare_replay(log), lambda: None)}
    for system in systems:  # again() right after first(): it uses that copy
        methods[system] = first(system)
        methods[system + " again"] = again(system)
    seconds = interleaved_times(runs, methods)
    for size in sizes.values():
        size["recovered"] = statistics.median(size["recovered"])
    return {"seconds": seconds, "sizes": sizes, "live": live, "count": count, "keys": keys,
            "log_bytes": sizes["persist"]["history"]}


# --- 3. replay, 4. memory, 5. compaction ------------------------------------------------------------


def generate_log(path, count, entities):
    rng = random.Random(2)
    with open(path, "wb") as f:
        chunk = []
        for n in range(count):
            chunk.append(encode(event(rng, entities, n)))
            if len(chunk) == 10000:
                f.write(b"".join(chunk))
                chunk = []
        f.write(b"".join(chunk))


def sqlite_load(path, log):
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, type TEXT, id TEXT, change TEXT, body TEXT)")
    with open(log, "rb") as f:
        rows = ((e["itemType"], e["item"]["id"], e["changeType"], text)
                for e, text in ((json.loads(text), text) for text in f))
        db.executemany("INSERT INTO events (type, id, change, body) VALUES (?, ?, ?, ?)", rows)
    db.execute("CREATE INDEX latest ON events (type, id, seq)")
    db.commit()
    db.close()


def sqlite_replay(path):
    db = sqlite3.connect(path)
    query = ("SELECT e.body FROM events e JOIN (SELECT MAX(seq) AS seq FROM events GROUP BY type, id) l "
             "ON e.seq = l.seq WHERE e.change = 'SET'")
    live = [json.loads(body) for (body,) in db.execute(query)]
    db.close()
    return live


# The child's own peak (VmHWM starts anew at exec); ru_maxrss would carry over the parent's,
# a fork of this large benchmark process.
PEAK = """
import resource, sys
sys.path.insert(0, sys.argv[1])
import marshal_persist as mp
store = mp.MemoryStore()
with mp.DiskPersister(sys.argv[2], read_only=True) as log:
    log.replay(store.apply_batch)
try:
    with open("/proc/self/status") as status:
        print(next(int(text.split()[1]) for text in status if text.startswith("VmHWM:")))
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_kib(log):
    out = subprocess.run([sys.executable, "-c", PEAK, ROOT, log], capture_output=True, text=True, check=True)
    return int(out.stdout)


def replay_figures(folder, count, entities, runs):
    log = os.path.join(folder, "history.jsonl")
    generate_log(log, count, entities)
    live = os.path.join(folder, "live.jsonl")
    shutil.copy(log, live)
    with mp.DiskPersister(live) as p:
        p.compact()
    db = fresh(folder, "replay.sqlite")
    sqlite_load(db, log)

    def ready(work):
        return lambda: (work, lambda: None)

    def ours():
        with mp.DiskPersister(log, read_only=True) as p:
            p.replay(mp.MemoryStore().apply_batch)

    def compaction():
        copy = os.path.join(folder, "compact.jsonl")
        shutil.copy(log, copy)

        def work():
            with mp.DiskPersister(copy) as p:
                p.compact()
        return work, lambda: os.unlink(copy)

    rates = interleaved_rates(runs, count, {
        "bare": ready(lambda: bare_replay(log)), "replay": ready(ours),
        "sqlite": ready(lambda: sqlite_replay(db)), "compact": compaction,
    })
    peaks = {"peak_log": [], "peak_live": []}
    for _ in range(runs):
        peaks["peak_log"].append(peak_kib(log))
        peaks["peak_live"].append(peak_kib(live))
    rates.update({name: statistics.median(values) for name, values in peaks.items()})
    rates.update(events=count, entities=entities, survivors=len(bare_replay(log)),
                 megabytes=os.path.getsize(log) / 1e6)
    return rates


# --- 6. the watcher -----------------------------------------------------------------------------


IDLE = """
import os, resource, sys, time
sys.path.insert(0, sys.argv[1])
import marshal_persist as mp
with mp.DiskPersister(sys.argv[2]) as log:
    log.replay(mp.MemoryStore().apply_batch)
    with log.start_watcher(mp.MemoryStore().apply_batch, interval=0.1):
        before, start = os.times(), time.monotonic()
        time.sleep(float(sys.argv[3]))
        after, end = os.times(), time.monotonic()
used = (after.user - before.user) + (after.system - before.system)
print(used / (end - start))
"""


def watcher_figures(folder, appends, idle_seconds):
    path = fresh(folder, "watched.jsonl")
    store = mp.MemoryStore()
    rng = random.Random(3)
    delays = []
    with mp.DiskPersister(path) as log:
        log.replay(store.apply_batch)
        with log.start_watcher(store.apply_batch, interval=0.1):
            writer = os.open(path, os.O_WRONLY | os.O_APPEND)  # an outside writer's own descriptor
            for n in range(appends):
                time.sleep(rng.uniform(0, 0.1))
                e = event(rng, 10**6, n, delete_share=0)
                e["item"]["id"] = "w-%d" % n
                start = time.perf_counter()
                os.write(writer, encode(e))
                while store.get(e["itemType"], e["item"]["id"]) is None:
                    time.sleep(0.0005)
                delays.append(time.perf_counter() - start)
            os.close(writer)
    delays.sort()
    out = subprocess.run([sys.executable, "-c", IDLE, ROOT, path, str(idle_seconds)],
                         capture_output=True, text=True, check=True)
    return {
        "median_ms": statistics.median(delays) * 1000,
        "p99_ms": delays[min(len(delays) - 1, int(len(delays) * 0.99))] * 1000,
        "idle_cpu": float(out.stdout) * 100,
    }


# --- checking durability: --probe and --check-sync --------------------------------------------------


def probe(name, writes, threads, folder):
    """``writes`` single durable writes to the store ``name`` (or the bare
    loop) from ``threads`` threads; prints wall and CPU seconds as JSON."""
    rng = random.Random(5)
    events = [event(rng, 1000, n, delete_share=0) for n in range(writes)]
    path = fresh_dir(folder, "probe")
    if name == "bare":
        threads, events = 1, [encode(e) for e in events]
        fd = os.open(os.path.join(path, "bare.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        writers = [lambda line: (os.write(fd, line), os.fdatasync(fd))]
        close = lambda: os.close(fd)  # noqa: E731
    else:
        store = STORES[name](path)
        writers, close = store.writers(threads), store.close
    cpu, start = time.process_time(), time.perf_counter()
    run_writes(writers, events)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    close()
    shutil.rmtree(path)
    print(json.dumps({"wall": wall, "cpu": cpu}))


def probe_run(name, writes, threads, folder, strace=()):
    """One ``--probe`` in a child process, under ``strace`` if given."""
    command = [*strace, sys.executable, os.path.abspath(__file__), "--probe", name, "--writes", str(writes),
               "--threads", str(threads), "--dir", folder]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def sync_counts(name, writes, threads, folder, light=False):
    """The sync system calls of one ``--probe`` run, counted by strace; with
    ``light``, only those calls stop the process (--seccomp-bpf), which
    disturbs the timing between threads much less."""
    out = os.path.join(folder, "strace.out")
    strace = ["strace", "-f", "-c", "-o", out, "-e", "trace=" + ",".join(SYNC_CALLS)]
    probe_run(name, writes, threads, folder, strace + ["--seccomp-bpf"] * light)
    counts = dict.fromkeys(SYNC_CALLS, 0)
    with open(out) as f:
        for line in f:
            fields = line.split()
            if fields and fields[-1] in counts and re.match(r"^\d", fields[0]):
                counts[fields[-1]] = int(fields[3])
    return counts


def check_sync(folder, writes, rounds=3):
    """For each store: the sync calls per write of ``writes`` single writes
    from one thread, what an open and a close cost subtracted (at least one
    per write: durable), and from 8 threads (fewer where writers share a
    sync: group commit); then writes/s and CPU time per write (all threads,
    user and system) of 10x as many writes, medians of ``rounds`` runs
    without strace."""
    if shutil.which("strace") is None:
        sys.exit("--check-sync needs strace (apt-get install strace)")
    names = ["bare", "persist", "skeleton", "locked_skeleton"]
    names += [name for name in PEERS if missing(name) is None]
    rows, per_write = {}, {}
    for name in names:
        idle = sync_counts(name, 0, 1, folder)
        one = sync_counts(name, writes, 1, folder)
        calls = {call: (one[call] - idle[call]) / writes for call in SYNC_CALLS if one[call] - idle[call]}
        if name == "bare":
            eight = "-"
        else:
            idle = sync_counts(name, 0, 8, folder, light=True)
            counted = sync_counts(name, writes, 8, folder, light=True)
            eight = "%.2f" % ((sum(counted.values()) - sum(idle.values())) / writes)
        rows[name] = [", ".join("%s %.2f" % item for item in calls.items()) or "none",
                      verdict(sum(calls.values()) >= 1), eight]
    timed = {(name, threads): [] for name in names for threads in ((1,) if name == "bare" else (1, 8))}
    for _ in range(rounds):
        for name, threads in timed:
            timed[name, threads].append(probe_run(name, 10 * writes, threads, folder))
    for (name, threads), runs in timed.items():
        wall = statistics.median(run["wall"] for run in runs)
        cpu = statistics.median(run["cpu"] for run in runs)
        per_write[name, threads] = ["%.0f" % (10 * writes / wall), "%.1f" % (cpu / (10 * writes) * 1e6)]
    print("sync calls per write (strace -f -c -e trace=%s; %d writes; open and close subtracted)"
          "\nand writes/s, CPU microseconds per write (%d writes, medians of %d runs, no strace); files in %s"
          % (",".join(SYNC_CALLS), writes, 10 * writes, rounds, folder))
    table(("", "syncs/write, 1 thread", "durable", "syncs/write, 8 threads", "1 thread: writes/s", "CPU us",
           "8 threads: writes/s", "CPU us"),
          [(label_of(name), *rows[name], *per_write[name, 1], *per_write.get((name, 8), ["-", "-"]))
           for name in names], "<<<>>>>>")


def run_writes(writers, events):
    """One writer: the calling thread writes every event.  More: each
    writes its share of the events in a thread of its own."""
    if len(writers) == 1:
        write = writers[0]
        for e in events:
            write(e)
    else:
        count = len(writers)
        in_threads(lambda i: [writers[i](e) for e in events[i::count]], range(count))


# --- the tables ------------------------------------------------------------------------------------


def verdict(ok):
    return "met" if ok else "MISSED"


def scratch_parent():
    """The temp dir when it is on the same file system as the repository (a
    real disk), else a folder in the repository."""
    tmp = tempfile.gettempdir()
    if os.stat(tmp).st_dev == os.stat(ROOT).st_dev:
        return tmp
    return os.path.dirname(os.path.abspath(__file__))


def label_of(name):
    if name == "bare":
        return "bare os.write + fdatasync loop"
    return "marshal_persist persist" if name == "persist" else STORES[name].label


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, about a minute")
    parser.add_argument("--dir", default=None, help="where to put the files (default: a temp dir)")
    parser.add_argument("--check-sync", action="store_true",
                        help="count each store's sync calls per write under strace, and stop")
    parser.add_argument("--probe", choices=["bare", *STORES], help=argparse.SUPPRESS)
    parser.add_argument("--writes", type=int, default=200, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(args.probe, args.writes, args.threads, args.dir)

    folder = tempfile.mkdtemp(prefix=".scratch-marshal-bench-", dir=args.dir or scratch_parent())
    try:
        if args.check_sync:
            return check_sync(os.path.abspath(folder), args.writes)
        peers = []
        for name in PEERS:
            why = missing(name)
            if why:
                print("skipped %s: %s" % (label_of(name), why))
            else:
                peers.append(name)
        appends, append_runs = (200, 9) if args.quick else (1000, 15)
        history, keys, recovery_runs = (50000, 2500, 3) if args.quick else (200000, 10000, 5)
        events, entities, replay_runs = (200000, 10000, 3) if args.quick else (1000000, 50000, 5)
        a = durable_writes(folder, appends, append_runs, peers)
        c = recovery_figures(folder, history, keys, CHUNK, recovery_runs, peers)
        r = replay_figures(folder, events, entities, replay_runs)
        w = watcher_figures(folder, 20 if args.quick else 100, 3 if args.quick else 10)
    finally:
        shutil.rmtree(folder)

    print("marshal-persist benchmark%s: Python %s, %s, %d CPUs, files in %s"
          % (" (quick)" if args.quick else "", sys.version.split()[0], sys.platform, os.cpu_count() or 0,
             os.path.dirname(folder)))
    targets = []

    def rows_of_rates(rows, unit):
        table(("", unit, "ratio"), [(name, "%.0f" % rate, ratio) for name, rate, ratio in rows], "<><")

    print("\n1. durable single writes: %d events of ~200 bytes, each acknowledged only once it is on disk;"
          "\n   medians of %d interleaved rounds" % (appends, append_runs))
    # With 8 threads a row is held against LevelDB (the persist target), or against persist without it.
    top, top_name = (a["leveldb/8"], "LevelDB 8 threads") if "leveldb/8" in a else (a["persist/8"], "persist")
    rows = [("bare os.write + fdatasync loop, pre-encoded lines", a["bare"], "1.00x bare")]
    for name in ("skeleton", "locked_skeleton", "persist"):
        label = STORES[name].label if name != "persist" else "persist"
        rows.append(("%s, 1 thread" % label, a[name + "/1"], "%.2fx bare" % (a[name + "/1"] / a["bare"])))
        rows.append(("%s, 8 threads" % label, a[name + "/8"], "%.2fx %s" % (a[name + "/8"] / top, top_name)))
    if "persist/8 tmpfs" in a:
        rows.append(("persist, 8 threads, log on tmpfs (fsync costs nothing)", a["persist/8 tmpfs"],
                     "%.2fx persist 8 threads" % (a["persist/8 tmpfs"] / a["persist/8"])))
    rows.append(("persist_batch of 100", a["batch100"], "%.2fx bare" % (a["batch100"] / a["bare"])))
    for name in peers:
        for threads in (1, 8):
            key = "%s/%d" % (name, threads)
            if key in a:
                plural = "s" * (threads > 1)
                ratio = a[key] / a["persist/%d" % threads]
                rows.append(("%s, %d thread%s" % (label_of(name), threads, plural), a[key],
                             "%.2fx persist %d thread%s" % (ratio, threads, plural)))
    rows_of_rates(rows, "writes/s")
    targets.append(("persist 8 threads >= 1.0x LevelDB 8 threads",
                    a["persist/8"] / a["leveldb/8"] if "leveldb/8" in a else None, 1.0, 1, "x"))
    targets.append(("persist 1 thread >= 0.9x the bare append loop", a["persist/1"] / a["bare"], 0.9, 1, "x"))

    s, sizes = c["seconds"], c["sizes"]
    reference = s["persist c4"]
    print("\n2. recovery: open, read everything into a dict (the latest event per key, decoded), close;"
          "\n   after a history of %d writes over %d keys (5%% deletes, %d keys live) written in durable"
          "\n   chunks of %d.  Medians of %d interleaved rounds, each on a fresh copy of the store (in page"
          "\n   cache); 'again' is a second recovery of that copy; 'writing' the one run that wrote the"
          "\n   history" % (c["count"], c["keys"], c["live"], CHUNK, recovery_runs))
    names = {"persist c4": "persist: DiskPersister(compact_ratio=4).replay",
             "persist": "persist: DiskPersister().replay"}
    names.update((name, label_of(name).split(",")[0]) for name in peers)
    rows = [("bare json.loads loop over the persist log", "%.3f" % s["bare"],
             "%.2fx" % (s["bare"] / reference), "", "", "", "")]
    rows += [(names[system], "%.3f" % s[system], "%.2fx" % (s[system] / reference),
              "%.3f" % s[system + " again"], "%.1f MB" % (size["history"] / 1e6),
              "%.1f MB" % (size["recovered"] / 1e6), "%.2f" % size["writing"])
             for system, size in sizes.items()]
    table(("", "first s", "vs c4 row", "again s", "on disk", "after", "writing s"), rows, "<>>>>>>")
    leveldb = s.get("leveldb")
    targets.append(("recovery with compact_ratio=4 <= 1.5x LevelDB's",
                    None if leveldb is None else reference / leveldb, 1.5, -1, "x"))

    print("\n3. replay: %d events over %d entities, %.0f MB, 5%% DELs, %d survive; medians of %d rounds"
          % (r["events"], r["entities"], r["megabytes"], r["survivors"], replay_runs))
    rows_of_rates([("bare json.loads loop, last per key", r["bare"], "1.00x bare"),
                   ("DiskPersister.replay into MemoryStore", r["replay"],
                    "%.2fx bare" % (r["replay"] / r["bare"])),
                   ("sqlite3 events table, latest row per key", r["sqlite"],
                    "%.2fx bare" % (r["sqlite"] / r["bare"]))], "events/s")
    targets.append(("replay >= 1.0x the bare json.loads loop", r["replay"] / r["bare"], 1.0, 1, "x"))

    print("\n4. replay peak memory (child process, VmHWM): the %d-event log %.1f MB, its %d live"
          " entities alone %.1f MB"
          % (r["events"], r["peak_log"] / 1024, r["survivors"], r["peak_live"] / 1024))
    targets.append(("replay peak memory, whole log <= 1.3x live entities alone",
                    r["peak_log"] / r["peak_live"], 1.3, -1, "x"))

    replay_seconds, compact_seconds = r["events"] / r["replay"], r["events"] / r["compact"]
    print("\n5. compaction of the %d-event log: %.2f s; its replay %.2f s"
          % (r["events"], compact_seconds, replay_seconds))
    targets.append(("compaction <= 1.5x the replay of the same log",
                    compact_seconds / replay_seconds, 1.5, -1, "x"))

    print("\n6. watcher at interval=0.1 s, an outside append until the store has it: median %.1f ms,"
          " 99th percentile %.1f ms; idle CPU %.2f%% of one core"
          % (w["median_ms"], w["p99_ms"], w["idle_cpu"]))
    targets.append(("watcher median delay <= 130 ms", w["median_ms"], 130, -1, " ms"))
    targets.append(("watcher idle CPU < 1% of one core", w["idle_cpu"], 1, -1, "%"))

    print("\ntargets")
    table(("", "measured", ""),
          [(name, "-", "not measured (the peer is missing)") if value is None else
           (name, "%.2f%s" % (value, unit), verdict(value * sign >= limit * sign))
           for name, value, limit, sign, unit in targets], "<><")


def table(header, rows, align):
    """Print ``rows`` of strings under ``header``, column i aligned by
    ``align[i]`` ('<' left, '>' right), the columns as wide as needed."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [cell.ljust(width) if how == "<" else cell.rjust(width)
                 for cell, width, how in zip(row, widths, align)]
        print(("  " + "  ".join(cells)).rstrip())


if __name__ == "__main__":
    main()
