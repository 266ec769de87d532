"""The `pack` command line, driven through subprocesses as a user would."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import packfmt

PACK = [sys.executable, "-m", "packfmt.cli"]


def pack(*args, check=True, **kw):
    r = subprocess.run(PACK + [str(a) for a in args], capture_output=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"pack {args} exited {r.returncode}: {r.stderr.decode()}")
    return r


def make_tree(root, seed=0):
    """A tree with deep paths, unicode and odd names, empty files and a range of sizes."""
    rng = np.random.default_rng(seed)
    names = ["a.txt", "empty", "ünïcödé/日本語.bin", "deep/er/and/deeper/x", "sp ace/we ird#name%.dat",
             "dots/..hidden", "dots/.x", "big/blob.bin", "cls1/1.jpg", "cls1/2.jpg", "cls2/3.jpg"]
    files = {}
    for i, name in enumerate(names):
        size = 0 if name == "empty" else (3 << 20 if name.startswith("big") else int(rng.integers(1, 20000)))
        data = rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()
        p = os.path.join(root, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        files[name] = data
    return files


def read_tree(root):
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root).replace(os.sep, "/")] = fh.read()
    return out


@pytest.mark.parametrize("compression", ["none", "zstd", "zstd:9", "zstd-dict"])
@pytest.mark.parametrize("workers", [1, 2])
def test_build_extract_identical_tree(tmp_path, compression, workers):
    src = tmp_path / "src"
    files = make_tree(src)
    dst = tmp_path / "ds"
    r = pack("build", src, dst, "--shard-size", "64KiB", "--compression", compression, "--workers", workers)
    out = r.stdout.decode()
    assert f"packed {len(files)} files" in out and "files/s" in out
    ds = packfmt.open(dst)
    assert sorted(ds.keys.to_pylist()) == ds.keys.to_pylist() == sorted(files)  # deterministic walk order
    assert len(ds.shards) > 1
    pack("extract", dst, tmp_path / "out")
    assert read_tree(tmp_path / "out") == files


def test_build_is_deterministic_across_worker_counts(tmp_path):
    make_tree(tmp_path / "src")
    pack("build", tmp_path / "src", tmp_path / "a", "--shard-size", "32KiB", "--workers", "1")
    pack("build", tmp_path / "src", tmp_path / "b", "--shard-size", "32KiB", "--workers", "2")
    a, b = packfmt.open(tmp_path / "a"), packfmt.open(tmp_path / "b")
    assert a.shards == b.shards
    for name in a.shards:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a.index.equals(b.index)


def test_build_refuses_existing_destination(tmp_path):
    make_tree(tmp_path / "src")
    pack("build", tmp_path / "src", tmp_path / "ds")
    r = pack("build", tmp_path / "src", tmp_path / "ds", check=False)
    assert r.returncode == 1 and b"already holds a dataset" in r.stderr and b"--overwrite" in r.stderr
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    r = pack("build", tmp_path / "src", tmp_path / "other", check=False)
    assert r.returncode == 1 and b"not empty" in r.stderr
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    pack("build", tmp_path / "src", tmp_path / "ds", "--overwrite", "--compression", "zstd")
    assert packfmt.open(tmp_path / "ds").manifest["compression"]["codec"] == "zstd"


def test_build_unreadable_file_and_skip_errors(tmp_path):
    src = tmp_path / "src"
    files = make_tree(src)
    os.symlink(tmp_path / "nowhere", src / "dangling")
    r = pack("build", src, tmp_path / "ds", check=False)
    assert r.returncode == 1 and b"dangling" in r.stderr and b"--skip-errors" not in r.stdout
    with pytest.raises(packfmt.DatasetNotFoundError):
        packfmt.open(tmp_path / "ds")
    r = pack("build", src, tmp_path / "ds2", "--skip-errors")
    assert b"skipped:" in r.stderr and b"dangling" in r.stderr and b"skipped 1" in r.stdout
    assert sorted(packfmt.open(tmp_path / "ds2").keys.to_pylist()) == sorted(files)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_build_file_vanishing_after_walk(tmp_path, monkeypatch, compression):
    """A file that cannot be read while packing: a clear error naming it, or skipped with skip_errors."""
    from packfmt import build
    src = tmp_path / "src"
    files = make_tree(src)
    real_walk = build.walk

    def walk_then_delete(*a, **kw):
        out = real_walk(*a, **kw)
        os.unlink(src / "a.txt")
        return out

    monkeypatch.setattr(build, "walk", walk_then_delete)
    with pytest.raises(build.UnreadableFileError, match="a.txt"):
        build.build_dataset(src, tmp_path / "ds", compression=compression, workers=1, progress=False)
    with pytest.raises(packfmt.DatasetNotFoundError):
        packfmt.open(tmp_path / "ds")
    (src / "a.txt").write_bytes(files["a.txt"])
    rep = build.build_dataset(src, tmp_path / "ds", compression=compression, workers=1, progress=False,
                              skip_errors=True)
    assert [os.path.basename(s.path) for s in rep.skipped] == ["a.txt"]
    ds = packfmt.open(tmp_path / "ds")
    assert "a.txt" not in ds and len(ds) == len(files) - 1
    for k in ds.keys.to_pylist():
        assert ds[ds.index_of(k)] == files[k]


def test_build_symlinks_documented_behaviour(tmp_path):
    src = tmp_path / "src"
    files = make_tree(src)
    os.symlink(src / "a.txt", src / "link-to-file")
    os.symlink(src / "cls1", src / "link-to-dir")
    r = pack("build", src, tmp_path / "ds")
    assert b"symlink to a directory" in r.stderr
    ds = packfmt.open(tmp_path / "ds")
    assert ds[ds.index_of("link-to-file")] == files["a.txt"]  # file links are packed with their content
    assert not any(k.startswith("link-to-dir/") for k in ds.keys.to_pylist())


def test_include_exclude_and_labels(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    pack("build", src, tmp_path / "ds", "--include", "*.jpg", "--label-from", "parent")
    ds = packfmt.open(tmp_path / "ds")
    assert ds.keys.to_pylist() == ["cls1/1.jpg", "cls1/2.jpg", "cls2/3.jpg"]
    assert ds.column("label").tolist() == [0, 0, 1]
    assert ds.manifest["labels"] == ["cls1", "cls2"]
    pack("build", src, tmp_path / "ds2", "--exclude", "*.jpg", "--exclude", "big/*")
    keys = packfmt.open(tmp_path / "ds2").keys.to_pylist()
    assert not any(k.endswith(".jpg") or k.startswith("big/") for k in keys) and "a.txt" in keys


def test_ls_outputs(tmp_path):
    src = tmp_path / "src"
    files = make_tree(src)
    dst = tmp_path / "ds"
    pack("build", src, dst, "--shard-size", "64KiB", "--compression", "zstd")
    out = pack("ls", dst).stdout.decode()
    assert "samples" in out and f"{len(files)}" in out and "zstd" in out and "format version" in out
    summary = json.loads(pack("ls", "--json", dst).stdout)
    assert summary["samples"] == len(files) and summary["format_version"] == packfmt.FORMAT_VERSION
    assert summary["raw_bytes"] == sum(map(len, files.values()))
    long = pack("ls", "-l", dst).stdout.decode().splitlines()
    assert long[0].split() == ["index", "size", "stored", "shard", "offset", "key"]
    assert len(long) == len(files) + 1
    row = long[1 + sorted(files).index("a.txt")].split()
    assert row[1] == str(len(files["a.txt"])) and row[-1] == "a.txt"
    recs = [json.loads(line) for line in pack("ls", "-l", "--json", dst).stdout.splitlines()]
    assert {r["key"]: r["size"] for r in recs} == {k: len(v) for k, v in files.items()}
    shards = pack("ls", "--shards", dst).stdout.decode().splitlines()
    ds = packfmt.open(dst)
    assert len(shards) == len(ds.shards) + 1 and shards[1].startswith("shard-00000.pack")
    lone = pack("ls", "-l", dst / "shard-00000.pack").stdout.decode()
    assert f"records         {ds.manifest['shards'][0]['records']}" in lone and "checksum" in lone


def test_get(tmp_path):
    src = tmp_path / "src"
    files = make_tree(src)
    dst = tmp_path / "ds"
    pack("build", src, dst, "--compression", "zstd")
    assert pack("get", dst, "ünïcödé/日本語.bin").stdout == files["ünïcödé/日本語.bin"]
    i = packfmt.open(dst).index_of("a.txt")
    pack("get", dst, "--index", i, "-o", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == files["a.txt"]
    r = pack("get", dst, "no/such/key", check=False)
    assert r.returncode == 1 and b"no sample with key" in r.stderr
    r = pack("get", dst, "--index", 10**6, check=False)
    assert r.returncode == 1 and b"out of range" in r.stderr


def test_verify_reports_corruption(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    dst = tmp_path / "ds"
    pack("build", src, dst, "--shard-size", "64KiB")
    r = pack("verify", dst)
    assert r.stdout.startswith(b"OK")
    ds = packfmt.open(dst)
    i = ds.index_of("a.txt")
    shard = dst / ds.shards[int(ds.shard_of[i])]
    off = int(ds.offsets[i]) + 3
    data = bytearray(shard.read_bytes())
    data[off] ^= 0x40
    shard.write_bytes(bytes(data))
    r = pack("verify", dst, check=False)
    assert r.returncode == 1
    out = r.stdout.decode()
    assert "checksum mismatch" in out and "a.txt" in out and ds.shards[int(ds.shard_of[i])] in out
    rep = json.loads(pack("verify", "--json", dst, check=False).stdout)
    assert rep["ok"] is False and rep["problems"]
    with pytest.raises(packfmt.CorruptShardError, match="a.txt|checksum"):
        packfmt.open(dst)[i]


def test_verify_missing_shard_and_not_a_dataset(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    dst = tmp_path / "ds"
    pack("build", src, dst, "--shard-size", "64KiB")
    os.unlink(dst / "shard-00001.pack")
    r = pack("verify", dst, check=False)
    assert r.returncode == 1 and b"shard-00001.pack" in r.stdout
    r = pack("verify", tmp_path / "nothing", check=False)
    assert r.returncode == 1 and b"no packfmt dataset" in r.stderr


def test_usage_errors_exit_2(tmp_path):
    r = pack("build", check=False)
    assert r.returncode == 2
    r = pack("build", tmp_path, tmp_path / "x", "--compression", "lz4", check=False)
    assert r.returncode == 1 and b"unknown compression" in r.stderr


def test_bench(tmp_path):
    make_tree(tmp_path / "src")
    pack("build", tmp_path / "src", tmp_path / "ds", "--compression", "zstd")
    out = pack("bench", tmp_path / "ds", "--seconds", "0.2", "--batch-size", "4").stdout.decode().splitlines()
    assert out[0].split() == ["read", "samples/s", "MB/s"]
    assert out[1].startswith("get_batch(4)") and out[2].startswith("ds[i]")
    assert float(out[1].split()[1].replace(",", "")) > 0


def test_index_in_several_record_batches_reads_every_key(tmp_path):
    """An index whose key column comes in several pieces (as pyarrow splits > 2 GiB of keys) is read as one
    column: every key is visible to keys, key() and index_of()."""
    import pyarrow as pa

    from packfmt import _core
    from packfmt import manifest as mf
    with packfmt.Writer(tmp_path / "ds", shard_size="1KiB") as w:
        for i in range(50):
            w.add(f"key-{i:03d}", b"x" * i)
    table = packfmt.open(tmp_path / "ds").index
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as wr:
        for batch in table.to_batches(max_chunksize=7):
            wr.write_batch(batch)
    data = sink.getvalue().to_pybytes()
    (tmp_path / "ds" / "index.arrow").write_bytes(data)
    man = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    man["index"].update(size=len(data), checksum=mf.hex64(_core.xxh64(data)))
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(man))
    ds = packfmt.open(tmp_path / "ds")
    assert ds.keys.to_pylist() == [f"key-{i:03d}" for i in range(50)]
    assert ds.index_of("key-049") == 49 and ds.key(49) == "key-049" and ds[49] == b"x" * 49
