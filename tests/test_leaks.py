"""No leaks in the C core or through the bindings.

* tests/c/leak_driver.c walks every allocation path of the C core (writer, reader, shard sets, batch reads,
  and their error paths) and runs clean under valgrind memcheck (every leak kind and every memory error is
  fatal) and under LeakSanitizer (an ASan build).
* Through Python: opening, reading, failing (corrupt records, missing shards) and dropping datasets
  thousands of times leaves the process's file descriptors, maps and RSS where they were.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["tests/c/leak_driver.c", "src_c/format.c", "src_c/checksum.c", "src_c/reader.c", "src_c/writer.c"]


def child_env() -> dict:
    """Environment for a Python child whose memory is measured.  Under tools/sanitize_tests.sh (ASan
    preloaded) ASan's quarantine would hold freed memory and look like a leak: turn it off."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    if "libasan" in env.get("LD_PRELOAD", ""):
        env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":quarantine_size_mb=0:thread_local_quarantine_size_kb=0"
    return env


def _build(tmp_path, name, flags):
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "a C compiler is needed"
    exe = str(tmp_path / name)
    cmd = [cc, "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-g", "-Isrc_c", *flags, *SOURCES, "-lpthread", "-o", exe]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
    scratch = tmp_path / f"{name}-scratch"
    scratch.mkdir()
    return exe, str(scratch)


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed (apt-get install valgrind)")
def test_c_core_valgrind_memcheck(tmp_path):
    exe, scratch = _build(tmp_path, "leak_driver", ["-O1"])
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # (tools/sanitize_tests.sh preloads ASan)
    r = subprocess.run(["valgrind", "-q", "--leak-check=full", "--show-leak-kinds=all", "--errors-for-leak-kinds=all",
                        "--track-fds=no", "--error-exitcode=99", exe, scratch],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"valgrind exit {r.returncode}\n{r.stdout}\n{r.stderr[-6000:]}"
    assert r.stdout.strip() == "ok"
    assert r.stderr == "", r.stderr[-6000:]


def test_c_core_leak_sanitizer(tmp_path):
    exe, scratch = _build(tmp_path, "leak_driver_asan", ["-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                                                         "-fno-sanitize-recover=all"])
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"}
    env.pop("LD_PRELOAD", None)
    r = subprocess.run([exe, scratch], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-6000:]}"
    assert r.stdout.strip() == "ok" and r.stderr == ""


PY_SRC = r'''
import gc, os, sys, json
sys.path.insert(0, sys.argv[2])
import numpy as np, packfmt
from packfmt import _core
import _hostile as h

root = sys.argv[1]
good = os.path.join(root, "good")
bad = os.path.join(root, "bad")
payloads = h.make_dataset(good, n=40, compression="zstd", shard_size=4000)
h.make_dataset(bad, n=40, shard_size=4000)
# bad: one corrupt record in shard 0, shard 2 missing
h.flip(h.shard_path(bad, 0), 40)
os.unlink(h.shard_path(bad, 2))

def fds():
    return len(os.listdir("/proc/self/fd"))
def maps():
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def round_():
    for mmap in (True, False):
        ds = packfmt.open(good, mmap=mmap)
        assert ds.get_batch(np.arange(len(ds))[::-1]) == payloads[::-1]
        ds.index_of(ds.key(5))
        ds.close()
        ds = packfmt.open(bad, mmap=mmap)
        for i in (0, 1, len(ds) - 1):
            try:
                ds[i]
            except packfmt.PackError:
                pass
        try:
            ds.get_batch(np.arange(len(ds)))
        except packfmt.PackError:
            pass
        del ds
    try:
        _core.Shard(h.shard_path(bad, 2))
    except packfmt.PackError:
        pass
    s = _core.Shard(h.shard_path(good, 0))
    s.verify_records(0, len(s))
    s.close()

for _ in range(20):
    round_()
gc.collect()
base = (fds(), maps(), rss())
for _ in range(300):
    round_()
gc.collect()
print(json.dumps({"before": base, "after": (fds(), maps(), rss())}))
'''


def test_python_open_read_fail_close_does_not_leak(tmp_path):
    script = tmp_path / "leaks.py"
    script.write_text(PY_SRC)
    r = subprocess.run([sys.executable, str(script), str(tmp_path), os.path.dirname(os.path.abspath(__file__))],
                       capture_output=True, text=True, timeout=300, env=child_env())
    assert r.returncode == 0, r.stderr[-4000:]
    import json

    fig = json.loads(r.stdout.strip().splitlines()[-1])
    (fd0, maps0, rss0), (fd1, maps1, rss1) = fig["before"], fig["after"]
    print(f"\n300 open/read/fail/close rounds: fds {fd0}->{fd1}, maps {maps0}->{maps1}, "
          f"RSS {rss0 / 2**20:.1f}->{rss1 / 2**20:.1f} MiB")
    assert fd1 == fd0
    assert maps1 <= maps0 + 2
    assert rss1 <= rss0 * 1.05 + (4 << 20)
