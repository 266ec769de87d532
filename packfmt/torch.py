"""PyTorch integration: datasets, samplers and a resumable DataLoader.

Optional: ``import packfmt`` never imports torch; this module does.

Map-style (the DataLoader sends each batch of indices to a worker, which reads
it with one ``get_batch`` call through :meth:`PackDataset.__getitems__`)::

    from packfmt.torch import PackDataset, PackBatchSampler, PackDataLoader
    ds = PackDataset("s3://bucket/train", transform=decode, label="label")
    sampler = PackBatchSampler(ds, batch_size=256, seed=0, mode="global")
    loader = PackDataLoader(ds, batch_sampler=sampler, num_workers=8, persistent_workers=True)
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        for images, labels in loader:
            ...
            if step % 1000 == 0:
                torch.save(loader.state_dict(), "ckpt")   # {"seed", "epoch", "consumed"}
    # after a crash, with any num_workers:
    loader.load_state_dict(torch.load("ckpt")); start_epoch = loader.state_dict()["epoch"]

With workers and no ``transform``, ``PackDataLoader`` moves batches through a
shared-memory ring of reusable slots per worker (see :class:`PackDataLoader`);
``PackDataset(..., packed=True)`` then yields :class:`PackedBatch` views of the
slots, with no copy at all.

Iterable (each worker computes its own batches of the rank's epoch order and
reads ahead in a background thread)::

    ds = PackIterableDataset("/data/train", batch_size=256, seed=0, transform=decode)
    loader = PackDataLoader(ds, batch_size=256, num_workers=8)

``rank``/``world_size`` default to the initialised ``torch.distributed`` group,
else the ``RANK``/``WORLD_SIZE`` environment variables, else 0/1 -- resolved
when the sampler or iterable dataset is constructed (in the main process).
``PackDataset`` also works with ``torch.utils.data.DistributedSampler``.
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
import weakref
from multiprocessing import sharedctypes
from multiprocessing.context import get_spawning_popen

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate, get_worker_info

from . import _ring
from .shuffle import EpochOrder, shard_boundaries_of

__all__ = [
    "PackDataset", "PackSampler", "PackBatchSampler", "PackIterableDataset", "PackDataLoader", "PackedBatch",
    "collate_packed", "collate_samples",
    "dist_rank_world", "to_tensor",
]


def dist_rank_world() -> tuple[int, int]:
    """(rank, world_size) from an initialised ``torch.distributed`` group, else
    the ``RANK``/``WORLD_SIZE`` environment variables, else (0, 1)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def to_tensor(sample: bytes) -> torch.Tensor:
    """A transform: the raw bytes of a sample as a 1-D ``uint8`` tensor."""
    return torch.frombuffer(bytearray(sample), dtype=torch.uint8)


def _open(source, open_kwargs):
    if isinstance(source, (str, os.PathLike)):
        import packfmt
        return packfmt.open(os.fspath(source), **(open_kwargs or {}))
    return source  # an opened packfmt Dataset (or anything with get_batch/__len__/column)


class _Reader:
    """Opens the dataset lazily, once per process, and applies transform/label.

    Shared by the map-style and the iterable dataset.  When the source is a
    URL, a pickled or forked copy re-opens it in the new process (each
    DataLoader worker gets its own handles).
    """

    def __init__(self, source, transform, label, open_kwargs):
        self.source = source
        self.transform = transform
        self.label = label
        self.open_kwargs = open_kwargs
        self._ds = None
        self._labels = None
        self._pid = None

    @property
    def dataset(self):
        if self._ds is None or (self._pid != os.getpid() and isinstance(self.source, (str, os.PathLike))):
            self._ds = _open(self.source, self.open_kwargs)
            self._labels = None
            self._pid = os.getpid()
        return self._ds

    def labels(self):
        if self._labels is None:
            self._labels = np.asarray(self.dataset.column(self.label))
        return self._labels

    def items(self, indices, samples):
        """The user-facing items for ``indices`` given their raw ``samples``."""
        if self.transform is not None:
            t = self.transform
            samples = [t(s) for s in samples]
        if self.label is None:
            return samples
        labels = self.labels()[np.asarray(indices, dtype=np.int64)].tolist()  # Python scalars collate fastest
        return list(zip(samples, labels))

    def __getstate__(self):
        state = self.__dict__.copy()
        if isinstance(self.source, (str, os.PathLike)):
            state.update(_ds=None, _labels=None, _pid=None)
        else:
            state.update(_labels=None)
        return state


