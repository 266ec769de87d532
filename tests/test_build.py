"""pack build internals: the worker count, forked workers claiming shards, and files opened relative to
their directory (odd names, deep trees, files that change between the walk and the read)."""

import os

import numpy as np
import pytest

import packfmt
from packfmt import _core, build
from packfmt.build import UnreadableFileError, build_dataset, default_workers
from packfmt.errors import PackError


def write_tree(root, n=300, seed=0, names=None):
    """n files over a few directories (sizes 0..3000), plus the given extra names; returns {key: bytes}."""
    rng = np.random.default_rng(seed)
    files = {}
    for i in range(n):
        files[f"d{i % 7}/sub{i % 3}/f{i:04d}.bin"] = rng.integers(0, 256, int(rng.integers(0, 3000)),
                                                                 dtype=np.uint8).tobytes()
    for name in names or ():
        files[name] = rng.integers(0, 256, int(rng.integers(1, 500)), dtype=np.uint8).tobytes()
    for k, v in files.items():
        p = os.path.join(root, k)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(v)
    return files


def dataset_bytes(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d)) if n != "manifest.json"}


def check(dst, files):
    ds = packfmt.open(dst)
    assert sorted(ds.keys.to_pylist()) == sorted(files)
    for k, v in files.items():
        assert ds[ds.index_of(k)] == v
    return ds


