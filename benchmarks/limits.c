/*
 * limits.c -- the machine's limit for reading samples at given (shard, offset, length) positions.
 *
 * benchmarks/random_access.py compiles this with gcc -O2 (linking src_c/checksum.c for XXH3-64) and
 * runs it on the SAME random positions, in the same order and batch size, that it asks packfmt
 * for, so the ratio "packfmt / limit" compares like with like.  One thread; page cache warm.
 *
 * Usage: limits [--cpu] REPS BATCH POSITIONS_FILE SHARD...
 *   POSITIONS_FILE: u64 n, then u32 shard[n], u64 offset[n], u32 len[n] (little-endian, packed).
 * Output, one line per mode:  MODE best_seconds median_seconds pgpgin_kib samples bytes
 * With --cpu two more fields: best_cpu_seconds (CLOCK_THREAD_CPUTIME_ID, which moves less than wall
 * time when other processes take the CPU) and own_read_kib (what this process read from disk during
 * the timed passes, from /proc/self/io; pgpgin is system-wide).  benchmarks/peers/run.py parses the
 * six-field form.
 *
 * Modes (each copies every sample into an output buffer; the buffer is reused per batch, as a
 * batch's bytes objects are in Python):
 *   mmap_memcpy        memcpy from a MAP_POPULATE'd mmap of each shard: the floor for any reader
 *   mmap_memcpy_xxh3   the same plus the record checksum packfmt verifies (pk_xxh3_64 from src_c/, the
 *                      reader's own code) of the copy: a verifying reader that copies, then hashes
 *   mmap_memcpy_prefetch  memcpy, after asking the CPU (prefetch) for the first 1 KiB of the next
 *                      sample of the batch, as src_c/reader.c does: a faster floor than plain memcpy
 *   mmap_memcpy_xxh3_fused  what packfmt's verified mmap read does: the same prefetch, then
 *                      pk_xxh3_64_copy from src_c/ (copy and checksum in one pass over the mapping:
 *                      each stripe loaded once, stored, hashed)
 *   mmap_malloc_memcpy malloc one buffer per sample, memcpy, free them after the batch (object cost)
 *   pread              one pread(2) per sample into the buffer
 *   mmap_memcpy_xxh3_lib (only with -DPK_BENCH_XXH3) the same with libxxhash's XXH3-64, for comparison
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
#include <time.h>
#include <unistd.h>

#include "checksum.h"

#ifdef PK_BENCH_XXH3
/* Optional (the script defines PK_BENCH_XXH3 when the xxhash.h header is installed, e.g. Debian's
 * libxxhash-dev): the reference library's XXH3-64, to compare with packfmt's own. */
#define XXH_INLINE_ALL
#include <xxhash.h>
#endif

