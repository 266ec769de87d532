/*
 * pagecache.h -- the node-local page cache: fixed-size blocks of remote objects kept on local disk,
 * memory-mapped, shared by every process of the node.
 *
 * Three files live in the cache directory (docs/cache.md draws them byte by byte):
 *   pagecache.lock   empty; flock()ed only while a process opens the cache (serialises creation)
 *   pagecache.index  header + hash buckets + one slot record per block slot, mmap'd read-write by all
 *   pagecache.data   nslots * block_size bytes, sparse; slot i holds its block at i * block_size
 *
 * Every user holds flock(pagecache.index, LOCK_SH) while it has the cache open; an opener that gets
 * LOCK_EX knows it is alone and may repair or re-size the cache.
 *
 * Concurrency: one robust, process-shared mutex in the index guards all metadata (held for
 * microseconds, never across I/O).  Each slot has its own robust mutex, held by the thread fetching
 * the block for as long as the slot is PK_PC_FETCHING; waiters block on it.  When a fetcher dies the
 * kernel marks its mutexes owner-dead, and the next thread to touch the slot takes the claim over.
 *
 * Integrity: a block is served only from a READY slot and only after the 4 KiB chunks being read
 * have been hashed (low 32 bits of XXH64) and compared with the sums recorded when the block was published.  A
 * mismatch caused by concurrent eviction is reported PK_PC_STALE; one with the slot unchanged is
 * corruption: the slot is dropped and PK_PC_CORRUPT returned.  Either way the caller looks up again.
 *
 * Return values: a negative errno on system failure, otherwise 0 or one of the PK_PC_* outcomes.
 * A pk_pagecache handle may be used from many threads at once and survives fork().
 */
#ifndef PACKFMT_PAGECACHE_H
#define PACKFMT_PAGECACHE_H

#include <stddef.h>
#include <stdint.h>

#define PK_PC_LAYOUT_VERSION 1
#define PK_PC_CHUNK 4096u                       /* checksum granule; block sizes are multiples */
#define PK_PC_MIN_BLOCK (64u * 1024u)
#define PK_PC_MAX_BLOCK (16u * 1024u * 1024u)
#define PK_PC_DEFAULT_BLOCK (4u * 1024u * 1024u)
#define PK_PC_DEFAULT_CAPACITY (10ull << 30)
#define PK_PC_LABEL_MAX 256                      /* namespace '\0' object, truncated, for listings */

/* Outcomes (>= 0). */
enum {
    PK_PC_OK = 0,
    PK_PC_READY = 1,    /* lookup: the block is cached; copy from it with the ticket */
    PK_PC_CLAIMED = 2,  /* lookup: the caller owns the slot; fetch, then publish or abort */
    PK_PC_BUSY = 3,     /* lookup: another thread/process is fetching it; wait, then look up again */
    PK_PC_NOSPACE = 4,  /* lookup: every slot is being fetched; fetch without caching */
    PK_PC_STALE = 5,    /* copy: the slot changed under the reader; look up again */
    PK_PC_CORRUPT = 6,  /* copy: the cached bytes failed their checksum; the slot was dropped */
    PK_PC_TIMEDOUT = 7, /* wait: still being fetched; call again */
    PK_PC_MISS = 8,     /* read_records: a block of the record is not cached (absent, being fetched,
                         * or evicted or found corrupt during the call); fetch it the slow way */
    PK_PC_MISMATCH = 9  /* read_records: the cached bytes are intact (chunk sums match) but are not
                         * the record (its checksum differs): the server sent bad bytes once */
};

/* Open flags. */
#define PK_PC_ADOPT 1   /* use the geometry of an existing cache instead of capacity/block_size */

typedef struct pk_pagecache pk_pagecache;

/* The identity of one block: a 128-bit hash of (namespace, object name, block number), plus a
 * 64-bit hash of (namespace, object) that groups the blocks of one object in listings. */
typedef struct pk_pc_key {
    uint64_t h[2];
    uint64_t group;
    uint64_t block;
} pk_pc_key;

/* What a lookup hands back; passed to copy / publish / abort / wait. */
typedef struct pk_pc_ticket {
    int64_t slot;     /* slot index, -1 for PK_PC_NOSPACE */
    uint64_t gen;     /* slot generation when the ticket was issued */
    uint64_t length;  /* block length (the last block of an object may be short) */
} pk_pc_ticket;

