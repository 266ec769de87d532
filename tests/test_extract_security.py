"""``pack extract`` never writes outside OUTDIR, whatever the keys or what already sits in OUTDIR.

The keys come from a hostile index (written with every checksum fixed, since ``packfmt.Writer`` itself
refuses NUL and over-long keys): ``..``, absolute paths, NUL, empty components, 1 MB keys; and OUTDIR
may already hold symlinks (to directories or files outside, dangling), symlinked parent directories or
hard links to files outside.  Every case ends in a clear error naming the key (or a correct extraction),
and the directory tree around OUTDIR is byte-for-byte unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pytest

import packfmt
from packfmt.extract import extract

import _hostile as h


def _dataset(path, keys, payload=lambda i: b"payload %d" % i):
    """A dataset whose index carries exactly these keys (forged after writing with safe ones)."""
    with packfmt.Writer(str(path)) as w:
        for i in range(len(keys)):
            w.add(f"safe-{i}", payload(i))
    t = h.read_index(path)
    h.rewrite_index(path, t.set_column(0, "key", pa.array(keys, pa.string())))
    return str(path)


def _snapshot(root, skip):
    """Every path under root except those under skip: type, link target, content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        if os.path.abspath(dirpath).startswith(os.path.abspath(skip)):
            continue
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if os.path.abspath(p).startswith(os.path.abspath(skip) + os.sep) or os.path.abspath(p) == os.path.abspath(skip):
                continue
            if os.path.islink(p):
                out[p] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[p] = ("dir",)
            else:
                with open(p, "rb") as f:
                    out[p] = ("file", f.read())
    return out


