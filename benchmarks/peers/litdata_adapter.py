"""LitData (litdata): ``optimize()`` into 64 MB chunks, read with StreamingDataset(dir).

One optimize worker: with several, each worker writes its own chunks and the dataset's order is no
longer the input order (sample i would not be file i), which the byte-for-byte check catches.
"""

from __future__ import annotations

import os

from base import Adapter, Reader


def _load(path):
    with open(path, "rb") as f:
        return f.read()


def _lit_collate(batch):
    # LitData hands out memoryviews into its chunk buffers, which a DataLoader worker cannot pickle.
    return [bytes(s) for s in batch]


class LitReader(Reader):
    def __init__(self, out):
        from litdata import StreamingDataset
        self.out = out
        self.ds = StreamingDataset(out)
        self.n = len(self.ds)

    def get(self, i):
        return self.ds[i]

    def iter_all(self):
        yield from self.ds

    def loader(self, batch_size, num_workers, seed):
        from litdata import StreamingDataLoader, StreamingDataset
        ds = StreamingDataset(self.out, shuffle=True, seed=seed)
        return StreamingDataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=_lit_collate)


class LitAdapter(Adapter):
    name = "LitData"
    requires = ("litdata",)
    compressions = ("none", "zstd")
    kind = "chunks (64 MB) + index.json"
    loader_kind = "StreamingDataset(shuffle=True) + StreamingDataLoader"

    def __init__(self, workers=1):
        self.workers = workers

    def _import(self):
        import litdata  # noqa: F401

    def build(self, src, rels, out, compression):
        from litdata import optimize
        optimize(fn=_load, inputs=[os.path.join(src, r) for r in rels], output_dir=out, chunk_bytes="64MB",
                 num_workers=self.workers, compression="zstd" if compression == "zstd" else None,
                 mode="overwrite", reorder_files=False, start_method="fork")

    def open(self, out, rels):
        return LitReader(out)


ADAPTER = LitAdapter()
