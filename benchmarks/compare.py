"""Durable single writes of two or more versions of marshal_persist.py, side by side.

    git show 407c576:marshal_persist.py > /tmp/old.py
    python benchmarks/compare.py /tmp/old.py marshal_persist.py [--rounds 21]

Each version writes the same events with ``persist`` from 1 and from 8
threads, interleaved with the bare ``os.write`` + ``fdatasync`` loop and (if
plyvel is installed) LevelDB with 8 threads, as in ``bench.py``: the medians
and the ratios within one run are the result, not the absolute numbers.  Then
the CPU time of one ``persist`` of each version, one thread, with the log on
tmpfs (where fsync costs nothing), the median of interleaved rounds.
"""

import argparse
import importlib.util
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench


def load(path, index):
    spec = importlib.util.spec_from_file_location("marshal_persist_%d" % index, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="+", help="copies of marshal_persist.py")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--events", type=int, default=1000, help="events per run (default 1000)")
    args = parser.parse_args()
    modules = {path: load(path, i) for i, path in enumerate(args.versions)}
    rng = random.Random(1)
    events = [bench.event(rng, 1000, n, delete_share=0) for n in range(args.events)]
    folder = tempfile.mkdtemp(prefix=".scratch-marshal-compare-", dir=bench.scratch_parent())
    methods = {"bare": bench.bare_writes(folder, [bench.encode(e) for e in events])}
    if bench.missing("leveldb") is None:
        methods["LevelDB 8"] = bench.store_writes(folder, bench.LevelDB, 8, events)
    for path, module in modules.items():
        for threads in (1, 8):
            methods["%s %d" % (path, threads)] = bench.store_writes(
                folder, lambda store, module=module: bench.Persist(store, module=module), threads, events)
    try:
        rates = bench.interleaved_rates(args.rounds, args.events, methods)
    finally:
        shutil.rmtree(folder)
    reference = "LevelDB 8" if "LevelDB 8" in rates else "bare"
    print("durable single writes, medians of %d interleaved rounds of %d events"
          % (args.rounds, args.events))
    bench.table(("", "writes/s", "vs bare", "vs " + reference),
                [(name, "%.0f" % rate, "%.3fx" % (rate / rates["bare"]), "%.3fx" % (rate / rates[reference]))
                 for name, rate in rates.items()], "<>>>")
    cpu = cpu_per_persist(modules, events, args.rounds)
    print("\nCPU per persist, 1 thread, log on %s, medians of %d interleaved rounds" % (TMPFS, args.rounds))
    bench.table(("", "µs"), [(path, "%.2f" % (seconds * 1e6)) for path, seconds in cpu.items()], "<>")


TMPFS = bench.TMPFS if os.path.isdir(bench.TMPFS) else tempfile.gettempdir()


def cpu_per_persist(modules, events, rounds):
    """Median process CPU seconds of one ``persist`` of each module, 1 thread."""
    times = {path: [] for path in modules}
    folder = tempfile.mkdtemp(prefix=".scratch-marshal-compare-", dir=TMPFS)
    try:
        for _ in range(rounds):
            for path, module in modules.items():
                log = module.DiskPersister(os.path.join(bench.fresh_dir(folder, "cpu"), "events.jsonl"))
                start = time.process_time()
                for e in events:
                    log.persist(e)
                times[path].append((time.process_time() - start) / len(events))
                log.close()
    finally:
        shutil.rmtree(folder)
    return {path: statistics.median(values) for path, values in times.items()}


if __name__ == "__main__":
    main()
