"""packfmt side by side with the systems a user would pick instead -- one command, same data, same run.

    python benchmarks/peers/run.py --install          # once: the peers' own virtualenv (/tmp/peers-venv)
    /tmp/peers-venv/bin/python benchmarks/peers/run.py [--files 100000] [--systems packfmt,lmdb,...]

What it does:
  * generates (once, cached) a tree of small files with log-normal sizes (median 4 KiB), the same tree
    benchmarks/random_access.py uses (benchmarks/common.py);
  * builds every system from that tree, each in its own process (build time, files/s, output size with
    and without compression where the system offers it, peak RSS of the build);
  * reads every system back in its own process (worker.py): open + first sample, random access by
    global index, batched random access where the system has a batch API, a sequential pass, a shuffled
    DataLoader epoch with 2 workers, peak RSS.  Every system's answers are first checked byte for byte
    against the source files; one that returns wrong bytes is reported, not timed;
  * measures the machine's limits in the same run: memcpy bandwidth, sequential read of the packed
    shards, and C code (benchmarks/limits.c) reading the SAME random byte ranges with mmap+memcpy and
    pread -- every row shows its ratio to the matching limit;
  * writes a markdown report (stdout, and the "Peers" section of docs/benchmarks.md) and PNG charts
    into docs/img/.

Every timed part runs right after its files were read once (page cache warm: this VM evicts idle file
pages after ~30 s) and reports pgpgin, the KiB the kernel paged in from disk while it ran.

The remote comparison (the same systems read from a loopback S3 server with injected latency, each
through its own S3 support) is remote_run.py; it reuses this file's tree and build workers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
REPO = os.path.dirname(BENCH)
sys.path.insert(0, HERE)
sys.path.insert(0, BENCH)

import numpy as np  # noqa: E402

from common import (TreeSpec, compile_c, describe_machine, ensure_tree, fmt_rate, log,  # noqa: E402
                    machine_info, markdown_table, pgpgin_kib, tree_layout, update_markdown_section, warm_files)
from systems import SYSTEMS  # noqa: E402

VENV = "/tmp/peers-venv"
DEFAULT_WORK = "/tmp/packfmt-peers"
DISPLAY = {}  # system -> display name (filled from the adapters via a worker-free import)


# ---------------------------------------------------------------------------------------------- setup

def install(venv: str) -> None:
    """Create the peers' virtualenv (seeing the system torch) and install the peers + packfmt into it."""
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
    pip = [py, "-m", "pip", "install"]
    req = os.path.join(BENCH, "requirements-peers.txt")
    # One peer at a time, so that one that cannot install does not keep the others out.
    with open(req) as f:
        lines = [ln.split("#")[0].strip() for ln in f]
    pins = [ln for ln in lines if ln]
    torch_pin = [p for p in pins if p.startswith("torch==")]
    for p in pins:
        if p in torch_pin:
            continue
        r = subprocess.run(pip + [p, *torch_pin])
        if r.returncode:
            log(f"!! {p} did not install (exit {r.returncode}); it will be reported as not installed")
    # mosaicml-streaming pulls torchvision from PyPI, a CUDA build that cannot load next to the CPU
    # torch here; streaming only needs two names from it, which mosaic_adapter.py stubs when needed.
    chk = subprocess.run([py, "-c", "import torchvision.datasets"], capture_output=True)
    if chk.returncode:
        subprocess.run([py, "-m", "pip", "uninstall", "-y", "torchvision"])
    subprocess.run(pip + ["-e", REPO, "--no-build-isolation", "torch==2.13.0"], check=True)
    subprocess.run([py, "-c", "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"],
                   check=True)
    log(f"peers installed in {venv}; now run: {py} {os.path.relpath(__file__, REPO)}")


def prepare(args):
    """The tree, its sorted relative paths, sizes, content hashes, and the shared random indices."""
    import xxhash
    spec = TreeSpec(files=args.files)
    root = ensure_tree(args.cache, spec, log=log)
    rels = sorted(tree_layout(spec)[0])
    work = os.path.join(args.work, spec.name)
    os.makedirs(work, exist_ok=True)
    rels_path = os.path.join(work, "rels.txt")
    with open(rels_path, "w") as f:
        f.write("\n".join(rels))
    hp, sp = os.path.join(work, "hashes.npy"), os.path.join(work, "sizes.npy")
    if not (os.path.exists(hp) and os.path.exists(sp)):
        hashes = np.zeros(len(rels), dtype=np.uint64)
        sizes = np.zeros(len(rels), dtype=np.int64)
        for i, rel in enumerate(rels):
            with open(os.path.join(root, rel), "rb") as f:
                b = f.read()
            hashes[i] = xxhash.xxh3_64_intdigest(b)
            sizes[i] = len(b)
        np.save(hp, hashes)
        np.save(sp, sizes)
    rng = np.random.default_rng(1)
    ridx = rng.integers(0, len(rels), min(args.random, len(rels) * 4)).astype(np.int64)
    vidx = rng.choice(len(rels), min(args.verify, len(rels)), replace=False).astype(np.int64)
    ip, vp = os.path.join(work, "random.npy"), os.path.join(work, "verify.npy")
    np.save(ip, ridx)
    np.save(vp, vidx)
    return dict(spec=spec, root=root, rels=rels, work=work, rels_path=rels_path, hashes=hp, sizes=sp,
                idx=ip, verify_idx=vp, ridx=ridx, size_arr=np.load(sp))