static double clock_s(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
static double now(void) { return clock_s(CLOCK_MONOTONIC); }
static double cpu_now(void) { return clock_s(CLOCK_THREAD_CPUTIME_ID); }

static long pgpgin_kib(void) {
    FILE *f = fopen("/proc/vmstat", "r");
    if (!f) return 0;
    char name[64];
    long v, out = 0;
    while (fscanf(f, "%63s %ld", name, &v) == 2) {
        if (strcmp(name, "pgpgin") == 0) {
            out = v;
            break;
        }
    }
    fclose(f);
    return out;
}

/* KiB this process caused to be read from block devices (read_bytes of /proc/self/io). */
static long own_read_kib(void) {
    FILE *f = fopen("/proc/self/io", "r");
    if (!f) return -1;
    char name[64];
    long v, out = -1;
    while (fscanf(f, "%63s %ld", name, &v) == 2) {
        if (strcmp(name, "read_bytes:") == 0) {
            out = v / 1024;
            break;
        }
    }
    fclose(f);
    return out;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static uint64_t n;
static uint32_t *shard;
static uint64_t *offset;
static uint32_t *len;
static int nshards;
static int *fds;
static const uint8_t **maps;
static size_t batch;
static uint8_t *out;
static volatile uint64_t sink;

enum mode { MMAP_MEMCPY, MMAP_MEMCPY_PREFETCH, MMAP_MEMCPY_XXH3, MMAP_MEMCPY_XXH3_FUSED, MMAP_MALLOC_MEMCPY,
            PREAD, MMAP_MEMCPY_XXH3_LIB, NMODES };
static const char *mode_name[NMODES] = {"mmap_memcpy", "mmap_memcpy_prefetch", "mmap_memcpy_xxh3",
                                        "mmap_memcpy_xxh3_fused", "mmap_malloc_memcpy", "pread",
                                        "mmap_memcpy_xxh3_lib"};
#ifdef PK_BENCH_XXH3
static const int nmodes = NMODES;
#else
static const int nmodes = NMODES - 1;
#endif

/* The first 1 KiB of sample i, asked for ahead of use (src_c/reader.c, PREFETCH_NEXT).  Forced inline:
 * GCC 12 finds that an out-of-line function doing nothing but prefetches has no effect, and drops the
 * calls. */
static inline __attribute__((always_inline)) void prefetch_sample(uint64_t i) {
    const uint8_t *p = maps[shard[i]] + offset[i];
    uint32_t l = len[i] < 1024 ? len[i] : 1024;
    for (uint32_t o = 0; o < l; o += 64) __builtin_prefetch(p + o, 0, 3);
}

/* One pass over all positions; returns a value depending on every byte copied (no dead code). */
static uint64_t pass(enum mode m) {
    uint64_t acc = 0;
    uint8_t **bufs = malloc(batch * sizeof *bufs);
    if (!bufs) die("malloc");
    for (uint64_t a = 0; a < n; a += batch) {
        uint64_t b = a + batch < n ? a + batch : n;
        size_t pos = 0;
        for (uint64_t i = a; i < b; i++) {
            uint32_t l = len[i];
            const uint8_t *src = maps[shard[i]] + offset[i];
            uint8_t *dst = out + pos;
            switch (m) {
            case MMAP_MEMCPY:
                memcpy(dst, src, l);
                break;
            case MMAP_MEMCPY_XXH3:
                memcpy(dst, src, l);
                acc += pk_xxh3_64(dst, l);
                break;
            case MMAP_MEMCPY_PREFETCH:
                if (i + 1 < b) prefetch_sample(i + 1);
                memcpy(dst, src, l);
                break;
            case MMAP_MEMCPY_XXH3_FUSED:
                if (i + 1 < b) prefetch_sample(i + 1);
                acc += pk_xxh3_64_copy(dst, src, l);
                break;
            case MMAP_MALLOC_MEMCPY:
                dst = bufs[i - a] = malloc(l ? l : 1);
                if (!dst) die("malloc");
                memcpy(dst, src, l);
                break;
            case MMAP_MEMCPY_XXH3_LIB:
                memcpy(dst, src, l);
#ifdef PK_BENCH_XXH3
                acc += XXH3_64bits(dst, l);
#endif
                break;
            case PREAD: {
                ssize_t got = pread(fds[shard[i]], dst, l, (off_t)offset[i]);
                if (got != (ssize_t)l) die("pread");
                break;
            }
            default:
                break;
            }
            if (l) acc += dst[l - 1];
            pos += l;
        }
        if (m == MMAP_MALLOC_MEMCPY)
            for (uint64_t i = a; i < b; i++) free(bufs[i - a]);
    }
    free(bufs);
    return acc;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int show_cpu = 0;
    if (argc > 1 && strcmp(argv[1], "--cpu") == 0) {
        show_cpu = 1;
        argv[1] = argv[0];
        argv++;
        argc--;
    }
    if (argc < 5) {
        fprintf(stderr, "usage: %s [--cpu] REPS BATCH POSITIONS_FILE SHARD...\n", argv[0]);
        return 2;
    }
    int reps = atoi(argv[1]);
    batch = (size_t)atol(argv[2]);
    if (reps < 1 || batch < 1) return 2;
    FILE *f = fopen(argv[3], "rb");
    if (!f) die(argv[3]);
    if (fread(&n, 8, 1, f) != 1) die("positions header");
    shard = malloc(n * 4 + 1);
    offset = malloc(n * 8 + 1);
    len = malloc(n * 4 + 1);
    if (!shard || !offset || !len) die("malloc");
    if (fread(shard, 4, n, f) != n || fread(offset, 8, n, f) != n || fread(len, 4, n, f) != n)
        die("positions body");
    fclose(f);

    nshards = argc - 4;
    fds = calloc((size_t)nshards, sizeof *fds);
    maps = calloc((size_t)nshards, sizeof *maps);
    off_t *sizes = calloc((size_t)nshards, sizeof *sizes);
    for (int s = 0; s < nshards; s++) {
        fds[s] = open(argv[4 + s], O_RDONLY);
        if (fds[s] < 0) die(argv[4 + s]);
        struct stat st;
        if (fstat(fds[s], &st)) die("fstat");
        sizes[s] = st.st_size;
        void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED | MAP_POPULATE, fds[s], 0);
        if (m == MAP_FAILED) die("mmap");
        maps[s] = m;
    }
    size_t out_cap = 1;
    for (uint64_t a = 0; a < n; a += batch) {
        size_t sum = 0;
        for (uint64_t i = a; i < n && i < a + batch; i++) {
            if (shard[i] >= (uint32_t)nshards || offset[i] + len[i] > (uint64_t)sizes[shard[i]]) {
                fprintf(stderr, "position %llu outside its shard\n", (unsigned long long)i);
                return 2;
            }
            sum += len[i];
        }
        if (sum > out_cap) out_cap = sum;
    }
    out = malloc(out_cap);
    if (!out) die("malloc");
    memset(out, 0, out_cap);
    uint64_t bytes = 0;
    for (uint64_t i = 0; i < n; i++) bytes += len[i];

    double *t = malloc((size_t)reps * sizeof *t);
    double *c = malloc((size_t)reps * sizeof *c);
    if (!t || !c) die("malloc");
    for (int m = 0; m < nmodes; m++) {
        sink += pass((enum mode)m); /* warm-up: caches, TLB, malloc arenas */
        long k = 0, own = 0;
        for (int r = 0; r < reps; r++) {
            long k0 = pgpgin_kib(), o0 = own_read_kib();
            double c0 = cpu_now();
            double t0 = now();
            sink += pass((enum mode)m);
            t[r] = now() - t0;
            c[r] = cpu_now() - c0;
            k += pgpgin_kib() - k0;
            own += own_read_kib() - o0;
        }
        qsort(t, (size_t)reps, sizeof *t, cmp_double);
        qsort(c, (size_t)reps, sizeof *c, cmp_double);
        printf("%s %.9f %.9f %ld %llu %llu", mode_name[m], t[0], t[reps / 2], k, (unsigned long long)n,
               (unsigned long long)bytes);
        if (show_cpu) printf(" %.9f %ld", c[0], own);
        printf("\n");
        fflush(stdout);
    }
    return 0;
}
