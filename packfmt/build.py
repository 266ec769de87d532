"""``pack build``: pack a directory tree into a dataset, with worker processes and a progress bar.

The tree is walked in a deterministic order (names sorted by code point at every level) and the files
are cut into shards of consecutive files, planned up front from the file sizes.  Each shard is written
by one worker; the global index keeps the walk order, whatever the number of workers, so two builds of
the same tree give the same dataset.

Symlinks: a link to a regular file is packed with the target's content under the link's own key; a
link to a directory is not followed (reported as skipped); a dangling link is an unreadable file.
File names must be valid UTF-8 (keys are UTF-8 strings); others are unreadable files too.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import gc
import multiprocessing as mp
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from packfmt import _core
from packfmt import manifest as mf
from packfmt.errors import PackError, PackOSError
from packfmt.writer import (DEFAULT_DICT_SIZE, DEFAULT_SHARD_SIZE, Compression, Encoder, Target, _numeric_array,
                            finish_dataset, index_table, parse_size, train_dictionary)


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class BuildReport:
    files: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    shards: int = 0
    seconds: float = 0.0
    skipped: list = field(default_factory=list)
    manifest: dict | None = None

    @property
    def files_per_second(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else 0.0

    @property
    def ratio(self) -> float:
        return self.output_bytes / self.input_bytes if self.input_bytes else 0.0


class UnreadableFileError(PackOSError):
    """A source file could not be packed; ``--skip-errors`` skips such files instead."""


def _matches(key: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(key, p) or fnmatch.fnmatchcase(key.rsplit("/", 1)[-1], p) for p in patterns)


def walk(src: str, include=(), exclude=(), skip_errors: bool = False):
    """(keys, paths, sizes, skipped) of the regular files under src, in deterministic order.  A file that
    cannot be packed raises UnreadableFileError, or is listed in skipped with ``skip_errors``."""
    keys, paths, sizes, skipped = [], [], [], []

    file_kind, dir_kind, link_dir_kind, error_kind = (_core.ENTRY_FILE, _core.ENTRY_DIR, _core.ENTRY_LINK_DIR,
                                                      _core.ENTRY_ERROR)

    def fail(path: str, code: int, reason: str) -> None:
        if not skip_errors:
            raise UnreadableFileError(code, reason, path)
        skipped.append(Skipped(path, reason))

    def visit(dirpath: str, prefix: str, prefix_utf8: bool = True):
        # One C call lists the directory and stat()s its files relative to it (src/_core.pyx scan_dir);
        # names are sorted as UTF-8 bytes, which is code point order.
        try:
            names, kinds, values = _core.scan_dir(dirpath)
        except OSError as e:
            skipped.append(Skipped(dirpath, f"cannot list directory: {e.strerror}"))
            return
        base = dirpath if dirpath.endswith("/") else dirpath + "/"
        for j in sorted(range(len(names)), key=names.__getitem__):
            raw, kind = names[j], kinds[j]
            try:
                name = raw.decode("utf-8")
                utf8 = prefix_utf8
            except UnicodeDecodeError:
                name = os.fsdecode(raw)
                utf8 = False
            path = base + name
            if kind == dir_kind:
                visit(path, prefix + name + "/", utf8)
                continue
            if kind == link_dir_kind:
                skipped.append(Skipped(path, "symlink to a directory (not followed)"))
                continue
            key = prefix + name
            if include and not _matches(key, include):
                continue
            if exclude and _matches(key, exclude):
                continue
            if not utf8:
                fail(path, 0, "file name is not valid UTF-8")
            elif kind == file_kind:
                keys.append(key)
                paths.append(path)
                sizes.append(values[j])
            elif kind == error_kind:
                err = values[j]
                fail(path, err, "dangling symlink or file vanished" if err == errno.ENOENT else os.strerror(err))
            else:
                skipped.append(Skipped(path, "not a regular file"))

    if not os.path.isdir(src):
        raise PackOSError(2, "source is not a directory", src)
    with _gc_paused():  # the walk only allocates (no cycles); collections would rescan it all, often
        visit(src, "")
    return keys, paths, np.asarray(sizes, dtype=np.int64), skipped


@contextlib.contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def plan_shards(sizes: np.ndarray, shard_size: int, ratio: float = 1.0) -> list:
    """Cut consecutive files into shards: [(start, end), ...] with estimated stored bytes <= shard_size."""
    est = np.ceil(np.asarray(sizes, dtype=np.float64) * ratio).astype(np.int64) + _core.ENTRY_SIZE
    budget = shard_size - _core.HEADER_SIZE - _core.FOOTER_SIZE
    # Greedy: a shard takes files while their estimates add up to at most the budget, and at least one.
    # cum[k] = est[:k].sum(), so shard [a, b) fits when cum[b] - cum[a] <= budget.
    cum = np.zeros(len(est) + 1, dtype=np.int64)
    np.cumsum(est, out=cum[1:])
    plans, start, n = [], 0, len(est)
    while start < n:
        end = int(np.searchsorted(cum, cum[start] + budget, side="right")) - 1
        end = min(max(end, start + 1), n)
        plans.append((start, end))
        start = end
    return plans


# -------------------------------------------------------------------- workers
#: Input a worker must have to itself before ``pack build`` (no ``--workers``) starts another process:
#: forking, and sharing two cores with the rest of the machine, costs more than packing less than this.
MIN_BYTES_PER_WORKER = 64 << 20
#: Files, likewise (opening a file costs about as much as copying 16 KiB).
MIN_FILES_PER_WORKER = 8192
#: Files appended per call into C (the GIL is released for the whole run; the bar moves per run).
APPEND_RUN = 1024

_progress_files = None
_progress_bytes = None
_next_task = None  # shared counter of the next unclaimed task (forked workers and the parent)
_parent_pid = None  # a forked worker stops when this process is gone
_tasks = None  # the build's tasks, set before forking so that workers inherit them unpickled


def _init_worker(files, nbytes, next_task=None, parent_pid=None):
    global _progress_files, _progress_bytes, _next_task, _parent_pid
    _progress_files, _progress_bytes = files, nbytes
    _next_task, _parent_pid = next_task, parent_pid


def _tick(nfiles: int, nbytes: int) -> None:
    if _progress_files is not None:
        with _progress_files.get_lock():
            _progress_files.value += nfiles
        with _progress_bytes.get_lock():
            _progress_bytes.value += nbytes


def _check_parent() -> None:
    """In a forked worker: stop when the build's process is gone (killed), instead of writing on."""
    if _parent_pid is not None and os.getppid() != _parent_pid:
        raise SystemExit(1)


