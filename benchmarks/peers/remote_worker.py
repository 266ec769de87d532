"""One system, read from S3 through its OWN remote support, in one process: ``remote_worker.py --run NAME ...``.

remote_run.py starts it once per run (see RUNS) and counts the requests at its latency proxy.  The
worker tells the driver where each phase starts by printing ``PHASE <name>`` on stdout and waiting for
a line on stdin, so the driver can cut the proxy's request log at that point; everything else it
prints goes to stderr.

Phases, in order:
  * ``epoch1``: the dataset is created (so opening it, in this process and in the DataLoader workers,
    is counted) and one shuffled epoch runs through ``DataLoader(num_workers=W)``; every sample's hash is
    kept, and the epoch's multiset of hashes must equal the source's (else the run is reported as wrong
    bytes).  Time to the first batch is recorded;
  * ``epoch2``: the same epoch again, the same way (systems with a local cache read it warm);
  * ``verify``: where the system offers access by global index, a random subset read by index and
    compared byte for byte with the source files (untimed; its requests are not reported).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.join(os.path.dirname(BENCH), "tests"))  # conftest_servers

import numpy as np  # noqa: E402

from worker import cpu_seconds, h64, rusage  # noqa: E402

BUCKET = "bench"   # benchmarks/remote.py's bucket name: its loose-object datasets are reused as they are


def phase(name: str) -> None:
    """Mark the start of a phase for the driver and wait until it has cut the proxy's log."""
    sys.stdout.write(f"PHASE {name}\n")
    sys.stdout.flush()
    if not sys.stdin.readline():
        raise SystemExit("the driver went away")


def s3_options(endpoint: str) -> dict:
    from conftest_servers import TEST_CREDENTIALS
    return dict(TEST_CREDENTIALS, endpoint_url=endpoint)


# ---------------------------------------------------------------------------------------------- runs
# Each run: make(args) -> (loader_for_epoch(epoch) -> iterable of lists of bytes, get_by_index or None)


