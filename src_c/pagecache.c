/*
 * pagecache.c -- the node-local, shared, memory-mapped block cache.  See pagecache.h for the
 * contract and docs/cache.md for the design and the byte layout of the files.
 *
 * Invariants (all metadata is read and written under the index lock, h->lock):
 *   - a slot is FREE, FETCHING or READY;
 *   - FETCHING: the slot's key is in the hash table and its fetch mutex is held by the claiming thread
 *     (or owner-dead: the thread died; whoever locks it next inherits the claim);
 *   - READY: key in the hash table, length and chunk sums recorded, data in pagecache.data;
 *   - FREE: not in the hash table; its data range is a hole, or about to be overwritten by a claimer;
 *   - every change of a slot's identity or content bumps its generation, so a ticket can tell.
 * Data is only ever served after its chunk checksums match, so neither a torn write (the writer died)
 * nor a concurrent eviction nor a flipped bit on disk can reach a caller.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* fallocate, pthread_mutex_clocklock */
#endif

#include "pagecache.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "checksum.h"

#define PC_MAGIC "PKPCACHE"
#define PC_HEADER_BYTES 4096u  /* the header occupies the first page of pagecache.index */
#define PC_PAGE 4096u

enum { PC_FREE = 0, PC_FETCHING = 1, PC_READY = 2 };

/* A process-shared robust mutex padded to a cache line, so its size is the same on every build. */
typedef union pc_mutex {
    pthread_mutex_t m;
    char pad[64];
} pc_mutex;

/*
 * The header, at offset 0 of pagecache.index.  Geometry fields are written once when the index is
 * built; counters change under `lock`.
 */
typedef struct pc_header {
    char magic[8];           /* "PKPCACHE" */
    uint32_t version;        /* PK_PC_LAYOUT_VERSION */
    uint32_t mutex_size;     /* sizeof(pthread_mutex_t) of the builder: an ABI guard */
    uint64_t block_size;     /* bytes per block */
    uint64_t nslots;         /* number of block slots */
    uint64_t capacity;       /* the byte budget the geometry was computed from */
    uint64_t slot_size;      /* stride of the slot records */
    uint64_t nbuckets;       /* hash buckets, a power of two */
    uint64_t buckets_offset; /* where the int32 bucket heads start */
    uint64_t slots_offset;   /* where the slot records start */
    uint64_t index_size;     /* size of pagecache.index */
    uint64_t clock_hand;     /* next slot the CLOCK sweep looks at */
    uint64_t bytes_used;     /* sum of READY lengths */
    uint64_t nready;         /* READY slots */
    uint64_t nfetching;      /* FETCHING slots */
    uint64_t hits, misses, fetched_bytes, evictions, corruptions, waits, takeovers, repairs;
    uint64_t io_errors;      /* failed hole punches / writes, for diagnosis */
    uint64_t reserved[8];
    pc_mutex lock;           /* guards everything in the index except the slot fetch mutexes */
} pc_header;

/* One slot record.  Followed by block_size / PK_PC_CHUNK chunk sums; the stride is slot_size. */
typedef struct pc_slot {
    pc_mutex fetch;          /* held by the fetching thread while state == PC_FETCHING */
    uint32_t state;          /* PC_FREE / PC_FETCHING / PC_READY */
    uint32_t ref;            /* CLOCK reference bit: set on use, cleared by the sweep */
    int32_t next;            /* next slot in the hash chain, -1 at the end */
    uint32_t label_len;      /* bytes used in label */
    uint64_t gen;            /* bumped on every change of identity or content */
    uint64_t key[2];         /* 128-bit block identity */
    uint64_t group;          /* hash of (namespace, object) */
    uint64_t block;          /* block number within the object */
    uint64_t length;         /* block length in bytes */
    int64_t owner_pid;       /* the last claimer, for diagnosis only */
    char label[PK_PC_LABEL_MAX]; /* "namespace\0object", truncated */
    uint32_t sums[];         /* low 32 bits of XXH64 of each chunk, valid when READY */
} pc_slot;

_Static_assert(sizeof(pc_header) <= PC_HEADER_BYTES, "header must fit its page");
_Static_assert(sizeof(pthread_mutex_t) <= 64, "pthread_mutex_t larger than its padding");

struct pk_pagecache {
    int ifd;                 /* pagecache.index, flock(LOCK_SH) held while open */
    int dfd;                 /* pagecache.data */
    uint8_t *index;          /* mapping of the whole index, read-write */
    uint8_t *data;           /* mapping of the whole data file, read-only (NULL if nslots == 0) */
    size_t index_size;
    size_t data_size;
    pc_header *h;
    int32_t *buckets;
    uint64_t bs, nslots, slot_size, nbuckets, nchunks;
    int64_t claims;          /* claims taken through this handle and not yet published/aborted */
};

typedef struct pc_geom {
    uint64_t bs, nslots, slot_size, nbuckets, buckets_offset, slots_offset, index_size, capacity;
} pc_geom;

static uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

static uint64_t next_pow2(uint64_t x)
{
    uint64_t p = 1;
    while (p < x) p <<= 1;
    return p;
}

static void geom_for(uint64_t capacity, uint64_t bs, uint64_t n, pc_geom *g)
{
    g->bs = bs;
    g->capacity = capacity;
    g->nslots = n;
    g->slot_size = round_up(sizeof(pc_slot) + (bs / PK_PC_CHUNK) * sizeof(uint32_t), 64);
    g->nbuckets = next_pow2(n < 1 ? 2 : 2 * n);
    g->buckets_offset = PC_HEADER_BYTES;
    g->slots_offset = g->buckets_offset + round_up(g->nbuckets * sizeof(int32_t), 64);
    g->index_size = round_up(g->slots_offset + n * g->slot_size, PC_PAGE);
}

/* The most slots such that index + data fit in capacity. */
static void geom_compute(uint64_t capacity, uint64_t bs, pc_geom *g)
{
    uint64_t n, max_n = (uint64_t)INT32_MAX - 1;
    geom_for(capacity, bs, 0, g);
    n = capacity / (bs + g->slot_size + 2 * sizeof(int32_t));
    if (n > max_n) n = max_n;
    for (;;) { /* grow while the next one fits (the estimate is close; this runs a step or two) */
        pc_geom t;
        if (n >= max_n) break;
        geom_for(capacity, bs, n + 1, &t);
        if (t.index_size + (n + 1) * bs > capacity) break;
        n++;
    }
    for (;;) { /* shrink until it fits */
        geom_for(capacity, bs, n, g);
        if (n == 0 || g->index_size + n * bs <= capacity) break;
        n--;
    }
}

