/* format.c -- encoding and decoding of the shard header, index entries and footer. */
#include "format.h"

#include <stdio.h>

#include "checksum.h"

int pk_fail(pk_error *err, int code, uint64_t offset, uint64_t expected, uint64_t actual,
            const char *msg) {
    if (err) {
        err->code = code;
        err->offset = offset;
        err->expected = expected;
        err->actual = actual;
        snprintf(err->msg, sizeof err->msg, "%s", msg ? msg : "");
    }
    return code;
}

const char *pk_strerror(int code) {
    switch (code) {
    case PK_OK: return "success";
    case PK_E_IO: return "I/O error";
    case PK_E_NOMEM: return "out of memory";
    case PK_E_CORRUPT: return "corrupt shard";
    case PK_E_CHECKSUM: return "checksum mismatch";
    case PK_E_VERSION: return "unsupported format version";
    case PK_E_TRUNCATED: return "truncated shard";
    case PK_E_RANGE: return "value out of range";
    case PK_E_STATE: return "invalid state";
    default: return "unknown error";
    }
}

void pk_header_encode(const pk_header *h, uint8_t out[PK_HEADER_SIZE]) {
    memset(out, 0, PK_HEADER_SIZE);
    memcpy(out, PK_MAGIC, PK_MAGIC_SIZE);
    pk_store_le16(out + 8, h->read_version);
    pk_store_le16(out + 10, h->write_version);
    pk_store_le32(out + 12, h->flags);
    pk_store_le32(out + 16, h->dict_id);
    pk_store_le64(out + 24, pk_xxh64(out, 24, 0));
}

int pk_header_decode(const uint8_t in[PK_HEADER_SIZE], pk_header *h, pk_error *err) {
    if (memcmp(in, PK_MAGIC, PK_MAGIC_SIZE) != 0)
        return pk_fail(err, PK_E_CORRUPT, 0, 0, 0, "bad magic in shard header (not a packfmt shard)");
    uint64_t want = pk_load_le64(in + 24), got = pk_xxh64(in, 24, 0);
    if (want != got) return pk_fail(err, PK_E_CHECKSUM, 0, want, got, "header checksum");
    h->read_version = pk_load_le16(in + 8);
    h->write_version = pk_load_le16(in + 10);
    h->flags = pk_load_le32(in + 12);
    h->dict_id = pk_load_le32(in + 16);
    if (h->read_version > PK_FORMAT_VERSION)
        return pk_fail(err, PK_E_VERSION, 8, PK_FORMAT_VERSION, h->read_version,
                       "shard needs a newer packfmt reader");
    if (h->flags & ~PK_SHARD_FLAGS_KNOWN || pk_load_le32(in + 20) != 0)
        return pk_fail(err, PK_E_CORRUPT, 12, 0, h->flags, "unknown header flags");
    return PK_OK;
}

void pk_entry_encode(const pk_entry *e, uint8_t out[PK_ENTRY_SIZE]) {
    pk_store_le64(out, e->offset);
    pk_store_le32(out + 8, e->stored_len);
    pk_store_le32(out + 12, e->raw_len);
    pk_store_le64(out + 16, e->checksum);
    pk_store_le32(out + 24, e->flags);
    pk_store_le32(out + 28, 0);
}

void pk_entry_decode(const uint8_t in[PK_ENTRY_SIZE], pk_entry *e) {
    e->offset = pk_load_le64(in);
    e->stored_len = pk_load_le32(in + 8);
    e->raw_len = pk_load_le32(in + 12);
    e->checksum = pk_load_le64(in + 16);
    e->flags = pk_load_le32(in + 24);
}

