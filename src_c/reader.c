/* reader.c -- validated shard access and coalesced batch reads. */
#define _GNU_SOURCE
#include "reader.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checksum.h"

struct pk_shard {
    int fd;
    const uint8_t *map;      /* whole file mapped read-only, or NULL in pread mode */
    uint8_t *index;          /* record_count * PK_ENTRY_SIZE bytes, validated */
    pk_shard_info info;
};

static int io_fail(pk_error *err, int e, uint64_t offset, const char *msg) {
    if (err) err->sys_errno = e;
    return pk_fail(err, PK_E_IO, offset, 0, 0, msg);
}

/* pread exactly len bytes at offset; a short read is reported as truncation. */
static int pread_exact(int fd, void *dst, size_t len, uint64_t offset, pk_error *err) {
    uint8_t *p = dst;
    while (len > 0) {
        ssize_t n = pread(fd, p, len, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR) continue;
            return io_fail(err, errno, offset, "read from shard failed");
        }
        if (n == 0) return pk_fail(err, PK_E_TRUNCATED, offset, len, 0, "shard ended before the expected bytes");
        p += n;
        len -= (size_t)n;
        offset += (uint64_t)n;
    }
    return PK_OK;
}

/* Check that the entries tile [PK_HEADER_SIZE, index_offset) back to back. */
static int check_entries(const uint8_t *index, uint64_t count, uint64_t index_offset, uint64_t index_pos,
                         pk_error *err) {
    uint64_t expect = PK_HEADER_SIZE;
    for (uint64_t i = 0; i < count; i++) {
        pk_entry e;
        pk_entry_decode(index + i * PK_ENTRY_SIZE, &e);
        int rc = pk_entry_check(&e, index_offset, err);
        if (rc) {
            if (err) err->item = (int64_t)i;
            return rc;
        }
        if (e.offset != expect) {
            if (err) err->item = (int64_t)i;
            return pk_fail(err, PK_E_CORRUPT, index_pos + i * PK_ENTRY_SIZE, expect, e.offset,
                           "index entry does not start where the previous record ended");
        }
        expect += e.stored_len;
    }
    if (expect != index_offset)
        return pk_fail(err, PK_E_CORRUPT, index_offset, index_offset, expect,
                       "records do not end where the index begins");
    return PK_OK;
}

int pk_shard_check_tail(const uint8_t *tail, size_t tail_len, uint64_t file_size, pk_shard_info *info,
                        pk_error *err) {
    if (file_size < PK_HEADER_SIZE + PK_FOOTER_SIZE || tail_len < PK_FOOTER_SIZE || tail_len > file_size)
        return pk_fail(err, PK_E_TRUNCATED, 0, PK_HEADER_SIZE + PK_FOOTER_SIZE, file_size,
                       "shard too short to hold a header and a footer");
    pk_footer f;
    int rc = pk_footer_decode(tail + tail_len - PK_FOOTER_SIZE, &f, err);
    if (rc) {
        if (err) err->offset += file_size - PK_FOOTER_SIZE;
        return rc;
    }
    uint64_t footer_pos = file_size - PK_FOOTER_SIZE;
    /* record_count <= 2^32 so the product cannot overflow. */
    uint64_t index_len = f.record_count * PK_ENTRY_SIZE;
    if (f.index_offset < PK_HEADER_SIZE || f.index_offset > footer_pos || footer_pos - f.index_offset != index_len)
        return pk_fail(err, PK_E_CORRUPT, footer_pos, footer_pos, f.index_offset + index_len,
                       "footer's index position and record count do not match the file size");
    if (index_len > tail_len - PK_FOOTER_SIZE)
        return pk_fail(err, PK_E_RANGE, f.index_offset, index_len + PK_FOOTER_SIZE, tail_len,
                       "tail too short to hold the index");
    const uint8_t *index = tail + tail_len - PK_FOOTER_SIZE - index_len;
    uint64_t got = pk_xxh64(index, (size_t)index_len, 0);
    if (got != f.index_checksum)
        return pk_fail(err, PK_E_CHECKSUM, f.index_offset, f.index_checksum, got, "index checksum");
    rc = check_entries(index, f.record_count, f.index_offset, f.index_offset, err);
    if (rc) return rc;
    if (info) {
        info->file_size = file_size;
        info->record_count = f.record_count;
        info->index_offset = f.index_offset;
        info->flags = f.flags;
        info->dict_id = 0;
        info->read_version = f.read_version;
        info->write_version = f.write_version;
    }
    return PK_OK;
}

