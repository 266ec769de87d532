"""Crash consistency: SIGKILL a build at random moments; a dataset is either complete or does not exist.

For each trial a build is started in its own process group (``pack build`` with two workers, or a Python
process writing with ``packfmt.Writer``), killed with SIGKILL (the whole group, workers included) after a
random delay drawn over the length of a full build, and then:

  * the destination either does not open (``packfmt.DatasetNotFoundError``, a ``PackError``) or opens as
    the complete dataset: every sample equal to its source, and ``pack verify`` passes;
  * re-running the same build into the same destination succeeds -- without ``--overwrite`` when the
    killed build never published a manifest -- and gives the complete dataset.

Also ``pack build`` into S3 (moto on 127.0.0.1), ``PACKFMT_CRASH_S3_TRIALS`` (default 4).

Trials: ``PACKFMT_CRASH_TRIALS`` (default 16, ``pack build``) + ``PACKFMT_CRASH_WRITER_TRIALS`` (default 10); the seed is printed
so a failure can be replayed with ``PACKFMT_CRASH_SEED``).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import packfmt
from packfmt.build import build_dataset

TRIALS = int(os.environ.get("PACKFMT_CRASH_TRIALS", "16"))
WRITER_TRIALS = int(os.environ.get("PACKFMT_CRASH_WRITER_TRIALS", "10"))
SEED = int(os.environ.get("PACKFMT_CRASH_SEED", str(random.SystemRandom().randrange(1 << 30))))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A source tree of 800 files (log-normal sizes, some empty) in nested directories."""
    src = tmp_path_factory.mktemp("crash") / "src"
    rng = random.Random(7)
    files = {}
    for i in range(800):
        rel = f"d{i % 5}/e{i % 3}/f{i:04d}.bin"
        data = rng.randbytes(0 if i % 97 == 0 else min(40000, int(rng.lognormvariate(7.5, 1))))
        os.makedirs(src / os.path.dirname(rel), exist_ok=True)
        (src / rel).write_bytes(data)
        files[rel] = data
    return str(src), files


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def _run_until(cmd, delay: float, env=None) -> int:
    """Start cmd in a new process group; SIGKILL the group after delay seconds. Returns the exit code
    (negative: killed)."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=env)
    try:
        p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        _kill_group(p)
    return p.returncode


def _check_complete(dst: str, files: dict) -> None:
    ds = packfmt.open(dst)
    assert len(ds) == len(files)
    keys = ds.keys.to_pylist()
    assert sorted(keys) == sorted(files)
    got = ds.get_batch(np.arange(len(ds)))
    for k, data in zip(keys, got):
        assert data == files[k], f"{dst}: sample {k!r} differs from its source"


def _pack_verify(dst: str) -> None:
    r = subprocess.run([sys.executable, "-m", "packfmt.cli", "verify", "-q", dst], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"pack verify {dst}: {r.stdout}{r.stderr}"


def _verify_in_process(dst: str) -> None:
    """What ``pack verify`` checks (the same function), without paying for a new interpreter."""
    from packfmt.verify import verify_dataset

    rep = verify_dataset(packfmt.open(dst))
    assert rep.ok, f"verify {dst}: {rep}"


def _after_kill(dst: str, files: dict) -> str:
    """The state a killed build left: 'absent' or 'complete' (anything else fails)."""
    try:
        packfmt.open(dst)
    except packfmt.DatasetNotFoundError:
        return "absent"
    _check_complete(dst, files)
    _verify_in_process(dst)
    return "complete"


def _startup_time() -> float:
    """Seconds until a fresh interpreter has imported packfmt: kills before that only test the OS."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import packfmt.cli"], check=True)
    return time.perf_counter() - t


def _time_full(cmd, env=None) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    return time.perf_counter() - t


def _summary(name, outcomes):
    counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    print(f"\n{name}: {len(outcomes)} SIGKILL trials (seed {SEED}): {counts}")


def test_kill_pack_build(tree, tmp_path):
    src, files = tree
    rng = random.Random(SEED)
    base = [sys.executable, "-m", "packfmt.cli", "build", "-q", "--workers", "2", "--shard-size", "512KiB"]
    full = _time_full(base + [src, str(tmp_path / "full")])
    _check_complete(str(tmp_path / "full"), files)
    _pack_verify(str(tmp_path / "full"))
    start = _startup_time()
    outcomes = []
    for t in range(TRIALS):
        dst = str(tmp_path / f"dst{t}")
        comp = rng.choice(["none", "zstd", "zstd-dict"])
        cmd = base + ["--compression", comp, src, dst]
        if rng.random() < 0.2:
            # Kill a rebuild over an existing complete dataset (--overwrite): never a mixed dataset.
            build_dataset(src, dst, shard_size="512KiB", compression="none", workers=1, progress=False)
            cmd.insert(3, "--overwrite")
        rc = _run_until(cmd, rng.uniform(0.7 * start, full))
        state = _after_kill(dst, files)
        outcomes.append(f"{state}{'-finished' if rc == 0 else ''}")
        if rc == 0:
            assert state == "complete"
        # Re-running the build succeeds; an interrupted build needs no --overwrite.
        build_dataset(src, dst, shard_size="512KiB", compression=comp, workers=2, progress=False,
                      overwrite=(state == "complete"))
        _check_complete(dst, files)
        if t % 6 == 0:
            _verify_in_process(dst)
    _pack_verify(dst)  # the command itself, once
    _summary("pack build", outcomes)
    assert "absent" in outcomes  # the kills did land mid-build


