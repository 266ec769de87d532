"""Ray: a real local cluster (2 CPUs on this machine) builds, writes and reads packfmt datasets.

The cluster is started once per session (Ray takes ~20 s to start here).  Covered: ``pack build --engine
ray`` equals the local build shard for shard; the Ray Data datasink round-trips ``read_binary_files`` and
in-memory rows; a job whose task is SIGKILLed publishes nothing and leaves no part shard, locally and on
S3 (no orphan multipart upload); the datasource yields every row exactly once.
"""

import logging
import os
import signal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ray  # the "ray" extra: pip install "ray[data]"
import ray.data

import packfmt
from packfmt import cli
from packfmt import manifest as mf
from packfmt.build import UnreadableFileError, build_dataset
from packfmt.merge import DuplicateKeyError, merge


@pytest.fixture(scope="session")
def cluster():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()


def make_tree(root, n=240, seed=0):
    """Nested dirs, unicode names, empty and larger files; names chosen so walk order != sorted keys."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = ["", "a", "a/b", "a-c", "ü"][i % 5]
        os.makedirs(os.path.join(root, d), exist_ok=True)
        name = f"f{i:03d}{'-é' if i % 7 == 0 else ''}.bin"
        size = 0 if i % 17 == 0 else int(rng.integers(1, 3000))
        text = (b"sample %d " % i) * (size // 10 + 1)
        with open(os.path.join(root, d, name), "wb") as f:
            f.write(text[:size] if i % 2 else rng.bytes(size))
    return root


def file_map(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def read_all(path, **kw):
    ds = packfmt.open(path, **kw)
    return ds.keys.to_pylist(), list(ds)


def leftovers(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


# ------------------------------------------------------------------------------ pack build --engine ray
@pytest.mark.parametrize("compression", ["none", "zstd-dict"])
def test_ray_build_equals_local_build(cluster, tmp_path, compression):
    src = make_tree(str(tmp_path / "src"))
    local = build_dataset(src, str(tmp_path / "local"), shard_size="16KiB", compression=compression, workers=2,
                          progress=False)
    if compression == "none":  # through the CLI
        assert cli.main(["build", src, str(tmp_path / "ray"), "--shard-size", "16KiB", "--engine", "ray", "-q"]) == 0
    else:
        build_dataset(src, str(tmp_path / "ray"), shard_size="16KiB", compression=compression, engine="ray",
                      progress=False)
    a, b = packfmt.open(tmp_path / "local"), packfmt.open(tmp_path / "ray")
    assert local.shards > 4 and a.shards == b.shards
    assert a.keys.to_pylist() == b.keys.to_pylist() and list(a) == list(b)
    for name in a.shards:  # identical shards, byte for byte
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes()
    assert (tmp_path / "local" / mf.INDEX_NAME).read_bytes() == (tmp_path / "ray" / mf.INDEX_NAME).read_bytes()
    files = file_map(src)
    assert {k: v for k, v in zip(*read_all(tmp_path / "ray"))} == files


def test_ray_build_failure_publishes_nothing(cluster, tmp_path, monkeypatch):
    """A task that fails (a file gone between walk and read) aborts the job: no manifest, no shard."""
    import packfmt.build as pb
    src = make_tree(str(tmp_path / "src"), n=60)
    real_walk = pb.walk

    def walk_with_a_vanished_file(*a, **kw):
        keys, paths, sizes, skipped = real_walk(*a, **kw)
        keys.insert(30, "gone.bin")
        paths.insert(30, os.path.join(src, "gone.bin"))
        return keys, paths, np.insert(sizes, 30, 10), skipped
    monkeypatch.setattr(pb, "walk", walk_with_a_vanished_file)
    dst = tmp_path / "out"
    with pytest.raises(UnreadableFileError, match="gone.bin"):
        build_dataset(src, str(dst), shard_size="8KiB", engine="ray", progress=False)
    assert leftovers(dst) == []
    with pytest.raises(ValueError, match="engine"):
        build_dataset(src, str(tmp_path / "x"), engine="spark")


# ------------------------------------------------------------------------------ the datasink
def test_datasink_read_binary_files(cluster, tmp_path):
    import packfmt.ray as pr
    src = make_tree(str(tmp_path / "src"))
    root = os.path.abspath(src) + "/"
    ds = ray.data.read_binary_files(root, include_paths=True, override_num_blocks=4)
    m = pr.write_pack(ds, str(tmp_path / "out"), key_column="path", strip_prefix=root, shard_size="16KiB",
                      compression="zstd")
    keys, data = read_all(tmp_path / "out")
    assert m["samples"] == len(keys) == 240
    assert keys == sorted(keys)  # order="key": independent of task scheduling
    assert dict(zip(keys, data)) == file_map(src)
    assert all(s["name"].startswith("part-") for s in m["shards"]) and len(m["shards"]) > 4
    assert not [f for f in leftovers(tmp_path / "out") if f.startswith(".")]  # no build marker left
    assert cli.main(["verify", "-q", str(tmp_path / "out")]) == 0


def test_datasink_rows_with_columns_input_order_and_duplicates(cluster, tmp_path):
    import packfmt.ray as pr
    items = [{"key": f"k{i:04d}", "bytes": b"x" * (i % 50), "label": i % 7, "split": "tr" if i % 3 else "te"}
             for i in range(500)]
    ds = ray.data.from_items(items, override_num_blocks=3)
    pr.write_pack(ds, str(tmp_path / "in"), order="input", shard_size="4KiB")
    out = packfmt.open(tmp_path / "in")
    assert out.keys.to_pylist() == [r["key"] for r in items]  # one block per task, tasks in order
    assert out.column("label").tolist() == [r["label"] for r in items]
    assert list(out.index.column("split").to_pylist()) == [r["split"] for r in items]
    assert list(out) == [r["bytes"] for r in items]
    dup = ray.data.from_items(items[:10] + items[5:6], override_num_blocks=2)
    with pytest.raises(Exception) as e:
        pr.write_pack(dup, str(tmp_path / "dup"))
    assert "k0005" in str(e.value)
    assert not os.path.exists(tmp_path / "dup" / mf.MANIFEST_NAME)
    assert leftovers(tmp_path / "dup") == []


def _kill_on(marker):
    def fn(batch):
        if marker in list(batch["key"]):
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-job, like an OOM kill
        return batch
    return fn


def test_datasink_task_killed_publishes_nothing(cluster, tmp_path):
    import packfmt.ray as pr
    seen, out = [], str(tmp_path / "out")

    class Sink(pr.PackDatasink):  # pickled by value to the workers: only closures and builtins inside
        def on_write_failed(self, error):
            seen.extend(os.listdir(out))  # what the other tasks had written
            super().on_write_failed(error)
    items = [{"key": f"k{i:04d}", "bytes": os.urandom(200)} for i in range(400)]
    ds = ray.data.from_items(items, override_num_blocks=4).map_batches(_kill_on("k0350"), batch_size=25, max_retries=0)
    with pytest.raises(Exception):
        ds.write_datasink(Sink(str(tmp_path / "out"), shard_size="2KiB"), ray_remote_args={"max_retries": 0})
    assert mf.INCOMPLETE_MARKER in seen and any(n.startswith("part-") for n in seen)
    assert leftovers(tmp_path / "out") == []  # no manifest, no part shard, no marker


def test_datasink_task_finishing_after_the_cleanup_removes_its_shards(tmp_path):
    """The race behind a killed job: a task that is still writing when the driver cleans up. Its shards
    land after the cleanup listed the destination; the task sees the build marker gone and removes them."""
    import types

    import pyarrow as pa

    import packfmt.ray as pr
    from packfmt.errors import PackError
    out = str(tmp_path / "out")
    sink = pr.PackDatasink(out, shard_size="1KiB")
    sink.on_write_start()
    assert leftovers(out) == [mf.INCOMPLETE_MARKER]
    sink.on_write_failed(RuntimeError("another task died"))  # the driver gives up first
    block = pa.table({"key": [f"k{i}" for i in range(20)], "bytes": [os.urandom(300) for _ in range(20)]})
    with pytest.raises(PackError, match="aborted while task 3 ran"):
        sink.write([block], types.SimpleNamespace(task_idx=3))
    assert leftovers(out) == []
    # a live job is unaffected: the same task writes and returns its part
    sink2 = pr.PackDatasink(str(tmp_path / "ok"), shard_size="1KiB")
    sink2.on_write_start()
    part = sink2.write([block], types.SimpleNamespace(task_idx=3))
    assert part["task"] == 3 and len(part["shards"]) > 1
    assert all(os.path.exists(tmp_path / "ok" / sh.name) for sh in part["shards"])


def test_datasink_killed_on_s3_leaves_no_upload(cluster, moto_server, s3_client, s3_bucket):
    import packfmt.ray as pr
    from conftest_servers import s3_options
    opts = s3_options(moto_server.endpoint, part_size=5 << 20)
    mib = 1 << 20
    items = [{"key": f"k{i:02d}", "bytes": bytes([i]) * mib} for i in range(24)]
    # 2 tasks x 12 rows; batches of 4 MiB: the task that meets k20 has a multipart upload in flight
    ds = ray.data.from_items(items, override_num_blocks=2).map_batches(_kill_on("k20"), batch_size=4, max_retries=0)
    url = f"s3://{s3_bucket}/ds"
    with pytest.raises(Exception):
        pr.write_pack(ds, url, shard_size="64MiB", storage_options=opts, ray_remote_args={"max_retries": 0})
    assert not s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    assert not s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents")
    # the same job without the kill publishes, and reads back through the datasource
    ok = ray.data.from_items(items[:8], override_num_blocks=2)
    m = pr.write_pack(ok, url, shard_size="64MiB", storage_options=opts)
    assert m["samples"] == 8 and not s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    rows = pr.read_pack(url, storage_options=opts, cache=False, override_num_blocks=2).take_all()
    assert sorted((r["key"], r["bytes"]) for r in rows) == [(r["key"], r["bytes"]) for r in items[:8]]


# ------------------------------------------------------------------------------ the datasource
def test_datasource_every_row_exactly_once(cluster, tmp_path):
    import packfmt.ray as pr
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with packfmt.Writer(a, shard_size="2KiB", compression="zstd") as w:
        for i in range(700):
            w.add(f"a{i}", b"%d" % i * (i % 40), label=i)
    with packfmt.Writer(b, shard_size="2KiB") as w:
        for i in range(300):
            w.add(f"b{i}", b"b%d" % i, label=-i)
    merge(a, [b])  # an appended dataset: several generations of shards
    ds = pr.read_pack(a, override_num_blocks=5)
    rows = ds.take_all()
    keys = [r["key"] for r in rows]
    assert len(keys) == 1000 and sorted(keys) == sorted(packfmt.open(a).keys.to_pylist())
    ref = packfmt.open(a)
    for r in rows[::37]:
        i = ref.index_of(r["key"])
        assert r["bytes"] == ref[i] and r["label"] == ref.column("label")[i]
    # a key-sorted index (not in shard order) is split evenly; projection of columns
    with pytest.raises(DuplicateKeyError):
        merge(str(tmp_path / "c"), [a, b])
    only = pr.read_pack(a, columns=[], override_num_blocks=3, batch_rows=100)
    assert only.count() == 1000 and set(only.schema().names) == {"key", "bytes"}


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=1, max_size=40), parts=st.integers(1, 50),
       shuffled=st.booleans())
def test_split_rows_cover_each_row_once(sizes, parts, shuffled):
    from packfmt.ray import split_rows
    shard_of = np.repeat(np.arange(len(sizes)), sizes).astype(np.uint32)
    if shuffled:
        shard_of = np.random.default_rng(len(sizes)).permutation(shard_of)
    ranges = split_rows(shard_of, parts)
    assert len(ranges) <= parts
    assert ranges[0][0] == 0 and ranges[-1][1] == len(shard_of)
    assert all(a < b for a, b in ranges) and all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
    if not shuffled and len(sizes) >= parts:  # in shard order: every range is whole shards
        starts = set(np.cumsum([0] + sizes).tolist())
        assert all(a in starts and b in starts for a, b in ranges)