void pk_shard_close(pk_shard *s) {
    if (!s) return;
    if (s->map) munmap((void *)s->map, s->info.file_size);
    if (s->fd >= 0) close(s->fd);
    free(s->index);
    free(s);
}

int pk_shard_open(const char *path, uint64_t expected_size, int map, pk_shard **out, pk_error *err) {
    *out = NULL;
    pk_shard *s = calloc(1, sizeof *s);
    if (!s) return pk_fail(err, PK_E_NOMEM, 0, 0, 0, "allocating a shard");
    s->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (s->fd < 0) {
        int e = errno;
        free(s);
        return io_fail(err, e, 0, "opening shard");
    }
    int rc;
    struct stat st;
    if (fstat(s->fd, &st) != 0) {
        rc = io_fail(err, errno, 0, "stat of shard");
        goto fail;
    }
    uint64_t size = (uint64_t)st.st_size;
    if (expected_size && size != expected_size) {
        rc = pk_fail(err, size < expected_size ? PK_E_TRUNCATED : PK_E_CORRUPT, size, expected_size, size,
                     "shard size differs from the manifest");
        goto fail;
    }
    if (size < PK_HEADER_SIZE + PK_FOOTER_SIZE) {
        rc = pk_fail(err, PK_E_TRUNCATED, 0, PK_HEADER_SIZE + PK_FOOTER_SIZE, size,
                     "shard too short to hold a header and a footer");
        goto fail;
    }
    uint8_t foot[PK_FOOTER_SIZE];
    rc = pread_exact(s->fd, foot, PK_FOOTER_SIZE, size - PK_FOOTER_SIZE, err);
    if (rc) goto fail;
    pk_footer f;
    rc = pk_footer_decode(foot, &f, err);
    if (rc) {
        if (err) err->offset += size - PK_FOOTER_SIZE;
        goto fail;
    }
    uint64_t footer_pos = size - PK_FOOTER_SIZE;
    uint64_t index_len = f.record_count * PK_ENTRY_SIZE;
    if (f.index_offset < PK_HEADER_SIZE || f.index_offset > footer_pos || footer_pos - f.index_offset != index_len) {
        rc = pk_fail(err, PK_E_CORRUPT, footer_pos, footer_pos, f.index_offset + index_len,
                     "footer's index position and record count do not match the file size");
        goto fail;
    }
    /* Read index and footer together, then reuse the tail check. */
    size_t tail_len = (size_t)(index_len + PK_FOOTER_SIZE);
    uint8_t *tail = malloc(tail_len);
    if (!tail) {
        rc = pk_fail(err, PK_E_NOMEM, f.index_offset, 0, tail_len, "allocating the shard index");
        goto fail;
    }
    rc = pread_exact(s->fd, tail, tail_len, f.index_offset, err);
    if (!rc) rc = pk_shard_check_tail(tail, tail_len, size, &s->info, err);
    if (rc) {
        free(tail);
        goto fail;
    }
    s->index = tail; /* entries first, the footer after them: harmless */
    uint8_t hdr[PK_HEADER_SIZE];
    pk_header h;
    rc = pread_exact(s->fd, hdr, PK_HEADER_SIZE, 0, err);
    if (!rc) rc = pk_header_decode(hdr, &h, err);
    if (rc) goto fail;
    if (h.flags != f.flags) {
        rc = pk_fail(err, PK_E_CORRUPT, 12, h.flags, f.flags, "header and footer flags differ");
        goto fail;
    }
    s->info.dict_id = h.dict_id;
    if (map & PK_MAP) {
        void *m = mmap(NULL, size, PROT_READ, MAP_SHARED, s->fd, 0);
        if (m == MAP_FAILED) {
            rc = io_fail(err, errno, 0, "mmap of shard");
            goto fail;
        }
        s->map = m;
#ifdef MADV_HUGEPAGE
        /* Advice: EINVAL on a kernel without THP leaves a plain mapping, which reads the same bytes. */
        if (map & PK_MAP_HUGE) (void)madvise(m, size, MADV_HUGEPAGE);
#endif
    }
    *out = s;
    return PK_OK;
fail:
    pk_shard_close(s);
    return rc;
}

