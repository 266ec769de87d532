/* checksum.c -- XXH64 and XXH3-64 from the public xxHash specification (doc/xxhash_spec.md). */
#include "checksum.h"

#include <stdlib.h>
#include <string.h>

#include "format.h"

#define P1 0x9E3779B185EBCA87ULL
#define P2 0xC2B2AE3D27D4EB4FULL
#define P3 0x165667B19E3779F9ULL
#define P4 0x85EBCA77C2B2AE63ULL
#define P5 0x27D4EB2F165667C5ULL

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t round64(uint64_t acc, uint64_t lane) {
    acc += lane * P2;
    acc = rotl64(acc, 31);
    return acc * P1;
}

static inline uint64_t merge64(uint64_t acc, uint64_t v) {
    acc ^= round64(0, v);
    return acc * P1 + P4;
}

/* Consume whole 32-byte stripes; returns the number of bytes consumed. */
static size_t stripes(uint64_t v[4], const uint8_t *p, size_t len) {
    const uint8_t *const start = p;
    const uint8_t *const limit = p + (len & ~(size_t)31);
    uint64_t v1 = v[0], v2 = v[1], v3 = v[2], v4 = v[3];
    while (p < limit) {
        v1 = round64(v1, pk_load_le64(p));
        v2 = round64(v2, pk_load_le64(p + 8));
        v3 = round64(v3, pk_load_le64(p + 16));
        v4 = round64(v4, pk_load_le64(p + 24));
        p += 32;
    }
    v[0] = v1; v[1] = v2; v[2] = v3; v[3] = v4;
    return (size_t)(p - start);
}

static uint64_t converge(const uint64_t v[4]) {
    uint64_t acc = rotl64(v[0], 1) + rotl64(v[1], 7) + rotl64(v[2], 12) + rotl64(v[3], 18);
    acc = merge64(acc, v[0]);
    acc = merge64(acc, v[1]);
    acc = merge64(acc, v[2]);
    return merge64(acc, v[3]);
}

/* The remaining < 32 bytes, then the avalanche. */
static uint64_t finish(uint64_t acc, const uint8_t *p, size_t len) {
    while (len >= 8) {
        acc ^= round64(0, pk_load_le64(p));
        acc = rotl64(acc, 27) * P1 + P4;
        p += 8;
        len -= 8;
    }
    if (len >= 4) {
        acc ^= (uint64_t)pk_load_le32(p) * P1;
        acc = rotl64(acc, 23) * P2 + P3;
        p += 4;
        len -= 4;
    }
    while (len > 0) {
        acc ^= (uint64_t)(*p) * P5;
        acc = rotl64(acc, 11) * P1;
        p++;
        len--;
    }
    acc ^= acc >> 33;
    acc *= P2;
    acc ^= acc >> 29;
    acc *= P3;
    acc ^= acc >> 32;
    return acc;
}

static void init_lanes(uint64_t v[4], uint64_t seed) {
    v[0] = seed + P1 + P2;
    v[1] = seed + P2;
    v[2] = seed;
    v[3] = seed - P1;
}

uint64_t pk_xxh64(const void *data, size_t len, uint64_t seed) {
    const uint8_t *p = (const uint8_t *)data;
    uint64_t acc;
    size_t done = 0;
    if (len >= 32) {
        uint64_t v[4];
        init_lanes(v, seed);
        done = stripes(v, p, len);
        acc = converge(v);
    } else {
        acc = seed + P5;
    }
    acc += (uint64_t)len;
    return finish(acc, done ? p + done : p, len - done); /* no NULL + 0 for empty input */
}

void pk_xxh64_init(pk_xxh64_state *s, uint64_t seed) {
    memset(s, 0, sizeof *s);
    s->seed = seed;
    init_lanes(s->v, seed);
}

