/*
 * writer.h -- append records to a new shard file.
 *
 * The writer only ever appends: header, then records (buffered), then on close the index and the
 * footer.  It also hashes every byte it writes, so the caller learns the checksum of the whole file
 * without reading it back.  A writer that is aborted, or a process that dies, leaves a file without
 * a footer, which no reader accepts.
 */
#ifndef PACKFMT_WRITER_H
#define PACKFMT_WRITER_H

#include <stddef.h>
#include <stdint.h>

#include "format.h"

typedef struct pk_writer pk_writer;

/* What close() reports. */
typedef struct pk_writer_summary {
    uint64_t file_size;      /* bytes in the finished file */
    uint64_t record_count;
    uint64_t file_checksum;  /* XXH64 (seed 0) of the whole file */
    uint64_t data_bytes;     /* sum of stored lengths */
} pk_writer_summary;

/* Create path (it must not exist: O_EXCL) and write the header.  flags: PK_SHARD_*; dict_id: the
 * dictionary PK_CODEC_ZSTD_DICT records use, 0 if none. */
int pk_writer_open(const char *path, uint32_t flags, uint32_t dict_id, pk_writer **out, pk_error *err);

/* The same on an open descriptor (a file, or a pipe feeding an upload); the writer takes ownership
 * of fd on success and closes it.  Only regular files are fsynced. */
int pk_writer_open_fd(int fd, uint32_t flags, uint32_t dict_id, pk_writer **out, pk_error *err);

/* Append one record whose stored bytes are data[0..stored_len); codec is PK_CODEC_*.  *entry
 * (optional) receives its index entry. */
int pk_writer_append(pk_writer *w, const void *data, uint32_t stored_len, uint32_t raw_len,
                     uint32_t codec, pk_entry *entry, pk_error *err);

/* Append the contents of a regular file, stored raw.  expected_size: the size the caller listed it
 * with, or -1 to take whatever fstat() says.  Fails with PK_E_IO naming errno if the file cannot be
 * opened or read, or PK_E_RANGE if it is larger than PK_MAX_RECORD_SIZE, is not expected_size bytes
 * long, or changed size while read.  Symlinks are followed, as open(2) does.  The writer keeps the
 * directory of the last file open (O_PATH) and opens the next file of the same directory relative to
 * it, so appending a directory's files in a row resolves the directory's path once. */
int pk_writer_append_file(pk_writer *w, const char *path, int64_t expected_size, pk_entry *entry,
                          pk_error *err);

/* Bytes written so far, including buffered ones, and records appended so far. */
uint64_t pk_writer_size(const pk_writer *w);
uint64_t pk_writer_count(const pk_writer *w);

/* Write the index and the footer, fsync, close, free w.  On failure w is freed too and the file is
 * left without a valid footer. */
int pk_writer_close(pk_writer *w, pk_writer_summary *summary, pk_error *err);

/* Close and free without writing the index or the footer.  The caller removes the file. */
void pk_writer_abort(pk_writer *w);

#endif /* PACKFMT_WRITER_H */