/* Node-wide figures, kept in the index since the cache was created. */
typedef struct pk_pc_counters {
    uint64_t block_size;
    uint64_t nslots;
    uint64_t capacity;        /* budget in bytes: index file + all slots never exceed it */
    uint64_t index_bytes;
    uint64_t bytes_used;      /* sum of the lengths of READY blocks */
    uint64_t blocks_ready;
    uint64_t blocks_fetching;
    uint64_t hits;
    uint64_t misses;
    uint64_t fetched_bytes;   /* bytes published into the cache */
    uint64_t evictions;
    uint64_t corruptions;     /* blocks dropped because a checksum failed */
    uint64_t waits;           /* lookups that found the block being fetched elsewhere */
    uint64_t takeovers;       /* claims inherited from a dead fetcher */
    uint64_t repairs;         /* index repairs after a process died holding the index lock */
} pk_pc_counters;

/* One READY block, for listings. */
typedef struct pk_pc_entry {
    uint64_t group;
    uint64_t block;
    uint64_t length;
    uint32_t label_len;
    char label[PK_PC_LABEL_MAX];
} pk_pc_entry;

/* Open (creating if needed) the cache in directory dir, which must exist.  capacity: the budget in
 * bytes for all three files; block_size: a multiple of PK_PC_CHUNK in [PK_PC_MIN_BLOCK,
 * PK_PC_MAX_BLOCK].  If the cache exists with another geometry it is rebuilt (emptied) when no other
 * process has it open, and adopted as it is otherwise; pk_pc_stats() tells what was used. */
int pk_pc_open(const char *dir, uint64_t capacity, uint64_t block_size, int flags, pk_pagecache **out);
/* Unmap and close.  No other thread may be inside a call on pc.  If claims taken through pc are
 * still open (neither published nor aborted), the mappings are deliberately kept until the process
 * exits, so that its death still releases them. */
void pk_pc_close(pk_pagecache *pc);

/* Build the key of block `block` of object `obj` in namespace `ns` (byte strings, any content). */
void pk_pc_key_make(pk_pc_key *key, const char *ns, size_t ns_len, const char *obj, size_t obj_len,
                    uint64_t block);

/* Find the block; if absent, claim a slot for it (evicting by CLOCK).  length: the block's expected
 * length (a cached block of another length is dropped).  label: shown by listings.
 * Returns PK_PC_READY, PK_PC_CLAIMED, PK_PC_BUSY, PK_PC_NOSPACE or -errno. */
int pk_pc_lookup(pk_pagecache *pc, const pk_pc_key *key, uint64_t length, const char *label,
                 size_t label_len, pk_pc_ticket *t);

/* Copy bytes [off, off+len) of a READY block into out, verifying the checksums of the chunks read.
 * Returns 0, PK_PC_STALE, PK_PC_CORRUPT or -errno. */
int pk_pc_copy(pk_pagecache *pc, const pk_pc_ticket *t, uint64_t off, uint64_t len, void *out);

/* One piece of a block to copy out: bytes [off, off+len) of the block into dst. */
typedef struct pk_pc_piece {
    uint64_t off;
    uint64_t len;
    void *dst;
} pk_pc_piece;

/* pk_pc_copy() for n pieces of one block, with one trip through the index lock.  On PK_PC_STALE or
 * PK_PC_CORRUPT the contents of every dst are undefined. */
int pk_pc_copy_pieces(pk_pagecache *pc, const pk_pc_ticket *t, const pk_pc_piece *pieces, size_t n);

/* ---- batch reads: many records of many objects in one call ------------------------------- */

/* One object (e.g. a shard) as batch reads see it: the seeds of its block keys and its size. */
typedef struct pk_pc_object {
    uint64_t seed[2];  /* hashes of (namespace, object name); pk_pc_object_key() derives block keys */
    uint64_t size;     /* object size in bytes: bounds every record, gives the last block's length */
} pk_pc_object;

/* Describe object `obj` of namespace `ns`, `size` bytes long.  Its block keys are the ones
 * pk_pc_key_make() builds, so batch reads and lookups share the cached blocks. */
void pk_pc_object_make(pk_pc_object *o, const char *ns, size_t ns_len, const char *obj, size_t obj_len,
                       uint64_t size);