void pk_xxh64_update(pk_xxh64_state *s, const void *data, size_t len) {
    const uint8_t *p = (const uint8_t *)data;
    s->total_len += len;
    if (s->buf_len + len < 32) {
        if (len) memcpy(s->buf + s->buf_len, p, len);
        s->buf_len += (uint32_t)len;
        return;
    }
    if (s->buf_len) {
        size_t fill = 32 - s->buf_len;
        memcpy(s->buf + s->buf_len, p, fill);
        stripes(s->v, s->buf, 32);
        p += fill;
        len -= fill;
        s->buf_len = 0;
    }
    size_t done = stripes(s->v, p, len);
    p += done;
    len -= done;
    if (len) memcpy(s->buf, p, len);
    s->buf_len = (uint32_t)len;
}

uint64_t pk_xxh64_digest(const pk_xxh64_state *s) {
    uint64_t acc = s->total_len >= 32 ? converge(s->v) : s->seed + P5;
    acc += s->total_len;
    return finish(acc, s->buf, s->buf_len);
}

/* ------------------------------------------------------------------------------------------------ XXH3-64
 * "XXH3 Algorithm Overview" of the spec, for seed 0 and the default secret only (all packfmt needs).
 * Inputs of 0..240 bytes take short dedicated paths; longer inputs run 8 accumulators over 64-byte stripes,
 * scrambling them every (192 - 64) / 8 = 16 stripes (one 1 KiB block), then one last stripe that ends at
 * the input's end, then a merge.  Only the stripe loop has a SIMD variant. */

#define PRIME32_1 0x9E3779B1U
#define PRIME32_2 0x85EBCA77U
#define PRIME32_3 0xC2B2AE3DU
#define PRIME_MX1 0x165667919E3779F9ULL
#define PRIME_MX2 0x9FB21C651E98DF25ULL

#define SECRET_SIZE 192        /* the default secret, kSecret */
#define STRIPE_LEN 64          /* bytes per stripe */
#define SECRET_CONSUME_RATE 8  /* the secret advances 8 bytes per stripe */
#define STRIPES_PER_BLOCK ((SECRET_SIZE - STRIPE_LEN) / SECRET_CONSUME_RATE)
#define BLOCK_LEN (STRIPE_LEN * STRIPES_PER_BLOCK)
#define MIDSIZE_MAX 240
#define MIDSIZE_STARTOFFSET 3
#define MIDSIZE_LASTOFFSET 17
#define SECRET_SIZE_MIN 136
#define SECRET_LASTACC_START 7
#define SECRET_MERGEACCS_START 11

/* The spec's default secret, kSecret. */
static const uint8_t kSecret[SECRET_SIZE] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

/* The 128-bit product of a and b, folded to 64 bits by xoring its halves. */
static inline uint64_t mul128_fold64(uint64_t a, uint64_t b) {
#if defined(__SIZEOF_INT128__)
    unsigned __int128 p = (unsigned __int128)a * b;
    return (uint64_t)p ^ (uint64_t)(p >> 64);
#else
    uint64_t lo_lo = (a & 0xFFFFFFFFU) * (b & 0xFFFFFFFFU);
    uint64_t hi_lo = (a >> 32) * (b & 0xFFFFFFFFU);
    uint64_t lo_hi = (a & 0xFFFFFFFFU) * (b >> 32);
    uint64_t hi_hi = (a >> 32) * (b >> 32);
    uint64_t cross = (lo_lo >> 32) + (hi_lo & 0xFFFFFFFFU) + lo_hi;
    uint64_t upper = (hi_lo >> 32) + (cross >> 32) + hi_hi;
    uint64_t lower = (cross << 32) | (lo_lo & 0xFFFFFFFFU);
    return lower ^ upper;
#endif
}

static inline uint64_t xxh64_avalanche(uint64_t h) {
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    return h ^ (h >> 32);
}

static inline uint64_t xxh3_avalanche(uint64_t h) {
    h ^= h >> 37;
    h *= PRIME_MX1;
    return h ^ (h >> 32);
}

