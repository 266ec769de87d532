"""Shared-memory rings of reusable batch slots between DataLoader workers and the main process.

Used by :class:`packfmt.torch.PackDataLoader` (torch is not imported here).  One ring serves all
the workers of one DataLoader iterator; worker ``w`` owns slots ``w*S .. w*S+S-1``.  A worker
reads a batch straight into one of its free slots and sends only a small descriptor (slot,
sequence number, offsets, labels) through torch's result queue; the main process turns the
descriptor into the user's batch without copying and frees the slot when that batch dies.

Layout of the mapping (native byte order, one page-aligned header then the slots)::

    header  int64[S*W][2]   per slot: state (FREE / BUSY), sequence number of its last use
            int64[W][2]     per worker: batches sent through the ring, batches that fell back
    slots   uint8[S*W][slot_bytes]

Who writes what: only the worker flips a slot FREE -> BUSY (and bumps its sequence number)
before it writes the slot's bytes; only the main process flips it BUSY -> FREE, after the last
reference to the batch is gone.  The descriptor crosses a pipe, so the worker's bytes are visible
to the main process when it reads them.  The release is a store with release ordering after the
main process's last read of the slot, and the worker reads the state with acquire ordering before
it writes the slot again (``_core.store_release_i64`` / ``load_acquire_i64``, C11 atomics), so a
slot is never rewritten while the main process may still read it, on any CPU.

The backing file is created in ``/dev/shm`` and unlinked at once: a forked worker inherits the
mapping, a spawned (or forkserver) worker receives the file descriptor once, when it starts.
Nothing is left in ``/dev/shm`` whatever happens to any process afterwards; the memory goes back
to the system when the last process unmaps it.
"""

from __future__ import annotations

import mmap
import os
import sys
import tempfile
import weakref
from multiprocessing import reduction
from multiprocessing.context import get_spawning_popen

import numpy as np

from packfmt._core import load_acquire_i64, store_release_i64

SUPPORTED = sys.platform.startswith("linux")

FREE, BUSY = 0, 1
_PAGE = mmap.PAGESIZE

# ring id -> Ring, for the rings this process created (the DataLoader's main process).
_OWNED: "weakref.WeakValueDictionary[int, Ring]" = weakref.WeakValueDictionary()


def _shm_dir() -> str:
    d = "/dev/shm"
    return d if os.path.isdir(d) and os.access(d, os.W_OK) else tempfile.gettempdir()