static int block_size_ok(uint64_t bs)
{
    return bs >= PK_PC_MIN_BLOCK && bs <= PK_PC_MAX_BLOCK && bs % PK_PC_CHUNK == 0;
}

static pc_slot *slot_at(const pk_pagecache *pc, uint64_t i)
{
    return (pc_slot *)(pc->index + pc->h->slots_offset + i * pc->slot_size);
}

/* ---- mutexes ------------------------------------------------------------------------------ */

static int mutex_init_shared(pthread_mutex_t *m)
{
    pthread_mutexattr_t a;
    int rc = pthread_mutexattr_init(&a);
    if (rc) return -rc;
    rc = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    if (!rc) rc = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    /* ERRORCHECK: a thread waiting for a block it is itself fetching gets EDEADLK, not a hang. */
    if (!rc) rc = pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK);
    if (!rc) rc = pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return -rc;
}

/* Try to take a slot's fetch mutex.  0: taken (possibly inherited from a dead owner);
 * 1: held by a live thread; -errno otherwise.  Called with the index lock held. */
static int slot_trylock(pc_slot *s)
{
    int rc = pthread_mutex_trylock(&s->fetch.m);
    if (rc == 0) return 0;
    if (rc == EBUSY || rc == EDEADLK) return 1; /* EDEADLK: held by the calling thread itself */
    if (rc == EOWNERDEAD) {
        pthread_mutex_consistent(&s->fetch.m);
        return 0;
    }
    if (rc == ENOTRECOVERABLE) { /* nobody can be blocked on it; start it afresh */
        rc = mutex_init_shared(&s->fetch.m);
        if (rc) return rc;
        rc = pthread_mutex_trylock(&s->fetch.m);
        return rc == 0 ? 0 : (rc == EBUSY ? 1 : -rc);
    }
    return -rc;
}

static void repair(pk_pagecache *pc);

/* Take the index lock.  If its holder died, the index may be half-updated: repair it. */
static int glock(pk_pagecache *pc)
{
    int rc = pthread_mutex_lock(&pc->h->lock.m);
    if (rc == EOWNERDEAD) {
        repair(pc);
        pc->h->repairs++;
        pthread_mutex_consistent(&pc->h->lock.m);
        return 0;
    }
    return -rc;
}

static void gunlock(pk_pagecache *pc) { pthread_mutex_unlock(&pc->h->lock.m); }

/* ---- the hash table ----------------------------------------------------------------------- */

static uint64_t bucket_of(const pk_pagecache *pc, const uint64_t key[2])
{
    return key[0] & (pc->nbuckets - 1);
}

static void chains_rebuild(pk_pagecache *pc)
{
    uint64_t i;
    for (i = 0; i < pc->nbuckets; i++) pc->buckets[i] = -1;
    for (i = 0; i < pc->nslots; i++) {
        pc_slot *s = slot_at(pc, i);
        if (s->state == PC_FETCHING || s->state == PC_READY) {
            uint64_t b = bucket_of(pc, s->key);
            s->next = pc->buckets[b];
            pc->buckets[b] = (int32_t)i;
        }
    }
}

static int64_t find(pk_pagecache *pc, const uint64_t key[2])
{
    int attempt;
    for (attempt = 0; attempt < 2; attempt++) {
        int32_t i = pc->buckets[bucket_of(pc, key)];
        uint64_t steps = 0;
        while (i >= 0 && (uint64_t)i < pc->nslots && steps++ <= pc->nslots) {
            pc_slot *s = slot_at(pc, (uint64_t)i);
            if (s->state != PC_FREE && s->key[0] == key[0] && s->key[1] == key[1]) return i;
            i = s->next;
        }
        if (i < 0) return -1;
        chains_rebuild(pc); /* a cycle or a wild index: the chains are rebuilt from the slots */
    }
    return -1;
}

static void link_slot(pk_pagecache *pc, uint64_t i)
{
    pc_slot *s = slot_at(pc, i);
    uint64_t b = bucket_of(pc, s->key);
    s->next = pc->buckets[b];
    pc->buckets[b] = (int32_t)i;
}

static void unlink_slot(pk_pagecache *pc, uint64_t i)
{
    pc_slot *s = slot_at(pc, i);
    int32_t *p = &pc->buckets[bucket_of(pc, s->key)];
    uint64_t steps = 0;
    while (*p >= 0 && (uint64_t)*p < pc->nslots && steps++ <= pc->nslots) {
        if ((uint64_t)*p == i) {
            *p = s->next;
            s->next = -1;
            return;
        }
        p = &slot_at(pc, (uint64_t)*p)->next;
    }
    s->next = -1;
    if (*p >= 0) chains_rebuild(pc);
}

/* ---- space -------------------------------------------------------------------------------- */

static void punch(pk_pagecache *pc, uint64_t off, uint64_t len)
{
    if (len == 0) return;
    if (fallocate(pc->dfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) != 0)
        pc->h->io_errors++;
}

static void punch_slot(pk_pagecache *pc, uint64_t i) { punch(pc, i * pc->bs, pc->bs); }

/* READY -> FREE (index lock held). */
static void drop_ready(pk_pagecache *pc, uint64_t i, int do_punch)
{
    pc_slot *s = slot_at(pc, i);
    unlink_slot(pc, i);
    pc->h->bytes_used -= s->length <= pc->h->bytes_used ? s->length : pc->h->bytes_used;
    if (pc->h->nready) pc->h->nready--;
    s->state = PC_FREE;
    s->gen++;
    if (do_punch) punch_slot(pc, i);
}

/* Recount and relink from the slot records: after a holder of the index lock died. */
static void repair(pk_pagecache *pc)
{
    uint64_t i, used = 0, nready = 0, nfetching = 0;
    for (i = 0; i < pc->nslots; i++) {
        pc_slot *s = slot_at(pc, i);
        if (s->state == PC_READY && s->length <= pc->bs) {
            used += s->length;
            nready++;
        } else if (s->state == PC_FETCHING) {
            nfetching++;
        } else {
            s->state = PC_FREE;
        }
    }
    chains_rebuild(pc);
    pc->h->bytes_used = used;
    pc->h->nready = nready;
    pc->h->nfetching = nfetching;
    if (pc->nslots) pc->h->clock_hand %= pc->nslots;
}

