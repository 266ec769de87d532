"""Scale measurements behind docs/scale.md: a synthetic index of N rows (default 10 M), measured on this machine.

Each figure is measured at N and, where it matters, at N/10 in the same run, so the doc can show it grows
linearly before extrapolating to 1 billion samples:

* index bytes per sample (Arrow IPC file as packfmt writes it), key bytes per sample;
* ``packfmt.open`` time (warm page cache) and peak RSS of a fresh process that opens the dataset;
* first ``index_of`` (hashes every key) time;
* shuffle: time to the first batch and peak memory per worker for every ``EpochOrder`` mode;
* requests per sample for each mode: batches of 256 sorted by (shard, offset), neighbours up to
  ``max_gap`` apart merged, as the reader does;
* merge/commit: concatenating two indexes + duplicate-key check per row (what the Ray datasink and
  ``pack merge`` do on the driver);
* build: files/s and MB/s per core of ``pack build`` (local engine, 1 worker) on a generated tree,
  and the walk rate (serial on the driver).

Baseline of the same run: a numpy ``memcpy`` of the index bytes (open time vs. touching the bytes once).

    python benchmarks/scale_index.py                 # N = 10,000,000
    python benchmarks/scale_index.py --n 1000000     # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np
import pyarrow as pa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import packfmt  # noqa: E402
from packfmt import _core  # noqa: E402
from packfmt import manifest as mf  # noqa: E402
from packfmt.writer import Compression, Target, finish_dataset, index_table  # noqa: E402

SAMPLE = 16 << 10  # stored bytes per synthetic sample (only the index exists; shards are never opened)


def _digits(out: np.ndarray, col: int, values: np.ndarray, width: int) -> None:
    v = values.copy()
    for k in range(width - 1, -1, -1):
        out[:, col + k] = 48 + (v % 10)
        v //= 10


def synthetic_keys(n: int) -> pa.Array:
    """ImageNet-like keys of 40 bytes: ``train/n01440764/n01440764_0000000123.JPEG`` (1000 classes)."""
    template = b"train/n00000000/n00000000_0000000000.JPEG"
    width = len(template)
    buf = np.empty((n, width), dtype=np.uint8)
    buf[:] = np.frombuffer(template, dtype=np.uint8)
    i = np.arange(n, dtype=np.int64)
    cls = 1440764 + i * 1000 // max(n, 1)
    _digits(buf, 7, cls, 8)
    _digits(buf, 17, cls, 8)
    _digits(buf, 26, i, 10)
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(buf.reshape(-1)))


def make_dataset(path: str, n: int, shards: int) -> dict:
    per = -(-n // shards)
    j = np.arange(n, dtype=np.int64)
    shard = (j // per).astype(np.uint32)
    pos = j - shard.astype(np.int64) * per
    offset = (_core.HEADER_SIZE + pos * SAMPLE).astype(np.uint64)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    keys = synthetic_keys(n)
    label = pa.array((j * 1000 // n).astype(np.int32))
    table = index_table(keys, shard, offset, np.full(n, SAMPLE, np.uint32), np.full(n, SAMPLE, np.uint32),
                        rng.integers(0, 2**63, n, dtype=np.uint64), np.zeros(n, np.uint32), {"label": label})
    counts = np.bincount(shard, minlength=shards)
    infos = [mf.ShardInfo(name=mf.shard_name(s), size=int(_core.HEADER_SIZE + c * SAMPLE + c * _core.ENTRY_SIZE
                                                            + _core.FOOTER_SIZE), records=int(c), checksum=s,
                          data_bytes=int(c * SAMPLE)) for s, c in enumerate(counts.tolist())]
    target = Target(path)
    target.prepare()
    t1 = time.perf_counter()
    m = finish_dataset(target, infos, table, Compression.parse("none"), None)
    t2 = time.perf_counter()
    key_bytes = int(np.frombuffer(keys.buffers()[1], np.int32)[-1])
    return {"make_s": t1 - t0, "commit_s": t2 - t1, "index_bytes": m["index"]["size"],
            "manifest_bytes": os.path.getsize(os.path.join(path, mf.MANIFEST_NAME)), "key_bytes": key_bytes}


_HWM = r"""
def hwm():  # peak RSS of this process image (ru_maxrss would include the parent's, copied at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