void pk_shard_get_info(const pk_shard *s, pk_shard_info *info) { *info = s->info; }

int pk_shard_entry(const pk_shard *s, uint64_t i, pk_entry *e, pk_error *err) {
    if (i >= s->info.record_count)
        return pk_fail(err, PK_E_RANGE, 0, s->info.record_count, i, "record number out of range");
    pk_entry_decode(s->index + i * PK_ENTRY_SIZE, e);
    return PK_OK;
}

/* Is [offset, offset+len) inside the data region? */
static int in_data(const pk_shard *s, uint64_t offset, uint64_t len) {
    return offset >= PK_HEADER_SIZE && offset <= s->info.index_offset && s->info.index_offset - offset >= len;
}

int pk_shard_read(const pk_shard *s, uint64_t offset, uint32_t len, void *dst, pk_error *err) {
    if (!in_data(s, offset, len))
        return pk_fail(err, PK_E_CORRUPT, offset, s->info.index_offset, offset + (uint64_t)len,
                       "record extends outside the shard's data region");
    if (s->map) {
        if (len) memcpy(dst, s->map + offset, len);
        return PK_OK;
    }
    return pread_exact(s->fd, dst, len, offset, err);
}

int pk_shard_hash_range(const pk_shard *s, uint64_t start, uint64_t end, uint64_t *out, pk_error *err) {
    if (start > end || end > s->info.file_size)
        return pk_fail(err, PK_E_RANGE, start, s->info.file_size, end, "hash range outside the file");
    if (s->map) {
        *out = pk_xxh64(s->map + start, (size_t)(end - start), 0);
        return PK_OK;
    }
    enum { CHUNK = 1 << 20 };
    uint8_t *buf = malloc(CHUNK);
    if (!buf) return pk_fail(err, PK_E_NOMEM, 0, 0, CHUNK, "allocating a hash buffer");
    pk_xxh64_state st;
    pk_xxh64_init(&st, 0);
    int rc = PK_OK;
    for (uint64_t pos = start; pos < end;) {
        size_t n = end - pos < CHUNK ? (size_t)(end - pos) : CHUNK;
        rc = pread_exact(s->fd, buf, n, pos, err);
        if (rc) break;
        pk_xxh64_update(&st, buf, n);
        pos += n;
    }
    free(buf);
    if (!rc) *out = pk_xxh64_digest(&st);
    return rc;
}

