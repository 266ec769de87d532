/* writer.c -- buffered, append-only shard writer. */
#define _GNU_SOURCE
#include "writer.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checksum.h"

#ifndef O_PATH /* Linux-only: elsewhere the directory is opened for reading, which openat() accepts too */
#define O_PATH O_RDONLY
#endif

#define WRITE_BUFFER_SIZE (1u << 20)
/* Start writing a shard's pages to disk every this many bytes, so that the fsync at close waits for
 * the last few MiB only instead of the whole shard. */
#define WRITEBACK_STEP (8u << 20)

struct pk_writer {
    int fd;
    int is_file;            /* a regular file (fsync on close); else a pipe or socket */
    uint32_t flags;         /* PK_SHARD_* declared at open */
    uint32_t dict_id;
    uint64_t written;       /* bytes handed to write(2) */
    uint64_t flushed;       /* bytes whose writeback to disk has been started (regular files) */
    uint8_t *buf;           /* WRITE_BUFFER_SIZE bytes of pending output */
    size_t buf_len;
    uint8_t *index;         /* encoded entries, count * PK_ENTRY_SIZE bytes */
    size_t index_cap;       /* capacity of index in bytes */
    uint64_t count;
    uint64_t data_bytes;
    uint8_t *scratch;       /* read buffer for append_file of large files */
    size_t scratch_cap;
    int dir_fd;             /* append_file: O_PATH descriptor of the directory of the last input, or -1 */
    char *dir_path;         /* ... and that directory's path as given (no trailing '/'), or NULL */
    size_t dir_len;
    pk_xxh64_state file_hash;
};

static int io_fail(pk_error *err, int e, uint64_t offset, const char *msg) {
    if (err) err->sys_errno = e;
    return pk_fail(err, PK_E_IO, offset, 0, 0, msg);
}

static int write_all(pk_writer *w, const uint8_t *p, size_t len, pk_error *err) {
    pk_xxh64_update(&w->file_hash, p, len);
    while (len > 0) {
        ssize_t n = write(w->fd, p, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            return io_fail(err, errno, w->written, "write to shard failed");
        }
        p += n;
        len -= (size_t)n;
        w->written += (uint64_t)n;
    }
#ifdef SYNC_FILE_RANGE_WRITE
    if (w->is_file && w->written - w->flushed >= WRITEBACK_STEP) {
        /* asynchronous: returns once writeback is queued; an error shows again at fsync */
        (void)sync_file_range(w->fd, (off64_t)w->flushed, (off64_t)(w->written - w->flushed),
                              SYNC_FILE_RANGE_WRITE);
        w->flushed = w->written;
    }
#endif
    return PK_OK;
}

static int flush(pk_writer *w, pk_error *err) {
    int rc = write_all(w, w->buf, w->buf_len, err);
    w->buf_len = 0;
    return rc;
}

/* Append bytes to the output, through the buffer unless they are large. */
static int emit(pk_writer *w, const uint8_t *p, size_t len, pk_error *err) {
    if (len == 0) return PK_OK; /* p may be NULL (an empty index) */
    if (w->buf_len + len <= WRITE_BUFFER_SIZE) {
        memcpy(w->buf + w->buf_len, p, len);
        w->buf_len += len;
        return PK_OK;
    }
    int rc = flush(w, err);
    if (rc) return rc;
    if (len >= WRITE_BUFFER_SIZE) return write_all(w, p, len, err);
    memcpy(w->buf, p, len);
    w->buf_len = len;
    return PK_OK;
}

int pk_writer_open(const char *path, uint32_t flags, uint32_t dict_id, pk_writer **out, pk_error *err) {
    *out = NULL;
    if (flags & ~PK_SHARD_FLAGS_KNOWN) return pk_fail(err, PK_E_RANGE, 0, 0, flags, "unknown shard flags");
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) return io_fail(err, errno, 0, "creating shard file");
    int rc = pk_writer_open_fd(fd, flags, dict_id, out, err);
    if (rc) {
        close(fd);
        unlink(path); /* leave nothing behind: a retry must not meet EEXIST */
    }
    return rc;
}