void pk_pc_object_key(const pk_pc_object *o, uint64_t block, pk_pc_key *key);

/* One record to read: bytes [offset, offset+len) of objects[object], into dst. */
typedef struct pk_pc_record {
    uint64_t offset;
    uint64_t len;
    uint64_t checksum;  /* XXH3-64 of the record's bytes, checked when verify is set */
    uint8_t *dst;       /* len bytes */
    uint32_t object;    /* index into the objects array */
    int32_t status;     /* out: PK_PC_OK (copied and verified), PK_PC_MISS or PK_PC_MISMATCH */
} pk_pc_record;

/* What a batch read did. */
typedef struct pk_pc_batch_info {
    size_t missed;         /* records left PK_PC_MISS */
    size_t mismatched;     /* records left PK_PC_MISMATCH (only with verify) */
    size_t blocks_hit;     /* distinct cached blocks served from */
    size_t blocks_missed;  /* distinct blocks not served: absent, being fetched, evicted or corrupt */
    size_t bad_record;     /* on -EINVAL: the first record outside its object (or naming none) */
} pk_pc_batch_info;

/* Serve every record whose blocks are all cached, in one call: look the batch's blocks up (one trip
 * through the index lock per 64 blocks; nothing claimed, nothing waited for), copy each record into its
 * dst, re-check each block's generation after the copy (an eviction meanwhile makes its records
 * PK_PC_MISS), and hash each copy with XXH3-64 -- so what is checked is exactly what is handed back.
 * A copy that does not match its checksum has the chunk sums of its chunks verified in place: a
 * mismatch there is a corrupt cached block (dropped, counted in corruptions; the record PK_PC_MISS);
 * otherwise the cache holds what the server sent, and the record is PK_PC_MISMATCH if verify is set
 * (the caller checks records), served as it is if not.
 * Records whose blocks are not all READY are left PK_PC_MISS, for the caller to fetch through
 * lookup/publish.  The dst of a record not PK_PC_OK holds undefined bytes.
 * Returns 0, -EINVAL (a record outside its object; info->bad_record says which), -ENOMEM or -errno. */
int pk_pc_read_records(pk_pagecache *pc, const pk_pc_object *objects, size_t nobjects, pk_pc_record *recs,
                       size_t n, int verify, pk_pc_batch_info *info);

/* Store the fetched block (exactly t->length bytes) and make it visible; wakes waiters.  Must be
 * called by the thread that claimed it.  On failure (disk full, ...) the claim is aborted. */
int pk_pc_publish(pk_pagecache *pc, const pk_pc_ticket *t, const void *data, uint64_t len);

/* Give a claim up (the fetch failed); wakes waiters, who will claim the block themselves. */
int pk_pc_abort(pk_pagecache *pc, const pk_pc_ticket *t);

/* Block until the fetch that made lookup return PK_PC_BUSY ends (published, aborted or its owner
 * died), at most timeout_ms.  Returns 0, PK_PC_TIMEDOUT or -errno (-EDEADLK: waiting on oneself). */
int pk_pc_wait(pk_pagecache *pc, const pk_pc_ticket *t, int timeout_ms);

int pk_pc_stats(pk_pagecache *pc, pk_pc_counters *st);

/* Copy up to cap READY entries into out; *n receives how many there are in total. */
int pk_pc_entries(pk_pagecache *pc, pk_pc_entry *out, size_t cap, size_t *n);

/* Drop every READY block and return its space to the filesystem.  Blocks being fetched stay. */
int pk_pc_clear(pk_pagecache *pc);

/* Where a READY block's bytes are in pagecache.data (for tools and tests).  Returns PK_PC_READY
 * with *offset / *length set, or 0 if the block is not cached. */
/* Drop a cached block (READY only; a block being fetched is left to its fetcher): 1 if dropped, 0 if
 * absent, -errno on failure.  For a block whose bytes failed a check further up (a corrupt answer
 * from the server that the cache faithfully stored). */
int pk_pc_drop(pk_pagecache *pc, const pk_pc_key *key);

int pk_pc_locate(pk_pagecache *pc, const pk_pc_key *key, uint64_t *offset, uint64_t *length);

/* For tests only: take the index lock and return holding it (a child then dies holding it). */
int pk_pc_debug_lock(pk_pagecache *pc);

#endif /* PACKFMT_PAGECACHE_H */
