"""Replay every crash, hang or contract violation the fuzzers ever found (tests/data/regress/).

  shard/*.pack      inputs of fuzz/fuzz_shard.c: replayed by the same harness built without libFuzzer
                    (gcc, ASan + UBSan, every UBSan report fatal), together with the seed corpus
  open/*.bin        inputs of fuzz/fuzz_open.py: each rebuilds its mutated dataset and reads it; only
                    packfmt.PackError may escape, and no wrong bytes
  datasets/*/       whole hostile datasets: open, read every sample, look up every key

Each replay runs in a child process, so a crash is a failed test, not a dead test run.  A file listed
in the ``known_bugs.json`` beside it is a reported bug not yet fixed: its test is a strict xfail, so it
starts failing (XPASS) the day the fix lands and the entry must be removed.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from _hostile import UNDER_ASAN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGRESS = os.path.join(ROOT, "tests", "data", "regress")
C_SOURCES = ["fuzz/fuzz_shard.c", "src_c/format.c", "src_c/checksum.c", "src_c/reader.c"]
# clang's UBSan also reports NULL + 0, which gcc's does not: prefer it (it is what the fuzzer uses).
CC = shutil.which("clang-14") or shutil.which("clang") or shutil.which("gcc") or shutil.which("cc")
IS_CLANG = bool(CC) and "clang" in os.path.basename(CC)


def _known(sub: str) -> dict:
    path = os.path.join(REGRESS, sub, "known_bugs.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _params(sub: str, pattern: str):
    known = _known(sub)
    if sub == "shard" and not IS_CLANG:
        known = {}  # the known shard findings are UB only clang's sanitizer reports
    out = []
    for path in sorted(glob.glob(os.path.join(REGRESS, sub, pattern))):
        name = os.path.basename(path.rstrip("/"))
        # Under ASan (tools/sanitize_tests.sh) the replays run without their memory limit, so a known bug
        # that needs one to show may pass: not strict there.
        marks = [pytest.mark.xfail(strict=not UNDER_ASAN, reason=known[name])] if name in known else []
        out.append(pytest.param(path, id=name, marks=marks))
    return out


@pytest.fixture(scope="module")
def replay_exe(tmp_path_factory):
    """fuzz/fuzz_shard.c built as a plain program that replays files, under ASan + UBSan."""
    cc = CC
    assert cc, "a C compiler is needed"
    exe = str(tmp_path_factory.mktemp("replay") / "fuzz_replay")
    cmd = [cc, "-DPK_FUZZ_STANDALONE", "-std=gnu11", "-O1", "-g", "-fno-omit-frame-pointer",
           "-fsanitize=address,undefined", "-Isrc_c", *C_SOURCES, "-lpthread",
           "-o", exe]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
    return exe


def _run_replay(exe, files, suppress=False):
    """Run the harness on files; every UBSan report is fatal unless listed in fuzz/ubsan.supp and
    suppress is set (the known findings have their own strict-xfail regression tests)."""
    ubsan = "print_stacktrace=1:halt_on_error=1"
    if suppress:
        ubsan += ":suppressions=" + os.path.join(ROOT, "fuzz", "ubsan.supp")
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": ubsan}
    env.pop("LD_PRELOAD", None)  # the replay binary links its own sanitizer runtime
    r = subprocess.run([exe, *files], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert r.stdout.split() == [w for f in files for w in ("ok", f)]
    assert "runtime error" not in r.stderr or suppress, r.stderr[-4000:]


@pytest.mark.parametrize("path", _params("shard", "*.pack"))
def test_shard_regression(replay_exe, path):
    _run_replay(replay_exe, [path])


def test_seed_corpus_replays_clean(replay_exe, tmp_path):
    """The seed corpus (real shards and near misses) through the same harness."""
    out = tmp_path / "seeds"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "fuzz", "make_corpus.py"), str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    _run_replay(replay_exe, sorted(glob.glob(str(out / "shard" / "*.pack"))), suppress=True)


def _child(code: str, timeout: int = 120):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


@pytest.mark.parametrize("path", _params("open", "*.bin"))
def test_open_regression(path):
    code = ("import resource\n"
            + ("" if UNDER_ASAN else "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY))\n") +
            "import sys; sys.argv = ['fuzz_open', '--replay']\n"
            "sys.path.insert(0, 'fuzz')\n"
            "import fuzz_open\n"
            f"fuzz_open.TestOneInput(open({path!r}, 'rb').read())\n"
            "print('clean')\n")
    r = _child(code)
    assert r.returncode == 0 and "clean" in r.stdout, f"exit {r.returncode}\n{r.stderr[-3000:]}"


@pytest.mark.parametrize("path", _params("datasets", "*/"))
def test_dataset_regression(path, tmp_path):
    d = shutil.copytree(path, tmp_path / "ds")
    code = f"""
import packfmt
try:
    ds = packfmt.open({str(d)!r})
    for i in range(len(ds)):
        try:
            ds[i]
            k = ds.key(i)
            ds.index_of(k)
        except KeyError:
            pass
        except packfmt.PackError:
            pass
    ds.get_batch(list(range(len(ds))))
except packfmt.PackError as e:
    print("refused", type(e).__name__)
print("clean")
"""
    r = _child(code)
    assert r.returncode == 0 and "clean" in r.stdout, f"exit {r.returncode}\n{r.stderr[-3000:]}"


def test_uninit_bytearray_sizes_and_packed_batches_fill_every_byte(tmp_path):
    """get_batch_packed allocates its buffer uninitialised: every byte must still come from a record."""
    import packfmt
    from packfmt import _core
    assert type(_core.uninit_bytearray(0)) is bytearray and len(_core.uninit_bytearray(4097)) == 4097
    with pytest.raises(ValueError):
        _core.uninit_bytearray(-1)
    samples = [bytes([k % 251]) * (k * 37 % 5000) for k in range(300)]
    for compression in ("none", "zstd"):
        out = tmp_path / compression
        with packfmt.Writer(str(out), compression=compression) as w:
            for k, s in enumerate(samples):
                w.add(f"k{k}", s)
        ds = packfmt.open(str(out))
        for _ in range(3):  # reuse freed allocations, which hold old bytes
            rows = list(range(299, -1, -2))
            buf, off = ds.get_batch_packed(rows)
            assert bytes(buf) == b"".join(samples[r] for r in rows)
            assert off.tolist()[-1] == len(buf)
