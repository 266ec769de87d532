"""ArrayRecord (array-record): shards written with group_size:1 (its random-access setting), read through
ArrayRecordDataSource, the multi-file map-style source that Grain uses (``__getitem__``/``__getitems__``)."""

from __future__ import annotations

import os

from base import Adapter, Reader, identity_collate

SHARD_RECORDS = 25_000  # ~170 MB shards at the benchmark's mean file size, like the others' 64-256 MB


def _options(compression):
    return "group_size:1," + ("zstd:3" if compression == "zstd" else "uncompressed")


class ArrayRecordReaderWrap(Reader):
    def __init__(self, out):
        from array_record.python.array_record_data_source import ArrayRecordDataSource
        self.paths = sorted(os.path.join(out, p) for p in os.listdir(out) if p.endswith(".array_record"))
        self.src = ArrayRecordDataSource(self.paths)
        self.n = len(self.src)

    def get(self, i):
        return self.src[i]

    def get_batch(self, idx):
        return list(self.src.__getitems__([int(i) for i in idx]))

    def iter_all(self):
        from array_record.python.array_record_module import ArrayRecordReader
        for p in self.paths:
            r = ArrayRecordReader(p, "readahead_buffer_size:16777216")
            n = r.num_records()
            for a in range(0, n, 1024):
                yield from r.read(a, min(a + 1024, n))
            r.close()

    def loader(self, batch_size, num_workers, seed):
        # ArrayRecordDataSource is map-style (len/getitem/getitems): torch's DataLoader takes it as is,
        # and calls __getitems__ once per batch.
        import torch
        from torch.utils.data import DataLoader
        g = torch.Generator().manual_seed(seed)
        return DataLoader(self.src, batch_size=batch_size, shuffle=True, generator=g, num_workers=num_workers,
                          collate_fn=identity_collate)


class ArrayRecordAdapter(Adapter):
    name = "ArrayRecord"
    requires = ("array-record",)
    compressions = ("none", "zstd")
    kind = "riegeli chunks, group_size:1"
    loader_kind = "ArrayRecordDataSource (map-style, __getitems__ per batch)"

    def _import(self):
        from array_record.python import array_record_module  # noqa: F401
        from array_record.python.array_record_data_source import ArrayRecordDataSource  # noqa: F401

    def build(self, src, rels, out, compression):
        from array_record.python.array_record_module import ArrayRecordWriter
        os.makedirs(out, exist_ok=True)
        opts = _options(compression)
        w = None
        for i, rel in enumerate(rels):
            if i % SHARD_RECORDS == 0:
                if w is not None:
                    w.close()
                w = ArrayRecordWriter(os.path.join(out, f"data-{i // SHARD_RECORDS:05d}.array_record"), opts)
            with open(os.path.join(src, rel), "rb") as f:
                w.write(f.read())
        if w is not None:
            w.close()

    def open(self, out, rels):
        return ArrayRecordReaderWrap(out)


ADAPTER = ArrayRecordAdapter()