int pk_entry_check(const pk_entry *e, uint64_t data_end, pk_error *err) {
    if (e->flags & ~PK_CODEC_MASK || (e->flags & PK_CODEC_MASK) > PK_CODEC_MAX)
        return pk_fail(err, PK_E_CORRUPT, e->offset, 0, e->flags, "unknown record flags");
    if (e->stored_len > PK_MAX_RECORD_SIZE || e->raw_len > PK_MAX_RECORD_SIZE)
        return pk_fail(err, PK_E_CORRUPT, e->offset, PK_MAX_RECORD_SIZE,
                       e->stored_len > e->raw_len ? e->stored_len : e->raw_len,
                       "record length beyond the format limit");
    if ((e->flags & PK_CODEC_MASK) == PK_CODEC_NONE && e->stored_len != e->raw_len)
        return pk_fail(err, PK_E_CORRUPT, e->offset, e->stored_len, e->raw_len,
                       "raw length differs from stored length in an uncompressed record");
    /* offset + stored_len cannot overflow: offset is checked first and stored_len < 2^31. */
    if (e->offset < PK_HEADER_SIZE || e->offset > data_end || data_end - e->offset < e->stored_len)
        return pk_fail(err, PK_E_CORRUPT, e->offset, data_end, e->offset + (uint64_t)e->stored_len,
                       "record extends outside the shard's data region");
    return PK_OK;
}

void pk_footer_encode(const pk_footer *f, uint8_t out[PK_FOOTER_SIZE]) {
    pk_store_le64(out, f->index_offset);
    pk_store_le64(out + 8, f->record_count);
    pk_store_le64(out + 16, f->index_checksum);
    pk_store_le16(out + 24, f->read_version);
    pk_store_le16(out + 26, f->write_version);
    pk_store_le32(out + 28, f->flags);
    pk_store_le64(out + 32, pk_xxh64(out, 32, 0));
    memcpy(out + 40, PK_MAGIC, PK_MAGIC_SIZE);
}

int pk_footer_decode(const uint8_t in[PK_FOOTER_SIZE], pk_footer *f, pk_error *err) {
    if (memcmp(in + 40, PK_MAGIC, PK_MAGIC_SIZE) != 0)
        return pk_fail(err, PK_E_CORRUPT, 40, 0, 0,
                       "bad magic in shard footer (truncated, still being written, or not a packfmt shard)");
    uint64_t want = pk_load_le64(in + 32), got = pk_xxh64(in, 32, 0);
    if (want != got) return pk_fail(err, PK_E_CHECKSUM, 32, want, got, "footer checksum");
    f->index_offset = pk_load_le64(in);
    f->record_count = pk_load_le64(in + 8);
    f->index_checksum = pk_load_le64(in + 16);
    f->read_version = pk_load_le16(in + 24);
    f->write_version = pk_load_le16(in + 26);
    f->flags = pk_load_le32(in + 28);
    if (f->read_version > PK_FORMAT_VERSION)
        return pk_fail(err, PK_E_VERSION, 24, PK_FORMAT_VERSION, f->read_version,
                       "shard needs a newer packfmt reader");
    if (f->flags & ~PK_SHARD_FLAGS_KNOWN)
        return pk_fail(err, PK_E_CORRUPT, 28, 0, f->flags, "unknown footer flags");
    if (f->record_count > PK_MAX_RECORDS)
        return pk_fail(err, PK_E_CORRUPT, 8, PK_MAX_RECORDS, f->record_count, "record count beyond the format limit");
    return PK_OK;
}

int pk_zstd_content_size(const uint8_t *p, size_t len, uint64_t *size) {
    /* RFC 8878 section 3.1.1: magic, Frame_Header_Descriptor, [Window_Descriptor], [Dictionary_ID],
     * [Frame_Content_Size].  Every byte is bounds-checked before it is read. */
    static const uint8_t did_bytes[4] = {0, 1, 2, 4};
    if (len < 5 || pk_load_le32(p) != 0xFD2FB528u) return PK_E_CORRUPT;
    uint8_t fhd = p[4];
    unsigned fcs_flag = fhd >> 6, single = (fhd >> 5) & 1u, did_flag = fhd & 3u;
    if (fhd & 0x08) return PK_E_CORRUPT; /* reserved bit */
    size_t pos = 5 + (single ? 0 : 1) + did_bytes[did_flag];
    size_t n = fcs_flag == 0 ? (single ? 1 : 0) : (size_t)1 << fcs_flag;
    if (n == 0) return PK_E_RANGE; /* no content size recorded */
    if (pos > len || len - pos < n) return PK_E_CORRUPT;
    const uint8_t *q = p + pos;
    switch (n) {
    case 1: *size = q[0]; break;
    case 2: *size = (uint64_t)pk_load_le16(q) + 256; break;
    case 4: *size = pk_load_le32(q); break;
    default: *size = pk_load_le64(q); break;
    }
    return PK_OK;
}
