/*
 * checksum.h -- XXH64 and XXH3-64, written from the xxHash specification (doc/xxhash_spec.md, "XXH64
 * Algorithm Description" and "XXH3 Algorithm Overview").  Both are what the `xxhash` Python package
 * computes (xxh64_intdigest, xxh3_64_intdigest), so any tool can recompute them; tests/test_checksum.py
 * proves equality with that package.
 *
 * Which hash for what (docs/format.md, "Checksums"):
 *   - XXH3-64 (seed 0, default secret): every record's stored bytes.  This is the hot path of a verified
 *     read, and XXH3 is 2-4x faster than XXH64 on record-sized inputs.
 *   - XXH64 (seed 0): shard header, footer and index, and the whole-file checksums in the manifest (these
 *     need a streaming hash, which pk_xxh64_state provides).
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

/* One-shot XXH3-64 with seed 0 and the default 192-byte secret.  On x86-64 the inner loops of inputs
 * longer than 240 bytes use AVX2 when the CPU has it (decided once, on first use); the result is the same
 * either way.  Setting PACKFMT_NO_SIMD=1 in the environment before the first call forces the scalar code. */
uint64_t pk_xxh3_64(const void *data, size_t len);

/* Copy len bytes from src to dst (which must not overlap) and return pk_xxh3_64 of them, in one pass
 * over src: each 64-byte stripe is loaded once, stored to dst and fed to the accumulators.  The result is
 * the hash of the bytes written to dst, even if src changes meanwhile (a shared mapping of a file being
 * rewritten): a reader that compares it with the record's checksum never returns unverified bytes.  Same
 * code paths (scalar, AVX2) and PACKFMT_NO_SIMD switch as pk_xxh3_64. */
uint64_t pk_xxh3_64_copy(void *dst, const void *src, size_t len);

/* Which XXH3 implementation is in use: PK_XXH3_SCALAR or PK_XXH3_AVX2.  want = -1 only asks; want =
 * PK_XXH3_SCALAR forces the scalar code; want = PK_XXH3_AVX2 selects AVX2 if the CPU has it (scalar
 * otherwise).  For tests and benchmarks: not meant to be changed while other threads hash. */
enum { PK_XXH3_SCALAR = 0, PK_XXH3_AVX2 = 1 };
int pk_xxh3_impl(int want);

#endif /* PACKFMT_CHECKSUM_H */
