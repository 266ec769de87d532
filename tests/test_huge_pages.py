"""Shard maps advised to use 2 MiB pages (``packfmt.open(..., huge_pages=...)``, PK_MAP_HUGE in
src_c/reader.h): the advice reaches the kernel exactly when asked for, the ``"auto"`` rule, and reads that
stay byte-identical and verified whatever the kernel does with the advice."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

import packfmt
from packfmt.dataset import huge_pages_wanted

# MADV_HUGEPAGE sets VM_HUGEPAGE ("hg" in smaps' VmFlags) whenever the kernel is built with THP, whatever
# /sys/kernel/mm/transparent_hugepage/enabled says; a kernel without THP refuses the advice.
THP_KERNEL = os.path.isdir("/sys/kernel/mm/transparent_hugepage")
pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps (Linux)")


def shard_maps() -> dict:
    """{path: VmFlags} of every file mapping of this process whose path ends in .pack."""
    out = {}
    path = None
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s+(.*)$", line)
            if m:
                path = m.group(1).strip()
            elif line.startswith("VmFlags:") and path and path.endswith(".pack"):
                out[path] = line.split()[1:]
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three shards of random samples (a few bytes to ~3 MiB, so records cross 2 MiB boundaries)."""
    rng = np.random.default_rng(5)
    out = str(tmp_path_factory.mktemp("huge") / "ds")
    payloads = []
    with packfmt.Writer(out, shard_size="4MiB", compression="none") as w:
        for i in range(40):
            n = int(rng.choice([0, 7, 4096, 70_000, 3 << 20]))
            data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            w.add(f"s/{i:03d}", data, label=i)
            payloads.append(data)
    return out, payloads


@pytest.mark.parametrize("huge", [True, False])
def test_the_advice_reaches_the_kernel_exactly_when_asked(dataset, huge):
    path, payloads = dataset
    ds = packfmt.open(path, huge_pages=huge)
    assert ds.get_batch(np.arange(len(payloads))) == payloads  # opens (and maps) every shard
    maps = {p: flags for p, flags in shard_maps().items() if p.startswith(os.path.realpath(path))}
    assert len(maps) == len(ds._manifest.shards) >= 2
    for p, flags in maps.items():
        assert ("hg" in flags) == (huge and THP_KERNEL), (p, flags)
    ds.close()


def test_pread_mode_maps_nothing(dataset):
    path, payloads = dataset
    ds = packfmt.open(path, mmap=False, huge_pages=True)
    assert ds.get_batch(np.arange(len(payloads))[::-1]) == payloads[::-1]
    assert not [p for p in shard_maps() if p.startswith(os.path.realpath(path))]
    ds.close()


def test_auto_rule():
    gib = 1 << 30
    assert huge_pages_wanted("auto", 8 * gib, memory_bytes=16 * gib)
    assert not huge_pages_wanted("auto", 8 * gib + 1, memory_bytes=16 * gib)
    assert huge_pages_wanted(True, 1 << 50, memory_bytes=1) and not huge_pages_wanted(False, 0, memory_bytes=1 << 40)
    # The default asks this machine: a dataset of a few MiB fits in half of any machine running the tests.
    assert huge_pages_wanted("auto", 4 << 20)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_a_bad_value_is_refused_at_open(dataset, bad):
    with pytest.raises(ValueError, match="huge_pages"):
        packfmt.open(dataset[0], huge_pages=bad)


def test_a_flipped_byte_is_still_caught(dataset, tmp_path):
    """The advice changes how pages are mapped, never which bytes are checked."""
    import shutil
    src, payloads = dataset
    dst = str(tmp_path / "ds")
    shutil.copytree(src, dst)
    ds = packfmt.open(dst, huge_pages=False)
    row = next(i for i, p in enumerate(payloads) if len(p) > 2 << 20)
    shard = ds._paths[int(ds._cols["shard"][row])]
    offset = int(ds._cols["offset"][row]) + (2 << 20) + 5  # inside the record's second 2 MiB page
    ds.close()
    with open(shard, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))
    ds = packfmt.open(dst, huge_pages=True)
    with pytest.raises(packfmt.CorruptShardError, match=os.path.basename(shard)):
        ds[row]
    with pytest.raises(packfmt.CorruptShardError):
        ds.get_batch([0, row])
    ok = [i for i in range(len(payloads)) if i != row]
    assert ds.get_batch(ok) == [payloads[i] for i in ok]
    ds.close()
