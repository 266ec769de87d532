"""WebDataset + wids (webdataset, wids): tar shards written by webdataset.ShardWriter; random access,
shuffled epochs through wids.ShardListDataset (mmap'd tars, index built when a shard is first opened)
and wids.ChunkedSampler; the sequential pass through webdataset.WebDataset, its streaming reader."""

from __future__ import annotations

import json
import os

from base import Adapter, Reader

SHARD_BYTES = 64 << 20


def _in_place(url):
    """wids' localname: read local shards where they are (its default copies them into /tmp/_wids_cache)."""
    return url


def _value(v):
    # wids hands a member out as a BytesIO over its mmap'd tar; getvalue() is the bytes a user reads.
    return v if isinstance(v, bytes) else v.getvalue()


def _wids_collate(batch):
    return [_value(s[".bin"]) for s in batch]


class WidsReader(Reader):
    def __init__(self, out):
        import wids
        with open(os.path.join(out, "shards.json")) as f:
            self.shards = json.load(f)
        self.out = out
        self.ds = wids.ShardListDataset(self.shards, transformations=[], lru_size=64,
                                           localname=_in_place)
        self.n = len(self.ds)

    def get(self, i):
        return _value(self.ds[i][".bin"])

    def iter_all(self):
        import webdataset as wds
        urls = [s["url"] for s in self.shards]
        for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            yield s["bin"]

    def loader(self, batch_size, num_workers, seed):
        import wids
        from torch.utils.data import DataLoader
        sampler = wids.ChunkedSampler(self.ds, chunksize=2000, seed=seed, shuffle=True)
        return DataLoader(self.ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                          collate_fn=_wids_collate)


class WdsAdapter(Adapter):
    name = "WebDataset + wids"
    requires = ("webdataset", "wids")
    kind = "tar shards (64 MB)"
    loader_kind = "wids.ShardListDataset + ChunkedSampler (chunks of 2000, its default)"

    def _import(self):
        import webdataset  # noqa: F401
        import wids  # noqa: F401

    def build(self, src, rels, out, compression):
        import webdataset as wds
        os.makedirs(out, exist_ok=True)
        pattern = os.path.join(out, "shard-%06d.tar")
        with wds.ShardWriter(pattern, maxsize=SHARD_BYTES, maxcount=10**9, verbose=0) as sink:
            for i, rel in enumerate(rels):
                with open(os.path.join(src, rel), "rb") as f:
                    sink.write({"__key__": f"{i:08d}", "bin": f.read()})
        # The shard list wids needs (url + sample count): count members per shard.
        import tarfile
        shards = []
        for name in sorted(os.listdir(out)):
            if name.endswith(".tar"):
                with tarfile.open(os.path.join(out, name)) as tf:
                    n = sum(1 for m in tf if m.isfile())
                shards.append({"url": os.path.join(out, name), "nsamples": n})
        with open(os.path.join(out, "shards.json"), "w") as f:
            json.dump(shards, f)

    def open(self, out, rels):
        return WidsReader(out)


ADAPTER = WdsAdapter()
