"""The pure parts of benchmarks/peers/remote_run.py: cutting the latency proxy's request log into phases
(what is counted as a GET of the data, a listing, another request, an error) and picking the line of a
worker's error report that names the cause."""

import importlib.util
import os

from conftest_servers import Logged

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location(
        "peers_remote_run", os.path.join(REPO, "benchmarks", "peers", "remote_run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rr = _load()


def _get(path, sent, status=200, rng=None):
    return Logged("GET", path, "", rng, status=status, sent=sent)


def test_cut_splits_the_log_at_the_marks_and_classifies_requests():
    log = [
        _get("/bench/mosaic/index.json", 300),                      # epoch1 starts here
        Logged("HEAD", "/bench/mosaic/shard.00000.mds", "", None, status=200),
        _get("/bench", 900),                                         # ListObjects on the bucket
        _get("/bench/", 100, status=404),                            # a listing that failed
        _get("/bench/mosaic/shard.00000.mds", 4096, status=206, rng="bytes=0-4095"),
        _get("/bench/mosaic/shard.00000.mds", 10, status=503),     # epoch2 starts here; an error answer
        _get("/bench/mosaic/shard.00001.mds", 2000),
        _get("/bench/mosaic/shard.00000.mds", 77),                  # verify starts here
    ]
    got = rr.cut(log, {"verify": 7, "epoch1": 0, "epoch2": 5})   # marks in any order
    assert got["epoch1"] == {"gets": 2, "bytes": 300 + 4096, "lists": 2, "other": 1, "errors": 1}
    assert got["epoch2"] == {"gets": 2, "bytes": 2010, "lists": 0, "other": 0, "errors": 1}
    assert got["verify"] == {"gets": 1, "bytes": 77, "lists": 0, "other": 0, "errors": 0}
    # a phase with no request at all
    assert rr.cut(log, {"epoch1": 0, "epoch2": 8})["epoch2"] == {"gets": 0, "bytes": 0, "lists": 0, "other": 0,
                                                                "errors": 0}


def test_short_reason_finds_the_cause_in_a_dataloader_error():
    litdata = (
        "RuntimeError: Caught RuntimeError in DataLoader worker process 0.\n"
        "Original Traceback (most recent call last):\n"
        '  File "/x/torch/utils/data/_utils/worker.py", line 349, in _worker_loop\n'
        "    data = fetcher.fetch(index)\n"
        "RuntimeError: Chunk prefetch thread crashed while waiting for /tmp/c/chunk-0-0.bin. Original error: "
        "GenericError: Generic S3 error: Error performing GET http://127.0.0.1:1/b/chunk-0-0.bin - HTTP error: "
        "builder error\n")
    assert rr.short_reason(litdata) == ("GenericError: Generic S3 error: Error performing GET "
                                        "http://127.0.0.1:1/b/chunk-0-0.bin - HTTP error: builder error")
    assert rr.short_reason("ValueError: x\nmore context") == "ValueError: x"
    assert rr.short_reason("worker exited 1 without a result") == "worker exited 1 without a result"
    assert rr.short_reason("") == "?"
    assert len(rr.short_reason("OSError: " + "x" * 1000, limit=50)) == 50


def test_rows_report_failures_with_their_reason_and_ratios_against_loose():
    ep = {"samples": 100, "seconds": 2.0, "cpu_seconds": 1.0, "first_batch_s": 0.5, "load1": 1.0}
    px = {"gets": 10, "bytes": 2000, "lists": 0, "other": 1, "errors": 0}
    results = {
        "packfmt-global": {"epoch1": ep, "epoch2": dict(ep, seconds=0.5), "stored_bytes": 1010,
                           "proxy": {"epoch1": px, "epoch2": dict(px, gets=0, bytes=0)}},
        "litdata": {"error": "RuntimeError: Caught\nobstore.exceptions.GenericError: no http", "proxy": {}},
        "loose": {"epoch1": dict(ep, seconds=10.0), "proxy": {"epoch1": dict(px, gets=100, bytes=100)}},
    }
    rows = rr.rows_of(results, payload=1000, loose_payload=100)
    pk = [r for r in rows if r["run"] == "packfmt-global"]
    assert [r["epoch"] for r in pk] == [1, 2]
    assert pk[0]["rate"] == 50 and pk[0]["vs_loose"] == 5.0 and pk[0]["bytes_ratio"] == 2.0
    assert pk[1]["vs_loose"] == 20.0 and pk[1]["gets"] == 0
    lit = [r for r in rows if r["run"] == "litdata"]
    assert lit == [{"run": "litdata", "how": rr.RUN_INFO["litdata"][1],
                    "status": "failed: obstore.exceptions.GenericError: no http"}]
    loose = [r for r in rows if r["run"] == "loose"]
    assert loose[0]["bytes_ratio"] == 1.0 and loose[0]["vs_loose"] == 1.0
    text = rr.report(rows, {"cmdline": "c", "date": "d", "machine": "m", "uptime_start": "a", "uptime_end": "b",
                            "files": 1000, "payload": 1000, "stored": "s", "latency": 0.02, "workers": 2,
                            "batch": 256, "loose_n": 100, "verify": 10})
    assert "failed: obstore.exceptions.GenericError: no http" in text and " 5.0x |" in text
