/*
 * fuzz_shard.c -- libFuzzer harness over the C shard reader (src_c/reader.c, format.c).
 *
 * One input is the bytes of a whole shard file.  Each input is pushed through every path a hostile
 * shard can reach:
 *
 *   1. pk_shard_check_tail() on the input held in memory (the remote-shard path), with the whole
 *      input as the tail and with only its last part as the tail;
 *   2. the input written to a memfd, then pk_shard_open() in pread mode and in mmap mode, and, when it
 *      opens, every record read back (pk_shard_entry, pk_shard_read, pk_shard_verify_records,
 *      pk_shard_hash_range);
 *   3. pk_zstd_content_size() (the zstd frame-header parser that refuses decompression bombs) on the
 *      input at every offset of its first bytes and on every record of a shard that opens;
 *   4. pk_read_batch() over a shard set holding that file, with the rows the shard's own index gives
 *      plus hostile rows derived from the input (offsets/lengths shifted, past the end, overflowing,
 *      pointing into the index or the footer, naming shards that do not exist), in both modes and
 *      with small coalescing limits so runs are built and split.
 *
 * The oracle is the sanitizers (ASan + UBSan abort on any out-of-bounds access, leak or UB) plus
 * the contract itself: a batch read that succeeds must return, for every row, bytes whose XXH3-64
 * equals the checksum the row carried -- wrong bytes are never handed back.
 *
 * Build (fuzz/ci.sh does this):
 *   clang-14 -g -O1 -fsanitize=fuzzer,address,undefined -Isrc_c fuzz/fuzz_shard.c \
 *       src_c/format.c src_c/checksum.c src_c/reader.c -lpthread -o build/fuzz/fuzz_shard
 * Replay without libFuzzer (tests/test_regressions.py; gcc is enough):
 *   gcc -DPK_FUZZ_STANDALONE -g -fsanitize=address,undefined -Isrc_c fuzz/fuzz_shard.c \
 *       src_c/format.c src_c/checksum.c src_c/reader.c -lpthread -o fuzz_replay
 *   ./fuzz_replay FILE...
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checksum.h"
#include "format.h"
#include "reader.h"

/* Inputs larger than this are cut: shards of a few KiB reach every branch of the parser. */
#define MAX_INPUT (1u << 20)
/* Rows of the synthetic global index: the shard's own records are capped, hostile rows added. */
#define MAX_ROWS 256
#define HOSTILE_ROWS 24

#define ASSERT(cond)                                                                  \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "fuzz_shard: contract violated at %s:%d: %s\n", __FILE__, \
                    __LINE__, #cond);                                                 \
            abort();                                                                  \
        }                                                                             \
    } while (0)

static void clear_err(pk_error *e) {
    memset(e, 0, sizeof *e);
    e->shard = -1;
    e->item = -1;
}

/* Every failure must be a known negative status with a terminated message. */
static void check_rc(int rc, const pk_error *e) {
    ASSERT(rc <= 0 && rc >= PK_E_STATE);
    if (rc) {
        ASSERT(e->code == rc);
        ASSERT(memchr(e->msg, 0, sizeof e->msg) != NULL);
    }
}

