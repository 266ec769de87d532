"""The peers over S3: one shuffled DataLoader epoch per system from a loopback S3 server with injected
latency, each system reading through its OWN remote support.

    /tmp/peers-venv/bin/python benchmarks/peers/remote_run.py [--files 20000] [--latency 0.02]
                                                              [--runs packfmt-global,mosaic,...]

What it does:
  * generates (once, cached) the same tree of small files as benchmarks/peers/run.py and builds each
    system from it locally with the same adapters (run.py's build workers, default settings);
  * starts moto's S3 server on 127.0.0.1 and, in front of it, the proxy of tests/conftest_servers.py
    (``FaultProxy``) adding ``--latency`` to every request and logging each one (method, path, Range,
    bytes sent), as benchmarks/remote.py does; uploads every system's files with plain boto3;
  * runs each system in its own process (remote_worker.py): the dataset is created from its
    ``s3://`` URL and one shuffled epoch runs through a DataLoader with ``--workers`` workers; then a
    second epoch (a warm local cache for the systems that keep one); then, where the system has
    access by index, a random subset is read back and compared byte for byte with the source files.
    Every epoch's multiset of sample hashes must equal the source's; a system that returns wrong bytes
    or cannot read from the endpoint is reported with the reason, not dropped;
  * counts at the proxy, per epoch: GET requests, other requests, bytes fetched / dataset bytes, time to
    the first batch, samples/s (and samples per CPU-second of the worker process and its DataLoader
    workers), and writes a markdown block into docs/benchmarks.md between
    ``<!-- peers-remote:begin -->`` and ``<!-- peers-remote:end -->``.

How each system reads (RUN_INFO below): packfmt through ``PackDataset("s3://...")`` and its page cache
(an empty one before epoch 1); Mosaic Streaming through ``StreamingDataset(remote="s3://...",
local=<tmp>)`` (endpoint from ``S3_ENDPOINT_URL``); LitData through ``StreamingDataset("s3://...",
storage_options={"endpoint_url": ...})``; WebDataset through its ``http://`` handler (curl) on the
objects' presigned URLs; loose objects one GET per sample (``--loose-n`` of them: per-sample figures do
not depend on the count, and uploading 20,000 objects to moto alone would take minutes).

Mosaic and LitData each run twice: as shipped, and with the smallest change that lets them read this
endpoint correctly (remote_worker.py says why): Mosaic with a ``worker_init_fn`` that drops the boto3
client its forked DataLoader workers inherit, LitData with ``allow_http`` added to its obstore client
options.  The as-shipped rows report what went wrong.

The proxy's request log of every run is kept next to the results (``remote-<run>.requests.tsv`` under
``--work``: method, path, Range, status, bytes sent, with the phase marks).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
REPO = os.path.dirname(BENCH)
sys.path.insert(0, HERE)
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.join(REPO, "tests"))

import numpy as np  # noqa: E402

from common import describe_machine, log, machine_info, markdown_table, update_markdown_section  # noqa: E402

BUCKET = "bench"

#: run -> (system whose build it reads, how it reads, what its second epoch means)
RUN_INFO = {
    "packfmt-global": ("packfmt", "packfmt: `PackDataset(\"s3://...\")` + page cache, `PackBatchSampler(mode=\"global\")`",
                       "page cache warm"),
    "packfmt-block": ("packfmt", "packfmt: the same, `mode=\"block\"` (locality-aware shuffle)", "page cache warm"),
    "packfmt-global-64mib": ("packfmt-64MiB", "packfmt: `mode=\"global\"`, built with 64 MiB shards (the peers' "
                             "size) instead of its default 256 MiB", "page cache warm"),
    "mosaic": ("mosaic", "Mosaic Streaming: `StreamingDataset(remote=\"s3://...\", local=tmp, shuffle=True)`, "
               "as shipped", "shards already local"),
    "mosaic-fresh-client": ("mosaic", "Mosaic Streaming: the same, a `worker_init_fn` dropping the S3 client the "
                            "workers inherit", "shards already local"),
    "litdata": ("litdata", "LitData: `StreamingDataset(\"s3://...\", storage_options=..., shuffle=True)` + "
                "`StreamingDataLoader`, as shipped", "chunks in its cache_dir"),
    "litdata-allow-http": ("litdata", "LitData: the same, its obstore client options + `allow_http`",
                           "chunks in its cache_dir"),
    "wds": ("wds", "WebDataset: `WebDataset([presigned http URLs], shardshuffle).shuffle(1000)`", "no cache: fetched again"),
    "loose": ("loose", "loose objects: map Dataset, one `get_object` per sample", "no cache: fetched again"),
    "loose-threaded": ("loose", "loose objects: 16 `get_object` in flight per worker", "no cache: fetched again"),
}
DEFAULT_RUNS = ",".join(RUN_INFO)
#: builds other than a system's default: name -> (system, environment of its build worker)
BUILDS = {"packfmt-64MiB": ("packfmt", {"PEERS_PACKFMT_SHARD_SIZE": "64MiB"})}


# ---------------------------------------------------------------------------------------------- proxy log

def phase_stats(entries, start: int, end: int, bucket: str = BUCKET) -> dict:
    """What the proxy saw between two marks: GETs of objects (and the bytes they returned), listings
    (GETs on the bucket itself), other requests (HEAD, ...), and error answers."""
    gets = lists = other = errors = 0
    nbytes = 0
    for e in entries[start:end]:
        parts = [p for p in e.path.split("/") if p]
        if e.status >= 400:
            errors += 1
        if e.method == "GET" and len(parts) >= 2:
            gets += 1
            nbytes += e.sent
        elif e.method == "GET":
            lists += 1
        else:
            other += 1
    return {"gets": gets, "bytes": nbytes, "lists": lists, "other": other, "errors": errors}


def cut(entries, marks: dict, bucket: str = BUCKET) -> dict:
    """Per phase (``marks``: phase name -> index into the log where it started, in order) its stats."""
    names = sorted(marks, key=lambda k: marks[k])
    out = {}
    for a, b in zip(names, names[1:] + [None]):
        out[a] = phase_stats(entries, marks[a], len(entries) if b is None else marks[b], bucket)
    return out


# ---------------------------------------------------------------------------------------------- driving a run

def drive(cmd, env, proxy, logf, timeout: float) -> tuple:
    """Start a worker; at each ``PHASE name`` line it prints, note where the proxy's log is and let it go on."""
    marks = {}
    with open(logf, "w") as lf:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=lf, text=True,
                                start_new_session=True, env=env, bufsize=1)
        killed = []

        def kill():
            killed.append(True)
            os.killpg(proc.pid, signal.SIGKILL)   # the worker and its DataLoader workers, nothing else

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            for line in proc.stdout:
                if line.startswith("PHASE "):
                    marks[line.split()[1]] = len(proxy.log())
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                else:
                    lf.write(line)
            proc.wait()
        finally:
            timer.cancel()
    return marks, (f"timed out after {timeout:.0f} s" if killed else None), proc.returncode