# ---------------------------------------------------------------------------------------------- workers

def run_worker(args, prep, system, phase, out, compression="none", extra=(), env=None, tag=""):
    res_path = os.path.join(prep["work"], f"{system}{tag}.{phase}.{compression}.json")
    if os.path.exists(res_path):
        os.remove(res_path)
    cmd = [args.python, os.path.join(HERE, "worker.py"), phase, "--system", system, "--src", prep["root"],
           "--rels", prep["rels_path"], "--out", out, "--compression", compression, "--result", res_path,
           *extra]
    log(f"  [{system}] {phase} {compression} ...")
    t0 = time.perf_counter()
    logf = os.path.join(prep["work"], f"{system}{tag}.{phase}.{compression}.log")
    with open(logf, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, **(env or {})))
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and its DataLoader workers, nothing else
            proc.wait()
            return {"error": f"timed out after {args.timeout:.0f} s (log: {logf})"}
    if not os.path.exists(res_path):
        with open(logf) as lf:
            tail = lf.read()[-1500:]
        return {"error": f"worker exited {rc} without a result; log tail: {tail}"}
    with open(res_path) as f:
        res = json.load(f)
    log(f"  [{system}] {phase} {compression} done in {time.perf_counter() - t0:.1f} s"
        + (f" -- {res.get('error') or res.get('unavailable') or res.get('verify_wrong')}"
           if res.get("error") or res.get("unavailable") or res.get("verify_wrong") else ""))
    return res


# ---------------------------------------------------------------------------------------------- limits

def measure_limits(args, prep, pack_dir):
    """memcpy, sequential read of the packfmt shards, and limits.c at the same random ranges."""
    import packfmt
    lim = {}
    # memcpy bandwidth (numpy, 256 MiB, best of 5)
    a = np.ones(256 << 20, dtype=np.uint8)
    b = np.empty_like(a)
    best = min(_t(lambda: np.copyto(b, a)) for _ in range(5))
    lim["memcpy_GBps"] = a.nbytes / best / 1e9
    del a, b
    ds = packfmt.open(pack_dir)
    shards = [os.path.join(pack_dir, s) for s in ds.shards]
    # sequential read of the shards from the page cache (8 MiB reads)
    total = sum(os.path.getsize(p) for p in shards)
    buf = bytearray(8 << 20)

    def seqread():
        for p in shards:
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass

    ts = []
    for _ in range(3):
        warm_files(shards)
        k0 = pgpgin_kib()
        ts.append(_t(seqread))
    lim["seqread_GBps"] = total / min(ts) / 1e9
    lim["seqread_pgpgin_kib"] = pgpgin_kib() - k0
    # limits.c at the random positions (same order, batches of args.batch) and at all positions in order
    exe = compile_c(os.path.join(BENCH, "limits.c"), prep["work"],
                    extra_sources=[os.path.join(REPO, "src_c", "checksum.c")])

    def run_positions(rows, name):
        pos = os.path.join(prep["work"], f"positions-{name}.bin")
        with open(pos, "wb") as f:
            f.write(np.array([len(rows)], dtype="<u8").tobytes())
            f.write(np.ascontiguousarray(ds.shard_of[rows], dtype="<u4").tobytes())
            f.write(np.ascontiguousarray(ds.offsets[rows], dtype="<u8").tobytes())
            f.write(np.ascontiguousarray(ds.stored_lengths[rows], dtype="<u4").tobytes())
        warm_files(shards)
        r = subprocess.run([exe, str(args.reps), str(args.batch), pos, *shards], check=True,
                           stdout=subprocess.PIPE, text=True)
        out = {}
        for line in r.stdout.split("\n"):
            if line.strip():
                mode, best_s, _med, paged, n, nbytes = line.split()
                out[mode] = {"samples_per_s": int(n) / float(best_s), "MBps": int(nbytes) / float(best_s) / 1e6,
                             "pgpgin_kib": int(paged)}
        return out

    lim["random"] = run_positions(prep["ridx"], "random")
    lim["sequential"] = run_positions(np.arange(len(ds), dtype=np.int64), "sequential")
    # the build's floor: read every source file once (warm), as any builder must
    files = [os.path.join(prep["root"], r) for r in prep["rels"]]
    warm_files(files)
    nbytes, secs, paged = warm_files(files)
    lim["read_sources_s"] = secs
    lim["read_sources_files_per_s"] = len(files) / secs
    lim["read_sources_pgpgin_kib"] = paged
    return lim