def run_packfmt(args, mode):
    from torch.utils.data import DataLoader
    import packfmt
    from packfmt.cache import PageCache
    from packfmt.torch import PackBatchSampler, PackDataset
    from base import identity_collate
    # A fresh, empty page cache (default 4 MiB blocks) larger than the dataset: epoch 1 cold, epoch 2 warm.
    cache = PageCache(os.path.join(args.tmp, "pagecache"), capacity="4GiB")
    opts = dict(storage_options=s3_options(args.endpoint), cache=cache)
    ds = PackDataset(args.url, open_kwargs=opts)
    sampler = PackBatchSampler(ds, batch_size=args.batch, seed=0, mode=mode)

    def loader(epoch):
        sampler.set_epoch(epoch)
        return DataLoader(ds, batch_sampler=sampler, num_workers=args.workers, collate_fn=identity_collate)

    def get_batch(idx):
        d = packfmt.open(args.url, **opts)
        return [d[int(i)] for i in idx[: len(idx) // 2]] + d.get_batch(idx[len(idx) // 2:])

    return loader, get_batch


def _drop_inherited_clients(ds):
    """worker_init_fn: forget the boto3 client the DataLoader worker inherited from the main process."""
    def init(_worker_id):
        for stream in ds.streams:
            stream._downloader._s3_client = None
    return init


def run_mosaic(args, fresh_client):
    from torch.utils.data import DataLoader
    from mosaic_adapter import _import_streaming, _mds_collate
    # Mosaic reads the endpoint from S3_ENDPOINT_URL (set by the driver) and the keys from AWS_*.
    streaming = _import_streaming()
    streaming.base.util.clean_stale_shared_memory()
    # Creating the dataset downloads index.json in this process with a boto3 client kept on the stream's
    # downloader; forked DataLoader workers inherit it with its open keep-alive connection, and two
    # workers then share one socket: their responses cross (a HEAD's ETag read by the other worker
    # makes its ranged GET fail with 412; a body read by the wrong worker leaves a shard with the
    # wrong bytes at the right length).  fresh_client=True drops the inherited client in each worker.
    ds = streaming.StreamingDataset(remote=args.url, local=os.path.join(args.tmp, "mds-local"), shuffle=True,
                                    shuffle_seed=0, batch_size=args.batch)
    init = _drop_inherited_clients(ds) if fresh_client else None

    def loader(epoch):
        return DataLoader(ds, batch_size=args.batch, num_workers=args.workers, collate_fn=_mds_collate,
                          worker_init_fn=init)

    def get_batch(idx):
        return [ds[int(i)]["data"] for i in idx]

    return loader, get_batch


def run_litdata(args, allow_http):
    from litdata import StreamingDataLoader, StreamingDataset
    from litdata_adapter import _lit_collate
    # LitData passes storage_options to its boto3 client (endpoint_url, keys); its chunk downloads go
    # through obstore, whose S3Store it builds from that client's endpoint with fixed client options
    # (litdata.streaming.downloader._OBSTORE_CLIENT_OPTIONS) that do not allow plain http, and explicit
    # client options make obstore ignore AWS_ALLOW_HTTP: as shipped, every chunk GET to an http://
    # endpoint fails with "builder error".  allow_http=True adds that one option (a test-endpoint
    # workaround; a real S3 endpoint is https).
    if allow_http:
        import litdata.streaming.downloader as dl
        dl._OBSTORE_CLIENT_OPTIONS = dict(dl._OBSTORE_CLIENT_OPTIONS, allow_http="true")
    ds = StreamingDataset(args.url, cache_dir=os.path.join(args.tmp, "lit-cache"),
                          storage_options=s3_options(args.endpoint), shuffle=True, seed=0)
    dl = StreamingDataLoader(ds, batch_size=args.batch, num_workers=args.workers, collate_fn=_lit_collate)

    def loader(epoch):
        return dl   # StreamingDataLoader counts its epochs itself

    def get_batch(idx):
        return [bytes(ds[int(i)]) for i in idx]

    return loader, get_batch


def _wds_collate(batch):
    return [s["bin"] for s in batch]


def run_wds(args):
    import boto3
    import webdataset as wds
    from torch.utils.data import DataLoader
    # Plain HTTP GETs of whole tar shards (webdataset's http:// handler runs curl) on presigned URLs of
    # the objects (what one hands WebDataset for a private bucket), through the proxy.  shardshuffle +
    # a shuffle buffer of 1000 samples: the approximate shuffle WebDataset offers for streamed shards.
    with open(args.shards) as f:
        names = json.load(f)
    bucket, _, prefix = args.url[len("s3://"):].partition("/")
    s3 = boto3.client("s3", **s3_options(args.endpoint))
    urls = [s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": f"{prefix}/{n}"},
                                      ExpiresIn=3600) for n in names]

    def loader(epoch):
        d = wds.WebDataset(urls, shardshuffle=len(urls), seed=epoch, empty_check=False).shuffle(1000)
        return DataLoader(d, batch_size=args.batch, num_workers=args.workers, collate_fn=_wds_collate)

    return loader, None


def run_loose(args, threaded):
    import torch
    from torch.utils.data import DataLoader
    from base import identity_collate
    from remote import LooseObjects, LooseObjectsThreaded
    idx = np.load(args.loose_idx)
    keys = [f"{args.url[len(f's3://{BUCKET}/'):]}/{i:07d}.bin" for i in idx.tolist()]
    ds = (LooseObjectsThreaded if threaded else LooseObjects)(args.endpoint, keys)

    def loader(epoch):
        g = torch.Generator().manual_seed(epoch)
        return DataLoader(ds, batch_size=args.batch, shuffle=True, generator=g, num_workers=args.workers,
                          collate_fn=identity_collate)

    return loader, None


RUNS = {
    "packfmt-global": lambda a: run_packfmt(a, "global"),
    "packfmt-block": lambda a: run_packfmt(a, "block"),
    "packfmt-global-64mib": lambda a: run_packfmt(a, "global"),
    "mosaic": lambda a: run_mosaic(a, False),
    "mosaic-fresh-client": lambda a: run_mosaic(a, True),
    "litdata": lambda a: run_litdata(a, False),
    "litdata-allow-http": lambda a: run_litdata(a, True),
    "wds": run_wds,
    "loose": lambda a: run_loose(a, False),
    "loose-threaded": lambda a: run_loose(a, True),
}


# ---------------------------------------------------------------------------------------------- main

def epoch(loader_for, e):
    c0, t0 = cpu_seconds(), time.perf_counter()
    first = None
    hashes = []
    for batch in loader_for(e):
        if first is None:
            first = time.perf_counter() - t0
        hashes.extend(h64(bytes(s)) for s in batch)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": cpu_seconds() - c0, "first_batch_s": first,
            "samples": len(hashes), "load1": os.getloadavg()[0]}, np.sort(np.array(hashes, dtype=np.uint64))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True, choices=sorted(RUNS))
    p.add_argument("--url", required=True, help="s3://bucket/prefix of the system's data")
    p.add_argument("--endpoint", required=True, help="the latency proxy's URL")
    p.add_argument("--src", required=True)
    p.add_argument("--rels", required=True)
    p.add_argument("--hashes", required=True)
    p.add_argument("--verify-idx", required=True)
    p.add_argument("--loose-idx", help="npy: the global indices uploaded as loose objects")
    p.add_argument("--shards", help="json: the system's shard object names (WebDataset)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, choices=(1, 2))
    p.add_argument("--result", required=True)
    args = p.parse_args(argv)
    with open(args.rels) as f:
        rels = f.read().split("\n")
    hashes = np.load(args.hashes)
    expect = hashes if args.loose_idx is None else hashes[np.load(args.loose_idx)]
    expect = np.sort(expect.astype(np.uint64))
    res = {"run": args.run}
    with tempfile.TemporaryDirectory(prefix=f"peers-remote-{args.run}-") as tmp:
        args.tmp = tmp
        try:
            phase("epoch1")
            t0 = time.perf_counter()
            loader_for, get_batch = RUNS[args.run](args)
            res["create_s"] = time.perf_counter() - t0
            for e in range(1, args.epochs + 1):
                if e == 2:
                    phase("epoch2")
                r, seen = epoch(loader_for, e)
                if e == 1:
                    r["seconds"] += res["create_s"]
                    r["first_batch_s"] = (r["first_batch_s"] or 0) + res["create_s"]
                r["exact"] = bool(len(seen) == len(expect) and np.array_equal(seen, expect))
                if not r["exact"]:
                    unknown = np.setdiff1d(seen, expect)
                    res["verify_wrong"] = [f"epoch {e}: {len(seen)} samples ({len(np.unique(seen))} distinct) "
                                           f"for {len(expect)}; {len(unknown)} in no source file"]
                res[f"epoch{e}"] = r
                if not r["exact"]:
                    break
            phase("verify")
            if get_batch is not None and "verify_wrong" not in res:
                vidx = np.load(args.verify_idx)
                got = get_batch(vidx)
                bad = []
                for i, g in zip(vidx.tolist(), got):
                    with open(os.path.join(args.src, rels[i]), "rb") as f:
                        if bytes(g) != f.read():
                            bad.append(i)
                res["verified_by_index"] = len(vidx)
                if bad:
                    res["verify_wrong"] = [f"by index: {len(bad)} of {len(vidx)} samples differ, e.g. {bad[:3]}"]
        except Exception as e:  # noqa: BLE001 - reported in the table, not hidden
            traceback.print_exc()
            res["error"] = f"{type(e).__name__}: {e}"[-6000:]
    phase("end")
    res.update(rusage())
    with open(args.result, "w") as f:
        json.dump(res, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    # Mosaic's and LitData's background threads can keep the interpreter alive: the result is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