WRITER_CHILD = r"""
import sys, random
sys.path.insert(0, sys.argv[3])
import packfmt
from test_crash_data import files_for
files = files_for()
with packfmt.Writer(sys.argv[1], shard_size="256KiB", compression=sys.argv[2]) as w:
    for k in sorted(files):
        w.add(k, files[k], label=len(k))
print("done")
"""


def test_kill_python_writer(tmp_path):
    rng = random.Random(SEED + 1)
    helper = tmp_path / "test_crash_data.py"
    helper.write_text(
        "import random\n"
        "def files_for():\n"
        "    r = random.Random(11)\n"
        "    return {f'w/{i:05d}': r.randbytes(r.randrange(0, 3000)) for i in range(2000)}\n")
    sys.path.insert(0, str(tmp_path))
    try:
        from test_crash_data import files_for
    finally:
        sys.path.remove(str(tmp_path))
    files = files_for()
    child = tmp_path / "child.py"
    child.write_text(WRITER_CHILD)
    full = _time_full([sys.executable, str(child), str(tmp_path / "full"), "none", str(tmp_path)])
    _check_complete(str(tmp_path / "full"), files)
    start = _startup_time()
    outcomes = []
    for t in range(WRITER_TRIALS):
        dst = str(tmp_path / f"w{t}")
        comp = rng.choice(["none", "zstd"])
        rc = _run_until([sys.executable, str(child), dst, comp, str(tmp_path)], rng.uniform(0.7 * start, full))
        state = _after_kill(dst, files)
        outcomes.append(f"{state}{'-finished' if rc == 0 else ''}")
        # Writing again into the same place works without overwrite unless a dataset was published.
        with packfmt.Writer(dst, shard_size="256KiB", compression=comp, overwrite=(state == "complete")) as w:
            for k in sorted(files):
                w.add(k, files[k], label=len(k))
        _check_complete(dst, files)
    _summary("packfmt.Writer", outcomes)
    assert "absent" in outcomes


def test_writer_exception_publishes_nothing(tmp_path):
    """An exception inside the with-block aborts: no manifest, no shards left, the directory reusable."""
    dst = str(tmp_path / "ds")
    with pytest.raises(RuntimeError):
        with packfmt.Writer(dst, shard_size="4KiB") as w:
            for i in range(100):
                w.add(f"k{i}", b"x" * 500)
            raise RuntimeError("boom")
    with pytest.raises(packfmt.DatasetNotFoundError):
        packfmt.open(dst)
    assert not [f for f in os.listdir(dst) if f.endswith(".pack")]
    with packfmt.Writer(dst) as w:
        w.add("a", b"1")
    assert packfmt.open(dst)[0] == b"1"


S3_TRIALS = int(os.environ.get("PACKFMT_CRASH_S3_TRIALS", "4"))


def test_kill_pack_build_to_s3(tree, moto_server, s3_bucket):
    """The same guarantee when the destination is an S3 prefix (moto on 127.0.0.1): shards stream into
    multipart uploads, the manifest is the last object put."""
    from conftest_servers import s3_options

    src, files = tree
    opts = s3_options(moto_server.endpoint)
    env = {**os.environ, "AWS_ENDPOINT_URL": moto_server.endpoint, "AWS_ACCESS_KEY_ID": opts["aws_access_key_id"],
           "AWS_SECRET_ACCESS_KEY": opts["aws_secret_access_key"], "AWS_DEFAULT_REGION": opts["region_name"]}
    base = [sys.executable, "-m", "packfmt.cli", "build", "-q", "--workers", "2", "--shard-size", "512KiB"]
    full = _time_full(base + [src, f"s3://{s3_bucket}/full"], env=env)
    start = _startup_time()
    rng = random.Random(SEED + 2)
    outcomes = []

    def state_of(url):
        try:
            ds = packfmt.open(url, storage_options=opts, cache=False)
        except packfmt.DatasetNotFoundError:
            return "absent"
        assert len(ds) == len(files)
        keys = ds.keys.to_pylist()
        for k, data in zip(keys, ds.get_batch(np.arange(len(ds)))):
            assert data == files[k], f"{url}: sample {k!r} differs from its source"
        from packfmt.verify import verify_dataset

        rep = verify_dataset(ds)
        assert rep.ok, f"verify {url}: {rep}"
        return "complete"

    assert state_of(f"s3://{s3_bucket}/full") == "complete"
    for t in range(S3_TRIALS):
        url = f"s3://{s3_bucket}/t{t}"
        rc = _run_until(base + [src, url], rng.uniform(0.7 * start, full), env=env)
        state = state_of(url)
        outcomes.append(f"{state}{'-finished' if rc == 0 else ''}")
        build_dataset(src, url, shard_size="512KiB", workers=2, progress=False, storage_options=opts,
                      overwrite=(state == "complete"))
        assert state_of(url) == "complete"
    _summary("pack build to S3", outcomes)
