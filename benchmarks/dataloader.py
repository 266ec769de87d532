"""A shuffled epoch through torch's DataLoader: packfmt vs loose files.

Usage::

    python benchmarks/dataloader.py [--n 100000] [--workers 2] [--batch 256] [--reps 3] [--cache /tmp/packfmt-bench] [--out docs/shuffle.md]

Builds once (and reuses) a dataset of ``n`` KB-sized samples (random bytes,
2-6 KiB, 100 labels) twice: as a packfmt dataset and as loose files in an
ImageFolder-style tree (``class/NNNNNNN.bin``).  Then one epoch each, in the
same run:

* ``get_batch raw``   -- the baseline: this process calls ``ds.get_batch`` on
                         batches of the global order, no DataLoader;
* ``packfmt <mode>``  -- ``PackDataLoader(PackDataset, batch_sampler=PackBatchSampler(mode),
                         num_workers=W)``: workers read each batch into a slot of the loader's
                         shared-memory ring, the main process copies the samples out as bytes
                         (the items are ``default_collate``-d exactly as with torch's transport);
* ``packfmt ... packed``-- the same with ``PackDataset(packed=True)``: each batch is a
                         ``PackedBatch`` viewing its ring slot (no copy in the main process);
* ``... torch transport``-- plain ``torch.utils.data.DataLoader`` (what ``ring=False`` does):
                         ``(bytes, label)`` items pickled through the result queue, or with
                         ``packed=True`` one new shared-memory tensor per batch;
* ``packfmt iterable``-- ``DataLoader(PackIterableDataset, batch_size=B, num_workers=W)``;
* ``... num_workers=0``-- ``DataLoader(PackIterableDataset(batched=True), batch_size=None)``:
                         no worker processes, the prefetch thread reads ahead while the
                         main thread consumes (no inter-process copies at all);
* ``loose files``     -- an ImageFolder-like map-style dataset (the tree is
                         listed at construction, each sample is open/read/close)
                         with ``DataLoader(shuffle=True, num_workers=W)``.

Every item is ``(bytes, label)`` collated by the default collate function, so
the loaders move the same data.  Each run is done with a warm page cache
(files read just before) and a cold one (every file evicted with
``posix_fadvise(DONTNEED)`` first; on a VM the host may still cache).
Ratios: against loose files, and against the raw ``get_batch`` throughput.  ``CPU µs / sample``
is the CPU time of every process involved (main, workers), the best epoch's: less sensitive to
the load of a shared machine than the wall-clock rates.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import packfmt
from packfmt.shuffle import EpochOrder
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import describe_machine, log, machine_info, markdown_table, pgpgin_kib, update_markdown_section  # noqa: E402
from packfmt.torch import (PackBatchSampler, PackDataLoader, PackDataset, PackedBatch, PackIterableDataset,
                           collate_packed)

CLASSES = 100


def build(root, n):
    """Build (once) the packfmt dataset and the loose-file tree under ``root``."""
    pack, loose = os.path.join(root, "pack"), os.path.join(root, "loose")
    done = os.path.join(root, "DONE")
    if os.path.exists(done):
        return pack, loose
    import shutil
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(loose)
    rng = np.random.default_rng(0)
    sizes = rng.integers(2048, 6145, n)
    blob = rng.integers(0, 256, int(sizes.max()) + n, dtype=np.uint8).tobytes()
    t = time.perf_counter()
    with packfmt.Writer(pack, shard_size="64MiB") as w:
        for i in range(n):
            label = i * CLASSES // n  # contiguous classes, as a tree is usually packed
            data = blob[i:i + sizes[i]]
            cdir = os.path.join(loose, f"c{label:03d}")
            if i == 0 or (i - 1) * CLASSES // n != label:
                os.makedirs(cdir, exist_ok=True)
            with open(os.path.join(cdir, f"{i:07d}.bin"), "wb") as f:
                f.write(data)
            w.add(f"c{label:03d}/{i:07d}.bin", data, label=label)
    print(f"built {n} samples in {time.perf_counter() - t:.1f} s under {root}")
    open(done, "w").close()
    return pack, loose


class LooseFiles(Dataset):
    """What torchvision's ImageFolder does, minus decoding: list the tree, open/read per sample."""

    def __init__(self, root):
        self.items = []
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        for label, c in enumerate(classes):
            d = os.path.join(root, c)
            self.items.extend((os.path.join(d, f), label) for f in sorted(os.listdir(d)))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        with open(path, "rb") as f:
            return f.read(), label


