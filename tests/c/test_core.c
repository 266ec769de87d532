/*
 * test_core.c -- the shard writer and reader tested from C alone (no Python.h).
 * Built and run by tests/test_c_core.py, with -Wall -Wextra -Werror and again under
 * -fsanitize=address,undefined:
 *     gcc -Isrc_c tests/c/test_core.c src_c/format.c src_c/checksum.c src_c/reader.c src_c/writer.c -lpthread
 *     ./a.out SCRATCH_DIR
 * Prints "ok <name>" per case; exits non-zero with the failing line on the first failure.
 */
#define _GNU_SOURCE
#include <errno.h>
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

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);              \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

/* A call that must return rc; on mismatch print the error it reported. */
#define EXPECT_RC(rc, call)                                                              \
    do {                                                                                 \
        int got_ = (call);                                                               \
        if (got_ != (rc)) {                                                              \
            fprintf(stderr, "FAIL %s:%d: %s returned %d (%s), want %d\n", __FILE__,      \
                    __LINE__, #call, got_, err.msg, (rc));                               \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

#define NREC 40

static char root[4096];
static pk_error err;

static void reset_err(void) {
    memset(&err, 0, sizeof err);
    err.shard = -1;
    err.item = -1;
}

static const char *path_of(const char *name) {
    static char buf[8][4200];
    static int k;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof buf[k], "%s/%s", root, name);
    return buf[k];
}

/* Deterministic pseudo-random bytes (xorshift). */
static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static uint64_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static uint8_t *records[NREC];
static uint32_t lens[NREC];

static void make_records(void) {
    for (int i = 0; i < NREC; i++) {
        uint32_t n;
        switch (i % 8) {
        case 0: n = 0; break;
        case 1: n = 1; break;
        case 2: n = 31; break;
        case 3: n = 32; break;
        case 4: n = (uint32_t)(rnd() % 5000); break;
        case 5: n = (uint32_t)(rnd() % 200); break;
        case 6: n = i == 14 ? (1u << 20) + 77 : 4096; break; /* one record larger than the write buffer */
        default: n = (uint32_t)(rnd() % 70000); break;
        }
        lens[i] = n;
        records[i] = malloc(n ? n : 1);
        CHECK(records[i]);
        for (uint32_t j = 0; j < n; j++) records[i][j] = (uint8_t)rnd();
    }
}

static uint8_t *slurp(const char *path, size_t *len) {
    int fd = open(path, O_RDONLY);
    CHECK(fd >= 0);
    struct stat st;
    CHECK(fstat(fd, &st) == 0);
    uint8_t *p = malloc((size_t)st.st_size + 1);
    CHECK(p);
    CHECK(pread(fd, p, (size_t)st.st_size, 0) == st.st_size);
    close(fd);
    *len = (size_t)st.st_size;
    return p;
}

static void spit(const char *path, const uint8_t *p, size_t len) {
    unlink(path);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
    CHECK(fd >= 0);
    CHECK(write(fd, p, len) == (ssize_t)len);
    close(fd);
}

static pk_entry entries[NREC];

/* Write the NREC records into name; returns the summary. */
static pk_writer_summary write_shard(const char *name, uint32_t flags, uint32_t dict_id) {
    pk_writer *w;
    reset_err();
    unlink(path_of(name));
    EXPECT_RC(PK_OK, pk_writer_open(path_of(name), flags, dict_id, &w, &err));
    CHECK(pk_writer_size(w) == PK_HEADER_SIZE);
    for (int i = 0; i < NREC; i++) {
        uint32_t codec = (flags & PK_SHARD_HAS_ZSTD) && i % 3 == 1 ? PK_CODEC_ZSTD : PK_CODEC_NONE;
        if ((flags & PK_SHARD_HAS_DICT) && i % 3 == 2) codec = PK_CODEC_ZSTD_DICT;
        /* The core stores bytes as given; the codec only tells the reader how to decode them. */
        uint32_t raw = codec == PK_CODEC_NONE ? lens[i] : lens[i] + 10;
        uint64_t before = pk_writer_size(w);
        EXPECT_RC(PK_OK, pk_writer_append(w, records[i], lens[i], raw, codec, &entries[i], &err));
        CHECK(entries[i].offset == before);
        CHECK(entries[i].stored_len == lens[i]);
        CHECK(entries[i].raw_len == raw);
        CHECK(entries[i].flags == codec);
        CHECK(entries[i].checksum == pk_xxh3_64(records[i], lens[i]));
        CHECK(pk_writer_count(w) == (uint64_t)i + 1);
    }
    pk_writer_summary s;
    EXPECT_RC(PK_OK, pk_writer_close(w, &s, &err));
    return s;
}

static void test_checksum(void) {
    CHECK(pk_xxh64("", 0, 0) == 0xEF46DB3751D8E999ULL);
    CHECK(pk_xxh64("a", 1, 0) == 0xD24EC4F1A98C6E5BULL);
    CHECK(pk_xxh64("abc", 3, 0) == 0x44BC2CF5AD770999ULL);
    uint8_t buf[300];
    for (int i = 0; i < 300; i++) buf[i] = (uint8_t)(i * 7 + 3);
    /* Streaming in pieces of every size equals one shot, for every length and a non-zero seed. */
    for (size_t n = 0; n <= 300; n += 7) {
        for (size_t piece = 1; piece <= 40; piece += 13) {
            pk_xxh64_state st;
            pk_xxh64_init(&st, 12345);
            for (size_t at = 0; at < n; at += piece) pk_xxh64_update(&st, buf + at, n - at < piece ? n - at : piece);
            CHECK(pk_xxh64_digest(&st) == pk_xxh64(buf, n, 12345));
        }
    }
    /* Unaligned input gives the same answer. */
    CHECK(pk_xxh64(buf + 1, 100, 0) == pk_xxh64(memcpy(buf + 150, buf + 1, 100), 100, 0));
    printf("ok checksum\n");
}

/* XXH3-64 (seed 0): one length in and at the edge of each of the spec's paths, values from the `xxhash`
 * package (xxh3_64_intdigest) over bytes (i * 7 + 3) & 255; both the scalar and the AVX2 code. */
static void test_xxh3(void) {
    static const struct { size_t len; uint64_t want; } vec[] = {
        {0, 0x2D06800538D394C2ULL}, {1, 0x13E608BC156DEFEDULL}, {3, 0xA9088DDA485B481CULL},
        {4, 0x6D9253B16C8B1ED3ULL}, {8, 0x60539DB630471163ULL}, {9, 0xFEFF668361D723A8ULL},
        {16, 0xB8C859B0F030B585ULL}, {17, 0x714A04408E79B80FULL}, {128, 0x67425A03650261BFULL},
        {129, 0xC664BF3311C6ABC4ULL}, {240, 0x64556DC6B462A6CFULL}, {241, 0x8BEADD3A8874FE17ULL},
        {1024, 0x9B81661C641C72B1ULL}, {1025, 0x806C2072ED713576ULL}, {1088, 0x2F8781E01841F0DAULL},
        {4100, 0x6C403D9BB4B0DAF5ULL},
    };
    enum { N = 4100 };
    uint8_t *buf = malloc(N + 1), *odd = malloc(N + 1);
    CHECK(buf && odd);
    for (size_t i = 0; i < N; i++) buf[i] = (uint8_t)(i * 7 + 3);
    memcpy(odd + 1, buf, N); /* the same bytes at an odd address */
    int best = pk_xxh3_impl(PK_XXH3_AVX2);
    for (int impl = PK_XXH3_SCALAR; impl <= best; impl++) {
        CHECK(pk_xxh3_impl(impl) == impl);
        CHECK(pk_xxh3_64(NULL, 0) == 0x2D06800538D394C2ULL);
        CHECK(pk_xxh3_64("a", 1) == 0xE6C632B61E964E1FULL && pk_xxh3_64("abc", 3) == 0x78AF5F94892F3950ULL);
        for (size_t k = 0; k < sizeof vec / sizeof vec[0]; k++) {
            CHECK(pk_xxh3_64(buf, vec[k].len) == vec[k].want);
            CHECK(pk_xxh3_64(odd + 1, vec[k].len) == vec[k].want);
        }
    }
    /* Scalar and AVX2 agree on every length across a few blocks, and the fused copy-and-hash returns the
     * same value while copying exactly n bytes (to an odd address; the guard bytes after stay intact). */
    uint8_t *copy = malloc(N + 9);
    CHECK(copy != NULL);
    for (size_t n = 0; n <= N; n += (n < 300 ? 1 : 37)) {
        pk_xxh3_impl(PK_XXH3_SCALAR);
        uint64_t a = pk_xxh3_64(odd + 1, n);
        for (int impl = PK_XXH3_SCALAR; impl <= best; impl++) {
            pk_xxh3_impl(impl);
            CHECK(pk_xxh3_64(odd + 1, n) == a);
            memset(copy, 0x5A, N + 9);
            CHECK(pk_xxh3_64_copy(copy + 3, odd + 1, n) == a);
            CHECK(memcmp(copy + 3, odd + 1, n) == 0);
            CHECK(copy[2] == 0x5A && copy[3 + n] == 0x5A);
        }
    }
    CHECK(pk_xxh3_64_copy(NULL, NULL, 0) == 0x2D06800538D394C2ULL);
    free(copy);
    free(buf);
    free(odd);
    pk_xxh3_impl(best);
    printf("ok xxh3\n");
}

static void test_structs(void) {
    uint8_t b[PK_FOOTER_SIZE];
    pk_header h = {1, 1, PK_SHARD_HAS_ZSTD, 77}, h2;
    pk_header_encode(&h, b);
    CHECK(memcmp(b, PK_MAGIC, 8) == 0);
    CHECK(b[8] == 1 && b[9] == 0 && b[10] == 1 && b[12] == 1 && b[16] == 77);
    reset_err();
    EXPECT_RC(PK_OK, pk_header_decode(b, &h2, &err));
    CHECK(h2.read_version == 1 && h2.write_version == 1 && h2.flags == PK_SHARD_HAS_ZSTD && h2.dict_id == 77);
    pk_entry e = {0x0102030405060708ULL, 9, 10, 0xAABBCCDDEEFF0011ULL, PK_CODEC_ZSTD}, e2;
    pk_entry_encode(&e, b);
    CHECK(b[0] == 8 && b[7] == 1 && b[8] == 9 && b[12] == 10 && b[16] == 0x11 && b[23] == 0xAA && b[24] == 1);
    pk_entry_decode(b, &e2);
    CHECK(memcmp(&e, &e2, sizeof e) == 0 || (e2.offset == e.offset && e2.checksum == e.checksum &&
                                             e2.stored_len == 9 && e2.raw_len == 10 && e2.flags == 1));
    pk_footer f = {1000, 3, 42, 1, 1, 0}, f2;
    pk_footer_encode(&f, b);
    CHECK(memcmp(b + 40, PK_MAGIC, 8) == 0);
    EXPECT_RC(PK_OK, pk_footer_decode(b, &f2, &err));
    CHECK(f2.index_offset == 1000 && f2.record_count == 3 && f2.index_checksum == 42);
    /* A decoder refuses a newer read_version, but only once the checksum is right. */
    f.read_version = 2;
    pk_footer_encode(&f, b);
    EXPECT_RC(PK_E_VERSION, pk_footer_decode(b, &f2, &err));
    CHECK(err.actual == 2 && err.expected == PK_FORMAT_VERSION);
    b[24] = 1; /* version back to 1 but checksum of version 2 */
    EXPECT_RC(PK_E_CHECKSUM, pk_footer_decode(b, &f2, &err));
    printf("ok structs\n");
}

static void test_write_and_open(void) {
    pk_writer_summary s = write_shard("a.pack", 0, 0);
    size_t flen;
    uint8_t *file = slurp(path_of("a.pack"), &flen);
    CHECK(s.file_size == flen);
    CHECK(s.record_count == NREC);
    CHECK(s.file_checksum == pk_xxh64(file, flen, 0));
    uint64_t data = 0;
    for (int i = 0; i < NREC; i++) data += lens[i];
    CHECK(s.data_bytes == data);
    CHECK(flen == PK_HEADER_SIZE + data + NREC * PK_ENTRY_SIZE + PK_FOOTER_SIZE);
    CHECK(memcmp(file, PK_MAGIC, 8) == 0 && memcmp(file + flen - 8, PK_MAGIC, 8) == 0);

    for (int use_mmap = 0; use_mmap < 2; use_mmap++) {
        pk_shard *sh;
        reset_err();
        EXPECT_RC(PK_OK, pk_shard_open(path_of("a.pack"), flen, use_mmap, &sh, &err));
        pk_shard_info info;
        pk_shard_get_info(sh, &info);
        CHECK(info.file_size == flen && info.record_count == NREC);
        CHECK(info.index_offset == PK_HEADER_SIZE + data);
        CHECK(info.flags == 0 && info.dict_id == 0);
        CHECK(info.read_version == PK_FORMAT_READ_VERSION && info.write_version == PK_FORMAT_VERSION);
        for (int i = 0; i < NREC; i++) {
            pk_entry e;
            EXPECT_RC(PK_OK, pk_shard_entry(sh, (uint64_t)i, &e, &err));
            CHECK(e.offset == entries[i].offset && e.stored_len == lens[i] && e.checksum == entries[i].checksum);
            uint8_t *buf = malloc(lens[i] + 1);
            EXPECT_RC(PK_OK, pk_shard_read(sh, e.offset, e.stored_len, buf, &err));
            CHECK(memcmp(buf, records[i], lens[i]) == 0);
            free(buf);
        }
        pk_entry e;
        EXPECT_RC(PK_E_RANGE, pk_shard_entry(sh, NREC, &e, &err));
        uint8_t tmp[64];
        EXPECT_RC(PK_E_CORRUPT, pk_shard_read(sh, 0, 8, tmp, &err));                     /* header */
        EXPECT_RC(PK_E_CORRUPT, pk_shard_read(sh, info.index_offset - 4, 8, tmp, &err)); /* into the index */
        EXPECT_RC(PK_E_CORRUPT, pk_shard_read(sh, UINT64_MAX - 2, 8, tmp, &err));        /* overflow */
        uint64_t bad[4];
        size_t nbad = 99;
        EXPECT_RC(PK_OK, pk_shard_verify_records(sh, 0, NREC, bad, 4, &nbad, &err));
        CHECK(nbad == 0);
        EXPECT_RC(PK_E_RANGE, pk_shard_verify_records(sh, 0, NREC + 1, bad, 4, &nbad, &err));
        uint64_t h;
        EXPECT_RC(PK_OK, pk_shard_hash_range(sh, 0, flen, &h, &err));
        CHECK(h == s.file_checksum);
        EXPECT_RC(PK_OK, pk_shard_hash_range(sh, 7, flen - 3, &h, &err));
        CHECK(h == pk_xxh64(file + 7, flen - 10, 0));
        EXPECT_RC(PK_E_RANGE, pk_shard_hash_range(sh, 0, flen + 1, &h, &err));
        pk_shard_close(sh);
    }
    /* The tail alone (index + footer) validates, as for a remote shard. */
    pk_shard_info ti;
    size_t tail = NREC * PK_ENTRY_SIZE + PK_FOOTER_SIZE;
    EXPECT_RC(PK_OK, pk_shard_check_tail(file + flen - tail, tail, flen, &ti, &err));
    CHECK(ti.record_count == NREC && ti.index_offset == flen - tail);
    EXPECT_RC(PK_OK, pk_shard_check_tail(file + flen - tail - 5, tail + 5, flen, &ti, &err));
    EXPECT_RC(PK_E_RANGE, pk_shard_check_tail(file + flen - tail + 1, tail - 1, flen, &ti, &err));
    EXPECT_RC(PK_E_TRUNCATED, pk_shard_check_tail(file + flen - 10, 10, flen, &ti, &err));
    EXPECT_RC(PK_E_CORRUPT, pk_shard_check_tail(file + flen - tail, tail, flen + 1, &ti, &err));
    free(file);
    printf("ok write_and_open\n");
}

static void test_flags_and_dict(void) {
    write_shard("z.pack", PK_SHARD_HAS_ZSTD | PK_SHARD_HAS_DICT, 0xC0FFEE);
    pk_shard *sh;
    reset_err();
    EXPECT_RC(PK_OK, pk_shard_open(path_of("z.pack"), 0, 0, &sh, &err));
    pk_shard_info info;
    pk_shard_get_info(sh, &info);
    CHECK(info.flags == (PK_SHARD_HAS_ZSTD | PK_SHARD_HAS_DICT) && info.dict_id == 0xC0FFEE);
    for (int i = 0; i < NREC; i++) {
        pk_entry e;
        EXPECT_RC(PK_OK, pk_shard_entry(sh, (uint64_t)i, &e, &err));
        CHECK(e.flags == entries[i].flags && e.raw_len == entries[i].raw_len);
    }
    pk_shard_close(sh);
    printf("ok flags_and_dict\n");
}

static void test_writer_errors(void) {
    pk_writer *w;
    reset_err();
    /* O_EXCL: an existing file is never overwritten. */
    EXPECT_RC(PK_E_IO, pk_writer_open(path_of("a.pack"), 0, 0, &w, &err));
    CHECK(err.sys_errno == EEXIST && w == NULL);
    EXPECT_RC(PK_E_IO, pk_writer_open(path_of("no/such/dir.pack"), 0, 0, &w, &err));
    CHECK(err.sys_errno == ENOENT);
    EXPECT_RC(PK_E_RANGE, pk_writer_open(path_of("f.pack"), 0x80, 0, &w, &err));
    unlink(path_of("w.pack"));
    EXPECT_RC(PK_OK, pk_writer_open(path_of("w.pack"), 0, 0, &w, &err));
    EXPECT_RC(PK_E_RANGE, pk_writer_append(w, "abc", 3, 3, PK_CODEC_ZSTD, NULL, &err));   /* no zstd flag */
    EXPECT_RC(PK_E_RANGE, pk_writer_append(w, "abc", 3, 3, 7, NULL, &err));               /* unknown codec */
    EXPECT_RC(PK_E_RANGE, pk_writer_append(w, "abc", 3, 4, PK_CODEC_NONE, NULL, &err));   /* raw != stored */
    EXPECT_RC(PK_E_RANGE, pk_writer_append(w, "abc", 3, 0x80000000u, PK_CODEC_NONE, NULL, &err));
    EXPECT_RC(PK_E_IO, pk_writer_append_file(w, path_of("missing"), -1, NULL, &err));
    CHECK(err.sys_errno == ENOENT);
    EXPECT_RC(PK_E_IO, pk_writer_append_file(w, root, -1, NULL, &err)); /* a directory */
    /* append_file stores the file raw, the same as append. */
    pk_entry e;
    EXPECT_RC(PK_OK, pk_writer_append_file(w, path_of("a.pack"), -1, &e, &err));
    CHECK(e.offset == PK_HEADER_SIZE && e.flags == PK_CODEC_NONE);
    pk_writer_summary s;
    EXPECT_RC(PK_OK, pk_writer_close(w, &s, &err));
    CHECK(s.record_count == 1);
    pk_shard *sh;
    EXPECT_RC(PK_OK, pk_shard_open(path_of("w.pack"), s.file_size, 1, &sh, &err));
    size_t alen;
    uint8_t *a = slurp(path_of("a.pack"), &alen);
    CHECK(e.stored_len == alen && e.checksum == pk_xxh3_64(a, alen));
    uint8_t *buf = malloc(alen);
    EXPECT_RC(PK_OK, pk_shard_read(sh, e.offset, e.stored_len, buf, &err));
    CHECK(memcmp(buf, a, alen) == 0);
    free(buf);
    free(a);
    pk_shard_close(sh);
    /* An aborted writer leaves a file no reader accepts. */
    unlink(path_of("ab.pack"));
    EXPECT_RC(PK_OK, pk_writer_open(path_of("ab.pack"), 0, 0, &w, &err));
    EXPECT_RC(PK_OK, pk_writer_append(w, records[4], lens[4], lens[4], PK_CODEC_NONE, NULL, &err));
    pk_writer_abort(w);
    EXPECT_RC(PK_E_TRUNCATED, pk_shard_open(path_of("ab.pack"), 0, 0, &sh, &err));
    printf("ok writer_errors\n");
}

/* append_file: files opened relative to their directory (kept open between files of the same
 * directory, switched when it changes, including to a directory whose name is a prefix of the last),
 * the listed size checked, empty and large (past the write buffer) files. */
static void test_append_file_dirs(void) {
    pk_writer *w;
    reset_err();
    char d1[4200], d2[4200], f[4300];
    snprintf(d1, sizeof d1, "%s/ad", root);
    snprintf(d2, sizeof d2, "%s/adx", root);
    mkdir(d1, 0755);
    mkdir(d2, 0755);
    static const char *order[] = {"ad/b", "ad/c", "adx/b", "ad/e", "adx/big", "adx/z"};
    size_t sizes[] = {5, 0, 7, 3, (size_t)3 << 20, 1};
    uint8_t *big = malloc(sizes[4] + 8); /* file i holds big[i .. i + sizes[i]) */
    for (size_t i = 0; i < sizes[4] + 8; i++) big[i] = (uint8_t)(i * 131u + 7u);
    for (int i = 0; i < 6; i++) spit(path_of(order[i]), big + i, sizes[i]);
    unlink(path_of("ad.pack"));
    EXPECT_RC(PK_OK, pk_writer_open(path_of("ad.pack"), 0, 0, &w, &err));
    pk_entry e[6];
    for (int i = 0; i < 6; i++) {
        snprintf(f, sizeof f, "%s", path_of(order[i]));
        EXPECT_RC(PK_OK, pk_writer_append_file(w, f, (int64_t)sizes[i], &e[i], &err));
        CHECK(e[i].stored_len == sizes[i] && e[i].checksum == pk_xxh3_64(big + i, sizes[i]));
    }
    /* a size other than the listed one is refused, before any byte is read */
    uint64_t before = pk_writer_size(w);
    EXPECT_RC(PK_E_RANGE, pk_writer_append_file(w, path_of("ad/b"), 6, NULL, &err));
    CHECK(err.expected == 6 && err.actual == 5 && pk_writer_size(w) == before);
    EXPECT_RC(PK_E_IO, pk_writer_append_file(w, path_of("nodir/x"), -1, NULL, &err));
    CHECK(err.sys_errno == ENOENT);
    EXPECT_RC(PK_E_IO, pk_writer_append_file(w, path_of("ad/missing"), -1, NULL, &err));
    CHECK(err.sys_errno == ENOENT);
    pk_writer_summary s;
    EXPECT_RC(PK_OK, pk_writer_close(w, &s, &err));
    CHECK(s.record_count == 6);
    pk_shard *sh;
    EXPECT_RC(PK_OK, pk_shard_open(path_of("ad.pack"), s.file_size, 1, &sh, &err));
    uint8_t *buf = malloc(sizes[4]);
    for (int i = 0; i < 6; i++) {
        EXPECT_RC(PK_OK, pk_shard_read(sh, e[i].offset, e[i].stored_len, buf, &err));
        CHECK(memcmp(buf, big + i, sizes[i]) == 0);
    }
    free(buf);
    free(big);
    pk_shard_close(sh);
    printf("ok append_file_dirs\n");
}

static void test_empty_shard(void) {
    pk_writer *w;
    reset_err();
    unlink(path_of("e.pack"));
    EXPECT_RC(PK_OK, pk_writer_open(path_of("e.pack"), 0, 0, &w, &err));
    pk_writer_summary s;
    EXPECT_RC(PK_OK, pk_writer_close(w, &s, &err));
    CHECK(s.file_size == PK_HEADER_SIZE + PK_FOOTER_SIZE && s.record_count == 0);
    /* An empty record passed as (NULL, 0), as the Python binding does for b"". */
    unlink(path_of("e0.pack"));
    EXPECT_RC(PK_OK, pk_writer_open(path_of("e0.pack"), 0, 0, &w, &err));
    pk_entry e;
    EXPECT_RC(PK_OK, pk_writer_append(w, NULL, 0, 0, PK_CODEC_NONE, &e, &err));
    CHECK(e.offset == PK_HEADER_SIZE && e.stored_len == 0 && e.checksum == 0x2D06800538D394C2ULL); /* XXH3-64 of 0 bytes */
    pk_writer_summary s0;
    EXPECT_RC(PK_OK, pk_writer_close(w, &s0, &err));
    CHECK(s0.file_size == PK_HEADER_SIZE + PK_ENTRY_SIZE + PK_FOOTER_SIZE && s0.record_count == 1);
    for (int m = 0; m < 2; m++) {
        pk_shard *sh;
        EXPECT_RC(PK_OK, pk_shard_open(path_of("e.pack"), s.file_size, m, &sh, &err));
        pk_shard_info info;
        pk_shard_get_info(sh, &info);
        CHECK(info.record_count == 0 && info.index_offset == PK_HEADER_SIZE);
        pk_shard_close(sh);
    }
    printf("ok empty_shard\n");
}

/* Build index columns over shards a.pack (shard 0) and a copy of it (shard 1). */
static uint32_t col_shard[2 * NREC];
static uint64_t col_offset[2 * NREC];
static uint32_t col_len[2 * NREC];
static uint64_t col_sum[2 * NREC];

static void make_cols(pk_index_cols *cols) {
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < NREC; i++) {
            int r = s * NREC + i;
            col_shard[r] = (uint32_t)s;
            col_offset[r] = entries[i].offset;
            col_len[r] = entries[i].stored_len;
            col_sum[r] = entries[i].checksum;
        }
    cols->nrows = 2 * NREC;
    cols->shard = col_shard;
    cols->offset = col_offset;
    cols->stored_len = col_len;
    cols->checksum = col_sum;
}

/* Read rows[0..n) and compare with the records; returns the number of reads issued. */
static size_t batch_ok(pk_shardset *set, const pk_index_cols *cols, const int64_t *rows, size_t n,
                       const pk_read_opts *opts) {
    uint8_t **dst = calloc(n ? n : 1, sizeof *dst);
    for (size_t k = 0; k < n; k++) dst[k] = malloc(lens[rows[k] % NREC] + 1);
    size_t nreads = 12345;
    reset_err();
    EXPECT_RC(PK_OK, pk_read_batch(set, cols, rows, n, dst, opts, &nreads, &err));
    for (size_t k = 0; k < n; k++) {
        CHECK(memcmp(dst[k], records[rows[k] % NREC], lens[rows[k] % NREC]) == 0);
        free(dst[k]);
    }
    free(dst);
    return nreads;
}

static void test_batches(void) {
    write_shard("a.pack", 0, 0);
    size_t flen;
    uint8_t *file = slurp(path_of("a.pack"), &flen);
    spit(path_of("b.pack"), file, flen);
    free(file);
    pk_index_cols cols;
    make_cols(&cols);
    const char *paths[2] = {path_of("a.pack"), path_of("b.pack")};
    uint64_t sizes[2] = {flen, flen};
    int64_t all[2 * NREC], rev[2 * NREC], mixed[300];
    for (int i = 0; i < 2 * NREC; i++) {
        all[i] = i;
        rev[i] = 2 * NREC - 1 - i;
    }
    for (int i = 0; i < 300; i++) mixed[i] = (int64_t)(rnd() % (2 * NREC)); /* repeats and any order */
    pk_read_opts wide = {1, 8 << 20, 64 << 20}, no_gap = {1, 0, 64 << 20}, small = {1, 1 << 20, 4096};

    for (int use_mmap = 0; use_mmap < 2; use_mmap++) {
        pk_shardset *set;
        reset_err();
        EXPECT_RC(PK_OK, pk_shardset_new(2, paths, sizes, use_mmap, &set, &err));
        size_t r = batch_ok(set, &cols, all, 2 * NREC, &wide);
        /* mmap: one copy per record.  pread: the records of a shard are contiguous, one read each. */
        CHECK(use_mmap ? r == 2 * NREC : r == 2);
        CHECK(batch_ok(set, &cols, rev, 2 * NREC, &wide) == (use_mmap ? 2 * NREC : 2u));
        batch_ok(set, &cols, mixed, 300, &wide);
        batch_ok(set, &cols, mixed, 300, &small);
        /* Every other record of shard 0: with max_gap 0 nothing coalesces except empty records, whose
         * gap to the next one is 0. */
        int64_t odd[NREC / 2];
        size_t nonempty = 0;
        for (int i = 0; i < NREC / 2; i++) {
            odd[i] = 2 * i + 1;
            nonempty += lens[2 * i] > 0;
        }
        r = batch_ok(set, &cols, odd, NREC / 2, &no_gap);
        if (use_mmap) CHECK(r == NREC / 2);
        else CHECK(r <= NREC / 2 && r >= nonempty - 1 && r > 1);
        r = batch_ok(set, &cols, odd, NREC / 2, &wide);
        CHECK(use_mmap ? r == NREC / 2 : r == 1);
        /* max_read bounds a coalesced read. */
        r = batch_ok(set, &cols, all, NREC, &small);
        if (!use_mmap) CHECK(r > 2);
        CHECK(batch_ok(set, &cols, all, 0, &wide) == 0);
        /* A row out of range names its batch position. */
        int64_t bad[3] = {1, 2 * NREC, 0};
        uint8_t b0[64], b1[64], b2[64];
        uint8_t *dst[3] = {b0, b1, b2};
        reset_err();
        EXPECT_RC(PK_E_RANGE, pk_read_batch(set, &cols, bad, 3, dst, &wide, NULL, &err));
        CHECK(err.item == 1);
        bad[1] = -1;
        EXPECT_RC(PK_E_RANGE, pk_read_batch(set, &cols, bad, 3, dst, &wide, NULL, &err));
        pk_shard *s;
        EXPECT_RC(PK_E_CORRUPT, pk_shardset_get(set, 2, &s, &err));
        pk_shardset_free(set);
    }
    /* The index pointing outside a shard's data region is refused before any byte is copied. */
    pk_shardset *set;
    EXPECT_RC(PK_OK, pk_shardset_new(2, paths, sizes, 1, &set, &err));
    uint64_t saved = col_offset[3];
    col_offset[3] = flen - 10;
    int64_t one = 3;
    uint8_t buf[8192];
    uint8_t *dst1[1] = {buf};
    reset_err();
    EXPECT_RC(PK_E_CORRUPT, pk_read_batch(set, &cols, &one, 1, dst1, &wide, NULL, &err));
    CHECK(err.item == 0 && err.shard == 0);
    /* An offset inside the data region but wrong is caught by the checksum. */
    col_offset[3] = saved + 1;
    reset_err();
    EXPECT_RC(PK_E_CHECKSUM, pk_read_batch(set, &cols, &one, 1, dst1, &wide, NULL, &err));
    col_offset[3] = saved;
    /* A shard index beyond the set. */
    col_shard[3] = 5;
    reset_err();
    EXPECT_RC(PK_E_CORRUPT, pk_read_batch(set, &cols, &one, 1, dst1, &wide, NULL, &err));
    CHECK(err.shard == 5);
    col_shard[3] = 0;
    pk_shardset_free(set);
    /* A shard that is missing fails on first use, naming the shard. */
    const char *missing[2] = {path_of("a.pack"), path_of("missing.pack")};
    EXPECT_RC(PK_OK, pk_shardset_new(2, missing, sizes, 0, &set, &err));
    int64_t rows2[2] = {0, NREC + 3};
    uint8_t *dst2[2] = {buf, buf + 4096};
    reset_err();
    EXPECT_RC(PK_E_IO, pk_read_batch(set, &cols, rows2, 2, dst2, &wide, NULL, &err));
    CHECK(err.shard == 1 && err.sys_errno == ENOENT && err.item == 1);
    pk_shardset_free(set);
    printf("ok batches\n");
}

/* Copy a.pack to name, apply a byte change, and return the path. */
static const char *corrupt_copy(const char *name, size_t at, uint8_t xor_mask, size_t truncate_to) {
    size_t flen;
    uint8_t *file = slurp(path_of("a.pack"), &flen);
    if (at < flen) file[at] ^= xor_mask;
    spit(path_of(name), file, truncate_to ? truncate_to : flen);
    free(file);
    return path_of(name);
}

/* Open must fail with rc in both modes. */
static void open_fails(const char *path, uint64_t expected_size, int rc) {
    for (int m = 0; m < 2; m++) {
        pk_shard *sh = (pk_shard *)1;
        reset_err();
        EXPECT_RC(rc, pk_shard_open(path, expected_size, m, &sh, &err));
        CHECK(sh == NULL);
        CHECK(err.msg[0] != 0);
    }
}

/* Re-encode the footer (and optionally the index checksum) of a copy so only one field is "wrong". */
static const char *recheck_copy(const char *name, void (*edit)(uint8_t *file, size_t flen)) {
    size_t flen;
    uint8_t *file = slurp(path_of("a.pack"), &flen);
    edit(file, flen);
    spit(path_of(name), file, flen);
    free(file);
    return path_of(name);
}

static void edit_footer_version(uint8_t *file, size_t flen) {
    uint8_t *f = file + flen - PK_FOOTER_SIZE;
    pk_store_le16(f + 24, 2);
    pk_store_le64(f + 32, pk_xxh64(f, 32, 0));
}

static void edit_header_version(uint8_t *file, size_t flen) {
    (void)flen;
    pk_store_le16(file + 8, 2);
    pk_store_le64(file + 24, pk_xxh64(file, 24, 0));
}

static void edit_header_flags(uint8_t *file, size_t flen) {
    (void)flen;
    pk_store_le32(file + 12, 0x100);
    pk_store_le64(file + 24, pk_xxh64(file, 24, 0));
}

static void edit_footer_flags_known(uint8_t *file, size_t flen) {
    uint8_t *f = file + flen - PK_FOOTER_SIZE;
    pk_store_le32(f + 28, PK_SHARD_HAS_ZSTD); /* valid, but differs from the header */
    pk_store_le64(f + 32, pk_xxh64(f, 32, 0));
}

/* Make entry 5 overlap entry 4, with index and footer checksums recomputed. */
static void edit_entry_overlap(uint8_t *file, size_t flen) {
    uint8_t *f = file + flen - PK_FOOTER_SIZE;
    uint64_t index_offset = pk_load_le64(f);
    uint8_t *e = file + index_offset + 5 * PK_ENTRY_SIZE;
    pk_store_le64(e, pk_load_le64(e) - 1);
    pk_store_le64(f + 16, pk_xxh64(file + index_offset, NREC * PK_ENTRY_SIZE, 0));
    pk_store_le64(f + 32, pk_xxh64(f, 32, 0));
}

/* Make the last entry's length run into the index. */
static void edit_entry_length(uint8_t *file, size_t flen) {
    uint8_t *f = file + flen - PK_FOOTER_SIZE;
    uint64_t index_offset = pk_load_le64(f);
    uint8_t *e = file + index_offset + (NREC - 1) * PK_ENTRY_SIZE;
    pk_store_le32(e + 8, pk_load_le32(e + 8) + 1);
    pk_store_le32(e + 12, pk_load_le32(e + 12) + 1);
    pk_store_le64(f + 16, pk_xxh64(file + index_offset, NREC * PK_ENTRY_SIZE, 0));
    pk_store_le64(f + 32, pk_xxh64(f, 32, 0));
}

/* An unknown codec in entry 2. */
static void edit_entry_codec(uint8_t *file, size_t flen) {
    uint8_t *f = file + flen - PK_FOOTER_SIZE;
    uint64_t index_offset = pk_load_le64(f);
    pk_store_le32(file + index_offset + 2 * PK_ENTRY_SIZE + 24, 9);
    pk_store_le64(f + 16, pk_xxh64(file + index_offset, NREC * PK_ENTRY_SIZE, 0));
    pk_store_le64(f + 32, pk_xxh64(f, 32, 0));
}

/* A record count that does not match the file size. */
static void edit_record_count(uint8_t *file, size_t flen) {
    uint8_t *f = file + flen - PK_FOOTER_SIZE;
    pk_store_le64(f + 8, NREC + 1);
    pk_store_le64(f + 32, pk_xxh64(f, 32, 0));
}

/* A huge record count (overflow of count * 32 must not wrap into something plausible). */
static void edit_record_count_huge(uint8_t *file, size_t flen) {
    uint8_t *f = file + flen - PK_FOOTER_SIZE;
    pk_store_le64(f + 8, (1ULL << 59) + NREC);
    pk_store_le64(f + 32, pk_xxh64(f, 32, 0));
}

static void test_corruption(void) {
    write_shard("a.pack", 0, 0);
    size_t flen;
    uint8_t *file = slurp(path_of("a.pack"), &flen);
    free(file);
    uint64_t index_offset = flen - PK_FOOTER_SIZE - NREC * PK_ENTRY_SIZE;

    /* A flipped byte in a record: open succeeds (records are checked when read) and reads fail. */
    int victim = 7;
    const char *p = corrupt_copy("c1.pack", entries[victim].offset + 3, 0x40, 0);
    for (int m = 0; m < 2; m++) {
        pk_shard *sh;
        reset_err();
        EXPECT_RC(PK_OK, pk_shard_open(p, flen, m, &sh, &err));
        uint64_t bad[4];
        size_t nbad;
        EXPECT_RC(PK_OK, pk_shard_verify_records(sh, 0, NREC, bad, 4, &nbad, &err));
        CHECK(nbad == 1 && bad[0] == (uint64_t)victim);
        pk_shard_close(sh);
        pk_shardset *set;
        const char *paths[1] = {p};
        uint64_t sizes[1] = {flen};
        EXPECT_RC(PK_OK, pk_shardset_new(1, paths, sizes, m, &set, &err));
        pk_index_cols cols;
        make_cols(&cols);
        cols.nrows = NREC;
        int64_t rows[4] = {0, victim + 1, victim, victim - 1};
        uint8_t *dst[4];
        for (int k = 0; k < 4; k++) dst[k] = malloc(lens[rows[k]] + 1);
        pk_read_opts opts = {1, 1 << 20, 64 << 20};
        reset_err();
        EXPECT_RC(PK_E_CHECKSUM, pk_read_batch(set, &cols, rows, 4, dst, &opts, NULL, &err));
        CHECK(err.item == 2 && err.shard == 0 && err.offset == entries[victim].offset);
        CHECK(err.expected == entries[victim].checksum && err.actual != err.expected);
        /* Without verification the bytes come back as they are on disk. */
        opts.verify = 0;
        EXPECT_RC(PK_OK, pk_read_batch(set, &cols, rows, 4, dst, &opts, NULL, &err));
        CHECK(dst[2][3] == (records[victim][3] ^ 0x40));
        for (int k = 0; k < 4; k++) free(dst[k]);
        pk_shardset_free(set);
    }
    /* Every byte of the header, the index and the footer is covered: a flip anywhere fails open. */
    for (size_t at = 0; at < PK_HEADER_SIZE; at++) {
        corrupt_copy("c2.pack", at, 0x01, 0);
        pk_shard *sh;
        reset_err();
        int rc = pk_shard_open(path_of("c2.pack"), flen, 0, &sh, &err);
        CHECK(rc == PK_E_CHECKSUM || rc == PK_E_CORRUPT);
    }
    for (size_t at = index_offset; at < flen; at += 3) {
        corrupt_copy("c3.pack", at, 0x80, 0);
        pk_shard *sh;
        reset_err();
        int rc = pk_shard_open(path_of("c3.pack"), flen, 1, &sh, &err);
        CHECK(rc == PK_E_CHECKSUM || rc == PK_E_CORRUPT);
    }
    corrupt_copy("c4.pack", index_offset + 9, 0x01, 0);
    open_fails(path_of("c4.pack"), 0, PK_E_CHECKSUM);
    CHECK(err.offset == index_offset);
    corrupt_copy("c5.pack", flen - 1, 0x01, 0); /* the magic */
    open_fails(path_of("c5.pack"), 0, PK_E_CORRUPT);
    corrupt_copy("c6.pack", flen - 20, 0x01, 0); /* the footer checksum */
    open_fails(path_of("c6.pack"), 0, PK_E_CHECKSUM);
    CHECK(err.offset == flen - 16);
    /* Truncation: the footer is gone, or the size differs from what the manifest says. */
    corrupt_copy("t1.pack", flen, 0, flen - 1);
    open_fails(path_of("t1.pack"), 0, PK_E_CORRUPT);
    open_fails(path_of("t1.pack"), flen, PK_E_TRUNCATED);
    CHECK(err.expected == flen && err.actual == flen - 1);
    corrupt_copy("t2.pack", flen, 0, 50);
    open_fails(path_of("t2.pack"), 0, PK_E_TRUNCATED);
    corrupt_copy("t3.pack", flen, 0, 1);
    open_fails(path_of("t3.pack"), 0, PK_E_TRUNCATED);
    open_fails(path_of("a.pack"), flen - 1, PK_E_CORRUPT); /* longer than expected */
    open_fails(path_of("nonexistent.pack"), 0, PK_E_IO);
    CHECK(err.sys_errno == ENOENT);
    /* Structurally wrong, checksums right: the reader checks structure, not just checksums. */
    open_fails(recheck_copy("v1.pack", edit_footer_version), 0, PK_E_VERSION);
    CHECK(err.actual == 2);
    open_fails(recheck_copy("v2.pack", edit_header_version), 0, PK_E_VERSION);
    open_fails(recheck_copy("f1.pack", edit_header_flags), 0, PK_E_CORRUPT);
    open_fails(recheck_copy("f2.pack", edit_footer_flags_known), 0, PK_E_CORRUPT);
    open_fails(recheck_copy("e1.pack", edit_entry_overlap), 0, PK_E_CORRUPT);
    CHECK(err.item == 5);
    open_fails(recheck_copy("e2.pack", edit_entry_length), 0, PK_E_CORRUPT);
    open_fails(recheck_copy("e3.pack", edit_entry_codec), 0, PK_E_CORRUPT);
    CHECK(err.item == 2);
    open_fails(recheck_copy("e4.pack", edit_record_count), 0, PK_E_CORRUPT);
    open_fails(recheck_copy("e5.pack", edit_record_count_huge), 0, PK_E_CORRUPT);
    /* Not a shard at all. */
    uint8_t junk[4096];
    for (size_t i = 0; i < sizeof junk; i++) junk[i] = (uint8_t)rnd();
    spit(path_of("junk.pack"), junk, sizeof junk);
    open_fails(path_of("junk.pack"), 0, PK_E_CORRUPT);
    printf("ok corruption\n");
}

static void test_verify_buffers(void) {
    const uint8_t *bufs[3] = {records[0], records[4], records[5]};
    uint32_t blens[3] = {lens[0], lens[4], lens[5]};
    uint64_t sums[3];
    for (int k = 0; k < 3; k++) sums[k] = pk_xxh3_64(bufs[k], blens[k]);
    reset_err();
    EXPECT_RC(PK_OK, pk_verify_buffers(3, bufs, blens, sums, &err));
    sums[2] ^= 1;
    EXPECT_RC(PK_E_CHECKSUM, pk_verify_buffers(3, bufs, blens, sums, &err));
    CHECK(err.item == 2);
    printf("ok verify_buffers\n");
}

/* A writer refused for its arguments leaves no file behind (a retry would hit O_EXCL). */
static void test_refused_open_leaves_nothing(void) {
    pk_writer *w;
    reset_err();
    unlink(path_of("r.pack"));
    EXPECT_RC(PK_E_RANGE, pk_writer_open(path_of("r.pack"), 0x80, 0, &w, &err));
    CHECK(access(path_of("r.pack"), F_OK) != 0);
    printf("ok refused_open_leaves_nothing\n");
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s SCRATCH_DIR\n", argv[0]);
        return 2;
    }
    snprintf(root, sizeof root, "%s", argv[1]);
    setvbuf(stdout, NULL, _IONBF, 0);
    make_records();
    test_checksum();
    test_xxh3();
    test_structs();
    test_write_and_open();
    test_flags_and_dict();
    test_writer_errors();
    test_append_file_dirs();
    test_empty_shard();
    test_batches();
    test_corruption();
    test_verify_buffers();
    test_refused_open_leaves_nothing();
    for (int i = 0; i < NREC; i++) free(records[i]);
    printf("all ok\n");
    return 0;
}
