"""Mosaic Streaming (mosaicml-streaming): MDSWriter shards (64 MB, like its docs), read with
StreamingDataset(local=..., remote=None) -- the dataset read in place, no download.

torchvision: ``import streaming`` imports torchvision (for its vision datasets).  When the installed
torchvision cannot load against this torch (PyPI's CUDA build next to the CPU torch 2.13.0 build here),
a stub exposing only the two names streaming imports at module level is put in ``sys.modules``; nothing
here uses torchvision.  The table notes when that happened.
"""

from __future__ import annotations

import gc
import importlib.machinery
import os
import sys
import types

from base import Adapter, Reader

SHIMMED = False


def _import_streaming():
    global SHIMMED
    try:
        import torchvision.datasets  # noqa: F401
    except Exception:  # noqa: BLE001
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        tv = types.ModuleType("torchvision")
        ds = types.ModuleType("torchvision.datasets")
        tr = types.ModuleType("torchvision.transforms")
        fn = types.ModuleType("torchvision.transforms.functional")

        class VisionDataset:  # placeholder base class for streaming.vision (unused here)
            def __init__(self, *a, **k):
                raise RuntimeError("torchvision stub: vision datasets are not available")

        ds.VisionDataset = VisionDataset
        ds.CIFAR10 = VisionDataset
        fn.to_tensor = None
        tv.datasets, tv.transforms, tr.functional = ds, tr, fn
        for m in (tv, ds, tr, fn):
            m.__spec__ = importlib.machinery.ModuleSpec(m.__name__, None)
        sys.modules.update({"torchvision": tv, "torchvision.datasets": ds, "torchvision.transforms": tr,
                            "torchvision.transforms.functional": fn})
        SHIMMED = True
    import streaming
    return streaming


def _mds_collate(batch):
    return [s["data"] for s in batch]


class MosaicReader(Reader):
    def __init__(self, out):
        streaming = _import_streaming()
        streaming.base.util.clean_stale_shared_memory()
        self.out = out
        self.ds = streaming.StreamingDataset(local=out, remote=None, shuffle=False, batch_size=256)
        self.n = self.ds.num_samples

    def get(self, i):
        return self.ds[i]["data"]

    def iter_all(self):
        for s in self.ds:  # its own iterator (single process: the whole dataset, in order)
            yield s["data"]

    def loader(self, batch_size, num_workers, seed):
        from torch.utils.data import DataLoader
        streaming = _import_streaming()
        # One StreamingDataset per local directory per process: drop the reader's first.
        del self.ds
        gc.collect()
        streaming.base.util.clean_stale_shared_memory()
        self.ds = streaming.StreamingDataset(local=self.out, remote=None, shuffle=True, shuffle_seed=seed,
                                             batch_size=batch_size)
        return DataLoader(self.ds, batch_size=batch_size, num_workers=num_workers, collate_fn=_mds_collate)


class MosaicAdapter(Adapter):
    name = "Mosaic Streaming (MDS)"
    requires = ("mosaicml-streaming",)
    compressions = ("none", "zstd")
    kind = "MDS shards (64 MB) + index.json"
    loader_kind = "StreamingDataset(shuffle=True), default py1e block shuffle"

    def _import(self):
        _import_streaming()

    def build(self, src, rels, out, compression):
        streaming = _import_streaming()
        comp = "zstd" if compression == "zstd" else None
        with streaming.MDSWriter(out=out, columns={"data": "bytes"}, compression=comp, size_limit="64mb") as w:
            for rel in rels:
                with open(os.path.join(src, rel), "rb") as f:
                    w.write({"data": f.read()})

    def open(self, out, rels):
        return MosaicReader(out)


ADAPTER = MosaicAdapter()
