"""packfmt: `pack build` (packfmt.build.build_dataset) and packfmt.open / PackDataset."""

from __future__ import annotations

import os


from base import Adapter, Reader


class PackReader(Reader):
    def __init__(self, out, n):
        import packfmt
        self.ds = packfmt.open(out)
        self.n = n
        assert len(self.ds) == n, (len(self.ds), n)
        self.out = out
        self._batch = self.ds.get_batch
        # The build walks names sorted by code point at every level; for the benchmark tree this is
        # the same order as sorted(rels), which the harness checks byte for byte anyway.

    def get(self, i):
        return self.ds[i]

    def get_batch(self, idx):
        return self._batch(idx)

    def iter_all(self):
        for batch in self.ds.iter_batches(1024):
            yield from batch

    def loader(self, batch_size, num_workers, seed):
        # The loader docs/guide.md recommends: PackDataLoader hands each batch from a worker to the main
        # process through a shared-memory ring (docs/shuffle.md); the items stay plain bytes, as for
        # every other system here (collate_samples gives the list default_collate would).
        from packfmt.torch import PackBatchSampler, PackDataLoader, PackDataset
        ds = PackDataset(self.out)
        sampler = PackBatchSampler(ds, batch_size=batch_size, seed=seed, mode="global")
        return PackDataLoader(ds, batch_sampler=sampler, num_workers=num_workers, persistent_workers=False)

    def close(self):
        self.ds.close()


class PackAdapter(Adapter):
    name = "packfmt"
    requires = ("packfmt",)
    compressions = ("none", "zstd", "zstd-dict")
    kind = "indexed shards + Arrow index"
    loader_kind = "PackDataset + PackBatchSampler + PackDataLoader (one get_batch per batch, shared-memory ring)"

    def __init__(self):
        # pack build uses one worker per CPU by default; run.py also builds with PEERS_PACKFMT_WORKERS=1
        # to compare with the single-process peers.
        w = os.environ.get("PEERS_PACKFMT_WORKERS")
        self.workers = int(w) if w else None
        # remote_run.py also builds with the peers' shard size (64 MiB) next to packfmt's default.
        self.shard_size = os.environ.get("PEERS_PACKFMT_SHARD_SIZE") or None

    def _import(self):
        import packfmt  # noqa: F401
        import packfmt.build  # noqa: F401

    def build(self, src, rels, out, compression):
        from packfmt.build import build_dataset
        extra = {"shard_size": self.shard_size} if self.shard_size else {}
        build_dataset(src, out, compression=compression, workers=self.workers, progress=False, **extra)

    def open(self, out, rels):
        return PackReader(out, len(rels))


ADAPTER = PackAdapter()
