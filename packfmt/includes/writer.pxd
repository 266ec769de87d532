# Mirror of src_c/writer.h.
from libc.stdint cimport int64_t, uint32_t, uint64_t
from packfmt.includes.format cimport pk_entry, pk_error

cdef extern from "writer.h" nogil:
    ctypedef struct pk_writer:
        pass
    ctypedef struct pk_writer_summary:
        uint64_t file_size
        uint64_t record_count
        uint64_t file_checksum
        uint64_t data_bytes
    int pk_writer_open(const char *path, uint32_t flags, uint32_t dict_id, pk_writer **out, pk_error *err)
    int pk_writer_open_fd(int fd, uint32_t flags, uint32_t dict_id, pk_writer **out, pk_error *err)
    int pk_writer_append(pk_writer *w, const void *data, uint32_t stored_len, uint32_t raw_len,
                         uint32_t codec, pk_entry *entry, pk_error *err)
    int pk_writer_append_file(pk_writer *w, const char *path, int64_t expected_size, pk_entry *entry,
                              pk_error *err)
    uint64_t pk_writer_size(const pk_writer *w)
    uint64_t pk_writer_count(const pk_writer *w)
    int pk_writer_close(pk_writer *w, pk_writer_summary *summary, pk_error *err)
    void pk_writer_abort(pk_writer *w)