int pk_writer_open_fd(int fd, uint32_t flags, uint32_t dict_id, pk_writer **out, pk_error *err) {
    *out = NULL;
    if (flags & ~PK_SHARD_FLAGS_KNOWN) return pk_fail(err, PK_E_RANGE, 0, 0, flags, "unknown shard flags");
    struct stat st;
    if (fstat(fd, &st) != 0) return io_fail(err, errno, 0, "stat of shard output");
    pk_writer *w = calloc(1, sizeof *w);
    if (!w) return pk_fail(err, PK_E_NOMEM, 0, 0, 0, "allocating the writer");
    w->buf = malloc(WRITE_BUFFER_SIZE);
    if (!w->buf) {
        free(w);
        return pk_fail(err, PK_E_NOMEM, 0, 0, 0, "allocating the write buffer");
    }
    w->fd = fd;
    w->dir_fd = -1;
    w->is_file = S_ISREG(st.st_mode);
    w->flags = flags;
    w->dict_id = dict_id;
    pk_xxh64_init(&w->file_hash, 0);
    pk_header h = {PK_FORMAT_READ_VERSION, PK_FORMAT_VERSION, flags, dict_id};
    uint8_t hdr[PK_HEADER_SIZE];
    pk_header_encode(&h, hdr);
    int rc = emit(w, hdr, sizeof hdr, err);
    if (rc) {
        w->fd = -1; /* the caller still owns fd on failure */
        pk_writer_abort(w);
        return rc;
    }
    *out = w;
    return PK_OK;
}

uint64_t pk_writer_size(const pk_writer *w) { return w->written + w->buf_len; }
uint64_t pk_writer_count(const pk_writer *w) { return w->count; }

static int check_codec(const pk_writer *w, uint32_t codec, pk_error *err) {
    if (codec > PK_CODEC_MAX) return pk_fail(err, PK_E_RANGE, 0, PK_CODEC_MAX, codec, "unknown codec");
    if (codec != PK_CODEC_NONE && !(w->flags & PK_SHARD_HAS_ZSTD))
        return pk_fail(err, PK_E_RANGE, 0, 0, codec, "zstd record in a shard opened without PK_SHARD_HAS_ZSTD");
    if (codec == PK_CODEC_ZSTD_DICT && !(w->flags & PK_SHARD_HAS_DICT))
        return pk_fail(err, PK_E_RANGE, 0, 0, codec, "dictionary record in a shard opened without a dictionary");
    return PK_OK;
}

/* Record an entry for stored bytes that were just emitted at offset. */
static int add_entry(pk_writer *w, uint64_t offset, uint32_t stored_len, uint32_t raw_len,
                     uint64_t checksum, uint32_t codec, pk_entry *entry, pk_error *err) {
    if (w->count >= PK_MAX_RECORDS)
        return pk_fail(err, PK_E_RANGE, offset, PK_MAX_RECORDS, w->count, "too many records in one shard");
    size_t need = (size_t)(w->count + 1) * PK_ENTRY_SIZE;
    if (need > w->index_cap) {
        size_t cap = w->index_cap ? w->index_cap * 2 : 4096 * PK_ENTRY_SIZE;
        uint8_t *p = realloc(w->index, cap);
        if (!p) return pk_fail(err, PK_E_NOMEM, offset, 0, 0, "growing the shard index");
        w->index = p;
        w->index_cap = cap;
    }
    pk_entry e = {offset, stored_len, raw_len, checksum, codec};
    pk_entry_encode(&e, w->index + w->count * PK_ENTRY_SIZE);
    w->count++;
    w->data_bytes += stored_len;
    if (entry) *entry = e;
    return PK_OK;
}

