"""Shared helpers for the packfmt benchmark scripts.

What lives here: the synthetic dataset (a tree of small files with log-normal sizes, generated
deterministically and cached across runs), packing it, keeping the page cache warm, counting
page-cache misses (``pgpgin`` from ``/proc/vmstat``), best-of-N timing, the machine description,
compiling the C baselines, and writing a table into a section of ``docs/benchmarks.md``.

Why the page-cache care: on the benchmark VM the kernel (DAMON reclaim) evicts file pages that sit
idle for about 30 s, and the disk is slow.  A figure taken on a cold cache measures the disk, not
the code.  So every measurement warms the files it is about to read right before it runs, and
reports how many KiB the kernel paged in from disk *during* the timed part: 0 (or a few KiB of
unrelated system noise) means the figure is a memory figure.

Import from a script in this folder with ``from common import ...`` (the scripts put their own
folder on ``sys.path``) or as ``benchmarks.common`` from the repository root.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_CACHE = "/tmp/packfmt-bench"

# ---------------------------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class TreeSpec:
    """A synthetic tree of small files.  Same spec -> same bytes, on any machine."""

    files: int = 200_000
    seed: int = 0
    median: int = 4096          # median file size, bytes
    sigma: float = 1.0          # sigma of log(size): p10 ~1.1 KiB, p90 ~14.7 KiB, mean ~6.8 KiB
    min_size: int = 16
    max_size: int = 1 << 20
    classes: int = 256          # files are spread over this many sub-directories ("class_007/...")

    @property
    def name(self) -> str:
        return f"tree-n{self.files}-s{self.seed}-m{self.median}-g{self.sigma:g}"


def _content_pool(rng: np.random.Generator, size: int = 64 << 20) -> np.ndarray:
    """Bytes to cut files from: alternating 64 KiB runs of random bytes (like JPEG/PNG payloads,
    incompressible) and word-like text (compresses ~3x), so zstd figures mean something."""
    pool = np.empty(size, dtype=np.uint8)
    run = 64 << 10
    letters = np.frombuffer(b"etaoinshrdlucmfwypvbgkjqxz      ,.\n", dtype=np.uint8)
    p = 1.0 / np.arange(1, len(letters) + 1) ** 0.9
    p /= p.sum()
    for start in range(0, size, run):
        end = min(start + run, size)
        if (start // run) % 2 == 0:
            pool[start:end] = rng.integers(0, 256, end - start, dtype=np.uint8)
        else:
            pool[start:end] = rng.choice(letters, end - start, p=p)
    return pool


def tree_layout(spec: TreeSpec):
    """(relative paths, sizes, pool offsets, pool) of the tree, all deterministic from spec."""
    rng = np.random.default_rng(spec.seed)
    sizes = rng.lognormal(mean=np.log(spec.median), sigma=spec.sigma, size=spec.files)
    sizes = np.clip(sizes, spec.min_size, spec.max_size).astype(np.int64)
    classes = rng.integers(0, spec.classes, spec.files)
    pool = _content_pool(rng)
    offsets = rng.integers(0, len(pool) - spec.max_size, spec.files)
    paths = [f"class_{int(c):03d}/{i:07d}.bin" for i, c in enumerate(classes.tolist())]
    return paths, sizes, offsets, pool


def ensure_tree(cache: str, spec: TreeSpec, log=print) -> str:
    """Create (once) the tree under cache; return its root.  A finished tree has a stamp file next
    to it (not inside: the tree is packed as is)."""
    root = os.path.join(cache, spec.name)
    stamp = root + ".json"
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f).get("spec") == asdict(spec):
                return root
    if os.path.exists(root):
        shutil.rmtree(root)
    log(f"generating {spec.files:,} files under {root} (once; reused by later runs) ...")
    t0 = time.perf_counter()
    paths, sizes, offsets, pool = tree_layout(spec)
    made = set()
    for rel, size, off in zip(paths, sizes.tolist(), offsets.tolist()):
        d = os.path.dirname(rel)
        if d not in made:
            os.makedirs(os.path.join(root, d), exist_ok=True)
            made.add(d)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(pool[off: off + size].data)
    os.makedirs(cache, exist_ok=True)
    with open(stamp, "w") as f:
        json.dump({"spec": asdict(spec), "bytes": int(sizes.sum())}, f)
    log(f"  {spec.files:,} files, {sizes.sum() / 2**20:,.0f} MiB in {time.perf_counter() - t0:.1f} s")
    return root


def tree_files(root: str, spec: TreeSpec) -> list:
    """Absolute paths of the tree's files, in generation order."""
    return [os.path.join(root, rel) for rel in tree_layout(spec)[0]]


