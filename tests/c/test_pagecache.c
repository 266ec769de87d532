/*
 * test_pagecache.c -- the page cache tested from C alone, with real processes (fork) and SIGKILL.
 * Built and run by tests/test_pagecache.py (also under -fsanitize=address,undefined):
 *     gcc -Isrc_c tests/c/test_pagecache.c src_c/pagecache.c src_c/checksum.c -lpthread
 *     ./a.out SCRATCH_DIR
 * Prints "ok <name>" per case; exits non-zero with the failing line on the first failure.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "checksum.h"
#include "pagecache.h"

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);              \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

#define KB 1024u
#define BS (64u * KB) /* the smallest block: keeps the tests fast */

static char root[4096];

/* A fresh cache directory for each case. */
static const char *newdir(const char *name)
{
    static char path[4200];
    snprintf(path, sizeof path, "%s/%s", root, name);
    CHECK(mkdir(path, 0777) == 0);
    return path;
}

/* The bytes of (object, block) as the "server" holds them. */
static void fill(uint8_t *p, uint64_t len, uint64_t block, uint32_t salt)
{
    uint64_t i, x = block * 0x9E3779B97F4A7C15ull + salt + 1;
    for (i = 0; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[i] = (uint8_t)x;
    }
}

static uint64_t du(const char *dir, const char *file)
{
    char path[4300];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", dir, file);
    CHECK(stat(path, &st) == 0);
    return (uint64_t)st.st_blocks * 512;
}

static void key(pk_pc_key *k, const char *ns, const char *obj, uint64_t block)
{
    pk_pc_key_make(k, ns, strlen(ns), obj, strlen(obj), block);
}

/* Read one block through the cache the way the Python layer does; fetches counted in *fetches. */
static void read_block(pk_pagecache *pc, const char *ns, uint64_t block, uint64_t len, uint32_t salt,
                       volatile uint64_t *fetches)
{
    static uint8_t want[BS], got[BS];
    pk_pc_key k;
    pk_pc_ticket t;
    key(&k, ns, "obj", block);
    fill(want, len, block, salt);
    for (;;) {
        int rc = pk_pc_lookup(pc, &k, len, "ns\0obj", 6, &t);
        CHECK(rc >= 0);
        if (rc == PK_PC_READY) {
            rc = pk_pc_copy(pc, &t, 0, len, got);
            CHECK(rc >= 0);
            if (rc != 0) continue; /* stale or corrupt: look up again */
            CHECK(memcmp(got, want, len) == 0);
            return;
        }
        if (rc == PK_PC_BUSY) {
            while ((rc = pk_pc_wait(pc, &t, 1000)) == PK_PC_TIMEDOUT) {
            }
            CHECK(rc == 0);
            continue;
        }
        if (fetches) __atomic_fetch_add(fetches, 1, __ATOMIC_SEQ_CST);
        if (rc == PK_PC_CLAIMED) CHECK(pk_pc_publish(pc, &t, want, len) == 0);
        return; /* PK_PC_NOSPACE: served from the fetched bytes, not cached */
    }
}

