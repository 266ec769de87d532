# Bindings of the node-local page cache (src_c/pagecache.h).  Included at the end of _core.pyx.
# A thin layer: packfmt/cache.py orchestrates lookups, fetches and waits.  Every call that can touch
# the index lock, the disk or a wait runs with the GIL released.
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.errno cimport EDQUOT, EINVAL, EIO, ENOSPC, ESTALE
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc

from packfmt.includes.pagecache cimport *

import os as _pc_os

PAGECACHE_LAYOUT_VERSION = PK_PC_LAYOUT_VERSION
PAGECACHE_CHUNK = PK_PC_CHUNK
PAGECACHE_MIN_BLOCK = PK_PC_MIN_BLOCK
PAGECACHE_MAX_BLOCK = PK_PC_MAX_BLOCK
PAGECACHE_DEFAULT_BLOCK = PK_PC_DEFAULT_BLOCK
PAGECACHE_DEFAULT_CAPACITY = PK_PC_DEFAULT_CAPACITY
PAGECACHE_LABEL_MAX = PK_PC_LABEL_MAX
PC_READY = PK_PC_READY
PC_CLAIMED = PK_PC_CLAIMED
PC_BUSY = PK_PC_BUSY
PC_NOSPACE = PK_PC_NOSPACE
PC_STALE = PK_PC_STALE
PC_CORRUPT = PK_PC_CORRUPT
PC_MISS = PK_PC_MISS
PC_MISMATCH = PK_PC_MISMATCH


cdef int _pc_check(int rc, str what) except -1:
    """Negative errno -> OSError; outcomes (>= 0) pass through."""
    if rc < 0:
        raise OSError(-rc, _pc_os.strerror(-rc), what)
    return rc


def pagecache_plan(ranges, int64_t block_size, int64_t object_size, str object_name):
    """Split (offset, length) ranges of an object into per-block pieces.

    Returns (results, pieces, multi): results has b"" for empty ranges and None elsewhere; pieces
    maps block number -> [(range index, offset in block, length, offset in range)]; multi maps the
    index of each range spanning several blocks to a bytearray it is assembled in."""
    cdef Py_ssize_t ri, nr = len(ranges)
    cdef int64_t off, n, b, b0, b1, s, e
    cdef list results = [None] * nr
    cdef dict pieces = {}
    cdef dict multi = {}
    cdef list lst
    for ri in range(nr):
        off, n = ranges[ri]
        if off < 0 or n < 0 or off > object_size or n > object_size - off:
            raise ValueError(f"range ({off}, {n}) outside {object_name!r} ({object_size} bytes)")
        if n == 0:
            results[ri] = b""
            continue
        b0 = off // block_size
        b1 = (off + n - 1) // block_size
        if b0 != b1:
            multi[ri] = bytearray(n)
        for b in range(b0, b1 + 1):
            s = max(off, b * block_size)
            e = min(off + n, (b + 1) * block_size)
            lst = pieces.get(b)
            if lst is None:
                lst = pieces[b] = []
            lst.append((ri, s - b * block_size, e - s, s - off))
    return results, pieces, multi


