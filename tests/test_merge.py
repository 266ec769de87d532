"""pack merge and Writer(mode="append"): no shard rewritten, duplicates reported, old readers safe."""

import hashlib
import os
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import packfmt
from packfmt import cli
from packfmt import manifest as mf
from packfmt.errors import DatasetNotFoundError
from packfmt.merge import ConcurrentModificationError, DuplicateKeyError, merge
from packfmt.verify import verify_dataset


def make(path, items, compression="none", shard_size=300, **kw):
    """items: [(key, bytes, {col: value})]"""
    with packfmt.Writer(path, compression=compression, shard_size=shard_size, **kw) as w:
        for k, data, cols in items:
            w.add(k, data, **cols)
    return path


def contents(path):
    ds = packfmt.open(path)
    cols = {c: ds.column(c).tolist() for c in ds.columns}
    return [(ds.key(i), ds[i], {c: cols[c][i] for c in cols}) for i in range(len(ds))]


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def shard_digests(path):
    ds = packfmt.open(path)
    return {n: digest(os.path.join(path, n)) for n in ds.shards}


def files(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


# ------------------------------------------------------------------------------------------ merge
keys_st = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=12)
sample_st = st.tuples(keys_st, st.binary(max_size=700), st.integers(0, 9))


@settings(max_examples=25, deadline=None)
@given(groups=st.lists(st.lists(sample_st, max_size=12), min_size=1, max_size=4),
       codecs=st.lists(st.sampled_from(["none", "zstd"]), min_size=4, max_size=4))
def test_merge_round_trip(tmp_path_factory, groups, codecs):
    root = tmp_path_factory.mktemp("merge")
    seen, srcs, expected = set(), [], []
    for g, (group, codec) in enumerate(zip(groups, codecs)):
        items = []
        for k, data, label in group:
            if k in seen:
                continue
            seen.add(k)
            items.append((k, data, {"label": label} if g % 2 == 0 else {"label": label, "g": str(g)}))
        srcs.append(make(str(root / f"s{g}"), items, codec))
        expected.extend(items)
    before = {s: shard_digests(s) for s in srcs}
    dst = str(root / "dst")
    rep = merge(dst, srcs)
    got = contents(dst)
    assert [(k, d) for k, d, _ in got] == [(k, d) for k, d, _ in expected]
    assert [c["label"] for _, _, c in got] == [c["label"] for _, _, c in expected]
    assert rep.samples == len(expected) and rep.generation == 0
    ds = packfmt.open(dst)
    assert ds.shards == [mf.shard_name(i) for i in range(len(ds.shards))]
    assert rep.linked == len(ds.shards) and rep.streamed == 0  # same filesystem: hard links, nothing copied
    # shard bytes untouched, and the merged dataset verifies
    assert {s: shard_digests(s) for s in srcs} == before
    assert sorted(shard_digests(dst).values()) == sorted(v for d in before.values() for v in d.values())
    assert cli.main(["verify", "-q", dst]) == 0


def test_merge_duplicates_reported_nothing_published(tmp_path):
    a = make(str(tmp_path / "a"), [("x", b"1", {}), ("y", b"2", {})])
    b = make(str(tmp_path / "b"), [("y", b"3", {}), ("x", b"4", {}), ("z", b"5", {})])
    with pytest.raises(DuplicateKeyError) as e:
        merge(str(tmp_path / "ab"), [a, b])
    assert sorted(e.value.keys) == ["x", "y"] and "'x'" in str(e.value) and "2 key(s)" in str(e.value)
    assert not os.path.exists(tmp_path / "ab" / mf.MANIFEST_NAME)
    assert [f for f in files(tmp_path / "ab") if not f.startswith(".")] == []
    rep = merge(str(tmp_path / "ab"), [a, b], on_duplicate="allow")
    ds = packfmt.open(tmp_path / "ab")
    assert rep.samples == 5 and ds.keys.to_pylist() == ["x", "y", "y", "x", "z"]
    assert ds[ds.index_of("x")] == b"1"  # the first one


def test_merge_refuses_itself_and_empty(tmp_path):
    a = make(str(tmp_path / "a"), [("x", b"1", {})])
    with pytest.raises(ValueError, match="itself"):
        merge(a, [a])
    with pytest.raises(ValueError):
        merge(str(tmp_path / "b"), [])