def all_files(pack, loose):
    out = [os.path.join(pack, f) for f in os.listdir(pack)]
    for d in os.scandir(loose):
        out.extend(os.path.join(d.path, f) for f in os.listdir(d.path))
    return out


def evict(files):
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files):
    for p in files:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


def loader_epoch(loader):
    """One epoch through ``loader``: (samples, bytes, seconds)."""
    t = time.perf_counter()
    count = nbytes = 0
    for batch in loader:
        if isinstance(batch, PackedBatch):  # one uint8 tensor + offsets per batch
            count += len(batch)
            nbytes += batch.data.numel()
            continue
        samples, labels = batch
        count += len(samples)
        nbytes += sum(map(len, samples))
    return count, nbytes, time.perf_counter() - t


class RawEpochs:
    """The baseline: this process reads the global order with ``get_batch``, no DataLoader."""

    def __init__(self, pack, batch):
        self.ds, self.batch, self.epoch = packfmt.open(pack), batch, 0

    def __call__(self):
        t = time.perf_counter()
        count = nbytes = 0
        self.epoch += 1
        for b in EpochOrder(len(self.ds), seed=0, epoch=self.epoch, mode="global").batches(self.batch):
            samples = self.ds.get_batch(b)
            count += len(samples)
            nbytes += sum(map(len, samples))
        return count, nbytes, time.perf_counter() - t


class EpochCPU:
    """CPU seconds an epoch costs all the processes doing it: this one, the persistent workers of its
    loader (from /proc), and workers started and joined during the epoch (RUSAGE_CHILDREN)."""

    def __init__(self, epoch):
        it = getattr(getattr(epoch, "loader", None), "_iterator", None)
        self.pids = [w.pid for w in getattr(it, "_workers", [])]
        self.start = self._now()

    def _now(self):
        tck = os.sysconf("SC_CLK_TCK")
        total = time.process_time()
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        total += ch.ru_utime + ch.ru_stime
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tck
            except OSError:
                pass
        return total

    def used(self) -> float:
        return self._now() - self.start


