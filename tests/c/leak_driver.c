/*
 * leak_driver.c -- exercises every allocation path of the C core, error paths included, for
 * tests/test_leaks.py to run under valgrind memcheck and under LeakSanitizer.
 *
 *   gcc -g -Isrc_c tests/c/leak_driver.c src_c/format.c src_c/checksum.c src_c/reader.c src_c/writer.c \
 *       -lpthread -o leak_driver && valgrind --leak-check=full ./leak_driver SCRATCH_DIR
 *
 * Paths covered: writer open/append/append_file/close/abort and its refusals (existing file, unknown
 * flags, missing input file, a directory as input, a record over the size limit); shard open in both
 * modes on good, truncated, corrupt, newer-version and missing files; entry/read/verify/hash_range and
 * their range errors; shard sets with a missing and a corrupt shard; batch reads (direct, coalesced,
 * mmap) that succeed and that fail mid-run on a checksum or a bad row; pk_verify_buffers.
 * Prints "ok" and exits 0 when every call returned what it should.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checksum.h"
#include "format.h"
#include "reader.h"
#include "writer.h"

#define CHECK(cond)                                                              \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);      \
            exit(1);                                                             \
        }                                                                        \
    } while (0)

static char dir[4096];

static const char *path(const char *name) {
    static char buf[8][4200];
    static int k;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof buf[k], "%s/%s", dir, name);
    return buf[k];
}

static void clear(pk_error *e) {
    memset(e, 0, sizeof *e);
    e->shard = -1;
    e->item = -1;
}

static void put_file(const char *p, const void *data, size_t n) {
    FILE *f = fopen(p, "wb");
    CHECK(f && fwrite(data, 1, n, f) == n && fclose(f) == 0);
}

static size_t get_file(const char *p, uint8_t **out) {
    FILE *f = fopen(p, "rb");
    CHECK(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    *out = malloc((size_t)n + 1);
    CHECK(*out && fread(*out, 1, (size_t)n, f) == (size_t)n);
    fclose(f);
    return (size_t)n;
}

#define NREC 50

/* Write a shard of NREC records (sizes 0..~40 KiB, one big record past the writer's buffer). */
static void write_shard(const char *p, uint64_t *offs, uint32_t *lens, uint64_t *sums, uint64_t *size) {
    pk_writer *w = NULL;
    pk_error e;
    clear(&e);
    CHECK(pk_writer_open(p, 0, 0, &w, &e) == PK_OK);
    for (int i = 0; i < NREC; i++) {
        uint32_t n = i == 7 ? (3u << 20) : (uint32_t)(i * 811 % 40000) * (i % 5 != 0);
        uint8_t *buf = malloc(n ? n : 1);
        CHECK(buf);
        for (uint32_t k = 0; k < n; k++) buf[k] = (uint8_t)(k * 31 + i);
        pk_entry en;
        clear(&e);
        CHECK(pk_writer_append(w, buf, n, n, PK_CODEC_NONE, &en, &e) == PK_OK);
        offs[i] = en.offset;
        lens[i] = en.stored_len;
        sums[i] = en.checksum;
        free(buf);
    }
    pk_writer_summary s;
    clear(&e);
    CHECK(pk_writer_close(w, &s, &e) == PK_OK);
    CHECK(s.record_count == NREC);
    *size = s.file_size;
}

static void writer_paths(void) {
    pk_error e;
    pk_writer *w = NULL;
    /* Refusals. */
    clear(&e);
    CHECK(pk_writer_open(path("w1.pack"), 0x80, 0, &w, &e) != PK_OK && w == NULL);
    clear(&e);
    CHECK(pk_writer_open(path("w1.pack"), 0, 0, &w, &e) == PK_OK);
    pk_writer *w2 = NULL;
    clear(&e);
    CHECK(pk_writer_open(path("w1.pack"), 0, 0, &w2, &e) == PK_E_IO && w2 == NULL); /* O_EXCL */
    clear(&e);
    CHECK(pk_writer_open(path("no/such/dir.pack"), 0, 0, &w2, &e) == PK_E_IO && w2 == NULL);
    /* append_file: good, missing, directory. */
    put_file(path("in.bin"), "hello file", 10);
    pk_entry en;
    clear(&e);
    CHECK(pk_writer_append_file(w, path("in.bin"), 10, &en, &e) == PK_OK && en.stored_len == 10);
    clear(&e);
    CHECK(pk_writer_append_file(w, path("missing.bin"), -1, &en, &e) == PK_E_IO);
    clear(&e);
    CHECK(pk_writer_append_file(w, dir, -1, &en, &e) != PK_OK);
    /* Unknown codec and raw/stored mismatch for raw records. */
    clear(&e);
    CHECK(pk_writer_append(w, "abc", 3, 3, 9, &en, &e) != PK_OK);
    clear(&e);
    CHECK(pk_writer_append(w, "abc", 3, 4, PK_CODEC_NONE, &en, &e) != PK_OK);
    /* Abort after data: frees everything, leaves a file no reader accepts. */
    clear(&e);
    CHECK(pk_writer_append(w, "abc", 3, 3, PK_CODEC_NONE, &en, &e) == PK_OK);
    pk_writer_abort(w);
    pk_shard *s = NULL;
    clear(&e);
    CHECK(pk_shard_open(path("w1.pack"), 0, 0, &s, &e) != PK_OK && s == NULL);
    /* An empty shard. */
    clear(&e);
    CHECK(pk_writer_open(path("empty.pack"), 0, 0, &w, &e) == PK_OK);
    pk_writer_summary sum;
    clear(&e);
    CHECK(pk_writer_close(w, &sum, &e) == PK_OK && sum.record_count == 0);
    for (int m = 0; m < 2; m++) {
        clear(&e);
        CHECK(pk_shard_open(path("empty.pack"), sum.file_size, m, &s, &e) == PK_OK);
        pk_shard_close(s);
    }
    /* Writer over an fd, then closed. */
    int fd = open(path("fd.pack"), O_WRONLY | O_CREAT | O_EXCL, 0644);
    CHECK(fd >= 0);
    clear(&e);
    CHECK(pk_writer_open_fd(fd, 0, 0, &w, &e) == PK_OK);
    clear(&e);
    CHECK(pk_writer_append(w, "x", 1, 1, PK_CODEC_NONE, &en, &e) == PK_OK);
    clear(&e);
    CHECK(pk_writer_close(w, &sum, &e) == PK_OK);
}

