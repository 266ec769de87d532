"""packfmt.remote.RemoteReader over S3 (moto) and HTTP (nginx), with and without a page cache,
and datasets built to / read from S3 end to end."""

import multiprocessing
import os
import pickle
import random
import threading

import numpy as np
import pytest

from packfmt.remote import RemoteReader
from packfmt.storage import RemoteReadError, open_store

pytest_plugins = ["conftest_servers"]
from conftest_servers import s3_options  # noqa: E402


class DictCache:
    """A minimal in-process stand-in for ``packfmt.cache.PageCache``'s ``read`` contract:
    block-aligned misses go to ``fetch``; hits are served from memory."""

    def __init__(self, block_size=1 << 16):
        self.block_size = block_size
        self.blocks = {}
        self.fetched_blocks = 0
        self.lock = threading.Lock()

    def read(self, namespace, name, size, ranges, fetch):
        bs = self.block_size
        need = sorted({b for off, n in ranges if n for b in range(off // bs, (off + n - 1) // bs + 1)})
        with self.lock:
            missing = [b for b in need if (namespace, name, b) not in self.blocks]
        if missing:
            got = fetch([(b * bs, min(bs, size - b * bs)) for b in missing])
            with self.lock:
                for b, data in zip(missing, got):
                    assert len(data) == min(bs, size - b * bs)
                    self.blocks[(namespace, name, b)] = bytes(data)
                    self.fetched_blocks += 1
        out = []
        for off, n in ranges:
            parts = []
            pos = off
            while pos < off + n:
                b = pos // bs
                blk = self.blocks[(namespace, name, b)]
                take = min(off + n, (b + 1) * bs) - pos
                parts.append(blk[pos - b * bs:pos - b * bs + take])
                pos += take
            out.append(b"".join(parts))
        return out


def _make_shards(rng, n_shards=3, size=400_000):
    return [rng.randbytes(size + 1000 * i) for i in range(n_shards)]


def _batch(rng, shards, n):
    ids, offs, lens = [], [], []
    for _ in range(n):
        s = rng.randrange(len(shards))
        off = rng.randrange(len(shards[s]))
        ln = rng.randrange(0, min(5000, len(shards[s]) - off) + 1)
        ids.append(s), offs.append(off), lens.append(ln)
    ids += ids[:3]; offs += offs[:3]; lens += lens[:3]    # repeats   # noqa: E702
    return np.array(ids), np.array(offs, dtype=np.uint64), np.array(lens, dtype=np.uint32)


def _expected(shards, ids, offs, lens):
    return [shards[s][o:o + n] for s, o, n in zip(ids.tolist(), offs.tolist(), lens.tolist())]


@pytest.fixture
def s3_shards(moto_server, s3_bucket, s3_proxy):
    rng = random.Random(11)
    shards = _make_shards(rng)
    store = open_store(f"s3://{s3_bucket}/ds", s3_options(moto_server.endpoint))
    names = [f"shard-{i:05d}.pack" for i in range(len(shards))]
    for name, data in zip(names, shards):
        store.put_bytes(name, data)
    s3_proxy.reset()
    return open_store(f"s3://{s3_bucket}/ds", s3_options(s3_proxy.url, max_gap=4096)), names, shards


@pytest.mark.parametrize("cached", [False, True])
def test_reader_s3_batches_in_request_order(s3_shards, s3_proxy, cached):
    store, names, shards = s3_shards
    cache = DictCache() if cached else None
    reader = RemoteReader(store, "ns-1", names, [len(s) for s in shards], cache=cache)
    rng = random.Random(5)
    for _ in range(4):
        ids, offs, lens = _batch(rng, shards, 200)
        assert reader.read(ids, offs, lens) == _expected(shards, ids, offs, lens)
    assert reader.read([], [], []) == []
    assert s3_proxy.s3_list_requests() == []
    if cached:
        # every block went over the wire once; a second pass is served from the cache
        before = store.stats.requests
        assert cache.fetched_blocks == len(cache.blocks)
        assert reader.read(ids, offs, lens) == _expected(shards, ids, offs, lens)
        assert store.stats.requests == before


def test_reader_coalesces_a_sequential_batch_into_few_requests(s3_shards, s3_proxy):
    store, names, shards = s3_shards
    reader = RemoteReader(store, "ns", names, [len(s) for s in shards], cache=None, max_gap=0,
                          max_request=1 << 30)
    # 300 neighbouring records of shard 1, requested in shuffled order -> one GET
    offs = np.arange(0, 300 * 1000, 1000, dtype=np.uint64)
    perm = np.random.default_rng(0).permutation(300)
    ids, offs, lens = np.ones(300, np.int64), offs[perm], np.full(300, 1000, np.uint32)
    store.stats.reset()
    assert reader.read(ids, offs, lens) == _expected(shards, ids, offs, lens)
    assert store.stats.requests == 1
    assert [e.range for e in s3_proxy.log("GET")] == ["bytes=0-299999"]


def test_reader_http(http_dir, http_proxy):
    path, url = http_dir
    rng = random.Random(2)
    shards = _make_shards(rng, 2)
    names = ["a.pack", "b.pack"]
    for name, data in zip(names, shards):
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    store = open_store(http_proxy.url + "/" + url.rsplit("/", 1)[1], {"retries": 5, "backoff_base": 0.001})
    reader = RemoteReader(store, "h", names, [len(s) for s in shards], cache=DictCache(1 << 15))
    http_proxy.inject("reset", times=2, method="GET")
    http_proxy.inject("truncate", times=2, method="GET")
    ids, offs, lens = _batch(rng, shards, 300)
    assert reader.read(ids, offs, lens) == _expected(shards, ids, offs, lens)
    assert store.stats.retries == 4


def test_reader_error_is_clear_and_whole(s3_shards, s3_proxy):
    store, names, shards = s3_shards
    reader = RemoteReader(store, "ns", names, [len(s) for s in shards], cache=None)
    s3_proxy.inject("status", times=-1, method="GET", path_contains=names[2])
    ids = np.array([0, 2, 1])
    with pytest.raises(RemoteReadError, match=rf"{names[2]} bytes 10-19 failed after 4 attempts"):
        reader.read(ids, np.array([0, 10, 0]), np.array([10, 10, 10]))
    with pytest.raises(ValueError, match="beyond the end"):
        reader.read(np.array([0]), np.array([len(shards[0]) - 5]), np.array([10]))
    with pytest.raises(IndexError):
        reader.read(np.array([3]), np.array([0]), np.array([1]))


def _child(reader, q):
    try:
        q.put(reader.read(np.array([0, 1]), np.array([5, 7]), np.array([3, 4])))
    except BaseException as e:  # pragma: no cover
        q.put(repr(e))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_reader_is_picklable_and_fork_safe(s3_shards, method):
    store, names, shards = s3_shards
    reader = RemoteReader(store, "ns", names, [len(s) for s in shards], cache=None)
    assert reader.read(np.array([2]), np.array([0]), np.array([4])) == [shards[2][:4]]
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read(np.array([1]), np.array([1]), np.array([2])) == [shards[1][1:3]]
    ctx = multiprocessing.get_context(method)
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(reader, q))
    p.start()
    assert q.get(timeout=60) == [shards[0][5:8], shards[1][7:11]]
    p.join(30)
    assert p.exitcode == 0