@pytest.fixture
def world(tmp_path):
    """tmp_path/outside holds files an attacker would like to overwrite; tmp_path/out is OUTDIR."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_bytes(b"precious")
    (outside / "sub").mkdir()
    out = tmp_path / "out"
    return tmp_path, outside, out


def _extract_cli(ds, out):
    return subprocess.run([sys.executable, "-m", "packfmt.cli", "extract", "-q", ds, str(out)], capture_output=True,
                          text=True, timeout=120)





def test_one_mebibyte_deep_key_is_refused_quickly():
    """'a/' * 2**19 + 'x': 1 MiB, half a million directory levels.  Checked with key_parts alone (the
    full extraction of this key currently takes ~45 s to fail with RecursionError)."""
    from packfmt.extract import key_parts

    with pytest.raises(packfmt.UnsafeKeyError):
        key_parts("a/" * (1 << 19) + "x")


def _hostile_keys(outside):
    return [
        "../escape.txt",
        "a/../../escape.txt",
        "a/b/../../../escape.txt",
        "..",
        "a/..",
        ".",
        "./a",
        "a/./b",
        "a//b",
        "",
        "/",
        f"{outside}/abs.txt",
        "/etc/packfmt-should-not-exist",
        "a\x00b",
        "\x00",
        "a/" + "x" * 256,
        "x" * (1 << 20),
        "a/" * 5000 + "x",   # 5000 directory levels
        "../" * 1000 + "tmp/escape.txt",
    ]


@pytest.mark.parametrize("which", range(19))
def test_hostile_key_is_refused_before_anything_is_written(world, which, request):
    tmp, outside, out = world
    bad = _hostile_keys(outside)[which]
    if isinstance(bad, type(pytest.param(0))):
        request.node.add_marker(bad.marks[0])
        bad = bad.values[0]
    ds_path = _dataset(tmp / "ds", ["fine.txt", bad, "also-fine.txt"])
    before = _snapshot(tmp, out)
    ds = packfmt.open(ds_path)
    with pytest.raises(packfmt.UnsafeKeyError) as ei:
        extract(ds, out)
    msg = str(ei.value)
    assert "refusing key" in msg and len(msg) < 2000  # names the key, does not dump 1 MB
    assert _snapshot(tmp, out) == before
    assert not os.path.exists(out) or os.listdir(out) == []  # refused before writing anything


def test_hostile_key_through_the_cli(world):
    tmp, outside, out = world
    ds_path = _dataset(tmp / "ds", ["ok.txt", "../escape.txt"])
    before = _snapshot(tmp, out)
    r = _extract_cli(ds_path, out)
    assert r.returncode != 0
    assert "refusing key" in r.stderr and "../escape.txt" in r.stderr
    assert "Traceback" not in r.stderr
    assert _snapshot(tmp, out) == before


_SYMLINK_SETUPS = [
    ("dir-symlink", "d/x.txt"),              # OUTDIR/d -> outside/
    ("dir-symlink", "d/sub/x.txt"),
    ("file-symlink", "victim.txt"),          # OUTDIR/victim.txt -> outside/victim.txt
    ("dangling-symlink", "new.txt"),         # OUTDIR/new.txt -> outside/created.txt (does not exist)
    ("parent-symlink", "a/b/c.txt"),         # OUTDIR/a/b -> outside/sub
    ("relative-symlink", "r/x.txt"),         # OUTDIR/r -> ../outside
    ("symlink-loop", "loop/x.txt"),          # OUTDIR/loop -> loop
]
# Every setup through the API; three through the CLI (the same code, but a new interpreter each).
_SYMLINK_CASES = [(s, k, "api") for s, k in _SYMLINK_SETUPS] + [
    (s, k, "cli") for s, k in _SYMLINK_SETUPS if k in ("d/x.txt", "victim.txt", "a/b/c.txt")]


@pytest.mark.parametrize("setup, key, via", _SYMLINK_CASES)
def test_existing_symlinks_in_outdir_are_not_followed(world, setup, key, via):
    tmp, outside, out = world
    out.mkdir()
    if setup == "dir-symlink":
        os.symlink(outside, out / "d")
    elif setup == "file-symlink":
        os.symlink(outside / "victim.txt", out / "victim.txt")
    elif setup == "dangling-symlink":
        os.symlink(outside / "created.txt", out / "new.txt")
    elif setup == "parent-symlink":
        (out / "a").mkdir()
        os.symlink(outside / "sub", out / "a" / "b")
    elif setup == "relative-symlink":
        os.symlink("../outside", out / "r")
    else:
        os.symlink("loop", out / "loop")
    ds_path = _dataset(tmp / "ds", ["first.txt", key])
    before = _snapshot(tmp, out)
    before_outside = _snapshot(outside, tmp / "nothing")
    if via == "api":
        with pytest.raises(packfmt.UnsafeKeyError) as ei:
            extract(packfmt.open(ds_path), out)
        assert key in str(ei.value)
    else:
        r = _extract_cli(ds_path, out)
        assert r.returncode != 0 and "refusing key" in r.stderr and "Traceback" not in r.stderr
    assert _snapshot(tmp, out) == before
    assert _snapshot(outside, tmp / "nothing") == before_outside
    assert not (outside / "created.txt").exists()


def test_existing_hard_link_in_outdir_is_not_written_through(world):
    tmp, outside, out = world
    out.mkdir()
    os.link(outside / "victim.txt", out / "victim.txt")
    ds_path = _dataset(tmp / "ds", ["victim.txt"])
    try:
        extract(packfmt.open(ds_path), out)
    except packfmt.PackError:
        pass
    assert (outside / "victim.txt").read_bytes() == b"precious"


def test_file_and_directory_with_the_same_name(world):
    tmp, outside, out = world
    ds_path = _dataset(tmp / "ds", ["a", "a/b"])
    with pytest.raises(packfmt.UnsafeKeyError):
        extract(packfmt.open(ds_path), out)
    ds_path = _dataset(tmp / "ds2", ["c/d", "c"])
    with pytest.raises(packfmt.UnsafeKeyError):
        extract(packfmt.open(ds_path), out)
    assert _snapshot(outside, tmp / "nothing")[str(outside / "victim.txt")] == ("file", b"precious")


def test_odd_but_safe_keys_extract_byte_for_byte(world):
    tmp, outside, out = world
    keys = ["..a", "a..", "a..b/..c", ".hidden", "d/.hidden", "-rf", "sp ace/t\tab", "new\nline",
            "back\\..\\slash", "\u00e9t\u00e9/\u6f22\u5b57.txt", "\U0001f600", "x" * 255, "/".join("d" * 60)]
    payload = lambda i: bytes([i]) * (i * 100)  # noqa: E731
    ds_path = _dataset(tmp / "ds", keys, payload)
    before = _snapshot(tmp, out)
    assert extract(packfmt.open(ds_path), out) == len(keys)
    for i, k in enumerate(keys):
        p = os.path.join(out, *k.split("/"))
        assert os.path.realpath(p).startswith(os.path.realpath(out) + os.sep)
        with open(p, "rb") as f:
            assert f.read() == payload(i)
    after = _snapshot(tmp, out)
    after.pop(str(tmp / "out"), None)
    assert after == before


def test_build_extract_round_trip_with_cli(tmp_path):
    src = tmp_path / "src"
    files = {"a/b/c.txt": b"abc", "top.bin": bytes(range(256)) * 10, "empty": b"", "\u00fc/x": b"u"}
    for k, v in files.items():
        p = src / k
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(v)
    r = subprocess.run([sys.executable, "-m", "packfmt.cli", "build", "-q", str(src), str(tmp_path / "ds")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = _extract_cli(str(tmp_path / "ds"), tmp_path / "out")
    assert r.returncode == 0, r.stderr
    for k, v in files.items():
        assert (tmp_path / "out" / k).read_bytes() == v