def _t(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- report

def display_names():
    import importlib
    out = {}
    for s, mod in SYSTEMS.items():
        try:
            m = importlib.import_module(mod)
            out[s] = (m.ADAPTER.name, m.ADAPTER.kind, m.ADAPTER.loader_kind, m.ADAPTER.compressions)
        except Exception:  # noqa: BLE001
            out[s] = (s, "", "", ("none",))
    return out


def status_of(b, r):
    if b.get("unavailable"):
        return "not installed: " + b["unavailable"][:80]
    if b.get("error"):
        return "build failed: " + b["error"][:120]
    if r is None:
        return "not read"
    if r.get("unavailable"):
        return "not installed: " + r["unavailable"][:80]
    if r.get("error"):
        return "read failed: " + r["error"][:120]
    if r.get("verify_wrong"):
        return "WRONG BYTES: " + "; ".join(r["verify_wrong"])[:160]
    return "ok"


def rate(res, key, n, nbytes=None):
    m = res.get(key) if res else None
    if not m:
        return None, None
    s = m["seconds"]
    return n / s, (nbytes / s / 1e6 if nbytes is not None else None)


def cpu_rate(res, key, n):
    m = res.get(key) if res else None
    if not m or not m.get("cpu_seconds"):
        return None
    return n / m["cpu_seconds"]


def summarize(args, prep, builds, reads, lim, names):
    """Per system: the figures used by the tables and the charts."""
    n = len(prep["rels"])
    in_bytes = int(prep["size_arr"].sum())
    rs = len(prep["ridx"])
    rbytes = int(prep["size_arr"][prep["ridx"]].sum())
    rows = {}
    for s in builds:
        b = builds[s].get("none", {})
        r = reads.get(s)
        st = status_of(b, r)
        row = {"status": st, "name": names[s][0]}
        if s == "loose":
            row["size_ratio"] = b.get("bytes_src", in_bytes) / in_bytes
        elif not b.get("unavailable") and not b.get("error"):
            row["build_s"] = b["seconds"]
            row["build_fsync_s"] = b.get("fsync_after_s")
            row["build_files_s"] = n / b["seconds"]
            row["build_rss_mib"] = max(b["self_maxrss_kib"], b["children_maxrss_kib"]) / 1024
            row["size_ratio"] = b["bytes"] / in_bytes
            one = builds[s].get("1worker")
            if one and not one.get("error"):
                row["build_s_1worker"] = one["seconds"]
            for c, bc in builds[s].items():
                if c not in ("none", "1worker") and not bc.get("error") and not bc.get("unavailable"):
                    row[f"size_ratio_{c}"] = bc["bytes"] / in_bytes
                    row[f"build_s_{c}"] = bc["seconds"]
        if st == "ok":
            row["open_ms"] = r["open_first_s"] * 1e3
            row["random"], row["random_MBps"] = rate(r, "random", rs, rbytes)
            row["batched"], row["batched_MBps"] = rate(r, "batched", rs, rbytes)
            row["sequential"], row["sequential_MBps"] = rate(r, "sequential", n, in_bytes)
            row["loader"], _ = rate(r, "loader", r.get("loader_epoch_samples") or n)
            row["cpu_random"] = cpu_rate(r, "random", rs)
            row["cpu_batched"] = cpu_rate(r, "batched", rs)
            row["cpu_sequential"] = cpu_rate(r, "sequential", n)
            row["cpu_loader"] = cpu_rate(r, "loader", r.get("loader_epoch_samples") or n)
            row["load1"] = max([r[k].get("load1", 0) for k in ("random", "batched", "sequential", "loader") if k in r]
                               or [0])
            row["loader_exact"] = r.get("loader_epoch_exact")
            row["loader_unique"] = r.get("loader_epoch_unique")
            row["loader_samples"] = r.get("loader_epoch_samples")
            row["rss_mib"] = r["self_maxrss_kib"] / 1024
            row["worker_rss_mib"] = r["children_maxrss_kib"] / 1024
            row["rss_anon_mib"] = r.get("rss_anon_end_kib", 0) / 1024
            row["pgpgin_kib"] = sum(r[k]["pgpgin_kib"] for k in ("random", "batched", "sequential", "loader") if k in r)
            row["own_read_kib"] = sum(r[k].get("own_read_kib", 0) for k in ("random", "batched", "sequential") if k in r)
            row["warm_pgpgin_kib"] = sum(r[k]["warm_pgpgin_kib"] for k in ("random", "batched", "sequential", "loader")
                                         if k in r)
        rows[s] = row
    return rows


def _f(x, fmt="{:.2f}"):
    return "n/a" if x is None else fmt.format(x)


def _ratio(x, lim):
    return "" if x is None or not lim else f" ({x / lim:.2f}×)"


def tables(rows, lim, names, prep):
    rlim = lim["random"]["pread"]["samples_per_s"]
    mlim = lim["random"]["mmap_memcpy"]["samples_per_s"]
    slim = lim["sequential"]["mmap_memcpy"]["MBps"]
    blim = lim["read_sources_files_per_s"]
    build_rows, read_rows, notes = [], [], []
    for s, r in rows.items():
        nm = r["name"]
        zs = [f"{c}: {r[k]:.3f}" for c in ("zstd", "zstd-dict") for k in [f"size_ratio_{c}"] if k in r]
        bs = "nothing to build" if s == "loose" else _f(r.get("build_s"), "{:.1f}")
        if r.get("build_fsync_s") is not None and s != "loose":
            bs += f" + {r['build_fsync_s']:.1f}"
        if "build_s_1worker" in r:
            bs += f" (1 worker: {r['build_s_1worker']:.1f})"
        build_rows.append([
            nm, names[s][1], bs,
            (fmt_rate(r["build_files_s"]) + _ratio(r["build_files_s"], blim)) if "build_files_s" in r else "n/a",
            _f(r.get("size_ratio"), "{:.3f}"),
            ", ".join(zs) if zs else ("not offered" if "size_ratio" in r else "n/a"),
            _f(r.get("build_rss_mib"), "{:.0f}"),
        ])
        if r["status"] != "ok":
            read_rows.append([nm, r["status"]] + [""] * 8)
            continue
        lo = ""
        if r.get("loader") is not None:
            lo = fmt_rate(r["loader"]) + _ratio(r["loader"], rlim)
            if not r.get("loader_exact"):
                lo += f" †"
                notes.append(f"† {nm}: the epoch delivered {r['loader_samples']:,} samples, "
                             f"{r['loader_unique']:,} distinct, of {len(prep['rels']):,} (no wrong bytes).")
        read_rows.append([
            nm, "ok",
            f"{r['open_ms']:.1f}",
            fmt_rate(r["random"]) + _ratio(r["random"], rlim),
            f"{r['random_MBps']:.0f}",
            (fmt_rate(r["batched"]) + _ratio(r["batched"], mlim)) if r.get("batched") else "n/a (no batch API)",
            f"{fmt_rate(r['sequential'])} / {r['sequential_MBps']:.0f}" + _ratio(r["sequential_MBps"], slim),
            lo or "n/a (no torch Dataset)",
            f"{r['rss_mib']:.0f} / {r['worker_rss_mib']:.0f} ({r['rss_anon_mib']:.0f})",
            f"{r['own_read_kib']:,} / {r['pgpgin_kib']:,}",
        ])
    bt = markdown_table(
        ["system", "what it is", "build s + fsync s", "files/s (× read-all-sources)", "size ÷ input", "with compression",
         "build peak RSS MiB"],
        build_rows, "llrrrll")
    rt = markdown_table(
        ["system", "status", "open + 1st sample ms", "random get samples/s (× C pread)", "random MB/s",
         "batched samples/s (× C mmap+memcpy)", "sequential samples/s / MB/s (× C seq memcpy)",
         "DataLoader 2 workers samples/s (× C pread)", "peak RSS MiB main / worker (anon at end)", "disk reads KiB: own / system pgpgin"],
        read_rows, "llrrrrrrrr")
    cpu_rows = []
    for s, r in rows.items():
        if r["status"] != "ok":
            continue
        cpu_rows.append([r["name"]] + [fmt_rate(r[k]) if r.get(k) else "n/a" for k in
                                      ("cpu_random", "cpu_batched", "cpu_sequential", "cpu_loader")]
                        + [f"{r.get('load1', 0):.1f}"])
    ct = markdown_table(["system", "random get", "batched", "sequential", "DataLoader epoch (main + 2 workers)",
                         "load1 while timed (max)"], cpu_rows, "lrrrrr")
    return bt, rt, notes, ct


def charts(rows, lim, img_dir, stamp):
    """The two PNGs; [] when matplotlib is not installed (it is in requirements-peers.txt)."""
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not installed: no charts")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(img_dir, exist_ok=True)
    ok = [s for s, r in rows.items() if r["status"] == "ok"]
    names = [rows[s]["name"] for s in ok]
    colors = ["#d62728" if s == "packfmt" else "#1f77b4" for s in ok]
    panels = [("random", "random get(i), samples/s", lim["random"]["pread"]["samples_per_s"], "C pread"),
              ("batched", "batched random (256/batch), samples/s", lim["random"]["mmap_memcpy"]["samples_per_s"],
               "C mmap+memcpy"),
              ("sequential", "sequential pass, samples/s", lim["sequential"]["mmap_memcpy"]["samples_per_s"],
               "C seq memcpy"),
              ("loader", "shuffled DataLoader epoch, 2 workers, samples/s", lim["random"]["pread"]["samples_per_s"],
               "C pread (1 thread)")]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    for ax, (key, title, limit, lname) in zip(axes.flat, panels):
        vals = [rows[s].get(key) or 0 for s in ok]
        y = np.arange(len(ok))
        ax.barh(y, vals, color=colors)
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(limit, color="k", ls="--", lw=1)
        ax.text(limit, len(ok) - 0.4, f" {lname}", fontsize=7, va="bottom")
        x0 = ax.get_xlim()[0]
        for yi, v in zip(y, vals):
            ax.text(v if v else x0, yi, f" {fmt_rate(v)}" if v else " n/a", va="center", fontsize=7)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"packfmt vs peers, read side (log scale; higher is better) — {stamp}", fontsize=11)
    fig.tight_layout()
    p1 = os.path.join(img_dir, "peers-read.png")
    fig.savefig(p1, dpi=90)
    plt.close(fig)

    built = [s for s, r in rows.items() if "build_files_s" in r]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    y = np.arange(len(built))
    ax = axes[0]
    vals = [rows[s]["build_files_s"] for s in built]
    ax.barh(y, vals, color=["#d62728" if s == "packfmt" else "#1f77b4" for s in built])
    ax.set_yticks(y, [rows[s]["name"] for s in built], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(lim["read_sources_files_per_s"], color="k", ls="--", lw=1)
    for yi, v in zip(y, vals):
        ax.text(v, yi, f" {fmt_rate(v)}", va="center", fontsize=7)
    ax.set_title("build, files/s (dashed: reading every source file once)", fontsize=10)
    ax = axes[1]
    w = 0.38
    ax.barh(y - w / 2, [rows[s]["size_ratio"] for s in built], w, label="no compression", color="#7f7f7f")
    ax.barh(y + w / 2, [min([rows[s][k] for k in rows[s] if k.startswith("size_ratio_")] or [0]) for s in built],
            w, label="best compression offered", color="#2ca02c")
    ax.set_yticks(y, [rows[s]["name"] for s in built], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", ls="--", lw=1)
    ax.set_title("output size ÷ input size (lower is better)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p2 = os.path.join(img_dir, "peers-build.png")
    fig.savefig(p2, dpi=90)
    plt.close(fig)
    return p1, p2


SHARD_PEERS = ("mosaic", "litdata", "wds", "arrayrecord")


def goals(rows):
    """The issue's goals, each with the figure that decides it: [goal, packfmt, best peer, verdict]."""
    pk = rows.get("packfmt", {})
    peers = {s: r for s, r in rows.items() if s != "packfmt" and r.get("status") == "ok"}
    out = []

    def best(key, among=None):
        c = [(r.get(key), r["name"]) for s, r in peers.items() if r.get(key) and (among is None or s in among)]
        return max(c) if c else (None, "-")

    def verdict(ok):
        return "**met**" if ok else "**not met**"

    pb = pk.get("batched")
    fastest_single = max([(max(r.get("random") or 0, r.get("batched") or 0), r["name"]) for r in peers.values()]
                         or [(None, "-")])
    def cpu_note(key_pk, keys_peer, among=None):
        c = pk.get(key_pk)
        v = max([max(r.get(k) or 0 for k in keys_peer) for s, r in peers.items() if among is None or s in among]
                or [0])
        return f" (per CPU-second: {c / v:.2f}×)" if c and v else ""

    if pb and fastest_single[0]:
        x = pb / fastest_single[0]
        out.append(["batched random ≥ 3× the fastest peer's best random access",
                    f"{fmt_rate(pb)}/s", f"{fmt_rate(fastest_single[0])}/s ({fastest_single[1]})",
                    f"{x:.2f}× — {verdict(x >= 3)}" + cpu_note("cpu_batched", ("cpu_random", "cpu_batched"))])
    for s in SHARD_PEERS:
        r = peers.get(s)
        if pb and r:
            v = max(r.get("random") or 0, r.get("batched") or 0)
            x = pb / v
            out.append([f"batched random ≥ 10× {r['name']}", f"{fmt_rate(pb)}/s", f"{fmt_rate(v)}/s",
                        f"{x:.1f}× — {verdict(x >= 10)}" + cpu_note("cpu_batched", ("cpu_random", "cpu_batched"), (s,))])
    bt = [(r["build_s"], r["name"]) for s, r in rows.items() if s != "packfmt" and r.get("build_s")]
    if pk.get("build_s") and bt:
        b = min(bt)
        one = pk.get("build_s_1worker")
        out.append(["build time ≤ the best peer", f"{pk['build_s']:.1f} s" + (f" (1 worker: {one:.1f} s)" if one else ""),
                    f"{b[0]:.1f} s ({b[1]})", verdict(pk["build_s"] <= b[0])])
        dur = [(r["build_s"] + r["build_fsync_s"], r["name"]) for s, r in rows.items()
               if s not in ("packfmt", "loose") and r.get("build_s") and r.get("build_fsync_s") is not None]
        if dur and pk.get("build_fsync_s") is not None:
            b = min(dur)
            pd = pk["build_s"] + pk["build_fsync_s"]
            out.append(["durable build (build + fsync of the output) ≤ the best peer", f"{pd:.1f} s",
                        f"{b[0]:.1f} s ({b[1]})", verdict(pd <= b[0])])
    for key, label in (("size_ratio", "no compression"), ("size_ratio_zstd", "zstd")):
        c = [(r[key], r["name"]) for s, r in rows.items() if s not in ("packfmt", "loose") and r.get(key)]
        if pk.get(key) and c:
            b = min(c)
            out.append([f"size within 5% of the best peer ({label})", f"{pk[key]:.3f}", f"{b[0]:.3f} ({b[1]})",
                        f"{(pk[key] / b[0] - 1) * 100:+.1f}% — {verdict(pk[key] <= b[0] * 1.05)}"])
    if pk.get("loader"):
        b = best("loader")
        if b[0]:
            out.append(["shuffled DataLoader epoch ≥ the best peer", f"{fmt_rate(pk['loader'])}/s",
                        f"{fmt_rate(b[0])}/s ({b[1]})", f"{pk['loader'] / b[0]:.2f}× — {verdict(pk['loader'] >= b[0])}"
                        + cpu_note("cpu_loader", ("cpu_loader",))])
    for key, label in (("random", "random get(i)"), ("sequential", "sequential pass")):
        b = best(key)
        if pk.get(key) and b[0]:
            out.append([f"{label}: first (no goal set; for the record)", f"{fmt_rate(pk[key])}/s",
                        f"{fmt_rate(b[0])}/s ({b[1]})", f"{pk[key] / b[0]:.2f}×" + cpu_note("cpu_" + key, ("cpu_" + key,))])
    return markdown_table(["goal (issue 5)", "packfmt", "best peer", "ratio / verdict"], out, "lrrl")


def report(args, prep, rows, lim, names, info, load_end, cmdline, charts_rel, builds, reads):
    spec = prep["spec"]
    sizes = prep["size_arr"]
    bt, rt, notes, ct = tables(rows, lim, names, prep)
    lines = [
        f"Produced by `{cmdline}` on {info['date']}.",
        "",
        f"Machine: {describe_machine(info)}; load average at the end "
        f"{', '.join(f'{x:.2f}' for x in load_end)} (a shared machine: other engineers were working).",
        "",
        f"Data: {spec.files:,} files in {spec.classes} directories, log-normal sizes (median {spec.median} B, "
        f"mean {sizes.mean() / 1024:.1f} KiB, p90 {np.percentile(sizes, 90) / 1024:.1f} KiB), "
        f"{sizes.sum() / 2**20:,.0f} MiB in all; half the content is random bytes, half word-like text. "
        f"Random access: the same {len(prep['ridx']):,} random global indices for every system (batches of "
        f"{args.batch} for the batched column); best of {args.reps}; page cache warmed right before each "
        f"timed part (`pgpgin` = KiB read from disk during the timed parts: ~0 means memory-speed figures).",
        "",
        "Machine limits measured in the same run: "
        f"memcpy {lim['memcpy_GBps']:.1f} GB/s; sequential read of the packed shards from the page cache "
        f"{lim['seqread_GBps']:.2f} GB/s; at the same random byte ranges (benchmarks/limits.c, one thread): "
        f"C pread {fmt_rate(lim['random']['pread']['samples_per_s'])} samples/s, "
        f"C mmap+memcpy {fmt_rate(lim['random']['mmap_memcpy']['samples_per_s'])} samples/s, "
        f"C mmap+memcpy+XXH3 {fmt_rate(lim['random']['mmap_memcpy_xxh3']['samples_per_s'])} samples/s; "
        f"all samples in order with mmap+memcpy {lim['sequential']['mmap_memcpy']['MBps']:,.0f} MB/s; "
        f"reading every source file once (Python open/read, warm) "
        f"{fmt_rate(lim['read_sources_files_per_s'])} files/s.",
        "",
        "### Goals",
        "",
        goals(rows),
        "",
        "### Build and size",
        "",
        bt,
        "",
        "### Read",
        "",
        rt,
        "",
        "Samples per CPU-second (best repetition; the process's CPU time, all threads, plus its DataLoader "
        "workers'). On a shared 2-core machine wall-clock rates move with the other engineers' load; "
        "CPU-time rates much less, so compare systems on these when the load column differs:",
        "",
        ct,
        "",
    ]
    lines += notes
    lines += ["", "How each system was driven:", ""]
    for s in rows:
        nm, kind, lk, _ = names[s]
        lines.append(f"- **{nm}** ({kind}). DataLoader: {lk or 'no torch Dataset'}.")
    stub = any(reads.get(s, {}).get("note_torchvision_stub") or builds[s].get("none", {}).get("note_torchvision_stub")
               for s in rows)
    if stub:
        lines.append("- Mosaic Streaming imports torchvision at import time; PyPI's torchvision (a CUDA build) "
                     "cannot load next to the CPU torch 2.13.0 here, so a two-name stub stood in for it "
                     "(nothing benchmarked uses it).")
    lines += ["", *[f"![{os.path.basename(p)}]({p})" for p in charts_rel], ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--install", action="store_true", help=f"create the peers' virtualenv ({VENV}) and exit")
    p.add_argument("--venv", default=VENV)
    p.add_argument("--files", type=int, default=100_000, help="files in the generated tree (default 100000)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated: " + ",".join(SYSTEMS))
    p.add_argument("--compressions", default="none,zstd,zstd-dict", help="build settings to try (size + build time)")
    p.add_argument("--random", type=int, default=20_000, help="random indices read per timed repetition")
    p.add_argument("--verify", type=int, default=500, help="random samples checked byte for byte")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--loader-reps", type=int, default=2)
    p.add_argument("--cache", default="/tmp/packfmt-bench", help="where the tree is generated (shared)")
    p.add_argument("--work", default=DEFAULT_WORK, help="where systems are built")
    p.add_argument("--python", default=None, help="interpreter for the workers (default: this one)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    p.add_argument("--docs", default=os.path.join(REPO, "docs", "benchmarks.md"),
                   help="markdown file whose 'Peers' section is (re)written; '' to skip")
    p.add_argument("--img", default=os.path.join(REPO, "docs", "img"))
    p.add_argument("--json", default=None, help="also write all raw results here")
    p.add_argument("--from-json", default=None, help="re-make the report and charts from a --json file, no run")
    p.add_argument("--build-only", type=int, default=0, metavar="REPS",
                   help="only time the builds (--compressions, packfmt also with 1 worker), REPS rounds with the "
                        "systems interleaved; print a table, leave the docs alone")
    args = p.parse_args(argv)
    if args.install:
        install(args.venv)
        return 0
    args.python = args.python or sys.executable
    args.compressions = [c for c in args.compressions.split(",") if c]
    if "none" not in args.compressions:
        args.compressions.insert(0, "none")
    systems = [s for s in args.systems.split(",") if s]
    for s in systems:
        if s not in SYSTEMS:
            p.error(f"unknown system {s!r}; known: {', '.join(SYSTEMS)}")
    if "packfmt" not in systems:
        p.error("packfmt is the baseline of the limits: keep it in --systems")
    names = display_names()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        for k, v in saved.get("args", {}).items():
            setattr(args, k, v)
        prep = prepare(args)
        return finish(args, argv, prep, saved["builds"], saved["reads"], saved["limits"], names, saved["machine"],
                      saved.get("load_end", saved["machine"]["load"]), saved.get("cmdline", "?"), saved["uptime"])
    info = machine_info()
    with open("/proc/loadavg") as f:  # not uptime(1): procps hangs under an LD_PRELOADed ASan runtime
        uptime = "load average: " + ", ".join(f.read().split()[:3])
    log(f"{describe_machine(info)}\n{uptime}")
    prep = prepare(args)
    log(f"tree: {prep['root']} ({len(prep['rels']):,} files); building ...")
    if args.build_only:
        return build_only(args, prep, systems, names, uptime)
    builds = {}
    for s in systems:
        comps = [c for c in args.compressions if c in names[s][3]]
        builds[s] = {}
        for c in comps:
            out = os.path.join(prep["work"], f"{s}.{c}")
            if os.path.exists(out):
                shutil.rmtree(out)
            res = run_worker(args, prep, s, "build", out, c)
            builds[s][c] = res
            if res.get("unavailable"):
                break
    # packfmt once more with one build worker, like the single-process peers (size only differs by noise)
    out1 = os.path.join(prep["work"], "packfmt-1worker.none")
    shutil.rmtree(out1, ignore_errors=True)
    builds["packfmt"]["1worker"] = run_worker(args, prep, "packfmt", "build", out1, "none",
                                              env={"PEERS_PACKFMT_WORKERS": "1"}, tag="-1worker")
    shutil.rmtree(out1, ignore_errors=True)
    pack_dir = os.path.join(prep["work"], "packfmt.none")
    if builds["packfmt"]["none"].get("error") or builds["packfmt"]["none"].get("unavailable"):
        raise SystemExit(f"packfmt did not build: {builds['packfmt']['none']}")
    log("machine limits ...")
    lim = measure_limits(args, prep, pack_dir)
    log(json.dumps(lim))
    reads = {}
    common = ["--hashes", prep["hashes"], "--sizes", prep["sizes"], "--idx", prep["idx"],
              "--verify-idx", prep["verify_idx"], "--batch", str(args.batch), "--reps", str(args.reps),
              "--loader", "--loader-reps", str(args.loader_reps)]
    for s in systems:
        b = builds[s].get("none", {})
        if b.get("unavailable") or b.get("error"):
            continue
        reads[s] = run_worker(args, prep, s, "read", os.path.join(prep["work"], f"{s}.none"), "none", common)
    load_end = os.getloadavg()
    cmdline = " ".join([sys.executable, os.path.relpath(__file__, REPO),
                        *(argv if argv is not None else sys.argv[1:])])
    return finish(args, argv, prep, builds, reads, lim, names, info, load_end, cmdline, uptime)


def build_only(args, prep, systems, names, uptime):
    """Builds alone, interleaved round by round so that every system sees the same load; best and median
    wall seconds, best CPU seconds (the process and its reaped children)."""
    runs = {}
    for _ in range(args.build_only):
        for s in systems:
            variants = [(c, {}, "") for c in args.compressions if c in names[s][3]]
            if s == "packfmt":
                variants.append(("none", {"PEERS_PACKFMT_WORKERS": "1"}, "-1worker"))
            for c, env, tag in variants:
                out = os.path.join(prep["work"], f"{s}{tag}.{c}")
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["sync"], check=False)
                res = run_worker(args, prep, s, "build", out, c, env=env, tag=tag)
                shutil.rmtree(out, ignore_errors=True)
                runs.setdefault((names[s][0] + (" (1 worker)" if tag else ""), c), []).append(res)
    rows = []
    for (name, c), rs in runs.items():
        ok = [r for r in rs if "seconds" in r]
        if not ok:
            rows.append([name, c, "error", "", "", "", ""])
            continue
        secs = sorted(r["seconds"] for r in ok)
        rows.append([name, c, f"{secs[0]:.2f}", f"{secs[len(secs) // 2]:.2f}",
                     f"{min(r.get('cpu_seconds', float('nan')) for r in ok):.2f}",
                     f"{min(r['fsync_after_s'] for r in ok):.2f}", f"{max(r.get('load1', 0) for r in ok):.1f}"])
    with open("/proc/loadavg") as f:
        end = "load average: " + ", ".join(f.read().split()[:3])
    print(f"Builds of {len(prep['rels']):,} files, {args.build_only} rounds; {uptime} at the start, {end} at the end")
    print(markdown_table(["system", "compression", "best s", "median s", "best CPU s", "fsync after s",
                          "load1 (max)"], rows, "llrrrrr"))
    return 0


def finish(args, argv, prep, builds, reads, lim, names, info, load_end, cmdline, uptime):
    rows = summarize(args, prep, builds, reads, lim, names)
    stamp = info["date"]
    docs_dir = os.path.dirname(os.path.abspath(args.docs)) if args.docs else REPO
    img_paths = charts(rows, lim, args.img, stamp) if args.img else []
    charts_rel = [os.path.relpath(pth, docs_dir) for pth in img_paths]
    text = report(args, prep, rows, lim, names, info, load_end, cmdline, charts_rel, builds, reads)
    print(text)
    if args.json and not args.from_json:
        keep = {k: getattr(args, k) for k in ("files", "random", "verify", "batch", "reps")}
        with open(args.json, "w") as f:
            json.dump({"builds": builds, "reads": reads, "limits": lim, "rows": rows, "machine": info,
                       "uptime": uptime, "load_end": load_end, "cmdline": cmdline, "args": keep}, f, indent=1,
                      default=str)
    if args.docs:
        update_markdown_section(args.docs, "peers", "Peers", text)
        log(f"wrote the Peers section of {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
