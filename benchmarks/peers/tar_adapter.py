"""An uncompressed tar plus an offset index (numpy arrays of data offset and size): read by pread.

What many teams write by hand before adopting a format: `tar cf`, then one pass over the headers to
record where each member's data starts.
"""

from __future__ import annotations

import os
import tarfile

import numpy as np

from base import Adapter, Reader, identity_collate


class TarIndexDataset:
    def __init__(self, tar_path, offsets, sizes):
        self.tar_path, self.offsets, self.sizes = tar_path, offsets, sizes
        self._fd = None
        self._pid = None

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, i):
        if self._pid != os.getpid():  # one descriptor per process (DataLoader workers fork)
            self._fd, self._pid = os.open(self.tar_path, os.O_RDONLY), os.getpid()
        return os.pread(self._fd, int(self.sizes[i]), int(self.offsets[i]))

    def __getstate__(self):
        return dict(self.__dict__, _fd=None, _pid=None)


class TarReader(Reader):
    def __init__(self, out):
        idx = np.load(os.path.join(out, "index.npy"))
        self.tar = os.path.join(out, "data.tar")
        self.offsets = idx[0].copy()
        self.sizes = idx[1].copy()
        self.n = len(self.offsets)
        self.ds = TarIndexDataset(self.tar, self.offsets, self.sizes)
        self.fd = os.open(self.tar, os.O_RDONLY)

    def get(self, i):
        return os.pread(self.fd, int(self.sizes[i]), int(self.offsets[i]))

    def iter_all(self):
        # One sequential pass over the archive with big reads, cutting members out of the buffer.
        with open(self.tar, "rb", buffering=0) as f:
            chunk = 8 << 20
            buf = b""
            base = 0
            for off, size in zip(self.offsets.tolist(), self.sizes.tolist()):
                end = off + size
                if end > base + len(buf):
                    f.seek(off)
                    buf = f.read(max(chunk, size))
                    base = off
                yield buf[off - base: end - base]

    def loader(self, batch_size, num_workers, seed):
        import torch
        from torch.utils.data import DataLoader
        g = torch.Generator().manual_seed(seed)
        return DataLoader(self.ds, batch_size=batch_size, shuffle=True, generator=g, num_workers=num_workers,
                          collate_fn=identity_collate)

    def close(self):
        os.close(self.fd)


class TarAdapter(Adapter):
    name = "tar + offset index"
    kind = "one tar, numpy offset index, pread"
    loader_kind = "user-written map Dataset (pread per item)"

    def _import(self):
        pass

    def build(self, src, rels, out, compression):
        os.makedirs(out, exist_ok=True)
        tar_path = os.path.join(out, "data.tar")
        offsets = np.zeros(len(rels), dtype=np.int64)
        sizes = np.zeros(len(rels), dtype=np.int64)
        with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tf:
            for i, rel in enumerate(rels):
                ti = tf.gettarinfo(os.path.join(src, rel), arcname=rel)
                with open(os.path.join(src, rel), "rb") as f:
                    tf.addfile(ti, f)
        # The index: one pass over the headers (offset_data is where the member's bytes start).
        with tarfile.open(tar_path, "r") as tf:
            for i, m in enumerate(tf):
                offsets[i], sizes[i] = m.offset_data, m.size
        np.save(os.path.join(out, "index.npy"), np.stack([offsets, sizes]))

    def open(self, out, rels):
        return TarReader(out)


ADAPTER = TarAdapter()