/* ---- open / close ------------------------------------------------------------------------- */

static int lock_file(int fd, int op)
{
    while (flock(fd, op) != 0) {
        if (errno != EINTR) return -errno;
    }
    return 0;
}

static int header_valid(const pc_header *h, uint64_t index_file_size, uint64_t data_file_size, pc_geom *g)
{
    if (memcmp(h->magic, PC_MAGIC, 8) != 0 || h->version != PK_PC_LAYOUT_VERSION) return 0;
    if (h->mutex_size != sizeof(pthread_mutex_t) || !block_size_ok(h->block_size)) return 0;
    geom_compute(h->capacity, h->block_size, g);
    if (g->nslots != h->nslots || g->slot_size != h->slot_size || g->nbuckets != h->nbuckets ||
        g->buckets_offset != h->buckets_offset || g->slots_offset != h->slots_offset ||
        g->index_size != h->index_size)
        return 0;
    return index_file_size == g->index_size && data_file_size == g->nslots * g->bs;
}

static int map_files(pk_pagecache *pc, const pc_geom *g)
{
    pc->index_size = g->index_size;
    pc->index = mmap(NULL, pc->index_size, PROT_READ | PROT_WRITE, MAP_SHARED, pc->ifd, 0);
    if (pc->index == MAP_FAILED) {
        pc->index = NULL;
        return -errno;
    }
    pc->h = (pc_header *)pc->index;
    pc->bs = g->bs;
    pc->nslots = g->nslots;
    pc->slot_size = g->slot_size;
    pc->nbuckets = g->nbuckets;
    pc->nchunks = g->bs / PK_PC_CHUNK;
    pc->buckets = (int32_t *)(pc->index + g->buckets_offset);
    pc->data_size = g->nslots * g->bs;
    if (pc->data_size) {
        pc->data = mmap(NULL, pc->data_size, PROT_READ, MAP_SHARED, pc->dfd, 0);
        if (pc->data == MAP_FAILED) {
            pc->data = NULL;
            return -errno;
        }
    }
    return 0;
}

/* Build an empty index (the caller is alone and has sized both files). */
static int build_index(pk_pagecache *pc, const pc_geom *g)
{
    pc_header *h = pc->h;
    uint64_t i;
    int rc;
    memset(h, 0, sizeof *h);
    h->version = PK_PC_LAYOUT_VERSION;
    h->mutex_size = sizeof(pthread_mutex_t);
    h->block_size = g->bs;
    h->nslots = g->nslots;
    h->capacity = g->capacity;
    h->slot_size = g->slot_size;
    h->nbuckets = g->nbuckets;
    h->buckets_offset = g->buckets_offset;
    h->slots_offset = g->slots_offset;
    h->index_size = g->index_size;
    rc = mutex_init_shared(&h->lock.m);
    if (rc) return rc;
    for (i = 0; i < pc->nbuckets; i++) pc->buckets[i] = -1;
    for (i = 0; i < pc->nslots; i++) {
        pc_slot *s = slot_at(pc, i);
        s->state = PC_FREE;
        s->next = -1;
        rc = mutex_init_shared(&s->fetch.m);
        if (rc) return rc;
    }
    memcpy(h->magic, PC_MAGIC, 8); /* last: a header with magic is complete */
    return 0;
}

/* Alone with an existing index: no mutex can be legitimately held and no fetch is in progress. */
static int recover_alone(pk_pagecache *pc)
{
    uint64_t i;
    int rc = mutex_init_shared(&pc->h->lock.m);
    if (rc) return rc;
    for (i = 0; i < pc->nslots; i++) {
        pc_slot *s = slot_at(pc, i);
        rc = mutex_init_shared(&s->fetch.m);
        if (rc) return rc;
        if (s->state != PC_READY) {
            if (s->state == PC_FETCHING) {
                s->gen++;
                punch_slot(pc, i);
            }
            s->state = PC_FREE;
        }
    }
    repair(pc);
    return 0;
}

static int path_join(char *out, size_t cap, const char *dir, const char *name)
{
    int n = snprintf(out, cap, "%s/%s", dir, name);
    return (n < 0 || (size_t)n >= cap) ? -ENAMETOOLONG : 0;
}

int pk_pc_open(const char *dir, uint64_t capacity, uint64_t block_size, int flags, pk_pagecache **out)
{
    char path[PATH_MAX];
    pk_pagecache *pc;
    pc_header hdr;
    pc_geom g, old;
    struct stat ist, dst;
    int lfd = -1, rc, alone, valid = 0;

    *out = NULL;
    if (!block_size_ok(block_size)) return -EINVAL;
    pc = calloc(1, sizeof *pc);
    if (!pc) return -ENOMEM;
    pc->ifd = pc->dfd = -1;

    if ((rc = path_join(path, sizeof path, dir, "pagecache.lock"))) goto fail;
    lfd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    if (lfd < 0) goto fail_errno;
    if ((rc = lock_file(lfd, LOCK_EX))) goto fail; /* openers one at a time */

    if ((rc = path_join(path, sizeof path, dir, "pagecache.index"))) goto fail;
    pc->ifd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    if (pc->ifd < 0) goto fail_errno;
    if ((rc = path_join(path, sizeof path, dir, "pagecache.data"))) goto fail;
    pc->dfd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    if (pc->dfd < 0) goto fail_errno;

    /* Users hold LOCK_SH; getting LOCK_EX means nobody else has the cache open. */
    alone = flock(pc->ifd, LOCK_EX | LOCK_NB) == 0;
    if (fstat(pc->ifd, &ist) != 0 || fstat(pc->dfd, &dst) != 0) goto fail_errno;
    memset(&hdr, 0, sizeof hdr);
    if ((uint64_t)ist.st_size >= PC_HEADER_BYTES) {
        ssize_t got = pread(pc->ifd, &hdr, sizeof hdr, 0);
        if (got < 0) goto fail_errno;
        if ((size_t)got == sizeof hdr)
            valid = header_valid(&hdr, (uint64_t)ist.st_size, (uint64_t)dst.st_size, &old);
    }
    if ((flags & PK_PC_ADOPT) && valid)
        g = old;
    else
        geom_compute(capacity, block_size, &g);

    if (alone) {
        int same = valid && old.nslots == g.nslots && old.bs == g.bs && old.capacity == g.capacity;
        if (!same) { /* (re)build: both files emptied, so all old space goes back */
            if (ftruncate(pc->dfd, 0) != 0 || ftruncate(pc->ifd, 0) != 0) goto fail_errno;
            if (ftruncate(pc->ifd, (off_t)g.index_size) != 0) goto fail_errno;
            if (ftruncate(pc->dfd, (off_t)(g.nslots * g.bs)) != 0) goto fail_errno;
        }
        if ((rc = map_files(pc, &g))) goto fail;
        rc = same ? recover_alone(pc) : build_index(pc, &g);
        if (rc) goto fail;
        if ((rc = lock_file(pc->ifd, LOCK_SH))) goto fail; /* downgrade; openers are still locked out */
    } else {
        if ((rc = lock_file(pc->ifd, LOCK_SH))) goto fail;
        if (!valid) { /* in use by a build with another layout version or ABI */
            rc = -EPROTO;
            goto fail;
        }
        if ((rc = map_files(pc, &old))) goto fail;
    }
    close(lfd);
    *out = pc;
    return 0;

fail_errno:
    rc = -errno;
fail:
    if (lfd >= 0) close(lfd);
    pk_pc_close(pc);
    return rc;
}