def upload(s3, local_dir: str, files, prefix: str) -> int:
    """Every file as one object, each with a single PUT (plain objects with MD5 ETags, as most tools
    that copy a dataset to a bucket leave them)."""
    from boto3.s3.transfer import TransferConfig
    single = TransferConfig(multipart_threshold=1 << 40)
    total = 0
    for path in files:
        rel = os.path.relpath(path, local_dir)
        s3.upload_file(path, BUCKET, f"{prefix}/{rel}", Config=single)
        total += os.path.getsize(path)
    return total


# ---------------------------------------------------------------------------------------------- report

def short_reason(error: str, limit: int = 300) -> str:
    """The line of an error report that says what went wrong: the last ``SomeError: message`` line
    (a DataLoader worker's error carries the original traceback in its message), else the first line.

    >>> short_reason("RuntimeError: Caught X in DataLoader worker process 0.\\nOriginal Traceback:\\n"
    ...              "  File 'a.py'\\nValueError: bad range")
    'ValueError: bad range'
    """
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
    if not lines:
        return "?"
    pat = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*?: \S")
    named = [ln for ln in lines if pat.match(ln)]
    line = named[-1] if named else lines[0]
    if "Original error: " in line:   # LitData's wrapper around its prefetch thread's exception
        line = line.split("Original error: ", 1)[1]
    return line[:limit]