class LoaderEpochs:
    """Epochs of one DataLoader; ``set_epoch`` first when its sampler/dataset has one."""

    def __init__(self, loader, epoch_owner=None):
        self.loader, self.owner, self.epoch = loader, epoch_owner, 0

    def __call__(self):
        self.epoch += 1
        if self.owner is not None:
            self.owner.set_epoch(self.epoch)
        return loader_epoch(self.loader)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3, help="epochs per measurement, best kept (default 3)")
    ap.add_argument("--cache", default="/tmp/packfmt-bench")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    ap.add_argument("--out", action="append", default=[], metavar="MD",
                    help="also write the tables into this markdown file's 'dataloader' section (repeatable)")
    args = ap.parse_args()
    info = machine_info()
    pack, loose = build(os.path.join(args.cache, f"dataloader-{args.n}"), args.n)
    files = all_files(pack, loose)
    W, B = args.workers, args.batch
    torch.set_num_threads(1)

    t = time.perf_counter()
    loose_ds = LooseFiles(loose)
    list_time = time.perf_counter() - t
    raw_name, loose_name = "get_batch, no DataLoader (1 process)", "loose files, ImageFolder-like"

    def pack_map(mode, persistent, packed=False, ring=True, **kw):
        ds = PackDataset(pack, label="label", packed=packed)
        sampler = PackBatchSampler(ds, B, seed=0, mode=mode, **kw)
        if ring:
            return LoaderEpochs(PackDataLoader(ds, batch_sampler=sampler, num_workers=W,
                                               persistent_workers=persistent), sampler)
        return LoaderEpochs(DataLoader(ds, batch_sampler=sampler, num_workers=W, persistent_workers=persistent,
                                       collate_fn=collate_packed if packed else None), sampler)

    def pack_iterable(persistent):
        ds = PackIterableDataset(pack, batch_size=B, seed=0, label="label")
        return LoaderEpochs(DataLoader(ds, batch_size=B, num_workers=W, persistent_workers=persistent), ds)

    def pack_iterable_main(persistent):
        ds = PackIterableDataset(pack, batch_size=B, seed=0, label="label", batched=True, prefetch=4)
        return LoaderEpochs(DataLoader(ds, batch_size=None, num_workers=0), ds)

    def loose_files(persistent):
        return LoaderEpochs(DataLoader(loose_ds, batch_size=B, shuffle=True, num_workers=W,
                                       persistent_workers=persistent))

    # name -> factory(persistent) of a callable running one epoch
    runs = {
        raw_name: lambda p: RawEpochs(pack, B),
        "packfmt global": lambda p: pack_map("global", p),
        "packfmt global, packed batches": lambda p: pack_map("global", p, packed=True),
        "packfmt global, torch transport": lambda p: pack_map("global", p, ring=False),
        "packfmt global, packed, torch transport": lambda p: pack_map("global", p, packed=True, ring=False),
        "packfmt feistel": lambda p: pack_map("feistel", p),
        "packfmt block 64x16": lambda p: pack_map("block", p, block_size=64, window=16),
        "packfmt none": lambda p: pack_map("none", p),
        "packfmt iterable (global)": pack_iterable,
        "packfmt iterable, num_workers=0": pack_iterable_main,
        loose_name: loose_files,
    }
    packed_mib = sum(os.path.getsize(os.path.join(pack, f)) for f in os.listdir(pack)) / 2**20
    intro = (f"{args.n:,} samples of 2-6 KiB ({packed_mib:.0f} MiB), 100 labels; one shuffled epoch through "
             f"`DataLoader(num_workers={W}, batch_size={B})` (`PackDataLoader` unless marked *torch transport*), "
             f"items `(bytes, label)` with the default collate unless *packed*; "
             f"best of {args.reps} epochs (warm: persistent workers after one untimed epoch; cold: a fresh "
             f"loader per epoch). The loose tree was listed in {list_time:.2f} s (not counted). "
             f"Machine: {describe_machine(info)}.")
    print(intro)
    sections = []
    for cache in ("warm", "cold"):
        if cache == "cold" and args.no_cold:
            break
        # Warm: persistent workers, one untimed epoch first (worker start, first touch of the
        # maps), as in a long training run.  Cold: a fresh loader per epoch (persistent workers
        # would keep their mapped pages, which eviction skips).  Repetitions are interleaved
        # across readers, so a burst of load elsewhere does not land on one reader only; the
        # best epoch of each is kept.
        best, paged, cpu = {}, {}, {}
        readers = {}
        if cache == "warm":
            for name, make in runs.items():
                readers[name] = make(True)
                warm(files)
                readers[name]()
        for _ in range(args.reps):
            for name, make in runs.items():
                if cache == "warm":
                    epoch = readers[name]
                    warm(files)
                else:
                    epoch = make(False)
                    evict(files)
                k0 = pgpgin_kib()
                c0 = EpochCPU(epoch)
                count, nbytes, dt = epoch()
                cpu_s = c0.used()
                paged[name] = paged.get(name, 0) + pgpgin_kib() - k0
                assert count == args.n, (name, count)
                if name not in best or dt < best[name][2]:
                    best[name] = (count, nbytes, dt)
                cpu[name] = min(cpu.get(name, cpu_s), cpu_s)
                log(f"{cache} {name}: {count / dt:,.0f} samples/s, {cpu_s:.2f} CPU s")
        readers.clear()
        res = {name: (c / dt, nb / dt / 2**20, paged[name] // args.reps) for name, (c, nb, dt) in best.items()}
        loose_rate, raw_rate = res[loose_name][0], res[raw_name][0]
        rows = [[name, f"{rate:,.0f}", f"{mib:.0f}", f"{rate / loose_rate:.1f}x", f"{rate / raw_rate:.0%}",
                 f"{cpu[name] * 1e6 / args.n:.2f}", f"{paged // 1024:,}"] for name, (rate, mib, paged) in res.items()]
        table = markdown_table(["reader", "samples/s", "MiB/s", "vs loose files", "vs get_batch",
                                "CPU µs / sample", "MiB paged in / epoch"], rows)
        title = ("warm page cache (files read right before each epoch)" if cache == "warm" else
                 "cold page cache (every file evicted with posix_fadvise(DONTNEED) before each epoch)")
        sections.append(f"**{title}**\n\n{table}")
        print(f"\n{title}\n{table}")
    body = intro + "\n\n" + "\n\n".join(sections) + (
        f"\n\nCommand: `python benchmarks/dataloader.py --n {args.n} --workers {W} --batch {B}`\n")
    for path in args.out:
        update_markdown_section(path, "dataloader", "DataLoader throughput (benchmarks/dataloader.py)", body)


if __name__ == "__main__":
    main()