static void reader_paths(const uint64_t *offs, const uint32_t *lens, const uint64_t *sums, uint64_t size) {
    pk_error e;
    pk_shard *s = NULL;
    for (int m = 0; m < 2; m++) {
        clear(&e);
        CHECK(pk_shard_open(path("good.pack"), size, m, &s, &e) == PK_OK);
        pk_entry en;
        for (uint64_t i = 0; i < NREC; i++) {
            clear(&e);
            CHECK(pk_shard_entry(s, i, &en, &e) == PK_OK && en.offset == offs[i]);
            uint8_t *buf = malloc(lens[i] ? lens[i] : 1);
            clear(&e);
            CHECK(pk_shard_read(s, en.offset, en.stored_len, buf, &e) == PK_OK);
            CHECK(pk_xxh3_64(buf, lens[i]) == sums[i]);
            free(buf);
        }
        clear(&e);
        CHECK(pk_shard_entry(s, NREC, &en, &e) == PK_E_RANGE);
        uint8_t small[16];
        clear(&e);
        CHECK(pk_shard_read(s, size, 16, small, &e) == PK_E_CORRUPT);
        uint64_t bad[4];
        size_t nbad;
        clear(&e);
        CHECK(pk_shard_verify_records(s, 0, NREC, bad, 4, &nbad, &e) == PK_OK && nbad == 0);
        clear(&e);
        CHECK(pk_shard_verify_records(s, 0, NREC + 1, bad, 4, &nbad, &e) == PK_E_RANGE);
        uint64_t h;
        clear(&e);
        CHECK(pk_shard_hash_range(s, 0, size, &h, &e) == PK_OK);
        clear(&e);
        CHECK(pk_shard_hash_range(s, 0, size + 1, &h, &e) == PK_E_RANGE);
        pk_shard_close(s);
        /* Failures at open: every one must free what it allocated. */
        clear(&e);
        CHECK(pk_shard_open(path("missing.pack"), 0, m, &s, &e) == PK_E_IO && s == NULL);
        clear(&e);
        CHECK(pk_shard_open(path("good.pack"), size + 1, m, &s, &e) != PK_OK && s == NULL);
        clear(&e);
        CHECK(pk_shard_open(path("truncated.pack"), 0, m, &s, &e) != PK_OK && s == NULL);
        clear(&e);
        CHECK(pk_shard_open(path("badindex.pack"), 0, m, &s, &e) == PK_E_CHECKSUM && s == NULL);
        clear(&e);
        CHECK(pk_shard_open(path("badheader.pack"), 0, m, &s, &e) != PK_OK && s == NULL);
        clear(&e);
        CHECK(pk_shard_open(path("baddata.pack"), 0, m, &s, &e) == PK_OK);
        clear(&e);
        CHECK(pk_shard_verify_records(s, 0, NREC, bad, 1, &nbad, &e) == PK_OK && nbad == 1);
        pk_shard_close(s);
        clear(&e);
        CHECK(pk_shard_open(dir, 0, m, &s, &e) != PK_OK && s == NULL);
    }
    /* The tail check on its own, on good and on cut bytes. */
    uint8_t *all;
    size_t n = get_file(path("good.pack"), &all);
    pk_shard_info info;
    clear(&e);
    CHECK(pk_shard_check_tail(all, n, n, &info, &e) == PK_OK && info.record_count == NREC);
    clear(&e);
    CHECK(pk_shard_check_tail(all + n - 100, 100, n, &info, &e) != PK_OK);
    free(all);
}

