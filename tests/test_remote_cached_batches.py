"""Remote reads served from a warm page cache by one C call per batch (pk_pc_read_records): the bytes
equal local reads whatever mix of cached and missing blocks a batch meets, only the missing blocks are
fetched, and every integrity rule of the fetch path still holds (corrupt cached blocks dropped and
fetched again, bad bytes kept from the server dropped and fetched again, clear errors when the server
keeps sending them, blocks fetched once across processes, eviction under readers).

The datasets are served by nginx; fetches are counted by wrapping ``RemoteReader._fetch``, the page
cache's miss handler (one call per group of claimed blocks of one shard)."""

import multiprocessing as mp
import os
import pickle
import random
import shutil
import threading
import uuid

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import packfmt
from packfmt import _core
from packfmt.cache import PageCache
from packfmt.remote import RemoteReader

BS = 64 << 10  # the smallest cache block: many records span two or three blocks
FORK = mp.get_context("fork")


def _payloads(seed, n):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = rng.random()
        size = 0 if r < 0.05 else rng.randrange(1, 300) if r < 0.5 else rng.randrange(300, 6000) if r < 0.96 \
            else rng.randrange(BS, 3 * BS)
        out.append(rng.randbytes(size))
    return out


def _build(path, payloads, compression):
    with packfmt.Writer(path, shard_size="48KiB", compression=compression) as w:
        for i, p in enumerate(payloads):
            w.add(f"k/{i:04d}-é", p)


@pytest.fixture(scope="module")
def served(nginx_server):
    """(local dir, URL, payloads): a raw and a zstd dataset of the same samples in many small shards."""
    sub = uuid.uuid4().hex[:12]
    root = os.path.join(nginx_server.root, sub)
    os.makedirs(root)
    payloads = _payloads(3, 400)
    _build(os.path.join(root, "raw"), payloads, "none")
    _build(os.path.join(root, "zstd"), payloads, "zstd")
    yield root, f"{nginx_server.url}/{sub}", payloads
    shutil.rmtree(root, ignore_errors=True)


