"""PyTorch integration over real packfmt datasets: DataLoader workers (fork and
spawn), two ranks with torch.distributed/gloo, kill-and-resume."""

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from torch.utils.data import DataLoader, DistributedSampler

import packfmt
from packfmt.shuffle import EpochOrder, shard_boundaries_of
from packfmt.torch import (PackBatchSampler, PackDataLoader, PackDataset, PackIterableDataset, PackSampler,
                           dist_rank_world, to_tensor)

N = 203  # odd on purpose: padding and short last batches happen
BS = 16


def sample_bytes(i):
    """Sample i starts with its own index; sizes vary from 8 bytes to ~1 KiB."""
    return b"%08d" % i + bytes([i % 251]) * ((i * 37) % 1000)


def index_of(sample):
    if isinstance(sample, torch.Tensor):
        sample = bytes(sample[:8].tolist())
    return int(sample[:8])


def build(path, n, shard_size="4KiB"):
    with packfmt.Writer(str(path), shard_size=shard_size) as w:
        for i in range(n):
            w.add(f"s/{i:05d}.bin", sample_bytes(i), label=i * 3)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build(tmp_path_factory.mktemp("torchds") / "ds", N)


def flatten(batches):
    """Global indices of the samples in a sequence of (samples, labels) batches."""
    out = []
    for samples, labels in batches:
        idx = [index_of(s) for s in samples]
        assert labels.tolist() == [3 * i for i in idx]  # the label travels with its sample
        out.extend(idx)
    return out


def test_dataset_items_and_transform(data):
    ds = PackDataset(data)
    assert len(ds) == N
    assert ds[5] == sample_bytes(5)
    assert ds.__getitems__([7, 3, 7]) == [sample_bytes(7), sample_bytes(3), sample_bytes(7)]
    ds = PackDataset(data, transform=to_tensor, label="label")
    x, y = ds[9]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and bytes(x.tolist()) == sample_bytes(9)
    assert y == 27
    items = ds.__getitems__(np.array([4, 2]))
    assert [index_of(x) for x, _ in items] == [4, 2] and [int(y) for _, y in items] == [12, 6]
    # a plain pickle carries the url, not the open handles
    ds2 = pickle.loads(pickle.dumps(ds))
    assert bytes(ds2[4][0].tolist()) == sample_bytes(4)


def test_num_workers_0_batch_sampler_and_sampler(data):
    ds = PackDataset(data, label="label")
    bsamp = PackBatchSampler(ds, BS, seed=7)
    got = flatten(DataLoader(ds, batch_sampler=bsamp))
    assert got == EpochOrder(N, seed=7).indices().tolist()
    assert len(DataLoader(ds, batch_sampler=bsamp)) == -(-N // BS)
    samp = PackSampler(ds, seed=7)
    assert flatten(DataLoader(ds, batch_size=BS, sampler=samp)) == got  # same order, sample by sample


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_map_style_two_workers(data, context):
    ds = PackDataset(data, label="label")
    sampler = PackBatchSampler(ds, BS, seed=11)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2, multiprocessing_context=context,
                        persistent_workers=True)
    epochs = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        epochs.append(flatten(loader))
    for e in epochs:
        assert sorted(e) == list(range(N))  # every sample exactly once
    assert epochs[0] == epochs[2] == EpochOrder(N, seed=11, epoch=0).indices().tolist()
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("workers,ring", [(0, True), (2, True), (2, False)])
def test_packed_batches_through_shared_memory(data, workers, ring):
    """packed=True: each batch arrives as one uint8 tensor + offsets (shared memory from workers: a slot
    of the loader's ring, or with ring=False a shared-memory tensor per batch)."""
    from packfmt import _ring
    from packfmt.torch import PackedBatch
    ds = PackDataset(data, label="label", packed=True)
    sampler = PackBatchSampler(ds, BS, seed=5)
    loader = PackDataLoader(ds, batch_sampler=sampler, num_workers=workers, ring=ring)
    seen = []
    for batch in loader:
        assert isinstance(batch, PackedBatch) and batch.data.dtype == torch.uint8
        assert len(batch) == len(batch.indices) == len(batch.labels)
        if workers:
            assert batch._in_ring if ring and _ring.SUPPORTED else batch.data.is_shared()
        idx = batch.indices.tolist()
        assert batch.samples() == [sample_bytes(i) for i in idx]
        assert batch.tobytes(0) == sample_bytes(idx[0]) and bytes(batch[0].tolist()) == sample_bytes(idx[0])
        assert batch.labels.tolist() == [3 * i for i in idx]
        seen.extend(idx)
    assert seen == EpochOrder(N, seed=5, epoch=0).indices().tolist()
    with pytest.raises(ValueError, match="transform"):
        PackDataset(data, packed=True, transform=len)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_iterable_two_workers(data, context):
    ds = PackIterableDataset(data, batch_size=BS, seed=11, label="label")
    loader = DataLoader(ds, batch_size=BS, num_workers=2, multiprocessing_context=context,
                        persistent_workers=True)
    epochs = []
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)  # reaches the persistent workers through shared memory
        epochs.append(flatten(loader))
    for e in epochs:
        assert sorted(e) == list(range(N))
    assert epochs[0] == epochs[2] == EpochOrder(N, seed=11, epoch=0).indices().tolist()
    assert epochs[0] != epochs[1]