# ------------------------------------------------------------------------------------------ worker count
def test_default_workers_small_inputs_stay_in_process(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert default_workers(1 << 20, 100, shards=10) == 1  # too little to pay for a fork
    assert default_workers(10 << 30, 1_000_000, shards=1) == 1  # one shard: nothing to share
    assert default_workers(10 << 30, 1_000_000, shards=3) == 3
    assert default_workers(10 << 30, 1_000_000, shards=40) == 4  # no more than the CPUs
    assert default_workers(2 * build.MIN_BYTES_PER_WORKER, 10, shards=40) == 2
    assert default_workers(0, 3 * build.MIN_FILES_PER_WORKER, shards=40) == 3


def test_workers_must_be_positive(tmp_path):
    write_tree(tmp_path / "src", n=3)
    with pytest.raises(ValueError, match="workers"):
        build_dataset(tmp_path / "src", tmp_path / "ds", workers=0, progress=False)


# ------------------------------------------------------------------------------------------ forked workers
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_forked_workers_give_the_same_bytes(tmp_path, compression):
    """Three processes claiming 20+ shards of uneven sizes write the same files as one process."""
    files = write_tree(tmp_path / "src", n=400)
    outs = {}
    for w in (1, 3):
        dst = tmp_path / f"w{w}"
        rep = build_dataset(tmp_path / "src", dst, shard_size="24KiB", compression=compression, workers=w,
                            progress=False, label_from="parent")
        assert rep.shards > 20
        check(dst, files)
        outs[w] = dataset_bytes(dst)
    assert outs[1] == outs[3]


def test_forked_worker_error_publishes_nothing(tmp_path, monkeypatch):
    """A file that vanished after the walk, in a shard a forked worker may write: the error names it,
    no manifest, no shard left; with skip_errors it is reported and the rest is packed."""
    files = write_tree(tmp_path / "src", n=300)
    real_walk = build.walk
    gone = "d3/sub0/f0150.bin"

    def walk_then_delete(*a, **kw):
        out = real_walk(*a, **kw)
        os.unlink(tmp_path / "src" / gone)
        return out

    monkeypatch.setattr(build, "walk", walk_then_delete)
    for _ in range(2):  # whichever process claims the shard
        with pytest.raises(UnreadableFileError, match="f0150.bin"):
            build_dataset(tmp_path / "src", tmp_path / "ds", shard_size="16KiB", workers=2, progress=False)
        assert not os.path.exists(tmp_path / "ds") or os.listdir(tmp_path / "ds") == []
        (tmp_path / "src" / gone).write_bytes(files[gone])
    rep = build_dataset(tmp_path / "src", tmp_path / "ds", shard_size="16KiB", workers=2, progress=False,
                        skip_errors=True)
    assert [os.path.basename(s.path) for s in rep.skipped] == ["f0150.bin"]
    del files[gone]
    check(tmp_path / "ds", files)


def test_forked_worker_that_dies_is_an_error(tmp_path, monkeypatch):
    write_tree(tmp_path / "src", n=200)
    parent = os.getpid()
    real = build.build_shard

    def die_in_child(task):
        if os.getpid() != parent:
            os._exit(3)
        return real(task)

    monkeypatch.setattr(build, "build_shard", die_in_child)  # forked workers inherit the patch
    with pytest.raises(PackError, match="died"):
        build_dataset(tmp_path / "src", tmp_path / "ds", shard_size="16KiB", workers=2, progress=False)
    with pytest.raises(packfmt.DatasetNotFoundError):
        packfmt.open(tmp_path / "ds")
    assert [n for n in os.listdir(tmp_path / "ds") if n.endswith(".pack")] == []


def test_progress_counts_every_file_with_workers(tmp_path, capfd):
    files = write_tree(tmp_path / "src", n=250)
    build_dataset(tmp_path / "src", tmp_path / "ds", shard_size="16KiB", workers=2, progress=True)
    err = capfd.readouterr().err
    assert f"{len(files):,}/{len(files):,} files" in err


# ------------------------------------------------------------------------------------------ relative opens
def test_odd_names_and_deep_trees(tmp_path):
    deep = "/".join(f"level{i:02d}" for i in range(40)) + "/leaf"
    names = ["-dash", " lead space", "back\\slash", "new\nline", "tab\tname", "ü/ß/日本", "a/b", "ab/b", "a/bb",
             "x" * 255, deep, deep + "2", ".hidden/.x", "q?*[].bin"]
    files = write_tree(tmp_path / "src", n=20, names=names)
    build_dataset(tmp_path / "src", tmp_path / "ds", shard_size="4KiB", workers=1, progress=False)
    check(tmp_path / "ds", files)


def test_relative_source_path(tmp_path, monkeypatch):
    files = write_tree(tmp_path / "src", n=30)
    monkeypatch.chdir(tmp_path)
    build_dataset("src", "ds", workers=1, progress=False)
    check(tmp_path / "ds", files)
    monkeypatch.chdir(tmp_path / "src")
    build_dataset(".", tmp_path / "ds2", workers=1, progress=False)
    check(tmp_path / "ds2", files)


def _after_walk(monkeypatch, change):
    real_walk = build.walk

    def walk_then_change(*a, **kw):
        out = real_walk(*a, **kw)
        change()
        return out

    monkeypatch.setattr(build, "walk", walk_then_change)


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("delta", [-1, 1, 4096])
def test_file_changing_size_after_the_walk(tmp_path, monkeypatch, compression, delta):
    """Grown or shrunk between the walk and the read: a clear error, or skipped with skip_errors.  (Packing
    the new size under the listed one would give an index whose raw and stored lengths disagree.)"""
    files = write_tree(tmp_path / "src", n=50)
    victim = "d2/sub2/f0002.bin"
    p = tmp_path / "src" / victim
    if not files[victim]:
        files[victim] = b"abc"
        p.write_bytes(b"abc")
    new = (files[victim] + b"z" * delta) if delta > 0 else files[victim][:delta]
    _after_walk(monkeypatch, lambda: p.write_bytes(new))
    with pytest.raises(UnreadableFileError, match="f0002.bin") as ei:
        build_dataset(tmp_path / "src", tmp_path / "ds", compression=compression, workers=1, progress=False)
    assert "changed size" in str(ei.value)
    p.write_bytes(files[victim])
    rep = build_dataset(tmp_path / "src", tmp_path / "ds", compression=compression, workers=1, progress=False,
                        skip_errors=True)
    assert [os.path.basename(s.path) for s in rep.skipped] == ["f0002.bin"]
    assert "changed size" in rep.skipped[0].reason
    del files[victim]
    check(tmp_path / "ds", files)


def test_file_replaced_by_a_symlink_after_the_walk(tmp_path, monkeypatch):
    """Links are followed, as documented: a link to a file of the listed size packs the target's bytes;
    a link to a directory, or to a file of another size, is an unreadable file."""
    files = write_tree(tmp_path / "src", n=40)
    a, b, c = "d1/sub1/f0001.bin", "d3/sub0/f0003.bin", "d4/sub1/f0004.bin"
    same = tmp_path / "same"
    same.write_bytes(bytes(reversed(files[a])))
    other = tmp_path / "other"
    other.write_bytes(files[b] + b"more")
    (tmp_path / "adir").mkdir()

    def swap():
        for key, target in ((a, same), (b, other), (c, tmp_path / "adir")):
            os.unlink(tmp_path / "src" / key)
            os.symlink(target, tmp_path / "src" / key)

    _after_walk(monkeypatch, swap)
    rep = build_dataset(tmp_path / "src", tmp_path / "ds", workers=1, progress=False, skip_errors=True)
    reasons = {os.path.basename(s.path): s.reason for s in rep.skipped}
    assert set(reasons) == {"f0003.bin", "f0004.bin"}
    assert "changed size" in reasons["f0003.bin"] and "not a regular file" in reasons["f0004.bin"]
    files[a] = bytes(reversed(files[a]))
    del files[b], files[c]
    check(tmp_path / "ds", files)


def test_file_replaced_by_a_fifo_after_the_walk(tmp_path, monkeypatch):
    """A fifo where a file was listed: refused at once (opening it must not wait for a writer)."""
    files = write_tree(tmp_path / "src", n=20)
    victim = tmp_path / "src" / "d5/sub2/f0005.bin"

    def swap():
        os.unlink(victim)
        os.mkfifo(victim)

    _after_walk(monkeypatch, swap)
    rep = build_dataset(tmp_path / "src", tmp_path / "ds", workers=1, progress=False, skip_errors=True)
    assert [(os.path.basename(s.path), "not a regular file" in s.reason) for s in rep.skipped] == \
        [("f0005.bin", True)]
    del files["d5/sub2/f0005.bin"]
    check(tmp_path / "ds", files)


def test_append_files_detects_a_file_longer_than_it_says():
    """/proc files stat as 0 bytes and read as more: growth while reading is caught, not truncated."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        w = _core.ShardWriter(os.path.join(d, "s.pack"))
        out64, out32 = np.zeros(1, np.uint64), np.zeros(1, np.uint32)
        with pytest.raises(ValueError, match="changed size while being read") as ei:
            w.append_files([b"/proc/self/status"], 0, out64, out32, out64)
        assert ei.value.position == 0
        with pytest.raises(ValueError, match="changed size since it was listed"):
            w.append_files([b"/proc/self/status"], 0, out64, out32, out64, -1, np.array([5], np.int64))
        with pytest.raises(TypeError, match="bytes"):
            w.append_files(["/proc/self/status"], 0, out64, out32, out64)
        w.abort()


# ------------------------------------------------------------------------------------------ the walk
def reference_walk(src, include=(), exclude=()):
    """The walk as os.scandir + DirEntry.stat give it (walk() before it listed directories in C)."""
    import fnmatch
    import stat

    def matches(key, patterns):
        return any(fnmatch.fnmatchcase(key, p) or fnmatch.fnmatchcase(key.rsplit("/", 1)[-1], p) for p in patterns)

    keys, paths, sizes, skipped = [], [], [], []

    def visit(dirpath, prefix):
        with os.scandir(dirpath) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            key = prefix + e.name
            if e.is_dir(follow_symlinks=False):
                visit(e.path, key + "/")
                continue
            if e.is_symlink() and e.is_dir(follow_symlinks=True):
                skipped.append((e.path, "symlink to a directory (not followed)"))
                continue
            if include and not matches(key, include):
                continue
            if exclude and matches(key, exclude):
                continue
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                skipped.append((e.path, "file name is not valid UTF-8"))
                continue
            try:
                st = e.stat(follow_symlinks=True)
            except FileNotFoundError:
                skipped.append((e.path, "dangling symlink or file vanished"))
                continue
            if not stat.S_ISREG(st.st_mode):
                skipped.append((e.path, "not a regular file"))
                continue
            keys.append(key)
            paths.append(e.path)
            sizes.append(st.st_size)

    visit(src, "")
    return keys, paths, sizes, skipped


@pytest.mark.parametrize("patterns", [((), ()), (("*.bin",), ()), ((), ("sub1", "d2/*", "*.x")),
                                      (("*",), ("bad*",))])
def test_walk_matches_scandir(tmp_path, patterns):
    """Symlinks (to files, to directories, dangling), a fifo, names that are not UTF-8 (a file, and a
    directory with files under it), code point order with multi-byte names: the same result as
    os.scandir + stat, with the same skip reasons."""
    src = tmp_path / "src"
    write_tree(src, n=60, names=["é", "z", "Z", "ü/x.x", "日本/語", "a b/c", "~", "aé", "a\u00ff", "a\u0100"])
    os.symlink(src / "z", src / "link-file")
    os.symlink(src / "d1", src / "link-dir")
    os.symlink(src / "nothing-here", src / "dangling")
    os.mkfifo(src / "d2" / "fifo")
    bsrc = os.fsencode(src)
    with open(os.path.join(bsrc, b"bad\xff.bin"), "wb") as f:
        f.write(b"x")
    os.mkdir(os.path.join(bsrc, b"baddir\xfe"))
    with open(os.path.join(bsrc, b"baddir\xfe", b"ok.bin"), "wb") as f:
        f.write(b"y")
    include, exclude = patterns
    keys, paths, sizes, skipped = build.walk(str(src), include, exclude, skip_errors=True)
    ref = reference_walk(str(src), include, exclude)
    assert (keys, paths, sizes.tolist()) == (ref[0], ref[1], ref[2])
    assert sorted((s.path, s.reason) for s in skipped) == sorted(ref[3])
    if not include and not exclude:
        assert {os.path.basename(s.path) for s in skipped} >= {"link-dir", "dangling", "fifo", "ok.bin"}
    with pytest.raises(UnreadableFileError):
        build.walk(str(src), include, exclude)


def test_walk_errors_name_the_file(tmp_path):
    src = tmp_path / "src"
    write_tree(src, n=5)
    os.symlink(src / "nothing-here", src / "dangling")
    with pytest.raises(UnreadableFileError, match="dangling") as ei:
        build.walk(str(src))
    assert ei.value.filename.endswith("dangling") and ei.value.errno == 2
    with pytest.raises(packfmt.errors.PackOSError, match="not a directory"):
        build.walk(str(src / "d0" / "sub0" / "f0000.bin"))


def _plan_one_by_one(sizes, shard_size, ratio):
    est = np.ceil(np.asarray(sizes, dtype=np.float64) * ratio).astype(np.int64) + _core.ENTRY_SIZE
    budget = shard_size - _core.HEADER_SIZE - _core.FOOTER_SIZE
    plans, start, acc = [], 0, 0
    for i, s in enumerate(est.tolist()):
        if i > start and acc + s > budget:
            plans.append((start, i))
            start, acc = i, 0
        acc += s
    if start < len(est):
        plans.append((start, len(est)))
    return plans


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 1 << 22), max_size=80), st.integers(64, 1 << 23),
       st.sampled_from([1.0, 0.77, 0.3, 0.02]))
def test_plan_shards_is_the_greedy_cut(sizes, shard_size, ratio):
    """The vectorised plan equals the file-by-file greedy cut: consecutive files, each shard within the
    budget unless a single file is larger, every file in exactly one shard."""
    plans = build.plan_shards(np.asarray(sizes, dtype=np.int64), shard_size, ratio)
    assert plans == _plan_one_by_one(sizes, shard_size, ratio)
    assert [i for a, b in plans for i in range(a, b)] == list(range(len(sizes)))