void pk_pc_close(pk_pagecache *pc)
{
    if (!pc) return;
    /* A thread of ours still holds a fetch mutex.  If the mapping went away and the process then
     * died, the kernel could not mark that mutex owner-dead and the slot would stay claimed for good.
     * Keep everything mapped until the process exits instead (a small, deliberate leak). */
    if (__atomic_load_n(&pc->claims, __ATOMIC_ACQUIRE) > 0) return;
    if (pc->data) munmap(pc->data, pc->data_size);
    if (pc->index) munmap(pc->index, pc->index_size);
    if (pc->dfd >= 0) close(pc->dfd);
    if (pc->ifd >= 0) close(pc->ifd); /* drops our LOCK_SH (once no forked child shares the fd) */
    free(pc);
}

/* ---- keys --------------------------------------------------------------------------------- */

void pk_pc_object_make(pk_pc_object *o, const char *ns, size_t ns_len, const char *obj, size_t obj_len,
                       uint64_t size)
{
    /* Hashing the namespace first and using the result as the seed of the object's hash keeps
     * ("ab", "c") and ("a", "bc") apart; two seeds give two independent 64-bit halves. */
    o->seed[0] = pk_xxh64(obj, obj_len, pk_xxh64(ns, ns_len, 0x7061636b666d7401ull));
    o->seed[1] = pk_xxh64(obj, obj_len, pk_xxh64(ns, ns_len, 0x9e3779b97f4a7c15ull));
    o->size = size;
}

void pk_pc_object_key(const pk_pc_object *o, uint64_t block, pk_pc_key *key)
{
    uint8_t b[8];
    int k;
    for (k = 0; k < 8; k++) b[k] = (uint8_t)(block >> (8 * k));
    key->h[0] = pk_xxh64(b, 8, o->seed[0]);
    key->h[1] = pk_xxh64(b, 8, o->seed[1]);
    key->group = o->seed[0];
    key->block = block;
}

void pk_pc_key_make(pk_pc_key *key, const char *ns, size_t ns_len, const char *obj, size_t obj_len,
                    uint64_t block)
{
    pk_pc_object o;
    pk_pc_object_make(&o, ns, ns_len, obj, obj_len, 0);
    pk_pc_object_key(&o, block, key);
}

int pk_pc_debug_lock(pk_pagecache *pc) { return glock(pc); }

/* ---- lookup / claim ----------------------------------------------------------------------- */

/* A slot to fill, its fetch mutex taken, FREE and unlinked; -1 if all are being fetched. */
static int64_t victim(pk_pagecache *pc)
{
    uint64_t steps, n = pc->nslots;
    for (steps = 0; n && steps <= 2 * n; steps++) {
        uint64_t i = pc->h->clock_hand % n;
        pc_slot *s = slot_at(pc, i);
        pc->h->clock_hand = (i + 1) % n;
        if (s->state == PC_READY && s->ref) {
            s->ref = 0; /* second chance */
            continue;
        }
        if (slot_trylock(s) != 0) continue; /* being fetched, or a waiter is passing through */
        if (s->state == PC_READY) {
            drop_ready(pc, i, 0); /* the claimer overwrites the data: no need to punch first */
            pc->h->evictions++;
        } else if (s->state == PC_FETCHING) { /* its fetcher died and nobody asked for the block */
            unlink_slot(pc, i);
            if (pc->h->nfetching) pc->h->nfetching--;
            s->state = PC_FREE;
            s->gen++;
        }
        return (int64_t)i;
    }
    return -1;
}

int pk_pc_lookup(pk_pagecache *pc, const pk_pc_key *key, uint64_t length, const char *label,
                 size_t label_len, pk_pc_ticket *t)
{
    int64_t i;
    pc_slot *s;
    int rc;

    t->slot = -1;
    t->gen = 0;
    t->length = length;
    if (length == 0 || length > pc->bs) return -EINVAL;
    if ((rc = glock(pc))) return rc;
    i = find(pc, key->h);
    if (i >= 0) {
        s = slot_at(pc, (uint64_t)i);
        if (s->state == PC_READY) {
            if (s->length == length) {
                s->ref = 1;
                pc->h->hits++;
                t->slot = i;
                t->gen = s->gen;
                gunlock(pc);
                return PK_PC_READY;
            }
            drop_ready(pc, (uint64_t)i, 1); /* same key, other length: not ours to serve */
        } else {
            rc = slot_trylock(s);
            if (rc == 1) {
                pc->h->waits++;
                t->slot = i;
                t->gen = s->gen;
                gunlock(pc);
                return PK_PC_BUSY;
            }
            if (rc < 0) {
                gunlock(pc);
                return rc;
            }
            /* The fetcher died (its mutex was owner-dead): inherit the claim. */
            s->gen++;
            s->owner_pid = (int64_t)getpid();
            s->length = length;
            pc->h->takeovers++;
            pc->h->misses++;
            t->slot = i;
            t->gen = s->gen;
            __atomic_add_fetch(&pc->claims, 1, __ATOMIC_RELAXED);
            gunlock(pc);
            return PK_PC_CLAIMED;
        }
    }
    pc->h->misses++;
    i = victim(pc);
    if (i < 0) {
        gunlock(pc);
        return PK_PC_NOSPACE;
    }
    s = slot_at(pc, (uint64_t)i);
    s->key[0] = key->h[0];
    s->key[1] = key->h[1];
    s->group = key->group;
    s->block = key->block;
    s->length = length;
    s->owner_pid = (int64_t)getpid();
    s->ref = 0;
    if (label_len > PK_PC_LABEL_MAX) label_len = PK_PC_LABEL_MAX;
    memcpy(s->label, label, label_len);
    s->label_len = (uint32_t)label_len;
    s->gen++;
    s->state = PC_FETCHING;
    link_slot(pc, (uint64_t)i);
    pc->h->nfetching++;
    t->slot = i;
    t->gen = s->gen;
    __atomic_add_fetch(&pc->claims, 1, __ATOMIC_RELAXED);
    gunlock(pc);
    return PK_PC_CLAIMED;
}

