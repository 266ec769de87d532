#!/usr/bin/env python3
"""Random access to small samples: packfmt against loose files and against the machine's limit.

In ONE process and one run, on a generated tree of small files (log-normal sizes, median 4 KiB):

* ``ds.get_batch`` of 256 random indices, ``ds[i]`` one at a time, and a sequential pass
  (``ds.iter_batches``), on the dataset packed with ``--compression none`` and with ``zstd``;
* the same samples read as loose files (open/read/close in Python);
* the machine's limit, by C code (``benchmarks/limits.c``, compiled now with gcc -O2) reading the SAME
  positions in the same order and batches: memcpy from an mmap of the shards, and pread;
* diagnostics for the hot path: verify=False, mmap=False (pread), and ``_core.ShardSet.read_rows``
  called directly (no Dataset layer);
* ``pack build --compression none`` files/s against ``tar cf`` of the same tree.

Every measurement warms the files it reads right before it runs (the benchmark VM evicts pages idle
for ~30 s), takes the best of several repetitions, and reports the KiB paged in from disk during the
timed repetitions (``pgpgin`` in /proc/vmstat, system-wide): ~0 means memory was measured, not disk.
The datasets' shards are first evicted and brought back through a map advised to use 2 MiB pages, the
way packfmt's reader (``huge_pages``) faults them in, and the warm-ups bring evicted pages back the same
way: the page cache then holds the shards in 2 MiB folios, which every reader that maps them -- the C
limits included -- maps with 2 MiB entries.  ``benchmarks/huge_pages.py`` measures what that shape is worth.

    python benchmarks/random_access.py                 # full run: 200,000 files
    python benchmarks/random_access.py --quick         # 20,000 files, fewer repetitions
    python benchmarks/random_access.py --out docs/benchmarks.md   # also update that section
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    DEFAULT_CACHE,
    HERE,
    REPO,
    Timing,
    TreeSpec,
    best_of,
    compile_c,
    dataset_files,
    describe_machine,
    dir_bytes,
    ensure_dataset,
    ensure_tree,
    evict_files,
    fmt_rate,
    have_pack_build,
    log,
    machine_info,
    markdown_table,
    pack_build_cmd,
    own_disk_read_kib,
    pgpgin_kib,
    readdir_order,
    tree_files,
    update_markdown_section,
    warm_dataset_files,
    warm_files,
)

sys.path.insert(0, REPO)
import packfmt  # noqa: E402

SECTION = "random_access"
TITLE = "Random access (issue 2): `benchmarks/random_access.py`"

TARGETS = {
    "get_batch_abs": 1_000_000,
    "get_batch_vs_mmap": 0.7,
    "getitem_abs": 500_000,
    "vs_loose": 15.0,
    "build_vs_tar": 1.0,
}


class Row:
    def __init__(self, name, what, samples, nbytes, timing: Timing, note=""):
        self.name, self.what, self.samples, self.nbytes, self.t, self.note = name, what, samples, nbytes, timing, note

    @property
    def rate(self) -> float:
        return self.samples / self.t.best

    @property
    def cpu_rate(self) -> float:
        return self.samples / self.t.best_cpu if self.t.best_cpu > 0 else float("nan")

    @property
    def mbps(self) -> float:
        return self.nbytes / self.t.best / 1e6


# ---------------------------------------------------------------------------------- measurements


def warm_dataset(ds_dir):
    def warm():
        return warm_dataset_files(dataset_files(ds_dir))[2]
    return warm


def measure_limits(exe, ds, ds_dir, samples, batch, reps, tmpdir):
    """Run limits.c at the positions of `samples` (same order, same batches)."""
    shard = np.ascontiguousarray(ds.shard_of[samples], dtype="<u4")
    off = np.ascontiguousarray(ds.offsets[samples], dtype="<u8")
    ln = np.ascontiguousarray(ds.stored_lengths[samples], dtype="<u4")
    pos = os.path.join(tmpdir, "positions.bin")
    with open(pos, "wb") as f:
        f.write(np.array([len(samples)], dtype="<u8").tobytes())
        f.write(shard.tobytes())
        f.write(off.tobytes())
        f.write(ln.tobytes())
    warm_in = warm_dataset(ds_dir)()
    paths = [os.path.join(ds_dir, s) for s in ds.shards]
    r = subprocess.run([exe, "--cpu", str(reps), str(batch), pos, *paths], check=True, stdout=subprocess.PIPE, text=True)
    out = {}
    for line in r.stdout.splitlines():
        mode, best, med, paged, n, nbytes, cpu, own = line.split()
        out[mode] = Row(f"C {mode}", "limit", int(n), int(nbytes),
                        Timing(float(best), float(med), reps, int(paged), warm_in, float(cpu), int(own)))
    return out


def measure_get_batch(ds, batches, reps, warm, label, what="packfmt"):
    n = sum(len(b) for b in batches)
    get_batch = ds.get_batch
    nbytes = [0]

    def run():
        total = 0
        for b in batches:
            for x in get_batch(b):
                total += len(x)
        nbytes[0] = total

    def run_fast():
        for b in batches:
            get_batch(b)

    run()  # count bytes once (untimed), then time without the len() loop
    t = best_of(run_fast, reps, warm=warm)
    return Row(label, what, n, nbytes[0], t)


def measure_read_rows(ds, batches, reps, warm, label):
    ss = ds._shardset  # the low-level object Dataset.get_batch calls
    read_rows = ss.read_rows
    batches64 = [np.ascontiguousarray(b, dtype=np.int64) for b in batches]
    n = sum(len(b) for b in batches)
    nbytes = int(sum(int(ds.stored_lengths[b].sum()) for b in batches))

    def run():
        for b in batches64:
            read_rows(b)

    return Row(label, "packfmt low-level", n, nbytes, best_of(run, reps, warm=warm))


def measure_getitem(ds, idx_list, reps, warm, label):
    nbytes = int(ds.raw_lengths[np.asarray(idx_list, dtype=np.int64)].sum())

    def run():
        for i in idx_list:
            ds[i]

    return Row(label, "packfmt", len(idx_list), int(nbytes), best_of(run, reps, warm=warm))


def measure_read_one(ds, idx_list, reps, warm, label):
    read_one = ds._shardset.read_one  # what Dataset.__getitem__ calls for uncompressed datasets
    nbytes = int(ds.stored_lengths[np.asarray(idx_list, dtype=np.int64)].sum())

    def run():
        for i in idx_list:
            read_one(i)

    return Row(label, "packfmt low-level", len(idx_list), nbytes, best_of(run, reps, warm=warm))


def measure_sequential(ds, reps, warm, label, batch):
    n = len(ds)
    nbytes = [0]

    def run():
        total = 0
        for b in ds.iter_batches(batch):
            total += len(b)
        nbytes[0] = total

    t = best_of(run, reps, warm=warm)
    return Row(label, "packfmt", n, int(ds.raw_lengths.sum()), t)


def measure_loose(paths, reps, label, chunk=20_000):
    """open/read/close each path.  The pass is timed in chunks, each warmed right before it is read,
    so no file sits idle long enough to be evicted between its warm-up and its read."""
    chunks = [paths[i: i + chunk] for i in range(0, len(paths), chunk)]
    nbytes = 0

    def read_all(ps):
        total = 0
        for p in ps:
            with open(p, "rb") as f:
                total += len(f.read())
        return total

    warm_in = 0
    for c in chunks:  # untimed warm-up pass
        warm_in += warm_files(c)[2]
        nbytes = read_all(c)
    times, cpus, paged, own = [], [], 0, 0
    for _ in range(reps):
        t = cpu = 0.0
        for c in chunks:
            warm_in += warm_files(c)[2]
            k0, o0, c0, t0 = pgpgin_kib(), own_disk_read_kib(), time.thread_time(), time.perf_counter()
            read_all(c)
            t += time.perf_counter() - t0
            cpu += time.thread_time() - c0
            paged += pgpgin_kib() - k0
            own += own_disk_read_kib() - o0
        times.append(t)
        cpus.append(cpu)
    times.sort()
    nbytes = sum(os.path.getsize(p) for p in paths)
    return Row(label, "loose files", len(paths), nbytes,
               Timing(times[0], times[len(times) // 2], reps, paged, warm_in, min(cpus), own))


def copy_tree_to_tmpfs(tree_root: str, shm_root: str = "/dev/shm") -> str | None:
    """A copy of the tree in tmpfs (memory that the kernel cannot evict: there is no swap), so that
    neither builder reads the disk; None when there is no room."""
    try:
        st = os.statvfs(shm_root)
    except OSError:
        return None
    need = dir_bytes(tree_root) * 1.2
    if st.f_bavail * st.f_frsize < need + (2 << 30):
        return None
    dst = os.path.join(shm_root, "packfmt-bench-tree")
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["cp", "-a", tree_root, dst], check=True)
    return dst


def measure_build(tree_root, all_tree_paths, cache, reps, n_files, workers=None):
    """`tar cf` and `pack build --compression none` of the tree; both with a warm page cache, both
    writing to the same file system; the output is removed and synced between repetitions."""
    tmp = os.path.join(cache, "build-tmp")
    rows = []
    tar_out = os.path.join(tmp, "tree.tar")
    pack_out = os.path.join(tmp, "tree.pack")
    # Warm in the order each consumer reads: tar in readdir order, pack build in sorted order.
    tar_order = readdir_order(tree_root)
    sorted_order = sorted(all_tree_paths)
    jobs = [("tar cf", ["tar", "cf", tar_out, "-C", tree_root, "."], tar_order)]
    if have_pack_build():
        jobs.append(("pack build --compression none", pack_build_cmd(tree_root, pack_out, "none", workers),
                     sorted_order))
        if workers is None:
            jobs.append(("pack build --compression none --workers 1",
                         pack_build_cmd(tree_root, pack_out, "none", 1), sorted_order))
    for label, cmd, order in jobs:
        times, cpus, paged, warm_in, own = [], [], 0, 0, 0
        for rep in range(reps + 1):  # rep 0: untimed, pages in the program and its libraries
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            subprocess.run(["sync"], check=True)
            evicted = warm_files(order)[2]
            k0, o0 = pgpgin_kib(), own_disk_read_kib()
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            t = time.perf_counter() - t0
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            k1, o1 = pgpgin_kib(), own_disk_read_kib()
            if r.returncode:
                raise RuntimeError(f"{shlex.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}")
            if rep > 0:
                times.append(t)
                cpus.append(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime)
                paged += k1 - k0
                own += o1 - o0
                warm_in += evicted
        times.sort()
        out_bytes = os.path.getsize(tar_out) if label.startswith("tar") else dir_bytes(pack_out)
        rows.append(Row(label, " ".join(shlex.quote(c) for c in cmd[:2]), n_files, out_bytes,
                        Timing(times[0], times[len(times) // 2], reps, paged, warm_in, min(cpus), own)))
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    return rows


# ---------------------------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def report(args, info, spec, tree_bytes, sizes, ds_info, rows, limits, build_rows, load_end):
    mmap_lim = limits["mmap_memcpy"].rate
    loose = next(r for r in rows if r.what == "loose files").rate

    def ratio(x, base):
        return f"{x / base:.2f}x"

    mmap_cpu = limits["mmap_memcpy"].cpu_rate
    loose_cpu = next(r for r in rows if r.what == "loose files").cpu_rate
    read_table = []
    for r in [*limits.values(), *rows]:
        read_table.append([r.name, f"{r.samples:,}", fmt_rate(r.rate), f"{r.mbps:,.0f}",
                           f"{r.t.median / r.t.best:.2f}", ratio(r.rate, mmap_lim), ratio(r.rate, loose),
                           fmt_rate(r.cpu_rate), ratio(r.cpu_rate, mmap_cpu), ratio(r.cpu_rate, loose_cpu),
                           f"{r.t.warm_pgpgin:,}", f"{r.t.own_read:,}", f"{r.t.pgpgin:,}"])
    headers = ["measurement", "samples", "samples/s", "MB/s", "median/best", "x C mmap", "x loose",
               "samples/CPU-s", "x C mmap (CPU)", "x loose (CPU)",
               "evicted KiB (read back by the warm-ups)", "disk KiB read by this process, timed reps",
               "pgpgin KiB (system), timed reps"]
    out = []
    cmd = "python benchmarks/random_access.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out.append(f"Command: `{cmd.strip()}`  ")
    out.append(f"Date: {info['date']}  ")
    out.append(f"Machine: {describe_machine(info)}; at the end {', '.join(f'{x:.2f}' for x in load_end)}.  ")
    p = np.percentile(sizes, [10, 50, 90, 99])
    out.append(f"Data: {spec.files:,} files, {tree_bytes / 2**20:,.0f} MiB, log-normal sizes (seed {spec.seed}; "
               f"p10 {p[0]:,.0f} B, median {p[1]:,.0f} B, mean {sizes.mean():,.0f} B, p90 {p[2]:,.0f} B, "
               f"p99 {p[3]:,.0f} B), half random bytes, half text.  ")
    for codec, d in ds_info.items():
        out.append(f"Packed `{codec}` with {d['builder']}: {d['shards']} shard(s), {d['bytes'] / 2**20:,.0f} MiB "
                   f"({tree_bytes / d['bytes']:.2f}x smaller than the files' bytes).  ")
    out.append(f"Random order: a permutation (seed {spec.seed + 1}) of {args.samples_used:,} samples, read in "
               f"batches of {args.batch}; the C limits read the same positions in the same order and batches. "
               f"Best of {args.reps} repetitions after one untimed warm-up pass; one thread.")
    out.append("")
    out.append(markdown_table(headers, read_table, "l" + "r" * 12))
    out.append("")
    if build_rows:
        tar = build_rows[0]
        bt = [[r.name, f"{r.samples:,}", f"{r.t.best:.2f}", fmt_rate(r.rate), ratio(r.rate, tar.rate),
               f"{r.t.best_cpu:.2f}", f"{r.nbytes / 2**20:,.0f}", f"{r.t.warm_pgpgin:,}", f"{r.t.own_read:,}",
               f"{r.t.pgpgin:,}"]
              for r in build_rows]
        where = ("a tmpfs copy of the tree (`/dev/shm`: memory the kernel cannot evict, no swap)"
                 if args.build_src.startswith("/dev/shm") else f"the tree on disk, warmed right before each run")
        out.append(f"Build: source {where}; output to `{args.cache}` on the disk (removed and synced before each run); "
                   f"one untimed run first, then best of {args.build_reps}. `pack build` without `--workers` uses "
                   f"its default (one worker per CPU, {info['nproc']} here, fewer for small inputs: "
                   f"`packfmt.build.default_workers`):")
        out.append("")
        out.append(markdown_table(["command", "files", "seconds (wall)", "files/s", "x tar cf",
                                   "CPU seconds (all processes)", "output MiB", "evicted KiB (warm-ups)",
                                   "disk KiB read by the command, timed runs", "pgpgin KiB (system), timed runs"],
                                  bt, "lrrrrrrrrr"))
        out.append("")
    # targets
    gb = next(r for r in rows if r.name.startswith("get_batch(256) random") and "none" in r.name)
    gi = next(r for r in rows if r.name.startswith("ds[i] random") and "none" in r.name)
    tg = []
    tg.append(["get_batch >= 1,000,000 samples/s", fmt_rate(gb.rate), verdict(gb.rate >= TARGETS["get_batch_abs"])])
    tg.append(["get_batch >= 0.7x C mmap memcpy (same run)", ratio(gb.rate, mmap_lim),
               verdict(gb.rate >= TARGETS["get_batch_vs_mmap"] * mmap_lim)])
    tg.append(["ds[i] >= 500,000 samples/s", fmt_rate(gi.rate), verdict(gi.rate >= TARGETS["getitem_abs"])])
    tg.append([">= 15x loose files (get_batch)", ratio(gb.rate, loose), verdict(gb.rate >= TARGETS["vs_loose"] * loose)])
    tg.append([">= 15x loose files (ds[i])", ratio(gi.rate, loose), verdict(gi.rate >= TARGETS["vs_loose"] * loose)])
    pb = next((r for r in build_rows if r.name == "pack build --compression none"), None)
    if pb is not None:
        tg.append(["pack build --compression none >= tar cf", ratio(pb.rate, build_rows[0].rate),
                   verdict(pb.rate >= build_rows[0].rate)])
    elif build_rows or not args.skip_build:
        tg.append(["pack build --compression none >= tar cf", "n/a", "not measured: `pack build` not available"])
    out.append("Targets (issue 2), from the rows above (compression none):")
    out.append("")
    out.append(markdown_table(["target", "measured", "verdict"], tg, "lrl"))
    return "\n".join(out)


# ---------------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=None, help="files in the generated tree (default 200,000; "
                    "--quick: 20,000)")
    ap.add_argument("--quick", action="store_true", help="a smaller, faster run")
    ap.add_argument("--cache", default=DEFAULT_CACHE, help=f"where the tree and datasets live (default {DEFAULT_CACHE})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (default 7; quick 3)")
    ap.add_argument("--build-reps", type=int, default=None, help="repetitions of each build (default 3; quick 1)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--samples", type=int, default=None, help="random samples per pass (default: all)")
    ap.add_argument("--slow-samples", type=int, default=50_000,
                    help="random samples for the slow ds[i]-on-zstd pass (default 50,000)")
    ap.add_argument("--codecs", default="none,zstd", help="compressions to pack and read (default none,zstd)")
    ap.add_argument("--skip-build", action="store_true", help="skip the pack build vs tar cf measurement")
    ap.add_argument("--build-only", action="store_true",
                    help="only the pack build vs tar cf measurement: print its rows, leave --out alone")
    ap.add_argument("--build-on-disk", action="store_true",
                    help="build from the tree on disk instead of a tmpfs copy (the VM evicts idle pages)")
    ap.add_argument("--workers", type=int, default=None, help="pack build --workers (default: its own default)")
    ap.add_argument("--out", nargs="?", const=os.path.join(REPO, "docs", "benchmarks.md"), default=None,
                    help="append/update this benchmark's section in a markdown file (default docs/benchmarks.md)")
    args = ap.parse_args(argv)
    files = args.files or (20_000 if args.quick else 200_000)
    args.reps = args.reps or (3 if args.quick else 7)
    args.build_reps = args.build_reps or (1 if args.quick else 3)
    codecs = [c for c in args.codecs.split(",") if c]
    if "none" not in codecs:
        codecs.insert(0, "none")

    info = machine_info()
    log(f"machine: {describe_machine(info)}")
    spec = TreeSpec(files=files, seed=args.seed)
    os.makedirs(args.cache, exist_ok=True)
    tree_root = ensure_tree(args.cache, spec, log=log)
    if args.build_only:
        return build_only(args, spec, tree_root)

    ds_dirs = {c: ensure_dataset(args.cache, spec, tree_root, c, log=log) for c in codecs}
    tmpdir = tempfile.mkdtemp(prefix="packfmt-bench-")
    flags = ["-O2"]
    if os.path.exists("/usr/include/xxhash.h"):  # optional: price XXH3 next to XXH64
        flags.append("-DPK_BENCH_XXH3")
    exe = compile_c(os.path.join(HERE, "limits.c"), tmpdir, flags=flags,
                    extra_sources=[os.path.join(REPO, "src_c", "checksum.c")])

    # A defined starting point: the shards leave the page cache and come back the way packfmt's reader
    # faults them in (2 MiB folios where the kernel allows), whatever earlier runs left there.  Every
    # reader below, the C limits included, then maps the same cached pages.
    for d in ds_dirs.values():
        evict_files(dataset_files(d))
        warm_dataset_files(dataset_files(d))
    dss = {c: packfmt.open(d) for c, d in ds_dirs.items()}
    ds = dss["none"]
    n = len(ds)
    sizes = ds.raw_lengths.astype(np.int64)
    tree_bytes = int(sizes.sum())
    rng = np.random.default_rng(spec.seed + 1)
    samples = rng.permutation(n)[: args.samples or n].astype(np.int64)
    args.samples_used = len(samples)
    batches = [samples[i: i + args.batch] for i in range(0, len(samples), args.batch)]
    idx_list = samples.tolist()
    keys = ds.keys.to_pylist()
    loose_paths = [os.path.join(tree_root, keys[i]) for i in idx_list]

    ds_info = {}
    for c, d in ds_dirs.items():
        with open(d + ".json") as f:
            builder = json.load(f)["builder"]
        ds_info[c] = {"builder": builder, "shards": len(dss[c].shards), "bytes": dir_bytes(d)}

    rows = []

    def add(row):
        rows.append(row)
        log(f"  {row.name:<48} {fmt_rate(row.rate):>8} samples/s  {row.mbps:8,.0f} MB/s  "
            f"{fmt_rate(row.cpu_rate):>8} samples/CPU-s  "
            f"disk read {row.t.own_read} KiB, pgpgin {row.t.pgpgin} KiB (evicted before warm: {row.t.warm_pgpgin} KiB)")

    log(f"C limits at the same {len(samples):,} positions ...")
    limits = measure_limits(exe, ds, ds_dirs["none"], samples, args.batch, args.reps, tmpdir)
    for r in limits.values():
        log(f"  {r.name:<48} {fmt_rate(r.rate):>8} samples/s  {r.mbps:8,.0f} MB/s  "
            f"{fmt_rate(r.cpu_rate):>8} samples/CPU-s  disk read {r.t.own_read} KiB, pgpgin {r.t.pgpgin} KiB")

    w_none = warm_dataset(ds_dirs["none"])
    log("packfmt, compression none ...")
    add(measure_get_batch(ds, batches, args.reps, w_none, f"get_batch({args.batch}) random, none"))
    add(measure_getitem(ds, idx_list, args.reps, w_none, "ds[i] random, none"))
    add(measure_sequential(ds, args.reps, w_none, f"sequential iter_batches({args.batch}), none", args.batch))
    log("diagnostics (hot path) ...")
    ds_nv = packfmt.open(ds_dirs["none"], verify=False)
    add(measure_get_batch(ds_nv, batches, args.reps, w_none, f"get_batch({args.batch}) random, none, verify=False",
                          "diagnostic"))
    add(measure_getitem(ds_nv, idx_list, args.reps, w_none, "ds[i] random, none, verify=False"))
    ds_pr = packfmt.open(ds_dirs["none"], mmap=False)
    add(measure_get_batch(ds_pr, batches, args.reps, w_none, f"get_batch({args.batch}) random, none, mmap=False",
                          "diagnostic"))
    add(measure_read_rows(ds, batches, args.reps, w_none, f"_core.ShardSet.read_rows({args.batch}), none"))
    add(measure_read_one(ds, idx_list, args.reps, w_none, "_core.ShardSet.read_one(i), none"))
    for c in codecs:
        if c == "none":
            continue
        log(f"packfmt, compression {c} ...")
        w = warm_dataset(ds_dirs[c])
        add(measure_get_batch(dss[c], batches, args.reps, w, f"get_batch({args.batch}) random, {c}"))
        sub = idx_list[: args.slow_samples]  # zstd decoding one sample per call is slow: a random subset
        add(measure_getitem(dss[c], sub, args.reps, w, f"ds[i] random, {c}"))
        add(measure_sequential(dss[c], args.reps, w, f"sequential iter_batches({args.batch}), {c}", args.batch))
    log("loose files ...")
    add(measure_loose(loose_paths, args.reps, "loose files open/read/close, same samples"))

    build_rows = []
    args.build_src = tree_root
    if not args.skip_build:
        src, shm = tree_root, None
        if not args.build_on_disk:
            shm = copy_tree_to_tmpfs(tree_root)
            if shm:
                src = args.build_src = shm
        log(f"build: tar cf vs pack build, source {src} ...")
        try:
            build_rows = measure_build(src, tree_files(src, spec), args.cache, args.build_reps, spec.files,
                                       args.workers)
        finally:
            if shm:
                shutil.rmtree(shm, ignore_errors=True)
        for r in build_rows:
            log(f"  {r.name:<48} {r.t.best:7.2f} s  {fmt_rate(r.rate):>8} files/s  disk read {r.t.own_read} KiB, pgpgin {r.t.pgpgin} KiB")

    load_end = os.getloadavg()
    text = report(args, info, spec, tree_bytes, sizes, ds_info, rows, limits, build_rows, load_end)
    print(text)
    if args.out:
        update_markdown_section(args.out, SECTION, TITLE, text)
        log(f"updated section '{SECTION}' of {args.out}")
    shutil.rmtree(tmpdir, ignore_errors=True)


def build_only(args, spec, tree_root) -> None:
    """The build rows alone (same procedure as the full run), with the load average around them."""
    load0 = os.getloadavg()
    src, shm = tree_root, None
    if not args.build_on_disk:
        shm = copy_tree_to_tmpfs(tree_root)
        src = shm or tree_root
    try:
        rows = measure_build(src, tree_files(src, spec), args.cache, args.build_reps, spec.files, args.workers)
    finally:
        if shm:
            shutil.rmtree(shm, ignore_errors=True)
    tar = rows[0]
    table = [[r.name, f"{r.samples:,}", f"{r.t.best:.2f}", f"{r.t.median:.2f}", fmt_rate(r.rate),
              f"{r.rate / tar.rate:.2f}x", f"{r.t.best_cpu:.2f}", f"{tar.t.best_cpu / r.t.best_cpu:.2f}x"] for r in rows]
    print(f"Build only: {spec.files:,} files from {src}; best of {args.build_reps} after an untimed run; "
          f"load average {', '.join(f'{x:.2f}' for x in load0)} at the start, "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} at the end.")
    print(markdown_table(["command", "files", "best s (wall)", "median s", "files/s", "x tar cf",
                          "CPU s (all processes)", "x tar cf (CPU)"], table))


if __name__ == "__main__":
    main()