int pk_writer_append(pk_writer *w, const void *data, uint32_t stored_len, uint32_t raw_len,
                     uint32_t codec, pk_entry *entry, pk_error *err) {
    if (!w || w->fd < 0) return pk_fail(err, PK_E_STATE, 0, 0, 0, "writer is closed");
    int rc = check_codec(w, codec, err);
    if (rc) return rc;
    if (stored_len > PK_MAX_RECORD_SIZE || raw_len > PK_MAX_RECORD_SIZE)
        return pk_fail(err, PK_E_RANGE, 0, PK_MAX_RECORD_SIZE, stored_len > raw_len ? stored_len : raw_len,
                       "record larger than the format limit");
    if (codec == PK_CODEC_NONE && stored_len != raw_len)
        return pk_fail(err, PK_E_RANGE, 0, stored_len, raw_len, "raw length must equal stored length");
    uint64_t offset = pk_writer_size(w);
    uint64_t checksum = pk_xxh3_64(data, stored_len); /* data may be NULL when stored_len is 0 */
    rc = emit(w, (const uint8_t *)data, stored_len, err);
    if (rc) return rc;
    return add_entry(w, offset, stored_len, raw_len, checksum, codec, entry, err);
}

/* Read a regular file whose size was len when fstat()ed into dst, which has room for len + 1 bytes.
 * Each read asks for one byte more than is still expected, so a file that grew shows that byte and
 * a read that stops at the expected size is the end of the file: the usual case is one read(2), with
 * no second read to probe for growth.  Sets *changed when the file ended early or had more than len
 * bytes; returns -1 with errno on a read error. */
static int read_whole(int fd, uint8_t *dst, size_t len, int *changed) {
    size_t got = 0;
    for (;;) {
        ssize_t n = read(fd, dst + got, len + 1 - got);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (n == 0) break; /* end of file before the expected size (or exactly at it, for len 0) */
        got += (size_t)n;
        if (got >= len) break;
    }
    *changed = got != len;
    return 0;
}

/* Sets *dfd and *name so that openat(*dfd, *name) opens path.  Inputs come in walk order, so
 * consecutive files share their directory: it is opened once (O_PATH) and kept, and each file is
 * opened by its last path component instead of the kernel resolving the whole path every time. */