/* ---- reading ------------------------------------------------------------------------------ */

/* The checksum of one chunk: 32 bits per 4 KiB catch bit rot and torn pages; sample checksums
 * (XXH64, verified by the reader) sit on top. */
static uint32_t chunk_sum(const void *p, uint64_t len) { return (uint32_t)pk_xxh64(p, len, 0); }

/* Copy one piece out of slot data at `base`, verifying the chunks it touches against sums (indexed
 * by chunk number).  Returns nonzero if a chunk did not match; *partial is set if a chunk was
 * verified in place rather than in the caller's buffer. */
static int copy_piece(const pk_pagecache *pc, uint64_t base, uint64_t length, const uint32_t *sums,
                      uint64_t off, uint64_t len, uint8_t *dst, int *partial)
{
    uint64_t c, c0 = off / PK_PC_CHUNK, c1 = (off + len - 1) / PK_PC_CHUNK;
    for (c = c0; c <= c1; c++) {
        uint64_t cs = c * PK_PC_CHUNK;
        uint64_t ce = cs + PK_PC_CHUNK < length ? cs + PK_PC_CHUNK : length;
        if (cs >= off && ce <= off + len) {
            /* A whole chunk: copy, then hash the copy -- what is verified is what the caller gets. */
            uint8_t *d = dst + (cs - off);
            memcpy(d, pc->data + base + cs, ce - cs);
            if (chunk_sum(d, ce - cs) != sums[c]) return 1;
        } else {
            /* Part of a chunk: verify the whole chunk in place, then copy the part.  The slot cannot
             * be rewritten between the two unless it is first evicted, which bumps its generation:
             * the caller checks that after the copies (a seqlock read). */
            uint64_t from = cs > off ? cs : off;
            uint64_t to = ce < off + len ? ce : off + len;
            if (chunk_sum(pc->data + base + cs, ce - cs) != sums[c]) return 1;
            memcpy(dst + (from - off), pc->data + base + from, to - from);
            *partial = 1;
        }
    }
    return 0;
}

int pk_pc_copy_pieces(pk_pagecache *pc, const pk_pc_ticket *t, const pk_pc_piece *pieces, size_t n)
{
    uint32_t sums[PK_PC_MAX_BLOCK / PK_PC_CHUNK]; /* 16 KiB at most */
    uint64_t c0 = UINT64_MAX, c1 = 0, base;
    pc_slot *s;
    size_t i;
    int rc, bad = 0, partial = 0;

    if (t->slot < 0 || (uint64_t)t->slot >= pc->nslots) return -EINVAL;
    for (i = 0; i < n; i++) {
        const pk_pc_piece *p = &pieces[i];
        if (p->off > t->length || p->len > t->length - p->off) return -EINVAL;
        if (p->len == 0) continue;
        if (p->off / PK_PC_CHUNK < c0) c0 = p->off / PK_PC_CHUNK;
        if ((p->off + p->len - 1) / PK_PC_CHUNK > c1) c1 = (p->off + p->len - 1) / PK_PC_CHUNK;
    }
    if (c0 == UINT64_MAX) return 0; /* nothing to copy */
    s = slot_at(pc, (uint64_t)t->slot);
    if ((rc = glock(pc))) return rc;
    if (s->gen != t->gen || s->state != PC_READY || s->length != t->length) {
        gunlock(pc);
        return PK_PC_STALE;
    }
    memcpy(sums + c0, s->sums + c0, (c1 - c0 + 1) * sizeof(uint32_t));
    s->ref = 1;
    gunlock(pc);

    base = (uint64_t)t->slot * pc->bs;
    for (i = 0; i < n && !bad; i++) {
        if (pieces[i].len)
            bad = copy_piece(pc, base, t->length, sums, pieces[i].off, pieces[i].len, pieces[i].dst, &partial);
    }
    if (!bad && partial) {
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&s->gen, __ATOMIC_RELAXED) != t->gen) return PK_PC_STALE;
    }
    if (!bad) return 0;

    if ((rc = glock(pc))) return rc;
    if (s->gen == t->gen && s->state == PC_READY) { /* unchanged, so the bytes on disk are wrong */
        drop_ready(pc, (uint64_t)t->slot, 1);
        pc->h->corruptions++;
        rc = PK_PC_CORRUPT;
    } else {
        rc = PK_PC_STALE; /* evicted and reused while we copied */
    }
    gunlock(pc);
    return rc;
}

int pk_pc_copy(pk_pagecache *pc, const pk_pc_ticket *t, uint64_t off, uint64_t len, void *out)
{
    pk_pc_piece p;
    p.off = off;
    p.len = len;
    p.dst = out;
    return pk_pc_copy_pieces(pc, t, &p, 1);
}

/* ---- batch reads -------------------------------------------------------------------------- */

#define PC_BATCH_LOCK_BLOCKS 64 /* blocks looked up per trip through the index lock */

/* The part of one record that lies in one block. */
typedef struct pc_bpiece {
    uint64_t block;  /* block number within its object */
    uint64_t boff;   /* offset within the block */
    uint64_t len;
    uint8_t *dst;
    size_t rec;      /* its record */
    size_t blk;      /* its distinct block */
    uint32_t obj;
} pc_bpiece;

/* One distinct block of a batch, and the ticket it was found with. */
typedef struct pc_bblock {
    pk_pc_key key;
    int64_t slot;    /* -1: not served (absent, not READY, evicted meanwhile or corrupt) */
    uint64_t gen;
    uint64_t length; /* the block's length as the object's size implies */
    size_t first;    /* its pieces: [first, end) of the sorted piece array */
    size_t end;
} pc_bblock;