static inline uint64_t rrmxmx(uint64_t h, uint64_t len) {
    h ^= rotl64(h, 49) ^ rotl64(h, 24);
    h *= PRIME_MX2;
    h ^= (h >> 35) + len;
    h *= PRIME_MX2;
    return h ^ (h >> 28);
}

static inline uint64_t mix16(const uint8_t *p, const uint8_t *secret) {
    return mul128_fold64(pk_load_le64(p) ^ pk_load_le64(secret), pk_load_le64(p + 8) ^ pk_load_le64(secret + 8));
}

static uint64_t xxh3_len_1to3(const uint8_t *p, size_t len) {
    uint32_t combined = ((uint32_t)p[0] << 16) | ((uint32_t)p[len >> 1] << 24) | (uint32_t)p[len - 1] |
                        ((uint32_t)len << 8);
    uint64_t bitflip = (uint64_t)(pk_load_le32(kSecret) ^ pk_load_le32(kSecret + 4));
    return xxh64_avalanche((uint64_t)combined ^ bitflip);
}

static uint64_t xxh3_len_4to8(const uint8_t *p, size_t len) {
    uint64_t in1 = pk_load_le32(p), in2 = pk_load_le32(p + len - 4);
    uint64_t bitflip = pk_load_le64(kSecret + 8) ^ pk_load_le64(kSecret + 16);
    return rrmxmx((in2 + (in1 << 32)) ^ bitflip, len);
}

static uint64_t xxh3_len_9to16(const uint8_t *p, size_t len) {
    uint64_t lo = pk_load_le64(p) ^ (pk_load_le64(kSecret + 24) ^ pk_load_le64(kSecret + 32));
    uint64_t hi = pk_load_le64(p + len - 8) ^ (pk_load_le64(kSecret + 40) ^ pk_load_le64(kSecret + 48));
    uint64_t acc = (uint64_t)len + __builtin_bswap64(lo) + hi + mul128_fold64(lo, hi);
    return xxh3_avalanche(acc);
}

static uint64_t xxh3_len_17to128(const uint8_t *p, size_t len) {
    uint64_t acc = (uint64_t)len * P1;
    if (len > 32) {
        if (len > 64) {
            if (len > 96) {
                acc += mix16(p + 48, kSecret + 96);
                acc += mix16(p + len - 64, kSecret + 112);
            }
            acc += mix16(p + 32, kSecret + 64);
            acc += mix16(p + len - 48, kSecret + 80);
        }
        acc += mix16(p + 16, kSecret + 32);
        acc += mix16(p + len - 32, kSecret + 48);
    }
    acc += mix16(p, kSecret);
    acc += mix16(p + len - 16, kSecret + 16);
    return xxh3_avalanche(acc);
}

static uint64_t xxh3_len_129to240(const uint8_t *p, size_t len) {
    uint64_t acc = (uint64_t)len * P1;
    size_t rounds = len / 16, i;
    for (i = 0; i < 8; i++) acc += mix16(p + 16 * i, kSecret + 16 * i);
    acc = xxh3_avalanche(acc);
    for (i = 8; i < rounds; i++) acc += mix16(p + 16 * i, kSecret + 16 * (i - 8) + MIDSIZE_STARTOFFSET);
    acc += mix16(p + len - 16, kSecret + SECRET_SIZE_MIN - MIDSIZE_LASTOFFSET);
    return xxh3_avalanche(acc);
}

/* Long inputs: the accumulators' starting values and the final merge are shared by both variants. */
static const uint64_t acc_init[8] = {PRIME32_3, P1, P2, P3, P4, PRIME32_2, P5, PRIME32_1};

static uint64_t merge_accs(const uint64_t acc[8], size_t len) {
    const uint8_t *s = kSecret + SECRET_MERGEACCS_START;
    uint64_t h = (uint64_t)len * P1;
    for (int i = 0; i < 4; i++)
        h += mul128_fold64(acc[2 * i] ^ pk_load_le64(s + 16 * i), acc[2 * i + 1] ^ pk_load_le64(s + 16 * i + 8));
    return xxh3_avalanche(h);
}