def _n_and_boundaries(data_source, mode):
    """Length and (for block mode) shard boundaries of what a sampler samples."""
    if isinstance(data_source, (int, np.integer)):
        return int(data_source), None
    ds = data_source
    if isinstance(ds, (PackDataset, PackIterableDataset)):
        ds = ds.dataset
    boundaries = None
    if mode == "block" and getattr(ds, "shard_of", None) is not None:
        boundaries = shard_boundaries_of(ds.shard_of)
    return len(ds), boundaries


class PackDataset(Dataset):
    """Map-style dataset over a packfmt dataset.

    ``source`` is a URL/path (opened lazily, once per worker process) or an
    opened ``packfmt`` Dataset.  ``transform`` maps the raw ``bytes`` of a
    sample to whatever the model wants (it must be picklable for the
    ``spawn`` start method).  With ``label="col"`` items are ``(sample,
    label)`` pairs, the label read from that index column.

    ``__getitems__`` reads a whole batch with a single ``get_batch`` call
    (the DataLoader uses it when present).

    >>> ds = PackDataset(path, transform=to_tensor, label="label")  # doctest: +SKIP
    >>> x, y = ds[0]                                                # doctest: +SKIP
    """

    _ring_writer = None  # a worker's RingWriter, set by PackDataLoader's worker_init_fn in that worker only

    def __init__(self, source, *, transform=None, label=None, open_kwargs=None, packed=False):
        if packed and transform is not None:
            raise ValueError("packed=True hands over raw bytes; apply the transform to the PackedBatch instead")
        self._reader = _Reader(source, transform, label, open_kwargs)
        self.packed = bool(packed)

    @property
    def dataset(self):
        """The underlying opened dataset (opened on first use in this process)."""
        return self._reader.dataset

    def __len__(self):
        return len(self._reader.dataset)

    def __getitem__(self, i):
        i = int(i)
        return self._reader.items([i], [self._reader.dataset[i]])[0]

    def __getitems__(self, indices):
        if self._ring_writer is not None:  # in a PackDataLoader worker: read into a shared-memory slot
            batch = _RingBatch.read(self._ring_writer, self._reader, indices, self.packed)
            if batch is not None:
                return batch
        if self.packed:
            return PackedBatch.read(self._reader, indices)
        return self._reader.items(indices, self._reader.dataset.get_batch(indices))


def _shared_uint8(nbytes: int) -> torch.Tensor:
    """A uint8 tensor; in a DataLoader worker, allocated directly in shared memory so that handing it
    to the main process costs a file descriptor, not a copy and a pickle of the bytes."""
    t = torch.empty(0, dtype=torch.uint8)
    if get_worker_info() is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    t.set_(torch.UntypedStorage._new_shared(max(nbytes, 1)), 0, (nbytes,), (1,))
    return t