def rows_of(results: dict, payload: int, loose_payload: int) -> list:
    """Table rows (dicts), two per run that read its data, one per run that failed."""
    base = None
    lr = results.get("loose", {})
    if lr.get("epoch1") and not lr.get("error") and not lr.get("verify_wrong"):
        base = lr["epoch1"]["samples"] / lr["epoch1"]["seconds"]
    rows = []
    for run, r in results.items():
        info = RUN_INFO[run]
        status = ("upload failed: " + r["upload_error"] if r.get("upload_error")
                  else "build failed: " + r["build_error"] if r.get("build_error")
                  else "WRONG BYTES: " + "; ".join(r["verify_wrong"]) if r.get("verify_wrong")
                  else "failed: " + short_reason(r["error"]) if r.get("error") and not r.get("epoch1")
                  else "ok")
        dataset = loose_payload if info[0] == "loose" else payload
        done = [e for e in (1, 2) if r.get(f"epoch{e}") and status == "ok"]
        if not done:
            rows.append({"run": run, "how": info[1], "status": status})
            continue
        for e in done:
            m, px = r[f"epoch{e}"], r["proxy"][f"epoch{e}"]
            rate = m["samples"] / m["seconds"]
            rows.append({
                "run": run, "how": info[1], "status": status if e == 1 or not r.get("error") else "failed after "
                + "epoch 1: " + short_reason(r["error"]), "epoch": e, "epoch_note": "cold" if e == 1 else info[2],
                "samples": m["samples"], "gets": px["gets"], "lists": px["lists"], "other": px["other"],
                "errors": px["errors"], "bytes_ratio": px["bytes"] / dataset, "bytes": px["bytes"],
                "first_s": m["first_batch_s"], "rate": rate,
                "cpu_rate": m["samples"] / m["cpu_seconds"] if m.get("cpu_seconds") else None,
                "vs_loose": rate / base if base else None, "load1": m.get("load1"),
                "stored_ratio": r.get("stored_bytes", 0) / dataset if r.get("stored_bytes") else None,
                "verified": r.get("verified_by_index"),
            })
    return rows