static void test_basic(void)
{
    const char *dir = newdir("basic");
    static uint8_t data[BS], out[BS];
    pk_pagecache *pc;
    pk_pc_counters st;
    pk_pc_key k;
    pk_pc_ticket t, t2;
    uint64_t offs[] = {0, 1, 4095, 65535, 100};
    size_t i;

    CHECK(pk_pc_open(dir, 1u << 20, 3 * KB, 0, &pc) == -EINVAL); /* not a multiple of the chunk */
    CHECK(pk_pc_open(dir, 1u << 20, BS, 0, &pc) == 0);
    CHECK(pk_pc_stats(pc, &st) == 0);
    CHECK(st.nslots > 0 && st.index_bytes + st.nslots * BS <= (1u << 20));
    CHECK(st.nslots + 1 > 0 && st.index_bytes + (st.nslots + 1) * BS > (1u << 20) - 4096);

    key(&k, "ns", "obj", 7);
    CHECK(pk_pc_lookup(pc, &k, 0, "", 0, &t) == -EINVAL);
    CHECK(pk_pc_lookup(pc, &k, BS + 1, "", 0, &t) == -EINVAL);
    CHECK(pk_pc_lookup(pc, &k, 5000, "ns\0obj", 6, &t) == PK_PC_CLAIMED);
    /* the same thread again: it is being fetched (by us); waiting on ourselves is refused */
    CHECK(pk_pc_lookup(pc, &k, 5000, "ns\0obj", 6, &t2) == PK_PC_BUSY);
    CHECK(pk_pc_wait(pc, &t2, 10) == -EDEADLK);
    CHECK(pk_pc_publish(pc, &t, data, 4999) == -EINVAL); /* wrong length */
    fill(data, 5000, 7, 0);
    CHECK(pk_pc_publish(pc, &t, data, 5000) == 0);
    CHECK(pk_pc_wait(pc, &t2, 10) == 0); /* generation moved on */

    CHECK(pk_pc_lookup(pc, &k, 5000, "ns\0obj", 6, &t) == PK_PC_READY);
    for (i = 0; i < sizeof offs / sizeof offs[0]; i++) {
        uint64_t off = offs[i] % 5000, len = 5000 - off;
        memset(out, 0, sizeof out);
        CHECK(pk_pc_copy(pc, &t, off, len, out) == 0);
        CHECK(memcmp(out, data + off, len) == 0);
        CHECK(pk_pc_copy(pc, &t, off, len / 2, out) == 0);
        CHECK(memcmp(out, data + off, len / 2) == 0);
    }
    CHECK(pk_pc_copy(pc, &t, 4000, 1001, out) == -EINVAL);
    /* a different length under the same key is never served */
    CHECK(pk_pc_lookup(pc, &k, 6000, "ns\0obj", 6, &t2) == PK_PC_CLAIMED);
    CHECK(pk_pc_copy(pc, &t, 0, 10, out) == PK_PC_STALE);
    CHECK(pk_pc_abort(pc, &t2) == 0);
    CHECK(pk_pc_abort(pc, &t2) == -ESTALE);

    /* namespaces are separate */
    key(&k, "ns2", "obj", 7);
    CHECK(pk_pc_lookup(pc, &k, 5000, "", 0, &t) == PK_PC_CLAIMED);
    CHECK(pk_pc_abort(pc, &t) == 0);
    pk_pc_close(pc);
    printf("ok basic\n");
}

static void test_full_block_chunks(void)
{
    const char *dir = newdir("chunks");
    static uint8_t data[4 * BS], out[4 * BS];
    pk_pagecache *pc;
    pk_pc_key k;
    pk_pc_ticket t;
    uint64_t off, len;
    CHECK(pk_pc_open(dir, 8u << 20, 4 * BS, 0, &pc) == 0);
    key(&k, "n", "o", 0);
    fill(data, sizeof data, 0, 0);
    CHECK(pk_pc_lookup(pc, &k, sizeof data, "", 0, &t) == PK_PC_CLAIMED);
    CHECK(pk_pc_publish(pc, &t, data, sizeof data) == 0);
    CHECK(pk_pc_lookup(pc, &k, sizeof data, "", 0, &t) == PK_PC_READY);
    for (off = 0; off < sizeof data; off += 7919) {
        for (len = 1; off + len <= sizeof data; len = len * 3 + 11) {
            CHECK(pk_pc_copy(pc, &t, off, len, out) == 0);
            CHECK(memcmp(out, data + off, len) == 0);
        }
    }
    { /* several pieces in one call, in any order, overlapping, empty */
        static uint8_t o2[4 * BS];
        pk_pc_piece ps[4] = {{3 * BS + 5, 60000, out}, {0, 0, o2}, {10, 5000, o2 + 100}, {4 * BS - 1, 1, o2 + 9000}};
        CHECK(pk_pc_copy_pieces(pc, &t, ps, 4) == 0);
        CHECK(memcmp(out, data + 3 * BS + 5, 60000) == 0);
        CHECK(memcmp(o2 + 100, data + 10, 5000) == 0 && o2[9000] == data[4 * BS - 1]);
        ps[0].len = BS; /* past the end */
        CHECK(pk_pc_copy_pieces(pc, &t, ps, 4) == -EINVAL);
    }
    pk_pc_close(pc);
    printf("ok chunks\n");
}

