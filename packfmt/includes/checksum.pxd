# Mirror of src_c/checksum.h.
from libc.stdint cimport uint8_t, uint32_t, uint64_t

cdef extern from "checksum.h" nogil:
    uint64_t pk_xxh64(const void *data, size_t len, uint64_t seed)
    ctypedef struct pk_xxh64_state:
        pass
    void pk_xxh64_init(pk_xxh64_state *s, uint64_t seed)
    void pk_xxh64_update(pk_xxh64_state *s, const void *data, size_t len)
    uint64_t pk_xxh64_digest(const pk_xxh64_state *s)
    uint64_t pk_xxh3_64(const void *data, size_t len)
    uint64_t pk_xxh3_64_copy(void *dst, const void *src, size_t len)
    enum:
        PK_XXH3_SCALAR
        PK_XXH3_AVX2
    int pk_xxh3_impl(int want)