cdef class PageCacheRecords:
    """The records of a dataset's remote shards as batch reads through the page cache see them: each
    shard's block-key seeds and size (``namespace`` must identify the dataset's content), and the index
    columns that locate every sample -- shard, offset, stored length, XXH3-64 checksum -- kept alive and
    read in place.  Plain memory: survives fork; not picklable (build one per process)."""
    cdef pk_pc_object *objs
    cdef size_t nobjs
    cdef const uint32_t *shard
    cdef const uint64_t *offset
    cdef const uint32_t *stored_len
    cdef const uint64_t *checksum
    cdef readonly uint64_t nrows
    cdef readonly list names
    cdef object _keep

    def __cinit__(self, str namespace, list names, sizes, const uint32_t[::1] shard,
                  const uint64_t[::1] offset, const uint32_t[::1] stored_len, const uint64_t[::1] checksum):
        cdef Py_ssize_t i, n = len(names)
        cdef bytes ns = namespace.encode("utf-8", "surrogatepass")
        cdef bytes obj
        self.objs = NULL
        if len(sizes) != n:
            raise ValueError("one size per shard name")
        if offset.shape[0] != shard.shape[0] or stored_len.shape[0] != shard.shape[0] or \
                checksum.shape[0] != shard.shape[0]:
            raise ValueError("index columns differ in length")
        self.objs = <pk_pc_object *>malloc((n if n else 1) * sizeof(pk_pc_object))
        if self.objs == NULL:
            raise MemoryError()
        self.nobjs = n
        self.names = [str(x) for x in names]
        for i in range(n):
            if sizes[i] < 0:
                raise ValueError(f"{self.names[i]}: negative size")
            obj = self.names[i].encode("utf-8", "surrogatepass")
            pk_pc_object_make(&self.objs[i], ns, len(ns), obj, len(obj), <uint64_t>sizes[i])
        self._keep = (shard, offset, stored_len, checksum)
        self.nrows = shard.shape[0]
        self.shard = &shard[0] if self.nrows else NULL
        self.offset = &offset[0] if self.nrows else NULL
        self.stored_len = &stored_len[0] if self.nrows else NULL
        self.checksum = &checksum[0] if self.nrows else NULL

    def __dealloc__(self):
        free(self.objs)

    def __reduce__(self):
        raise TypeError("PageCacheRecords is per process: build a new one instead of pickling it")

    cdef int fill(self, pk_pc_record *r, int64_t row) except -1:
        if row < 0 or <uint64_t>row >= self.nrows:
            raise IndexError(f"sample index {row} out of range for {self.nrows} samples")
        r.object = self.shard[row]
        r.offset = self.offset[row]
        r.len = self.stored_len[row]
        r.checksum = self.checksum[row]
        r.dst = NULL
        r.status = 0
        return 0


cdef class PageCacheTicket:
    """The outcome of a lookup: a status (PC_READY, PC_CLAIMED, ...) and the slot it refers to."""
    cdef pk_pc_ticket t
    cdef readonly int status
    cdef readonly uint64_t block

    @property
    def slot(self):
        return self.t.slot

    @property
    def length(self):
        return self.t.length

    def __repr__(self):
        return f"PageCacheTicket(status={self.status}, block={self.block}, slot={self.t.slot}, length={self.t.length})"