static void test_corruption(void)
{
    const char *dir = newdir("corrupt");
    static uint8_t data[4 * BS], out[4 * BS];
    char path[4300];
    pk_pagecache *pc;
    pk_pc_counters st;
    pk_pc_key k;
    pk_pc_ticket t;
    uint64_t off = 0, len = 0;
    int fd;

    CHECK(pk_pc_open(dir, 1u << 20, 4 * BS, 0, &pc) == 0);
    key(&k, "n", "o", 3);
    fill(data, sizeof data, 3, 0);
    CHECK(pk_pc_lookup(pc, &k, sizeof data, "", 0, &t) == PK_PC_CLAIMED);
    CHECK(pk_pc_publish(pc, &t, data, sizeof data) == 0);
    CHECK(pk_pc_locate(pc, &k, &off, &len) == PK_PC_READY && len == sizeof data);

    snprintf(path, sizeof path, "%s/pagecache.data", dir);
    fd = open(path, O_WRONLY);
    CHECK(fd >= 0);
    CHECK(pwrite(fd, "X", 1, (off_t)(off + 3 * BS + 1000)) == 1); /* one byte, in the last quarter */
    close(fd);

    CHECK(pk_pc_lookup(pc, &k, sizeof data, "", 0, &t) == PK_PC_READY);
    CHECK(pk_pc_copy(pc, &t, 0, 100, out) == 0); /* the first chunk is intact */
    /* the range stops short of the bad byte, but its chunk is verified whole */
    CHECK(pk_pc_copy(pc, &t, 2 * BS, BS + 10, out) == PK_PC_CORRUPT);
    CHECK(pk_pc_locate(pc, &k, &off, &len) == 0);
    CHECK(pk_pc_lookup(pc, &k, sizeof data, "", 0, &t) == PK_PC_CLAIMED);
    CHECK(pk_pc_publish(pc, &t, data, sizeof data) == 0);
    CHECK(pk_pc_lookup(pc, &k, sizeof data, "", 0, &t) == PK_PC_READY);
    CHECK(pk_pc_copy(pc, &t, 0, sizeof data, out) == 0 && memcmp(out, data, sizeof data) == 0);
    CHECK(pk_pc_stats(pc, &st) == 0 && st.corruptions == 1);
    pk_pc_close(pc);
    printf("ok corruption\n");
}

static void test_budget_and_clear(void)
{
    const char *dir = newdir("budget");
    uint64_t cap = 8 * BS + 4 * KB, b, before;
    pk_pagecache *pc;
    pk_pc_counters st;
    pk_pc_entry ents[16];
    size_t n;

    CHECK(pk_pc_open(dir, cap, BS, 0, &pc) == 0);
    CHECK(pk_pc_stats(pc, &st) == 0);
    CHECK(st.nslots == 7); /* 8 would leave no room for the index */
    for (b = 0; b < 40; b++) {
        read_block(pc, "n", b, b == 39 ? 1000 : BS, 0, NULL);
        CHECK(du(dir, "pagecache.data") + du(dir, "pagecache.index") <= cap);
    }
    CHECK(pk_pc_stats(pc, &st) == 0);
    CHECK(st.evictions == 40 - 7 && st.blocks_ready == 7);
    CHECK(pk_pc_entries(pc, ents, 16, &n) == 0 && n == 7);
    CHECK(ents[0].label_len == 6 && memcmp(ents[0].label, "ns\0obj", 6) == 0);
    before = du(dir, "pagecache.data");
    CHECK(before >= 6 * BS);
    CHECK(pk_pc_clear(pc) == 0);
    CHECK(du(dir, "pagecache.data") == 0);
    CHECK(pk_pc_stats(pc, &st) == 0 && st.blocks_ready == 0 && st.bytes_used == 0);
    pk_pc_close(pc);
    printf("ok budget\n");
}