class PackedBatch:
    """A batch of raw samples as one contiguous ``uint8`` tensor plus offsets (and labels).

    Made by ``PackDataset(..., packed=True)``.  Through :class:`PackDataLoader` with workers, the C
    core reads the batch straight into a slot of the worker's shared-memory ring and ``data`` is a
    zero-copy view of that slot, which goes back to the worker when the last reference to it (the
    batch, ``batch[k]`` views, ``data.numpy()``) is gone; batches that do not fit the ring travel as
    one shared-memory tensor instead.  Sample ``k`` is ``batch[k]`` (a zero-copy tensor view) or
    ``batch.tobytes(k)``.  ``labels`` is a tensor when a label column was asked for, else None.
    """

    __slots__ = ("data", "offsets", "labels", "indices", "_in_ring")

    def __init__(self, data, offsets, labels=None, indices=None):
        self.data, self.offsets, self.labels, self.indices = data, offsets, labels, indices
        self._in_ring = False

    @classmethod
    def read(cls, reader, indices) -> "PackedBatch":
        idx = np.asarray(indices, dtype=np.int64)
        holder = {}

        def alloc(n):
            holder["t"] = _shared_uint8(n)
            return holder["t"].numpy()

        _, offsets = reader.dataset.get_batch_packed(idx, alloc=alloc)
        labels = torch.from_numpy(np.ascontiguousarray(reader.labels()[idx])) if reader.label is not None else None
        return cls(holder["t"], torch.from_numpy(offsets), labels, torch.from_numpy(idx))

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, k):
        return self.data[int(self.offsets[k]):int(self.offsets[k + 1])]

    def tobytes(self, k) -> bytes:
        return self.data[int(self.offsets[k]):int(self.offsets[k + 1])].numpy().tobytes()

    def samples(self) -> list:
        """All samples as a list of bytes."""
        buf = self.data.numpy().tobytes()  # one copy, then slices: bytes(memoryview[a:b]) is ~5x slower
        off = self.offsets.tolist()
        return [buf[a:b] for a, b in zip(off, off[1:])]

    def pin_memory(self):
        return PackedBatch(self.data.pin_memory(), self.offsets, self.labels, self.indices)

    def __reduce__(self):
        # Only the payload travels as a shared-memory tensor (one file descriptor per batch); the small
        # arrays go inline in the pickle: each extra shared tensor would cost its own fd hand-over.
        # A ring slot is lent, not given: a pickled batch carries a copy of its bytes.
        data = self.data.clone() if self._in_ring else self.data
        small = [None if t is None else t.numpy() for t in (self.offsets, self.labels, self.indices)]
        return (_rebuild_packed, (data, *small))

    def __repr__(self):
        return f"PackedBatch({len(self)} samples, {self.data.numel()} bytes)"


def _rebuild_packed(data, offsets, labels, indices):
    return PackedBatch(data, *(None if a is None else torch.from_numpy(a) for a in (offsets, labels, indices)))


def collate_packed(batch):
    """The collate_fn for ``PackDataset(packed=True)``: the batch is already one object."""
    return batch


def collate_samples(batch):
    """The collate_fn :class:`PackDataLoader` uses for a ``PackDataset`` without ``transform``: a batch
    that came through a worker's shared-memory ring is already collated (it becomes exactly what
    ``default_collate`` makes of the items in the main process), anything else goes to
    ``default_collate``."""
    return batch if isinstance(batch, _RingBatch) else default_collate(batch)


def _collate_labels(labels: np.ndarray):
    """``default_collate`` of the labels as ``_Reader.items`` makes them (Python scalars from ``tolist``),
    without the detour through Python objects for the common dtypes."""
    kind = labels.dtype.kind
    if kind == "b":
        return torch.from_numpy(np.asarray(labels, dtype=np.bool_))
    if kind == "i" or (kind == "u" and labels.dtype.itemsize < 8):
        return torch.from_numpy(np.asarray(labels, dtype=np.int64))
    if kind == "f":
        return torch.from_numpy(np.asarray(labels, dtype=np.float64))
    return default_collate(tuple(labels.tolist()))