cdef class PageCacheHandle:
    """One process's handle on the cache files in `directory` (low level; see packfmt.cache)."""
    cdef pk_pagecache *pc
    cdef readonly str directory
    cdef readonly uint64_t block_size
    cdef readonly uint64_t nslots
    cdef readonly uint64_t capacity

    def __cinit__(self, directory, uint64_t capacity, uint64_t block_size, bint adopt=False):
        cdef pk_pagecache *pc = NULL
        cdef pk_pc_counters st
        cdef int rc
        cdef int flags = PK_PC_ADOPT if adopt else 0
        cdef bytes path = _pc_os.fsencode(directory)
        cdef const char *p = path
        self.pc = NULL
        self.directory = _pc_os.fsdecode(path)
        with nogil:
            rc = pk_pc_open(p, capacity, block_size, flags, &pc)
        _pc_check(rc, f"opening the page cache in {self.directory}")
        self.pc = pc
        with nogil:
            rc = pk_pc_stats(pc, &st)
        _pc_check(rc, "reading page cache stats")
        self.block_size = st.block_size
        self.nslots = st.nslots
        self.capacity = st.capacity

    def __dealloc__(self):
        if self.pc != NULL:
            pk_pc_close(self.pc)
            self.pc = NULL

    def close(self):
        """Unmap and close.  Not to be called while other threads use the handle."""
        if self.pc != NULL:
            pk_pc_close(self.pc)
            self.pc = NULL

    cdef pk_pagecache *_get(self) except NULL:
        if self.pc == NULL:
            raise ValueError("page cache handle is closed")
        return self.pc

    def lookup(self, bytes ns, bytes obj, uint64_t block, uint64_t length, bytes label):
        """Find block `block` of (ns, obj), or claim it.  Returns a PageCacheTicket."""
        cdef pk_pagecache *pc = self._get()
        cdef PageCacheTicket t = PageCacheTicket.__new__(PageCacheTicket)
        cdef pk_pc_key key
        cdef const char *n = ns
        cdef const char *o = obj
        cdef const char *l = label
        cdef size_t nl = len(ns), ol = len(obj), ll = len(label)
        cdef int rc
        with nogil:
            pk_pc_key_make(&key, n, nl, o, ol, block)
            rc = pk_pc_lookup(pc, &key, length, l, ll, &t.t)
        t.status = _pc_check(rc, "page cache lookup")
        t.block = block
        return t

    def copy(self, PageCacheTicket t, uint64_t off, uint64_t length):
        """Bytes [off, off+length) of a READY block, verified; None if it went stale or corrupt
        (t.status then says which) -- look it up again."""
        cdef pk_pagecache *pc = self._get()
        cdef bytes out = PyBytes_FromStringAndSize(NULL, length)
        cdef char *dst = PyBytes_AS_STRING(out)
        cdef int rc
        with nogil:
            rc = pk_pc_copy(pc, &t.t, off, length, dst)
        if _pc_check(rc, "page cache read"):
            t.status = rc
            return None
        return out

    def serve(self, PageCacheTicket t, list plist, list results, dict multi):
        """Copy every piece of pagecache_plan()'s list for t's block into place (one lock trip):
        a new bytes object in results[ri] for a range within the block, else into multi[ri].
        Returns True, or False (t.status says why) if the block went stale or corrupt."""
        cdef pk_pagecache *pc = self._get()
        cdef Py_ssize_t i, n = len(plist)
        cdef pk_pc_piece *pieces
        cdef list outs = [None] * n
        cdef int64_t boff, ln, roff
        cdef bytes b
        cdef int rc
        if n == 0:
            return True
        pieces = <pk_pc_piece *>malloc(n * sizeof(pk_pc_piece))
        if pieces == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                ri, boff, ln, roff = plist[i]
                dst = multi.get(ri)
                if dst is not None:
                    if roff < 0 or ln < 0 or roff + ln > PyByteArray_GET_SIZE(dst):
                        raise ValueError("piece outside its range buffer")
                    pieces[i].dst = PyByteArray_AS_STRING(dst) + roff
                else:
                    b = PyBytes_FromStringAndSize(NULL, ln)
                    outs[i] = b
                    pieces[i].dst = PyBytes_AS_STRING(b)
                pieces[i].off = boff
                pieces[i].len = ln
            with nogil:
                rc = pk_pc_copy_pieces(pc, &t.t, pieces, n)
        finally:
            free(pieces)
        if _pc_check(rc, "page cache read"):
            t.status = rc
            return False
        for i in range(n):
            if outs[i] is not None:
                results[plist[i][0]] = outs[i]
        return True

    cdef int _read_records(self, PageCacheRecords recs, pk_pc_record *r, const int64_t *rows, Py_ssize_t n,
                           bint verify, pk_pc_batch_info *info) except -1:
        cdef pk_pagecache *pc = self._get()
        cdef int rc
        cdef int64_t row
        with nogil:
            rc = pk_pc_read_records(pc, recs.objs, recs.nobjs, r, n, verify, info)
        if rc == -EINVAL:
            row = rows[info.bad_record]
            obj = r[info.bad_record].object
            name = recs.names[obj] if obj < recs.nobjs else f"<shard {obj}>"
            size = recs.objs[obj].size if obj < recs.nobjs else 0
            raise ValueError(f"{name}: sample {row} at offset {r[info.bad_record].offset} "
                             f"({r[info.bad_record].len} bytes) lies outside the shard ({size} bytes)")
        _pc_check(rc, "page cache batch read")
        return 0

    def read_rows(self, PageCacheRecords recs, const int64_t[::1] rows, bint verify, uint8_t[::1] status,
                  list out):
        """Serve the stored bytes of ``rows`` (of ``recs``) from cached blocks in one call with the GIL
        released (pk_pc_read_records): every block looked up, every record copied and its copy checked
        against its XXH3-64.  out[k] becomes a bytes object for each row served; status[k] is 0 for
        those, PC_MISS (not all its blocks cached, or a cached block was corrupt and dropped: fetch it)
        or, only with verify, PC_MISMATCH (the cache holds bad bytes as the server sent them: drop its
        blocks and fetch it).  Returns the number of distinct blocks served from."""
        cdef Py_ssize_t k, n = rows.shape[0]
        cdef pk_pc_record *r
        cdef pk_pc_batch_info info
        cdef list bufs = [None] * n
        cdef bytes b
        if status.shape[0] < n or len(out) < n:
            raise ValueError("status and out need one element per row")
        r = <pk_pc_record *>malloc((n if n else 1) * sizeof(pk_pc_record))
        if r == NULL:
            raise MemoryError()
        try:
            for k in range(n):
                recs.fill(&r[k], rows[k])
                b = PyBytes_FromStringAndSize(NULL, r[k].len)
                bufs[k] = b
                r[k].dst = <uint8_t *>PyBytes_AS_STRING(b)
            self._read_records(recs, r, &rows[0] if n else NULL, n, verify, &info)
            for k in range(n):
                status[k] = <uint8_t>r[k].status
                if r[k].status == 0:
                    out[k] = bufs[k]
        finally:
            free(r)
        return info.blocks_hit

    def read_rows_into(self, PageCacheRecords recs, const int64_t[::1] rows, bint verify,
                       uint8_t[::1] status, uint8_t[::1] buf, const uint64_t[::1] starts):
        """read_rows(), each row's bytes written into buf at starts[k] (the caller sized buf from the
        index).  Returns the number of distinct blocks served from."""
        cdef Py_ssize_t k, n = rows.shape[0]
        cdef pk_pc_record *r
        cdef pk_pc_batch_info info
        cdef uint64_t size = buf.shape[0]
        if status.shape[0] < n or starts.shape[0] < n:
            raise ValueError("status and starts need one element per row")
        r = <pk_pc_record *>malloc((n if n else 1) * sizeof(pk_pc_record))
        if r == NULL:
            raise MemoryError()
        try:
            for k in range(n):
                recs.fill(&r[k], rows[k])
                if starts[k] > size or r[k].len > size - starts[k]:
                    raise ValueError("buffer too small for the batch")
                r[k].dst = &buf[0] + starts[k] if size else NULL
            self._read_records(recs, r, &rows[0] if n else NULL, n, verify, &info)
            for k in range(n):
                status[k] = <uint8_t>r[k].status
        finally:
            free(r)
        return info.blocks_hit

    def read_row(self, PageCacheRecords recs, int64_t row, bint verify):
        """The stored bytes of one row if its blocks are cached, else its status (PC_MISS / PC_MISMATCH)."""
        cdef pk_pc_record r
        cdef pk_pc_batch_info info
        recs.fill(&r, row)
        cdef bytes b = PyBytes_FromStringAndSize(NULL, r.len)
        r.dst = <uint8_t *>PyBytes_AS_STRING(b)
        self._read_records(recs, &r, &row, 1, verify, &info)
        return b if r.status == 0 else r.status

    def copy_into(self, PageCacheTicket t, uint64_t off, uint64_t length, unsigned char[::1] dst,
                  size_t dst_off):
        """Like copy(), into dst[dst_off:dst_off+length].  Returns True, or False as copy() None."""
        cdef pk_pagecache *pc = self._get()
        cdef int rc
        if dst_off > <size_t>dst.shape[0] or length > <size_t>dst.shape[0] - dst_off:
            raise ValueError("destination too small")
        if length == 0:
            return True
        with nogil:
            rc = pk_pc_copy(pc, &t.t, off, length, &dst[dst_off])
        if _pc_check(rc, "page cache read"):
            t.status = rc
            return False
        return True

    def publish(self, PageCacheTicket t, const unsigned char[::1] data):
        """Store a claimed block and wake its waiters.  Returns 0, or -errno if it could not be
        stored (disk full, ...): the claim is then given up and the caller still has its bytes."""
        cdef pk_pagecache *pc = self._get()
        cdef uint64_t n = data.shape[0]
        cdef int rc
        if n != t.t.length:
            raise ValueError(f"block {t.block}: fetched {n} bytes, expected {t.t.length}")
        with nogil:
            rc = pk_pc_publish(pc, &t.t, &data[0], n)
        if rc < 0 and rc != -ENOSPC and rc != -EIO and rc != -EDQUOT:  # then just not cached
            _pc_check(rc, "page cache publish")
        return rc

    def abort(self, PageCacheTicket t):
        """Give a claim up (its fetch failed)."""
        cdef pk_pagecache *pc = self._get()
        cdef int rc
        with nogil:
            rc = pk_pc_abort(pc, &t.t)
        if rc < 0 and rc != -ESTALE:  # ESTALE: already given up
            _pc_check(rc, "page cache abort")

    def wait(self, PageCacheTicket t, int timeout_ms):
        """Block (GIL released) until the fetch t is waiting for ends; False on timeout."""
        cdef pk_pagecache *pc = self._get()
        cdef int rc
        with nogil:
            rc = pk_pc_wait(pc, &t.t, timeout_ms)
        return _pc_check(rc, "waiting for a block another process is fetching") != PK_PC_TIMEDOUT

    def stats(self):
        cdef pk_pagecache *pc = self._get()
        cdef pk_pc_counters st
        cdef int rc
        with nogil:
            rc = pk_pc_stats(pc, &st)
        _pc_check(rc, "reading page cache stats")
        return dict(block_size=st.block_size, nslots=st.nslots, capacity=st.capacity,
                    index_bytes=st.index_bytes, bytes_used=st.bytes_used, blocks=st.blocks_ready,
                    blocks_fetching=st.blocks_fetching, hits=st.hits, misses=st.misses,
                    fetched_bytes=st.fetched_bytes, evictions=st.evictions, corruptions=st.corruptions,
                    waits=st.waits, takeovers=st.takeovers, repairs=st.repairs)

    def entries(self):
        """[(group, block, length, label bytes)] of every READY block."""
        cdef pk_pagecache *pc = self._get()
        cdef size_t cap = self.nslots, n = 0, i
        cdef pk_pc_entry *buf = <pk_pc_entry *>malloc((cap if cap else 1) * sizeof(pk_pc_entry))
        cdef int rc
        if buf == NULL:
            raise MemoryError()
        try:
            with nogil:
                rc = pk_pc_entries(pc, buf, cap, &n)
            _pc_check(rc, "listing the page cache")
            return [(buf[i].group, buf[i].block, buf[i].length, buf[i].label[:buf[i].label_len])
                    for i in range(min(n, cap))]
        finally:
            free(buf)

    def clear(self):
        cdef pk_pagecache *pc = self._get()
        cdef int rc
        with nogil:
            rc = pk_pc_clear(pc)
        _pc_check(rc, "clearing the page cache")

    def drop(self, bytes ns, bytes obj, uint64_t block):
        """Drop a cached block; True if it was there."""
        cdef pk_pagecache *pc = self._get()
        cdef pk_pc_key key
        cdef int rc
        pk_pc_key_make(&key, ns, len(ns), obj, len(obj), block)
        with nogil:
            rc = pk_pc_drop(pc, &key)
        return _pc_check(rc, "page cache drop") == 1

    def locate(self, bytes ns, bytes obj, uint64_t block):
        """(offset in pagecache.data, length) of a cached block, or None."""
        cdef pk_pagecache *pc = self._get()
        cdef pk_pc_key key
        cdef uint64_t off = 0, length = 0
        cdef int rc
        pk_pc_key_make(&key, ns, len(ns), obj, len(obj), block)
        with nogil:
            rc = pk_pc_locate(pc, &key, &off, &length)
        if _pc_check(rc, "page cache locate") == PK_PC_READY:
            return (off, length)
        return None
