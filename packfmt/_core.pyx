# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Low-level bindings of the C core (src_c/).  The public API lives in packfmt.dataset / packfmt.writer.

Everything blocking runs with the GIL released.  Status codes from C become exceptions in exactly one
place: check_status().
"""
import os

from cpython.buffer cimport PyBUF_C_CONTIGUOUS, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.bytearray cimport PyByteArray_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.ref cimport Py_INCREF
from libc.string cimport memcpy, memset

from packfmt.includes.checksum cimport PK_XXH3_AVX2, PK_XXH3_SCALAR, pk_xxh3_64, pk_xxh3_64_copy, pk_xxh3_impl, pk_xxh64
from packfmt.includes.format cimport *
from packfmt.includes.reader cimport *
from packfmt.includes.writer cimport *

from packfmt.errors import CorruptShardError, PackError, PackOSError, UnsupportedVersionError

# --- constants: one source of truth (src_c/format.h), pinned by tests/test_format.py
FORMAT_VERSION = PK_FORMAT_VERSION
FORMAT_READ_VERSION = PK_FORMAT_READ_VERSION
MAGIC = PK_MAGIC[:PK_MAGIC_SIZE]
HEADER_SIZE = PK_HEADER_SIZE
ENTRY_SIZE = PK_ENTRY_SIZE
FOOTER_SIZE = PK_FOOTER_SIZE
MAX_RECORD_SIZE = PK_MAX_RECORD_SIZE
MAX_RECORDS = PK_MAX_RECORDS
CODEC_NONE = PK_CODEC_NONE
CODEC_ZSTD = PK_CODEC_ZSTD
CODEC_ZSTD_DICT = PK_CODEC_ZSTD_DICT
SHARD_HAS_ZSTD = PK_SHARD_HAS_ZSTD
SHARD_HAS_DICT = PK_SHARD_HAS_DICT


cdef inline void clear_error(pk_error *err) noexcept nogil:
    memset(err, 0, sizeof(pk_error))
    err.shard = -1
    err.item = -1


cdef int check_status(int rc, pk_error *err, object where, object samples=None) except -1:
    """Raise the exception for a failed C call.  where: the shard path, or a list of shard paths
    indexed by err.shard.  samples: maps err.item (batch position) to a global sample index."""
    if rc == PK_OK:
        return 0
    if isinstance(where, (list, tuple)):
        name = where[err.shard] if 0 <= err.shard < len(where) else "<dataset>"
    else:
        name = where
    detail = err.msg.decode("utf-8", "replace")
    sample = None
    if err.item >= 0 and samples is not None:
        sample = int(samples[err.item])
    at = f"{name}: {detail}"
    if rc == PK_E_IO:
        e = err.sys_errno
        raise PackOSError(e, f"{os.strerror(e)} ({detail} at offset {err.offset})", str(name))
    if rc == PK_E_NOMEM:
        raise MemoryError(at)
    if rc == PK_E_VERSION:
        raise UnsupportedVersionError(
            f"{at}: the file needs format version {err.actual}, this packfmt reads up to "
            f"{err.expected}; upgrade packfmt")
    if rc in (PK_E_CORRUPT, PK_E_CHECKSUM, PK_E_TRUNCATED):
        what = {PK_E_CORRUPT: "corrupt shard", PK_E_CHECKSUM: "checksum mismatch",
                PK_E_TRUNCATED: "truncated shard"}[rc]
        msg = f"{name}: {what} at offset {err.offset}: {detail}"
        if rc == PK_E_CHECKSUM:
            msg += f" (expected {err.expected:016x}, got {err.actual:016x})"
        elif err.expected or err.actual:
            msg += f" (expected {err.expected}, found {err.actual})"
        if sample is not None:
            msg += f" [sample {sample}]"
        raise CorruptShardError(msg, shard=str(name), offset=err.offset, expected=err.expected,
                                actual=err.actual, sample=sample)
    if rc == PK_E_RANGE:
        raise ValueError(f"{at} (limit {err.expected}, got {err.actual})")
    raise PackError(f"{at}: {pk_strerror(rc).decode()}")


# Inputs at least this long are hashed with the GIL released; shorter ones take less time to hash than
# releasing and re-taking the GIL would.
cdef enum:
    HASH_NOGIL_MIN = 65536


cdef uint64_t _hash_buffer(object data, bint xxh3, uint64_t seed) except? 0:
    """XXH3-64 (xxh3) or XXH64 (seed) of a C-contiguous bytes-like object, without a memoryview."""
    cdef Py_buffer buf
    cdef uint64_t h
    cdef const void *p
    cdef size_t n
    if PyBytes_CheckExact(data):  # the common case: no buffer export at all
        p = PyBytes_AS_STRING(data)
        n = <size_t>PyBytes_GET_SIZE(data)
        return pk_xxh3_64(p, n) if xxh3 else pk_xxh64(p, n, seed)
    PyObject_GetBuffer(data, &buf, PyBUF_C_CONTIGUOUS)
    try:
        p = buf.buf if buf.len else NULL  # (NULL, 0) for empty input, as the C functions expect
        n = <size_t>buf.len
        if n < HASH_NOGIL_MIN:
            h = pk_xxh3_64(p, n) if xxh3 else pk_xxh64(p, n, seed)
        else:
            with nogil:
                h = pk_xxh3_64(p, n) if xxh3 else pk_xxh64(p, n, seed)
    finally:
        PyBuffer_Release(&buf)
    return h


def xxh64(data, uint64_t seed=0):
    """XXH64 of a bytes-like object, computed by the C core: the whole-file, header, footer and index
    checksums of the format (docs/format.md, "Checksums")."""
    return _hash_buffer(data, False, seed)


def xxh3_64(data):
    """XXH3-64 (seed 0, default secret) of a bytes-like object, computed by the C core: the per-record
    checksum of the format (docs/format.md, "Checksums")."""
    return _hash_buffer(data, True, 0)


cdef extern from *:
    """
    static inline int64_t pk_load_acquire_i64(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void pk_store_release_i64(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    """
    int64_t pk_load_acquire_i64(const int64_t *p) nogil
    void pk_store_release_i64(int64_t *p, int64_t v) nogil


def load_acquire_i64(int64_t[::1] words, Py_ssize_t i):
    """``words[i]`` read with acquire ordering: nothing this process reads or writes after it is
    reordered before it.  For flags in memory shared between processes (packfmt._ring)."""
    if not 0 <= i < words.shape[0]:
        raise IndexError(f"word {i} out of range for {words.shape[0]} words")
    return pk_load_acquire_i64(&words[i])


def store_release_i64(int64_t[::1] words, Py_ssize_t i, int64_t value):
    """``words[i] = value`` with release ordering: every read and write this process made before it
    is visible to a process that reads the new value with :func:`load_acquire_i64`."""
    if not 0 <= i < words.shape[0]:
        raise IndexError(f"word {i} out of range for {words.shape[0]} words")
    pk_store_release_i64(&words[i], value)


def uninit_bytearray(Py_ssize_t n):
    """A ``bytearray`` of ``n`` bytes whose contents are not initialised (``bytearray(n)`` zero-fills:
    a second pass over memory a batch read is about to overwrite).  Only for buffers every byte of
    which is written before anyone reads them."""
    if n < 0:
        raise ValueError(f"negative size {n}")
    return PyByteArray_FromStringAndSize(NULL, n)


def xxh3_64_copy(dst, src):
    """Copy the bytes of src to the start of dst (a writable buffer at least as long, not overlapping src)
    and return their XXH3-64, in one pass: the reader's verified copy (pk_xxh3_64_copy).  For tests and
    benchmarks."""
    cdef Py_buffer s, d
    cdef uint64_t h
    cdef size_t n
    PyObject_GetBuffer(src, &s, PyBUF_C_CONTIGUOUS)
    try:
        PyObject_GetBuffer(dst, &d, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE)
        try:
            if d.len < s.len:
                raise ValueError(f"destination of {d.len} bytes is shorter than the {s.len}-byte source")
            if s.len and <char *>d.buf < <char *>s.buf + s.len and <char *>s.buf < <char *>d.buf + s.len:
                raise ValueError("source and destination overlap")
            n = <size_t>s.len
            with nogil:
                h = pk_xxh3_64_copy(d.buf if n else NULL, s.buf if n else NULL, n)
        finally:
            PyBuffer_Release(&d)
    finally:
        PyBuffer_Release(&s)
    return h


_XXH3_IMPLS = {"scalar": PK_XXH3_SCALAR, "avx2": PK_XXH3_AVX2}


def xxh3_impl(want=None):
    """The XXH3 code path in use, "scalar" or "avx2".  want="scalar" forces the portable code, want="avx2"
    selects AVX2 when the CPU has it.  For tests and benchmarks (PACKFMT_NO_SIMD=1 in the environment
    does the same as want="scalar" at load)."""
    cdef int w = -1 if want is None else _XXH3_IMPLS[want]
    return "avx2" if pk_xxh3_impl(w) == PK_XXH3_AVX2 else "scalar"


def hash_strings(const uint8_t[::1] data, const int64_t[::1] offsets, uint64_t[::1] out):
    """out[i] = XXH64(data[offsets[i]:offsets[i+1]]): the hashes of an Arrow string column."""
    cdef Py_ssize_t i, n = out.shape[0]
    cdef const uint8_t *base = &data[0] if data.shape[0] else NULL
    if offsets.shape[0] != n + 1:
        raise ValueError("offsets must have one more element than out")
    for i in range(n):
        if offsets[i] < 0 or offsets[i + 1] < offsets[i] or offsets[i + 1] > data.shape[0]:
            raise ValueError(f"string offsets {offsets[i]}..{offsets[i + 1]} outside the data buffer or decreasing")
    with nogil:
        for i in range(n):
            out[i] = pk_xxh64(base + offsets[i], <size_t>(offsets[i + 1] - offsets[i]), 0)


def check_zstd_sizes(const uint8_t[::1] buf, const uint64_t[::1] starts, const uint64_t[::1] lengths,
                     const uint64_t[::1] raw_lens):
    """Index of the first zstd frame (buf[starts[k]:starts[k]+lengths[k]]) whose header does not declare
    exactly raw_lens[k] bytes, or -1.  Run before decompressing, so a forged raw length never becomes an
    allocation."""
    cdef Py_ssize_t k, n = starts.shape[0]
    cdef uint64_t size
    if lengths.shape[0] < n or raw_lens.shape[0] < n:
        raise ValueError("one length and one raw length per frame")
    for k in range(n):
        if starts[k] > <uint64_t>buf.shape[0] or lengths[k] > <uint64_t>buf.shape[0] - starts[k]:
            return k
        if pk_zstd_content_size(&buf[0] + starts[k], lengths[k], &size) != PK_OK or size != raw_lens[k]:
            return k
    return -1


cdef class ShardWriter:
    """Append records to a new shard file (src_c/writer.h).  Not thread-safe."""
    cdef pk_writer *w
    cdef readonly object path

    def __cinit__(self, path, uint32_t flags=0, uint32_t dict_id=0, int fd=-1):
        """Create the shard file at path; or, with fd >= 0, write to that descriptor (taking ownership;
        path then only names the shard in errors)."""
        cdef pk_error err
        clear_error(&err)
        self.path = os.fspath(path)
        cdef bytes bpath = os.fsencode(self.path)
        cdef const char *cpath = bpath
        cdef int rc
        with nogil:
            if fd >= 0:
                rc = pk_writer_open_fd(fd, flags, dict_id, &self.w, &err)
            else:
                rc = pk_writer_open(cpath, flags, dict_id, &self.w, &err)
        check_status(rc, &err, self.path)

    def __dealloc__(self):
        if self.w is not NULL:
            pk_writer_abort(self.w)
            self.w = NULL

    cdef int _check_open(self) except -1:
        if self.w is NULL:
            raise ValueError(f"{self.path}: shard writer is closed")
        return 0

    @property
    def size(self):
        self._check_open()
        return pk_writer_size(self.w)

    @property
    def count(self):
        self._check_open()
        return pk_writer_count(self.w)

    def append(self, data, uint32_t raw_len, uint32_t codec=PK_CODEC_NONE):
        """Append stored bytes; returns (offset, stored_len, checksum)."""
        self._check_open()
        cdef const uint8_t[::1] view = memoryview(data).cast("B")
        cdef Py_ssize_t n = view.shape[0]
        if n > PK_MAX_RECORD_SIZE:
            raise ValueError(f"record of {n} bytes exceeds the limit of {PK_MAX_RECORD_SIZE} bytes")
        cdef pk_entry e
        cdef pk_error err
        clear_error(&err)
        cdef int rc
        with nogil:
            rc = pk_writer_append(self.w, &view[0] if n else NULL, <uint32_t>n, raw_len, codec, &e, &err)
        check_status(rc, &err, self.path)
        return e.offset, e.stored_len, e.checksum

    def append_files(self, list paths, Py_ssize_t start, uint64_t[::1] offsets, uint32_t[::1] lengths,
                     uint64_t[::1] checksums, Py_ssize_t end=-1, const int64_t[::1] sizes=None):
        """Append files paths[start:end] (bytes; end -1: to the last) stored raw, writing each entry at the
        same position of the output arrays; returns end.  sizes (optional): the size each file was
        listed with; a file of another size fails.  A file that cannot be read raises PackOSError (or
        ValueError when it changed size) with .filename set and .position its index in paths.  The
        whole run is appended with the GIL released."""
        self._check_open()
        cdef Py_ssize_t i, k, n = len(paths) if end < 0 else min(end, len(paths))
        cdef pk_entry e
        cdef pk_error err
        cdef int rc = PK_OK
        if start < 0 or start > n:
            raise ValueError(f"start {start} outside 0..{n}")
        if offsets.shape[0] < n or lengths.shape[0] < n or checksums.shape[0] < n:
            raise ValueError("output arrays shorter than paths")
        if sizes is not None and sizes.shape[0] < n:
            raise ValueError("sizes shorter than paths")
        if n == start:
            return n
        cdef const char **cpaths = <const char **>malloc(<size_t>(n - start) * sizeof(char *))
        if cpaths == NULL:
            raise MemoryError()
        cdef const int64_t *csizes = &sizes[0] if sizes is not None else NULL
        cdef pk_writer *w = self.w
        try:
            for k in range(n - start):
                p = paths[start + k]
                if not PyBytes_CheckExact(p):
                    raise TypeError(f"paths[{start + k}] must be bytes, got {type(p).__name__}")
                cpaths[k] = PyBytes_AS_STRING(p)  # the list keeps the bytes alive
            clear_error(&err)
            with nogil:
                for i in range(start, n):
                    rc = pk_writer_append_file(w, cpaths[i - start], csizes[i] if csizes != NULL else -1, &e, &err)
                    if rc != PK_OK:
                        break
                    offsets[i] = e.offset
                    lengths[i] = e.stored_len
                    checksums[i] = e.checksum
        finally:
            free(cpaths)
        if rc != PK_OK:
            try:
                check_status(rc, &err, os.fsdecode(paths[i]))
            except Exception as exc:
                exc.position = i
                raise
        return n

    def close(self):
        """Write index and footer; returns dict(size, records, checksum, data_bytes)."""
        self._check_open()
        cdef pk_writer_summary s
        cdef pk_error err
        clear_error(&err)
        cdef int rc
        cdef pk_writer *w = self.w
        self.w = NULL
        with nogil:
            rc = pk_writer_close(w, &s, &err)
        check_status(rc, &err, self.path)
        return dict(size=s.file_size, records=s.record_count, checksum=s.file_checksum,
                    data_bytes=s.data_bytes)

    def abort(self):
        if self.w is not NULL:
            pk_writer_abort(self.w)
            self.w = NULL


# --- pack build's directory listing (packfmt/build.py walk()) ------------------------------------------
cdef extern from "<dirent.h>" nogil:
    ctypedef struct DIR:
        pass
    struct dirent:
        unsigned char d_type
        char d_name[1]
    DIR *fdopendir(int fd)
    dirent *readdir(DIR *d)
    int closedir(DIR *d)
    int dirfd(DIR *d)
    enum: DT_UNKNOWN
    enum: DT_DIR
    enum: DT_REG
    enum: DT_LNK

cdef extern from *:
    """
    #include <errno.h>
    static int pk_errno(void) { return errno; }
    static void pk_clear_errno(void) { errno = 0; }
    """
    int pk_errno() nogil
    void pk_clear_errno() nogil

cdef enum:
    E_FILE = 0
    E_DIR = 1
    E_LINK_DIR = 2
    E_OTHER = 3
    E_ERROR = 4

from libc.string cimport strlen
from posix.fcntl cimport AT_SYMLINK_NOFOLLOW, O_CLOEXEC, O_DIRECTORY, O_RDONLY, open as c_open
from posix.stat cimport S_ISDIR, S_ISLNK, S_ISREG, fstatat, struct_stat
from posix.unistd cimport close as c_close

#: Kinds of directory entries reported by scan_dir.
ENTRY_FILE = E_FILE          # a regular file, or a symlink to one; value: its size
ENTRY_DIR = E_DIR            # a directory (not a symlink to one)
ENTRY_LINK_DIR = E_LINK_DIR  # a symlink to a directory
ENTRY_OTHER = E_OTHER        # anything else: fifo, socket, device
ENTRY_ERROR = E_ERROR        # could not be stat()ed (a dangling symlink, a file gone); value: errno


def scan_dir(path):
    """List one directory for pack build: (names, kinds, values), names as bytes in the order the
    directory returns them; kinds ENTRY_*; values the size of a file or the errno of an error.  Files
    are stat()ed relative to the directory (fstatat), following symlinks; the GIL is released while
    listing.  Raises OSError if the directory cannot be opened or read."""
    cdef bytes bpath = os.fsencode(path)
    cdef const char *cpath = bpath
    cdef int fd, e = 0, kind
    cdef DIR *d = NULL
    cdef dirent *ent
    cdef struct_stat st
    cdef const char *nm
    cdef size_t nlen
    names, kinds, values = [], bytearray(), []
    with nogil:
        fd = c_open(cpath, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd < 0:
            e = pk_errno()
        else:
            d = fdopendir(fd)
            if d == NULL:
                e = pk_errno()
                c_close(fd)
    if e:
        raise OSError(e, os.strerror(e), os.fsdecode(bpath))
    try:
        while True:
            with nogil:
                pk_clear_errno()
                ent = readdir(d)
                e = pk_errno()
                if ent != NULL:
                    e = 0
                    nm = ent.d_name
                    kind = ent.d_type
                    if kind == DT_DIR:
                        kind = E_DIR
                    elif kind != DT_UNKNOWN and kind != DT_LNK and kind != DT_REG:
                        kind = E_OTHER
                    elif fstatat(dirfd(d), nm, &st, 0) != 0:
                        e = pk_errno()
                        kind = E_ERROR
                    elif S_ISREG(st.st_mode):
                        kind = E_FILE
                    elif not S_ISDIR(st.st_mode) or kind == DT_REG:
                        kind = E_OTHER  # (DT_REG and now a directory: replaced while listed, not a file)
                    elif kind == DT_LNK:
                        kind = E_LINK_DIR
                    elif fstatat(dirfd(d), nm, &st, AT_SYMLINK_NOFOLLOW) == 0 and S_ISLNK(st.st_mode):
                        kind = E_LINK_DIR
                    else:
                        kind = E_DIR
            if ent == NULL:
                if e:
                    raise OSError(e, os.strerror(e), os.fsdecode(bpath))
                break
            nlen = strlen(nm)
            if (nlen == 1 and nm[0] == b'.') or (nlen == 2 and nm[0] == b'.' and nm[1] == b'.'):
                continue
            names.append(PyBytes_FromStringAndSize(nm, nlen))
            kinds.append(kind)
            values.append(e if kind == E_ERROR else (st.st_size if kind == E_FILE else 0))
    finally:
        closedir(d)
    return names, bytes(kinds), values


cdef dict info_dict(pk_shard_info *info):
    return dict(file_size=info.file_size, records=info.record_count, index_offset=info.index_offset,
                flags=info.flags, dict_id=info.dict_id, read_version=info.read_version,
                write_version=info.write_version)


def check_tail(tail, uint64_t file_size, name="<shard>"):
    """Validate the last bytes of a shard (footer + index); returns the shard info.  For shards whose
    bytes come from elsewhere than a local file."""
    cdef const uint8_t[::1] view = memoryview(tail).cast("B")
    cdef pk_shard_info info
    cdef pk_error err
    clear_error(&err)
    cdef int rc
    with nogil:
        rc = pk_shard_check_tail(&view[0] if view.shape[0] else NULL, view.shape[0], file_size, &info, &err)
    check_status(rc, &err, name)
    return info_dict(&info)


cdef class Shard:
    """One validated shard file (src_c/reader.h)."""
    cdef pk_shard *s
    cdef readonly object path
    cdef readonly dict info

    def __cinit__(self, path, uint64_t expected_size=0, bint use_mmap=False):
        cdef pk_error err
        clear_error(&err)
        self.path = os.fspath(path)
        cdef bytes bpath = os.fsencode(self.path)
        cdef const char *cpath = bpath
        cdef int rc
        cdef pk_shard_info info
        with nogil:
            rc = pk_shard_open(cpath, expected_size, use_mmap, &self.s, &err)
        check_status(rc, &err, self.path)
        pk_shard_get_info(self.s, &info)
        self.info = info_dict(&info)

    def __dealloc__(self):
        if self.s is not NULL:
            pk_shard_close(self.s)

    def close(self):
        if self.s is not NULL:
            pk_shard_close(self.s)
            self.s = NULL

    cdef int _check_open(self) except -1:
        if self.s is NULL:
            raise ValueError(f"{self.path}: shard is closed")
        return 0

    def __len__(self):
        return self.info["records"]

    def entry(self, uint64_t i):
        """(offset, stored_len, raw_len, checksum, flags) of record i."""
        self._check_open()
        cdef pk_entry e
        cdef pk_error err
        clear_error(&err)
        check_status(pk_shard_entry(self.s, i, &e, &err), &err, self.path)
        return e.offset, e.stored_len, e.raw_len, e.checksum, e.flags

    def read(self, uint64_t offset, uint32_t length):
        """Stored bytes at [offset, offset+length) of the data region."""
        self._check_open()
        cdef bytes out = PyBytes_FromStringAndSize(NULL, length)
        cdef char *dst = PyBytes_AS_STRING(out)
        cdef pk_error err
        clear_error(&err)
        cdef int rc
        with nogil:
            rc = pk_shard_read(self.s, offset, length, dst, &err)
        check_status(rc, &err, self.path)
        return out

    def verify_records(self, uint64_t start, uint64_t end, size_t max_report=1000):
        """Record numbers in [start, end) whose checksum does not match, and their total count."""
        self._check_open()
        cdef size_t cap = max_report if max_report > 0 else 1
        cdef uint64_t *bad = <uint64_t *>malloc(cap * sizeof(uint64_t))
        cdef size_t nbad = 0
        cdef pk_error err
        clear_error(&err)
        cdef int rc
        if bad is NULL:
            raise MemoryError()
        try:
            with nogil:
                rc = pk_shard_verify_records(self.s, start, end, bad, max_report, &nbad, &err)
            check_status(rc, &err, self.path)
            return [bad[i] for i in range(min(nbad, max_report))], nbad
        finally:
            free(bad)

    def hash_range(self, uint64_t start, uint64_t end):
        self._check_open()
        cdef uint64_t h = 0
        cdef pk_error err
        clear_error(&err)
        cdef int rc
        with nogil:
            rc = pk_shard_hash_range(self.s, start, end, &h, &err)
        check_status(rc, &err, self.path)
        return h


cdef class ShardSet:
    """The shards of a dataset plus the columns of its global index that locate records.

    Shards open lazily on first use.  A ShardSet must not be used across fork(): the dataset layer
    makes a new one in the child.  use_mmap: map the shards (else pread, neighbours coalesced);
    huge_pages: also advise 2 MiB pages for the maps (PK_MAP_HUGE in src_c/reader.h).
    """
    cdef pk_shardset *set
    cdef pk_index_cols cols
    cdef readonly list paths
    cdef object _keep            # the column arrays, kept alive while cols points into them
    cdef pk_read_opts opts
    cdef readonly size_t last_reads

    def __cinit__(self, list paths, const uint64_t[::1] sizes, const uint32_t[::1] shard,
                  const uint64_t[::1] offset, const uint32_t[::1] stored_len, const uint64_t[::1] checksum,
                  bint use_mmap=True, bint verify=True, uint64_t max_gap=64 * 1024,
                  uint64_t max_read=8 * 1024 * 1024, bint huge_pages=False):
        cdef Py_ssize_t i, n = len(paths)
        if sizes.shape[0] != n:
            raise ValueError("one size per shard path")
        cdef Py_ssize_t rows = shard.shape[0]
        if offset.shape[0] != rows or stored_len.shape[0] != rows or checksum.shape[0] != rows:
            raise ValueError("index columns differ in length")
        self.paths = [os.fspath(p) for p in paths]
        encoded = [os.fsencode(p) for p in self.paths]
        cdef const char **cpaths = <const char **>malloc(max(n, 1) * sizeof(char *))
        if cpaths is NULL:
            raise MemoryError()
        for i in range(n):
            cpaths[i] = <bytes>encoded[i]
        cdef pk_error err
        clear_error(&err)
        cdef int map = (PK_MAP | (PK_MAP_HUGE if huge_pages else 0)) if use_mmap else 0
        cdef int rc = pk_shardset_new(n, cpaths, &sizes[0] if n else NULL, map, &self.set, &err)
        free(cpaths)
        check_status(rc, &err, self.paths)
        self._keep = (shard, offset, stored_len, checksum)
        self.cols.nrows = rows
        self.cols.shard = &shard[0] if rows else NULL
        self.cols.offset = &offset[0] if rows else NULL
        self.cols.stored_len = &stored_len[0] if rows else NULL
        self.cols.checksum = &checksum[0] if rows else NULL
        self.opts.verify = verify
        self.opts.max_gap = max_gap
        self.opts.max_read = max_read

    def __dealloc__(self):
        if self.set is not NULL:
            pk_shardset_free(self.set)

    def shard(self, size_t i):
        """Open (if needed) shard i and return its info dict."""
        cdef pk_shard *s
        cdef pk_shard_info info
        cdef pk_error err
        clear_error(&err)
        cdef int rc
        with nogil:
            rc = pk_shardset_get(self.set, i, &s, &err)
        check_status(rc, &err, self.paths)
        pk_shard_get_info(s, &info)
        return info_dict(&info)

    cdef int _check_row(self, int64_t row) except -1:
        if row < 0 or <uint64_t>row >= self.cols.nrows:
            raise IndexError(f"sample index {row} out of range for {self.cols.nrows} samples")
        return 0

    cdef int _read(self, const int64_t *rows, Py_ssize_t n, uint8_t **dst) except -1:
        """Read rows[0..n) into dst[k] (each sized from the index) with the GIL released."""
        cdef pk_error err
        clear_error(&err)
        cdef int rc
        cdef size_t nreads = 0
        with nogil:
            rc = pk_read_batch(self.set, &self.cols, rows, n, dst, &self.opts, &nreads, &err)
        self.last_reads = nreads
        if rc != PK_OK:
            check_status(rc, &err, self.paths, [rows[k] for k in range(n)])
        return 0

    def read_one(self, int64_t row):
        """Stored bytes of one row (negative rows count from the end)."""
        if row < 0:
            row += <int64_t>self.cols.nrows
        self._check_row(row)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, self.cols.stored_len[row])
        cdef uint8_t *dst = <uint8_t *>PyBytes_AS_STRING(out)
        self._read(&row, 1, &dst)
        return out

    def read_rows(self, const int64_t[::1] rows):
        """Stored bytes of each row, as a list of bytes in the order of rows (negative rows count from the
        end; IndexError for a row out of range).

        Every bytes object of the batch is allocated first, then one call into the C core fills them all
        with the GIL released: per sample, Python does one allocation and one list store."""
        cdef Py_ssize_t k, n = rows.shape[0]
        cdef int64_t row, nrows = <int64_t>self.cols.nrows
        cdef const int64_t *r = &rows[0] if n else NULL
        cdef int64_t *wrapped = NULL
        # One block: the destination pointers, then the lengths.
        cdef uint8_t **dst = <uint8_t **>malloc(max(n, 1) * (sizeof(uint8_t *) + sizeof(uint32_t)))
        if dst is NULL:
            raise MemoryError()
        cdef uint32_t *lens = <uint32_t *>(dst + max(n, 1))
        cdef list out
        cdef bytes b
        try:
            # Check the rows and gather their lengths in a tight loop first: random rows miss the cache in
            # the index columns, and here those misses overlap instead of waiting one per allocation.
            for k in range(n):
                row = r[k]
                if row < 0 or row >= nrows:
                    if row < 0 and row >= -nrows:
                        if wrapped is NULL:  # first negative row: read from a wrapped copy of rows
                            wrapped = <int64_t *>malloc(n * sizeof(int64_t))
                            if wrapped is NULL:
                                raise MemoryError()
                            memcpy(wrapped, r, n * sizeof(int64_t))
                            r = wrapped
                        row += nrows
                        wrapped[k] = row
                    else:
                        raise IndexError(f"sample index out of range: {row} (dataset has {nrows} samples)")
                lens[k] = self.cols.stored_len[row]
            out = PyList_New(n)  # every item is set below before anyone sees the list
            for k in range(n):
                b = PyBytes_FromStringAndSize(NULL, lens[k])
                Py_INCREF(b)
                PyList_SET_ITEM(out, k, b)
                dst[k] = <uint8_t *>PyBytes_AS_STRING(b)
            self._read(r, n, dst)
        finally:
            free(dst)
            free(wrapped)
        return out

    def read_rows_into(self, const int64_t[::1] rows, uint8_t[::1] buf, const uint64_t[::1] starts):
        """Stored bytes of each row into buf at starts[k] (the caller sized buf from the index)."""
        cdef Py_ssize_t k, n = rows.shape[0]
        if starts.shape[0] < n:
            raise ValueError("one start per row")
        cdef uint8_t **dst = <uint8_t **>malloc(max(n, 1) * sizeof(uint8_t *))
        if dst is NULL:
            raise MemoryError()
        try:
            for k in range(n):
                self._check_row(rows[k])
                if starts[k] + self.cols.stored_len[rows[k]] > <uint64_t>buf.shape[0]:
                    raise ValueError("buffer too small for the batch")
                dst[k] = &buf[0] + starts[k] if buf.shape[0] else NULL
            self._read(&rows[0] if n else NULL, n, dst)
        finally:
            free(dst)


def verify_buffers(list bufs, const uint64_t[::1] checksums, names=None, samples=None, offsets=None):
    """Check fetched stored bytes against their checksums (remote reads).  Raises CorruptShardError
    naming names[k] (and offsets[k], samples[k]) for the first mismatch.  bufs: bytes or other
    contiguous buffers."""
    cdef Py_ssize_t k, n = len(bufs)
    if checksums.shape[0] < n:
        raise ValueError("one checksum per buffer")
    cdef const uint8_t **ptrs = <const uint8_t **>malloc(max(n, 1) * sizeof(uint8_t *))
    cdef uint32_t *lens = <uint32_t *>malloc(max(n, 1) * sizeof(uint32_t))
    cdef Py_buffer *views = <Py_buffer *>malloc(max(n, 1) * sizeof(Py_buffer))
    cdef Py_ssize_t nviews = 0
    cdef object b
    cdef pk_error err
    clear_error(&err)
    cdef int rc
    if ptrs is NULL or lens is NULL or views is NULL:
        free(ptrs); free(lens); free(views)
        raise MemoryError()
    try:
        for k in range(n):
            b = bufs[k]
            if PyBytes_CheckExact(b):  # the common case: no buffer protocol round trip
                ptrs[k] = <const uint8_t *>PyBytes_AS_STRING(b)
                lens[k] = <uint32_t>PyBytes_GET_SIZE(b)
            else:
                PyObject_GetBuffer(b, &views[nviews], PyBUF_C_CONTIGUOUS)
                nviews += 1
                ptrs[k] = <const uint8_t *>views[nviews - 1].buf
                lens[k] = <uint32_t>views[nviews - 1].len
        with nogil:
            rc = pk_verify_buffers(n, ptrs, lens, &checksums[0] if n else NULL, &err)
        if rc != PK_OK:
            where = names[err.item] if names is not None and err.item >= 0 else "<buffer>"
            if offsets is not None and err.item >= 0:
                err.offset = int(offsets[err.item])
            check_status(rc, &err, where, samples)
    finally:
        for k in range(nviews):
            PyBuffer_Release(&views[k])
        free(ptrs)
        free(lens)
        free(views)


# --- the node-local page cache (src_c/pagecache.h), see packfmt/cache.py
include "_pagecache.pxi"