class _RingBatch:
    """In a worker: a batch read into a ring slot, pickled as a small descriptor.

    Unpickled in the DataLoader's main process it becomes the user's batch: a :class:`PackedBatch`
    viewing the slot (released when that view dies) or, for ``(bytes, label)`` items, exactly what
    ``default_collate`` would have made -- the bytes are copied out and the slot released at once.
    Dropped without being sent (an error between read and hand-over), it frees its slot.
    """

    __slots__ = ("writer", "slot", "seq", "nbytes", "offsets", "labels", "indices", "packed", "sent")

    @classmethod
    def read(cls, writer, reader, indices, packed):
        """Read ``indices`` into a free slot of ``writer``; None (and nothing read) when no slot fits."""
        idx = np.asarray(indices, dtype=np.int64)
        got = []

        def alloc(n):
            got.append(writer.acquire(n))  # NoSlot propagates out of get_batch_packed
            return writer.ring.slot_array(got[0][0], n)

        try:
            _, offsets = reader.dataset.get_batch_packed(idx, alloc=alloc)
            labels = np.ascontiguousarray(reader.labels()[idx]) if reader.label is not None else None
        except _ring.NoSlot:
            writer.count(fallback=True)
            return None
        except BaseException:
            if got:
                writer.abandon(got[0][0])
            raise
        self = cls.__new__(cls)
        self.writer, (self.slot, self.seq), self.nbytes = writer, got[0], int(offsets[-1])
        self.offsets, self.labels, self.packed, self.sent = offsets, labels, packed, False
        self.indices = idx if packed else None
        writer.count(fallback=False)
        return self

    def __reduce__(self):
        if self.sent:
            raise RuntimeError("a packfmt ring batch is handed to the main process once; it cannot be copied")
        self.sent = True
        return (_rebuild_ring_batch, (self.writer.ring.id, self.slot, self.seq, self.nbytes, self.offsets,
                                      self.labels, self.indices, self.packed))

    def __del__(self):
        if not self.sent:
            self.writer.abandon(self.slot)


def _rebuild_ring_batch(ring_id, slot, seq, nbytes, offsets, labels, indices, packed):
    ring = _ring.owned(ring_id)
    base = ring.take(slot, seq, nbytes)
    if packed:
        arr = ring.slot_array(slot, nbytes)
        weakref.finalize(arr, ring.release, slot, seq)
        batch = PackedBatch(torch.from_numpy(arr), torch.from_numpy(offsets),
                            None if labels is None else torch.from_numpy(labels), torch.from_numpy(indices))
        batch._in_ring = True
        return batch
    try:
        mm, off = ring.mm, (offsets + base).tolist()
        samples = tuple([mm[a:b] for a, b in zip(off, off[1:])])  # slicing the mmap: the fastest copy out
    finally:
        ring.release(slot, seq)
    if labels is None:
        return list(samples)
    return [samples, _collate_labels(labels)]


class _RingWorkerInit:
    """``worker_init_fn`` of a PackDataLoader with a ring: gives the worker's dataset its slots, then
    calls the user's ``worker_init_fn``."""

    def __init__(self, ring, user_fn):
        self.ring, self.user_fn = ring, user_fn

    def __call__(self, worker_id):
        get_worker_info().dataset._ring_writer = self.ring.writer(worker_id)
        if self.user_fn is not None:
            self.user_fn(worker_id)


