# Mirror of src_c/format.h.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t

cdef extern from "format.h" nogil:
    const char *PK_MAGIC
    enum:
        PK_MAGIC_SIZE
        PK_FORMAT_VERSION
        PK_FORMAT_READ_VERSION
        PK_HEADER_SIZE
        PK_ENTRY_SIZE
        PK_FOOTER_SIZE
        PK_CODEC_NONE
        PK_CODEC_ZSTD
        PK_CODEC_ZSTD_DICT
        PK_CODEC_MASK
        PK_SHARD_HAS_ZSTD
        PK_SHARD_HAS_DICT
    unsigned int PK_MAX_RECORD_SIZE
    unsigned int PK_MAX_RECORDS

    enum pk_status:
        PK_OK
        PK_E_IO
        PK_E_NOMEM
        PK_E_CORRUPT
        PK_E_CHECKSUM
        PK_E_VERSION
        PK_E_TRUNCATED
        PK_E_RANGE
        PK_E_STATE

    ctypedef struct pk_entry:
        uint64_t offset
        uint32_t stored_len
        uint32_t raw_len
        uint64_t checksum
        uint32_t flags

    ctypedef struct pk_error:
        int code
        int sys_errno
        int64_t shard
        int64_t item
        uint64_t offset
        uint64_t expected
        uint64_t actual
        char msg[160]

    const char *pk_strerror(int code)
    int pk_zstd_content_size(const uint8_t *p, size_t len, uint64_t *size)
