"""Remote reads never return wrong bytes: a shard whose bytes changed on the server is caught by the
record checksums, whether or not the page cache sits in between, and the error names shard and offset."""

import os

import pytest

import packfmt
from packfmt.cache import PageCache


def _dataset(path, n=40):
    payloads = [os.urandom(100 + 37 * i) for i in range(n)]
    with packfmt.Writer(path, shard_size="2KiB", compression="none") as w:
        for i, p in enumerate(payloads):
            w.add(f"k{i:03d}", p)
    return payloads


@pytest.mark.parametrize("cached", [False, True])
def test_persistently_corrupt_remote_shard_raises(http_dir, tmp_path, cached):
    local, url = http_dir
    payloads = _dataset(os.path.join(local, "ds"))
    ds = packfmt.open(os.path.join(local, "ds"))
    victim = 7
    shard = os.path.join(local, "ds", ds.shards[int(ds.shard_of[victim])])
    off = int(ds.offsets[victim])
    with open(shard, "r+b") as f:  # the server now serves a flipped byte, every time
        f.seek(off + 5)
        b = f.read(1)
        f.seek(off + 5)
        f.write(bytes([b[0] ^ 0xFF]))
    cache = PageCache(str(tmp_path / "cache"), capacity="16MiB", block_size=64 << 10) if cached else False
    remote = packfmt.open(url + "/ds", cache=cache)
    with pytest.raises(packfmt.CorruptShardError) as ei:
        remote.get_batch([3, victim, 11])
    msg = str(ei.value)
    assert os.path.basename(shard) in msg and f"offset {off}" in msg and f"sample {victim}" in msg
    assert ei.value.sample == victim and ei.value.offset == off
    # samples in other blocks/records still read, and right
    others = [i for i in range(len(payloads)) if int(ds.shard_of[i]) != int(ds.shard_of[victim])]
    assert remote.get_batch(others) == [payloads[i] for i in others]