/* Several processes read random blocks at once: each block is fetched exactly once. */
static void test_concurrent(void)
{
    const char *dir = newdir("concurrent");
    enum { NPROC = 4, NBLOCK = 48, READS = 300 };
    volatile uint64_t *fetches = mmap(NULL, NBLOCK * sizeof(uint64_t), PROT_READ | PROT_WRITE,
                                      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    pk_pagecache *pc;
    pid_t pids[NPROC];
    int p, status;
    uint64_t b;

    CHECK(fetches != MAP_FAILED);
    CHECK(pk_pc_open(dir, 64 * BS, BS, 0, &pc) == 0); /* creator; children open their own */
    for (p = 0; p < NPROC; p++) {
        pids[p] = fork();
        CHECK(pids[p] >= 0);
        if (pids[p] == 0) {
            pk_pagecache *mine;
            unsigned seed = (unsigned)p * 7919u + 1;
            int r;
            if (pk_pc_open(dir, 64 * BS, BS, 0, &mine) != 0) _exit(2);
            for (r = 0; r < READS; r++) {
                uint64_t blk = (uint64_t)rand_r(&seed) % NBLOCK;
                read_block(p % 2 ? mine : pc, "n", blk, BS, 0, &fetches[blk]); /* inherited too */
            }
            pk_pc_close(mine);
            _exit(0);
        }
    }
    for (p = 0; p < NPROC; p++) {
        CHECK(waitpid(pids[p], &status, 0) == pids[p]);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    for (b = 0; b < NBLOCK; b++) CHECK(fetches[b] <= 1);
    for (b = 0; b < NBLOCK; b++) read_block(pc, "n", b, BS, 0, &fetches[b]);
    for (b = 0; b < NBLOCK; b++) CHECK(fetches[b] == 1);
    pk_pc_close(pc);
    munmap((void *)fetches, NBLOCK * sizeof(uint64_t));
    printf("ok concurrent\n");
}

/* A fetcher is SIGKILLed holding its claim; a waiter inherits the claim. */
static void test_kill_fetcher(void)
{
    const char *dir = newdir("kill");
    static uint8_t data[BS], out[BS];
    pk_pagecache *pc;
    pk_pc_counters st;
    pk_pc_key k;
    pk_pc_ticket t;
    int fds[2], status;
    char c;
    pid_t pid;

    CHECK(pk_pc_open(dir, 16 * BS, BS, 0, &pc) == 0);
    key(&k, "n", "o", 1);
    CHECK(pipe(fds) == 0);
    pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        pk_pc_ticket ct;
        static uint8_t junk[BS];
        char path[4300];
        int fd;
        if (pk_pc_lookup(pc, &k, BS, "", 0, &ct) != PK_PC_CLAIMED) _exit(2);
        memset(junk, 0xAB, sizeof junk);
        /* a torn write: half the block lands in its slot, then the fetcher dies */
        snprintf(path, sizeof path, "%s/pagecache.data", dir);
        fd = open(path, O_WRONLY);
        if (fd < 0 || pwrite(fd, junk, BS / 2, (off_t)((uint64_t)ct.slot * BS)) < 0) _exit(3);
        if (write(fds[1], "c", 1) != 1) _exit(4);
        pause();
        _exit(0);
    }
    close(fds[1]);
    CHECK(read(fds[0], &c, 1) == 1);
    CHECK(pk_pc_lookup(pc, &k, BS, "", 0, &t) == PK_PC_BUSY);
    CHECK(pk_pc_wait(pc, &t, 10) == PK_PC_TIMEDOUT);
    CHECK(kill(pid, SIGKILL) == 0);
    CHECK(waitpid(pid, &status, 0) == pid && WIFSIGNALED(status));
    CHECK(pk_pc_wait(pc, &t, 10000) == 0);
    CHECK(pk_pc_lookup(pc, &k, BS, "", 0, &t) == PK_PC_CLAIMED); /* the claim is ours now */
    fill(data, BS, 1, 0);
    CHECK(pk_pc_publish(pc, &t, data, BS) == 0);
    CHECK(pk_pc_lookup(pc, &k, BS, "", 0, &t) == PK_PC_READY);
    CHECK(pk_pc_copy(pc, &t, 0, BS, out) == 0 && memcmp(out, data, BS) == 0);
    CHECK(pk_pc_stats(pc, &st) == 0 && st.takeovers == 1);
    close(fds[0]);

    /* Killed with nobody waiting: a later lookup (no wait) inherits it directly. */
    key(&k, "n", "o", 2);
    CHECK(pipe(fds) == 0);
    pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        pk_pc_ticket ct;
        if (pk_pc_lookup(pc, &k, BS, "", 0, &ct) != PK_PC_CLAIMED) _exit(2);
        if (write(fds[1], "c", 1) != 1) _exit(4);
        pause();
        _exit(0);
    }
    close(fds[1]);
    CHECK(read(fds[0], &c, 1) == 1);
    CHECK(kill(pid, SIGKILL) == 0);
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(pk_pc_lookup(pc, &k, BS, "", 0, &t) == PK_PC_CLAIMED);
    CHECK(pk_pc_abort(pc, &t) == 0);
    close(fds[0]);
    pk_pc_close(pc);
    printf("ok kill_fetcher\n");
}

