/*
 * format.h -- the on-disk structures of a packfmt shard, format version 1.
 *
 * This header and docs/format.md describe the same bytes; tests/test_format.py checks that the
 * constants agree with the Python side and tests/data/golden/ freezes the bytes.
 *
 * All integers are little-endian, whatever the host.  Structures are never read by casting a
 * pointer: every field is decoded with pk_load_le*() from a byte buffer whose bounds were checked
 * first, so neither alignment nor host byte order matter.
 *
 * A shard file:
 *
 *   +-----------------+  offset 0
 *   | header (32 B)   |
 *   +-----------------+  offset 32 = first record
 *   | record 0        |  stored bytes: raw, or one independent zstd frame
 *   | record 1        |  records are back to back, in the order they were appended
 *   | ...             |
 *   +-----------------+  index_offset
 *   | index entries   |  record_count * 32 B
 *   +-----------------+  file_size - 48
 *   | footer (48 B)   |  ends with the magic
 *   +-----------------+  file_size
 *
 * The file is written strictly append-only (the index and the footer come last), so it can be
 * streamed into an object-store multipart upload; a reader opens it from its tail: the footer, then
 * the index just before it.  Given the record count (from the dataset manifest) one ranged read of
 * the last 48 + 32 * record_count bytes returns both.
 */
#ifndef PACKFMT_FORMAT_H
#define PACKFMT_FORMAT_H

#include <stdint.h>
#include <string.h>

/* "\x89PACK\r\n\x1a": a non-ASCII first byte and CR LF / ^Z catch text-mode transfers, like PNG. */
#define PK_MAGIC "\x89PACK\r\n\x1a"
#define PK_MAGIC_SIZE 8

/*
 * Format versions.  PK_FORMAT_VERSION is what this code writes; a file records the version that wrote
 * it and the oldest reader version that can read it.  A reader refuses a file whose read_version is
 * newer than PK_FORMAT_VERSION instead of misreading it.
 */
#define PK_FORMAT_VERSION 1
#define PK_FORMAT_READ_VERSION 1

#define PK_HEADER_SIZE 32
#define PK_ENTRY_SIZE 32
#define PK_FOOTER_SIZE 48

/* Limits.  A record's lengths are u32 fields, but we cap them at 2 GiB - 1 so that every length
 * fits a signed 32-bit int in every consumer (zstd, Python buffers, Arrow).  Shard size is u64:
 * there is no 4 GiB cap on a shard. */
#define PK_MAX_RECORD_SIZE 0x7FFFFFFFu
#define PK_MAX_RECORDS 0xFFFFFFFFu

/* Per-record codec, bits 0-3 of the entry flags. */
#define PK_CODEC_NONE 0u      /* stored bytes are the raw bytes */
#define PK_CODEC_ZSTD 1u      /* one zstd frame */
#define PK_CODEC_ZSTD_DICT 2u /* one zstd frame compressed with the dataset dictionary */
#define PK_CODEC_MASK 0xFu
#define PK_CODEC_MAX PK_CODEC_ZSTD_DICT

/* Shard flags (header and footer), a summary of the entries. */
#define PK_SHARD_HAS_ZSTD 0x1u /* some record uses PK_CODEC_ZSTD or PK_CODEC_ZSTD_DICT */
#define PK_SHARD_HAS_DICT 0x2u /* some record uses PK_CODEC_ZSTD_DICT; dict_id names the dictionary */
#define PK_SHARD_FLAGS_KNOWN (PK_SHARD_HAS_ZSTD | PK_SHARD_HAS_DICT)

/*
 * Header, 32 bytes at offset 0.
 *   0  8  magic
 *   8  2  read_version   oldest reader version able to read this file
 *  10  2  write_version  version of the writer
 *  12  4  flags          PK_SHARD_*
 *  16  4  dict_id        zstd dictionary id used by PK_CODEC_ZSTD_DICT records, 0 if none
 *  20  4  reserved       zero
 *  24  8  checksum       XXH64 (seed 0) of bytes 0..23
 */
typedef struct pk_header {
    uint16_t read_version;
    uint16_t write_version;
    uint32_t flags;
    uint32_t dict_id;
} pk_header;

/*
 * Index entry, 32 bytes per record, in append order.
 *   0  8  offset      absolute file offset of the record's stored bytes
 *   8  4  stored_len  bytes on disk
 *  12  4  raw_len     bytes after decoding (== stored_len for PK_CODEC_NONE)
 *  16  8  checksum    XXH3-64 (seed 0, default secret) of the stored bytes
 *  24  4  flags       bits 0-3 codec; other bits zero
 *  28  4  reserved    zero
 */
