"""packfmt.storage: range coalescing, retries, local / S3 (moto) / HTTP (nginx) stores, faults.

Servers are real and on 127.0.0.1 (see ``conftest_servers.py``); faults come from a proxy
in front of them.
"""

import errno
import multiprocessing
import os
import pickle
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packfmt.storage import LocalStore, ObjectNotFoundError, RemoteReadError, open_store
from packfmt.storage.ranges import assemble, coalesce, split
from packfmt.storage.retry import RetryPolicy, ShortReadError, is_transient

from conftest_servers import s3_options  # fixtures come in through tests/conftest.py


# ------------------------------------------------------------------------------------------
# coalescing
_REF = random.Random(1).randbytes((1 << 20) + (1 << 16) + 1)
ranges_st = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 1 << 16)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ranges_st, st.integers(0, 1 << 17), st.integers(1, 1 << 18))
def test_coalesce_covers_every_range_once_and_respects_limits(ranges, max_gap, max_request):
    plan = coalesce(ranges, max_gap, max_request)
    reqs = plan.requests
    assert len(plan.pieces) == len(ranges)
    # sorted, non-empty, disjoint
    for (a, n), (b, m) in zip(reqs, reqs[1:]):
        assert a + n <= b
    assert all(n > 0 for _, n in reqs)
    # each input range lies inside its request, at the right place
    for (off, n), p in zip(ranges, plan.pieces):
        if n == 0:
            assert p.request == -1
            continue
        roff, rlen = reqs[p.request]
        assert roff + p.start == off and p.length == n and p.start + n <= rlen
    # every request starts at some range's start and ends at some range's end: no wasted edges
    nonempty = [(o, n) for o, n in ranges if n > 0]
    starts = {o for o, _ in nonempty}
    ends = {o + n for o, n in nonempty}
    for off, n in reqs:
        assert off in starts and off + n in ends
    # neighbours were kept apart for a reason
    for (a, n), (b, m) in zip(reqs, reqs[1:]):
        assert b - (a + n) > max_gap or (b + m) - a > max_request
    # a gap is bridged only while the request stays within max_request (overlaps may grow it further)
    for ri, (off, n) in enumerate(reqs):
        members = sorted((o, o + k) for (o, k), p in zip(ranges, plan.pieces) if p.request == ri)
        reach = members[0][1]
        for s, e in members[1:]:
            if s > reach:
                assert s - reach <= max_gap and e - off <= max_request
            reach = max(reach, e)
    # assembling payloads cut from a reference buffer gives back every range
    out = assemble(plan, [_REF[o:o + n] for o, n in reqs])
    assert out == [_REF[o:o + n] for o, n in ranges]