/* A process dies holding the index lock: the next locker repairs the index. */
static void test_kill_lock_holder(void)
{
    const char *dir = newdir("killlock");
    pk_pagecache *pc;
    pk_pc_counters st;
    int status;
    uint64_t b;
    pid_t pid;

    CHECK(pk_pc_open(dir, 16 * BS, BS, 0, &pc) == 0);
    for (b = 0; b < 5; b++) read_block(pc, "n", b, BS, 0, NULL);
    pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        if (pk_pc_debug_lock(pc) != 0) _exit(2);
        _exit(0); /* dies holding it */
    }
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(pk_pc_stats(pc, &st) == 0);
    CHECK(st.repairs == 1 && st.blocks_ready == 5 && st.bytes_used == 5 * BS);
    for (b = 0; b < 5; b++) read_block(pc, "n", b, BS, 0, NULL);
    CHECK(pk_pc_stats(pc, &st) == 0 && st.hits == 5);
    pk_pc_close(pc);
    printf("ok kill_lock_holder\n");
}

/* Reopening: contents persist; other geometry rebuilds when alone, is adopted when shared. */
static void test_reopen(void)
{
    const char *dir = newdir("reopen");
    pk_pagecache *a, *b;
    pk_pc_counters st;
    pk_pc_key k;
    pk_pc_ticket t;
    int status;
    pid_t pid;

    CHECK(pk_pc_open(dir, 16 * BS, BS, 0, &a) == 0);
    read_block(a, "n", 0, BS, 0, NULL);
    key(&k, "n", "obj", 1);
    CHECK(pk_pc_open(dir, 32 * BS, 2 * BS, 0, &b) == 0); /* shared: adopts */
    CHECK(pk_pc_stats(b, &st) == 0 && st.block_size == BS && st.blocks_ready == 1);
    pk_pc_close(b);
    pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) { /* closes the handle with a claim open, then exits: the claim dies with it */
        pk_pc_close(a);
        if (pk_pc_open(dir, 16 * BS, BS, PK_PC_ADOPT, &b) != 0) _exit(2);
        if (pk_pc_lookup(b, &k, BS, "", 0, &t) != PK_PC_CLAIMED) _exit(3);
        pk_pc_close(b); /* kept mapped: a claim is open */
        _exit(0);
    }
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    pk_pc_close(a);
    CHECK(pk_pc_open(dir, 16 * BS, BS, PK_PC_ADOPT, &a) == 0); /* alone, same geometry: recovers */
    CHECK(pk_pc_stats(a, &st) == 0 && st.blocks_ready == 1 && st.blocks_fetching == 0);
    CHECK(pk_pc_lookup(a, &k, BS, "", 0, &t) == PK_PC_CLAIMED);
    CHECK(pk_pc_abort(a, &t) == 0);
    read_block(a, "n", 0, BS, 0, NULL);
    CHECK(pk_pc_stats(a, &st) == 0 && st.hits >= 1);
    pk_pc_close(a);
    CHECK(pk_pc_open(dir, 32 * BS, 2 * BS, 0, &a) == 0); /* alone, new geometry: rebuilt */
    CHECK(pk_pc_stats(a, &st) == 0 && st.block_size == 2 * BS && st.blocks_ready == 0);
    CHECK(du(dir, "pagecache.data") == 0);
    pk_pc_close(a);
    printf("ok reopen\n");
}