class _EpochState:
    """What samplers and the iterable dataset share: options, epoch, start."""

    def _init_order(self, data_source, seed, epoch, mode, rank, world_size, drop_last, block_size, window,
                    shard_boundaries):
        n, bounds = _n_and_boundaries(data_source, mode)
        if rank is None or world_size is None:
            r, w = dist_rank_world()
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        self.n = n
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.mode = mode
        self.drop_last = bool(drop_last)
        self.block_size = int(block_size)
        self.window = int(window)
        self.shard_boundaries = bounds if shard_boundaries is None else np.asarray(shard_boundaries)
        self._epoch = int(epoch)
        self._start = 0
        self._yielded = 0
        self.order(self._epoch)  # validate the options now, not in a worker

    @property
    def epoch(self) -> int:
        return self._epoch

    def order(self, epoch=None) -> EpochOrder:
        """The :class:`~packfmt.shuffle.EpochOrder` of this rank for ``epoch``."""
        return EpochOrder(self.n, self.seed, self._epoch if epoch is None else epoch, self.rank,
                          self.world_size, self.mode, block_size=self.block_size, window=self.window,
                          drop_last=self.drop_last, shard_boundaries=self.shard_boundaries)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a different epoch than the current one starts at its beginning."""
        epoch = int(epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._start = 0
            self._yielded = 0

    def state_dict(self, samples_consumed: int | None = None) -> dict:
        """``{"seed", "epoch", "consumed"}``: ``consumed`` counts the samples of
        this epoch this rank's training loop has consumed.  Pass it when a
        DataLoader with workers reads ahead (or use :class:`PackDataLoader`,
        which counts for you); by default it is what this object has handed
        out in this process, exact only with ``num_workers=0``."""
        consumed = self._start + self._yielded if samples_consumed is None else int(samples_consumed)
        return {"seed": self.seed, "epoch": self._epoch, "consumed": consumed}

    def load_state_dict(self, state: dict) -> None:
        """Continue the epoch of ``state`` at sample ``consumed``."""
        self.seed = int(state["seed"])
        self._epoch = int(state["epoch"])
        self._start = int(state["consumed"])
        self._yielded = 0


class PackSampler(_EpochState, Sampler):
    """Sampler yielding this rank's global indices of the epoch, one at a time.

    ``data_source`` is a :class:`PackDataset`, an opened dataset or a length.
    Use with ``DataLoader(ds, batch_size=B, sampler=PackSampler(ds))``;
    :class:`PackBatchSampler` avoids one Python int per sample.
    """

    def __init__(self, data_source, *, seed=0, epoch=0, mode="global", rank=None, world_size=None,
                 drop_last=False, block_size=64, window=16, shard_boundaries=None):
        self._init_order(data_source, seed, epoch, mode, rank, world_size, drop_last, block_size, window,
                         shard_boundaries)

    def __len__(self):
        return max(0, len(self.order()) - self._start)

    def __iter__(self):
        order = self.order()
        self._yielded = 0
        for a in range(self._start, len(order), 1 << 16):
            for i in order.indices(a, a + (1 << 16)).tolist():
                self._yielded += 1
                yield i


class PackBatchSampler(_EpochState, Sampler):
    """Batch sampler yielding this rank's epoch order in batches (int64 arrays).

    Use as ``DataLoader(ds, batch_sampler=PackBatchSampler(ds, batch_size=B))``.
    ``drop_last_batch`` drops a final short batch of the epoch; ``drop_last``
    is about ranks (see :class:`~packfmt.shuffle.EpochOrder`).
    """

    def __init__(self, data_source, batch_size, *, seed=0, epoch=0, mode="global", rank=None,
                 world_size=None, drop_last=False, drop_last_batch=False, block_size=64, window=16,
                 shard_boundaries=None):
        self.batch_size = int(batch_size)
        self.drop_last_batch = bool(drop_last_batch)
        self._init_order(data_source, seed, epoch, mode, rank, world_size, drop_last, block_size, window,
                         shard_boundaries)

    def __len__(self):
        left = max(0, len(self.order()) - self._start)
        return left // self.batch_size if self.drop_last_batch else -(-left // self.batch_size)

    def __iter__(self):
        self._yielded = 0
        for batch in self.order().batches(self.batch_size, self._start, drop_last=self.drop_last_batch):
            self._yielded += batch.size
            yield batch


_END = object()


class _Failure:
    def __init__(self, exc):
        self.exc = exc


def _prefetch_loop(ds, batches, q, stop):
    try:
        for b in batches:
            item = (b, ds.get_batch(b))
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if stop.is_set():
                return
        q.put(_END)
    except BaseException as e:  # handed to the consumer, re-raised there
        q.put(_Failure(e))


class PackIterableDataset(_EpochState, IterableDataset):
    """Iterable dataset: each DataLoader worker reads its own share of the
    rank's epoch order and prefetches ``prefetch`` batches in a background
    thread.

    Worker ``w`` of ``K`` takes batches ``w, w+K, ...`` (cut every
    ``batch_size`` samples), which is the order in which the DataLoader
    collects them: give the DataLoader the same ``batch_size`` and it returns
    the rank's epoch order exactly, for any number of workers.  With
    ``batched=True`` it yields collated batches instead; use
    ``DataLoader(ds, batch_size=None)``.

    ``set_epoch``/``load_state_dict`` reach workers that are already running
    (``persistent_workers=True``) through a small shared-memory array.
    """

    def __init__(self, source, *, batch_size, seed=0, epoch=0, mode="global", rank=None, world_size=None,
                 drop_last=False, block_size=64, window=16, shard_boundaries=None, transform=None, label=None,
                 prefetch=2, batched=False, open_kwargs=None):
        self._reader = _Reader(source, transform, label, open_kwargs)
        self.batch_size = int(batch_size)
        self.prefetch = int(prefetch)
        self.batched = bool(batched)
        self._shared = sharedctypes.RawArray("q", 2)  # epoch, start: visible to running workers
        self._init_order(self._reader.dataset, seed, epoch, mode, rank, world_size, drop_last, block_size,
                         window, shard_boundaries)

    @property
    def dataset(self):
        return self._reader.dataset

    # epoch and start live in shared memory so that persistent workers see them
    @property
    def _epoch(self):
        return int(self._shared[0])

    @_epoch.setter
    def _epoch(self, v):
        self._shared[0] = v

    @property
    def _start(self):
        return int(self._shared[1])

    @_start.setter
    def _start(self, v):
        self._shared[1] = v

    def __getstate__(self):
        state = self.__dict__.copy()
        if get_spawning_popen() is None:  # a plain pickle: a snapshot, not shared
            state["_shared"] = tuple(self._shared)
        return state

    def __setstate__(self, state):
        if isinstance(state["_shared"], tuple):
            state["_shared"] = sharedctypes.RawArray("q", state["_shared"])
        self.__dict__.update(state)

    def __len__(self):
        return max(0, len(self.order()) - self._start)

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        in_main = info is None
        if in_main:
            self._yielded = 0
        batches = self.order().batches(self.batch_size, self._start, wid, nw)
        reader = self._reader
        ds = reader.dataset
        if self.prefetch <= 0:
            source = ((b, ds.get_batch(b)) for b in batches)
            stop = None
        else:
            q = queue.Queue(maxsize=self.prefetch)
            stop = threading.Event()
            threading.Thread(target=_prefetch_loop, args=(ds, batches, q, stop), daemon=True,
                             name="packfmt-prefetch").start()

            def drain():
                while True:
                    item = q.get()
                    if item is _END:
                        return
                    if isinstance(item, _Failure):
                        raise item.exc
                    yield item
            source = drain()
        try:
            for b, samples in source:
                items = reader.items(b, samples)
                if in_main:
                    self._yielded += len(items)
                if self.batched:
                    yield default_collate(items)
                else:
                    yield from items
        finally:
            if stop is not None:
                stop.set()


class PackDataLoader(DataLoader):
    """A ``DataLoader`` whose ``state_dict()`` is exact with any ``num_workers``, and whose workers
    hand batches of a :class:`PackDataset` over through shared memory.

    Counts the batches the training loop has received (workers read ahead,
    so the sampler cannot know), and turns them into the
    ``{"seed", "epoch", "consumed"}`` state of the :class:`PackBatchSampler`,
    :class:`PackSampler` or :class:`PackIterableDataset` it drives.  Resume with
    ``load_state_dict`` on a fresh loader -- with any number of workers.

    With ``num_workers > 0``, a map-style :class:`PackDataset` without ``transform`` and no
    ``collate_fn`` of your own, each worker gets a ring of ``ring_slots`` reusable shared-memory
    slots of ``ring_slot_bytes`` bytes (created once per iterator, nothing left in ``/dev/shm``).
    A worker reads each batch straight into a free slot and only a small descriptor crosses
    torch's result queue.  ``PackDataset(packed=True)`` batches arrive as a :class:`PackedBatch`
    viewing the slot, which is released when the batch dies; ``(bytes, label)`` items arrive as
    ``default_collate`` makes them (a tuple of ``bytes`` and a label tensor), copied out of the
    slot in the main process.  A batch larger than a slot, or read while all the worker's slots
    are held, travels the ordinary way; :meth:`ring_stats` counts both.  Defaults:
    ``prefetch_factor + 3`` slots of twice the mean batch size (capped at the largest possible
    batch).  ``ring=False`` turns the ring off.  The collate_fn is :func:`collate_packed` for
    ``packed=True`` and :func:`collate_samples` (``default_collate`` for everything the ring
    did not carry) otherwise.
    """

    def __init__(self, dataset, *args, ring=True, ring_slots=None, ring_slot_bytes=None, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        self._ring_mode = None
        self._ring_opts = (ring_slots, ring_slot_bytes)
        self._last_ring = None
        self._last_ring_stats = None
        if isinstance(dataset, PackDataset) and self.collate_fn in (default_collate, None):
            if dataset.packed:
                self.collate_fn = collate_packed
            elif dataset._reader.transform is None:
                self.collate_fn = collate_samples
        if (ring and _ring.SUPPORTED and self.num_workers > 0 and self._auto_collation
                and self.collate_fn in (collate_packed, collate_samples) and isinstance(dataset, PackDataset)):
            self._ring_mode = "packed" if dataset.packed else "samples"

    def _ring_shape(self):
        """(slots per worker, slot bytes) for this loader's dataset and batch size."""
        slots, slot_bytes = self._ring_opts
        if slots is None:
            slots = (self.prefetch_factor or 2) + 3
        if slot_bytes is None:
            slot_bytes = 8 << 20
            batch = getattr(self.batch_sampler, "batch_size", None)
            lengths = getattr(self.dataset.dataset, "raw_lengths", None)
            if batch and lengths is not None and len(lengths):
                slot_bytes = min(int(lengths.max()) * batch, int(2 * float(lengths.mean()) * batch))
                slot_bytes = max(slot_bytes, 64 << 10)
        return int(slots), int(slot_bytes)

    def _get_iterator(self):
        if self._ring_mode is None:
            return super()._get_iterator()
        try:
            ring = _ring.Ring(self.num_workers, *self._ring_shape())
        except OSError as e:  # e.g. /dev/shm full: torch's transport still works, only slower
            warnings.warn(f"packfmt: no shared-memory ring ({e}); batches use torch's transport", RuntimeWarning)
            return super()._get_iterator()
        user_init = self.worker_init_fn
        self.worker_init_fn = _RingWorkerInit(ring, user_init)
        try:
            it = super()._get_iterator()
        finally:
            self.worker_init_fn = user_init
        it._packfmt_ring = ring  # lives as long as the workers (and the batches still viewing it)
        self._last_ring = weakref.ref(ring)
        self._last_ring_stats = None
        return it

    def ring_stats(self) -> dict | None:
        """Batches the workers of the current (or last) iterator sent through the ring and the ordinary
        way: ``{"ring": n, "fallback": m}``; None when no ring is in use."""
        ring = self._last_ring() if self._last_ring is not None else None
        return self._last_ring_stats if ring is None else ring.stats()

    def _pack_source(self):
        if isinstance(self.dataset, PackIterableDataset):
            return self.dataset, (self.dataset.batch_size if self.dataset.batched else self.batch_size)
        bs = self.batch_sampler
        if isinstance(bs, PackBatchSampler):
            return bs, bs.batch_size
        if isinstance(self.sampler, PackSampler):
            return self.sampler, self.batch_size
        raise TypeError("PackDataLoader needs a PackBatchSampler, a PackSampler or a PackIterableDataset")

    def __iter__(self):
        src, _ = self._pack_source()
        self._pack_begin = (src.epoch, src._start)
        self._pack_batches = 0
        it = super().__iter__()
        ring = getattr(it, "_packfmt_ring", None)
        try:
            for batch in it:
                self._pack_batches += 1
                yield batch
        finally:
            if ring is not None:
                self._last_ring_stats = ring.stats()

    def state_dict(self) -> dict:
        src, bs = self._pack_source()
        begin = getattr(self, "_pack_begin", None)
        if begin is None or begin[0] != src.epoch:  # not iterated in this epoch yet
            return src.state_dict(samples_consumed=src._start)
        consumed = begin[1] + self._pack_batches * (bs or 1)
        return src.state_dict(samples_consumed=min(consumed, len(src.order())))

    def load_state_dict(self, state: dict) -> None:
        src, _ = self._pack_source()
        src.load_state_dict(state)
        self._pack_begin = None
