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

from conftest_servers import s3_options  # fixtures come in through tests/conftest.py


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


# ------------------------------------------------------------------------------------------
# end to end: packfmt.Writer / packfmt.open on S3 and HTTP
def _samples(seed, n):
    rng = random.Random(seed)
    return [rng.randbytes(rng.choice([0, 1, 100, 3000, 20000, rng.randrange(60000)])) for _ in range(n)]


def _build(url, samples, **kw):
    import packfmt
    with packfmt.Writer(url, shard_size="2MiB", **kw) as w:
        for i, s in enumerate(samples):
            w.add(f"dir/{i:05d}.bin", s, label=i % 7)


def test_build_to_s3_read_back_identical_to_boto3_download(moto_server, s3_bucket, s3_client, s3_proxy,
                                                          tmp_path):
    import packfmt
    from packfmt.cache import PageCache
    samples = _samples(1, 1500)
    opts = s3_options(s3_proxy.url, part_size=5 << 20)
    _build(f"s3://{s3_bucket}/ds", samples, compression="zstd", storage_options=opts)
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert s3_proxy.s3_list_requests() == []          # building never lists either

    # plain boto3 downloads of every object the manifest names
    local = tmp_path / "downloaded"
    local.mkdir()
    manifest = s3_client.get_object(Bucket=s3_bucket, Key="ds/manifest.json")["Body"].read()
    (local / "manifest.json").write_bytes(manifest)
    import json
    m = json.loads(manifest)
    names = [s["name"] for s in m["shards"]] + ["index.arrow"]
    assert len(m["shards"]) >= 3
    for name in names:
        s3_client.download_file(s3_bucket, f"ds/{name}", str(local / name))
    ds_local = packfmt.open(str(local))

    cache = PageCache(str(tmp_path / "cache"), capacity="64MiB", block_size=1 << 20)
    s3_proxy.reset()
    ds = packfmt.open(f"s3://{s3_bucket}/ds", storage_options=opts, cache=cache)
    # opening: the manifest and the index, nothing per shard, never a LIST
    assert [(e.method, e.path.rsplit("/", 1)[1]) for e in s3_proxy.log()] == [
        ("GET", "manifest.json"), ("GET", "index.arrow")]
    assert len(ds) == len(samples) and ds.shards == ds_local.shards
    order = np.random.default_rng(3).permutation(len(samples))
    order = np.concatenate([order, order[:50]])            # repeats
    got = []
    for b in np.array_split(order, 10):
        got += ds.get_batch(b)
    assert got == [samples[i] for i in order] == ds_local.get_batch(order)
    assert [ds[i] for i in range(0, 1500, 101)] == [samples[i] for i in range(0, 1500, 101)]
    assert np.array_equal(ds.column("label"), ds_local.column("label"))
    # every cache block crossed the network once; a second epoch costs no request at all
    gets = s3_proxy.log("GET")[2:]
    assert gets and all(e.status == 206 for e in gets)
    spans = {}
    for e in gets:
        a, b = map(int, e.range[len("bytes="):].split("-"))
        assert a % (1 << 20) == 0 and e.sent == b - a + 1          # block-aligned, whole
        spans.setdefault(e.path, []).append((a, b))
    for path, sp in spans.items():                                  # no byte fetched twice
        sp.sort()
        assert all(b1 < a2 for (_, b1), (a2, _) in zip(sp, sp[1:])), (path, sp)
    assert sum(e.sent for e in gets) <= sum(s["size"] for s in m["shards"])
    before = len(s3_proxy.log())
    assert ds.get_batch(order[::-1]) == [samples[i] for i in order[::-1]]
    assert len(s3_proxy.log()) == before
    assert s3_proxy.s3_list_requests() == [] and s3_proxy.log("HEAD") == []

    # without a cache: straight ranged reads, each batch a few coalesced GETs
    s3_proxy.reset()
    ds_nc = packfmt.open(f"s3://{s3_bucket}/ds", storage_options=opts, cache=False)
    batch = order[:64]
    assert ds_nc.get_batch(batch) == [samples[i] for i in batch]
    assert 2 < len(s3_proxy.log("GET")) <= 2 + 64


def test_s3_dataset_reads_through_faults(moto_server, s3_bucket, s3_proxy):
    import packfmt
    samples = _samples(2, 400)
    opts = s3_options(s3_proxy.url, retries=5)
    _build(f"s3://{s3_bucket}/f", samples, storage_options=opts)
    ds = packfmt.open(f"s3://{s3_bucket}/f", storage_options=opts, cache=False)
    s3_proxy.inject("status", times=2, method="GET", code="SlowDown")
    s3_proxy.inject("reset", times=1, method="GET")
    s3_proxy.inject("truncate", times=1, method="GET")
    idx = np.random.default_rng(0).permutation(400)
    assert ds.get_batch(idx) == [samples[i] for i in idx]
    s3_proxy.inject("status", times=-1, method="GET", code="SlowDown")
    with pytest.raises(packfmt.RemoteError, match=r"s3://.*/f/shard-\d+\.pack bytes \d+-\d+ failed after 5"):
        ds.get_batch(idx[:10])


def test_s3_build_failure_leaves_no_dataset_and_no_uploads(moto_server, s3_bucket, s3_client, s3_proxy):
    import packfmt
    opts = s3_options(s3_proxy.url, part_size=5 << 20, retries=2)
    rng = random.Random(5)
    # 1) the caller's code fails in the middle of a shard being uploaded
    with pytest.raises(RuntimeError, match="boom"):
        with packfmt.Writer(f"s3://{s3_bucket}/a", shard_size="64MiB", storage_options=opts) as w:
            for i in range(400):
                w.add(f"{i}", rng.randbytes(40_000))
            assert _wait(lambda: s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"))
            raise RuntimeError("boom")
    # 2) the object store fails an upload part for good
    s3_proxy.inject("status", times=-1, method="PUT", query_contains="partNumber=2", status=500,
                    code="InternalError")
    with pytest.raises(OSError, match="UploadPart 2"):
        with packfmt.Writer(f"s3://{s3_bucket}/b", shard_size="64MiB", storage_options=opts) as w:
            for i in range(400):
                w.add(f"{i}", rng.randbytes(40_000))
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert not any(k.endswith("manifest.json") for k in keys), keys
    with pytest.raises(packfmt.PackError):
        packfmt.open(f"s3://{s3_bucket}/a", storage_options=opts)


def _wait(cond, timeout=20.0):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_http_dataset_via_nginx(http_dir, nginx_server, tmp_path):
    import packfmt
    path, url = http_dir
    samples = _samples(3, 800)
    _build(os.path.join(path, "ds"), samples, compression="zstd")
    sub = url.rsplit("/", 1)[1]
    n_before = len(nginx_server.requests())
    ds = packfmt.open(url + "/ds", cache=str(tmp_path / "cache"))
    opened = nginx_server.requests()[n_before:]
    assert [(r[0], r[1].rsplit("/", 1)[1]) for r in opened] == [("GET", "manifest.json"), ("GET", "index.arrow")]
    idx = np.random.default_rng(1).permutation(800)
    assert ds.get_batch(idx) == [samples[i] for i in idx]
    later = nginx_server.requests()[n_before + 2:]
    assert later and all(r[0] == "GET" and r[3] == 206 and r[1].startswith(f"/{sub}/ds/shard-") for r in later)