_OPEN_CHILD = _HWM + r"""
import json, resource, sys, time
t0 = time.perf_counter()
import packfmt
t1 = time.perf_counter()
ds = packfmt.open(sys.argv[1])
t2 = time.perf_counter()
open_hwm = hwm()
n = len(ds)
i = ds.index_of(ds.key(n - 1))
t3 = time.perf_counter()
again = packfmt.open(sys.argv[1])  # the same process opening it again: no lazy imports left in the figure
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_open_s": t2 - t1, "open_s": t4 - t3, "index_of_first_s": t3 - t2,
                  "maxrss_mib": open_hwm, "maxrss_index_of_mib": hwm()}))
"""

_BASE_CHILD = _HWM + r"""
import json, resource, sys, time
import packfmt
print(json.dumps({"maxrss_mib": hwm()}))
"""


def measure_open(path: str, reps: int = 3) -> dict:
    runs = [json.loads(subprocess.run([sys.executable, "-c", _OPEN_CHILD, path], check=True, capture_output=True,
                                      text=True, cwd=ROOT).stdout) for _ in range(reps)]
    base = json.loads(subprocess.run([sys.executable, "-c", _BASE_CHILD], check=True, capture_output=True,
                                     text=True, cwd=ROOT).stdout)
    best = min(runs, key=lambda r: r["open_s"])
    best["rss_over_import_mib"] = best["maxrss_mib"] - base["maxrss_mib"]
    best["rss_index_of_mib"] = best["maxrss_index_of_mib"] - best["maxrss_mib"]
    best["index_of_first_s"] = min(r["index_of_first_s"] for r in runs)
    # baseline: touch every byte of the index once (read it into memory)
    idx = os.path.join(path, mf.INDEX_NAME)
    t = time.perf_counter()
    with open(idx, "rb") as f:
        data = f.read()
    best["read_index_s"] = time.perf_counter() - t
    t = time.perf_counter()
    _core.xxh64(data)
    best["xxh64_index_s"] = time.perf_counter() - t
    return best


def measure_shuffle(n: int, shard_of: np.ndarray, offsets: np.ndarray, world: int = 8, batch: int = 256,
                    max_gap: int = 64 << 10) -> list:
    from packfmt.shuffle import EpochOrder, shard_boundaries_of
    bounds = shard_boundaries_of(shard_of)
    out = []
    for mode, kw in (("global", {}), ("feistel", {}), ("block", {"block_size": 16, "window": 16}),
                     ("block", {"block_size": 64, "window": 16}), ("none", {})):
        tracemalloc.start()
        t = time.perf_counter()
        o = EpochOrder(n, seed=1, epoch=0, rank=0, world_size=world, mode=mode,
                       shard_boundaries=bounds if mode == "block" else None, **kw)
        first = next(iter(o.batches(batch)))
        dt = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        reqs = samples = 0
        for k, b in enumerate(o.batches(batch)):
            if k >= 400:
                break
            b = np.asarray(b)
            s, off = shard_of[b].astype(np.int64), offsets[b].astype(np.int64)
            order = np.lexsort((off, s))
            s, off = s[order], off[order]
            new = np.r_[True, (s[1:] != s[:-1]) | (off[1:] - off[:-1] > SAMPLE + max_gap)]
            reqs += int(new.sum())
            samples += len(b)
        name = mode if mode != "block" else f"block {kw['block_size']}x{kw['window']}"
        out.append({"mode": name, "first_batch_ms": dt * 1000, "peak_mib": peak / 2**20,
                    "requests_per_sample": reqs / samples, "first": len(first)})
    return out


def measure_merge(path: str) -> dict:
    """The driver side of a merge / datasink commit: concatenate two part indexes (renumbering shards),
    and check that the keys of a 10 M-row index are unique (the common case: no duplicate)."""
    from packfmt.merge import check_duplicates, concat_indexes
    ds = packfmt.open(path)
    t = time.perf_counter()
    full = concat_indexes([ds.index, ds.index], [0, len(ds.shards)])
    t1 = time.perf_counter()
    del full
    t2 = time.perf_counter()
    check_duplicates(ds.index, "error", "bench")
    t3 = time.perf_counter()
    return {"rows": 2 * len(ds), "concat_s": t1 - t, "dup_rows": len(ds), "dup_check_s": t3 - t2}