int pk_shard_verify_records(const pk_shard *s, uint64_t start, uint64_t end, uint64_t *bad,
                            size_t bad_cap, size_t *nbad, pk_error *err) {
    *nbad = 0;
    if (start > end || end > s->info.record_count)
        return pk_fail(err, PK_E_RANGE, 0, s->info.record_count, end, "record range out of bounds");
    uint8_t *buf = NULL;
    size_t cap = 0;
    int rc = PK_OK;
    for (uint64_t i = start; i < end; i++) {
        pk_entry e;
        pk_entry_decode(s->index + i * PK_ENTRY_SIZE, &e);
        const uint8_t *p;
        if (s->map) {
            p = s->map + e.offset; /* entries were validated at open */
        } else {
            if (e.stored_len > cap) {
                uint8_t *q = realloc(buf, e.stored_len);
                if (!q) {
                    rc = pk_fail(err, PK_E_NOMEM, e.offset, 0, e.stored_len, "allocating a read buffer");
                    break;
                }
                buf = q;
                cap = e.stored_len;
            }
            rc = pread_exact(s->fd, buf, e.stored_len, e.offset, err);
            if (rc) break;
            p = buf;
        }
        if (pk_xxh3_64(p, e.stored_len) != e.checksum) {
            if (*nbad < bad_cap) bad[*nbad] = i;
            (*nbad)++;
        }
    }
    free(buf);
    return rc;
}

/* ---------------------------------------------------------------- shard sets */

struct pk_shardset {
    size_t n;
    char **paths;
    uint64_t *sizes;
    pk_shard **shards;       /* NULL until first use */
    int map;  /* PK_MAP[|PK_MAP_HUGE] or 0 */
    pthread_mutex_t lock;    /* guards opening */
};

int pk_shardset_new(size_t n, const char *const *paths, const uint64_t *sizes, int map,
                    pk_shardset **out, pk_error *err) {
    *out = NULL;
    pk_shardset *set = calloc(1, sizeof *set);
    if (!set) return pk_fail(err, PK_E_NOMEM, 0, 0, 0, "allocating a shard set");
    set->n = n;
    set->map = map;
    set->paths = calloc(n ? n : 1, sizeof *set->paths);
    set->sizes = calloc(n ? n : 1, sizeof *set->sizes);
    set->shards = calloc(n ? n : 1, sizeof *set->shards);
    if (!set->paths || !set->sizes || !set->shards) goto nomem;
    for (size_t i = 0; i < n; i++) {
        set->paths[i] = strdup(paths[i]);
        if (!set->paths[i]) goto nomem;
        set->sizes[i] = sizes ? sizes[i] : 0;
    }
    pthread_mutex_init(&set->lock, NULL);
    *out = set;
    return PK_OK;
nomem:
    if (set->paths)
        for (size_t i = 0; i < n; i++) free(set->paths[i]);
    free(set->paths);
    free(set->sizes);
    free(set->shards);
    free(set);
    return pk_fail(err, PK_E_NOMEM, 0, 0, 0, "allocating a shard set");
}

void pk_shardset_free(pk_shardset *set) {
    if (!set) return;
    for (size_t i = 0; i < set->n; i++) {
        pk_shard_close(set->shards[i]);
        free(set->paths[i]);
    }
    free(set->paths);
    free(set->sizes);
    free(set->shards);
    pthread_mutex_destroy(&set->lock);
    free(set);
}

