"""Kill a writer with SIGKILL over and over: nothing it acknowledged may be lost.

    python stress/crash_loop.py --runs 200

Each run starts a child that replays the log as a daemon does (compacting it when
it is four times larger than its live state), then persists numbered events from
several threads and prints each number only after ``persist`` returned; every other run a
shell-style appender (a process that opens the log with O_APPEND for each line,
as ``>>`` does) appends beside it. At a random moment both are killed with
SIGKILL: most runs while the child writes, every fourth during its start-up
(its replay or compaction). The parent then opens the log as the next start would (repairing a
torn tail), replays it, and checks that every acknowledged event is there with
its latest value, and that no line is glued onto another or written twice.
Runs share one log, so every start replays what all runs before it wrote.
Standard library only; prints ``runs: N, acknowledged events: M, lost: 0``.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import marshal_persist as mp  # noqa: E402

KEYS = 20  # each writer cycles over this many entities, so values are overwritten


def writer(path, run, threads):
    """The child starts as a daemon does (replay, which compacts a log four times larger
    than its live state), then persists from ``threads`` threads, acknowledging each
    event on stdout."""
    log = mp.DiskPersister(path, compact_ratio=4.0)
    log.replay(mp.MemoryStore().apply_batch)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    say = threading.Lock()

    def work(thread):
        for i in range(10 ** 9):
            key = "t%d-%d" % (thread, i % KEYS)
            log.persist({"item": {"id": key, "n": run * 10 ** 6 + i}, "changeType": "SET",
                         "itemType": "T"})
            with say:
                sys.stdout.write("%s %d\n" % (key, run * 10 ** 6 + i))
                sys.stdout.flush()

    for thread in range(threads):
        threading.Thread(target=work, args=(thread,), daemon=True).start()
    threading.Event().wait()


def appender(path, run):
    """The child that appends as a shell ``>>`` does: open, write one line, close."""
    for i in range(10 ** 9):
        key = "sh-%d" % (i % KEYS)
        line = json.dumps({"item": {"id": key, "n": run * 10 ** 6 + i}, "changeType": "SET",
                           "itemType": "T"}, separators=(",", ":"))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, (line + "\n").encode())
        os.close(fd)
        sys.stdout.write("%s %d\n" % (key, run * 10 ** 6 + i))
        sys.stdout.flush()


def spawn(*args):
    return subprocess.Popen([sys.executable, os.path.abspath(__file__)] + [str(a) for a in args],
                            stdout=subprocess.PIPE, text=True)


def acknowledged(proc, latest):
    """Read a killed child's acknowledgements into ``latest`` (key -> newest value)."""
    count = 0
    for text in proc.stdout.read().splitlines():
        parts = text.split()
        if len(parts) != 2:  # a half-printed last line was never an acknowledgement
            continue
        key, value = parts[0], int(parts[1])
        latest[key] = max(latest.get(key, -1), value)
        count += 1
    proc.stdout.close()
    return count


def check(path, latest):
    """Replay as a restart would; returns (lost keys, glued or duplicated lines, torn lines)."""
    store = mp.MemoryStore()
    with mp.DiskPersister(path) as log:
        log.replay(store.apply_batch)
    lost = [key for key, value in latest.items()
            if (store.get("T", key) or {}).get("n", -1) < value]
    seen, bad, torn = set(), 0, 0
    with open(path, "rb") as f:
        for text in f:
            text = text.strip()
            if not text:
                continue
            event = mp._parse_line(text)[0]
            if event is None:
                # Only a writer killed mid-line leaves a fragment: a prefix of one line, never
                # two lines in one.
                if text.count(b'"item"') > 1:
                    bad += 1
                torn += 1
                continue
            identity = (event["item"]["id"], event["item"]["n"])
            bad += identity in seen
            seen.add(identity)
    return lost, bad, torn


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="how many kills (default 200)")
    parser.add_argument("--threads", type=int, default=4, help="writer threads in the child")
    parser.add_argument("--seed", type=int, default=None, help="for the random kill moments")
    parser.add_argument("--dir", default=None, help="where the log lives (default: a temp dir)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    folder = tempfile.mkdtemp(prefix="marshal-crash-", dir=args.dir)
    path = os.path.join(folder, "events.jsonl")
    latest, total = {}, 0
    for run in range(args.runs):
        children = [spawn("--child-writer", path, run, args.threads)]
        if run % 2:
            children.append(spawn("--child-appender", path, run))
        if run % 4 != 3:  # most kills come while it writes; every 4th during its start-up
            children[0].stdout.readline()  # "ready": replayed (and compacted) the log
        time.sleep(rng.uniform(0.05, 0.3))
        for child in children:
            child.send_signal(signal.SIGKILL)
        for child in children:
            child.wait()
            total += acknowledged(child, latest)
        lost, bad, torn = check(path, latest)
        if lost or bad:
            print("run %d: lost %d acknowledged events (%s), %d glued or duplicated lines; log kept in %s"
                  % (run, len(lost), ", ".join(lost[:5]), bad, folder))
            return 1
    set_aside = 0
    if os.path.exists(path + ".torn"):
        with open(path + ".torn", "rb") as f:
            set_aside = sum(1 for _ in f)
    print("runs: %d, acknowledged events: %d, lost: 0 (unacknowledged torn lines: %d skipped in the "
          "log, %d moved to events.jsonl.torn)" % (args.runs, total, torn, set_aside))
    for name in os.listdir(folder):
        os.unlink(os.path.join(folder, name))
    os.rmdir(folder)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child-writer"]:
        writer(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1:2] == ["--child-appender"]:
        appender(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(main())
