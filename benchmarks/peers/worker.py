"""One system, one phase, one process: ``worker.py build|read ...`` prints nothing useful and writes a
JSON result file.  run.py starts it once per (system, phase) so that peak RSS is the system's own.

read phase, in order:
  1. open + first sample (page cache warm), best of 3 opens;
  2. verification, untimed: get(i) and get_batch for a random subset against the source files byte for
     byte; the sequential pass hashed against every source file; one shuffled DataLoader epoch whose
     multiset of sample hashes must equal the source's.  A system that returns wrong bytes is reported
     as such and not timed;
  3. timed, each right after warming the system's files: random get(i) at the shared random indices,
     the same indices through get_batch in batches, a full sequential pass, a shuffled DataLoader epoch
     with 2 workers.  pgpgin (KiB paged in from disk) is recorded for every timed part.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/ (common.py)

import numpy as np  # noqa: E402

from common import own_disk_read_kib, pgpgin_kib, warm_files  # noqa: E402
from systems import load  # noqa: E402


def h64(b) -> int:
    import xxhash
    return xxhash.xxh3_64_intdigest(b)


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rusage():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so a worker would report the RSS of
    # the run.py process it was forked from.  Children (DataLoader workers, build pools) are forked
    # without exec, so RUSAGE_CHILDREN is theirs (shared pages inherited from the parent included).
    return {"self_maxrss_kib": status_kib("VmHWM"),
            "children_maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}


def io_read_kib() -> int:
    """KiB this process caused to be read from storage (0 = served from memory, or no per-task accounting)."""
    return max(0, own_disk_read_kib())


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus that of its reaped children (DataLoader workers)."""
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def timed(fn, reps, warm):
    """Best-of-reps wall seconds (warming the page cache right before each rep), best-of-reps CPU seconds
    (robust when other processes share the 2 cores), and pgpgin during the reps."""
    best, best_cpu, paged, own, warm_in, out = float("inf"), float("inf"), 0, 0, 0, None
    for _ in range(reps):
        warm_in += warm()
        k0, o0 = pgpgin_kib(), io_read_kib()
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        out = fn()
        t = time.perf_counter() - t0
        best_cpu = min(best_cpu, cpu_seconds() - c0)
        paged += pgpgin_kib() - k0
        own += io_read_kib() - o0
        best = min(best, t)
    return {"seconds": best, "cpu_seconds": best_cpu, "pgpgin_kib": paged, "own_read_kib": own,
            "warm_pgpgin_kib": warm_in, "value": out, "load1": os.getloadavg()[0]}


def do_build(a, args, rels):
    # Every system starts from the same page cache: the source files read once right before (this VM
    # evicts pages idle for ~30 s, so without this the first system built would read from disk).
    warm_pgpgin = warm_files([os.path.join(args.src, r) for r in rels])[2]
    k0 = pgpgin_kib()
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    a.build(args.src, rels, args.out, args.compression)
    secs = time.perf_counter() - t0
    cpu = cpu_seconds() - c0
    files = a.files(args.out)
    size = sum(os.path.getsize(p) for p in files)
    # What making the output durable costs on top (packfmt fsyncs every shard before writing its
    # manifest; most peers leave their output in the page cache): fsync every output file now.
    t1 = time.perf_counter()
    for p in ([] if args.system == "loose" else files):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return {"seconds": secs, "cpu_seconds": cpu, "fsync_after_s": time.perf_counter() - t1,
            "pgpgin_kib": pgpgin_kib() - k0, "source_warm_pgpgin_kib": warm_pgpgin, "load1": os.getloadavg()[0],
            "bytes": size, "files": len(files), **rusage()}


