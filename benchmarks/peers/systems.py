"""The registry of systems: name on the command line -> adapter module."""

SYSTEMS = {
    "packfmt": "packfmt_adapter",
    "mosaic": "mosaic_adapter",
    "litdata": "litdata_adapter",
    "wds": "wds_adapter",
    "arrayrecord": "arrayrecord_adapter",
    "hdf5": "hdf5_adapter",
    "lmdb": "lmdb_adapter",
    "loose": "loose_adapter",
    "tar": "tar_adapter",
}


def load(system: str):
    import importlib
    return importlib.import_module(SYSTEMS[system]).ADAPTER
