"""LMDB (py-lmdb): key = big-endian sample index (so a cursor walks global order), value = file bytes."""

from __future__ import annotations

import os
import struct

from base import Adapter, Reader, identity_collate

_K = struct.Struct(">Q")


class LmdbDataset:
    """The map-style Dataset that LMDB users write: open the environment lazily in each process."""

    def __init__(self, path, n):
        self.path, self.n = path, n
        self._env = None
        self._pid = None

    def _open(self):
        import lmdb
        return lmdb.open(self.path, readonly=True, lock=False, readahead=False, meminit=False, max_readers=64)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self._pid != os.getpid():
            self._env, self._pid = self._open(), os.getpid()
            self._txn = self._env.begin(buffers=False)
        return self._txn.get(_K.pack(i))

    def __getstate__(self):
        return dict(path=self.path, n=self.n, _env=None, _pid=None)


class LmdbReader(Reader):
    def __init__(self, out):
        import lmdb
        self.path = out
        self.env = lmdb.open(out, readonly=True, lock=False, readahead=False, meminit=False)
        self.txn = self.env.begin(buffers=False)
        self.n = self.env.stat()["entries"]

    def get(self, i):
        return self.txn.get(_K.pack(i))

    def get_batch(self, idx):
        # Cursor.getmulti: one C call for many keys (py-lmdb's batched get).
        keys = [_K.pack(int(i)) for i in idx]
        with self.txn.cursor() as cur:
            got = cur.getmulti(keys, dupdata=False)
        return [v for _, v in got]

    def iter_all(self):
        with self.txn.cursor() as cur:
            for v in cur.iternext(keys=False, values=True):
                yield v

    def loader(self, batch_size, num_workers, seed):
        import torch
        from torch.utils.data import DataLoader
        g = torch.Generator().manual_seed(seed)
        self.close()  # py-lmdb refuses a second open of the same environment in one process
        return DataLoader(LmdbDataset(self.path, self.n), batch_size=batch_size, shuffle=True, generator=g,
                          num_workers=num_workers, collate_fn=identity_collate)

    def close(self):
        self.txn.abort()
        self.env.close()


class LmdbAdapter(Adapter):
    name = "LMDB"
    requires = ("lmdb",)
    kind = "B+tree key-value store (mmap)"
    loader_kind = "user-written map Dataset (txn.get per item)"

    def _import(self):
        import lmdb  # noqa: F401

    def build(self, src, rels, out, compression):
        import lmdb
        total = sum(os.path.getsize(os.path.join(src, r)) for r in rels)
        env = lmdb.open(out, map_size=int(total * 2.5) + (256 << 20), sync=False, metasync=False, lock=True)
        txn = env.begin(write=True)
        for i, rel in enumerate(rels):
            with open(os.path.join(src, rel), "rb") as f:
                txn.put(_K.pack(i), f.read(), append=True)
            if i % 10000 == 9999:
                txn.commit()
                txn = env.begin(write=True)
        txn.commit()
        env.sync(True)
        env.close()

    def files(self, out):
        return [os.path.join(out, "data.mdb")]

    def open(self, out, rels):
        return LmdbReader(out)


ADAPTER = LmdbAdapter()
