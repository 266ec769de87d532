"""The registry of systems: name on the command line -> adapter module."""

import os

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


# More systems from the environment, "name=module,name2=module2" (modules on PYTHONPATH): how the tests
# add a deliberately broken adapter, and how to try a new peer without editing this file.
for _item in filter(None, os.environ.get("PEERS_EXTRA_SYSTEMS", "").split(",")):
    _name, _, _mod = _item.partition("=")
    SYSTEMS[_name.strip()] = _mod.strip()


def load(system: str):
    import importlib
    return importlib.import_module(SYSTEMS[system]).ADAPTER