@given(st.integers(0, 1 << 30), st.integers(1, 1 << 24), st.integers(1, 1 << 22))
def test_split_parts_are_bounded_and_contiguous(offset, length, max_request):
    max_request = max(max_request, length // 512 + 1)      # keep the number of parts testable
    parts = split(offset, length, max_request)
    assert parts[0][0] == offset and sum(n for _, n in parts) == length
    for (a, n), (b, _) in zip(parts, parts[1:]):
        assert a + n == b
    assert all(0 < n <= max_request for _, n in parts)


def test_coalesce_examples():
    assert coalesce([], 10, 100).requests == []
    assert coalesce([(5, 0)], 10, 100).requests == []
    assert coalesce([(0, 10), (15, 10)], 5, 100).requests == [(0, 25)]
    assert coalesce([(0, 10), (16, 10)], 5, 100).requests == [(0, 10), (16, 10)]
    assert coalesce([(0, 60), (60, 60)], 5, 100).requests == [(0, 60), (60, 60)]
    assert coalesce([(0, 500)], 5, 100).requests == [(0, 500)]      # split later, in parallel
    assert coalesce([(0, 10), (0, 10), (5, 10)], 0, 100).requests == [(0, 15)]
    with pytest.raises(ValueError):
        coalesce([(-1, 5)], 0, 10)


# ------------------------------------------------------------------------------------------
# retry policy
def test_retry_backoff_is_full_jitter_and_bounded():
    sleeps = []
    pol = RetryPolicy(attempts=6, base=0.1, cap=0.5, sleep=sleeps.append)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 6:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        return "ok"
    assert pol.call(flaky) == "ok"
    assert len(sleeps) == 5
    for k, s in enumerate(sleeps):
        assert 0 <= s <= min(0.5, 0.1 * 2 ** k)


def test_retry_gives_up_after_budget_and_not_on_permanent_errors():
    pol = RetryPolicy(attempts=3, base=0, sleep=lambda s: None)
    calls = []

    def always():
        calls.append(1)
        raise ShortReadError("short")
    with pytest.raises(ShortReadError):
        pol.call(always)
    assert len(calls) == 3
    calls.clear()

    def bad():
        calls.append(1)
        raise ValueError("not transient")
    with pytest.raises(ValueError):
        pol.call(bad)
    assert len(calls) == 1


def test_transient_classification():
    from botocore.exceptions import ClientError, ReadTimeoutError
    slow = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
    denied = ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")
    assert is_transient(slow) and not is_transient(denied)
    assert is_transient(ReadTimeoutError(endpoint_url="http://x"))
    assert is_transient(ConnectionResetError()) and not is_transient(KeyError())


# ------------------------------------------------------------------------------------------
# open_store and the local store
def test_open_store_dispatch(tmp_path):
    assert open_store(str(tmp_path)).is_local
    assert open_store(f"file://{tmp_path}").local_path("a") == os.path.join(str(tmp_path), "a")
    assert open_store(tmp_path).url == str(tmp_path)
    s3 = open_store("s3://bucket/a/b/", {"endpoint_url": "http://127.0.0.1:1"})
    assert (s3.bucket, s3.prefix, s3.url, s3.is_local) == ("bucket", "a/b", "s3://bucket/a/b", False)
    assert s3.object_url("m.json") == "s3://bucket/a/b/m.json" and s3.local_path("m.json") is None
    h = open_store("http://127.0.0.1:1/data/")
    assert h.object_url("shard 1.pack") == "http://127.0.0.1:1/data/shard%201.pack"
    with pytest.raises(ValueError):
        open_store("gs://bucket/x")
    with pytest.raises(TypeError, match="endpont_url"):
        open_store("s3://bucket/x", {"endpont_url": "http://x"})


def test_local_store_reads_writes_atomically(tmp_path):
    s = LocalStore(str(tmp_path / "ds"))
    data = os.urandom(100_000)
    s.put_bytes("a.bin", data)
    assert s.read_bytes("a.bin") == data and s.size("a.bin") == len(data) and s.exists("a.bin")
    rs = [(5, 10), (0, 0), (99_990, 10), (5, 10), (50_000, 30_000)]
    assert s.read_ranges("a.bin", rs) == [data[o:o + n] for o, n in rs]
    # an aborted or failed write leaves neither the object nor a temporary file
    with pytest.raises(RuntimeError):
        with s.open_write("b.bin") as w:
            w.write(b"partial")
            raise RuntimeError("boom")
    w = s.open_write("a.bin")
    w.write(b"replacement")
    assert s.read_bytes("a.bin") == data          # not visible before close
    w.close()
    assert s.read_bytes("a.bin") == b"replacement"
    assert sorted(os.listdir(tmp_path / "ds")) == ["a.bin"]
    with pytest.raises(FileNotFoundError):
        s.read_bytes("b.bin")
    with pytest.raises(OSError, match="ends after"):
        s.read_ranges("a.bin", [(0, 100)])
    s.delete("a.bin")
    assert not s.exists("a.bin")


# ------------------------------------------------------------------------------------------
# S3 on moto
def _random_ranges(rng, size, n):
    out = []
    for _ in range(n):
        off = rng.randrange(0, size)
        out.append((off, rng.randrange(0, min(size - off, 300_000) + 1)))
    return out


def test_s3_round_trip_equals_local_bytes(moto_server, s3_bucket, s3_client):
    store = open_store(f"s3://{s3_bucket}/some/prefix", s3_options(moto_server.endpoint, max_request=1 << 20))
    data = os.urandom(3_000_000)
    store.put_bytes("shard-00000.pack", data)
    assert s3_client.get_object(Bucket=s3_bucket, Key="some/prefix/shard-00000.pack")["Body"].read() == data
    assert store.read_bytes("shard-00000.pack") == data
    assert store.size("shard-00000.pack") == len(data)
    assert store.exists("shard-00000.pack") and not store.exists("nope")
    rng = random.Random(7)
    for _ in range(5):
        rs = _random_ranges(rng, len(data), 40)
        assert store.read_ranges("shard-00000.pack", rs) == [data[o:o + n] for o, n in rs]
    assert store.read_ranges("shard-00000.pack", [(0, len(data))]) == [data]   # split into 1 MiB parts
    store.stats.reset()
    assert store.read_bytes("shard-00000.pack", size=len(data)) == data          # 3 parallel ranged GETs
    assert store.stats.by_op == {"GET_RANGE": 3}
    with pytest.raises(RemoteReadError, match="beyond the end"):
        store.read_bytes("shard-00000.pack", size=len(data) + 1)
    with pytest.raises(FileNotFoundError) as ei:
        store.read_bytes("missing.json")
    assert isinstance(ei.value, ObjectNotFoundError) and "s3://" in str(ei.value)
    store.delete("shard-00000.pack")
    assert not store.exists("shard-00000.pack")


def test_s3_credentials_and_endpoint_from_environment(moto_server, s3_bucket, monkeypatch):
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)
    store = open_store(f"s3://{s3_bucket}/env")
    store.put_bytes("x", b"from the environment")
    assert store.read_ranges("x", [(5, 3)]) == [b"the"]