/* One 64-byte stripe into the 8 accumulators: lane i adds its 32x32->64 product of (data ^ secret) to
 * acc[i] and its raw data to the neighbouring acc[i ^ 1].  Written out lane by lane (and called on a local
 * copy of the accumulators) so that the compiler keeps all eight in registers. */
#define XXH3_LANE(acc, p, secret, i)                                         \
    do {                                                                     \
        uint64_t data_ = pk_load_le64((p) + 8 * (i));                        \
        uint64_t key_ = data_ ^ pk_load_le64((secret) + 8 * (i));            \
        (acc)[(i) ^ 1] += data_;                                             \
        (acc)[(i)] += (uint64_t)(uint32_t)key_ * (key_ >> 32);               \
    } while (0)

static inline void accumulate_512_scalar(uint64_t acc[8], const uint8_t *p, const uint8_t *secret) {
    XXH3_LANE(acc, p, secret, 0);
    XXH3_LANE(acc, p, secret, 1);
    XXH3_LANE(acc, p, secret, 2);
    XXH3_LANE(acc, p, secret, 3);
    XXH3_LANE(acc, p, secret, 4);
    XXH3_LANE(acc, p, secret, 5);
    XXH3_LANE(acc, p, secret, 6);
    XXH3_LANE(acc, p, secret, 7);
}

static inline void scramble_scalar(uint64_t acc[8], const uint8_t *secret) {
    for (int i = 0; i < 8; i++) {
        uint64_t a = acc[i];
        a ^= a >> 47;
        a ^= pk_load_le64(secret + 8 * i);
        acc[i] = a * PRIME32_1;
    }
}

/* pk_xxh3_64_copy reads a record that is usually not in any cache (a random position in a large mapped
 * file): while it works on one stripe it asks for the line this many bytes ahead, so that the loads wait
 * less on memory.  Measured on the random-access benchmark (benchmarks/limits.c, 200,000 samples of
 * 6.8 KB on average, AMD EPYC): 2 KiB ahead took the fused loop from about 0.56x to 0.65x of plain
 * memcpy's rate (1 KiB and 4 KiB: less); src_c/reader.c also prefetches the start of the next record. */
#define COPY_PREFETCH_AHEAD 2048
#if defined(__GNUC__) || defined(__clang__)
#define PK_PREFETCH(addr) __builtin_prefetch((addr), 0, 3)
#else
#define PK_PREFETCH(addr) ((void)(addr))
#endif

/* XXH3_LANE that also stores the lane to dst: each 8-byte lane is loaded once, stored, and the value
 * stored is the value hashed. */
#define XXH3_LANE_COPY(acc, dst, src, secret, i)                             \
    do {                                                                     \
        uint64_t data_ = pk_load_le64((src) + 8 * (i));                      \
        pk_store_le64((dst) + 8 * (i), data_);                               \
        uint64_t key_ = data_ ^ pk_load_le64((secret) + 8 * (i));            \
        (acc)[(i) ^ 1] += data_;                                             \
        (acc)[(i)] += (uint64_t)(uint32_t)key_ * (key_ >> 32);               \
    } while (0)

static inline __attribute__((always_inline)) void accumulate_512_scalar_copy(uint64_t acc[8], uint8_t *dst, const uint8_t *src,
                                              const uint8_t *secret) {
    XXH3_LANE_COPY(acc, dst, src, secret, 0);
    XXH3_LANE_COPY(acc, dst, src, secret, 1);
    XXH3_LANE_COPY(acc, dst, src, secret, 2);
    XXH3_LANE_COPY(acc, dst, src, secret, 3);
    XXH3_LANE_COPY(acc, dst, src, secret, 4);
    XXH3_LANE_COPY(acc, dst, src, secret, 5);
    XXH3_LANE_COPY(acc, dst, src, secret, 6);
    XXH3_LANE_COPY(acc, dst, src, secret, 7);
}