/* Garbage over the buckets and slot records (a scribbling bug, a bad disk): reopened alone, the
 * cache repairs what it can and still never serves a wrong byte. */
static void test_garbage_index(void)
{
    const char *dir = newdir("garbage");
    char path[4300];
    static uint8_t junk[256 * 1024];
    pk_pagecache *pc;
    pk_pc_counters st;
    struct stat sb;
    unsigned seed = 42;
    size_t i;
    uint64_t b;
    int fd;

    CHECK(pk_pc_open(dir, 32 * BS, BS, 0, &pc) == 0);
    for (b = 0; b < 10; b++) read_block(pc, "n", b, BS, 0, NULL);
    pk_pc_close(pc);
    snprintf(path, sizeof path, "%s/pagecache.index", dir);
    CHECK(stat(path, &sb) == 0);
    for (i = 0; i < sizeof junk; i++) junk[i] = (uint8_t)rand_r(&seed);
    fd = open(path, O_WRONLY);
    CHECK(fd >= 0);
    CHECK(pwrite(fd, junk, (size_t)sb.st_size - 4096, 4096) == sb.st_size - 4096);
    close(fd);
    CHECK(pk_pc_open(dir, 32 * BS, BS, 0, &pc) == 0);
    for (b = 0; b < 40; b++) read_block(pc, "n", b % 12, BS, 0, NULL); /* verifies every byte */
    CHECK(pk_pc_stats(pc, &st) == 0);
    { /* batch reads over the repaired index: whatever is served is right */
        static uint8_t want[BS], got[12][BS];
        pk_pc_object o;
        pk_pc_record r[12];
        pk_pc_batch_info info;
        pk_pc_object_make(&o, "n", 1, "obj", 3, 12 * BS);
        for (i = 0; i < 12; i++) {
            fill(want, BS, i, 0);
            r[i].object = 0;
            r[i].offset = i * BS;
            r[i].len = BS;
            r[i].checksum = pk_xxh3_64(want, BS);
            r[i].dst = got[i];
        }
        CHECK(pk_pc_read_records(pc, &o, 1, r, 12, (int)(b & 1), &info) == 0);
        for (i = 0; i < 12; i++) {
            fill(want, BS, i, 0);
            CHECK(r[i].status == PK_PC_MISS || (r[i].status == PK_PC_OK && memcmp(got[i], want, BS) == 0));
        }
    }
    pk_pc_close(pc);
    printf("ok garbage_index\n");
}

/* Publish block b of an object described by o whose bytes are obj (o->size of them). */
static void publish_block(pk_pagecache *pc, const pk_pc_object *o, const uint8_t *obj, uint64_t b)
{
    pk_pc_key k;
    pk_pc_ticket t;
    uint64_t len = o->size - b * BS < BS ? o->size - b * BS : BS;
    pk_pc_object_key(o, b, &k);
    CHECK(pk_pc_lookup(pc, &k, len, "", 0, &t) == PK_PC_CLAIMED);
    CHECK(pk_pc_publish(pc, &t, obj + b * BS, len) == 0);
}

static void set_record(pk_pc_record *r, uint32_t object, const uint8_t *obj, uint64_t off, uint64_t len, uint8_t *dst)
{
    r->object = object;
    r->offset = off;
    r->len = len;
    r->checksum = pk_xxh3_64(obj + off, len);
    r->dst = dst;
    r->status = -1;
}