def test_s3_requests_are_coalesced_and_counted(moto_server, s3_bucket, s3_proxy):
    store = open_store(f"s3://{s3_bucket}/c", s3_options(s3_proxy.url, max_gap=1000, max_request=1 << 20))
    data = os.urandom(1 << 20)
    store.put_bytes("s", data)
    s3_proxy.reset()
    store.stats.reset()
    rs = [(0, 100), (600, 100), (5000, 10), (5500, 10), (900_000, 50), (10, 20)]
    assert store.read_ranges("s", rs) == [data[o:o + n] for o, n in rs]
    gets = s3_proxy.log("GET")
    assert sorted(e.range for e in gets) == ["bytes=0-699", "bytes=5000-5509", "bytes=900000-900049"]
    assert store.stats.requests == 3 and store.stats.by_op["GET_RANGE"] == 3
    assert store.stats.bytes == 700 + 510 + 50
    assert s3_proxy.s3_list_requests() == []


@pytest.mark.parametrize("fault", ["status", "reset", "truncate", "delay"])
def test_s3_reads_retry_through_faults(moto_server, s3_bucket, s3_proxy, fault):
    store = open_store(f"s3://{s3_bucket}/f", s3_options(s3_proxy.url, retries=4, read_timeout=1.0,
                                                          max_gap=0, max_request=1 << 20))
    data = os.urandom(2_500_000)
    store.put_bytes("s", data)
    s3_proxy.reset()
    store.stats.reset()
    s3_proxy.inject(fault, times=3, method="GET", delay=3.0, keep=0.3)
    rs = [(0, 10), (1000, 2_000_000), (2_400_000, 100_000)]
    assert store.read_ranges("s", rs) == [data[o:o + n] for o, n in rs]
    # one retry per fault (a slow machine may time out a healthy request too: never fewer)
    assert store.stats.retries == 3 if fault != "delay" else store.stats.retries >= 3
    assert len([e for e in s3_proxy.log("GET") if e.fault == fault]) == 3


def test_s3_fails_clearly_after_retry_budget_and_never_returns_partial(moto_server, s3_bucket, s3_proxy):
    import packfmt
    store = open_store(f"s3://{s3_bucket}/b", s3_options(s3_proxy.url, retries=3, max_gap=0))
    data = os.urandom(300_000)
    store.put_bytes("s", data)
    # one of three ranges keeps failing: the whole call fails, naming the URL and the byte range
    s3_proxy.inject("truncate", times=-1, method="GET")
    with pytest.raises(RemoteReadError) as ei:
        store.read_ranges("s", [(0, 10), (100_000, 5000), (200_000, 10)])
    msg = str(ei.value)
    assert f"s3://{s3_bucket}/b/s" in msg and "after 3 attempts" in msg and "bytes " in msg
    assert isinstance(ei.value, OSError) and isinstance(ei.value, packfmt.RemoteError)
    assert ei.value.url == f"s3://{s3_bucket}/b/s" and ei.value.byte_range in [(0, 10), (100_000, 5000),
                                                                               (200_000, 10)]
    s3_proxy.reset()
    s3_proxy.inject("status", times=-1, method="GET", code="SlowDown")
    with pytest.raises(RemoteReadError, match=r"bytes 100000-104999 failed after 3 attempts.*SlowDown"):
        store.read_ranges("s", [(100_000, 5000)])
    assert len(s3_proxy.log("GET")) == 3