def have_pack_build() -> bool:
    """True once the `pack build` command is available in this checkout."""
    try:
        import packfmt.build  # noqa: F401
    except Exception:
        return False
    return shutil.which("pack") is not None


def pack_build_cmd(src: str, dst: str, compression: str, workers: int | None = None) -> list:
    cmd = ["pack", "build", src, dst, "--compression", compression]
    if workers:
        cmd += ["--workers", str(workers)]
    return cmd


def ensure_dataset(cache: str, spec: TreeSpec, tree_root: str, compression: str, log=print) -> str:
    """Pack the tree (once per compression) with `pack build`, or with packfmt.Writer while `pack
    build` does not exist yet; a dataset made by the Writer is rebuilt once `pack build` exists."""
    dst = os.path.join(cache, f"{spec.name}.{compression.replace(':', '_')}.pack")
    stamp = dst + ".json"
    builder = "pack build" if have_pack_build() else "packfmt.Writer"
    if os.path.exists(stamp) and os.path.exists(os.path.join(dst, "manifest.json")):
        with open(stamp) as f:
            st = json.load(f)
        if st.get("spec") == asdict(spec) and st.get("builder") == builder:
            return dst
    if os.path.exists(dst):
        shutil.rmtree(dst)
    log(f"packing {tree_root} -> {dst} (compression {compression}, with {builder}) ...")
    t0 = time.perf_counter()
    if builder == "pack build":
        r = subprocess.run(pack_build_cmd(tree_root, dst, compression), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        if r.returncode:
            raise RuntimeError(f"pack build failed ({r.returncode}):\n{r.stdout[-4000:]}")
    else:
        import packfmt
        rels = sorted(tree_layout(spec)[0])
        with packfmt.Writer(dst, compression=compression) as w:
            for rel in rels:
                with open(os.path.join(tree_root, rel), "rb") as f:
                    w.add(rel, f.read())
    with open(stamp, "w") as f:
        json.dump({"spec": asdict(spec), "builder": builder, "compression": compression}, f)
    log(f"  done in {time.perf_counter() - t0:.1f} s")
    return dst


def dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            total += os.lstat(os.path.join(dirpath, n)).st_size
    return total


# ---------------------------------------------------------------------------------- page cache


def pgpgin_kib() -> int:
    """KiB the kernel has paged in from block devices since boot (system-wide)."""
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("pgpgin "):
                return int(line.split()[1])
    return 0


def own_disk_read_kib() -> int:
    """KiB this process, its threads and its reaped children caused to be read from block devices
    (``read_bytes`` of /proc/self/io; the kernel counts it where it counts pgpgin, but per process).
    Unlike pgpgin it is blind to other users' I/O, so it tells whether *this* measurement missed
    the page cache.  -1 when the kernel has no per-task I/O accounting."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return -1


_WARM_BUF = bytearray(4 << 20)


def warm_files(paths) -> tuple:
    """Read every file once so it is in the page cache; returns (bytes, seconds, pgpgin KiB).
    The pgpgin figure says how much of it had been evicted."""
    t0 = time.perf_counter()
    k0 = pgpgin_kib()
    buf = memoryview(_WARM_BUF)
    total = 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            while True:
                n = os.readv(fd, [buf])
                total += n
                if n < len(buf):
                    break
        finally:
            os.close(fd)
    return total, time.perf_counter() - t0, pgpgin_kib() - k0


def evict_files(paths) -> None:
    """Drop the files' clean pages from the page cache (``posix_fadvise(DONTNEED)``; pages some
    process maps stay).  A benchmark starts from here when the *shape* of the cache matters, not just
    its contents: see :func:`warm_dataset_files`."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_dataset_files(paths) -> tuple:
    """:func:`warm_files` for a packfmt dataset's files, the shards brought in the way packfmt's reader
    brings them: through a map advised to use 2 MiB pages (``MADV_HUGEPAGE``, as ``packfmt.open``
    does by default for a dataset that fits in half the memory), touched once per 4 KiB.  Pages the
    kernel evicted come back as 2 MiB page-cache folios where the kernel and file system allow it, as
    after a first epoch of packfmt reads; any reader mapping the shards afterwards (the C limits too)
    maps them with 2 MiB entries.  Pages already cached stay as they are.  Returns (bytes, seconds,
    pgpgin KiB)."""
    import mmap
    shards = [p for p in paths if p.endswith(".pack")]
    total, secs, paged = warm_files([p for p in paths if not p.endswith(".pack")])
    t0, k0 = time.perf_counter(), pgpgin_kib()
    for p in shards:
        size = os.path.getsize(p)
        if not size:
            continue
        with open(p, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
            if hasattr(mmap, "MADV_HUGEPAGE"):
                try:
                    m.madvise(mmap.MADV_HUGEPAGE)
                except OSError:
                    pass
            view = np.frombuffer(m, dtype=np.uint8)
            int(view[::4096].sum())  # one load per page: faults the file in
            del view
        total += size
    return total, secs + time.perf_counter() - t0, paged + pgpgin_kib() - k0


def pmd_mapped_kib(paths) -> int:
    """KiB of the given files this process maps with PMD (2 MiB) entries, from /proc/self/smaps."""
    wanted, total, current = set(os.path.realpath(p) for p in paths), 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s+(.*)$", line)
            if m:
                current = m.group(1).strip()
            elif line.startswith("FilePmdMapped:") and current in wanted:
                total += int(line.split()[1])
    return total


def readdir_order(root: str) -> list:
    """Every file under root in the order `tar cf` (no --sort) reads them: directory entries as the
    file system returns them, depth first.  Warming in the order the consumer reads keeps the time
    between a file's warm-up and its use short, so the kernel has no time to evict it."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        out.extend(os.path.join(dirpath, f) for f in filenames)
    return out


def dataset_files(ds_dir: str) -> list:
    """Every file of a packfmt dataset directory (shards, index, manifest, dictionary)."""
    return [os.path.join(ds_dir, n) for n in sorted(os.listdir(ds_dir))
            if os.path.isfile(os.path.join(ds_dir, n))]


# ---------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    best: float          # seconds, best repetition (wall clock)
    median: float        # seconds, median repetition (wall clock)
    reps: int
    pgpgin: int          # KiB paged in from disk during the timed repetitions (all of them)
    warm_pgpgin: int = 0  # KiB paged in while warming right before (what had been evicted)
    best_cpu: float = 0.0  # seconds of CPU time of the measuring thread, best repetition: on a shared,
    #                        busy machine this moves much less than wall time when others take the CPU
    own_read: int = 0      # KiB this process (and reaped children) read from disk during the timed reps


def best_of(fn, reps: int, warm=None, warmup: int = 1) -> Timing:
    """Run fn() warmup times untimed, then reps times timed.  warm() (untimed; returns the KiB it
    paged in) runs first and again before every timed repetition, so that no page can have sat idle
    long enough to be evicted when it is read."""
    warm_in = 0
    if warm is not None:
        warm_in += warm()
    for _ in range(warmup):
        fn()
    times, cpu, paged, own = [], [], 0, 0
    for _ in range(reps):
        if warm is not None:
            warm_in += warm()
        k0, o0 = pgpgin_kib(), own_disk_read_kib()
        c0 = time.thread_time()
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        cpu.append(time.thread_time() - c0)
        paged += pgpgin_kib() - k0
        own += own_disk_read_kib() - o0
        times.append(t)
    times.sort()
    return Timing(times[0], times[len(times) // 2], reps, paged, warm_in or 0, min(cpu), own)


# ---------------------------------------------------------------------------------- C baselines


def compile_c(source: str, out_dir: str | None = None, extra_sources=(), flags=("-O2",)) -> str:
    """Compile a C benchmark helper with gcc into a temporary directory; return the binary's path."""
    out_dir = out_dir or tempfile.mkdtemp(prefix="packfmt-bench-c-")
    exe = os.path.join(out_dir, os.path.splitext(os.path.basename(source))[0])
    cmd = ["gcc", *flags, "-Wall", "-Wextra", "-I", os.path.join(REPO, "src_c"), "-o", exe, source,
           *extra_sources]
    subprocess.run(cmd, check=True)
    return exe


# ---------------------------------------------------------------------------------- machine + tables


def machine_info() -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load": os.getloadavg(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def describe_machine(info: dict) -> str:
    la = ", ".join(f"{x:.2f}" for x in info["load"])
    return (f"{info['nproc']} CPUs ({info['cpu']}), {info['ram_gib']} GiB RAM, Linux {info['kernel']}, "
            f"Python {info['python']}; load average at start {la}")


def markdown_table(headers, rows, align=None) -> str:
    """A GitHub-flavoured markdown table; align is a string of 'l'/'r' per column."""
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(headers)]

    def line(vals):
        out = []
        for v, w, a in zip(vals, widths, align):
            out.append(v.rjust(w) if a == "r" else v.ljust(w))
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def fmt_rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def update_markdown_section(path: str, name: str, title: str, body: str) -> None:
    """Put body between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in path, keeping everything
    else (other benchmarks' sections, hand-written commentary) intact.  A missing section is appended
    under ``## title``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    if begin in text and end in text:
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        if not text:
            text = "# packfmt benchmarks\n\nOne section per benchmark script in `benchmarks/`.\n"
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{block}\n"
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
