"""The main job on an example, end to end: generate a small tree of files, `pack build` it, read it back
(single samples, a random batch, and through a plain loop), `pack verify` it and print `pack ls`.

    python tools/demo.py [WORKDIR]
"""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

import packfmt


def make_tree(root: str, n: int = 2000, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    classes = ["cats", "dogs", "birds"]
    sizes = np.minimum(rng.lognormal(mean=np.log(4096), sigma=0.8, size=n).astype(int), 1 << 20)
    for i, size in enumerate(sizes):
        d = os.path.join(root, classes[i % 3])
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{i:06d}.bin"), "wb") as f:
            f.write(rng.integers(0, 64, size=size, dtype=np.uint8).tobytes())  # compressible, like real data


def run(*args) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def main() -> None:
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="packfmt-demo-")
    src, dst = os.path.join(work, "tree"), os.path.join(work, "dataset")
    shutil.rmtree(src, ignore_errors=True)
    make_tree(src)
    run("pack", "build", src, dst, "--shard-size", "2MiB", "--compression", "zstd", "--label-from", "parent",
        "--overwrite")
    ds = packfmt.open(dst)
    rng = np.random.default_rng(1)
    batch = rng.integers(0, len(ds), size=64)
    for i, data in zip(batch.tolist(), ds.get_batch(batch)):
        with open(os.path.join(src, ds.key(i)), "rb") as f:
            assert f.read() == data, ds.key(i)
    print(f"read back {len(batch)} random samples of {len(ds)}: identical to the source files")
    print(f"sample 0: key={ds.key(0)!r} label={int(ds.column('label')[0])} ({ds.manifest['labels'][0]}) "
          f"{len(ds[0])} bytes")
    run("pack", "verify", dst)
    run("pack", "ls", dst)
    run("pack", "ls", "--shards", dst)


if __name__ == "__main__":
    main()