def test_iterable_batched_and_main_process(data):
    ds = PackIterableDataset(data, batch_size=BS, seed=2, label="label", batched=True, prefetch=3)
    got = flatten(DataLoader(ds, batch_size=None))
    assert got == EpochOrder(N, seed=2).indices().tolist()
    assert ds.state_dict() == {"seed": 2, "epoch": 0, "consumed": N}  # exact with num_workers=0
    plain = PackIterableDataset(data, batch_size=5, seed=2, prefetch=0)
    assert [index_of(s) for s in plain] == got


@pytest.mark.parametrize("kind", ["map", "iterable", "sampler"])
@pytest.mark.parametrize("workers", [(2, 3), (2, 0), (0, 1)])
def test_resume_with_other_worker_count(data, kind, workers):
    before, after = workers

    def make(num_workers):
        if kind == "map":
            ds = PackDataset(data, label="label")
            return PackDataLoader(ds, batch_sampler=PackBatchSampler(ds, BS, seed=4, epoch=2),
                                  num_workers=num_workers)
        if kind == "sampler":
            ds = PackDataset(data, label="label")
            return PackDataLoader(ds, batch_size=BS, sampler=PackSampler(ds, seed=4, epoch=2),
                                  num_workers=num_workers)
        ds = PackIterableDataset(data, batch_size=BS, seed=4, epoch=2, label="label")
        return PackDataLoader(ds, batch_size=BS, num_workers=num_workers)

    loader = make(before)
    first = []
    for i, batch in enumerate(loader):
        first.append(batch)
        if i == 4:
            break
    state = loader.state_dict()
    assert state == {"seed": 4, "epoch": 2, "consumed": 5 * BS}
    del loader
    resumed = make(after)
    resumed.load_state_dict(state)
    assert len(resumed) == -(-(N - 5 * BS) // BS)
    rest = list(resumed)
    assert flatten(first + rest) == EpochOrder(N, seed=4, epoch=2).indices().tolist()
    assert resumed.state_dict()["consumed"] == N
    # the next epoch starts from its beginning
    resumed_src = {"map": resumed.batch_sampler, "sampler": resumed.sampler}.get(kind, resumed.dataset)
    resumed_src.set_epoch(3)
    assert flatten(resumed) == EpochOrder(N, seed=4, epoch=3).indices().tolist()


KILL_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import packfmt
    from packfmt.torch import PackBatchSampler, PackDataLoader, PackDataset, PackIterableDataset
    path, out, kind, stop_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if kind == "map":
        ds = PackDataset(path)
        loader = PackDataLoader(ds, batch_sampler=PackBatchSampler(ds, 16, seed=9), num_workers=2)
    else:
        loader = PackDataLoader(PackIterableDataset(path, batch_size=16, seed=9), batch_size=16, num_workers=2)
    seen = []
    for i, batch in enumerate(loader):
        seen.extend(int(s[:8]) for s in batch)
        with open(out + ".tmp", "w") as f:   # the checkpoint: state + what was trained on
            json.dump({"state": loader.state_dict(), "seen": seen}, f)
        os.replace(out + ".tmp", out)
        if i + 1 == stop_at:
            time.sleep(600)   # "training" hangs here until it is killed
""")


@pytest.mark.parametrize("kind", ["map", "iterable"])
def test_kill_and_resume(data, tmp_path, kind):
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT)
    ckpt = tmp_path / "ckpt.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the packfmt under test
    proc = subprocess.Popen([sys.executable, str(script), data, str(ckpt), kind, "6"], env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if ckpt.exists() and len(json.loads(ckpt.read_text())["seen"]) == 6 * 16:
                break
            assert proc.poll() is None, "training script died"
            time.sleep(0.05)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the loader's workers die with it
        except ProcessLookupError:
            pass
        proc.wait()
    saved = json.loads(ckpt.read_text())
    assert saved["state"] == {"seed": 9, "epoch": 0, "consumed": 96}
    # resume in this process with another worker count
    if kind == "map":
        ds = PackDataset(data)
        loader = PackDataLoader(ds, batch_sampler=PackBatchSampler(ds, 16), num_workers=1)
    else:
        loader = PackDataLoader(PackIterableDataset(data, batch_size=16), batch_size=16, num_workers=3)
    loader.load_state_dict(saved["state"])
    rest = [index_of(s) for batch in loader for s in batch]
    assert saved["seen"] + rest == EpochOrder(N, seed=9, epoch=0).indices().tolist()


def test_distributed_sampler_compat(data):
    ds = PackDataset(data, label="label")
    parts = []
    for rank in range(2):
        s = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=1)
        s.set_epoch(3)
        parts.append(flatten(DataLoader(ds, batch_size=BS, sampler=s, num_workers=0)))
    assert len(parts[0]) == len(parts[1]) == (N + 1) // 2
    assert set(parts[0]) | set(parts[1]) == set(range(N))


def test_rank_from_environment(data, monkeypatch):
    assert not dist.is_initialized()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert dist_rank_world() == (1, 3)
    s = PackBatchSampler(PackDataset(data), BS)
    assert (s.rank, s.world_size, len(s.order())) == (1, 3, -(-N // 3))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert dist_rank_world() == (0, 1)


def test_block_mode_uses_shard_boundaries(data):
    ds = PackDataset(data, label="label")
    bounds = shard_boundaries_of(ds.dataset.shard_of)
    assert len(bounds) > 3  # the 4 KiB shard size made several shards
    s = PackBatchSampler(ds, BS, mode="block", block_size=8, window=2, seed=1)
    np.testing.assert_array_equal(s.shard_boundaries, bounds)
    got = flatten(DataLoader(ds, batch_sampler=s, num_workers=2))
    assert sorted(got) == list(range(N))
    shard_of = np.asarray(ds.dataset.shard_of)

    def shards_per_batch(order):
        return np.mean([len(set(shard_of[order[a:a + BS]])) for a in range(0, N, BS)])

    # blocks never straddle shards and a window mixes 2 blocks: batches touch few shards
    assert shards_per_batch(got) < 0.5 * shards_per_batch(EpochOrder(N, seed=1).indices())


class FailingDataset:
    def __len__(self):
        return 50

    def get_batch(self, indices):
        if min(indices) < 5:
            raise OSError("disk on fire")
        return [b"x" for _ in indices]


def test_prefetch_thread_propagates_errors():
    ds = PackIterableDataset(FailingDataset(), batch_size=10, mode="none")
    with pytest.raises(OSError, match="disk on fire"):
        list(ds)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, port, path, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ds = PackDataset(path, label="label")
        sampler = PackBatchSampler(ds, 8, seed=5)  # rank/world size from the process group
        assert (sampler.rank, sampler.world_size) == (rank, 2)
        # a spawned rank would spawn its workers too (slow: each imports torch); fork them
        workers = dict(num_workers=2, multiprocessing_context="fork")
        mapped = [int(i) for _, labels in DataLoader(ds, batch_sampler=sampler, **workers) for i in labels // 3]
        it = PackIterableDataset(path, batch_size=8, seed=5, drop_last=True, label="label")
        iterated = [int(i) for _, labels in DataLoader(it, batch_size=8, **workers) for i in labels // 3]
        gathered = [None, None]
        dist.all_gather_object(gathered, {"map": mapped, "iter": iterated})
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_gloo(data, tmp_path):
    out = tmp_path / "parts.json"
    tmp.spawn(_rank_main, args=(free_port(), data, str(out)), nprocs=2, join=True)
    r0, r1 = json.loads(out.read_text())
    # map-style, padded: equal parts, together every sample, one repeated
    assert len(r0["map"]) == len(r1["map"]) == (N + 1) // 2
    assert set(r0["map"]) | set(r1["map"]) == set(range(N))
    # iterable, drop_last: equal, disjoint parts, N - 1 samples
    assert len(r0["iter"]) == len(r1["iter"]) == N // 2
    assert not set(r0["iter"]) & set(r1["iter"])
    assert len(set(r0["iter"]) | set(r1["iter"])) == N - 1
    for rank, part in enumerate((r0, r1)):
        assert part["map"] == EpochOrder(N, seed=5, rank=rank, world_size=2).indices().tolist()
