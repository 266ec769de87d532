"""Loose files: the tree itself, one open+read+close per sample (the baseline every packer must beat)."""

from __future__ import annotations

import os

from base import Adapter, Reader, identity_collate


class LooseDataset:
    """The map-style Dataset a user writes in five lines over a list of paths."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with open(self.paths[i], "rb") as f:
            return f.read()


class LooseReader(Reader):
    def __init__(self, src, rels):
        self.paths = [os.path.join(src, r) for r in rels]
        self.n = len(rels)
        self.ds = LooseDataset(self.paths)

    def get(self, i):
        with open(self.paths[i], "rb") as f:
            return f.read()

    def iter_all(self):
        for p in self.paths:
            with open(p, "rb") as f:
                yield f.read()

    def loader(self, batch_size, num_workers, seed):
        import torch
        from torch.utils.data import DataLoader
        g = torch.Generator().manual_seed(seed)
        return DataLoader(self.ds, batch_size=batch_size, shuffle=True, generator=g, num_workers=num_workers,
                          collate_fn=identity_collate)


class LooseAdapter(Adapter):
    name = "loose files"
    kind = "one file per sample"
    loader_kind = "user-written map Dataset (open/read per item)"

    def _import(self):
        pass

    def build(self, src, rels, out, compression):
        # Nothing to build: the "index" is the list of paths, which the reader gets from the harness.
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "SOURCE"), "w") as f:
            f.write(src)

    def open(self, out, rels):
        with open(os.path.join(out, "SOURCE")) as f:
            src = f.read()
        return LooseReader(src, rels)

    def files(self, out):
        with open(os.path.join(out, "SOURCE")) as f:
            src = f.read()
        res = []
        for dirpath, _, names in os.walk(src):
            res.extend(os.path.join(dirpath, nm) for nm in names)
        return sorted(res)


ADAPTER = LooseAdapter()