/* Batch reads: records across objects and blocks, partial hits, corruption, malformed records. */
static void test_read_records(void)
{
    const char *dir = newdir("records");
    enum { NOBJ = 2, NREC = 9 };
    static uint8_t objs[NOBJ][4 * BS + 1000], out[NREC][3 * BS];
    uint64_t sizes[NOBJ] = {4 * BS + 1000, 2 * BS};
    pk_pc_object o[NOBJ];
    pk_pc_record r[NREC];
    pk_pc_batch_info info;
    pk_pc_counters st;
    pk_pc_key k1, k2;
    pk_pagecache *pc;
    char path[4300];
    uint64_t off = 0, len = 0, b;
    int i, fd;

    CHECK(pk_pc_open(dir, 64 * BS, BS, 0, &pc) == 0);
    for (i = 0; i < NOBJ; i++) {
        fill(objs[i], sizes[i], 100 + (uint64_t)i, 7);
        pk_pc_object_make(&o[i], "ns", 2, i ? "o1" : "o0", 2, sizes[i]);
    }
    /* the same keys as pk_pc_key_make */
    pk_pc_object_key(&o[1], 3, &k1);
    key(&k2, "ns", "o1", 3);
    CHECK(memcmp(&k1, &k2, sizeof k1) == 0);

    for (b = 0; b < 5; b++) publish_block(pc, &o[0], objs[0], b); /* the last block is 1000 bytes */
    publish_block(pc, &o[1], objs[1], 1);                          /* o1's block 0 is not cached */
    set_record(&r[0], 0, objs[0], 10, 100, out[0]);                /* within a block */
    set_record(&r[1], 0, objs[0], BS - 50, 3000, out[1]);          /* across two blocks */
    set_record(&r[2], 0, objs[0], 100, 2 * BS + 7, out[2]);        /* three blocks */
    set_record(&r[3], 0, objs[0], 4 * BS + 900, 100, out[3]);      /* the end of the short last block */
    set_record(&r[4], 1, objs[1], BS + 4000, 200, out[4]);         /* o1, cached */
    set_record(&r[5], 1, objs[1], BS - 10, 20, out[5]);            /* o1, half in the missing block */
    set_record(&r[6], 0, objs[0], 4 * BS + 1000, 0, out[6]);       /* empty, at the very end */
    set_record(&r[7], 0, objs[0], 10, 100, out[7]);                /* a repeat */
    set_record(&r[8], 1, objs[1], 5, 10, out[8]);                  /* o1, missing block */
    for (i = 0; i < 2; i++) { /* records verified, then not */
        int j;
        memset(out, 0, sizeof out);
        CHECK(pk_pc_read_records(pc, o, NOBJ, r, NREC, i == 0, &info) == 0);
        for (j = 0; j < NREC; j++) {
            int missing = j == 5 || j == 8;
            CHECK(r[j].status == (missing ? PK_PC_MISS : PK_PC_OK));
            if (!missing) CHECK(memcmp(out[j], objs[r[j].object] + r[j].offset, r[j].len) == 0);
        }
        CHECK(info.missed == 2 && info.mismatched == 0 && info.blocks_hit == 5 && info.blocks_missed == 1);
    }
    /* a record whose checksum the cache cannot match: the cached bytes are intact, so MISMATCH */
    r[4].checksum ^= 1;
    CHECK(pk_pc_read_records(pc, o, NOBJ, r, NREC, 1, &info) == 0);
    CHECK(r[4].status == PK_PC_MISMATCH && info.mismatched == 1 && r[0].status == PK_PC_OK);
    CHECK(pk_pc_read_records(pc, o, NOBJ, r, NREC, 0, &info) == 0); /* not verified: served */
    CHECK(r[4].status == PK_PC_OK && info.mismatched == 0);
    r[4].checksum ^= 1;

    /* malformed records are refused before anything is read */
    r[3].len = 101;
    CHECK(pk_pc_read_records(pc, o, NOBJ, r, NREC, 1, &info) == -EINVAL && info.bad_record == 3);
    r[3].len = 100;
    r[6].offset = UINT64_MAX;
    CHECK(pk_pc_read_records(pc, o, NOBJ, r, NREC, 1, &info) == -EINVAL && info.bad_record == 6);
    r[6].offset = 4 * BS + 1000;
    r[2].object = NOBJ;
    CHECK(pk_pc_read_records(pc, o, NOBJ, r, NREC, 1, &info) == -EINVAL && info.bad_record == 2);
    r[2].object = 0;
    r[1].dst = NULL;
    CHECK(pk_pc_read_records(pc, o, NOBJ, r, NREC, 1, &info) == -EINVAL && info.bad_record == 1);
    r[1].dst = out[1];
    CHECK(pk_pc_read_records(pc, o, NOBJ, r, 0, 1, &info) == 0 && info.blocks_hit == 0);

    /* a flipped byte on disk in block 2 of o0 (read by record 2 only), then in block 0 */
    pk_pc_object_key(&o[0], 2, &k1);
    CHECK(pk_pc_locate(pc, &k1, &off, &len) == PK_PC_READY && len == BS);
    snprintf(path, sizeof path, "%s/pagecache.data", dir);
    fd = open(path, O_RDWR);
    CHECK(fd >= 0);
    CHECK(pwrite(fd, "X", 1, (off_t)(off + 33)) == 1);
    CHECK(pk_pc_read_records(pc, o, NOBJ, r, NREC, 1, &info) == 0);
    CHECK(r[2].status == PK_PC_MISS && r[0].status == PK_PC_OK && r[1].status == PK_PC_OK);
    CHECK(pk_pc_locate(pc, &k1, &off, &len) == 0); /* dropped */
    CHECK(pk_pc_stats(pc, &st) == 0 && st.corruptions == 1);
    publish_block(pc, &o[0], objs[0], 2);
    pk_pc_object_key(&o[0], 0, &k1);
    CHECK(pk_pc_locate(pc, &k1, &off, &len) == PK_PC_READY);
    CHECK(pwrite(fd, "X", 1, (off_t)(off + BS - 1)) == 1); /* a chunk only record 2 touches */
    CHECK(pk_pc_read_records(pc, o, NOBJ, r, NREC, 0, &info) == 0); /* records not verified: still caught */
    CHECK(r[2].status == PK_PC_MISS && r[1].status == PK_PC_MISS && r[0].status == PK_PC_OK);
    CHECK(r[4].status == PK_PC_OK && r[3].status == PK_PC_OK && memcmp(out[0], objs[0] + 10, 100) == 0);
    CHECK(pk_pc_locate(pc, &k1, &off, &len) == 0);
    CHECK(pk_pc_stats(pc, &st) == 0 && st.corruptions == 2);
    close(fd);
    publish_block(pc, &o[0], objs[0], 0);
    memset(out, 0, sizeof out);
    CHECK(pk_pc_read_records(pc, o, NOBJ, r, NREC, 1, &info) == 0);
    CHECK(r[2].status == PK_PC_OK && memcmp(out[2], objs[0] + 100, 2 * BS + 7) == 0);

    /* a cache that holds no block at all */
    CHECK(pk_pc_clear(pc) == 0);
    CHECK(pk_pc_read_records(pc, o, NOBJ, r, NREC, 1, &info) == 0);
    CHECK(info.missed == NREC - 1 && r[6].status == PK_PC_OK && info.blocks_hit == 0);
    pk_pc_close(pc);
    printf("ok read_records\n");
}

/* Capacity too small for even one block: every lookup says fetch without caching. */
static void test_tiny(void)
{
    const char *dir = newdir("tiny");
    pk_pagecache *pc;
    pk_pc_key k;
    pk_pc_ticket t;
    CHECK(pk_pc_open(dir, BS, BS, 0, &pc) == 0);
    key(&k, "n", "o", 0);
    CHECK(pk_pc_lookup(pc, &k, BS, "", 0, &t) == PK_PC_NOSPACE);
    pk_pc_close(pc);
    printf("ok tiny\n");
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s SCRATCH_DIR\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    snprintf(root, sizeof root, "%s", argv[1]);
    test_basic();
    test_full_block_chunks();
    test_corruption();
    test_budget_and_clear();
    test_concurrent();
    test_kill_fetcher();
    test_kill_lock_holder();
    test_reopen();
    test_garbage_index();
    test_read_records();
    test_tiny();
    printf("all ok\n");
    return 0;
}
