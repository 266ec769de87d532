"""Epoch order: which global sample indices a rank reads, in which order.

The order of an epoch is a pure function of ``(n, seed, epoch, mode, ...)``.
Nothing is listed and nothing is stored: every process (rank, DataLoader
worker, a process resumed after a crash) recomputes the same sequence from
those few integers, and a checkpoint is just ``(seed, epoch, consumed)``.

How an epoch is laid out::

    global sequence G      G[0] G[1] ... G[n-1]          (a permutation of [0, n))
    extended to n_total    G[0] ... G[n-1] G[0] G[1] ...  (drop_last=False: pad by wrapping)
                           or truncated to n_total        (drop_last=True)
    rank r reads           positions [r*L, (r+1)*L) of it, L = n_total / world_size
    after resuming at c    positions c, c+1, ... of the rank's part
    worker w of K          batches w, w+K, w+2K, ... of that remainder

Ranks take *contiguous* parts of ``G`` so that ``mode="block"`` keeps its
locality inside each rank.  Workers take interleaved *batches*, which is the
order in which ``torch.utils.data.DataLoader`` collects results from its
workers, so the concatenation of what the loader returns is the rank's part in
order -- whatever the number of workers, which is what makes resumption with a
different worker count exact.

Modes and their memory cost (n samples, per process):

``"global"``  a uniform random permutation (numpy PCG64 Fisher-Yates),
              4 bytes per sample (8 if n >= 2**31), computed once per epoch.
``"feistel"`` a keyed bijection of [0, n) (a 6-round Feistel network on the
              smallest even-bit domain >= n, with cycle walking), evaluated on
              the fly for the positions asked for: O(1) memory, O(1) work per
              sample.  For n so large that an index array per worker hurts.
``"block"``   locality-aware: cut [0, n) into blocks of ``block_size``
              neighbouring samples (never straddling a shard boundary when
              ``shard_boundaries`` is given), shuffle the blocks, then shuffle
              samples inside each window of ``window`` consecutive blocks.  A
              batch then touches about ``window`` byte ranges instead of
              ``batch_size``.  O(n / block_size) memory.
``"none"``    sequential, O(1) memory.

Example::

    >>> from packfmt.shuffle import EpochOrder
    >>> order = EpochOrder(10, seed=1, epoch=0, rank=0, world_size=2)
    >>> len(order)
    5
    >>> other = EpochOrder(10, seed=1, epoch=0, rank=1, world_size=2)
    >>> sorted(list(order) + list(other))
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
"""

from __future__ import annotations

import numpy as np

__all__ = ["EpochOrder", "MODES", "feistel_permute", "make_blocks", "shard_boundaries_of"]

MODES = ("global", "feistel", "block", "none")

_M64 = (1 << 64) - 1
_FEISTEL_ROUNDS = 6
# Distinct salts so that the keys of different modes / uses never coincide.
_SALT = {"global": 0x676C6F62, "feistel": 0x66656973, "blocks": 0x626C6B73, "window": 0x77696E64}
_CHUNK = 1 << 16  # positions materialised at a time by __iter__ / batches


def _keys(seed: int, epoch: int, salt: int, count: int) -> np.ndarray:
    """``count`` uint64 keys derived from (seed, epoch, salt)."""
    ss = np.random.SeedSequence([int(seed) & _M64, int(epoch) & _M64, salt])
    return ss.generate_state(count, dtype=np.uint64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def feistel_permute(x, n: int, keys) -> np.ndarray:
    """Image of ``x`` (array of ints in [0, n)) under a keyed bijection of [0, n).

    A balanced Feistel network on ``2 * half`` bits (the smallest even bit
    count with ``2**(2*half) >= n``) is a bijection of that domain; cycle
    walking (re-applying it while the result is >= n) restricts it to a
    bijection of [0, n).  The domain is < 4n, so on average fewer than 4
    applications are needed, and each is a handful of vectorised numpy ops.

    >>> k = _keys(0, 0, 1, _FEISTEL_ROUNDS)
    >>> sorted(feistel_permute(np.arange(7), 7, k).tolist())
    [0, 1, 2, 3, 4, 5, 6]
    """
    x = np.asarray(x, dtype=np.uint64)
    if n <= 1:
        return x.astype(np.int64)
    bits = max(2, int(n - 1).bit_length())
    bits += bits & 1
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = np.asarray(keys, dtype=np.uint64)
    un = np.uint64(n)

    def once(v):
        left = v >> half
        right = v & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << half) | right

    out = once(x)
    todo = np.flatnonzero(out >= un)
    while todo.size:
        walked = once(out[todo])
        out[todo] = walked
        todo = todo[walked >= un]
    return out.astype(np.int64)