static int bpiece_cmp(const void *a, const void *b)
{
    const pc_bpiece *x = a, *y = b;
    if (x->obj != y->obj) return x->obj < y->obj ? -1 : 1;
    if (x->block != y->block) return x->block < y->block ? -1 : 1;
    if (x->boff != y->boff) return x->boff < y->boff ? -1 : 1;
    return (x->rec > y->rec) - (x->rec < y->rec);
}

/* Pieces of the records (sorted by object, block, offset) and their distinct blocks, with keys and
 * lengths.  Records are already validated. */
static void batch_plan(const pk_pagecache *pc, const pk_pc_object *objects, const pk_pc_record *recs, size_t n,
                       pc_bpiece *pieces, size_t np, pc_bblock *blocks, size_t *nb_out)
{
    size_t i, j = 0, k, nb = 0;
    for (k = 0; k < n; k++) {
        const pk_pc_record *r = &recs[k];
        uint64_t pos = r->offset, end = r->offset + r->len;
        while (pos < end && j < np) {
            uint64_t room = pc->bs - pos % pc->bs;
            uint64_t take = end - pos < room ? end - pos : room;
            pc_bpiece *p = &pieces[j++];
            p->block = pos / pc->bs;
            p->boff = pos % pc->bs;
            p->len = take;
            p->dst = r->dst + (pos - r->offset);
            p->rec = k;
            p->obj = r->object;
            pos += take;
        }
    }
    qsort(pieces, j, sizeof *pieces, bpiece_cmp);
    for (i = 0; i < j; i++) {
        pc_bpiece *p = &pieces[i];
        if (i == 0 || p->obj != pieces[i - 1].obj || p->block != pieces[i - 1].block) {
            const pk_pc_object *o = &objects[p->obj];
            pc_bblock *bk = &blocks[nb++];
            uint64_t start = p->block * pc->bs; /* <= the piece's offset < o->size: no overflow */
            pk_pc_object_key(o, p->block, &bk->key);
            bk->slot = -1;
            bk->gen = 0;
            bk->length = o->size - start < pc->bs ? o->size - start : pc->bs;
            bk->first = i;
        }
        blocks[nb - 1].end = i + 1;
        p->blk = nb - 1;
    }
    *nb_out = nb;
}

/* Find the batch's blocks under the index lock, a trip per PC_BATCH_LOCK_BLOCKS blocks so that the
 * lock is only ever held for microseconds.  Nothing is claimed: absent blocks are the caller's. */
static int batch_lookup(pk_pagecache *pc, pc_bblock *blocks, size_t nb)
{
    size_t i = 0;
    int rc;
    while (i < nb) {
        size_t stop = i + PC_BATCH_LOCK_BLOCKS;
        if ((rc = glock(pc))) return rc;
        for (; i < nb && i < stop; i++) {
            pc_bblock *bk = &blocks[i];
            int64_t si = find(pc, bk->key.h);
            pc_slot *s;
            if (si < 0) continue;
            s = slot_at(pc, (uint64_t)si);
            if (s->state != PC_READY || s->length != bk->length) continue; /* lookup sorts these out */
            s->ref = 1;
            pc->h->hits++;
            bk->slot = si;
            bk->gen = s->gen;
        }
        gunlock(pc);
    }
    return 0;
}

/* Whether a block's slot still holds what was looked up: the seqlock check after lock-free reads (a
 * slot is only rewritten after an eviction has bumped its generation). */
static int batch_unchanged(pk_pagecache *pc, const pc_bblock *bk)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return __atomic_load_n(&slot_at(pc, (uint64_t)bk->slot)->gen, __ATOMIC_RELAXED) == bk->gen;
}

/* Copy the pieces of every block found; a block evicted meanwhile is marked not served. */
/* Copies every piece out of its cached block. A record that lies in one block is copied and hashed
 * in one pass (pk_xxh3_64_copy: the hash of the bytes written to dst); ok[rec] tells whether that hash
 * matched. Records in several pieces are hashed by the caller once all their pieces are copied. */
static void batch_copy(pk_pagecache *pc, const pc_bpiece *pieces, pc_bblock *blocks, size_t nb,
                       const pk_pc_record *recs, uint8_t *ok)
{
    size_t i, j;
    for (i = 0; i < nb; i++) {
        pc_bblock *bk = &blocks[i];
        uint64_t base;
        if (bk->slot < 0) continue;
        base = (uint64_t)bk->slot * pc->bs;
        for (j = bk->first; j < bk->end; j++) {
            const pc_bpiece *p = &pieces[j];
            const pk_pc_record *r = &recs[p->rec];
            if (p->len == r->len)
                ok[p->rec] = pk_xxh3_64_copy(p->dst, pc->data + base + p->boff, p->len) == r->checksum;
            else
                memcpy(p->dst, pc->data + base + p->boff, p->len);
        }
        if (!batch_unchanged(pc, bk)) bk->slot = -1;
    }
}

/* A record whose copy does not hash to its checksum although its blocks were served: were the cached
 * bytes bad (bit rot, a stray write) or did the server send them so?  The chunks of the record's
 * pieces are verified in place against their sums.  Returns PK_PC_MISS if a block changed meanwhile
 * or failed its chunk sums (it is then dropped, as pk_pc_copy_pieces() drops it), PK_PC_MISMATCH if
 * the cache holds exactly what was published, or -errno. */