class Ring:
    """``workers`` x ``slots`` slots of ``slot_bytes`` bytes each in one shared mapping.

    Created in the main process; handed to the workers through ``worker_init_fn`` (inherited at
    fork, pickled with its file descriptor for spawn).  ``os.posix_fallocate`` reserves the whole
    mapping up front, so a full ``/dev/shm`` is an ``OSError`` here rather than a SIGBUS later.
    """

    def __init__(self, workers: int, slots: int, slot_bytes: int):
        if workers < 1 or slots < 1 or slot_bytes < 1:
            raise ValueError(f"ring needs workers, slots, slot_bytes >= 1, got {workers}, {slots}, {slot_bytes}")
        self.id = int.from_bytes(os.urandom(8), "little")
        self.owner = os.getpid()
        self.workers, self.slots = int(workers), int(slots)
        self.slot_bytes = -(-int(slot_bytes) // 64) * 64
        fd, path = tempfile.mkstemp(prefix=f"packfmt-ring-{self.owner}-", dir=_shm_dir())
        try:
            os.unlink(path)
            os.posix_fallocate(fd, 0, self.size)
            mm = mmap.mmap(fd, self.size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        weakref.finalize(self, os.close, fd)  # the mapping keeps its own reference to the file
        self._attach(mm)
        self._taken = np.zeros(self.workers * self.slots, dtype=np.int64)  # last seq rebuilt, per slot
        _OWNED[self.id] = self

    @property
    def header_bytes(self) -> int:
        n = (self.workers * self.slots + self.workers) * 2 * 8
        return -(-n // _PAGE) * _PAGE

    @property
    def size(self) -> int:
        return self.header_bytes + self.workers * self.slots * self.slot_bytes

    def _attach(self, mm):
        self.mm = mm
        n = self.workers * self.slots
        self._words = np.frombuffer(mm, np.int64, count=2 * n)
        self._hdr = self._words.reshape(n, 2)
        self._stats = np.frombuffer(mm, np.int64, count=2 * self.workers, offset=16 * n).reshape(self.workers, 2)

    def slot_array(self, slot: int, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` of ``slot`` as a uint8 array whose base is the mapping itself (so that
        numpy views of it keep *this* array alive, which is what the release hangs on)."""
        return np.frombuffer(self.mm, np.uint8, count=nbytes, offset=self.header_bytes + slot * self.slot_bytes)

    def __reduce__(self):
        if get_spawning_popen() is None:
            raise TypeError("a packfmt shared-memory ring can only be handed to a DataLoader worker as it starts")
        return _rebuild_ring, (self.id, self.owner, self.workers, self.slots, self.slot_bytes,
                               reduction.DupFd(self._fd))

    # -- worker side -------------------------------------------------------------------------
    def writer(self, worker_id: int) -> "RingWriter":
        if not 0 <= worker_id < self.workers:
            raise ValueError(f"worker {worker_id} out of range for a ring of {self.workers} workers")
        return RingWriter(self, worker_id)

    # -- main-process side -------------------------------------------------------------------
    def take(self, slot: int, seq: int, nbytes: int) -> int:
        """Validate a descriptor; the offset of the slot's bytes in :attr:`mm` (:meth:`release` it when done)."""
        if not 0 <= slot < len(self._hdr) or not 0 <= nbytes <= self.slot_bytes:
            raise RuntimeError(f"packfmt ring {self.id:#x}: descriptor out of range (slot {slot}, {nbytes} bytes)")
        state, cur = (int(x) for x in self._hdr[slot])
        if state != BUSY or cur != seq or self._taken[slot] == seq:
            raise RuntimeError(f"packfmt ring {self.id:#x}: stale or repeated descriptor for slot {slot} "
                               f"(use {seq}; slot is {'busy' if state == BUSY else 'free'} at use {cur})")
        self._taken[slot] = seq
        return self.header_bytes + slot * self.slot_bytes

    def release(self, slot: int, seq: int) -> None:
        """Give ``slot`` back to its worker (if it still holds use ``seq``)."""
        hdr = self._hdr
        if hdr[slot, 1] == seq and hdr[slot, 0] == BUSY:
            store_release_i64(self._words, 2 * slot, FREE)

    def stats(self) -> dict:
        """``{"ring": batches sent through the ring, "fallback": batches sent the ordinary way}``."""
        ring, fallback = (int(x) for x in self._stats.sum(axis=0))
        return {"ring": ring, "fallback": fallback}


def _rebuild_ring(ring_id, owner, workers, slots, slot_bytes, dupfd):
    ring = Ring.__new__(Ring)
    ring.id, ring.owner, ring.workers, ring.slots, ring.slot_bytes = ring_id, owner, workers, slots, slot_bytes
    fd = dupfd.detach()
    try:
        mm = mmap.mmap(fd, ring.size)
    finally:
        os.close(fd)
    ring._fd = -1
    ring._attach(mm)
    return ring


def owned(ring_id: int) -> Ring:
    """The ring ``ring_id`` if this process created it, else a clear error."""
    ring = _OWNED.get(ring_id)
    if ring is None or ring.owner != os.getpid():
        raise RuntimeError(
            f"this batch was read into the shared-memory ring {ring_id:#x} of a PackDataLoader worker; it can "
            f"only be rebuilt in that DataLoader's main process (this is pid {os.getpid()}, and the ring "
            f"{'was created by pid %d' % ring.owner if ring is not None else 'is unknown here or already gone'})")
    return ring


class NoSlot(Exception):
    """No free slot (all held by the main process) or the batch is larger than a slot."""


class RingWriter:
    """A worker's view of its own slots."""

    def __init__(self, ring: Ring, worker_id: int):
        self.ring, self.worker_id = ring, worker_id
        self.base = worker_id * ring.slots
        self._next = 0

    def acquire(self, nbytes: int) -> tuple[int, int]:
        """A free slot for ``nbytes`` bytes, marked busy: ``(slot, seq)``; :class:`NoSlot` if none."""
        ring = self.ring
        if nbytes > ring.slot_bytes:
            raise NoSlot
        hdr, words = ring._hdr, ring._words
        for k in range(ring.slots):
            s = self.base + (self._next + k) % ring.slots
            if load_acquire_i64(words, 2 * s) == FREE:
                seq = int(hdr[s, 1]) + 1
                hdr[s, 1] = seq
                hdr[s, 0] = BUSY
                self._next = (s - self.base + 1) % ring.slots
                return s, seq
        raise NoSlot

    def abandon(self, slot: int) -> None:
        """Free a slot this worker acquired but never handed over (a failed read)."""
        self.ring._hdr[slot, 0] = FREE

    def count(self, fallback: bool) -> None:
        self.ring._stats[self.worker_id, 1 if fallback else 0] += 1
