/*
 * reader.h -- open shards and read records from them.
 *
 * pk_shard_open() trusts nothing: it reads the footer from the tail, checks magic, checksum and
 * version, checks that the index lies exactly between the records and the footer, checks the index
 * checksum, the header, and that the entries tile the data region back to back.  Only then are
 * records served; every read is still bounds-checked against the data region and, unless the
 * caller opts out, checked against its checksum before the bytes are handed back.
 *
 * A pk_shardset holds the shards of one dataset, opened lazily and thread-safely on first use, and
 * serves batches: requested rows are sorted by (shard, offset), neighbours are coalesced into one
 * pread (in pread mode) and every record lands in the caller's buffer for its position in the batch.
 */
#ifndef PACKFMT_READER_H
#define PACKFMT_READER_H

#include <stddef.h>
#include <stdint.h>

#include "format.h"

typedef struct pk_shard pk_shard;

/* What a shard says about itself. */
typedef struct pk_shard_info {
    uint64_t file_size;
    uint64_t record_count;
    uint64_t index_offset;   /* end of the data region */
    uint32_t flags;          /* PK_SHARD_* */
    uint32_t dict_id;
    uint16_t read_version;
    uint16_t write_version;
} pk_shard_info;

/* How a shard is read (the `map` argument of pk_shard_open / pk_shardset_new, a bit set):
 *   0                     pread(2), neighbours coalesced;
 *   PK_MAP                map the file read-only: a read becomes a memcpy from the page cache;
 *   PK_MAP | PK_MAP_HUGE  also madvise(MADV_HUGEPAGE): where the kernel and file system allow it
 *                         (Linux THP, large page-cache folios: ext4 >= 6.16, xfs, tmpfs), the page cache
 *                         fills 2 MiB folios on a fault and maps them with one TLB entry each, so random
 *                         reads from a hot shard miss the TLB far less.  A fault on an uncached region
 *                         then reads 2-4 MiB: for random reads of a dataset larger than memory, leave it
 *                         off (or use pread).  Advice only: a kernel that refuses it reads as PK_MAP. */
enum { PK_MAP = 1, PK_MAP_HUGE = 2 };

/* Open and validate a shard.  expected_size: the size the manifest records, 0 to accept any.
 * map: 0 or PK_MAP[|PK_MAP_HUGE], above. */
int pk_shard_open(const char *path, uint64_t expected_size, int map, pk_shard **out, pk_error *err);

/* Validate a shard held in memory (tail = the last tail_len bytes of a file of file_size bytes,
 * containing at least the footer and the index).  Used for remote shards and by the fuzzer. */
int pk_shard_check_tail(const uint8_t *tail, size_t tail_len, uint64_t file_size, pk_shard_info *info,
                        pk_error *err);

void pk_shard_close(pk_shard *s);
void pk_shard_get_info(const pk_shard *s, pk_shard_info *info);

/* The i-th index entry, O(1). */
int pk_shard_entry(const pk_shard *s, uint64_t i, pk_entry *e, pk_error *err);

/* Copy stored bytes [offset, offset+len) of the data region into dst. */
int pk_shard_read(const pk_shard *s, uint64_t offset, uint32_t len, void *dst, pk_error *err);

/* Check the checksums of records [start, end).  Bad record numbers go to bad[0..bad_cap), their
 * count to *nbad (it may exceed bad_cap).  Returns PK_OK unless I/O fails. */
int pk_shard_verify_records(const pk_shard *s, uint64_t start, uint64_t end, uint64_t *bad,
                            size_t bad_cap, size_t *nbad, pk_error *err);

/* XXH64 of bytes [start, end) of the file, read in chunks. */
int pk_shard_hash_range(const pk_shard *s, uint64_t start, uint64_t end, uint64_t *out, pk_error *err);

/* --- shard sets and batch reads --- */

typedef struct pk_shardset pk_shardset;

int pk_shardset_new(size_t n, const char *const *paths, const uint64_t *sizes, int map,
                    pk_shardset **out, pk_error *err);
void pk_shardset_free(pk_shardset *set);
/* The i-th shard, opened on first use (thread-safe). */
int pk_shardset_get(pk_shardset *set, size_t i, pk_shard **out, pk_error *err);

/* Columns of the global sample index (one element per sample). */
typedef struct pk_index_cols {
    uint64_t nrows;
    const uint32_t *shard;
    const uint64_t *offset;
    const uint32_t *stored_len;
    const uint64_t *checksum;
} pk_index_cols;

/* Tuning of batch reads.  In pread mode, records whose gap is at most max_gap bytes are read by one
 * pread of at most max_read bytes. */
typedef struct pk_read_opts {
    int verify;              /* check each record's checksum */
    uint64_t max_gap;
    uint64_t max_read;
} pk_read_opts;

/* Read the stored bytes of rows[0..n) into dst[0..n) (dst[k] must hold stored_len[rows[k]] bytes).
 * *nreads (optional) receives the number of reads issued.  On error, err->item is the position in
 * rows and err->shard the shard. */
int pk_read_batch(pk_shardset *set, const pk_index_cols *cols, const int64_t *rows, size_t n,
                  uint8_t *const *dst, const pk_read_opts *opts, size_t *nreads, pk_error *err);

/* Check stored bytes fetched elsewhere (remote reads): XXH3-64 of buf[k] against checksums[k]. On a
 * mismatch err->item is k. */
int pk_verify_buffers(size_t n, const uint8_t *const *bufs, const uint32_t *lens, const uint64_t *checksums,
                      pk_error *err);

#endif /* PACKFMT_READER_H */