static int batch_classify(pk_pagecache *pc, const pc_bpiece *pieces, size_t np, pc_bblock *blocks, size_t rec)
{
    uint32_t sums[PK_PC_MAX_BLOCK / PK_PC_CHUNK]; /* 16 KiB at most */
    size_t i;
    int rc;
    for (i = 0; i < np; i++) {
        const pc_bpiece *p = &pieces[i];
        pc_bblock *bk = &blocks[p->blk];
        uint64_t c, c0 = p->boff / PK_PC_CHUNK, c1 = (p->boff + p->len - 1) / PK_PC_CHUNK;
        pc_slot *s;
        int bad = 0;
        if (p->rec != rec) continue;
        if (bk->slot < 0) return PK_PC_MISS; /* dropped while classifying another record */
        s = slot_at(pc, (uint64_t)bk->slot);
        if ((rc = glock(pc))) return rc;
        if (s->gen != bk->gen || s->state != PC_READY) {
            gunlock(pc);
            bk->slot = -1;
            return PK_PC_MISS;
        }
        memcpy(sums, s->sums + c0, (c1 - c0 + 1) * sizeof(uint32_t));
        gunlock(pc);
        for (c = c0; c <= c1 && !bad; c++) {
            uint64_t cs = c * PK_PC_CHUNK;
            uint64_t ce = cs + PK_PC_CHUNK < bk->length ? cs + PK_PC_CHUNK : bk->length;
            bad = chunk_sum(pc->data + (uint64_t)bk->slot * pc->bs + cs, ce - cs) != sums[c - c0];
        }
        if (!batch_unchanged(pc, bk)) {
            bk->slot = -1;
            return PK_PC_MISS;
        }
        if (bad) {
            if ((rc = glock(pc))) return rc;
            if (s->gen == bk->gen && s->state == PC_READY) { /* unchanged, so the bytes on disk are wrong */
                drop_ready(pc, (uint64_t)bk->slot, 1);
                pc->h->corruptions++;
            }
            gunlock(pc);
            bk->slot = -1;
            return PK_PC_MISS;
        }
    }
    return PK_PC_MISMATCH;
}

int pk_pc_read_records(pk_pagecache *pc, const pk_pc_object *objects, size_t nobjects, pk_pc_record *recs,
                       size_t n, int verify, pk_pc_batch_info *info)
{
    static const uint8_t empty[1] = {0};
    pc_bpiece *pieces = NULL;
    pc_bblock *blocks = NULL;
    uint8_t *ok = NULL;
    size_t np = 0, nb = 0, i, k;
    int rc = 0;

    memset(info, 0, sizeof *info);
    for (k = 0; k < n; k++) { /* validate everything before touching anything */
        pk_pc_record *r = &recs[k];
        const pk_pc_object *o = r->object < nobjects ? &objects[r->object] : NULL;
        uint64_t cnt;
        r->status = PK_PC_OK;
        if (!o || r->offset > o->size || r->len > o->size - r->offset || (r->len && !r->dst)) {
            info->bad_record = k;
            return -EINVAL;
        }
        if (!r->len) continue;
        cnt = (r->offset + r->len - 1) / pc->bs - r->offset / pc->bs + 1;
        if (cnt > SIZE_MAX / sizeof(pc_bpiece) - np) return -ENOMEM;
        np += (size_t)cnt;
    }
    if (np) {
        pieces = malloc(np * sizeof *pieces);
        blocks = malloc(np * sizeof *blocks); /* at most one distinct block per piece */
        ok = calloc(n, 1);
        if (!pieces || !blocks || !ok) {
            rc = -ENOMEM;
            goto out;
        }
        batch_plan(pc, objects, recs, n, pieces, np, blocks, &nb);
        if ((rc = batch_lookup(pc, blocks, nb))) goto out;
        batch_copy(pc, pieces, blocks, nb, recs, ok);
        for (i = 0; i < np; i++)
            if (blocks[pieces[i].blk].slot < 0) recs[pieces[i].rec].status = PK_PC_MISS;
    }
    for (k = 0; k < n; k++) {
        pk_pc_record *r = &recs[k];
        if (r->status == PK_PC_MISS) continue;
        if ((ok && ok[k]) || pk_xxh3_64(r->len ? r->dst : empty, r->len) == r->checksum) continue;
        if (r->len) {
            rc = batch_classify(pc, pieces, np, blocks, k);
            if (rc < 0) goto out;
            r->status = rc;
            rc = 0;
        } else {
            r->status = PK_PC_MISMATCH; /* nothing was read: the checksum itself is wrong */
        }
        if (r->status == PK_PC_MISMATCH && !verify) r->status = PK_PC_OK; /* served as the server sent it */
    }
    for (k = 0; k < n; k++) {
        if (recs[k].status == PK_PC_MISS) info->missed++;
        if (recs[k].status == PK_PC_MISMATCH) info->mismatched++;
    }
    for (i = 0; i < nb; i++) {
        if (blocks[i].slot < 0)
            info->blocks_missed++;
        else
            info->blocks_hit++;
    }
out:
    free(pieces);
    free(blocks);
    free(ok);
    return rc;
}

/* ---- fetch completion --------------------------------------------------------------------- */

