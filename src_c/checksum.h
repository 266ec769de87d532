/*
 * checksum.h -- XXH64, written from the xxHash specification (doc/xxhash_spec.md, "XXH64 Algorithm
 * Description").  Chosen because it is fast on any 64-bit CPU without SIMD, has a published spec and
 * test vectors, and is what the `xxhash` Python package computes, so any tool can recompute it.
 * tests/test_checksum.py proves equality with that package on random inputs and seeds.
 */
#ifndef PACKFMT_CHECKSUM_H
#define PACKFMT_CHECKSUM_H

#include <stddef.h>
#include <stdint.h>

/* One-shot hash of len bytes. */
uint64_t pk_xxh64(const void *data, size_t len, uint64_t seed);

/* Streaming state, for hashing a whole shard while it is written. */
typedef struct pk_xxh64_state {
    uint64_t total_len;  /* bytes fed so far */
    uint64_t v[4];       /* the four lane accumulators */
    uint8_t buf[32];     /* a partial stripe */
    uint32_t buf_len;    /* bytes in buf */
    uint64_t seed;
} pk_xxh64_state;

void pk_xxh64_init(pk_xxh64_state *s, uint64_t seed);
void pk_xxh64_update(pk_xxh64_state *s, const void *data, size_t len);
uint64_t pk_xxh64_digest(const pk_xxh64_state *s);

#endif /* PACKFMT_CHECKSUM_H */
