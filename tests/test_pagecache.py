"""The node-local page cache (packfmt.cache, src_c/pagecache.c), tested with real processes.

Synchronisation between processes uses events, barriers and pipes; fetches are counted in a file
that every fetch callback appends one line per block to (O_APPEND writes of a line are atomic).
"""

import argparse
import multiprocessing as mp
import os
import pickle
import random
import shutil
import signal
import subprocess
import threading
import time
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from packfmt.cache import PageCache, default_cache_dir, register_cli

KiB = 1024
BS = 64 * KiB  # small blocks keep the tests fast; the logic is the same at 4 MiB
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORK = mp.get_context("fork")


def blob_of(name: str, size: int) -> bytes:
    """The "remote object" `name`: deterministic bytes, different for every name."""
    return random.Random(name).randbytes(size)


class CountingFetch:
    """A fetch callback serving `blob`; logs every block it fetches to `log` (shared by processes)."""

    def __init__(self, blob: bytes, log: str, tag: str = "-", bs: int = BS):
        self.blob, self.log, self.tag, self.bs = blob, log, tag, bs

    def __call__(self, ranges):
        lines = []
        for off, n in ranges:
            assert off % self.bs == 0 and (n % self.bs == 0 or off + n == len(self.blob)), (off, n)
            for b in range(off // self.bs, (off + n + self.bs - 1) // self.bs):
                lines.append(f"{self.tag} {b}\n")
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, "".join(lines).encode())
        finally:
            os.close(fd)
        return [self.blob[off:off + n] for off, n in ranges]


def fetched(log: str) -> list:
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [tuple(line.split()) for line in f]


def disk_usage(directory: str) -> int:
    return sum(os.stat(os.path.join(directory, f)).st_blocks * 512 for f in os.listdir(directory))


@pytest.fixture
def cdir(tmp_path):
    d = tmp_path / "cache"
    d.mkdir()
    return str(d)


# ---------------------------------------------------------------------------------------------
# The C core on its own (also under ASan/UBSan)

@pytest.mark.parametrize("flags", [["-O2"], ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]],
                         ids=["O2", "asan-ubsan"])
def test_c_core(tmp_path, flags):
    exe = str(tmp_path / "test_pagecache")
    subprocess.run(["gcc", "-std=gnu11", "-Wall", "-Wextra", "-Werror", *flags, "-I", os.path.join(ROOT, "src_c"),
                    os.path.join(ROOT, "tests/c/test_pagecache.c"), os.path.join(ROOT, "src_c/pagecache.c"),
                    os.path.join(ROOT, "src_c/checksum.c"), "-lpthread", "-o", exe], check=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out = subprocess.run([exe, str(scratch)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("all ok")


# ---------------------------------------------------------------------------------------------
# Single process

def test_read_ranges_and_hits(cdir, tmp_path):
    log = str(tmp_path / "log")
    size = 5 * BS + 123  # a short last block
    blob = blob_of("a", size)
    pc = PageCache(cdir, capacity=4 << 20, block_size=BS)
    fetch = CountingFetch(blob, log)
    ranges = [(0, 10), (BS - 5, 10), (size - 7, 7), (0, size), (2 * BS, 0), (3 * BS, BS)]
    got = pc.read("ns", "a", size, ranges, fetch)
    assert [bytes(g) for g in got] == [blob[o:o + n] for o, n in ranges]
    assert sorted(int(b) for _, b in fetched(log)) == list(range(6))  # each block once, one call
    got = pc.read("ns", "a", size, ranges, fetch)
    assert [bytes(g) for g in got] == [blob[o:o + n] for o, n in ranges]
    assert len(fetched(log)) == 6  # all hits
    s = pc.stats()
    assert s["blocks"] == 6 and s["bytes_used"] == size and s["fetched_bytes"] == size
    assert s["process"]["fetch_calls"] == 1 and s["process"]["hits"] == 6
    with pytest.raises(ValueError):
        pc.read("ns", "a", size, [(size - 1, 2)], fetch)


def test_fetch_gets_merged_block_aligned_ranges(cdir):
    size = 10 * BS
    blob = blob_of("m", size)
    calls = []

    def fetch(ranges):
        calls.append(list(ranges))
        return [blob[o:o + n] for o, n in ranges]

    pc = PageCache(cdir, capacity=4 << 20, block_size=BS)
    pc.read("ns", "m", size, [(5 * BS + 1, 1)], fetch)
    pc.read("ns", "m", size, [(0, 1), (BS, 1), (4 * BS, 3 * BS), (9 * BS, 5)], fetch)
    assert calls == [[(5 * BS, BS)], [(0, 2 * BS), (4 * BS, BS), (6 * BS, BS), (9 * BS, BS)]]


@given(size=st.integers(1, 6 * BS), bs_chunks=st.sampled_from([1, 2, 3]),
       raw=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 3 * BS)), max_size=12))
