"""Properties of the epoch order: permutation, partition, determinism, resumption."""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from packfmt.shuffle import MODES, EpochOrder, feistel_permute, make_blocks, shard_boundaries_of

# the example count follows the active hypothesis profile (a heavier "ci"
# profile may be loaded by conftest); only the deadline is fixed here, as the
# first call of a numpy path can be slow on a loaded CI machine
relaxed = settings(deadline=None)

sizes = st.integers(min_value=0, max_value=3000)
seeds = st.integers(min_value=0, max_value=2**64 - 1)
modes = st.sampled_from(MODES)


@st.composite
def orders(draw):
    n = draw(sizes)
    kw = dict(
        n=n,
        seed=draw(seeds),
        epoch=draw(st.integers(0, 1000)),
        world_size=draw(st.integers(1, 7)),
        mode=draw(modes),
        block_size=draw(st.integers(1, 100)),
        window=draw(st.integers(1, 20)),
        drop_last=draw(st.booleans()),
    )
    if draw(st.booleans()) and n:
        kw["shard_boundaries"] = sorted(draw(st.lists(st.integers(0, n), max_size=8)))
    return kw


def all_ranks(kw):
    return [EpochOrder(rank=r, **kw) for r in range(kw["world_size"])]


@relaxed
@given(orders())
def test_ranks_partition_the_epoch(kw):
    n, w = kw["n"], kw["world_size"]
    parts = [o.indices() for o in all_ranks(kw)]
    lengths = {len(p) for p in parts}
    assert len(lengths) == 1, "ranks must get equal parts"
    per_rank = lengths.pop()
    both = np.concatenate(parts)
    assert both.dtype == np.int64
    if kw["drop_last"]:
        assert per_rank == n // w
        assert len(np.unique(both)) == both.size  # disjoint, nothing repeated
    else:
        assert per_rank == -(-n // w)
        assert set(both.tolist()) == set(range(n))  # every sample read
        # the padding repeats the first samples of the epoch sequence
        pad = both.size - n
        assert pad < w
        seq = all_ranks(kw)[0].global_indices()
        np.testing.assert_array_equal(seq, both)
        np.testing.assert_array_equal(np.sort(seq[:n]), np.arange(n))
        np.testing.assert_array_equal(seq[n:], np.resize(seq[:n], pad) if n else seq[n:])
    assert ((both >= 0) & (both < max(n, 1))).all()


@relaxed
@given(orders())
def test_global_sequence_is_a_permutation(kw):
    o = EpochOrder(**{**kw, "world_size": 1})
    seq = o.global_indices()
    np.testing.assert_array_equal(np.sort(seq), np.arange(kw["n"]))


@relaxed
@given(orders(), st.data())
def test_slices_agree_with_the_whole(kw, data):
    o = EpochOrder(rank=data.draw(st.integers(0, kw["world_size"] - 1)), **kw)
    whole = o.indices()
    a = data.draw(st.integers(0, len(o)))
    b = data.draw(st.integers(a, len(o) + 5))
    np.testing.assert_array_equal(o.indices(a, b), whole[a:b])
    assert list(o) == whole.tolist()


@relaxed
@given(orders())
def test_deterministic(kw):
    a = [o.indices() for o in all_ranks(kw)]
    b = [o.indices() for o in all_ranks(kw)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("mode", ["global", "feistel", "block"])
def test_epochs_and_seeds_differ(mode):
    base = dict(n=1000, mode=mode, block_size=8, window=4)
    e0 = EpochOrder(seed=1, epoch=0, **base).indices()
    e1 = EpochOrder(seed=1, epoch=1, **base).indices()
    s2 = EpochOrder(seed=2, epoch=0, **base).indices()
    assert not np.array_equal(e0, e1)
    assert not np.array_equal(e0, s2)
    assert not np.array_equal(e0, np.arange(1000))


def test_none_is_sequential():
    o = EpochOrder(10, world_size=3, rank=2, mode="none", drop_last=False)
    assert o.indices().tolist() == [8, 9, 0, 1]  # padded by wrapping around


@relaxed
@given(orders(), st.data())
def test_worker_batches_interleave_to_the_remainder(kw, data):
    """Workers take interleaved batches of what is left after ``start``; read
    round-robin (as DataLoader does) they give back the remainder in order."""
    o = EpochOrder(**kw)
    start = data.draw(st.integers(0, len(o)))
    bs = data.draw(st.integers(1, 50))
    k = data.draw(st.integers(1, 5))
    per_worker = [list(o.batches(bs, start, w, k)) for w in range(k)]
    assert all(b.size == bs for bw in per_worker for b in bw[:-1])
    round_robin = []
    for j in range(max((len(p) for p in per_worker), default=0)):
        round_robin.extend(p[j] for p in per_worker if j < len(p))
    got = np.concatenate(round_robin) if round_robin else np.zeros(0, np.int64)
    np.testing.assert_array_equal(got, o.indices(start))


@relaxed
@given(orders(), st.data())
def test_resume_with_other_worker_count(kw, data):
    """Consume k batches with K workers, resume at (seed, epoch, consumed) with
    K' workers: the concatenation equals the uninterrupted epoch."""
    o = EpochOrder(**kw)
    bs = data.draw(st.integers(1, 40))
    k1, k2 = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))

    def loader(order, start, workers):
        its = [order.batches(bs, start, w, workers) for w in range(workers)]
        alive = list(range(workers))
        while alive:
            for w in list(alive):
                b = next(its[w], None)
                if b is None:
                    alive.remove(w)
                else:
                    yield b

    full = o.indices()
    stop_after = data.draw(st.integers(0, -(-len(o) // bs)))
    first = []
    for i, b in enumerate(loader(o, 0, k1)):
        if i == stop_after:
            break
        first.append(b)
    consumed = sum(b.size for b in first)
    state = o.state_dict(consumed)
    assert set(state) == {"seed", "epoch", "consumed"}
    o2 = EpochOrder(**{**kw, "seed": state["seed"], "epoch": state["epoch"]})
    rest = list(loader(o2, state["consumed"], k2))
    np.testing.assert_array_equal(np.concatenate(first + rest + [full[:0]]), full)


@relaxed
@given(st.integers(0, 5000), seeds, st.data())
def test_feistel_is_a_bijection(n, seed, data):
    keys = np.random.SeedSequence(seed).generate_state(6, dtype=np.uint64)
    img = feistel_permute(np.arange(n), n, keys)
    np.testing.assert_array_equal(np.sort(img), np.arange(n))
    # evaluated on any subset, it agrees with the whole
    if n:
        pick = np.array(data.draw(st.lists(st.integers(0, n - 1), max_size=20)), dtype=np.int64)
        np.testing.assert_array_equal(feistel_permute(pick, n, keys), img[pick])


def test_feistel_on_huge_n_needs_no_array():
    n = 10**12 + 39  # an N-element array would need 8 TB
    o = EpochOrder(n, seed=7, epoch=3, mode="feistel", world_size=1000, rank=999)
    head = o.indices(0, 1000)
    assert len(np.unique(head)) == 1000
    assert ((head >= 0) & (head < n)).all()
    np.testing.assert_array_equal(head[500:], o.indices(500, 1000))


@relaxed
@given(st.integers(0, 2000), st.integers(1, 70), st.lists(st.integers(0, 2000), max_size=10))
def test_blocks_respect_shard_boundaries(n, bs, bounds):
    starts = make_blocks(n, bs, bounds)
    assert starts[-1] == n and (np.diff(starts) > 0).all() and (np.diff(starts) <= bs).all()
    cuts = {b for b in bounds if 0 < b < n}
    assert cuts <= set(starts.tolist())


@relaxed
@given(st.integers(1, 3000), st.integers(1, 64), st.integers(1, 8), seeds,
       st.lists(st.integers(0, 3000), max_size=6))
def test_block_mode_locality(n, bs, window, seed, bounds):
    """The sequence is a chain of windows, each a shuffle of at most ``window``
    whole blocks of neighbouring samples (never straddling a shard)."""
    o = EpochOrder(n, seed=seed, mode="block", block_size=bs, window=window, shard_boundaries=bounds)
    starts = make_blocks(n, bs, bounds)
    block_of = np.searchsorted(starts, o.indices(), side="right") - 1
    size = np.diff(starts)
    pos = 0
    while pos < n:  # grow the segment until it holds exactly its blocks' samples
        seen, total, end = set(), 0, pos
        while True:
            b = int(block_of[end])
            if b not in seen:
                seen.add(b)
                total += int(size[b])
            end += 1
            if end - pos == total:
                break
        assert len(seen) <= window
        pos = end


def test_block_mode_is_local_in_practice():
    n, bs, window, batch = 100_000, 64, 8, 256
    bounds = np.arange(0, n, 1000)
    starts = make_blocks(n, bs, bounds)

    def blocks_per_batch(seq):
        block_of = np.searchsorted(starts, seq, side="right") - 1
        return [len(np.unique(block_of[a:a + batch])) for a in range(0, n, batch)]

    o = EpochOrder(n, seed=0, mode="block", block_size=bs, window=window, shard_boundaries=bounds)
    assert max(blocks_per_batch(o.indices())) <= 2 * window  # a batch can straddle two windows
    g = EpochOrder(n, seed=0, mode="global").indices()
    assert np.mean(blocks_per_batch(g)) > 200


def test_shard_boundaries_of():
    assert shard_boundaries_of(np.array([0, 0, 0, 1, 1, 3], np.uint32)).tolist() == [0, 3, 5]
    assert shard_boundaries_of(np.array([], np.uint32)).tolist() == []


def test_bad_arguments():
    with pytest.raises(ValueError):
        EpochOrder(10, mode="bogus")
    with pytest.raises(ValueError):
        EpochOrder(10, rank=2, world_size=2)
    with pytest.raises(ValueError):
        EpochOrder(-1)
    with pytest.raises(ValueError):
        list(EpochOrder(10).batches(0))
    with pytest.raises(ValueError):
        list(EpochOrder(10).batches(4, start=-1))


def test_import_packfmt_does_not_import_torch():
    code = "import sys, packfmt, packfmt.shuffle; assert 'torch' not in sys.modules, 'torch imported'"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the packfmt under test
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