static int pwrite_all(int fd, const uint8_t *p, uint64_t len, uint64_t off)
{
    while (len) {
        ssize_t n = pwrite(fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (n == 0) return -EIO;
        p += n;
        off += (uint64_t)n;
        len -= (uint64_t)n;
    }
    return 0;
}

static int owns(pk_pagecache *pc, const pk_pc_ticket *t)
{
    pc_slot *s = slot_at(pc, (uint64_t)t->slot);
    return s->gen == t->gen && s->state == PC_FETCHING;
}

int pk_pc_abort(pk_pagecache *pc, const pk_pc_ticket *t)
{
    pc_slot *s;
    int rc;
    if (t->slot < 0 || (uint64_t)t->slot >= pc->nslots) return -EINVAL;
    s = slot_at(pc, (uint64_t)t->slot);
    if ((rc = glock(pc))) return rc;
    if (!owns(pc, t)) {
        gunlock(pc);
        return -ESTALE;
    }
    unlink_slot(pc, (uint64_t)t->slot);
    s->state = PC_FREE;
    s->gen++;
    if (pc->h->nfetching) pc->h->nfetching--;
    punch_slot(pc, (uint64_t)t->slot);
    pthread_mutex_unlock(&s->fetch.m); /* wakes the waiters; they will claim it themselves */
    __atomic_sub_fetch(&pc->claims, 1, __ATOMIC_RELEASE);
    gunlock(pc);
    return 0;
}

int pk_pc_publish(pk_pagecache *pc, const pk_pc_ticket *t, const void *data, uint64_t len)
{
    uint32_t sums[PK_PC_MAX_BLOCK / PK_PC_CHUNK]; /* 16 KiB at most */
    uint64_t c, nch, off, alloc;
    pc_slot *s;
    int rc;

    if (t->slot < 0 || (uint64_t)t->slot >= pc->nslots || len != t->length) return -EINVAL;
    s = slot_at(pc, (uint64_t)t->slot);
    off = (uint64_t)t->slot * pc->bs;
    rc = pwrite_all(pc->dfd, data, len, off);
    if (rc) {
        pc->h->io_errors++;
        pk_pc_abort(pc, t);
        return rc;
    }
    alloc = round_up(len, PC_PAGE);
    if (alloc < pc->bs) punch(pc, off + alloc, pc->bs - alloc); /* a short block frees the rest */
    nch = (len + PK_PC_CHUNK - 1) / PK_PC_CHUNK;
    for (c = 0; c < nch; c++) {
        uint64_t cs = c * PK_PC_CHUNK, ce = cs + PK_PC_CHUNK < len ? cs + PK_PC_CHUNK : len;
        sums[c] = chunk_sum((const uint8_t *)data + cs, ce - cs);
    }
    if ((rc = glock(pc))) return rc;
    if (!owns(pc, t)) {
        gunlock(pc);
        return -ESTALE;
    }
    memcpy(s->sums, sums, nch * sizeof(uint32_t));
    s->length = len;
    s->ref = 1;
    pc->h->bytes_used += len;
    pc->h->nready++;
    if (pc->h->nfetching) pc->h->nfetching--;
    pc->h->fetched_bytes += len;
    /* Data and sums are in place before the state says READY (matters if we die right here). */
    __atomic_store_n(&s->state, (uint32_t)PC_READY, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&s->fetch.m);
    __atomic_sub_fetch(&pc->claims, 1, __ATOMIC_RELEASE);
    gunlock(pc);
    return 0;
}

int pk_pc_wait(pk_pagecache *pc, const pk_pc_ticket *t, int timeout_ms)
{
    struct timespec ts;
    pc_slot *s;
    int rc;
    if (t->slot < 0 || (uint64_t)t->slot >= pc->nslots) return -EINVAL;
    s = slot_at(pc, (uint64_t)t->slot);
    if (__atomic_load_n(&s->gen, __ATOMIC_ACQUIRE) != t->gen) return 0; /* already moved on */
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 30))
#define PC_WAIT_CLOCK CLOCK_MONOTONIC /* immune to wall-clock jumps */
#else
#define PC_WAIT_CLOCK CLOCK_REALTIME /* what pthread_mutex_timedlock measures */
#endif
    clock_gettime(PC_WAIT_CLOCK, &ts);
    ts.tv_sec += timeout_ms / 1000;
    ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 30))
    rc = pthread_mutex_clocklock(&s->fetch.m, CLOCK_MONOTONIC, &ts);
#else
    rc = pthread_mutex_timedlock(&s->fetch.m, &ts);
#endif
    if (rc == ETIMEDOUT) return PK_PC_TIMEDOUT;
    if (rc == EOWNERDEAD) { /* the fetcher died; the next lookup inherits its claim */
        pthread_mutex_consistent(&s->fetch.m);
        rc = 0;
    }
    if (rc == 0) {
        pthread_mutex_unlock(&s->fetch.m);
        return 0;
    }
    if (rc == ENOTRECOVERABLE) return 0; /* lookup re-initialises it */
    return -rc;
}

/* ---- bookkeeping -------------------------------------------------------------------------- */

int pk_pc_stats(pk_pagecache *pc, pk_pc_counters *st)
{
    pc_header *h = pc->h;
    int rc = glock(pc);
    if (rc) return rc;
    st->block_size = pc->bs;
    st->nslots = pc->nslots;
    st->capacity = h->capacity;
    st->index_bytes = pc->index_size;
    st->bytes_used = h->bytes_used;
    st->blocks_ready = h->nready;
    st->blocks_fetching = h->nfetching;
    st->hits = h->hits;
    st->misses = h->misses;
    st->fetched_bytes = h->fetched_bytes;
    st->evictions = h->evictions;
    st->corruptions = h->corruptions;
    st->waits = h->waits;
    st->takeovers = h->takeovers;
    st->repairs = h->repairs;
    gunlock(pc);
    return 0;
}

int pk_pc_entries(pk_pagecache *pc, pk_pc_entry *out, size_t cap, size_t *n)
{
    uint64_t i;
    size_t k = 0;
    int rc = glock(pc);
    if (rc) return rc;
    for (i = 0; i < pc->nslots; i++) {
        pc_slot *s = slot_at(pc, i);
        if (s->state != PC_READY) continue;
        if (k < cap) {
            pk_pc_entry *e = &out[k];
            e->group = s->group;
            e->block = s->block;
            e->length = s->length;
            e->label_len = s->label_len <= PK_PC_LABEL_MAX ? s->label_len : PK_PC_LABEL_MAX;
            memcpy(e->label, s->label, e->label_len);
        }
        k++;
    }
    gunlock(pc);
    *n = k;
    return 0;
}

int pk_pc_clear(pk_pagecache *pc)
{
    uint64_t i, run = 0, run_len = 0;
    int rc = glock(pc);
    if (rc) return rc;
    for (i = 0; i < pc->nslots; i++) {
        pc_slot *s = slot_at(pc, i);
        if (s->state == PC_FETCHING) { /* in flight: its owner will publish it */
            punch(pc, run * pc->bs, run_len * pc->bs);
            run_len = 0;
            continue;
        }
        if (s->state == PC_READY) drop_ready(pc, i, 0);
        if (run_len == 0) run = i;
        run_len++;
    }
    punch(pc, run * pc->bs, run_len * pc->bs); /* one call per run of slots */
    gunlock(pc);
    return 0;
}

int pk_pc_locate(pk_pagecache *pc, const pk_pc_key *key, uint64_t *offset, uint64_t *length)
{
    int64_t i;
    int rc = glock(pc);
    if (rc) return rc;
    i = find(pc, key->h);
    rc = 0;
    if (i >= 0 && slot_at(pc, (uint64_t)i)->state == PC_READY) {
        *offset = (uint64_t)i * pc->bs;
        *length = slot_at(pc, (uint64_t)i)->length;
        rc = PK_PC_READY;
    }
    gunlock(pc);
    return rc;
}

int pk_pc_drop(pk_pagecache *pc, const pk_pc_key *key)
{
    int64_t i;
    int rc = glock(pc);
    if (rc) return rc;
    i = find(pc, key->h);
    rc = 0;
    if (i >= 0 && slot_at(pc, (uint64_t)i)->state == PC_READY) { /* in-flight blocks belong to their fetcher */
        drop_ready(pc, (uint64_t)i, 1);
        rc = 1;
    }
    gunlock(pc);
    return rc;
}