def test_property_random_ranges(size, bs_chunks, raw, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pc"))
    bs = bs_chunks * BS
    blob = blob_of(str(size), size)
    ranges = [(o % size, min(n, size - o % size)) for o, n in raw]
    counts = {}

    def fetch(rs):
        for o, n in rs:
            assert o % bs == 0 and (n % bs == 0 or o + n == size)
            for b in range(o // bs, (o + n + bs - 1) // bs):
                counts[b] = counts.get(b, 0) + 1
        return [blob[o:o + n] for o, n in rs]

    with PageCache(d, capacity=8 << 20, block_size=bs) as pc:
        for _ in range(2):
            got = pc.read("ns", "obj", size, ranges, fetch)
            assert [bytes(g) for g in got] == [blob[o:o + n] for o, n in ranges]
    assert all(c == 1 for c in counts.values())


def test_namespace_separation(cdir, tmp_path):
    """Same object name, two datasets (or one rewritten at the same URL): never mixed up."""
    log = str(tmp_path / "log")
    old, new = blob_of("v1", 3 * BS), blob_of("v2", 3 * BS)
    pc = PageCache(cdir, capacity=4 << 20, block_size=BS)
    r = [(0, 3 * BS)]
    assert bytes(pc.read("sha-v1", "shard-0", 3 * BS, r, CountingFetch(old, log, "v1"))[0]) == old
    assert bytes(pc.read("sha-v2", "shard-0", 3 * BS, r, CountingFetch(new, log, "v2"))[0]) == new
    assert bytes(pc.read("sha-v1", "shard-0", 3 * BS, r, CountingFetch(old, log, "v1"))[0]) == old
    assert bytes(pc.read("sha-v1", "shard-1", 3 * BS, r, CountingFetch(new, log, "x"))[0]) == new
    assert sorted(t for t, _ in fetched(log)) == ["v1"] * 3 + ["v2"] * 3 + ["x"] * 3
    ents = pc.entries()
    assert [(e["namespace"], e["object"], e["blocks"], e["bytes"]) for e in ents] == [
        ("sha-v1", "shard-0", 3, 3 * BS), ("sha-v1", "shard-1", 3, 3 * BS), ("sha-v2", "shard-0", 3, 3 * BS)]


def test_corrupt_block_on_disk_is_refetched(cdir, tmp_path):
    log = str(tmp_path / "log")
    blob = blob_of("c", 4 * BS)
    pc = PageCache(cdir, capacity=4 << 20, block_size=4 * BS)  # 64 checksum chunks per block
    fetch = CountingFetch(blob, log, bs=4 * BS)
    pc.read("ns", "c", len(blob), [(0, 10)], fetch)
    path, off, length = pc.locate("ns", "c", 0)
    assert length == 4 * BS
    with open(path, "r+b") as f:  # flip one byte in the last quarter
        f.seek(off + 3 * BS + 77)
        b = f.read(1)
        f.seek(off + 3 * BS + 77)
        f.write(bytes([b[0] ^ 0xFF]))
    assert bytes(pc.read("ns", "c", len(blob), [(5, 10)], fetch)[0]) == blob[5:15]  # the first chunk is fine
    assert len(fetched(log)) == 1
    got = pc.read("ns", "c", len(blob), [(3 * BS + 70, 10)], fetch)[0]
    assert bytes(got) == blob[3 * BS + 70:3 * BS + 80]
    assert len(fetched(log)) == 2  # detected, dropped, fetched again
    assert pc.stats()["corruptions"] == 1
    assert bytes(pc.read("ns", "c", len(blob), [(0, len(blob))], fetch)[0]) == blob
    assert len(fetched(log)) == 2


def test_failed_fetch_releases_claims(cdir):
    blob = blob_of("f", 3 * BS)
    pc = PageCache(cdir, capacity=4 << 20, block_size=BS)

    def boom(ranges):
        raise ConnectionError("server went away")

    with pytest.raises(ConnectionError):
        pc.read("ns", "f", len(blob), [(0, len(blob))], boom)
    with pytest.raises(ValueError, match="fetch returned"):
        pc.read("ns", "f", len(blob), [(0, len(blob))], lambda rs: [blob[o:o + n - 1] for o, n in rs])
    assert pc.stats()["blocks"] == 0 and pc.stats()["blocks_fetching"] == 0
    assert bytes(pc.read("ns", "f", len(blob), [(0, len(blob))], lambda rs: [blob[o:o + n] for o, n in rs])[0]) == blob


def test_threads_fetch_each_block_once(cdir, tmp_path):
    log = str(tmp_path / "log")
    size = 16 * BS
    blob = blob_of("t", size)
    pc = PageCache(cdir, capacity=8 << 20, block_size=BS)
    barrier = threading.Barrier(4)
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        barrier.wait()
        try:
            for _ in range(30):
                rs = [(o, rng.randrange(0, min(3 * BS, size - o) + 1)) for o in
                      (rng.randrange(size) for _ in range(4))]
                got = pc.read("ns", "t", size, rs, CountingFetch(blob, log))
                assert [bytes(g) for g in got] == [blob[o:o + n] for o, n in rs]
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    blocks = [b for _, b in fetched(log)]
    assert len(blocks) == len(set(blocks))


def test_capacity_below_one_block_still_reads(cdir, tmp_path):
    log = str(tmp_path / "log")
    blob = blob_of("s", 2 * BS)
    pc = PageCache(cdir, capacity=BS, block_size=BS)  # no room for a block next to the index
    for _ in range(2):
        assert bytes(pc.read("ns", "s", 2 * BS, [(0, 2 * BS)], CountingFetch(blob, log))[0]) == blob
    assert len(fetched(log)) == 4 and pc.stats()["blocks"] == 0
    assert disk_usage(cdir) <= BS


def test_settings_adopted_while_shared_rebuilt_when_alone(cdir):
    a = PageCache(cdir, capacity=2 << 20, block_size=BS)
    assert a.block_size == BS
    b = PageCache(cdir, capacity=4 << 20, block_size=2 * BS)
    assert b.block_size == BS and b.capacity == 2 << 20  # in use: kept
    blob = blob_of("g", BS)
    b.read("ns", "g", BS, [(0, BS)], lambda rs: [blob])
    b.close()
    a.close()
    c = PageCache(cdir)  # no settings given: adopts, keeps the contents
    assert c.block_size == BS and c.stats()["blocks"] == 1
    c.close()
    d = PageCache(cdir, capacity=4 << 20, block_size=2 * BS)  # alone: rebuilt with the new settings
    assert d.block_size == 2 * BS and d.capacity == 4 << 20 and d.stats()["blocks"] == 0


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("PACKFMT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "packfmt")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == str(tmp_path / "home" / ".cache" / "packfmt")
    monkeypatch.setenv("PACKFMT_CACHE_DIR", str(tmp_path / "env"))
    assert default_cache_dir() == str(tmp_path / "env")
    assert PageCache().directory == str(tmp_path / "env")
    with pytest.raises(ValueError):
        PageCache(block_size=1000)


def test_cli_ls_and_clear(cdir, capsys):
    parser = argparse.ArgumentParser(prog="pack")
    register_cli(parser.add_subparsers(dest="command"))

    def run(*argv):
        args = parser.parse_args(list(argv))
        assert args.func(args) == 0
        return capsys.readouterr().out

    assert "no page cache" in run("cache", "ls", "--dir", cdir)
    blob = blob_of("cli", 3 * BS)
    with PageCache(cdir, capacity=4 << 20, block_size=BS) as pc:
        pc.read("sha256:abc", "shard-00000.pack", len(blob), [(0, len(blob))], lambda rs: [blob])
    out = run("cache", "ls", "--dir", cdir)
    assert "sha256:abc" in out and "shard-00000.pack" in out and "3 blocks" in out
    data_file = os.path.join(cdir, "pagecache.data")
    assert os.stat(data_file).st_blocks * 512 >= 3 * BS
    out = run("cache", "clear", "--dir", cdir)
    assert "cleared" in out
    assert os.stat(data_file).st_blocks == 0  # the space really went back to the filesystem
    assert "sha256:abc" not in run("cache", "ls", "--dir", cdir)


# ---------------------------------------------------------------------------------------------
# Several processes

def _reader(cdir, log, seed, barrier, nobj, size, reads, capacity):
    pc = PageCache(cdir, capacity=capacity, block_size=BS)
    rng = random.Random(seed)
    blobs = {f"obj{i}": blob_of(f"obj{i}", size) for i in range(nobj)}
    barrier.wait()
    for _ in range(reads):
        name = rng.choice(sorted(blobs))
        blob = blobs[name]
        rs = []
        for _ in range(rng.randrange(1, 6)):
            o = rng.randrange(size)
            rs.append((o, rng.randrange(0, min(2 * BS, size - o) + 1)))
        got = pc.read("ns", name, size, rs, CountingFetch(blob, log, name))
        if [bytes(g) for g in got] != [blob[o:o + n] for o, n in rs]:
            os._exit(3)
        if disk_usage(cdir) > capacity:
            os._exit(4)
    os._exit(0)


def _run_readers(cdir, log, nproc, **kw):
    barrier = FORK.Barrier(nproc)
    ps = [FORK.Process(target=_reader, args=(cdir, log, i, barrier), kwargs=kw) for i in range(nproc)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(120)
    assert [p.exitcode for p in ps] == [0] * nproc


def test_processes_fetch_each_block_once(cdir, tmp_path):
    log = str(tmp_path / "log")
    size = 12 * BS + 1000
    _run_readers(cdir, log, 4, nobj=3, size=size, reads=40, capacity=16 << 20)
    got = fetched(log)
    assert len(got) == len(set(got)), "a block was fetched more than once"
    # everything fetched is cached; reading it all again fetches nothing
    pc = PageCache(cdir, capacity=16 << 20, block_size=BS)
    for name, _ in set(got):
        blob = blob_of(name, size)
        assert bytes(pc.read("ns", name, size, [(0, size)], CountingFetch(blob, log, name))[0]) == blob
    again = fetched(log)
    assert len(again) == len(set(again)) and len(again) == 3 * 13
    s = pc.stats()
    assert s["blocks"] == 3 * 13 and s["evictions"] == 0


def test_processes_keep_the_budget(cdir, tmp_path):
    log = str(tmp_path / "log")
    capacity = 10 * BS
    _run_readers(cdir, log, 3, nobj=2, size=30 * BS, reads=25, capacity=capacity)
    pc = PageCache(cdir, capacity=capacity, block_size=BS)
    s = pc.stats()
    assert s["evictions"] > 0 and s["blocks"] <= s["nslots"] < 10
    assert s["index_bytes"] + s["nslots"] * BS <= capacity
    assert disk_usage(cdir) <= capacity
    pc.clear()
    assert os.stat(os.path.join(cdir, "pagecache.data")).st_blocks == 0
    assert disk_usage(cdir) <= s["index_bytes"]


def _stuck_fetcher(cdir, started, never):
    pc = PageCache(cdir, capacity=4 << 20, block_size=BS)

    def fetch(ranges):
        started.set()
        never.wait()  # until SIGKILL
        raise AssertionError("not reached")

    pc.read("ns", "k", 3 * BS, [(0, 3 * BS)], fetch)
    os._exit(5)


def _patient_reader(cdir, log, conn):
    pc = PageCache(cdir, capacity=4 << 20, block_size=BS)
    blob = blob_of("k", 3 * BS)
    got = pc.read("ns", "k", 3 * BS, [(0, 3 * BS)], CountingFetch(blob, log, "k"))
    conn.send(bytes(got[0]) == blob)
    os._exit(0)


def test_sigkill_during_fetch_then_read_again(cdir, tmp_path):
    """A fetcher killed mid-fetch: a process already waiting inherits the claim, gets right bytes."""
    log = str(tmp_path / "log")
    started, never = FORK.Event(), FORK.Event()
    killer = FORK.Process(target=_stuck_fetcher, args=(cdir, started, never))
    killer.start()
    assert started.wait(60)
    pc = PageCache(cdir, capacity=4 << 20, block_size=BS)
    assert pc.stats()["blocks_fetching"] == 3

    parent_conn, child_conn = FORK.Pipe()
    waiter = FORK.Process(target=_patient_reader, args=(cdir, log, child_conn))
    waiter.start()
    deadline = time.monotonic() + 60
    while pc.stats()["waits"] < 1:  # the waiter is blocked on the dead-to-be fetcher's claim
        assert time.monotonic() < deadline and waiter.is_alive()
        time.sleep(0.01)
    assert not parent_conn.poll()
    os.kill(killer.pid, signal.SIGKILL)
    killer.join(30)
    assert killer.exitcode == -signal.SIGKILL
    assert parent_conn.poll(60) and parent_conn.recv() is True
    waiter.join(30)
    assert waiter.exitcode == 0
    assert sorted(fetched(log)) == [("k", "0"), ("k", "1"), ("k", "2")]
    s = pc.stats()
    assert s["takeovers"] >= 1 and s["blocks"] == 3 and s["blocks_fetching"] == 0
    blob = blob_of("k", 3 * BS)
    assert bytes(pc.read("ns", "k", 3 * BS, [(0, 3 * BS)], CountingFetch(blob, log, "k"))[0]) == blob
    assert len(fetched(log)) == 3


def test_sigkill_during_fetch_nobody_waiting(cdir, tmp_path):
    """Killed with no waiter: the next reader inherits the claim without waiting.  (Had nobody
    else had the cache open, the next opener would have found it alone and freed the claims.)"""
    log = str(tmp_path / "log")
    pc = PageCache(cdir, capacity=4 << 20, block_size=BS)
    pc.stats()  # opened before the fetcher dies
    started, never = FORK.Event(), FORK.Event()
    killer = FORK.Process(target=_stuck_fetcher, args=(cdir, started, never))
    killer.start()
    assert started.wait(60)
    os.kill(killer.pid, signal.SIGKILL)
    killer.join(30)
    blob = blob_of("k", 3 * BS)
    assert bytes(pc.read("ns", "k", 3 * BS, [(BS - 3, BS + 6)], CountingFetch(blob, log, "k"))[0]) \
        == blob[BS - 3:2 * BS + 3]
    assert sorted(fetched(log)) == [("k", "0"), ("k", "1"), ("k", "2")]
    assert pc.stats()["takeovers"] == 3
    pc.close()

    # the same death with nobody else holding the cache open: the next opener recovers the slots
    killer = FORK.Process(target=_stuck_fetcher, args=(cdir, started, never))
    started.clear()
    pc = PageCache(cdir, capacity=4 << 20, block_size=BS)
    pc.clear()
    pc.close()
    killer.start()
    assert started.wait(60)
    os.kill(killer.pid, signal.SIGKILL)
    killer.join(30)
    pc = PageCache(cdir, capacity=4 << 20, block_size=BS)
    assert pc.stats()["blocks_fetching"] == 0
    assert bytes(pc.read("ns", "k", 3 * BS, [(0, 3 * BS)], CountingFetch(blob, log, "k"))[0]) == blob
    assert len(fetched(log)) == 6


def _pickled_reader(payload, log):
    pc = pickle.loads(payload)
    blob = blob_of("p", 2 * BS)
    got = pc.read("ns", "p", 2 * BS, [(0, 2 * BS)], CountingFetch(blob, log, "p"))
    assert bytes(got[0]) == blob


def test_pickle_to_spawned_process(cdir, tmp_path):
    log = str(tmp_path / "log")
    pc = PageCache(cdir, capacity=4 << 20, block_size=BS)
    blob = blob_of("p", 2 * BS)
    pc.read("ns", "p", 2 * BS, [(0, BS)], CountingFetch(blob, log, "p"))  # block 0 cached
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_pickled_reader, args=(pickle.dumps(pc), log))
    p.start()
    p.join(120)
    assert p.exitcode == 0
    assert sorted(fetched(log)) == [("p", "0"), ("p", "1")]  # the child only fetched block 1


def test_fork_inherits_open_cache(cdir, tmp_path):
    log = str(tmp_path / "log")
    pc = PageCache(cdir, capacity=4 << 20, block_size=BS)
    blob = blob_of("fk", 2 * BS)
    pc.read("ns", "fk", 2 * BS, [(0, BS)], CountingFetch(blob, log, "fk"))
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            ok = bytes(pc.read("ns", "fk", 2 * BS, [(0, 2 * BS)], CountingFetch(blob, log, "fk"))[0]) == blob
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert sorted(fetched(log)) == [("fk", "0"), ("fk", "1")]
    assert pc.stats()["blocks"] == 2


def test_interrupted_lookup_gives_claims_back(cdir):
    """An exception between claiming and fetching (Ctrl-C, say) must not leave claims behind."""
    blob = blob_of("i", 4 * BS)
    pc = PageCache(cdir, capacity=4 << 20, block_size=BS)
    real = pc._h()

    class Interrupting:
        calls = 0

        def __getattr__(self, name):
            return getattr(real, name)

        def lookup(self, *a):
            Interrupting.calls += 1
            if Interrupting.calls == 3:
                raise KeyboardInterrupt
            return real.lookup(*a)

    pc._handle = Interrupting()
    with pytest.raises(KeyboardInterrupt):
        pc.read("ns", "i", len(blob), [(0, len(blob))], lambda rs: [blob[o:o + n] for o, n in rs])
    assert pc.stats()["blocks_fetching"] == 0
    pc._handle = real
    assert bytes(pc.read("ns", "i", len(blob), [(0, len(blob))], lambda rs: [blob[o:o + n] for o, n in rs])[0]) == blob


def _gated_fetcher(cdir, log, started, gate):
    pc = PageCache(cdir, capacity=4 << 20, block_size=BS)
    blob = blob_of("st", 4 * BS)
    counting = CountingFetch(blob, log, "st")

    def fetch(ranges):
        started.set()
        assert gate.wait(60)
        return counting(ranges)

    ok = bytes(pc.read("ns", "st", 4 * BS, [(0, 4 * BS)], fetch)[0]) == blob
    os._exit(0 if ok else 1)


def _stampede_reader(cdir, log, i):
    pc = PageCache(cdir, capacity=4 << 20, block_size=BS)
    blob = blob_of("st", 4 * BS)
    rs = [(i * 1000, 3 * BS), (4 * BS - 10, 10)]
    got = pc.read("ns", "st", 4 * BS, rs, CountingFetch(blob, log, "st"))
    os._exit(0 if [bytes(g) for g in got] == [blob[o:o + n] for o, n in rs] else 1)


def test_stampede_fetches_once(cdir, tmp_path):
    """Many processes want the same blocks at the same moment: one fetches, the others wait."""
    log = str(tmp_path / "log")
    pc = PageCache(cdir, capacity=4 << 20, block_size=BS)
    started, gate = FORK.Event(), FORK.Event()
    first = FORK.Process(target=_gated_fetcher, args=(cdir, log, started, gate))
    first.start()
    assert started.wait(60)  # it holds all four blocks
    others = [FORK.Process(target=_stampede_reader, args=(cdir, log, i)) for i in range(4)]
    for p in others:
        p.start()
    deadline = time.monotonic() + 60
    # each reader finds all 4 blocks claimed (4 waits counted) before it blocks on the first one
    while pc.stats()["waits"] < 4 * len(others):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    gate.set()
    for p in [first] + others:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(fetched(log)) == [("st", str(b)) for b in range(4)]
    assert pc.stats()["takeovers"] == 0