static void batch_paths(const uint64_t *offs, const uint32_t *lens, const uint64_t *sums, uint64_t size) {
    /* Index of 3 shards: good, missing, bad data (records identical to good's). */
    enum { ROWS = 3 * NREC + 1 };
    uint32_t shard[ROWS], stored[ROWS];
    uint64_t offset[ROWS], sum[ROWS];
    for (int k = 0; k < 3; k++)
        for (int i = 0; i < NREC; i++) {
            shard[k * NREC + i] = (uint32_t)k;
            offset[k * NREC + i] = offs[i];
            stored[k * NREC + i] = lens[i];
            sum[k * NREC + i] = sums[i];
        }
    shard[ROWS - 1] = 0; /* a row pointing outside the data region */
    offset[ROWS - 1] = size - 10;
    stored[ROWS - 1] = 5;
    sum[ROWS - 1] = 0;
    const char *paths[3] = {path("good.pack"), path("missing.pack"), path("baddata.pack")};
    uint64_t sizes[3] = {size, size, size};
    pk_index_cols cols = {ROWS, shard, offset, stored, sum};
    for (int m = 0; m < 2; m++) {
        pk_shardset *set = NULL;
        pk_error e;
        clear(&e);
        CHECK(pk_shardset_new(3, paths, sizes, m, &set, &e) == PK_OK);
        int64_t rows[2 * NREC];
        uint8_t *dst[2 * NREC];
        pk_read_opts opts = {1, 1 << 16, 1 << 20};
        /* All of shard 0, in reverse, twice each: coalesced runs in pread mode. */
        for (int k = 0; k < 2 * NREC; k++) {
            rows[k] = (NREC - 1) - k / 2;
            dst[k] = malloc(stored[rows[k]] ? stored[rows[k]] : 1);
        }
        size_t nreads;
        clear(&e);
        CHECK(pk_read_batch(set, &cols, rows, 2 * NREC, dst, &opts, &nreads, &e) == PK_OK);
        for (int k = 0; k < 2 * NREC; k++) CHECK(pk_xxh3_64(dst[k], stored[rows[k]]) == sum[rows[k]]);
        /* Failing batches: a missing shard, a checksum mismatch mid-run, a row outside the data,
         * a row outside the index. */
        int64_t fail_rows[4][3] = {{0, NREC + 1, 2}, {1, 2 * NREC + 3, 2 * NREC + 4}, {3, ROWS - 1, 4}, {0, ROWS, 1}};
        int want[4] = {PK_E_IO, PK_E_CHECKSUM, PK_E_CORRUPT, PK_E_RANGE};
        for (int f = 0; f < 4; f++) {
            clear(&e);
            CHECK(pk_read_batch(set, &cols, fail_rows[f], 3, dst, &opts, NULL, &e) == want[f]);
        }
        for (int k = 0; k < 2 * NREC; k++) free(dst[k]);
        pk_shardset_free(set);
    }
    /* A shard set that is never used, and an empty one. */
    pk_shardset *set = NULL;
    pk_error e;
    clear(&e);
    CHECK(pk_shardset_new(3, paths, sizes, 0, &set, &e) == PK_OK);
    pk_shardset_free(set);
    clear(&e);
    CHECK(pk_shardset_new(0, NULL, NULL, 0, &set, &e) == PK_OK);
    pk_shardset_free(set);
    /* Buffers checked in memory. */
    const uint8_t *bufs[2] = {(const uint8_t *)"abc", (const uint8_t *)"def"};
    uint32_t blens[2] = {3, 3};
    uint64_t bsums[2] = {pk_xxh3_64("abc", 3), 0};
    clear(&e);
    CHECK(pk_verify_buffers(1, bufs, blens, bsums, &e) == PK_OK);
    clear(&e);
    CHECK(pk_verify_buffers(2, bufs, blens, bsums, &e) == PK_E_CHECKSUM && e.item == 1);
}

int main(int argc, char **argv) {
    CHECK(argc == 2);
    snprintf(dir, sizeof dir, "%s", argv[1]);
    static uint64_t offs[NREC], sums[NREC];
    static uint32_t lens[NREC];
    uint64_t size;
    write_shard(path("good.pack"), offs, lens, sums, &size);
    /* Damaged copies. */
    uint8_t *img;
    size_t n = get_file(path("good.pack"), &img);
    put_file(path("truncated.pack"), img, n - 7);
    img[n - PK_FOOTER_SIZE - 5] ^= 1; /* in the index */
    put_file(path("badindex.pack"), img, n);
    img[n - PK_FOOTER_SIZE - 5] ^= 1;
    img[3] ^= 1; /* in the header magic */
    put_file(path("badheader.pack"), img, n);
    img[3] ^= 1;
    img[offs[3] + 1] ^= 1; /* in record 3's data */
    put_file(path("baddata.pack"), img, n);
    free(img);
    writer_paths();
    reader_paths(offs, lens, sums, size);
    batch_paths(offs, lens, sums, size);
    puts("ok");
    return 0;
}
