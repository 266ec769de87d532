"""PackDataLoader's shared-memory ring: workers read batches into reusable slots, only descriptors
cross torch's result queue.  Exactly-once delivery (fork and spawn), fallback when the user holds
every slot or a batch does not fit, release when batches die, nothing left behind, errors."""

import gc
import os
import pickle
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import default_collate

import packfmt
from _hostile import UNDER_ASAN
from packfmt import _ring
from packfmt.errors import CorruptShardError
from packfmt.torch import (PackBatchSampler, PackDataLoader, PackDataset, PackedBatch, _collate_labels,
                           _rebuild_ring_batch, _RingBatch)

pytestmark = pytest.mark.skipif(not _ring.SUPPORTED, reason="the ring needs Linux (/dev/shm and fd passing)")

N = 203
BS = 16
NB = -(-N // BS)


def sample_bytes(i):
    return b"%08d" % i + bytes([i % 251]) * ((i * 37) % 1000)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ringds") / "ds")
    with packfmt.Writer(path, shard_size="4KiB") as w:
        for i in range(N):
            w.add(f"s/{i:05d}.bin", sample_bytes(i), label=i * 3)
    return path


def ring_mappings():
    """This process's mappings and open files of packfmt rings (the files are unlinked at creation)."""
    with open("/proc/self/maps") as f:
        maps = [line for line in f if "packfmt-ring-" in line]
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "packfmt-ring-" in os.readlink(f"/proc/self/fd/{fd}"):
                fds.append(fd)
        except OSError:
            pass
    return maps + fds


def shm_ring_files():
    return [f for f in os.listdir("/dev/shm") if f.startswith("packfmt-ring-")] if os.path.isdir("/dev/shm") else []


def check_items(batches):
    """Global indices of (samples, labels) batches, checking bytes and labels."""
    seen = []
    for samples, labels in batches:
        assert isinstance(samples, tuple) and all(type(s) is bytes for s in samples)
        idx = [int(s[:8]) for s in samples]
        assert [sample_bytes(i) for i in idx] == list(samples)
        assert labels.dtype == torch.int64 and labels.tolist() == [3 * i for i in idx]
        seen.extend(idx)
    return seen


def check_packed(batch):
    assert isinstance(batch, PackedBatch)
    idx = batch.indices.tolist()
    assert [batch.tobytes(k) for k in range(len(batch))] == [sample_bytes(i) for i in idx]
    assert batch.samples() == [sample_bytes(i) for i in idx]
    assert batch.labels.tolist() == [3 * i for i in idx]
    return idx


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
@pytest.mark.parametrize("packed", [False, True], ids=["items", "packed"])
def test_exactly_once_through_the_ring(data, ctx, packed):
    ds = PackDataset(data, label="label", packed=packed)
    sampler = PackBatchSampler(ds, BS, seed=3)
    # spawn with persistent workers: each spawned worker imports torch, once for both epochs
    loader = PackDataLoader(ds, batch_sampler=sampler, num_workers=2, multiprocessing_context=ctx,
                            persistent_workers=ctx == "spawn")
    for epoch in range(2):
        sampler.set_epoch(epoch)
        if packed:
            seen = [i for b in loader for i in check_packed(b)]
        else:
            seen = check_items(loader)
        assert seen == sampler.order().indices(0, N).tolist()  # the epoch's order, each sample once
        per_ring = epoch + 1 if ctx == "spawn" else 1  # persistent workers keep one ring (and its counts)
        assert loader.ring_stats() == {"ring": NB * per_ring, "fallback": 0}
    del loader
    gc.collect()
    assert ring_mappings() == [] and shm_ring_files() == []


def test_items_equal_torch_transport(data):
    """The ring hands over exactly what default_collate makes of the items in a worker."""
    def epoch(ring, label):
        ds = PackDataset(data, label=label)
        sampler = PackBatchSampler(ds, BS, seed=5, epoch=1)
        return list(PackDataLoader(ds, batch_sampler=sampler, num_workers=2, ring=ring))

    for label in ("label", None):
        ring, plain = epoch(True, label), epoch(False, label)
        assert len(ring) == len(plain) == NB
        for a, b in zip(ring, plain):
            assert type(a) is type(b)
            if label is None:
                assert a == b
            else:
                assert type(a[0]) is type(b[0]) and a[0] == b[0]
                assert a[1].dtype == b[1].dtype and torch.equal(a[1], b[1])


def test_held_batches_fall_back_and_stay_intact(data):
    """With every slot held by the user the worker sends the ordinary way; no held slot is overwritten."""
    ds = PackDataset(data, label="label", packed=True)
    sampler = PackBatchSampler(ds, BS, seed=1)
    loader = PackDataLoader(ds, batch_sampler=sampler, num_workers=2, ring_slots=2)
    held = list(loader)
    stats = loader.ring_stats()
    assert stats["ring"] + stats["fallback"] == NB
    assert stats["fallback"] > 0 and stats["ring"] >= 2
    assert sum(b._in_ring for b in held) == stats["ring"]
    assert sorted(i for b in held for i in check_packed(b)) == list(range(N))


def test_released_when_batches_die(data):
    """Batches dropped as the loop goes: 2 slots per worker serve a whole epoch without fallback."""
    ds = PackDataset(data, label="label", packed=True)
    sampler = PackBatchSampler(ds, BS, seed=2)
    loader = PackDataLoader(ds, batch_sampler=sampler, num_workers=1, ring_slots=3, prefetch_factor=1)
    seen = []
    for batch in loader:
        seen.extend(check_packed(batch))
        del batch
    assert sorted(seen) == list(range(N))
    assert loader.ring_stats() == {"ring": NB, "fallback": 0}


def test_batch_larger_than_a_slot_falls_back(data):
    ds = PackDataset(data, label="label")
    sampler = PackBatchSampler(ds, BS, seed=2)
    loader = PackDataLoader(ds, batch_sampler=sampler, num_workers=2, ring_slot_bytes=2048)
    assert sorted(check_items(loader)) == list(range(N))
    stats = loader.ring_stats()
    assert stats["fallback"] > 0 and stats["ring"] + stats["fallback"] == NB


def test_slot_lifetime_follows_views(data):
    """In one process: a rebuilt batch keeps its slot busy while any view of it lives."""
    ring = _ring.Ring(1, 2, 1 << 16)
    writer = ring.writer(0)
    reader = PackDataset(data, label="label", packed=True)._reader
    rb = _RingBatch.read(writer, reader, [5, 7, 9], packed=True)
    slot = rb.slot
    assert ring._hdr[slot, 0] == _ring.BUSY
    batch = pickle.loads(pickle.dumps(rb))  # this process owns the ring: rebuilt as a view of the slot
    with pytest.raises(RuntimeError, match="once"):
        pickle.dumps(rb)
    assert batch._in_ring and batch.samples() == [sample_bytes(i) for i in (5, 7, 9)]
    view = batch[1]
    arr = batch.data.numpy()[3:]
    copy = pickle.loads(pickle.dumps(batch))  # a user's pickle carries a copy, not the slot
    del batch, rb
    gc.collect()
    assert ring._hdr[slot, 0] == _ring.BUSY  # still viewed
    assert bytes(view.numpy()) == sample_bytes(7)
    del view
    gc.collect()
    assert ring._hdr[slot, 0] == _ring.BUSY
    del arr
    gc.collect()
    assert ring._hdr[slot, 0] == _ring.FREE
    assert not copy._in_ring and copy.samples() == [sample_bytes(i) for i in (5, 7, 9)]


def test_no_free_slot_and_dropped_batches(data):
    ring = _ring.Ring(2, 2, 1 << 16)
    w0, w1 = ring.writer(0), ring.writer(1)
    reader = PackDataset(data)._reader
    a = _RingBatch.read(w0, reader, [1], packed=False)
    b = _RingBatch.read(w0, reader, [2], packed=False)
    assert {a.slot, b.slot} == {0, 1}
    assert _RingBatch.read(w0, reader, [3], packed=False) is None  # worker 0 is full...
    c = _RingBatch.read(w1, reader, [3], packed=False)              # ...worker 1 is not
    assert c.slot in (2, 3)
    assert _RingBatch.read(w0, reader, list(range(200)), packed=False) is None  # larger than a slot
    assert ring.stats() == {"ring": 3, "fallback": 2}
    assert pickle.loads(pickle.dumps(a)) == [sample_bytes(1)]  # items: copied out, slot freed at once
    assert ring._hdr[a.slot, 0] == _ring.FREE
    slot_b = b.slot
    del b  # never sent: the worker gets the slot back
    assert ring._hdr[slot_b, 0] == _ring.FREE
    stale = pickle.dumps(c)
    assert pickle.loads(stale) == [sample_bytes(3)]
    with pytest.raises(RuntimeError, match="stale or repeated"):
        pickle.loads(stale)


def test_read_error_frees_the_slot_and_reaches_the_loop(data, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(data, bad)
    shard = os.path.join(bad, "shard-00001.pack")
    raw = bytearray(open(shard, "rb").read())
    raw[200] ^= 0xFF
    open(shard, "wb").write(raw)
    ring = _ring.Ring(1, 1, 1 << 20)
    with pytest.raises(CorruptShardError, match="shard-00001.pack"):
        _RingBatch.read(ring.writer(0), PackDataset(bad)._reader, list(range(N)), packed=False)
    assert ring._hdr[0, 0] == _ring.FREE
    del ring
    for packed in (False, True):
        # one worker: torch's shutdown after a worker raised waits 5 s per worker (with or without the ring)
        ds = PackDataset(bad, label="label", packed=packed)
        loader = PackDataLoader(ds, batch_sampler=PackBatchSampler(ds, BS, seed=0), num_workers=1)
        with pytest.raises(CorruptShardError, match="shard-00001.pack: checksum mismatch"):
            for batch in loader:
                check_packed(batch) if packed else check_items([batch])
        batch = None  # the last good batch still holds its slot
        assert loader.ring_stats()["ring"] >= 1
        del loader
    gc.collect()
    assert ring_mappings() == [] and shm_ring_files() == []


def test_descriptor_outside_the_main_process(data, tmp_path):
    """A descriptor rebuilt anywhere but in the process that created the ring fails clearly."""
    with pytest.raises(RuntimeError, match="only be rebuilt in that DataLoader's main process"):
        _rebuild_ring_batch(12345, 0, 1, 0, np.zeros(1, np.int64), None, None, False)
    ring = _ring.Ring(1, 1, 1 << 16)
    rb = _RingBatch.read(ring.writer(0), PackDataset(data)._reader, [4], packed=True)
    path = tmp_path / "desc.pkl"
    path.write_bytes(pickle.dumps(rb))
    code = ("import pickle, sys\n"
            "try:\n"
            f"    pickle.loads(open({str(path)!r}, 'rb').read())\n"
            "except RuntimeError as e:\n"
            "    print(e); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "only be rebuilt in that DataLoader's main process" in proc.stdout
    with pytest.raises(TypeError, match="as it starts"):
        pickle.dumps(ring)


@pytest.mark.skipif(UNDER_ASAN, reason="torch reports a dead worker by throwing a C++ exception, which a preloaded "
                    "ASan cannot intercept (CHECK failed: real___cxa_throw, asan_interceptors.cpp); this test runs "
                    "in the normal suite")
def test_nothing_left_after_worker_killed_and_persistent(data):
    ds = PackDataset(data, label="label", packed=True)
    sampler = PackBatchSampler(ds, BS, seed=0)
    loader = PackDataLoader(ds, batch_sampler=sampler, num_workers=2, persistent_workers=True)
    it = iter(loader)
    first = next(it)
    assert ring_mappings() != []  # the ring is mapped while the loader runs
    os.kill(loader._iterator._workers[0].pid, signal.SIGKILL)
    batch = None
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        for batch in it:
            check_packed(batch)
    assert check_packed(first)
    del it, first, loader, batch
    gc.collect()
    assert ring_mappings() == [] and shm_ring_files() == []

    # persistent workers: an epoch left early, then a full one; the ring lives until the loader goes
    loader = PackDataLoader(ds, batch_sampler=sampler, num_workers=2, persistent_workers=True)
    sampler.set_epoch(1)
    for k, batch in enumerate(loader):
        if k == 3:
            break
    del batch
    sampler.set_epoch(2)
    seen = [i for b in loader for i in check_packed(b)]
    assert seen == sampler.order().indices(0, N).tolist()
    assert loader.ring_stats()["fallback"] == 0
    del loader
    gc.collect()
    assert ring_mappings() == [] and shm_ring_files() == []


def test_ring_off_when_not_applicable(data):
    ds = PackDataset(data, label="label")
    sampler = PackBatchSampler(ds, BS)
    assert PackDataLoader(ds, batch_sampler=sampler, num_workers=0)._ring_mode is None
    assert PackDataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=lambda b: b)._ring_mode is None
    assert PackDataLoader(PackDataset(data, transform=len), batch_sampler=sampler,
                          num_workers=2)._ring_mode is None
    loader = PackDataLoader(ds, batch_sampler=sampler, num_workers=0)
    assert sorted(check_items(loader)) == list(range(N)) and loader.ring_stats() is None


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(["int8", "int32", "int64", "uint8", "uint32", "uint64", "float32", "float64",
                              "bool"]),
       values=st.lists(st.integers(0, 200), min_size=1, max_size=20))
def test_labels_collate_like_default_collate(dtype, values):
    arr = np.array(values).astype(dtype)
    got, want = _collate_labels(arr), default_collate(tuple(arr.tolist()))
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_string_labels_collate_like_default_collate():
    arr = np.array(["a", "bc", ""], dtype=object)
    assert _collate_labels(arr) == default_collate(tuple(arr.tolist())) == ("a", "bc", "")


def test_release_acquire_words_hand_slots_between_processes():
    """The ring's flags: a store_release_i64 in one process is seen by load_acquire_i64 in another,
    together with the bytes written before it (ping-pong over a shared mapping, no pipe)."""
    import mmap

    from packfmt import _core

    mm = mmap.mmap(-1, 4096)
    words = np.frombuffer(mm, np.int64, count=2)
    data = np.frombuffer(mm, np.uint8, count=1024, offset=64)
    rounds = 300
    pid = os.fork()
    if pid == 0:  # child: the writer; waits for its turn (word 0 even), fills the slot, hands it over
        code = 0
        try:
            for r in range(rounds):
                while _core.load_acquire_i64(words, 0) != 2 * r:
                    pass
                data[:] = r % 251
                _core.store_release_i64(words, 0, 2 * r + 1)
        except BaseException:
            code = 1
        os._exit(code)
    seen = []
    for r in range(rounds):
        while _core.load_acquire_i64(words, 0) != 2 * r + 1:
            pass
        seen.append(bool((data == r % 251).all()))
        _core.store_release_i64(words, 0, 2 * r + 2)
    _, status = os.waitpid(pid, 0)
    assert status == 0 and all(seen) and len(seen) == rounds
    with pytest.raises(IndexError):
        _core.store_release_i64(words, 2, 0)
    with pytest.raises(IndexError):
        _core.load_acquire_i64(words, -1)