def _claim() -> int:
    with _next_task.get_lock():
        i = _next_task.value
        _next_task.value = i + 1
    return i


def _stop_claims() -> None:
    with _next_task.get_lock():
        _next_task.value = 1 << 62


def _drain() -> list:
    """Build shards until none is left: [(task index, result)].  Run by every forked worker and by the
    parent, each claiming the next task from the shared counter, so a process that finishes early takes
    the next shard instead of idling while another writes two."""
    done = []
    try:
        while True:
            _check_parent()
            i = _claim()
            if i >= len(_tasks):
                return done
            done.append((i, build_shard(_tasks[i])))
    except BaseException:
        _stop_claims()  # the others finish the shard in hand and stop
        raise


def default_workers(total_bytes: int, files: int, shards: int) -> int:
    """Worker processes ``pack build`` uses without ``--workers``: one per CPU this process may run on,
    but no more than there are shards, and only as many as have MIN_BYTES_PER_WORKER or
    MIN_FILES_PER_WORKER of input each (so a small build is never slower for having forked)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    worth = max(total_bytes // MIN_BYTES_PER_WORKER, files // MIN_FILES_PER_WORKER, 1)
    return int(max(1, min(cpus, shards, worth)))


def _worker_main(conn, files, nbytes, next_task, parent_pid) -> None:
    """A forked worker: drain the task list, send [(index, result)] or the exception back."""
    _init_worker(files, nbytes, next_task, parent_pid)
    try:
        msg = ("ok", _drain())
    except BaseException as e:  # noqa: BLE001 -- everything goes to the parent, which raises it
        msg = ("error", e)
    try:
        conn.send(msg)
    except Exception as e:  # an exception that does not pickle: send its text
        conn.send(("error", PackError(f"{type(msg[1]).__name__}: {msg[1]}" if msg[0] == "error" else str(e))))
    finally:
        conn.close()


def _run_forked(tasks: list, nproc: int, bar: "_Progress") -> list:
    """Build the tasks in this process and nproc - 1 forked workers; results in task order.

    The workers inherit the tasks (nothing is pickled on the way in) and everyone claims the next shard
    from a shared counter.  The first error stops further claims, the workers are terminated and the
    error is raised here; a worker that dies without answering is an error too."""
    global _tasks
    ctx = mp.get_context("fork")
    next_task = ctx.Value("q", 0)
    procs = []
    _tasks = tasks
    try:
        for _ in range(nproc - 1):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker_main, args=(w, bar.files, bar.bytes, next_task, os.getpid()),
                            name="packfmt-build", daemon=True)
            p.start()
            w.close()
            procs.append((p, r))
        bar.start()
        _init_worker(bar.files, bar.bytes, next_task)
        try:
            done = _drain()
        finally:
            _init_worker(None, None)
        for p, r in procs:
            try:
                status, value = r.recv()
            except EOFError:
                p.join()
                raise PackError(f"a build worker (pid {p.pid}) died without finishing (exit code {p.exitcode})")
            if status != "ok":
                raise value
            done.extend(value)
            p.join()
    except BaseException:
        with next_task.get_lock():
            next_task.value = 1 << 62
        for p, _ in procs:
            if p.is_alive():
                p.terminate()
            p.join()
        raise
    finally:
        _tasks = None
        for _, r in procs:
            r.close()
    results = [None] * len(tasks)
    for i, res in done:
        results[i] = res
    return results


def _read_file(path: str, expected: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if len(data) != expected:
        raise OSError(0, f"file changed size while being packed ({expected} -> {len(data)} bytes)", path)
    return data


def build_shard(task: dict) -> dict:
    """Write one shard of consecutive files; returns its index columns and shard info."""
    paths, sizes = task["paths"], task["sizes"]
    n = len(paths)
    compression = Compression.parse(task["compression"])
    dictionary = None
    if task["dictionary"] is not None:
        import zstandard
        dictionary = zstandard.ZstdCompressionDict(task["dictionary"])
    encoder = Encoder(compression, dictionary)
    offsets = np.zeros(n, dtype=np.uint64)
    stored = np.zeros(n, dtype=np.uint32)
    raw = np.asarray(sizes, dtype=np.uint32)
    checksums = np.zeros(n, dtype=np.uint64)
    flags = np.zeros(n, dtype=np.uint32)
    ok = np.ones(n, dtype=bool)
    skipped = []
    w = task["target"].open_shard(task["name"], encoder.shard_flags, encoder.dict_id)
    try:
        if compression.codec == "none":
            encoded = [os.fsencode(p) for p in paths]
            listed = np.ascontiguousarray(sizes, dtype=np.int64)
            pos = 0
            while pos < n:
                _check_parent()
                end = min(pos + APPEND_RUN, n)
                try:
                    w.append_files(encoded, pos, offsets, stored, checksums, end, listed)
                    _tick(end - pos, int(raw[pos:end].sum()))
                    pos = end
                except (OSError, ValueError) as e:
                    bad = getattr(e, "position", pos)
                    _tick(bad - pos, int(raw[pos:bad].sum()))
                    if not task["skip_errors"]:
                        raise UnreadableFileError(getattr(e, "errno", 0) or 0, _reason(e), paths[bad]) from None
                    skipped.append(Skipped(paths[bad], _reason(e)))
                    ok[bad] = False
                    pos = bad + 1
        else:
            for i, p in enumerate(paths):
                try:
                    data = _read_file(p, int(sizes[i]))
                except OSError as e:
                    if not task["skip_errors"]:
                        raise UnreadableFileError(e.errno or 0, e.strerror or str(e), p) from None
                    skipped.append(Skipped(p, e.strerror or str(e)))
                    ok[i] = False
                    continue
                body, codec = encoder.encode(data)
                offsets[i], stored[i], checksums[i] = w.append(body, len(data), codec)
                flags[i] = codec
                if i % 64 == 63:
                    _tick(64, int(raw[i - 63: i + 1].sum()))
            _tick(n % 64, int(raw[n - n % 64:].sum()) if n % 64 else 0)
        info = w.close()
    except BaseException:
        w.abort()
        raise
    return {"info": info, "ok": ok, "offset": offsets, "stored_len": stored, "raw_len": raw, "checksum": checksums,
            "flags": flags, "skipped": skipped}


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


class _Progress:
    """A tqdm bar fed from counters that worker processes bump."""

    def __init__(self, total_bytes: int, total_files: int, enabled: bool):
        self.files = mp.Value("q", 0)
        self.bytes = mp.Value("q", 0)
        self.total_files = total_files
        self._bar = None
        self._thread = None
        self._stop = threading.Event()
        if enabled:
            from tqdm import tqdm
            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="packing",
                             dynamic_ncols=True, smoothing=0.1)

    def start(self):
        """Start refreshing the bar (a thread: start it after forking workers, never before)."""
        if self._bar is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _update(self):
        b = self._bar
        b.update(self.bytes.value - b.n)
        b.set_postfix_str(f"{self.files.value:,}/{self.total_files:,} files", refresh=False)

    def _run(self):
        while not self._stop.wait(0.2):
            self._update()

    def close(self):
        if self._bar is not None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._update()
            self._bar.close()


def _estimate_ratio(paths, sizes, encoder: Encoder) -> float:
    if encoder.codec == _core.CODEC_NONE or not len(paths):
        return 1.0
    step = max(1, len(paths) // 200)
    raw = comp = 0
    for i in range(0, len(paths), step):
        try:
            data = _read_file(paths[i], int(sizes[i]))
        except OSError:
            continue
        body, _ = encoder.encode(data)
        raw += len(data)
        comp += len(body)
    return min(1.0, max(0.02, comp / raw)) if raw else 1.0


def _training_samples(paths, sizes, budget: int) -> list:
    if not len(paths):
        return []
    mean = max(1, int(sizes.mean()))
    count = min(len(paths), max(1, budget // mean), 20000)
    picks = np.linspace(0, len(paths) - 1, num=count).astype(np.int64)
    out = []
    for i in np.unique(picks).tolist():
        try:
            out.append(_read_file(paths[i], int(sizes[i])))
        except OSError:
            pass
    return out


def build_dataset(src, dst, *, shard_size=DEFAULT_SHARD_SIZE, compression="none", workers: int | None = None,
                  label_from: str | None = None, include=(), exclude=(), skip_errors: bool = False,
                  overwrite: bool = False, progress: bool = True, dict_size: int = DEFAULT_DICT_SIZE,
                  storage_options: dict | None = None, engine: str = "local", address: str | None = None) -> BuildReport:
    """Pack every regular file under ``src`` into a new dataset at ``dst``; see ``pack build --help``.

    ``engine="ray"`` writes the same planned shards as Ray tasks (``address``: the cluster to join; see
    packfmt/ray.py) and gives the same dataset, sample for sample, as the local worker pool."""
    with _gc_paused():  # a build allocates hundreds of thousands of acyclic objects: nothing to collect
        return _build_dataset(src, dst, shard_size, compression, workers, label_from, include, exclude,
                              skip_errors, overwrite, progress, dict_size, storage_options, engine, address)


def _build_dataset(src, dst, shard_size, compression, workers, label_from, include, exclude, skip_errors,
                   overwrite, progress, dict_size, storage_options, engine, address) -> BuildReport:
    t0 = time.perf_counter()
    shard_size = parse_size(shard_size)
    compression = Compression.parse(compression)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    if label_from not in (None, "parent"):
        raise ValueError(f"label_from must be None or 'parent', got {label_from!r}")
    src = os.fspath(src)
    keys, paths, sizes, skipped = walk(src, include, exclude, skip_errors)
    target = Target(dst, overwrite=overwrite, storage_options=storage_options)
    target.prepare()
    report = BuildReport(skipped=list(skipped))
    pool = None
    bar = None
    try:
        dictionary = None
        if compression.codec == "zstd-dict":
            dictionary = train_dictionary(_training_samples(paths, sizes, 100 * dict_size), dict_size,
                                          compression.level)
        encoder = Encoder(compression, dictionary)
        plans = plan_shards(sizes, shard_size, _estimate_ratio(paths, sizes, encoder))
        dict_bytes = dictionary.as_bytes() if dictionary is not None else None
        names = [mf.shard_name(i) for i in range(len(plans))]
        for name in names:
            target.created(name)
        tasks = [{"target": target, "name": names[i], "paths": paths[a:b], "sizes": sizes[a:b],
                  "compression": str(compression), "dictionary": dict_bytes, "skip_errors": skip_errors}
                 for i, (a, b) in enumerate(plans)]
        total_bytes = int(sizes.sum())
        bar = _Progress(total_bytes, len(paths), progress)
        nproc = min(workers, len(tasks)) if workers else default_workers(total_bytes, len(paths), len(tasks))
        if engine == "ray":
            from packfmt.ray import run_build_tasks
            bar.start()
            _init_worker(bar.files, bar.bytes)
            try:
                results = run_build_tasks(tasks, address=address, progress=_tick)
            finally:
                _init_worker(None, None)
        elif nproc <= 1:
            bar.start()
            _init_worker(bar.files, bar.bytes)
            try:
                results = [build_shard(t) for t in tasks]
            finally:
                _init_worker(None, None)
        elif "fork" in mp.get_all_start_methods():
            results = _run_forked(tasks, nproc, bar)
        else:
            ctx = mp.get_context("spawn")
            pool = ctx.Pool(nproc, initializer=_init_worker, initargs=(bar.files, bar.bytes))
            bar.start()
            results = pool.map(build_shard, tasks, chunksize=1)
            pool.close()
            pool.join()
            pool = None
        bar.close()
        bar = None
        manifest = _assemble(target, keys, plans, results, compression, dictionary, label_from, src)
    except BaseException:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        target.abort()
        raise
    for r in results:
        report.skipped.extend(r["skipped"])
    report.manifest = manifest
    report.files = manifest["samples"]
    report.input_bytes = manifest["stats"]["raw_bytes"]
    report.output_bytes = manifest["stats"]["total_bytes"] + len(mf.dump(manifest))
    report.shards = len(manifest["shards"])
    report.seconds = time.perf_counter() - t0
    return report


def _assemble(target, keys, plans, results, compression, dictionary, label_from, src) -> dict:
    shards = []
    cols = {k: [] for k in ("shard", "offset", "stored_len", "raw_len", "checksum", "flags")}
    kept_keys = []
    for i, ((a, b), r) in enumerate(zip(plans, results)):
        ok = r["ok"]
        info = r["info"]
        shards.append(mf.ShardInfo(name=mf.shard_name(i), size=info["size"], records=info["records"],
                                   checksum=info["checksum"], data_bytes=info["data_bytes"]))
        cols["shard"].append(np.full(int(ok.sum()), i, dtype=np.uint32))
        for k in ("offset", "stored_len", "raw_len", "checksum", "flags"):
            cols[k].append(r[k][ok])
        if ok.all():
            kept_keys.extend(keys[a:b])
        else:
            kept_keys.extend(k for k, good in zip(keys[a:b], ok.tolist()) if good)
    cat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in cols.items()}
    user = {}
    extra = {"source": {"path": os.path.abspath(src)}}
    if label_from == "parent":
        parents = [k.rsplit("/", 1)[0] if "/" in k else "." for k in kept_keys]
        classes = sorted(set(parents))
        lookup = {c: i for i, c in enumerate(classes)}
        user["label"] = _numeric_array([lookup[p] for p in parents], np.int32)
        extra["labels"] = classes
    table = index_table(kept_keys, cat["shard"], cat["offset"], cat["stored_len"],
                        cat["raw_len"], cat["checksum"], cat["flags"], user)
    return finish_dataset(target, shards, table, compression, dictionary, extra)


__all__ = ["build_dataset", "BuildReport", "walk", "plan_shards", "UnreadableFileError", "PackError"]
