"""The ``pack`` command line: build, ls, verify, get, extract (and cache, when available)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from packfmt import __version__
from packfmt.errors import PackError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def table(rows: list, headers: list, align: str) -> str:
    """Columns padded to their widest cell; align is one of '<' or '>' per column."""
    cells = ([headers] if any(headers) else []) + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [f"{c:{a}{w}}" for c, a, w in zip(r, align, widths)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def err(msg: str) -> None:
    print(f"pack: error: {msg}", file=sys.stderr)


# ---------------------------------------------------------------- build
def cmd_build(a) -> int:
    from packfmt.build import build_dataset
    rep = build_dataset(a.src, a.dst, shard_size=a.shard_size, compression=a.compression, workers=a.workers,
                        label_from=a.label_from, include=a.include, exclude=a.exclude, skip_errors=a.skip_errors,
                        overwrite=a.overwrite, progress=not a.quiet and sys.stderr.isatty() or a.progress,
                        engine=a.engine, address=a.address)
    for s in rep.skipped[:50]:
        print(f"skipped: {s.path}: {s.reason}", file=sys.stderr)
    if len(rep.skipped) > 50:
        print(f"skipped: ... and {len(rep.skipped) - 50} more", file=sys.stderr)
    if not a.quiet:
        print(f"packed {rep.files:,} files ({human(rep.input_bytes)}) into {rep.shards} shard"
              f"{'s' if rep.shards != 1 else ''} at {a.dst}: {human(rep.output_bytes)} "
              f"(ratio {rep.ratio:.3f}) in {rep.seconds:.2f} s, {rep.files_per_second:,.0f} files/s"
              + (f"; skipped {len(rep.skipped)}" if rep.skipped else ""))
    return EXIT_OK


# ---------------------------------------------------------------- ls
def _ls_shard_file(a) -> int:
    from packfmt import _core
    from packfmt.verify import _read_index
    sh = _core.Shard(a.target)
    info = sh.info
    entries = _read_index(a.target, info)
    if a.json:
        out = dict(info, path=a.target)
        if a.long:
            out["records_list"] = [dict(record=i, offset=int(e["offset"]), stored_len=int(e["stored_len"]),
                                        raw_len=int(e["raw_len"]), checksum=f"{int(e['checksum']):016x}",
                                        codec=int(e["flags"])) for i, e in enumerate(entries)]
        print(json.dumps(out, indent=1))
        return EXIT_OK
    print(table([["shard", a.target], ["format version", f"{info['write_version']} (readable by "
                                                               f">= {info['read_version']})"],
                 ["records", f"{info['records']:,}"], ["size", human(info["file_size"])],
                 ["data bytes", human(info["index_offset"] - _core.HEADER_SIZE)],
                 ["flags", info["flags"]], ["dictionary id", info["dict_id"]]], ["", ""], "<<"))
    if a.long:
        print()
        rows = [[i, int(e["raw_len"]), int(e["stored_len"]), int(e["offset"]), f"{int(e['checksum']):016x}",
                 ["none", "zstd", "zstd-dict"][int(e["flags"]) & 3]] for i, e in enumerate(entries)]
        print(table(rows, ["record", "size", "stored", "offset", "checksum", "codec"], ">>>><<"))
    return EXIT_OK


def cmd_ls(a) -> int:
    if os.path.isfile(a.target) and a.target.endswith(".pack"):
        return _ls_shard_file(a)
    import packfmt
    ds = packfmt.open(a.target)
    m = ds.manifest
    stats = m.get("stats", {})
    if a.shards:
        rows = [[s["name"], f"{s['records']:,}", human(s["size"]), s["size"], s["checksum"]] for s in m["shards"]]
        if a.json:
            print(json.dumps(m["shards"], indent=1))
        else:
            print(table(rows, ["shard", "records", "size", "bytes", "checksum"], "<>>><"))
        return EXIT_OK
    if a.long:
        return _ls_long(ds, a)
    comp = m["compression"]
    raw, stored = stats.get("raw_bytes", 0), stats.get("stored_bytes", 0)
    summary = {
        "dataset": ds.url, "format_version": m["format_version"], "samples": m["samples"],
        "shards": len(m["shards"]), "raw_bytes": raw, "stored_bytes": stored,
        "total_bytes": stats.get("total_bytes"), "compression": comp["codec"] + (
            f":{comp['level']}" if comp.get("level") is not None else ""),
        "compression_ratio": round(raw / stored, 3) if stored else None,
        "columns": ds.columns, "created": m.get("created", {}), "content_id": ds.content_id,
    }
    if a.json:
        print(json.dumps(summary, indent=1))
        return EXIT_OK
    rows = [["dataset", ds.url], ["format version", m["format_version"]], ["samples", f"{m['samples']:,}"],
            ["shards", f"{len(m['shards']):,}"], ["raw size", human(raw)], ["stored size", human(stored)],
            ["on disk", human(stats.get("total_bytes", 0))],
            ["compression", f"{summary['compression']} (ratio {summary['compression_ratio'] or 1:.2f}x)"],
            ["columns", ", ".join(ds.columns) or "-"],
            ["created", f"{m.get('created', {}).get('at', '?')} by {m.get('created', {}).get('by', '?')}"]]
    print(table(rows, ["", ""], "<<"))
    return EXIT_OK


def _ls_long(ds, a) -> int:
    import numpy as np
    keys = ds.keys.to_pylist()
    names = ds.shards
    raw, stored, shard, off = ds.raw_lengths, ds.stored_lengths, ds.shard_of, ds.offsets
    user = {c: ds.column(c) for c in ds.columns}
    out = sys.stdout
    if a.json:
        for i in range(len(keys)):
            rec = {"index": i, "key": keys[i], "size": int(raw[i]), "stored": int(stored[i]),
                   "shard": names[shard[i]], "offset": int(off[i])}
            for c, v in user.items():
                rec[c] = v[i].item() if isinstance(v[i], np.generic) else v[i]
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        return EXIT_OK
    w = max(len(str(len(keys))), 5)
    sw = max(len(str(int(raw.max()))) if len(raw) else 1, 4)
    out.write(f"{'index':>{w}}  {'size':>{sw}}  {'stored':>{sw}}  {'shard':<16}  {'offset':>12}  key\n")
    for i in range(len(keys)):
        out.write(f"{i:>{w}}  {int(raw[i]):>{sw}}  {int(stored[i]):>{sw}}  {names[shard[i]]:<16}  "
                  f"{int(off[i]):>12}  {keys[i]}\n")
    return EXIT_OK


# ---------------------------------------------------------------- verify
def cmd_verify(a) -> int:
    import packfmt
    from packfmt.verify import verify_dataset
    try:
        ds = packfmt.open(a.dataset)
    except PackError as e:
        err(f"{a.dataset}: cannot open: {e}")
        return EXIT_FAIL
    total = sum(s["size"] for s in ds.manifest["shards"])
    bar = None
    if not a.quiet and (sys.stderr.isatty() or a.progress):
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verifying", dynamic_ncols=True)
    try:
        rep = verify_dataset(ds, progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    if a.json:
        print(json.dumps({"ok": rep.ok, "samples": rep.samples, "shards": rep.shards,
                          "bytes_checked": rep.bytes_checked, "problems": rep.problems}, indent=1))
    else:
        for p in rep.problems:
            print(f"BAD {p}")
        if rep.ok:
            print(f"OK {a.dataset}: {rep.samples:,} samples in {rep.shards} shards, {human(rep.bytes_checked)} checked")
        else:
            print(f"FAILED {a.dataset}: {len(rep.problems)} problem(s)", file=sys.stderr)
    return EXIT_OK if rep.ok else EXIT_FAIL


# ---------------------------------------------------------------- get / extract
def cmd_get(a) -> int:
    import packfmt
    ds = packfmt.open(a.dataset)
    if (a.key is None) == (a.index is None):
        err("give either KEY or --index N")
        return EXIT_USAGE
    try:
        i = ds.index_of(a.key) if a.key is not None else a.index
        data = ds[i]
    except KeyError:
        err(f"{a.dataset}: no sample with key {a.key!r}")
        return EXIT_FAIL
    except IndexError as e:
        err(f"{a.dataset}: {e}")
        return EXIT_FAIL
    if a.output and a.output != "-":
        with open(a.output, "wb") as f:
            f.write(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return EXIT_OK


def cmd_extract(a) -> int:
    import packfmt
    from packfmt.extract import extract
    ds = packfmt.open(a.dataset)
    indices = None
    if a.include:
        from packfmt.build import _matches
        indices = [i for i, k in enumerate(ds.keys.to_pylist()) if _matches(k, a.include)]
    bar = None
    if not a.quiet and (sys.stderr.isatty() or a.progress):
        from tqdm import tqdm
        bar = tqdm(total=len(ds) if indices is None else len(indices), unit="file", desc="extracting",
                   dynamic_ncols=True)
    try:
        n = extract(ds, a.outdir, indices, progress=(lambda k, b: bar.update(k)) if bar else None)
    finally:
        if bar:
            bar.close()
    if not a.quiet:
        print(f"extracted {n:,} files to {a.outdir}")
    return EXIT_OK


# ---------------------------------------------------------------- bench
def cmd_bench(a) -> int:
    """Random-access throughput of one dataset on this machine, as a training job would read it."""
    import time

    import numpy as np

    import packfmt
    ds = packfmt.open(a.dataset, verify=not a.no_verify)
    n = len(ds)
    if n == 0:
        err(f"{a.dataset}: empty dataset")
        return EXIT_FAIL
    rng = np.random.default_rng(a.seed)
    rows = []
    for name, size in (("get_batch", a.batch_size), ("ds[i]", 1)):
        count = nbytes = 0
        start = time.perf_counter()
        while time.perf_counter() - start < a.seconds:
            idx = rng.integers(0, n, size=size)
            got = ds.get_batch(idx) if size > 1 else [ds[int(idx[0])]]
            count += len(got)
            nbytes += sum(map(len, got))
        dt = time.perf_counter() - start
        rows.append([name if size == 1 else f"{name}({size})", f"{count / dt:,.0f}", f"{nbytes / dt / 1e6:,.1f}"])
    print(table(rows, ["read", "samples/s", "MB/s"], "<>>"))
    stats = getattr(ds, "_store").stats
    if ds._remote:
        print(f"requests: {stats}")
    return EXIT_OK


# ---------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pack", description="Pack small files into indexed shards and read them back.")
    p.add_argument("--version", action="version", version=f"packfmt {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="pack a directory tree into a dataset",
                       description="Pack every regular file under SRC into a new dataset at DST. Files are taken "
                                   "in sorted order; a symlink to a file is packed with its target's content, a "
                                   "symlink to a directory is not followed.")
    b.add_argument("src", metavar="SRC")
    b.add_argument("dst", metavar="DST")
    b.add_argument("--shard-size", default="256MiB", help="target shard size (default 256MiB)")
    b.add_argument("--compression", default="none", help="none | zstd[:LEVEL] | zstd-dict[:LEVEL] (default none)")
    b.add_argument("--workers", type=int, default=None, help="worker processes (default: one per CPU, fewer for small inputs)")
    b.add_argument("--label-from", choices=["parent"], default=None,
                   help="add an integer 'label' column from each file's parent directory")
    b.add_argument("--include", action="append", default=[], metavar="GLOB", help="only pack matching files")
    b.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip matching files")
    b.add_argument("--skip-errors", action="store_true", help="skip unreadable files and report them")
    b.add_argument("--overwrite", action="store_true", help="replace an existing dataset at DST")
    b.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local worker processes (default) or Ray tasks (same dataset, sample for sample)")
    b.add_argument("--address", default=None, metavar="ADDR",
                   help="Ray cluster to join with --engine ray (default: RAY_ADDRESS, or a local one)")
    b.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")
    b.add_argument("-q", "--quiet", action="store_true")
    b.set_defaults(func=cmd_build)

    ls = sub.add_parser("ls", help="show a dataset (or a lone .pack shard)")
    ls.add_argument("target", metavar="DATASET|SHARD.pack")
    ls.add_argument("-l", "--long", action="store_true", help="one line per sample (index, size, stored, shard, offset, key)")
    ls.add_argument("--shards", action="store_true", help="one line per shard")
    ls.add_argument("--json", action="store_true", help="machine-readable output (JSON lines with -l)")
    ls.set_defaults(func=cmd_ls)

    v = sub.add_parser("verify", help="check every record's checksum and the manifest/index/shard agreement")
    v.add_argument("dataset", metavar="DATASET")
    v.add_argument("--json", action="store_true")
    v.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")
    v.add_argument("-q", "--quiet", action="store_true")
    v.set_defaults(func=cmd_verify)

    g = sub.add_parser("get", help="write one sample's bytes to stdout or a file")
    g.add_argument("dataset", metavar="DATASET")
    g.add_argument("key", metavar="KEY", nargs="?")
    g.add_argument("--index", type=int, metavar="N")
    g.add_argument("-o", "--output", metavar="FILE")
    g.set_defaults(func=cmd_get)

    x = sub.add_parser("extract", help="restore the packed files under OUTDIR")
    x.add_argument("dataset", metavar="DATASET")
    x.add_argument("outdir", metavar="OUTDIR")
    x.add_argument("--include", action="append", default=[], metavar="GLOB")
    x.add_argument("--progress", action="store_true")
    x.add_argument("-q", "--quiet", action="store_true")
    x.set_defaults(func=cmd_extract)

    bn = sub.add_parser("bench", help="measure random-access throughput of a dataset on this machine")
    bn.add_argument("dataset", metavar="DATASET")
    bn.add_argument("--seconds", type=float, default=3.0, help="time per measurement (default 3)")
    bn.add_argument("--batch-size", type=int, default=256)
    bn.add_argument("--seed", type=int, default=0)
    bn.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    bn.set_defaults(func=cmd_bench)

    for module in ("packfmt.cache", "packfmt.merge"):
        try:
            mod = __import__(module, fromlist=["register_cli"])
        except ImportError:
            continue
        if hasattr(mod, "register_cli"):
            mod.register_cli(sub)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args) or EXIT_OK
    except KeyboardInterrupt:
        err("interrupted")
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except (PackError, OSError, ValueError) as e:
        err(str(e))
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