/* Every stripe of a long input (len > 240) into acc, in the spec's order.  With copy set, the input is
 * also copied to dst in the same pass (pk_xxh3_64_copy): the whole stripes go through registers into
 * dst, the 1..64 bytes after them are copied next, and the last stripe (which overlaps the one before)
 * is then hashed from dst, so the hash is exactly that of dst's bytes.  copy is a constant in each of
 * the two callers below, so each gets its own loop without the test. */
static inline __attribute__((always_inline)) void hash_long_scalar_impl(uint64_t acc_io[8], int copy, uint8_t *dst,
                                                                         const uint8_t *p, size_t len) {
    uint64_t acc[8];
    memcpy(acc, acc_io, sizeof acc);
    size_t nblocks = (len - 1) / BLOCK_LEN;
    for (size_t b = 0; b < nblocks; b++) {
        size_t at = b * BLOCK_LEN;
        for (size_t s = 0; s < STRIPES_PER_BLOCK; s++, at += STRIPE_LEN) {
            if (copy) {
                if (len - at > COPY_PREFETCH_AHEAD) PK_PREFETCH(p + at + COPY_PREFETCH_AHEAD);
                accumulate_512_scalar_copy(acc, dst + at, p + at, kSecret + s * SECRET_CONSUME_RATE);
            } else {
                accumulate_512_scalar(acc, p + at, kSecret + s * SECRET_CONSUME_RATE);
            }
        }
        scramble_scalar(acc, kSecret + SECRET_SIZE - STRIPE_LEN);
    }
    size_t nstripes = ((len - 1) - BLOCK_LEN * nblocks) / STRIPE_LEN;
    size_t at = nblocks * BLOCK_LEN;
    for (size_t s = 0; s < nstripes; s++, at += STRIPE_LEN) {
        if (copy)
            accumulate_512_scalar_copy(acc, dst + at, p + at, kSecret + s * SECRET_CONSUME_RATE);
        else
            accumulate_512_scalar(acc, p + at, kSecret + s * SECRET_CONSUME_RATE);
    }
    const uint8_t *last = p;
    if (copy) {
        memcpy(dst + at, p + at, len - at);
        last = dst;
    }
    accumulate_512_scalar(acc, last + len - STRIPE_LEN, kSecret + SECRET_SIZE - STRIPE_LEN - SECRET_LASTACC_START);
    memcpy(acc_io, acc, sizeof acc);
}

static void hash_long_scalar(uint64_t acc[8], const uint8_t *p, size_t len) {
    hash_long_scalar_impl(acc, 0, NULL, p, len);
}

static void hash_long_scalar_copy(uint64_t acc[8], uint8_t *dst, const uint8_t *src, size_t len) {
    hash_long_scalar_impl(acc, 1, dst, src, len);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PK_HAVE_AVX2_PATH 1
#include <immintrin.h>

/* The same stripe loop with the 8 accumulators in two 256-bit registers (the spec's SIMD description:
 * 32x32->64 multiplies per 64-bit lane, and the data added to the neighbouring lane via a 32-bit shuffle). */
__attribute__((target("avx2"))) static inline void accumulate_512_avx2(__m256i acc[2], const uint8_t *p,
                                                                       const uint8_t *secret) {
    for (int i = 0; i < 2; i++) {
        __m256i data = _mm256_loadu_si256((const __m256i *)(const void *)(p + 32 * i));
        __m256i key = _mm256_loadu_si256((const __m256i *)(const void *)(secret + 32 * i));
        __m256i dk = _mm256_xor_si256(data, key);
        __m256i product = _mm256_mul_epu32(dk, _mm256_srli_epi64(dk, 32));
        __m256i swapped = _mm256_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2));
        acc[i] = _mm256_add_epi64(acc[i], _mm256_add_epi64(product, swapped));
    }
}

