"""HDF5 (h5py): one file, one 1-D dataset of variable-length uint8 arrays (h5py.vlen_dtype).

h5py's filters (gzip, lzf) do not compress the variable-length payloads (they live in the global heap),
so HDF5 has no compressed row here.
"""

from __future__ import annotations

import os

import numpy as np

from base import Adapter, Reader, identity_collate


class H5Dataset:
    """The map-style Dataset that h5py users write: open the file lazily in each worker."""

    def __init__(self, path, n):
        self.path, self.n = path, n
        self._d = None
        self._pid = None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self._pid != os.getpid():
            import h5py
            self._d, self._pid = h5py.File(self.path, "r")["data"], os.getpid()
        return self._d[i].tobytes()

    def __getstate__(self):
        return dict(path=self.path, n=self.n, _d=None, _pid=None)


class H5Reader(Reader):
    def __init__(self, out):
        import h5py
        self.path = os.path.join(out, "data.h5")
        self.f = h5py.File(self.path, "r")
        self.d = self.f["data"]
        self.n = self.d.shape[0]

    def get(self, i):
        return self.d[i].tobytes()

    def get_batch(self, idx):
        # h5py fancy indexing needs increasing, unique indices: sort, read once, put back in order.
        idx = np.asarray(idx, dtype=np.int64)
        uniq, inverse = np.unique(idx, return_inverse=True)
        got = self.d[uniq]
        return [got[j].tobytes() for j in inverse.tolist()]

    def iter_all(self):
        for a in range(0, self.n, 1024):
            for arr in self.d[a: min(a + 1024, self.n)]:
                yield arr.tobytes()

    def loader(self, batch_size, num_workers, seed):
        import torch
        from torch.utils.data import DataLoader
        g = torch.Generator().manual_seed(seed)
        return DataLoader(H5Dataset(self.path, self.n), batch_size=batch_size, shuffle=True, generator=g,
                          num_workers=num_workers, collate_fn=identity_collate)

    def close(self):
        self.f.close()


class H5Adapter(Adapter):
    name = "HDF5 (h5py)"
    requires = ("h5py",)
    kind = "one file, vlen uint8 dataset"
    loader_kind = "user-written map Dataset (dset[i] per item)"

    def _import(self):
        import h5py  # noqa: F401

    def build(self, src, rels, out, compression):
        import h5py
        os.makedirs(out, exist_ok=True)
        n = len(rels)
        with h5py.File(os.path.join(out, "data.h5"), "w") as f:
            d = f.create_dataset("data", shape=(n,), dtype=h5py.vlen_dtype(np.dtype("uint8")), chunks=(1024,))
            block = 1024
            for a in range(0, n, block):
                arrs = np.empty(min(block, n - a), dtype=object)
                for j, rel in enumerate(rels[a: a + block]):
                    with open(os.path.join(src, rel), "rb") as fh:
                        arrs[j] = np.frombuffer(fh.read(), dtype=np.uint8)
                d[a: a + len(arrs)] = arrs

    def open(self, out, rels):
        return H5Reader(out)


ADAPTER = H5Adapter()