def measure_build(tmp: str, files: int, size: int) -> dict:
    from packfmt.build import build_dataset, walk
    src = os.path.join(tmp, "tree")
    rng = np.random.default_rng(0)
    blob = rng.bytes(size * 64)
    for i in range(files):
        d = os.path.join(src, f"c{i % 100:03d}")
        if i < 100:
            os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:07d}.bin"), "wb") as f:
            off = (i * 7919) % (len(blob) - size)
            f.write(blob[off:off + size])
    t = time.perf_counter()
    keys, _, _, _ = walk(src)
    walk_s = time.perf_counter() - t
    out = {"files": files, "size": size, "walk_files_per_s": len(keys) / walk_s}
    for comp in ("none", "zstd"):
        dst = os.path.join(tmp, f"out-{comp}")
        best = None
        for _ in range(2):
            shutil.rmtree(dst, ignore_errors=True)
            rep = build_dataset(src, dst, shard_size="64MiB", compression=comp, workers=1, progress=False)
            best = rep.seconds if best is None else min(best, rep.seconds)
        out[comp] = {"files_per_s_per_core": files / best, "mb_per_s_per_core": files * size / best / 1e6}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--shards", type=int, default=1000, help="shards of the synthetic dataset (n/shards rows each)")
    ap.add_argument("--many-shards", type=int, default=100_000, help="shards of the manifest-size measurement")
    ap.add_argument("--build-files", type=int, default=20_000)
    ap.add_argument("--build-size", type=int, default=16 << 10)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="packfmt-scale-", dir=a.tmp)
    res = {"machine": f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}, "
                      f"load average {os.getloadavg()[0]:.2f}", "n": a.n, "shards": a.shards}
    try:
        for n in (a.n // 10, a.n):
            path = os.path.join(tmp, f"ds-{n}")
            r = make_dataset(path, n, max(1, a.shards * n // a.n))
            r.update(measure_open(path))
            res[f"index_{n}"] = r
            print(f"n={n:,}: index {r['index_bytes'] / n:.1f} B/sample (keys {r['key_bytes'] / n:.1f} B), "
                  f"{r['index_bytes'] / 2**20:.0f} MiB; manifest {r['manifest_bytes'] / 1024:.0f} KiB; "
                  f"commit {r['commit_s']:.2f} s; open {r['open_s'] * 1000:.0f} ms (first in a process "
                  f"{r['first_open_s'] * 1000:.0f} ms; read+xxh64 of the index: "
                  f"{(r['read_index_s'] + r['xxh64_index_s']) * 1000:.0f} ms); first index_of "
                  f"{r['index_of_first_s'] * 1000:.0f} ms; peak RSS: open +{r['rss_over_import_mib']:.0f} MiB, "
                  f"index_of +{r['rss_index_of_mib']:.0f} MiB", flush=True)
        path = os.path.join(tmp, "many-shards")
        r = make_dataset(path, a.many_shards * 10, a.many_shards)
        r.update(measure_open(path))
        res["many_shards"] = dict(r, shards=a.many_shards)
        print(f"{a.many_shards:,} shards (10 rows each): manifest {r['manifest_bytes'] / 2**20:.1f} MiB, open "
              f"{r['open_s'] * 1000:.0f} ms", flush=True)
        shutil.rmtree(path, ignore_errors=True)
        ds = packfmt.open(os.path.join(tmp, f"ds-{a.n}"))
        res["shuffle"] = measure_shuffle(a.n, np.asarray(ds.shard_of), np.asarray(ds.offsets))
        for s in res["shuffle"]:
            print(f"shuffle {s['mode']:<12} first batch {s['first_batch_ms']:8.1f} ms, peak {s['peak_mib']:7.1f} MiB "
                  f"per worker, {s['requests_per_sample']:.4f} requests/sample", flush=True)
        del ds
        res["merge"] = measure_merge(os.path.join(tmp, f"ds-{a.n}"))
        m = res["merge"]
        print(f"merge commit: concat of {m['rows']:,} rows {m['concat_s']:.2f} s ({m['concat_s'] / m['rows'] * 1e9:.0f} "
              f"ns/row); duplicate check of {m['dup_rows']:,} unique keys {m['dup_check_s']:.2f} s "
              f"({m['dup_check_s'] / m['dup_rows'] * 1e9:.0f} ns/row)", flush=True)
        shutil.rmtree(os.path.join(tmp, f"ds-{a.n // 10}"), ignore_errors=True)
        res["build"] = measure_build(tmp, a.build_files, a.build_size)
        b = res["build"]
        print(f"build of {b['files']:,} files of {b['size']:,} B, 1 worker: walk {b['walk_files_per_s']:,.0f} files/s; "
              + "; ".join(f"{c}: {b[c]['files_per_s_per_core']:,.0f} files/s/core ({b[c]['mb_per_s_per_core']:.0f} MB/s)"
                          for c in ("none", "zstd")), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