int pk_shardset_get(pk_shardset *set, size_t i, pk_shard **out, pk_error *err) {
    if (i >= set->n) {
        if (err) err->shard = (int64_t)i;
        return pk_fail(err, PK_E_CORRUPT, 0, set->n, i, "index names a shard the manifest does not have");
    }
    pk_shard *s = __atomic_load_n(&set->shards[i], __ATOMIC_ACQUIRE);
    if (s) {
        *out = s;
        return PK_OK;
    }
    pthread_mutex_lock(&set->lock);
    int rc = PK_OK;
    s = set->shards[i];
    if (!s) {
        rc = pk_shard_open(set->paths[i], set->sizes[i], set->map, &s, err);
        if (!rc) __atomic_store_n(&set->shards[i], s, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&set->lock);
    if (rc && err) err->shard = (int64_t)i;
    *out = s;
    return rc;
}

/* A request in a batch, sorted by (shard, offset). */
typedef struct req {
    uint32_t shard;
    uint32_t len;
    uint64_t offset;
    uint64_t checksum;       /* expected XXH3-64 of the stored bytes */
    size_t pos;              /* position in the caller's batch */
} req;

static int req_cmp(const void *a, const void *b) {
    const req *x = a, *y = b;
    if (x->shard != y->shard) return x->shard < y->shard ? -1 : 1;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    return (x->pos > y->pos) - (x->pos < y->pos);
}

/* A record's checksum: got is the XXH3-64 of the bytes handed to the caller. */
static int check_sum(uint64_t got, uint64_t want, const req *r, pk_error *err) {
    if (got == want) return PK_OK;
    if (err) {
        err->shard = r->shard;
        err->item = (int64_t)r->pos;
    }
    return pk_fail(err, PK_E_CHECKSUM, r->offset, want, got, "record checksum");
}

#if defined(__GNUC__) || defined(__clang__)
#define PK_PREFETCH(addr) __builtin_prefetch((addr), 0, 3)
#else
#define PK_PREFETCH(addr) ((void)(addr))
#endif

/* How much of the next record of a batch to ask the CPU for while the current one is copied: its first
 * cache-line misses then overlap with useful work instead of stalling the copy.  Measured with
 * benchmarks/limits.c on 200,000 random samples (6.8 KB on average, AMD EPYC): 1 KiB ahead took the
 * verified copy (pk_xxh3_64_copy) from about 0.65x to about 0.8x of plain memcpy's rate (512 B: less;
 * 2 and 4 KiB: no better), and plain memcpy itself up by about 15%. */
enum { PREFETCH_NEXT = 1024 };

/* Prefetch the start of the record r asks for, if its shard is open and mapped and the record lies in the
 * shard's data region (a bad index entry is reported when its turn comes, not here).  Forced inline: GCC
 * may drop calls to an out-of-line function that does nothing but prefetch (it counts as pure). */
static inline __attribute__((always_inline)) void prefetch_req(pk_shardset *set, const req *r) {
    if (r->shard >= set->n) return;
    const pk_shard *s = __atomic_load_n(&set->shards[r->shard], __ATOMIC_ACQUIRE);
    if (!s || !s->map || !in_data(s, r->offset, r->len)) return;
    const uint8_t *p = s->map + r->offset;
    uint32_t n = r->len < PREFETCH_NEXT ? r->len : PREFETCH_NEXT;
    for (uint32_t o = 0; o < n; o += 64) PK_PREFETCH(p + o);
}

int pk_read_batch(pk_shardset *set, const pk_index_cols *cols, const int64_t *rows, size_t n,
                  uint8_t *const *dst, const pk_read_opts *opts, size_t *nreads, pk_error *err) {
    size_t reads = 0;
    if (nreads) *nreads = 0;
    if (n == 0) return PK_OK;
    req stack_reqs[64];
    req *reqs = n <= 64 ? stack_reqs : malloc(n * sizeof *reqs);
    if (!reqs) return pk_fail(err, PK_E_NOMEM, 0, 0, n, "allocating a batch");
    int rc = PK_OK;
    for (size_t k = 0; k < n; k++) {
        int64_t row = rows[k];
        if (row < 0 || (uint64_t)row >= cols->nrows) {
            if (err) err->item = (int64_t)k;
            rc = pk_fail(err, PK_E_RANGE, 0, cols->nrows, (uint64_t)row, "sample index out of range");
            goto out;
        }
        reqs[k].shard = cols->shard[row];
        reqs[k].offset = cols->offset[row];
        reqs[k].len = cols->stored_len[row];
        reqs[k].checksum = cols->checksum[row];  /* gathered here, where the cache misses of random rows overlap */
        reqs[k].pos = k;
    }
    /* Sorting pays for coalescing preads; an mmap read is a memcpy wherever the record lies. */
    if (n > 1 && !(set->map & PK_MAP)) qsort(reqs, n, sizeof *reqs, req_cmp);

    uint8_t *scratch = NULL;
    size_t scratch_cap = 0;
    pk_shard *s = NULL;
    uint32_t s_id = UINT32_MAX;
    for (size_t a = 0; a < n;) {
        const req *r = &reqs[a];
        if (r->shard != s_id) {
            rc = pk_shardset_get(set, r->shard, &s, err);
            if (rc) {
                if (err) err->item = (int64_t)r->pos;
                break;
            }
            s_id = r->shard;
        }
        if (!in_data(s, r->offset, r->len)) {
            if (err) {
                err->shard = r->shard;
                err->item = (int64_t)r->pos;
            }
            rc = pk_fail(err, PK_E_CORRUPT, r->offset, s->info.index_offset, r->offset + (uint64_t)r->len,
                         "index points outside the shard's data region");
            break;
        }
        /* Extend a run of neighbours in the same shard. */
        size_t b = a + 1;
        uint64_t run_end = r->offset + r->len;
        if (!s->map) {
            while (b < n && reqs[b].shard == s_id && in_data(s, reqs[b].offset, reqs[b].len)) {
                uint64_t end = reqs[b].offset + reqs[b].len;
                if (reqs[b].offset > run_end && reqs[b].offset - run_end > opts->max_gap) break;
                uint64_t new_end = end > run_end ? end : run_end;
                if (new_end - r->offset > opts->max_read) break;
                run_end = new_end;
                b++;
            }
        }
        if (s->map) {
            /* Straight from the mapping into the caller's buffer; a verified read copies and hashes in one
             * pass, and the hash is that of the bytes written to the caller's buffer. */
            if (b < n) prefetch_req(set, &reqs[b]);
            uint8_t *d = dst[r->pos];
            const uint8_t *src = s->map + r->offset;
            reads++;
            if (opts->verify)
                rc = check_sum(pk_xxh3_64_copy(d, src, r->len), r->checksum, r, err);
            else if (r->len)
                memcpy(d, src, r->len);
        } else if (b == a + 1) {
            /* A lone record: pread straight into the caller's buffer, then hash it there. */
            rc = pread_exact(s->fd, dst[r->pos], r->len, r->offset, err);
            reads++;
            if (!rc && opts->verify)
                rc = check_sum(pk_xxh3_64(dst[r->pos], r->len), r->checksum, r, err);
        } else {
            size_t span = (size_t)(run_end - r->offset);
            if (span > scratch_cap) {
                uint8_t *p = realloc(scratch, span);
                if (!p) {
                    rc = pk_fail(err, PK_E_NOMEM, r->offset, 0, span, "allocating a read buffer");
                    break;
                }
                scratch = p;
                scratch_cap = span;
            }
            rc = pread_exact(s->fd, scratch, span, r->offset, err);
            reads++;
            for (size_t k = a; !rc && k < b; k++) {
                const req *q = &reqs[k];
                const uint8_t *src = span ? scratch + (q->offset - r->offset) : scratch; /* empty run: no NULL + 0 */
                if (opts->verify)
                    rc = check_sum(pk_xxh3_64_copy(dst[q->pos], src, q->len), q->checksum, q, err);
                else if (q->len)
                    memcpy(dst[q->pos], src, q->len);
            }
        }
        if (rc) {
            if (err && err->shard < 0) err->shard = s_id;
            break;
        }
        a = b;
    }
    free(scratch);
out:
    if (reqs != stack_reqs) free(reqs);
    if (nreads) *nreads = reads;
    return rc;
}

int pk_verify_buffers(size_t n, const uint8_t *const *bufs, const uint32_t *lens, const uint64_t *checksums,
                      pk_error *err) {
    for (size_t k = 0; k < n; k++) {
        uint64_t got = pk_xxh3_64(bufs[k], lens[k]);
        if (got != checksums[k]) {
            if (err) err->item = (int64_t)k;
            return pk_fail(err, PK_E_CHECKSUM, 0, checksums[k], got, "record checksum");
        }
    }
    return PK_OK;
}
