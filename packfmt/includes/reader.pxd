# Mirror of src_c/reader.h.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from packfmt.includes.format cimport pk_entry, pk_error

cdef extern from "reader.h" nogil:
    ctypedef struct pk_shard:
        pass
    ctypedef struct pk_shard_info:
        uint64_t file_size
        uint64_t record_count
        uint64_t index_offset
        uint32_t flags
        uint32_t dict_id
        uint16_t read_version
        uint16_t write_version
    enum:
        PK_MAP
        PK_MAP_HUGE
    int pk_shard_open(const char *path, uint64_t expected_size, int map, pk_shard **out, pk_error *err)
    int pk_shard_check_tail(const uint8_t *tail, size_t tail_len, uint64_t file_size, pk_shard_info *info,
                            pk_error *err)
    void pk_shard_close(pk_shard *s)
    void pk_shard_get_info(const pk_shard *s, pk_shard_info *info)
    int pk_shard_entry(const pk_shard *s, uint64_t i, pk_entry *e, pk_error *err)
    int pk_shard_read(const pk_shard *s, uint64_t offset, uint32_t len, void *dst, pk_error *err)
    int pk_shard_verify_records(const pk_shard *s, uint64_t start, uint64_t end, uint64_t *bad,
                                size_t bad_cap, size_t *nbad, pk_error *err)
    int pk_shard_hash_range(const pk_shard *s, uint64_t start, uint64_t end, uint64_t *out, pk_error *err)

    ctypedef struct pk_shardset:
        pass
    int pk_shardset_new(size_t n, const char *const *paths, const uint64_t *sizes, int map,
                        pk_shardset **out, pk_error *err)
    void pk_shardset_free(pk_shardset *set)
    int pk_shardset_get(pk_shardset *set, size_t i, pk_shard **out, pk_error *err)

    ctypedef struct pk_index_cols:
        uint64_t nrows
        const uint32_t *shard
        const uint64_t *offset
        const uint32_t *stored_len
        const uint64_t *checksum
    ctypedef struct pk_read_opts:
        int verify
        uint64_t max_gap
        uint64_t max_read
    int pk_read_batch(pk_shardset *set, const pk_index_cols *cols, const int64_t *rows, size_t n,
                      uint8_t *const *dst, const pk_read_opts *opts, size_t *nreads, pk_error *err)
    int pk_verify_buffers(size_t n, const uint8_t *const *bufs, const uint32_t *lens,
                          const uint64_t *checksums, pk_error *err)