def make_blocks(n: int, block_size: int, shard_boundaries=None) -> np.ndarray:
    """Start index of every block; a sentinel ``n`` is appended.

    Blocks are runs of ``block_size`` neighbouring global indices.  With
    ``shard_boundaries`` (the first global index of each shard, as from
    :func:`shard_boundaries_of`) a new block also starts at every boundary, so no
    block straddles two shards.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if shard_boundaries is None or n == 0:
        starts = np.arange(0, n, block_size, dtype=np.int64)
    else:
        b = np.asarray(shard_boundaries, dtype=np.int64).ravel()
        b = np.unique(np.concatenate([[0], b[(b > 0) & (b < n)]]))
        ends = np.append(b[1:], n)
        counts = -(-(ends - b) // block_size)
        # start of shard s, then every block_size inside it
        first = np.repeat(b, counts)
        within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        starts = first + within * block_size
    return np.append(starts, np.int64(n))


def shard_boundaries_of(shard_of) -> np.ndarray:
    """First global index of each shard, from a per-sample shard number array
    (``Dataset.shard_of``; samples are stored shard by shard)."""
    s = np.asarray(shard_of)
    if s.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([[0], np.flatnonzero(s[1:] != s[:-1]) + 1]).astype(np.int64)


class EpochOrder:
    """The global indices one rank reads in one epoch.

    Parameters
    ----------
    n : number of samples in the dataset.
    seed, epoch : the order is a pure function of these (and the options).
    rank, world_size : this rank's contiguous, equal-length part of the epoch.
    mode : ``"global"`` | ``"feistel"`` | ``"block"`` | ``"none"`` (see module doc).
    block_size, window : for ``mode="block"``: samples per block, blocks per
        mixing window.
    drop_last : ``True``: drop the last ``n % world_size`` samples of the
        shuffled sequence so ranks get ``n // world_size`` each; ``False``
        (default): pad by wrapping around to the start of the shuffled
        sequence so ranks get ``ceil(n / world_size)`` each (the same
        convention as ``torch.utils.data.DistributedSampler``).
    shard_boundaries : optional first index of each shard (block mode aligns
        blocks to them).

    >>> o = EpochOrder(8, seed=3, epoch=1, mode="block", block_size=2, window=2)
    >>> sorted(o.indices().tolist())
    [0, 1, 2, 3, 4, 5, 6, 7]
    >>> [len(b) for b in o.batches(3, start=2)]
    [3, 3]
    """

    def __init__(self, n, seed=0, epoch=0, rank=0, world_size=1, mode="global", *,
                 block_size=64, window=16, drop_last=False, shard_boundaries=None):
        n = int(n)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        world_size = int(world_size)
        rank = int(rank)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if int(window) < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.n = n
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.rank = rank
        self.world_size = world_size
        self.mode = mode
        self.block_size = int(block_size)
        self.window = int(window)
        self.drop_last = bool(drop_last)
        if drop_last or n == 0:
            self.num_samples = n // world_size
        else:
            self.num_samples = -(-n // world_size)
        self.total_size = self.num_samples * world_size
        self._perm = None
        self._blocks = None
        if mode == "block":
            self._setup_blocks(shard_boundaries)
        elif mode == "feistel":
            self._fkeys = _keys(self.seed, self.epoch, _SALT["feistel"], _FEISTEL_ROUNDS)

    # -- the global sequence G of this epoch ---------------------------------

    def _setup_blocks(self, shard_boundaries):
        starts = make_blocks(self.n, self.block_size, shard_boundaries)
        sizes = np.diff(starts)
        nb = sizes.size
        rng = np.random.Generator(np.random.PCG64(_keys(self.seed, self.epoch, _SALT["blocks"], 4)))
        order = rng.permutation(nb)
        self._bstart = starts[:-1][order]          # start of the k-th block in epoch order
        self._bsize = sizes[order]
        self._bcum = np.concatenate([[0], np.cumsum(self._bsize)])  # position of k-th block in G
        self._wkey = _keys(self.seed, self.epoch, _SALT["window"], 1)[0]

    def _global_range(self, a: int, b: int) -> np.ndarray:
        """G[a:b] for 0 <= a <= b <= n, as int64."""
        if a >= b:
            return np.zeros(0, dtype=np.int64)
        if self.mode == "none":
            return np.arange(a, b, dtype=np.int64)
        if self.mode == "global":
            if self._perm is None:
                dtype = np.int32 if self.n < 2**31 else np.int64
                perm = np.arange(self.n, dtype=dtype)
                np.random.Generator(np.random.PCG64(_keys(self.seed, self.epoch, _SALT["global"], 4))).shuffle(perm)
                self._perm = perm
            return self._perm[a:b].astype(np.int64)
        if self.mode == "feistel":
            return feistel_permute(np.arange(a, b, dtype=np.uint64), self.n, self._fkeys)
        return self._block_range(a, b)

    def _block_range(self, a: int, b: int) -> np.ndarray:
        w = self.window
        cum = self._bcum
        # blocks k0..k1-1 cover positions [a, b); widen to whole windows
        k0 = int(np.searchsorted(cum, a, side="right")) - 1
        k1 = int(np.searchsorted(cum, b, side="left"))
        k0 = (k0 // w) * w
        k1 = min(-(-k1 // w) * w, self._bsize.size)
        sizes = self._bsize[k0:k1]
        starts = self._bstart[k0:k1]
        total = int(sizes.sum())
        # the samples of those blocks, block after block
        first = np.repeat(starts - (np.cumsum(sizes) - sizes), sizes)
        idx = first + np.arange(total, dtype=np.int64)
        # shuffle inside each window: sort by (window, keyed hash of the index)
        win = np.repeat((np.arange(k0, k1, dtype=np.int64) - k0) // w, sizes).astype(np.uint64)
        h = _mix64(idx.astype(np.uint64) ^ (self._wkey + (win + np.uint64(k0 // w)) * np.uint64(0x9E3779B97F4A7C15)))
        # one sort on (window, hash) packed into a uint64: the window number in
        # the high bits, the top bits of the hash below it (ties, vanishingly
        # rare, keep index order -- still a permutation)
        shift = np.uint64(64 - max(1, int(win[-1]).bit_length()))
        key = (win << shift) | (h >> np.uint64(64 - int(shift)))
        idx = idx[np.argsort(key, kind="stable")]
        base = int(cum[k0])
        return idx[a - base:b - base]

    def global_indices(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Positions ``[start, stop)`` of the epoch's whole (padded or truncated)
        sequence, all ranks together; ``stop`` defaults to ``total_size``."""
        stop = self.total_size if stop is None else min(int(stop), self.total_size)
        start = max(0, int(start))
        if start >= stop:
            return np.zeros(0, dtype=np.int64)
        if stop <= self.n:
            return self._global_range(start, stop)
        parts = []
        p = start
        while p < stop:  # padding wraps around to the start of G
            q = p % self.n
            take = min(stop - p, self.n - q)
            parts.append(self._global_range(q, q + take))
            p += take
        return np.concatenate(parts)

    # -- this rank's part ------------------------------------------------------

    def __len__(self) -> int:
        return self.num_samples

    def indices(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Global indices at positions ``[start, stop)`` of this rank's part
        (int64 array)."""
        stop = self.num_samples if stop is None else min(int(stop), self.num_samples)
        start = max(0, int(start))
        base = self.rank * self.num_samples
        return self.global_indices(base + start, base + max(start, stop))

    def __iter__(self):
        for a in range(0, self.num_samples, _CHUNK):
            yield from self.indices(a, a + _CHUNK).tolist()

    def batches(self, batch_size: int, start: int = 0, worker_id: int = 0, num_workers: int = 1,
                drop_last: bool = False):
        """Batches (int64 arrays) of this rank's part from position ``start`` on,
        cut every ``batch_size`` positions counting from ``start``; worker
        ``worker_id`` of ``num_workers`` gets batches ``worker_id``,
        ``worker_id + num_workers``, ...  ``drop_last`` drops a final short batch.
        """
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(start) < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if not 0 <= worker_id < num_workers:
            raise ValueError(f"need 0 <= worker_id < num_workers, got {worker_id}, {num_workers}")
        end = self.num_samples
        step = batch_size * num_workers
        # fetch several of this worker's batches per call to amortise the setup
        per_call = max(1, _CHUNK // step)
        a = int(start) + worker_id * batch_size
        while a < end:
            group_end = min(end, a + per_call * step)
            span = self.indices(a, group_end)
            for off in range(0, span.size, step):
                batch = span[off:off + batch_size]
                if drop_last and batch.size < batch_size:
                    return
                yield batch
            a += per_call * step

    def state_dict(self, consumed: int) -> dict:
        """The whole resumable state: ``{"seed", "epoch", "consumed"}``."""
        return {"seed": self.seed, "epoch": self.epoch, "consumed": int(consumed)}

    def __repr__(self):
        return (f"EpochOrder(n={self.n}, seed={self.seed}, epoch={self.epoch}, rank={self.rank}, "
                f"world_size={self.world_size}, mode={self.mode!r}, num_samples={self.num_samples})")