def report(rows, meta) -> str:
    def f(x, fmt):
        return "n/a" if x is None else fmt.format(x)

    table_rows = []
    for r in rows:
        if "epoch" not in r:
            table_rows.append([r["how"], "-", "-", "-", "-", "-", "-", "-", "-", "-", r["status"]])
            continue
        req = r["gets"] + r["lists"] + r["other"]
        table_rows.append([
            r["how"] if r["epoch"] == 1 else "", f"{r['epoch']} ({r['epoch_note']})", f"{r['samples']:,}",
            f"{r['gets']:,}" + (f" (+{r['lists'] + r['other']})" if r["lists"] + r["other"] else ""),
            f"{r['samples'] / req:,.1f}" if req else "no requests",
            f"{r['bytes_ratio']:.3f}", f(r["first_s"], "{:.2f}"), f"{r['rate']:,.0f}",
            f(r["vs_loose"], "{:.1f}x"), f(r["cpu_rate"], "{:,.0f}"),
            r["status"] + (f"; {r['errors']} error answers" if r["errors"] else "")])
    table = markdown_table(
        ["system (how it reads)", "epoch", "samples", "GETs (+ other requests)", "samples / request",
         "bytes fetched / dataset bytes", "first batch (s)", "samples/s", "vs loose objects", "samples / CPU-s",
         "status"], table_rows, align="llrrrrrrrrl")
    lines = [
        f"Produced by `{meta['cmdline']}` on {meta['date']}.",
        "",
        f"Machine: {meta['machine']}; {meta['uptime_end']} at the end.",
        "",
        f"Data: the tree of benchmarks/peers/run.py, {meta['files']:,} files ({meta['payload'] / 2**20:.0f} MiB), "
        f"each system built from it locally by its adapter with default settings except where the row says ({meta['stored']}) and "
        f"uploaded to moto's S3 server on 127.0.0.1; every request goes through a proxy adding "
        f"{meta['latency'] * 1000:.0f} ms (a stand-in for an object store's first-byte latency) that counts "
        f"it and the bytes it returned. One process per system; a shuffled epoch through a DataLoader with "
        f"{meta['workers']} workers and batches of {meta['batch']}, the dataset created from its `s3://` URL "
        f"inside epoch 1 (so opening it is counted there), then a second epoch. Loose objects: "
        f"{meta['loose_n']:,} of the samples, one object each (figures per sample; their dataset bytes are "
        f"those samples'). Every epoch's multiset of sample hashes equals the source's (\"ok\"), and where "
        f"the system reads by index {meta['verify']} random samples were also compared byte for byte.",
        "",
        table,
        "",
        "GETs count object reads (the + figure: bucket listings, HEADs and other requests); "
        "bytes fetched / dataset bytes is what the proxy sent for those GETs over the samples' bytes; "
        "first batch is from creating the dataset (epoch 1) or the DataLoader (epoch 2) to the first batch; "
        "samples per CPU-second counts the process and its DataLoader workers (not curl, moto or the proxy).",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main

def main(argv=None):
    import run as peers_run
    from systems import load
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=20_000)
    p.add_argument("--latency", type=float, default=0.02, help="seconds added to every request (default 0.02)")
    p.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated: " + DEFAULT_RUNS)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--loose-n", type=int, default=2000, help="samples uploaded as loose objects")
    p.add_argument("--verify", type=int, default=300, help="random samples checked byte for byte by index")
    p.add_argument("--cache", default="/tmp/packfmt-bench", help="where the tree is generated (shared)")
    p.add_argument("--work", default="/tmp/packfmt-peers-remote", help="where systems are built")
    p.add_argument("--python", default=None, help="interpreter for the workers (default: this one)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per worker process")
    p.add_argument("--docs", default=os.path.join(REPO, "docs", "benchmarks.md"),
                   help="markdown file whose peers-remote section is (re)written; '' to skip")
    p.add_argument("--json", default=None, help="also write all raw results here")
    p.add_argument("--from-json", default=None, help="re-make the report from a --json file, no run")
    args = p.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as fh:
            saved = json.load(fh)
        text = report(rows_of(saved["results"], saved["meta"]["payload"], saved["meta"]["loose_payload"]),
                      saved["meta"])
        print(text)
        if args.docs:
            update_markdown_section(args.docs, "peers-remote", "Peers over S3", text)
        return 0
    runs = [r for r in args.runs.split(",") if r]
    for r in runs:
        if r not in RUN_INFO:
            p.error(f"unknown run {r!r}; known: {DEFAULT_RUNS}")
    args.python = args.python or sys.executable
    args.random, args.reps = 1, 1   # prepare() wants them; nothing here reads at random positions
    from conftest_servers import FaultProxy, MotoServer
    info = machine_info()
    with open("/proc/loadavg") as fh:
        uptime_start = "load average " + ", ".join(fh.read().split()[:3])
    log(f"{describe_machine(info)}\n{uptime_start}")
    prep = peers_run.prepare(args)
    n = len(prep["rels"])
    sizes = prep["size_arr"]
    payload = int(sizes.sum())
    loose_idx = np.sort(np.random.default_rng(2).choice(n, min(args.loose_n, n), replace=False)).astype(np.int64)
    loose_path = os.path.join(prep["work"], "loose-idx.npy")
    np.save(loose_path, loose_idx)
    loose_payload = int(sizes[loose_idx].sum())

    # builds, with the local comparison's adapters and workers
    systems = sorted({RUN_INFO[r][0] for r in runs} - {"loose"})
    builds = {}
    for s in systems:
        out = os.path.join(prep["work"], f"{s}.none")
        shutil.rmtree(out, ignore_errors=True)
        system, env = BUILDS.get(s, (s, {}))
        builds[s] = peers_run.run_worker(args, prep, system, "build", out, "none", env=env,
                                         tag=s[len(system):])
    results = {}
    stored = {}
    moto = MotoServer(os.path.join(prep["work"], "moto.log"))
    proxy = FaultProxy(moto.endpoint)
    try:
        s3 = moto.client()
        s3.create_bucket(Bucket=BUCKET)
        uploaded = {}
        for run in runs:
            s = RUN_INFO[run][0]
            res = results[run] = {}
            b = builds.get(s, {})
            if b.get("unavailable") or b.get("error"):
                res["build_error"] = b.get("unavailable") or b.get("error")
                continue
            if s not in uploaded:
                t = time.perf_counter()
                try:
                    if s == "loose":
                        nbytes = 0
                        for i in loose_idx.tolist():
                            with open(os.path.join(prep["root"], prep["rels"][i]), "rb") as fh:
                                body = fh.read()
                            s3.put_object(Bucket=BUCKET, Key=f"loose/{i:07d}.bin", Body=body)
                            nbytes += len(body)
                        uploaded[s] = nbytes
                    else:
                        out = os.path.join(prep["work"], f"{s}.none")
                        uploaded[s] = upload(s3, out, load(BUILDS.get(s, (s,))[0]).files(out), s)
                except Exception as e:  # noqa: BLE001 - reported, not hidden
                    uploaded[s] = f"{type(e).__name__}: {e}"
                log(f"uploaded {s} in {time.perf_counter() - t:.1f} s")
            if isinstance(uploaded[s], str):
                res["upload_error"] = uploaded[s]
                continue
            res["stored_bytes"] = uploaded[s]
            stored[s] = uploaded[s]
            result_path = os.path.join(prep["work"], f"remote-{run}.json")
            if os.path.exists(result_path):
                os.remove(result_path)
            cmd = [args.python, os.path.join(HERE, "remote_worker.py"), "--run", run,
                   "--url", f"s3://{BUCKET}/{s}", "--endpoint", proxy.url, "--src", prep["root"],
                   "--rels", prep["rels_path"], "--hashes", prep["hashes"], "--verify-idx", prep["verify_idx"],
                   "--batch", str(args.batch), "--workers", str(args.workers), "--result", result_path]
            if s == "loose":
                # no cache, nothing changes in a second epoch: one is enough (and the slowest by far)
                cmd += ["--loose-idx", loose_path, "--epochs", "1"]
            if s == "wds":
                names = sorted(os.path.basename(f) for f in load(s).files(os.path.join(prep["work"], "wds.none"))
                               if f.endswith(".tar"))
                shards = os.path.join(prep["work"], "wds-shards.json")
                with open(shards, "w") as fh:
                    json.dump(names, fh)
                cmd += ["--shards", shards]
            env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                       AWS_DEFAULT_REGION="us-east-1", S3_ENDPOINT_URL=proxy.url,
                       PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
            proxy.reset()
            proxy.latency = args.latency
            log(f"  [{run}] reading s3://{BUCKET}/{s} ...")
            t = time.perf_counter()
            marks, timeout, rc = drive(cmd, env, proxy, os.path.join(prep["work"], f"remote-{run}.log"),
                                       args.timeout)
            if os.path.exists(result_path):
                with open(result_path) as fh:
                    res.update(json.load(fh))
            else:
                with open(os.path.join(prep["work"], f"remote-{run}.log")) as fh:
                    tail = fh.read()[-1200:]
                res["error"] = timeout or f"worker exited {rc} without a result; log tail: {tail}"
            entries = proxy.log()
            res["proxy"] = cut(entries, marks)
            with open(os.path.join(prep["work"], f"remote-{run}.requests.tsv"), "w") as fh:
                at = {v: k for k, v in marks.items()}
                for k, e in enumerate(entries):
                    if k in at:
                        fh.write(f"# phase {at[k]}\n")
                    fh.write(f"{e.method}\t{e.path}\t{e.range or ''}\t{e.status}\t{e.sent}\t{e.fault or ''}\n")
            res["wall_s"] = time.perf_counter() - t
            msg = res.get("error") or "; ".join(res.get("verify_wrong", []))
            e1 = res.get("epoch1")
            log(f"  [{run}] done in {res['wall_s']:.1f} s"
                + (f": epoch 1 {e1['samples'] / e1['seconds']:,.0f} samples/s, "
                   f"{res['proxy']['epoch1']['gets']} GETs" if e1 else "") + (f" -- {msg}" if msg else ""))
    finally:
        proxy.stop()
        moto.stop()

    with open("/proc/loadavg") as fh:
        uptime_end = "load average " + ", ".join(fh.read().split()[:3])
    cmdline = " ".join(["/tmp/peers-venv/bin/python" if args.python.startswith("/tmp/peers-venv") else "python",
                        os.path.relpath(__file__, REPO), *(argv if argv is not None else sys.argv[1:])])
    st = ", ".join(f"{s} {v / payload:.2f}x" for s, v in stored.items() if s != "loose")
    meta = {"cmdline": cmdline, "date": info["date"], "machine": describe_machine(info), "uptime_start": uptime_start,
            "uptime_end": uptime_end, "files": n, "payload": payload, "loose_payload": loose_payload,
            "stored": "stored bytes / sample bytes: " + st, "latency": args.latency, "workers": args.workers,
            "batch": args.batch, "loose_n": len(loose_idx), "verify": args.verify}
    text = report(rows_of(results, payload, loose_payload), meta)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results, "meta": meta, "builds": builds}, fh, indent=1, default=str)
    if args.docs:
        update_markdown_section(args.docs, "peers-remote", "Peers over S3", text)
        log(f"wrote the peers-remote section of {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
