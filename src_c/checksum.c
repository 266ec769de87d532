/* checksum.c -- XXH64 from the public xxHash specification. */
#include "checksum.h"

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