def do_read(a, args, rels):
    res = {}
    n = len(rels)
    src = lambda i: os.path.join(args.src, rels[i])  # noqa: E731
    hashes = np.load(args.hashes)
    ridx = np.load(args.idx)
    vidx = np.load(args.verify_idx)
    files = a.files(args.out)

    def warm():
        return warm_files(files)[2]

    # 1. open + first sample
    opens = []
    r = None
    for _ in range(3):
        if r is not None:
            r.close()
            r = None
        warm()
        t0 = time.perf_counter()
        r = a.open(args.out, rels)
        first = r.get(0)
        opens.append(time.perf_counter() - t0)
    res["open_first_s"] = min(opens)
    res["rss_after_open_kib"] = status_kib("VmRSS")
    res["n"] = r.n
    # 2. verification
    wrong = []
    if r.n != n:
        wrong.append(f"{r.n} samples, source has {n}")
    if first != open(src(0), "rb").read():
        wrong.append("sample 0 differs")
    for i in vidx.tolist():
        got = r.get(i)
        if got != open(src(i), "rb").read():
            wrong.append(f"get({i}): {len(got) if got is not None else None} bytes differ from {rels[i]}")
            if len(wrong) > 5:
                break
    if r.get_batch is not None:
        got = r.get_batch(vidx)
        for i, g in zip(vidx.tolist(), got):
            if g != open(src(i), "rb").read():
                wrong.append(f"get_batch: sample {i} differs from {rels[i]}")
                break
        rep = np.concatenate([vidx[:50][::-1], vidx[:50]])  # unsorted order and repeats
        got = r.get_batch(rep)
        if [h64(g) for g in got] != hashes[rep].tolist():
            wrong.append("get_batch with repeats/reversed order differs")
    k = 0
    for k, s in enumerate(r.iter_all()):
        if k >= n or h64(s) != int(hashes[k]):
            wrong.append(f"sequential pass: sample {k} differs")
            break
    else:
        if k + 1 != n:
            wrong.append(f"sequential pass gave {k + 1} samples, not {n}")
    res["verify_wrong"] = wrong
    if wrong:
        res.update(rusage())
        return res

    # 3. timed
    reps = args.reps
    il = ridx.tolist()
    nbytes = int(np.load(args.sizes)[ridx].sum())
    res["random_bytes"] = nbytes
    res["random_samples"] = len(il)

    def single():
        g = r.get
        for i in il:
            g(i)

    res["random"] = timed(single, reps, warm)
    if r.get_batch is not None:
        batches = [ridx[s: s + args.batch] for s in range(0, len(ridx), args.batch)]

        def batched():
            gb = r.get_batch
            for b in batches:
                gb(b)

        res["batched"] = timed(batched, reps, warm)

    def seq():
        total = 0
        for s in r.iter_all():
            total += len(s)
        return total

    res["sequential"] = timed(seq, max(2, reps - 2), warm)
    # 4. the shuffled DataLoader epoch last: some systems (Mosaic, LMDB) allow one open handle per
    # process, so the reader above is closed first.  Verified (one untimed epoch), then timed.
    loader = None
    if args.loader:
        try:
            loader = r.loader(args.batch, 2, 0)
        except Exception as e:  # noqa: BLE001
            res["loader_error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    if loader is not None:
        seen = []
        for batch in loader:
            seen.extend(h64(bytes(s)) for s in batch)
        seen = np.sort(np.array(seen, dtype=np.uint64))
        ref = np.sort(hashes.astype(np.uint64))
        unknown = np.setdiff1d(seen, ref)
        if len(unknown):
            res["verify_wrong"] = [f"DataLoader epoch returned {len(unknown)} samples that are in no source file"]
            res.update(rusage())
            return res
        res["loader_epoch_samples"] = int(len(seen))
        res["loader_epoch_unique"] = int(len(np.unique(seen)))
        res["loader_epoch_exact"] = bool(len(seen) == len(ref) and np.array_equal(seen, ref))
    if loader is not None:
        def epoch():
            c = 0
            for batch in loader:
                c += len(batch)
            return c

        res["loader"] = timed(epoch, max(1, args.loader_reps), warm)
    res["load1_end"] = os.getloadavg()[0]
    res["rss_end_kib"] = status_kib("VmRSS")
    res["rss_anon_end_kib"] = status_kib("RssAnon")
    res.update(rusage())
    return res


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("phase", choices=["build", "read"])
    p.add_argument("--system", required=True)
    p.add_argument("--src", required=True)
    p.add_argument("--rels", required=True, help="text file: sorted relative paths, one a line")
    p.add_argument("--out", required=True)
    p.add_argument("--compression", default="none")
    p.add_argument("--hashes")
    p.add_argument("--sizes")
    p.add_argument("--idx")
    p.add_argument("--verify-idx")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--loader", action="store_true")
    p.add_argument("--loader-reps", type=int, default=2)
    p.add_argument("--result", required=True)
    args = p.parse_args(argv)
    with open(args.rels) as f:
        rels = f.read().split("\n")
    a = load(args.system)
    why = a.available()
    if why is not None:
        res = {"unavailable": why}
    else:
        try:
            res = do_build(a, args, rels) if args.phase == "build" else do_read(a, args, rels)
        except Exception as e:  # noqa: BLE001 - reported in the table, not hidden
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"[:500], **rusage()}
    mod = sys.modules.get("mosaic_adapter")
    if mod is not None and getattr(mod, "SHIMMED", False):
        res["note_torchvision_stub"] = True
    with open(args.result, "w") as f:
        json.dump(res, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))


if __name__ == "__main__":
    main()