typedef struct pk_entry {
    uint64_t offset;
    uint32_t stored_len;
    uint32_t raw_len;
    uint64_t checksum;
    uint32_t flags;
} pk_entry;

/*
 * Footer, 48 bytes at file_size - 48.
 *   0  8  index_offset    offset of the first index entry
 *   8  8  record_count
 *  16  8  index_checksum  XXH64 (seed 0) of the record_count * 32 index bytes
 *  24  2  read_version
 *  26  2  write_version
 *  28  4  flags           same as the header's
 *  32  8  footer_checksum XXH64 (seed 0) of footer bytes 0..31
 *  40  8  magic
 */
typedef struct pk_footer {
    uint64_t index_offset;
    uint64_t record_count;
    uint64_t index_checksum;
    uint16_t read_version;
    uint16_t write_version;
    uint32_t flags;
} pk_footer;

/* Status codes: 0 is success, every failure is negative.  packfmt/_core.pyx turns them into
 * exceptions in exactly one place (check_status). */
enum pk_status {
    PK_OK = 0,
    PK_E_IO = -1,        /* a system call failed; pk_error.sys_errno says why */
    PK_E_NOMEM = -2,     /* allocation failed */
    PK_E_CORRUPT = -3,   /* bytes that cannot be a valid shard (bad magic, bounds, structure) */
    PK_E_CHECKSUM = -4,  /* a checksum did not match */
    PK_E_VERSION = -5,   /* the file needs a newer reader */
    PK_E_TRUNCATED = -6, /* the file is shorter than its structures say */
    PK_E_RANGE = -7,     /* an argument out of range (record number, length limit) */
    PK_E_STATE = -8,     /* call not valid in this state (writer closed, ...) */
};

/* What went wrong, with enough detail to name the shard, the offset and what was expected. */
typedef struct pk_error {
    int code;            /* enum pk_status */
    int sys_errno;       /* errno for PK_E_IO, else 0 */
    int64_t shard;       /* shard number in a shard set, -1 if not applicable */
    int64_t item;        /* position in the caller's batch or record number, -1 if n/a */
    uint64_t offset;     /* file offset concerned */
    uint64_t expected;   /* expected value (checksum, size, ...) */
    uint64_t actual;     /* value found */
    char msg[160];       /* what was being checked, human readable */
} pk_error;

/* Little-endian loads and stores that work on any host and any alignment. */
static inline uint16_t pk_load_le16(const uint8_t *p) {
    return (uint16_t)(p[0] | (uint16_t)p[1] << 8);
}
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
/* On little-endian hosts a memcpy compiles to one unaligned load (the checksum's hot loop). */
static inline uint32_t pk_load_le32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline uint64_t pk_load_le64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}
#else
static inline uint32_t pk_load_le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t pk_load_le64(const uint8_t *p) {
    return (uint64_t)pk_load_le32(p) | (uint64_t)pk_load_le32(p + 4) << 32;
}
#endif
static inline void pk_store_le16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static inline void pk_store_le32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}
static inline void pk_store_le64(uint8_t *p, uint64_t v) {
    pk_store_le32(p, (uint32_t)v);
    pk_store_le32(p + 4, (uint32_t)(v >> 32));
}

/* Encoders and decoders for the three structures (format.c).  Decoders check the magic, the
 * checksum and the version, and nothing that needs context beyond the structure itself. */
void pk_header_encode(const pk_header *h, uint8_t out[PK_HEADER_SIZE]);
int pk_header_decode(const uint8_t in[PK_HEADER_SIZE], pk_header *h, pk_error *err);
void pk_entry_encode(const pk_entry *e, uint8_t out[PK_ENTRY_SIZE]);
void pk_entry_decode(const uint8_t in[PK_ENTRY_SIZE], pk_entry *e);
void pk_footer_encode(const pk_footer *f, uint8_t out[PK_FOOTER_SIZE]);
int pk_footer_decode(const uint8_t in[PK_FOOTER_SIZE], pk_footer *f, pk_error *err);

/* Check one entry against the shard's data region [PK_HEADER_SIZE, data_end). */
int pk_entry_check(const pk_entry *e, uint64_t data_end, pk_error *err);

/* The content size a zstd frame header declares (RFC 8878), read without decompressing: PK_OK,
 * PK_E_RANGE if the frame does not record it, PK_E_CORRUPT if p is not a frame header.  Lets a reader
 * refuse a frame whose declared size differs from the index before any allocation. */
int pk_zstd_content_size(const uint8_t *p, size_t len, uint64_t *size);

/* Fill *err (if not NULL) and return code. */
int pk_fail(pk_error *err, int code, uint64_t offset, uint64_t expected, uint64_t actual,
            const char *msg);
const char *pk_strerror(int code);

#endif /* PACKFMT_FORMAT_H */