class FetchLog:
    """Wraps RemoteReader._fetch to record every block it fetches as (shard name, block number)."""

    def __init__(self, monkeypatch=None, path=None):
        self.blocks, self.path = [], path
        orig = RemoteReader._fetch
        log = self

        def spy(reader, name, ranges):
            ranges = list(ranges)
            got = [(name, b) for off, n in ranges for b in range(off // BS, (off + n + BS - 1) // BS)]
            log.blocks.extend(got)
            if log.path:
                fd = os.open(log.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, "".join(f"{nm} {b}\n" for nm, b in got).encode())
                finally:
                    os.close(fd)
            return orig(reader, name, ranges)

        if monkeypatch is not None:
            monkeypatch.setattr(RemoteReader, "_fetch", spy)
        else:
            RemoteReader._fetch = spy


def _blocks_of(ds, i):
    """(shard name, block) pairs holding sample i's stored bytes."""
    off, n = int(ds.offsets[i]), int(ds.stored_lengths[i])
    name = ds.shards[int(ds.shard_of[i])]
    return {(name, b) for b in range(off // BS, (off + max(n, 1) - 1) // BS + 1)}


def _flip_cached_byte(cache, ds, shard_name, pos):
    """Flip the byte at position pos of a shard inside the page cache's data file."""
    path, off, length = cache.locate(ds.content_id, shard_name, pos // BS)
    with open(path, "r+b") as f:
        f.seek(off + pos % BS)
        b = f.read(1)
        f.seek(off + pos % BS)
        f.write(bytes([b[0] ^ 0x5A]))


@pytest.fixture(scope="module")
def pair(served, tmp_path_factory):
    """{codec: (local dataset, remote dataset, its cache)}, one cache shared by the examples of a test."""
    root, url, payloads = served
    cache = PageCache(str(tmp_path_factory.mktemp("cache")), capacity="64MiB", block_size=BS)
    return {c: (packfmt.open(os.path.join(root, c)), packfmt.open(f"{url}/{c}", cache=cache), cache)
            for c in ("raw", "zstd")}


@given(batch=st.lists(st.integers(-400, 399), max_size=120), evict=st.lists(st.integers(0, 399), max_size=6),
       codec=st.sampled_from(["raw", "zstd"]))
def test_batches_equal_local_reads_across_shards_and_partial_hits(pair, batch, evict, codec):
    local, remote, cache = pair[codec]
    for i in evict:  # some blocks gone: a batch mixes cached and missing blocks
        cache.invalidate(remote.content_id, remote.shards[int(remote.shard_of[i])],
                         [(int(remote.offsets[i]), int(remote.stored_lengths[i]))])
    want = local.get_batch(batch)
    assert remote.get_batch(batch) == want
    buf, offsets = remote.get_batch_packed(batch)
    assert [bytes(buf[offsets[k]:offsets[k + 1]]) for k in range(len(batch))] == want
    for k, i in enumerate(batch[:4]):
        assert remote[i] == want[k]


def test_warm_reads_make_no_requests(served, nginx_server, tmp_path, monkeypatch):
    root, url, payloads = served
    cache = PageCache(str(tmp_path / "cache"), capacity="64MiB", block_size=BS)
    ds = packfmt.open(f"{url}/raw", cache=cache)
    assert ds.get_batch(range(len(ds))) == payloads
    log = FetchLog(monkeypatch)
    before, hits = len(nginx_server.requests()), cache.stats()["hits"]
    idx = np.random.default_rng(2).permutation(len(ds))
    assert ds.get_batch(idx) == [payloads[i] for i in idx]
    buf, off = ds.get_batch_packed(idx[:50])
    assert bytes(buf) == b"".join(payloads[i] for i in idx[:50])
    assert [ds[int(i)] for i in idx[:20]] == [payloads[i] for i in idx[:20]]
    assert log.blocks == [] and len(nginx_server.requests()) == before
    assert cache.stats()["hits"] > hits
    # a fresh dataset object (another DataLoader worker) is served from the same blocks
    again = packfmt.open(f"{url}/zstd", cache=cache)
    assert again.get_batch(idx[:100]) == [payloads[i] for i in idx[:100]]
    n = len(nginx_server.requests())
    assert again.get_batch(idx[:100]) == [payloads[i] for i in idx[:100]]
    assert len(nginx_server.requests()) == n


def test_partial_hits_fetch_only_the_missing_blocks(served, tmp_path, monkeypatch):
    root, url, payloads = served
    cache = PageCache(str(tmp_path / "cache"), capacity="64MiB", block_size=BS)
    ds = packfmt.open(f"{url}/raw", cache=cache)
    ds.get_batch(range(len(ds)))
    victims = [i for i in range(len(ds)) if ds.stored_lengths[i] > 100]
    victims = [victims[5], victims[len(victims) // 2], victims[-3]]
    gone = set()
    for i in victims:
        gone |= _blocks_of(ds, i)
        cache.invalidate(ds.content_id, ds.shards[int(ds.shard_of[i])],
                         [(int(ds.offsets[i]), int(ds.stored_lengths[i]))])
    log = FetchLog(monkeypatch)
    idx = np.random.default_rng(5).permutation(len(ds))
    assert ds.get_batch(idx) == [payloads[i] for i in idx]
    assert sorted(log.blocks) == sorted(gone)


@pytest.mark.parametrize("verify", [True, False])
def test_corrupt_cached_block_is_detected_and_refetched(served, tmp_path, monkeypatch, verify):
    root, url, payloads = served
    cache = PageCache(str(tmp_path / "cache"), capacity="64MiB", block_size=BS)
    ds = packfmt.open(f"{url}/raw", cache=cache, verify=verify)
    ds.get_batch(range(len(ds)))
    i = next(i for i in range(len(ds)) if 200 < ds.stored_lengths[i] < 4000 and len(_blocks_of(ds, i)) == 1)
    name = ds.shards[int(ds.shard_of[i])]
    _flip_cached_byte(cache, ds, name, int(ds.offsets[i]) + 7)  # inside the record
    log = FetchLog(monkeypatch)
    others = [j for j in range(len(ds)) if ds.shard_of[j] != ds.shard_of[i]][:30]
    assert ds.get_batch(others + [i]) == [payloads[j] for j in others + [i]]
    assert log.blocks == sorted(_blocks_of(ds, i)) and cache.stats()["corruptions"] == 1
    assert ds[i] == payloads[i] and len(log.blocks) == 1  # the block was fetched again and cached
    # ds[i] and packed reads meet the same check
    j = next(j for j in range(len(ds)) if 200 < ds.stored_lengths[j] < 4000 and len(_blocks_of(ds, j)) == 1
             and not _blocks_of(ds, j) & _blocks_of(ds, i))
    _flip_cached_byte(cache, ds, ds.shards[int(ds.shard_of[j])], int(ds.offsets[j]) + 3)
    assert ds[j] == payloads[j]
    assert cache.stats()["corruptions"] == 2 and len(log.blocks) == 2
    _flip_cached_byte(cache, ds, ds.shards[int(ds.shard_of[j])], int(ds.offsets[j]) + 1)
    buf, _ = ds.get_batch_packed([j, i])
    assert bytes(buf) == payloads[j] + payloads[i]
    assert cache.stats()["corruptions"] == 3 and len(log.blocks) == 3


@pytest.mark.parametrize("verify", [True, False])
def test_corruption_is_found_by_the_read_that_covers_it(served, tmp_path, monkeypatch, verify):
    """Each record's copy is checked against its checksum (also with verify=False, which only stops the
    check of what the server sent): a flipped byte in a neighbour's bytes does not disturb a record
    sharing its 4 KiB chunk, and is caught -- block dropped, fetched again -- by the read of the
    neighbour."""
    root, url, payloads = served
    cache = PageCache(str(tmp_path / "cache"), capacity="64MiB", block_size=BS)
    ds = packfmt.open(f"{url}/raw", cache=cache, verify=verify)
    ds.get_batch(range(len(ds)))
    i = next(i for i in range(len(ds) - 1) if 50 < ds.stored_lengths[i] < 600 and 50 < ds.stored_lengths[i + 1]
             and ds.shard_of[i] == ds.shard_of[i + 1] and int(ds.offsets[i]) % 4096 < 3000
             and len(_blocks_of(ds, i) | _blocks_of(ds, i + 1)) == 1)
    end = int(ds.offsets[i]) + int(ds.stored_lengths[i])
    assert int(ds.offsets[i + 1]) == end and end // 4096 == int(ds.offsets[i]) // 4096  # one chunk
    _flip_cached_byte(cache, ds, ds.shards[int(ds.shard_of[i])], end + 1)  # record i + 1's second byte
    log = FetchLog(monkeypatch)
    assert ds.get_batch([i]) == [payloads[i]] and ds[i] == payloads[i]
    assert (cache.stats()["corruptions"], log.blocks) == (0, [])
    assert ds.get_batch([i, i + 1]) == [payloads[i], payloads[i + 1]]
    assert cache.stats()["corruptions"] == 1 and log.blocks == sorted(_blocks_of(ds, i))


def _corrupt_on_server(path, pos):
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))


def test_bad_bytes_kept_from_the_server_are_dropped_and_refetched(served, tmp_path, monkeypatch):
    """The server sends a wrong record; the cache keeps the (intact) block; reads through the batch path
    then see a record checksum mismatch, drop the block, fetch it again, and report the sample clearly
    while the server keeps sending bad bytes, and serve it right once the server is fixed."""
    root, url, payloads = served
    cache = PageCache(str(tmp_path / "cache"), capacity="64MiB", block_size=BS)
    ds = packfmt.open(f"{url}/raw", cache=cache)
    ok = [i for i in range(len(ds)) if 100 < ds.stored_lengths[i] < 4000 and len(_blocks_of(ds, i)) == 1]
    victims = []
    for i in ok:  # three samples in three different shards
        if all(ds.shard_of[i] != ds.shard_of[v] for v in victims):
            victims.append(i)
        if len(victims) == 3:
            break
    paths = [os.path.join(root, "raw", ds.shards[int(ds.shard_of[v])]) for v in victims]
    for p, v in zip(paths, victims):
        _corrupt_on_server(p, int(ds.offsets[v]) + 9)
    reads = [lambda v: ds.get_batch([v])[0], lambda v: ds[v],
             lambda v: bytes(ds.get_batch_packed([v])[0])]
    try:
        for rounds in range(2):  # cold (fetch path), then with the bad block cached (batch path)
            for read, v in zip(reads, victims):
                with pytest.raises(packfmt.CorruptShardError) as ei:
                    read(v)
                assert ei.value.sample == v and ei.value.offset == int(ds.offsets[v])
                assert ds.shards[int(ds.shard_of[v])] in str(ei.value)
    finally:
        for p, v in zip(paths, victims):
            _corrupt_on_server(p, int(ds.offsets[v]) + 9)  # the server is fixed
    log = FetchLog(monkeypatch)
    for read, v in zip(reads, victims):
        assert read(v) == payloads[v]
    assert sorted(log.blocks) == sorted(set().union(*(_blocks_of(ds, v) for v in victims)))
    assert cache.stats()["corruptions"] == 0  # the cache never held wrong bytes of its own making
    assert ds.get_batch(victims) == [payloads[v] for v in victims] and len(log.blocks) == 3


def _process_reader(url, cdir, log, seed, barrier, payloads):
    FetchLog(path=log)
    ds = packfmt.open(url, cache=PageCache(cdir, capacity="64MiB", block_size=BS))
    rng = np.random.default_rng(seed)
    barrier.wait()
    for _ in range(12):
        idx = rng.integers(0, len(ds), 40)
        if ds.get_batch(idx) != [payloads[i] for i in idx]:
            os._exit(3)
        j = int(idx[0])
        if ds[j] != payloads[j]:
            os._exit(4)
    os._exit(0)


def test_processes_fetch_each_block_once(served, tmp_path):
    root, url, payloads = served
    cdir, log = str(tmp_path / "cache"), str(tmp_path / "log")
    barrier = FORK.Barrier(3)
    ps = [FORK.Process(target=_process_reader, args=(f"{url}/raw", cdir, log, s, barrier, payloads))
          for s in range(3)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(120)
    assert [p.exitcode for p in ps] == [0, 0, 0]
    with open(log) as f:
        blocks = f.read().split("\n")[:-1]
    assert blocks and len(blocks) == len(set(blocks)), "a block was fetched more than once"
    s = PageCache(cdir).stats()
    assert s["blocks"] == len(blocks) and s["evictions"] == 0 and s["hits"] > 0


@pytest.mark.parametrize("verify", [True, False])
def test_eviction_under_concurrent_batch_reads(served, tmp_path, verify):
    """A cache of a few blocks and four threads reading random batches: blocks are evicted and reused
    while others copy out of them; every batch still equals the local read."""
    root, url, payloads = served
    cache = PageCache(str(tmp_path / "cache"), capacity=10 * BS, block_size=BS)
    ds = packfmt.open(f"{url}/raw", cache=cache, verify=verify)
    errors = []
    barrier = threading.Barrier(4)

    def worker(seed):
        rng = np.random.default_rng(seed)
        barrier.wait()
        try:
            for _ in range(15):
                lo = int(rng.integers(0, len(ds) - 40))
                idx = rng.integers(lo, lo + 40, 25)  # a neighbourhood: hits and misses mixed
                assert ds.get_batch(idx) == [payloads[i] for i in idx]
        except BaseException as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[0]
    s = cache.stats()
    assert s["evictions"] > 0 and s["corruptions"] == 0


def test_malformed_records_are_refused(served, tmp_path):
    root, url, payloads = served
    cache = PageCache(str(tmp_path / "cache"), capacity="64MiB", block_size=BS)
    ds = packfmt.open(f"{url}/raw", cache=cache)
    ds.get_batch(range(len(ds)))
    c = ds._cols
    names, sizes = ds.shards, [s["size"] for s in ds.manifest["shards"]]
    h = cache._h()
    rows = np.arange(len(ds), dtype=np.int64)
    status = np.empty(len(ds), np.uint8)

    def records(**cols):
        base = dict(shard=c["shard"], offset=c["offset"], stored_len=c["stored_len"], checksum=c["checksum"])
        base.update(cols)
        return _core.PageCacheRecords(ds.content_id, names, sizes, base["shard"], base["offset"],
                                      base["stored_len"], base["checksum"])

    good = records()
    out = [None] * len(ds)
    h.read_rows(good, rows, True, status, out)
    assert not status.any() and out == payloads
    offset = c["offset"].copy()
    offset[17] = sizes[int(c["shard"][17])] - 3  # runs past the end of its shard
    with pytest.raises(ValueError, match=rf"{names[int(c['shard'][17])]}: sample 17 at offset {offset[17]}"):
        h.read_rows(records(offset=offset), rows, True, status, [None] * len(ds))
    offset[17] = np.uint64(2**64 - 1)
    with pytest.raises(ValueError, match="sample 17"):
        h.read_row(records(offset=offset), 17, True)
    shard = c["shard"].copy()
    shard[3] = len(names)  # a shard the manifest does not have
    with pytest.raises(ValueError, match=f"<shard {len(names)}>: sample 3"):
        h.read_rows_into(records(shard=shard), rows[:5], True, status, bytearray(1 << 20),
                         np.zeros(5, np.uint64))
    with pytest.raises(IndexError):
        h.read_row(good, len(ds), True)
    with pytest.raises(ValueError, match="buffer too small"):
        h.read_rows_into(good, rows[:5], True, status, bytearray(10), np.zeros(5, np.uint64))
    with pytest.raises(ValueError, match="differ in length"):
        _core.PageCacheRecords(ds.content_id, names, sizes, c["shard"][:5], c["offset"], c["stored_len"],
                               c["checksum"])
    with pytest.raises(TypeError):
        pickle.dumps(good)
    # a checksum column that does not match what the cache holds: PC_MISMATCH, never wrong bytes
    bad_sums = c["checksum"].copy()
    bad_sums[8] ^= np.uint64(1)
    out = [None] * len(ds)
    h.read_rows(records(checksum=bad_sums), rows, True, status, out)
    assert status[8] == _core.PC_MISMATCH and out[8] is None
    assert np.count_nonzero(status) == 1 and out[:8] == payloads[:8]
