# Mirror of src_c/pagecache.h.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

cdef extern from "pagecache.h" nogil:
    enum:
        PK_PC_LAYOUT_VERSION
        PK_PC_CHUNK
        PK_PC_MIN_BLOCK
        PK_PC_MAX_BLOCK
        PK_PC_DEFAULT_BLOCK
        PK_PC_LABEL_MAX
        PK_PC_ADOPT
    const unsigned long long PK_PC_DEFAULT_CAPACITY

    enum:
        PK_PC_OK
        PK_PC_READY
        PK_PC_CLAIMED
        PK_PC_BUSY
        PK_PC_NOSPACE
        PK_PC_STALE
        PK_PC_CORRUPT
        PK_PC_TIMEDOUT
        PK_PC_MISS
        PK_PC_MISMATCH

    ctypedef struct pk_pagecache:
        pass

    ctypedef struct pk_pc_key:
        uint64_t h[2]
        uint64_t group
        uint64_t block

    ctypedef struct pk_pc_ticket:
        int64_t slot
        uint64_t gen
        uint64_t length

    ctypedef struct pk_pc_counters:
        uint64_t block_size
        uint64_t nslots
        uint64_t capacity
        uint64_t index_bytes
        uint64_t bytes_used
        uint64_t blocks_ready
        uint64_t blocks_fetching
        uint64_t hits
        uint64_t misses
        uint64_t fetched_bytes
        uint64_t evictions
        uint64_t corruptions
        uint64_t waits
        uint64_t takeovers
        uint64_t repairs

    ctypedef struct pk_pc_entry:
        uint64_t group
        uint64_t block
        uint64_t length
        uint32_t label_len
        char label[256]

    int pk_pc_open(const char *dir, uint64_t capacity, uint64_t block_size, int flags, pk_pagecache **out)
    void pk_pc_close(pk_pagecache *pc)
    void pk_pc_key_make(pk_pc_key *key, const char *ns, size_t ns_len, const char *obj, size_t obj_len,
                        uint64_t block)
    int pk_pc_lookup(pk_pagecache *pc, const pk_pc_key *key, uint64_t length, const char *label,
                     size_t label_len, pk_pc_ticket *t)
    int pk_pc_copy(pk_pagecache *pc, const pk_pc_ticket *t, uint64_t off, uint64_t len, void *out)
    ctypedef struct pk_pc_piece:
        uint64_t off
        uint64_t len
        void *dst

    int pk_pc_copy_pieces(pk_pagecache *pc, const pk_pc_ticket *t, const pk_pc_piece *pieces, size_t n)
    ctypedef struct pk_pc_object:
        uint64_t seed[2]
        uint64_t size

    void pk_pc_object_make(pk_pc_object *o, const char *ns, size_t ns_len, const char *obj, size_t obj_len,
                           uint64_t size)
    void pk_pc_object_key(const pk_pc_object *o, uint64_t block, pk_pc_key *key)

    ctypedef struct pk_pc_record:
        uint64_t offset
        uint64_t len
        uint64_t checksum
        uint8_t *dst
        uint32_t object
        int32_t status

    ctypedef struct pk_pc_batch_info:
        size_t missed
        size_t mismatched
        size_t blocks_hit
        size_t blocks_missed
        size_t bad_record

    int pk_pc_read_records(pk_pagecache *pc, const pk_pc_object *objects, size_t nobjects, pk_pc_record *recs,
                           size_t n, int verify, pk_pc_batch_info *info)
    int pk_pc_publish(pk_pagecache *pc, const pk_pc_ticket *t, const void *data, uint64_t len)
    int pk_pc_abort(pk_pagecache *pc, const pk_pc_ticket *t)
    int pk_pc_wait(pk_pagecache *pc, const pk_pc_ticket *t, int timeout_ms)
    int pk_pc_stats(pk_pagecache *pc, pk_pc_counters *st)
    int pk_pc_entries(pk_pagecache *pc, pk_pc_entry *out, size_t cap, size_t *n)
    int pk_pc_clear(pk_pagecache *pc)
    int pk_pc_drop(pk_pagecache *pc, const pk_pc_key *key)
    int pk_pc_locate(pk_pagecache *pc, const pk_pc_key *key, uint64_t *offset, uint64_t *length)
