"""Load and concurrency: several processes hammering one dataset, readers SIGKILLed at random.

* 4 reader processes do random ``get_batch`` / ``ds[i]`` reads for a bounded time while a supervisor
  SIGKILLs a random reader every 0.5-2 s and starts a replacement.  Every sample is compared with its
  expected bytes (recomputed from its index, so nothing is shipped between processes): zero wrong bytes;
  every reader keeps making progress (a reader whose heartbeat stops for 20 s is a deadlock); survivors
  exit on time.  Run over local shards (mmap and pread readers) and over HTTP (nginx on 127.0.0.1)
  through the shared page cache with a 512 KiB budget of 64 KiB blocks for ~3 MB of shards, which forces
  constant eviction while readers die mid-fetch: the budget must hold at the end.
* RSS stays flat across 10 epochs of a DataLoader-style loop (shuffled batches, zstd decoding,
  key lookups): within 5% (+ 4 MiB) of the RSS after the first epoch.

Durations: ``PACKFMT_LOAD_SECONDS`` (default 8 per run, two runs).  Figures are printed (``-s``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import packfmt

SECONDS = float(os.environ.get("PACKFMT_LOAD_SECONDS", "8"))
READERS = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PAYLOAD_SRC = '''
import hashlib
def payload(i):
    """Deterministic sample i: sizes 0..~12 KiB, compressible for even i, random bytes for odd i."""
    h = hashlib.blake2b(b"%d" % i, digest_size=8).digest()
    n = int.from_bytes(h[:2], "little") % 12000 if i % 13 else 0
    if i % 2 == 0:
        return (b"sample %d; " % i * (n // 10 + 1))[:n]
    out = bytearray()
    while len(out) < n:
        h = hashlib.blake2b(h, digest_size=64).digest()
        out += h
    return bytes(out[:n])
'''

READER_SRC = PAYLOAD_SRC + r'''
import os, random, sys, time, json
import numpy as np
import packfmt

url, seconds, heartbeat, result, mode, cache_dir = sys.argv[1:7]
seed = int.from_bytes(os.urandom(4), "little")
rng = random.Random(seed)
opts = {"mmap": mode == "mmap"}
if cache_dir != "-":
    from packfmt.cache import PageCache
    opts = {"cache": PageCache(cache_dir)}
ds = packfmt.open(url, **opts)
n = len(ds)
expected = {}
def want(i):
    b = expected.get(i)
    if b is None:
        b = expected[i] = payload(i)
    return b
deadline = time.monotonic() + float(seconds)
samples = batches = 0
last_beat = 0.0
while time.monotonic() < deadline:
    if rng.random() < 0.2:
        i = rng.randrange(n)
        got = [ds[i]]
        rows = [i]
    else:
        rows = [rng.randrange(n) for _ in range(rng.randint(1, 256))]
        if rng.random() < 0.3:  # runs of neighbours: coalesced reads, shared cache blocks
            s = rng.randrange(n)
            rows = list(range(s, min(n, s + rng.randint(1, 200))))
        got = ds.get_batch(np.array(rows))
    for i, b in zip(rows, got):
        if b != want(i):
            with open(result, "w") as f:
                json.dump({"wrong": i, "seed": seed, "len": len(b), "want_len": len(want(i))}, f)
            sys.exit(3)
    samples += len(rows)
    batches += 1
    now = time.monotonic()
    if now - last_beat > 0.2:
        with open(heartbeat, "w") as f:
            f.write(str(samples))
        last_beat = now
with open(result, "w") as f:
    json.dump({"samples": samples, "batches": batches, "seed": seed}, f)
'''


def _payload_fn():
    ns = {}
    exec(PAYLOAD_SRC, ns)
    return ns["payload"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    payload = _payload_fn()
    d = str(tmp_path_factory.mktemp("load") / "ds")
    with packfmt.Writer(d, shard_size="512KiB", compression="zstd") as w:
        for i in range(1200):
            w.add(f"s/{i:05d}", payload(i))
    return d


def _hammer(tmp_path, url, modes, cache_dir="-", seconds=SECONDS):
    """Run READERS readers for `seconds`, SIGKILLing one at random every 0.5-2 s. Returns figures."""
    script = tmp_path / "reader.py"
    script.write_text(READER_SRC)
    rng = random.Random()
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = {}
    started = killed = 0
    results = []

    def start(slot):
        nonlocal started
        hb = tmp_path / f"hb-{started}"
        res = tmp_path / f"res-{started}"
        mode = modes[started % len(modes)]
        remaining = max(1.0, end - time.monotonic())
        p = subprocess.Popen([sys.executable, str(script), url, str(remaining), str(hb), str(res), mode, cache_dir],
                             env=env, stderr=subprocess.PIPE)
        procs[slot] = (p, hb, res, time.monotonic())
        started += 1

    end = time.monotonic() + seconds
    for slot in range(READERS):
        start(slot)
    next_kill = time.monotonic() + rng.uniform(0.5, 2.0)
    last_progress = {}
    while time.monotonic() < end:
        time.sleep(0.1)
        now = time.monotonic()
        for slot, (p, hb, res, t0) in list(procs.items()):
            if p.poll() is not None:
                err = p.stderr.read().decode(errors="replace")
                assert p.returncode == 0, f"reader exited {p.returncode}: {res.read_text() if res.exists() else ''}\n{err[-3000:]}"
                results.append(json.loads(res.read_text()))
                del procs[slot]
                if end - now > 1.5:
                    start(slot)
                continue
            beat = hb.read_text() if hb.exists() else ""
            if beat != last_progress.get(hb, (None, 0))[0]:
                last_progress[hb] = (beat, now)
            stalled_since = last_progress.get(hb, (None, t0))[1]
            assert now - stalled_since < 20, f"reader {p.pid} made no progress for 20 s: deadlock?"
        if now >= next_kill and procs and end - now > 1.5:
            slot = rng.choice(sorted(procs))
            p = procs.pop(slot)[0]
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            killed += 1
            start(slot)
            next_kill = now + rng.uniform(0.5, 2.0)
    for slot, (p, hb, res, t0) in procs.items():
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail("a reader did not finish after its deadline: deadlock?")
        err = p.stderr.read().decode(errors="replace")
        assert p.returncode == 0, f"reader exited {p.returncode}: {res.read_text() if res.exists() else ''}\n{err[-3000:]}"
        results.append(json.loads(res.read_text()))
    assert all("wrong" not in r for r in results)
    samples = sum(r["samples"] for r in results)
    return {"readers_started": started, "killed": killed, "finished": len(results), "samples": samples,
            "batches": sum(r["batches"] for r in results), "samples_per_s": samples / seconds}


def test_readers_under_sigkill_local(dataset, tmp_path):
    figures = _hammer(tmp_path, dataset, ["mmap", "pread"])
    print(f"\nlocal shards, {READERS} readers, {SECONDS:.0f} s: {figures}")
    assert figures["killed"] >= 2 and figures["samples"] > 0


def test_readers_under_sigkill_http_page_cache(dataset, tmp_path, http_dir):
    import shutil

    root, url = http_dir
    for name in os.listdir(dataset):
        shutil.copy(os.path.join(dataset, name), os.path.join(root, name))
    from packfmt.cache import PageCache

    cache_dir = str(tmp_path / "cache")
    budget = 512 << 10
    pc = PageCache(cache_dir, capacity=budget, block_size=64 << 10)
    pc.stats()  # create it with this budget; readers adopt it
    total = sum(os.path.getsize(os.path.join(dataset, f)) for f in os.listdir(dataset) if f.endswith(".pack"))
    assert total > 4 * budget
    figures = _hammer(tmp_path, url, ["http"], cache_dir=cache_dir)
    st = PageCache(cache_dir).stats()
    print(f"\nHTTP + page cache ({budget >> 10} KiB budget for {total >> 10} KiB of shards), {READERS} readers, "
          f"{SECONDS:.0f} s: {figures}; cache: " + ", ".join(f"{k}={st[k]}" for k in
                                                            ("bytes_used", "blocks", "evictions", "hits", "misses",
                                                             "takeovers", "repairs", "corruptions")))
    assert st["bytes_used"] <= st["capacity"] == budget
    assert st["evictions"] > 0 and figures["killed"] >= 2
    # After the storm, one more reader still gets every sample right through the same cache.
    ds = packfmt.open(url, cache=PageCache(cache_dir))
    payload = _payload_fn()
    got = ds.get_batch(list(range(len(ds))))
    assert all(b == payload(i) for i, b in enumerate(got))


RSS_SRC = PAYLOAD_SRC + r'''
import sys, json, numpy as np, packfmt
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
ds = packfmt.open(sys.argv[1], mmap=sys.argv[2] == "mmap")
n = len(ds)
figures = []
for epoch in range(10):
    order = np.random.default_rng(epoch).permutation(n)
    for s in range(0, n, 64):
        rows = order[s:s + 64]
        batch = ds.get_batch(rows)
        assert len(batch) == len(rows)
        if s % 640 == 0:
            assert ds[int(rows[0])] == batch[0]
            assert ds.index_of(ds.key(int(rows[0]))) == int(rows[0])
    figures.append(rss())
print(json.dumps(figures))
'''


@pytest.mark.parametrize("mode", ["mmap"])
def test_rss_flat_across_epochs(dataset, tmp_path, mode):
    script = tmp_path / "rss.py"
    script.write_text(RSS_SRC)
    from test_leaks import child_env

    r = subprocess.run([sys.executable, str(script), dataset, mode], capture_output=True, text=True, timeout=300,
                       env=child_env())
    assert r.returncode == 0, r.stderr[-3000:]
    rss = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\nRSS per epoch ({mode}), MiB: {[round(x / 2**20, 1) for x in rss]}")
    assert rss[-1] <= rss[0] * 1.05 + (4 << 20), rss