/* A deterministic stream of numbers derived from the input, for the hostile rows. */
static uint64_t mix(uint64_t *state) {
    *state += 0x9E3779B97F4A7C15ull;
    uint64_t z = *state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static int write_memfd(const uint8_t *data, size_t size) {
    int fd = memfd_create("fuzz_shard", MFD_CLOEXEC);
    if (fd < 0) {
        /* Old kernels: fall back to an unlinked temporary file. */
        char tmpl[] = "/tmp/fuzz_shard.XXXXXX";
        fd = mkstemp(tmpl);
        if (fd < 0) abort();
        unlink(tmpl);
    }
    size_t done = 0;
    while (done < size) {
        ssize_t n = write(fd, data + done, size - done);
        if (n <= 0) abort();
        done += (size_t)n;
    }
    return fd;
}

/* The frame-header parser on p[0..len): must never read past len, and a size it reports must come
 * from bytes it was allowed to read. */
static void frame_header(const uint8_t *p, size_t len) {
    /* A heap copy of exactly len bytes, so ASan sees any read past the end. */
    uint8_t *copy = malloc(len ? len : 1);
    if (!copy) abort();
    if (len) memcpy(copy, p, len);
    uint64_t size = 0;
    int rc = pk_zstd_content_size(copy, len, &size);
    ASSERT(rc == PK_OK || rc == PK_E_CORRUPT || rc == PK_E_RANGE);
    if (rc == PK_OK) ASSERT(len >= 6);
    free(copy);
}

/* Every record of an opened shard, read through each single-record entry point. */
static void read_records(pk_shard *s) {
    pk_shard_info info;
    pk_shard_get_info(s, &info);
    ASSERT(info.index_offset >= PK_HEADER_SIZE && info.index_offset <= info.file_size);
    uint64_t n = info.record_count < MAX_ROWS ? info.record_count : MAX_ROWS;
    pk_error e;
    for (uint64_t i = 0; i < n; i++) {
        pk_entry en;
        clear_err(&e);
        int rc = pk_shard_entry(s, i, &en, &e);
        ASSERT(rc == PK_OK); /* in range: must succeed */
        ASSERT(en.offset >= PK_HEADER_SIZE && en.offset + en.stored_len <= info.index_offset);
        uint8_t *buf = malloc(en.stored_len ? en.stored_len : 1);
        if (!buf) abort();
        clear_err(&e);
        rc = pk_shard_read(s, en.offset, en.stored_len, buf, &e);
        check_rc(rc, &e);
        ASSERT(rc == PK_OK);
        frame_header(buf, en.stored_len);
        free(buf);
    }
    pk_entry en;
    clear_err(&e);
    check_rc(pk_shard_entry(s, info.record_count, &en, &e), &e);
    /* Reads outside the data region are refused, never served. */
    uint8_t small[64];
    uint64_t bad_offsets[] = {0, PK_HEADER_SIZE - 1, info.index_offset, info.index_offset + 1, info.file_size,
                              UINT64_MAX - 8, UINT64_MAX};
    for (size_t k = 0; k < sizeof bad_offsets / sizeof *bad_offsets; k++) {
        clear_err(&e);
        int rc = pk_shard_read(s, bad_offsets[k], sizeof small, small, &e);
        check_rc(rc, &e);
        if (bad_offsets[k] + sizeof small > info.index_offset || bad_offsets[k] < PK_HEADER_SIZE)
            ASSERT(rc != PK_OK);
    }
    uint64_t bad[8];
    size_t nbad = 0;
    clear_err(&e);
    check_rc(pk_shard_verify_records(s, 0, n, bad, 8, &nbad, &e), &e);
    clear_err(&e);
    check_rc(pk_shard_verify_records(s, n, n + 1, bad, 8, &nbad, &e), &e);
    uint64_t h;
    clear_err(&e);
    check_rc(pk_shard_hash_range(s, 0, info.file_size, &h, &e), &e);
    clear_err(&e);
    check_rc(pk_shard_hash_range(s, info.file_size, info.file_size + 1, &h, &e), &e);
    clear_err(&e);
    check_rc(pk_shard_hash_range(s, 10, 5, &h, &e), &e);
}

/* A batch read through a shard set: rows from the shard's own index plus hostile ones. */
static void read_batches(const char *path, uint64_t file_size, const uint8_t *data, size_t size, int use_mmap) {
    pk_shardset *set = NULL;
    pk_error e;
    clear_err(&e);
    const char *paths[1] = {path};
    int rc = pk_shardset_new(1, paths, &file_size, use_mmap, &set, &e);
    ASSERT(rc == PK_OK);
    pk_shard *s = NULL;
    clear_err(&e);
    rc = pk_shardset_get(set, 0, &s, &e);
    check_rc(rc, &e);
    uint64_t nrec = 0, index_offset = PK_HEADER_SIZE;
    if (rc == PK_OK) {
        pk_shard_info info;
        pk_shard_get_info(s, &info);
        nrec = info.record_count < MAX_ROWS - HOSTILE_ROWS ? info.record_count : MAX_ROWS - HOSTILE_ROWS;
        index_offset = info.index_offset;
    }
    static uint32_t shard[MAX_ROWS], stored[MAX_ROWS];
    static uint64_t offset[MAX_ROWS], sum[MAX_ROWS];
    size_t nrows = 0;
    for (uint64_t i = 0; i < nrec; i++, nrows++) {
        pk_entry en;
        clear_err(&e);
        ASSERT(pk_shard_entry(s, i, &en, &e) == PK_OK);
        shard[nrows] = 0;
        offset[nrows] = en.offset;
        stored[nrows] = en.stored_len;
        sum[nrows] = en.checksum;
    }
    uint64_t st = pk_xxh64(data, size, 42);
    for (int k = 0; k < HOSTILE_ROWS; k++, nrows++) {
        uint64_t r = mix(&st);
        uint64_t base = nrec ? offset[r % nrec] : PK_HEADER_SIZE;
        uint32_t len = nrec ? stored[(r >> 8) % nrec] : (uint32_t)(r % 64);
        shard[nrows] = (r >> 60) == 0 ? (uint32_t)(1 + (r >> 16) % 3) : 0; /* sometimes a missing shard */
        switch ((r >> 32) % 9) {
        case 0: offset[nrows] = base + (r >> 40) % 16; break;
        case 1: offset[nrows] = base - (r >> 40) % 16; break;
        case 2: offset[nrows] = index_offset - (len ? len - 1 : 0); break;   /* runs into the index */
        case 3: offset[nrows] = file_size - PK_FOOTER_SIZE; break;           /* the footer */
        case 4: offset[nrows] = UINT64_MAX - (r >> 48); break;               /* offset + len overflows */
        case 5: offset[nrows] = file_size + (r >> 40) % 1024; break;         /* past the end */
        case 6: len = (uint32_t)(PK_MAX_RECORD_SIZE - (r >> 40) % 16); offset[nrows] = base; break;
        case 7: len = UINT32_MAX; offset[nrows] = base; break;
        default: offset[nrows] = base; break;
        }
        /* A huge length must not make the harness allocate it: the reader refuses it before
         * touching dst (out of the data region), so cap the destination it gets. */
        stored[nrows] = len;
        sum[nrows] = (r & 1) ? pk_xxh3_64(data, size < 7 ? size : 7) : mix(&st);
    }
    /* Destination buffers: rows longer than the whole input cannot be in the data region, so the
     * reader must refuse them before writing; they get a guard-sized buffer that ASan polices. */
    int64_t rows[MAX_ROWS];
    uint8_t *dst[MAX_ROWS];
    size_t n = nrows;
    for (size_t k = 0; k < n; k++) {
        rows[k] = (int64_t)((k * 7919u) % nrows); /* a permutation-ish order with repeats */
        uint32_t want = stored[rows[k]];
        dst[k] = malloc(want <= size ? (want ? want : 1) : 1);
        if (!dst[k]) abort();
    }
    pk_index_cols cols = {nrows, shard, offset, stored, sum};
    pk_read_opts opts = {1, (uint64_t)(st % 64), 256 + (st >> 8) % 4096};
    /* The honest rows alone must read back exactly. */
    if (nrec) {
        int64_t honest[MAX_ROWS];
        uint8_t *hdst[MAX_ROWS];
        for (size_t k = 0; k < nrec; k++) {
            honest[k] = (int64_t)(nrec - 1 - k);
            hdst[k] = malloc(stored[honest[k]] ? stored[honest[k]] : 1);
            if (!hdst[k]) abort();
        }
        size_t nreads = 0;
        clear_err(&e);
        rc = pk_read_batch(set, &cols, honest, nrec, hdst, &opts, &nreads, &e);
        check_rc(rc, &e);
        if (rc == PK_OK) {
            for (size_t k = 0; k < nrec; k++)
                ASSERT(pk_xxh3_64(hdst[k], stored[honest[k]]) == sum[honest[k]]);
        } else {
            ASSERT(rc == PK_E_CHECKSUM || rc == PK_E_IO);
        }
        for (size_t k = 0; k < nrec; k++) free(hdst[k]);
    }
    /* Hostile rows one at a time (so every one reaches the reader), then all together. */
    for (size_t k = nrec; k < nrows; k++) {
        int64_t row = (int64_t)k;
        uint8_t *d = malloc(stored[k] <= size ? (stored[k] ? stored[k] : 1) : 1);
        if (!d) abort();
        clear_err(&e);
        rc = pk_read_batch(set, &cols, &row, 1, &d, &opts, NULL, &e);
        check_rc(rc, &e);
        if (rc == PK_OK) ASSERT(pk_xxh3_64(d, stored[k]) == sum[k]);
        free(d);
    }
    clear_err(&e);
    rc = pk_read_batch(set, &cols, rows, n, dst, &opts, NULL, &e);
    check_rc(rc, &e);
    if (rc == PK_OK)
        for (size_t k = 0; k < n; k++) ASSERT(pk_xxh3_64(dst[k], stored[rows[k]]) == sum[rows[k]]);
    /* Rows outside the index are refused. */
    int64_t outside[2] = {-1, (int64_t)nrows};
    clear_err(&e);
    ASSERT(pk_read_batch(set, &cols, outside, 2, dst, &opts, NULL, &e) == PK_E_RANGE);
    for (size_t k = 0; k < n; k++) free(dst[k]);
    pk_shardset_free(set);
}

/* Run one shard image through every path. */
static void one_input(const uint8_t *data, size_t size) {
    pk_error e;
    pk_shard_info info;

    /* 1. In memory: the whole input as the tail, then only its last part. */
    clear_err(&e);
    int rc = pk_shard_check_tail(size ? data : (const uint8_t *)"", size, size, &info, &e);
    check_rc(rc, &e);
    if (rc == PK_OK) ASSERT(info.file_size == size && info.index_offset <= size);
    if (size > PK_FOOTER_SIZE) {
        size_t cut = size / 3 > PK_FOOTER_SIZE ? size / 3 : PK_FOOTER_SIZE;
        clear_err(&e);
        check_rc(pk_shard_check_tail(data + size - cut, cut, size, &info, &e), &e);
        /* The tail of a larger file (what a ranged GET of the end returns). */
        clear_err(&e);
        check_rc(pk_shard_check_tail(data, size, (uint64_t)size + 4096, &info, &e), &e);
    }

    /* 2. As a file, both modes. */
    int fd = write_memfd(data, size);
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    for (int use_mmap = 0; use_mmap < 2; use_mmap++) {
        pk_shard *s = NULL;
        clear_err(&e);
        rc = pk_shard_open(path, 0, use_mmap, &s, &e);
        check_rc(rc, &e);
        ASSERT((rc == PK_OK) == (s != NULL));
        if (s) {
            read_records(s);
            pk_shard_close(s);
        }
        /* With a manifest size that disagrees. */
        clear_err(&e);
        rc = pk_shard_open(path, (uint64_t)size + 1, use_mmap, &s, &e);
        ASSERT(rc != PK_OK && s == NULL);
        /* 3. Batches. */
        read_batches(path, size, data, size, use_mmap);
    }
    close(fd);
}

/*
 * Random mutations almost never keep the three XXH64 checksums (header, index, footer) right, so on
 * their own they would only ever exercise the checksum checks.  The harness therefore also runs a
 * "repaired" copy of every input: magics restored and the header, index and footer checksums
 * recomputed (and, in a second
 * copy, every record's XXH3-64 too), so the structural checks behind the checksums get fuzzed.
 */
static void repair(uint8_t *buf, size_t size, int records_too) {
    if (size >= PK_HEADER_SIZE) {
        memcpy(buf, PK_MAGIC, PK_MAGIC_SIZE);
        pk_store_le64(buf + 24, pk_xxh64(buf, 24, 0));
    }
    if (size < PK_FOOTER_SIZE) return;
    uint8_t *foot = buf + size - PK_FOOTER_SIZE;
    memcpy(foot + 40, PK_MAGIC, PK_MAGIC_SIZE);
    uint64_t index_offset = pk_load_le64(foot), count = pk_load_le64(foot + 8);
    uint64_t footer_pos = size - PK_FOOTER_SIZE;
    if (count <= footer_pos / PK_ENTRY_SIZE && index_offset <= footer_pos &&
        footer_pos - index_offset == count * PK_ENTRY_SIZE) {
        uint8_t *index = buf + index_offset;
        if (records_too) {
            for (uint64_t i = 0; i < count; i++) {
                uint8_t *en = index + i * PK_ENTRY_SIZE;
                uint64_t off = pk_load_le64(en);
                uint32_t len = pk_load_le32(en + 8);
                if (off <= size && size - off >= len) pk_store_le64(en + 16, pk_xxh3_64(buf + off, len));
            }
        }
        pk_store_le64(foot + 16, pk_xxh64(index, (size_t)(count * PK_ENTRY_SIZE), 0));
    }
    pk_store_le64(foot + 32, pk_xxh64(foot, 32, 0));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > MAX_INPUT) size = MAX_INPUT;
    /* The frame-header parser straight on the input, at its first offsets and all lengths near 18
     * (the longest header), so the fuzzer can also grow zstd headers of its own. */
    for (size_t off = 0; off < 8 && off <= size; off++)
        for (size_t len = 0; len <= 20 && off + len <= size; len++) frame_header(data + off, len);
    one_input(data, size);
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy) abort();
    for (int records_too = 0; records_too < 2; records_too++) {
        memcpy(copy, data, size);
        repair(copy, size, records_too);
        one_input(copy, size);
    }
    free(copy);
    return 0;
}

#ifdef PK_FUZZ_STANDALONE
/* Replay files given on the command line (regression files, a corpus) without libFuzzer. */
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        if (!f) {
            perror(argv[i]);
            return 2;
        }
        uint8_t *buf = malloc(MAX_INPUT);
        if (!buf) abort();
        size_t n = fread(buf, 1, MAX_INPUT, f);
        fclose(f);
        LLVMFuzzerTestOneInput(buf, n);
        free(buf);
        printf("ok %s\n", argv[i]);
    }
    return 0;
}
#endif