def test_merge_into_existing_appends_without_touching_it(tmp_path):
    a = make(str(tmp_path / "a"), [(f"a{i}", os.urandom(100), {"label": i}) for i in range(10)])
    b = make(str(tmp_path / "b"), [(f"b{i}", os.urandom(100), {"label": -i}) for i in range(7)], "zstd")
    before = shard_digests(a)
    old_manifest = open(os.path.join(a, mf.MANIFEST_NAME), "rb").read()
    reader = packfmt.open(a)  # a reader of the previous version
    old = contents(a)
    rep = merge(a, [b])
    assert rep.generation == 1 and rep.added_samples == 7
    new = packfmt.open(a)
    assert contents(a) == old + contents(b)
    assert re.fullmatch(r"index-g0001-[0-9a-f]{8}\.arrow", new.manifest["index"]["name"])
    assert new.shards[:len(before)] == list(before)  # same names, same bytes
    assert all(n.startswith("shard-g0001-") for n in new.shards[len(before):])
    assert {n: digest(os.path.join(a, n)) for n in before} == before
    # the old reader never meets the new index; a fresh open of the old manifest still works
    assert [reader[i] for i in range(len(reader))] == [d for _, d, _ in old]
    assert os.path.exists(os.path.join(a, mf.INDEX_NAME))
    assert mf.Manifest.parse(old_manifest).index_name == mf.INDEX_NAME
    # the CLI does the same, and refuses duplicates with exit status 1
    c = make(str(tmp_path / "c"), [("c0", b"c", {})])
    assert cli.main(["merge", "-q", a, c]) == 0
    assert packfmt.open(a).manifest["generation"] == 2 and packfmt.open(a).key(-1) == "c0"
    assert cli.main(["merge", "-q", a, c]) == 1
    assert packfmt.open(a).manifest["generation"] == 2
    assert cli.main(["verify", "-q", a]) == 0


def test_merge_dictionaries(tmp_path):
    texts = [(f"k{i}", (b"the quick brown fox %d jumps over the lazy dog " % i) * 8, {}) for i in range(300)]
    d1 = make(str(tmp_path / "d1"), texts[:150], "zstd-dict", shard_size="1MiB", dict_train_bytes=20_000)
    d2 = make(str(tmp_path / "d2"), texts[150:], "zstd-dict", shard_size="1MiB", dict_train_bytes=20_000)
    plain = make(str(tmp_path / "p"), [("p", b"plain", {})])
    assert packfmt.open(d1).manifest["compression"]["dictionary"] is not None
    with pytest.raises(ValueError, match="dictionar"):
        merge(str(tmp_path / "x"), [d1, d2])
    merge(str(tmp_path / "y"), [d1, plain])
    y = packfmt.open(tmp_path / "y")
    assert y.manifest["compression"]["codec"] == "zstd-dict"
    assert list(y) == [d for _, d, _ in texts[:150]] + [b"plain"]
    # appending to a zstd-dict dataset encodes new samples with its dictionary
    with packfmt.Writer(tmp_path / "y", mode="append", compression="zstd-dict") as w:
        for k, d, _ in texts[150:160]:
            w.add(k, d)
    y = packfmt.open(tmp_path / "y")
    assert list(y)[-10:] == [d for _, d, _ in texts[150:160]]
    assert int(y.codecs[-1]) == 2 and cli.main(["verify", "-q", str(tmp_path / "y")]) == 0


# ------------------------------------------------------------------------------------------ append
def test_append_round_trip_old_reader_safe(tmp_path):
    p = str(tmp_path / "ds")
    first = [(f"s{i}", os.urandom(i * 13 % 400), {"label": i}) for i in range(40)]
    make(p, first)
    before = shard_digests(p)
    reader = packfmt.open(p)
    for gen in (1, 2):
        with packfmt.Writer(p, mode="append", shard_size=300) as w:
            for i in range(5):
                w.add(f"g{gen}-{i}", b"%d" % i * 100, label=100 * gen + i)
        ds = packfmt.open(p)
        assert ds.manifest["generation"] == gen
        assert re.fullmatch(rf"index-g{gen:04d}-[0-9a-f]{{8}}\.arrow", ds.manifest["index"]["name"])
    got = contents(p)
    assert got[:40] == first
    assert [(k, c["label"]) for k, _, c in got[40:]] == [(f"g{g}-{i}", 100 * g + i) for g in (1, 2) for i in range(5)]
    assert {n: digest(os.path.join(p, n)) for n in before} == before
    assert [reader[i] for i in range(len(reader))] == [d for _, d, _ in first] and len(reader) == 40
    assert cli.main(["verify", "-q", p]) == 0


def test_append_failures_publish_nothing(tmp_path):
    p = str(tmp_path / "ds")
    make(p, [("a", b"1", {}), ("b", b"2", {})])
    state = (open(os.path.join(p, mf.MANIFEST_NAME), "rb").read(), files(p))
    with pytest.raises(DatasetNotFoundError):
        packfmt.Writer(str(tmp_path / "nothing"), mode="append")
    with pytest.raises(ValueError, match="mode"):
        packfmt.Writer(p, mode="replace")
    with pytest.raises(ValueError, match="duplicate key 'a'"):
        with packfmt.Writer(p, mode="append", shard_size=100) as w:
            w.add("c", b"3" * 200)  # one whole shard written before the failure
            w.add("a", b"again")
    with pytest.raises(RuntimeError):
        with packfmt.Writer(p, mode="append", shard_size=100) as w:
            w.add("d", b"4" * 200)
            raise RuntimeError("the producer failed")
    assert (open(os.path.join(p, mf.MANIFEST_NAME), "rb").read(), files(p)) == state
    assert contents(p) == [("a", b"1", {}), ("b", b"2", {})]


