"""Build tests/c/test_core.c against the C core alone (no Python.h) and run it: once with warnings as
errors, once under AddressSanitizer + UndefinedBehaviorSanitizer."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["tests/c/test_core.c", "src_c/format.c", "src_c/checksum.c", "src_c/reader.c", "src_c/writer.c"]
WARN = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-Isrc_c"]
CASES = ["checksum", "xxh3", "structs", "write_and_open", "flags_and_dict", "writer_errors", "append_file_dirs",
         "empty_shard", "batches", "corruption", "verify_buffers", "refused_open_leaves_nothing"]


def build_and_run(tmp_path, flags, env=None):
    gcc = shutil.which("gcc") or shutil.which("cc")
    assert gcc, "a C compiler is needed to build packfmt"
    exe = tmp_path / "test_core"
    cmd = [gcc, *WARN, *flags, *SOURCES, "-lpthread", "-o", str(exe)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    r = subprocess.run([str(exe), str(scratch)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert r.stdout.split() == [w for c in CASES for w in ("ok", c)] + ["all", "ok"], r.stdout
    assert r.stderr == ""


def test_c_core_optimised(tmp_path):
    build_and_run(tmp_path, ["-O2"])


def test_c_core_sanitizers(tmp_path):
    build_and_run(tmp_path, ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                             "-fno-sanitize-recover=all"],
                  env={"ASAN_OPTIONS": "abort_on_error=0:detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"})