static int dir_for(pk_writer *w, const char *path, int *dfd, const char **name, pk_error *err) {
    const char *slash = strrchr(path, '/');
    if (!slash) {
        *dfd = AT_FDCWD;
        *name = path;
        return PK_OK;
    }
    size_t dlen = (size_t)(slash - path);
    *name = slash + 1;
    if (w->dir_fd >= 0 && w->dir_len == dlen && memcmp(w->dir_path, path, dlen) == 0) {
        *dfd = w->dir_fd;
        return PK_OK;
    }
    if (w->dir_fd >= 0) close(w->dir_fd);
    w->dir_fd = -1;
    char *p = realloc(w->dir_path, dlen + 1);
    if (!p) return pk_fail(err, PK_E_NOMEM, 0, 0, dlen, "allocating a directory path");
    memcpy(p, path, dlen);
    p[dlen] = '\0';
    w->dir_path = p;
    w->dir_len = dlen;
    int fd = open(dlen ? p : "/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return io_fail(err, errno, 0, "opening the input file's directory");
    w->dir_fd = *dfd = fd;
    return PK_OK;
}

int pk_writer_append_file(pk_writer *w, const char *path, int64_t expected_size, pk_entry *entry,
                          pk_error *err) {
    if (!w || w->fd < 0) return pk_fail(err, PK_E_STATE, 0, 0, 0, "writer is closed");
    const char *name = path;
    int dfd = AT_FDCWD;
    int rc = dir_for(w, path, &dfd, &name, err);
    if (rc) return rc;
    /* O_NONBLOCK: a fifo put where a file was listed must not block the build (fstat refuses it) */
    int fd = openat(dfd, name, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return io_fail(err, errno, 0, "opening input file");
    struct stat st;
    if (fstat(fd, &st) != 0) {
        rc = io_fail(err, errno, 0, "stat of input file");
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = io_fail(err, EINVAL, 0, "input is not a regular file");
        goto out;
    }
    if ((uint64_t)st.st_size > PK_MAX_RECORD_SIZE) {
        rc = pk_fail(err, PK_E_RANGE, 0, PK_MAX_RECORD_SIZE, (uint64_t)st.st_size,
                     "input file larger than the format's record limit");
        goto out;
    }
    if (expected_size >= 0 && (uint64_t)st.st_size != (uint64_t)expected_size) {
        rc = pk_fail(err, PK_E_RANGE, 0, (uint64_t)expected_size, (uint64_t)st.st_size,
                     "input file changed size since it was listed");
        goto out;
    }
    size_t len = (size_t)st.st_size;
    uint8_t *dst;
    if (w->buf_len + len + 1 <= WRITE_BUFFER_SIZE) {
        dst = w->buf + w->buf_len; /* read straight into the output buffer */
    } else {
        if (len + 1 > w->scratch_cap) {
            uint8_t *p = realloc(w->scratch, len + 1);
            if (!p) {
                rc = pk_fail(err, PK_E_NOMEM, 0, 0, len, "allocating a read buffer");
                goto out;
            }
            w->scratch = p;
            w->scratch_cap = len + 1;
        }
        dst = w->scratch;
    }
    int changed;
    if (read_whole(fd, dst, len, &changed) != 0) {
        rc = io_fail(err, errno, 0, "reading input file");
        goto out;
    }
    if (changed) {
        rc = pk_fail(err, PK_E_RANGE, 0, len, 0, "input file changed size while being read");
        goto out;
    }
    uint64_t offset = pk_writer_size(w);
    uint64_t checksum = pk_xxh3_64(dst, len);
    if (dst == w->buf + w->buf_len) {
        w->buf_len += len;
    } else {
        rc = emit(w, dst, len, err);
        if (rc) goto out;
    }
    rc = add_entry(w, offset, (uint32_t)len, (uint32_t)len, checksum, PK_CODEC_NONE, entry, err);
out:
    close(fd);
    return rc;
}

static void release(pk_writer *w) {
    if (w->fd >= 0) close(w->fd);
    if (w->dir_fd >= 0) close(w->dir_fd);
    free(w->dir_path);
    free(w->buf);
    free(w->index);
    free(w->scratch);
    free(w);
}

int pk_writer_close(pk_writer *w, pk_writer_summary *summary, pk_error *err) {
    if (!w || w->fd < 0) return pk_fail(err, PK_E_STATE, 0, 0, 0, "writer is closed");
    pk_footer f;
    f.index_offset = pk_writer_size(w);
    f.record_count = w->count;
    f.index_checksum = pk_xxh64(w->index, (size_t)w->count * PK_ENTRY_SIZE, 0);
    f.read_version = PK_FORMAT_READ_VERSION;
    f.write_version = PK_FORMAT_VERSION;
    f.flags = w->flags;
    uint8_t foot[PK_FOOTER_SIZE];
    pk_footer_encode(&f, foot);
    int rc = emit(w, w->index, (size_t)w->count * PK_ENTRY_SIZE, err);
    if (!rc) rc = emit(w, foot, sizeof foot, err);
    if (!rc) rc = flush(w, err);
    if (!rc && w->is_file && fsync(w->fd) != 0) rc = io_fail(err, errno, w->written, "fsync of shard failed");
    if (!rc) {
        int fd = w->fd;
        w->fd = -1;
        if (close(fd) != 0) rc = io_fail(err, errno, w->written, "close of shard failed");
    }
    if (!rc && summary) {
        summary->file_size = w->written;
        summary->record_count = w->count;
        summary->file_checksum = pk_xxh64_digest(&w->file_hash);
        summary->data_bytes = w->data_bytes;
    }
    release(w);
    return rc;
}

void pk_writer_abort(pk_writer *w) {
    if (w) release(w);
}