def _wait_for(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_s3_multipart_upload_streams_parts_before_close(moto_server, s3_bucket, s3_client):
    part = 5 << 20
    store = open_store(f"s3://{s3_bucket}/mp", s3_options(moto_server.endpoint, part_size=part))
    chunks = [os.urandom(1 << 20) for _ in range(13)]       # 13 MiB: two full parts + a 3 MiB tail
    w = store.open_write("shard-00000.pack")
    for c in chunks[:11]:
        w.write(c)
    # two parts are already on the server while the writer is still open
    assert _wait_for(lambda: len(s3_client.list_parts(Bucket=s3_bucket, Key="mp/shard-00000.pack",
                                                      UploadId=w.upload_id).get("Parts", [])) == 2)
    assert not store.exists("shard-00000.pack")
    for c in chunks[11:]:
        w.write(memoryview(c))
    w.close()
    body = s3_client.get_object(Bucket=s3_bucket, Key="mp/shard-00000.pack")["Body"].read()
    assert body == b"".join(chunks)
    assert store.stats.by_op["UPLOAD_PART"] == 3 and store.stats.by_op["COMPLETE_MULTIPART"] == 1
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_s3_small_object_is_one_put(moto_server, s3_bucket):
    store = open_store(f"s3://{s3_bucket}", s3_options(moto_server.endpoint))
    with store.open_write("index.arrow") as w:
        w.write(b"abc")
        w.write(b"def")
    assert store.read_bytes("index.arrow") == b"abcdef"
    assert store.stats.by_op.get("CREATE_MULTIPART", 0) == 0 and store.stats.by_op["PUT"] == 1


def test_s3_writer_aborts_on_exception_leaving_no_upload(moto_server, s3_bucket, s3_client):
    store = open_store(f"s3://{s3_bucket}/ab", s3_options(moto_server.endpoint, part_size=5 << 20))
    with pytest.raises(KeyboardInterrupt):
        with store.open_write("shard-00001.pack") as w:
            w.write(os.urandom(11 << 20))
            assert _wait_for(lambda: s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"))
            raise KeyboardInterrupt
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert not store.exists("shard-00001.pack")
    assert store.stats.by_op["ABORT_MULTIPART"] == 1


def test_s3_writer_aborts_when_a_part_fails(moto_server, s3_bucket, s3_client, s3_proxy):
    store = open_store(f"s3://{s3_bucket}/pf", s3_options(s3_proxy.url, part_size=5 << 20, retries=2))
    s3_proxy.inject("status", times=-1, method="PUT", query_contains="partNumber=2", status=500,
                    code="InternalError")
    w = store.open_write("s.pack")
    with pytest.raises(RemoteReadError, match=r"UploadPart 2 of s3://.*/pf/s.pack failed after 2 attempts"):
        for _ in range(30):
            w.write(os.urandom(1 << 20))
        w.close()
    assert w.closed
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert not store.exists("s.pack")


def _child_read(store, q):
    try:
        q.put(store.read_ranges("obj", [(3, 4), (0, 2)]))
    except BaseException as e:  # pragma: no cover - reported to the parent
        q.put(repr(e))


def test_s3_store_survives_pickle_and_fork(moto_server, s3_bucket):
    method = "fork"          # spawn (a pickled copy) is covered by test_remote.py
    store = open_store(f"s3://{s3_bucket}/pk", s3_options(moto_server.endpoint))
    store.put_bytes("obj", b"0123456789")
    assert store.read_ranges("obj", [(1, 2), (5, 2)]) == [b"12", b"56"]     # client + pool exist now
    clone = pickle.loads(pickle.dumps(store))
    assert clone.read_ranges("obj", [(8, 2)]) == [b"89"] and clone.stats.requests == 1
    ctx = multiprocessing.get_context(method)
    q = ctx.Queue()
    p = ctx.Process(target=_child_read, args=(store, q))
    p.start()
    assert q.get(timeout=60) == [b"3456", b"01"]
    p.join(30)
    assert p.exitcode == 0


# ------------------------------------------------------------------------------------------
# HTTP on nginx
def test_http_round_trip_equals_local_bytes(http_dir, nginx_server):
    path, url = http_dir
    data = os.urandom(2_000_000)
    with open(os.path.join(path, "shard-00000.pack"), "wb") as f:
        f.write(data)
    store = open_store(url, {"max_request": 1 << 20, "max_gap": 4096})
    assert store.size("shard-00000.pack") == len(data)
    assert store.exists("shard-00000.pack") and not store.exists("nope.pack")
    assert store.read_bytes("shard-00000.pack") == data
    rng = random.Random(3)
    for _ in range(5):
        rs = _random_ranges(rng, len(data), 30)
        assert store.read_ranges("shard-00000.pack", rs) == [data[o:o + n] for o, n in rs]
    sub = url.rsplit("/", 1)[1]
    logged = [r for r in nginx_server.requests() if r[1].startswith(f"/{sub}/")]
    assert all(r[3] in (200, 206, 404) for r in logged)
    assert all(r[3] == 206 and r[2].startswith("bytes=") for r in logged if r[0] == "GET" and r[2] != "-")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("nope.pack")
    with pytest.raises(OSError) as ei:
        store.put_bytes("x", b"")
    assert ei.value.errno == errno.EROFS


def test_http_follows_redirects(http_dir, nginx_server):
    path, url = http_dir
    with open(os.path.join(path, "s"), "wb") as f:
        f.write(b"0123456789")
    sub = url.rsplit("/", 1)[1]
    store = open_store(f"{nginx_server.url}/redirect/{sub}")
    assert store.read_ranges("s", [(2, 3)]) == [b"234"] and store.read_bytes("s") == b"0123456789"
    assert any(r[3] == 302 and r[1] == f"/redirect/{sub}/s" for r in nginx_server.requests())


@pytest.mark.parametrize("fault", ["status", "reset", "truncate"])
def test_http_reads_retry_through_faults(http_dir, http_proxy, fault):
    path, url = http_dir
    data = os.urandom(600_000)
    with open(os.path.join(path, "s"), "wb") as f:
        f.write(data)
    store = open_store(http_proxy.url + "/" + url.rsplit("/", 1)[1], {"retries": 4, "backoff_base": 0.001,
                                                                       "max_gap": 0})
    http_proxy.inject(fault, times=3, method="GET")
    rs = [(0, 10), (100, 500_000), (599_000, 1000)]
    assert store.read_ranges("s", rs) == [data[o:o + n] for o, n in rs]
    assert store.stats.retries == 3
    http_proxy.inject(fault, times=-1, method="GET")
    with pytest.raises(RemoteReadError, match=r"bytes 100-500099 failed after 4 attempts"):
        store.read_ranges("s", [(100, 500_000)])


def test_http_server_without_range_support_is_refused(tmp_path):
    """A server that answers a Range request with 200 + the whole file must not be trusted."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    (tmp_path / "f").write_bytes(b"x" * 1000)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        store = open_store(f"http://127.0.0.1:{srv.server_address[1]}", {"retries": 3, "backoff_base": 0})
        with pytest.raises(RemoteReadError, match="instead of 206"):
            store.read_ranges("f", [(10, 5)])
        assert store.stats.requests == 1      # not retried: it cannot get better
    finally:
        srv.shutdown()
        srv.server_close()


def test_s3_upload_interrupted_by_exit_is_aborted(moto_server, s3_bucket, s3_client):
    """A process that dies of an uncaught exception (e.g. Ctrl-C) mid-upload leaves no parts behind."""
    import subprocess
    import sys
    script = f"""
import os, time, boto3
from packfmt.storage import open_store
store = open_store("s3://{s3_bucket}/x", dict(endpoint_url="{moto_server.endpoint}", aws_access_key_id="testing",
                   aws_secret_access_key="testing", region_name="us-east-1", part_size=5 << 20))
w = store.open_write("shard.pack")
w.write(os.urandom(11 << 20))
c = store.client
while not c.list_parts(Bucket="{s3_bucket}", Key="x/shard.pack", UploadId=w.upload_id).get("Parts"):
    time.sleep(0.02)
print("uploading", flush=True)
raise KeyboardInterrupt
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "uploading" in proc.stdout and "KeyboardInterrupt" in proc.stderr, proc.stderr
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert "Contents" not in s3_client.list_objects_v2(Bucket=s3_bucket)