def test_append_detects_a_concurrent_commit(tmp_path):
    p = str(tmp_path / "ds")
    make(p, [("a", b"1", {})])
    other = make(str(tmp_path / "o"), [("o", b"o", {})])
    w = packfmt.Writer(p, mode="append")
    w.add("w", b"w")
    merge(p, [other])  # someone else commits meanwhile
    state = (open(os.path.join(p, mf.MANIFEST_NAME), "rb").read(), files(p))
    with pytest.raises(ConcurrentModificationError):
        w.close()
    # the other committer's files all remain; the loser removed only its own (its random tag)
    mine = f"shard-{w._append.tag}-"
    assert any(f.startswith(mine) for f in state[1])
    assert (open(os.path.join(p, mf.MANIFEST_NAME), "rb").read(), files(p)) == (
        state[0], [f for f in state[1] if not f.startswith(mine)])
    assert packfmt.open(p).keys.to_pylist() == ["a", "o"]


def test_append_empty_and_overwrite_cleans_generations(tmp_path):
    p = str(tmp_path / "ds")
    make(p, [("a", b"1", {})])
    with packfmt.Writer(p, mode="append"):
        pass
    assert packfmt.open(p).manifest["generation"] == 1 and list(packfmt.open(p)) == [b"1"]
    with packfmt.Writer(p, mode="append", shard_size=100) as w:
        w.add("b", b"2")
    # a new dataset over it removes every generation's files
    make(p, [("z", b"9", {})], overwrite=True)
    assert files(p) == [mf.INDEX_NAME, mf.MANIFEST_NAME, mf.shard_name(0)]


# ------------------------------------------------------------------------------------------ S3
def test_merge_and_append_on_s3(tmp_path, moto_server, s3_client, s3_bucket):
    from conftest_servers import s3_options
    opts = s3_options(moto_server.endpoint)
    a = make(str(tmp_path / "a"), [(f"a{i}", os.urandom(3000), {"label": i}) for i in range(20)], shard_size="8KiB")
    b_url = f"s3://{s3_bucket}/b"
    make(b_url, [(f"b{i}", os.urandom(3000), {"label": i}) for i in range(10)], shard_size="8KiB",
         storage_options=opts)
    dst = f"s3://{s3_bucket}/m"
    # local -> s3 is streamed; s3 -> s3 is a server-side copy (no shard bytes through this machine)
    rep = merge(dst, [a], storage_options=opts)
    assert rep.streamed == len(packfmt.open(a).shards) and rep.bytes_streamed > 0
    rep2 = merge(dst, [b_url], storage_options=opts)
    assert rep2.generation == 1 and rep2.server_copied == len(rep2.names) > 1 and rep2.bytes_streamed == 0
    ds = packfmt.open(dst, storage_options=opts, cache=False)
    assert ds.keys.to_pylist() == [f"a{i}" for i in range(20)] + [f"b{i}" for i in range(10)]
    assert ds.get_batch([0, 25]) == [packfmt.open(a)[0], packfmt.open(b_url, storage_options=opts, cache=False)[5]]
    with packfmt.Writer(dst, mode="append", storage_options=opts) as w:
        w.add("c", b"appended")
    ds = packfmt.open(dst, storage_options=opts, cache=False)
    assert ds.manifest["generation"] == 2 and ds[ds.index_of("c")] == b"appended" and len(ds) == 31
    assert verify_dataset(ds).ok
    assert not s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    with pytest.raises(DuplicateKeyError):
        merge(dst, [a], storage_options=opts)
    assert packfmt.open(dst, storage_options=opts, cache=False).manifest["generation"] == 2


def test_copy_helper_local_fallback(tmp_path, monkeypatch):
    """When a hard link is impossible (another filesystem), the shard is copied whole."""
    import errno
    from packfmt import merge as mm
    from packfmt.storage import open_store
    a = make(str(tmp_path / "a"), [(f"k{i}", os.urandom(500), {}) for i in range(10)])

    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(os, "link", no_link)
    rep = merge(str(tmp_path / "b"), [a])
    assert rep.linked == 0 and rep.streamed == len(packfmt.open(a).shards)
    assert list(packfmt.open(tmp_path / "b")) == list(packfmt.open(a))
    assert mm.copy(open_store(a), mf.INDEX_NAME, open_store(str(tmp_path / "b")), "x.bin") == "stream"
    assert not [f for f in os.listdir(tmp_path / "b") if f.endswith(".tmp")]
    assert np.array_equal(np.fromfile(tmp_path / "b" / "x.bin", np.uint8),
                          np.fromfile(tmp_path / "a" / mf.INDEX_NAME, np.uint8))