__attribute__((target("avx2"))) static inline void scramble_avx2(__m256i acc[2], const uint8_t *secret) {
    const __m256i prime = _mm256_set1_epi32((int)PRIME32_1);
    for (int i = 0; i < 2; i++) {
        __m256i a = _mm256_xor_si256(acc[i], _mm256_srli_epi64(acc[i], 47));
        __m256i key = _mm256_loadu_si256((const __m256i *)(const void *)(secret + 32 * i));
        __m256i dk = _mm256_xor_si256(a, key);
        __m256i dk_hi = _mm256_shuffle_epi32(dk, _MM_SHUFFLE(0, 3, 0, 1));
        __m256i lo = _mm256_mul_epu32(dk, prime);
        __m256i hi = _mm256_mul_epu32(dk_hi, prime);
        acc[i] = _mm256_add_epi64(lo, _mm256_slli_epi64(hi, 32));
    }
}

/* The same with a copy: the stripe's two 32-byte halves are loaded once, stored to dst and accumulated. */
__attribute__((target("avx2"))) static inline void accumulate_512_avx2_copy(__m256i acc[2], uint8_t *dst,
                                                                            const uint8_t *src,
                                                                            const uint8_t *secret) {
    for (int i = 0; i < 2; i++) {
        __m256i data = _mm256_loadu_si256((const __m256i *)(const void *)(src + 32 * i));
        _mm256_storeu_si256((__m256i *)(void *)(dst + 32 * i), data);
        __m256i key = _mm256_loadu_si256((const __m256i *)(const void *)(secret + 32 * i));
        __m256i dk = _mm256_xor_si256(data, key);
        __m256i product = _mm256_mul_epu32(dk, _mm256_srli_epi64(dk, 32));
        __m256i swapped = _mm256_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2));
        acc[i] = _mm256_add_epi64(acc[i], _mm256_add_epi64(product, swapped));
    }
}

/* hash_long_scalar_impl's structure (and its dst contract) with the AVX2 stripe functions. */
__attribute__((target("avx2"))) static inline __attribute__((always_inline)) void
hash_long_avx2_impl(uint64_t acc64[8], int copy, uint8_t *dst, const uint8_t *p, size_t len) {
    __m256i acc[2];
    acc[0] = _mm256_loadu_si256((const __m256i *)(const void *)acc64);
    acc[1] = _mm256_loadu_si256((const __m256i *)(const void *)(acc64 + 4));
    size_t nblocks = (len - 1) / BLOCK_LEN;
    for (size_t b = 0; b < nblocks; b++) {
        size_t at = b * BLOCK_LEN;
        for (size_t s = 0; s < STRIPES_PER_BLOCK; s++, at += STRIPE_LEN) {
            if (copy) {
                if (len - at > COPY_PREFETCH_AHEAD) PK_PREFETCH(p + at + COPY_PREFETCH_AHEAD);
                accumulate_512_avx2_copy(acc, dst + at, p + at, kSecret + s * SECRET_CONSUME_RATE);
            } else {
                accumulate_512_avx2(acc, p + at, kSecret + s * SECRET_CONSUME_RATE);
            }
        }
        scramble_avx2(acc, kSecret + SECRET_SIZE - STRIPE_LEN);
    }
    size_t nstripes = ((len - 1) - BLOCK_LEN * nblocks) / STRIPE_LEN;
    size_t at = nblocks * BLOCK_LEN;
    for (size_t s = 0; s < nstripes; s++, at += STRIPE_LEN) {
        if (copy)
            accumulate_512_avx2_copy(acc, dst + at, p + at, kSecret + s * SECRET_CONSUME_RATE);
        else
            accumulate_512_avx2(acc, p + at, kSecret + s * SECRET_CONSUME_RATE);
    }
    const uint8_t *last = p;
    if (copy) {
        memcpy(dst + at, p + at, len - at);
        last = dst;
    }
    accumulate_512_avx2(acc, last + len - STRIPE_LEN, kSecret + SECRET_SIZE - STRIPE_LEN - SECRET_LASTACC_START);
    _mm256_storeu_si256((__m256i *)(void *)acc64, acc[0]);
    _mm256_storeu_si256((__m256i *)(void *)(acc64 + 4), acc[1]);
}

__attribute__((target("avx2"))) static void hash_long_avx2(uint64_t acc[8], const uint8_t *p, size_t len) {
    hash_long_avx2_impl(acc, 0, NULL, p, len);
}

__attribute__((target("avx2"))) static void hash_long_avx2_copy(uint64_t acc[8], uint8_t *dst,
                                                                 const uint8_t *src, size_t len) {
    hash_long_avx2_impl(acc, 1, dst, src, len);
}
#endif

/* -1 until resolved, then PK_XXH3_SCALAR or PK_XXH3_AVX2.  Accessed atomically: two threads resolving
 * at once both store the same value. */
static int xxh3_impl = -1;

static int xxh3_best(void) {
#ifdef PK_HAVE_AVX2_PATH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) return PK_XXH3_AVX2;
#endif
    return PK_XXH3_SCALAR;
}

int pk_xxh3_impl(int want) {
    int v;
    if (want == PK_XXH3_SCALAR) {
        v = PK_XXH3_SCALAR;
    } else if (want == PK_XXH3_AVX2) {
        v = xxh3_best();
    } else {
        v = __atomic_load_n(&xxh3_impl, __ATOMIC_RELAXED);
        if (v >= 0) return v;
        const char *no_simd = getenv("PACKFMT_NO_SIMD");
        v = no_simd && *no_simd && strcmp(no_simd, "0") != 0 ? PK_XXH3_SCALAR : xxh3_best();
    }
    __atomic_store_n(&xxh3_impl, v, __ATOMIC_RELAXED);
    return v;
}

static inline int xxh3_impl_now(void) {
    int impl = __atomic_load_n(&xxh3_impl, __ATOMIC_RELAXED);
    return impl < 0 ? pk_xxh3_impl(-1) : impl;
}

static uint64_t xxh3_long(const uint8_t *p, size_t len) {
    uint64_t acc[8];
    memcpy(acc, acc_init, sizeof acc);
#ifdef PK_HAVE_AVX2_PATH
    if (xxh3_impl_now() == PK_XXH3_AVX2) {
        hash_long_avx2(acc, p, len);
        return merge_accs(acc, len);
    }
#endif
    hash_long_scalar(acc, p, len);
    return merge_accs(acc, len);
}

static uint64_t xxh3_long_copy(uint8_t *dst, const uint8_t *src, size_t len) {
    uint64_t acc[8];
    memcpy(acc, acc_init, sizeof acc);
#ifdef PK_HAVE_AVX2_PATH
    if (xxh3_impl_now() == PK_XXH3_AVX2) {
        hash_long_avx2_copy(acc, dst, src, len);
        return merge_accs(acc, len);
    }
#endif
    hash_long_scalar_copy(acc, dst, src, len);
    return merge_accs(acc, len);
}

uint64_t pk_xxh3_64(const void *data, size_t len) {
    const uint8_t *p = (const uint8_t *)data;
    if (len <= 16) {
        if (len > 8) return xxh3_len_9to16(p, len);
        if (len >= 4) return xxh3_len_4to8(p, len);
        if (len > 0) return xxh3_len_1to3(p, len);
        /* Empty input: data may be NULL and is never touched. */
        return xxh64_avalanche(pk_load_le64(kSecret + 56) ^ pk_load_le64(kSecret + 64));
    }
    if (len <= 128) return xxh3_len_17to128(p, len);
    if (len <= MIDSIZE_MAX) return xxh3_len_129to240(p, len);
    return xxh3_long(p, len);
}

uint64_t pk_xxh3_64_copy(void *dst, const void *src, size_t len) {
    if (len > MIDSIZE_MAX) return xxh3_long_copy((uint8_t *)dst, (const uint8_t *)src, len);
    /* Short inputs are read at overlapping positions by their dedicated paths: copy, then hash the copy
     * (it sits in L1 now). */
    if (len) memcpy(dst, src, len);
    return pk_xxh3_64(dst, len);
}
