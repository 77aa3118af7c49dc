/*
 * zt_core.h -- the shared-memory hash table and atomic counter behind zeal_asgi.shm._shmtable.
 *
 * Pure C, no Python objects; included verbatim by _shmtable.pyx.  Everything here runs on a
 * MAP_SHARED mapping that several processes use at once, so every rule below is about what
 * another process may be doing at the same instant, or what a process SIGKILLed half-way left.
 * The mapping comes from the caller (a file descriptor mapped by _shmtable.pyx); naming,
 * creating and removing segments is Python's business (zeal_asgi/shm/segments.py).
 *
 * Segment layout (all offsets fixed at creation, recorded in the header):
 *
 *   [zt_header, 4 KiB]  identity, ABI tag, geometry, schema blob, checksum; hot counters on their
 *                       own cache lines
 *   [global lock slot]  robust pshared mutex guarding STRUCTURE: index, free list, row states
 *   [stripe slots]      n_stripes robust pshared mutexes guarding row CONTENT, one 64-byte line each
 *   [index]             open-addressed, linear probing, uint64 slots: tag(32) | row+1 (32);
 *                       backward-shift deletion, so there are no tombstones to accumulate
 *   [rows]              capacity fixed-size rows; a row never moves while its key is live, which
 *                       is what lets iteration walk the rows and never skip a row present
 *                       throughout
 *
 * Row: u32 seq | u8 state | u8 pad | u16 keylen | [i64 expiry] | numeric columns (8/4/2/1-byte,
 *      aligned) | key bytes (key_limit) | string columns (length prefix + bytes).
 *
 * Concurrency:
 *   - Readers take no lock.  A row is read with a seqlock (seq odd while written) and the copy is
 *     validated before anything in it is trusted; a miss is trusted only if index_seq (bumped by
 *     every structural change that moves index slots) did not change during the probe.
 *   - Writers of an existing row hold the key's stripe lock.  Inserts and deletes hold the global
 *     lock and then the stripe lock (always in that order).
 *   - All locks are robust: when a holder dies, the next locker gets EOWNERDEAD and repairs what the
 *     dead process left half done before calling pthread_mutex_consistent.  Stripe repair turns a
 *     torn row (its writer recorded it in the stripe's intent word) into a DEAD row; global repair
 *     rebuilds the index, free list and row count from the row states.  Nothing is force-unlocked:
 *     a lock held by a live but stuck process gives ZT_ETIMEDOUT after the caller's deadline.
 *   - Blocking waits never hold the GIL (see zt_acquire), and nothing here touches Python objects,
 *     so a thread never waits for the GIL while holding a row lock.
 *
 * Expiring rows (a table made with a ttl): each row carries a CLOCK_MONOTONIC deadline, renewed
 * by every write.  Expiry is decided where the row is written, under its stripe lock: a write to
 * an expired row rewrites it as a new row in the same step, and an expired row found by a read
 * is removed only after the locks confirm it is still expired.  No read-then-delete can remove a
 * row another process has just written.
 */
#ifndef ZT_CORE_H
#define ZT_CORE_H

#include <Python.h>
#include <errno.h>
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <gnu/libc-version.h>

_Static_assert(__atomic_always_lock_free(sizeof(int64_t), 0), "64-bit atomics must be lock-free");
_Static_assert(sizeof(pthread_mutex_t) <= 48, "pthread_mutex_t must fit a 64-byte lock slot");
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the segment layout is little-endian");

#define ZT_MAGIC_TABLE 0x324c42544c41455aULL  /* "ZEALTBL2" */
#define ZT_MAGIC_ATOMIC 0x31544d414c41455aULL /* "ZEALAMT1" */
#define ZT_LAYOUT_VERSION 2u
#define ZT_HEADER_SIZE 4096u
#define ZT_SCHEMA_MAX 2560u
#define ZT_ABI_MAX 64u

/* row states */
#define ZT_FREE 0
#define ZT_BUSY 1
#define ZT_LIVE 2
#define ZT_DEAD 3

/* column types (must match zeal_asgi/shm/schema.py) */
#define ZT_INT 1
#define ZT_FLOAT 2
#define ZT_STRING 3
#define ZT_BYTES 4

/* return codes */
#define ZT_OK 0
#define ZT_ETIMEDOUT (-1)
#define ZT_EFULL (-2)
#define ZT_EOVERFLOW (-3)
#define ZT_ELOCK (-4)
#define ZT_ENONFINITE (-5)
#define ZT_EBUSYREAD (-7)
#define ZT_NOTFOUND (-1000)

#define ZT_ROW_HDR 8u
#define ZT_READ_SPINS 2000
#define ZT_LOCK_SPINS 64
#define ZT_MAX_COLUMNS 64
#define ZT_MAX_STRIPES 1024

/* ---------------------------------------------------------------------------------------- */
/* segment headers                                                                          */

/* What every segment starts with.  The magic is written last, with a release store. */
typedef struct {
    uint64_t magic;
    uint32_t layout_version;
    uint32_t pad;
    char abi[ZT_ABI_MAX];      /* libc name+version, mutex size, layout version, word size */
    uint64_t total_size;
    uint64_t nonce[2];         /* random identity of this segment */
} zt_ident;

/* Sizes and offsets of a table, computed by zeal_asgi.shm.schema (Geometry, the same order). */
typedef struct {
    uint32_t capacity, row_size, key_limit, key_off, n_stripes;
    uint32_t exp_off;          /* offset of a row's expiry; 0: rows never expire */
    int64_t ttl_ns;
    uint64_t index_slots, off_global, off_stripes, off_index, off_rows, total_size;
} zt_geometry;

typedef struct {
    zt_ident id;
    uint64_t hash_key[2];      /* SipHash key: stable for every process of this segment */
    zt_geometry g;
    uint32_t schema_len;
    uint64_t created_ns;       /* CLOCK_REALTIME at creation, for diagnostics */
    char schema[ZT_SCHEMA_MAX];/* opaque to C: the Python side stores and checks it */
    uint64_t checksum;         /* over every byte above, from layout_version on */
    /* ---- mutable, on their own lines ---- */
    __attribute__((aligned(64))) int64_t row_count;
    __attribute__((aligned(64))) uint64_t index_seq;
    uint32_t next_unused;      /* rows [0, next_unused) have been used at least once */
    uint32_t free_head;        /* row+1 of the first free row, 0 = none */
    int64_t dead_rows;         /* rows torn by a dead writer and not yet reclaimed */
    __attribute__((aligned(64))) int64_t lock_recoveries;
    int64_t rows_lost;
    int64_t lock_timeouts;
    int64_t read_fallbacks;
    int64_t inserts;
    int64_t deletes;
} zt_header;

_Static_assert(sizeof(zt_header) <= ZT_HEADER_SIZE, "header must fit its page");

/* What a writer is doing, recorded before it makes a row odd, so that the next owner of the lock
 * knows what a dead writer may have left half done: low 32 bits row+1 (0 = nothing), high 32 bits
 * the kind of write.  A single aligned word store (incr, compare-and-set, a one-column numeric
 * set, a delete's state byte) cannot tear: repair just makes the row even again.  Anything wider
 * may be torn, and repair turns the row into a DEAD row.  (An expiry renewed beside a single word
 * is a second word: torn, the row holds the new value with the old deadline, or the reverse;
 * both are whole rows.) */
#define ZT_W_SINGLE 1ULL
#define ZT_W_MULTI 2ULL

typedef struct {
    pthread_mutex_t m;
    uint64_t intent;
} __attribute__((aligned(64))) zt_lockslot;

_Static_assert(sizeof(zt_lockslot) == 64, "one lock per cache line");

typedef struct {
    uint8_t type;
    uint8_t width;             /* INT: 1/2/4/8, FLOAT: 8, STRING/BYTES: length-prefix bytes 1/2/4 */
    uint16_t pad;
    uint32_t offset;
    uint32_t size;             /* STRING/BYTES: capacity in bytes */
} zt_col;

/* process-local view of a mapped table */
typedef struct {
    char *base;
    zt_header *hdr;
    zt_geometry g;             /* a private copy of the header's, read by every operation */
    zt_lockslot *global;
    zt_lockslot *stripes;
    uint64_t *index;
    char *rows;
    uint64_t index_mask;
    uint32_t stripe_mask;
    uint64_t hkey[2];
    int64_t lock_timeout_ns;
    int64_t local_recoveries;  /* repairs this process ran; the Python side logs them */
} zt_table;

/* a pending column write, prepared (and validated) before any lock is taken */
typedef struct {
    int col;
    int64_t i;
    double f;
    const char *s;
    uint32_t slen;
} zt_delta;

/* ---------------------------------------------------------------------------------------- */
/* deterministic crash points, compiled into test builds only (-DZT_FAULT_INJECTION)         */

#ifdef ZT_FAULT_INJECTION
#define ZT_FAULTS 1
static int zt_crash_id = -1;
static long zt_crash_countdown = 0;
static int zt_crash_sig = SIGKILL;

static void zt_crash_hit(void) {
    if (--zt_crash_countdown <= 0) {
        zt_crash_id = -1;
        raise(zt_crash_sig);
    }
}
static void zt_arm_crashpoint(int id, long nth, int sig) {
    zt_crash_countdown = nth;
    zt_crash_sig = sig;
    zt_crash_id = id;
}
#define ZT_CRASHPOINT(id) do { if (__builtin_expect(zt_crash_id == (id), 0)) zt_crash_hit(); } while (0)
#else
#define ZT_FAULTS 0
static void zt_arm_crashpoint(int id, long nth, int sig) { (void)id; (void)nth; (void)sig; }
#define ZT_CRASHPOINT(id) ((void)0)
#endif

/* crash point ids, documented for the fault tests */
#define ZT_CP_UPDATE_AFTER_ODD 1    /* update: seq odd, no column written yet */
#define ZT_CP_UPDATE_MID 2          /* update: first column written, others not */
#define ZT_CP_INSERT_BUSY 3         /* insert: row BUSY, key written, columns not */
#define ZT_CP_INSERT_UNPUBLISHED 4  /* insert: row LIVE, not yet in the index */
#define ZT_CP_DELETE_FREED 5        /* delete: row FREE, index slot not yet removed */
#define ZT_CP_DELETE_MID_SHIFT 6    /* delete: in the middle of the backward shift */
#define ZT_CP_INCR_AFTER_ODD 7      /* incr: seq odd, value not yet written */

/* ---------------------------------------------------------------------------------------- */
/* hashing: SipHash-1-3 with a per-segment random key (hash flooding needs the key)          */

#define ZT_ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define ZT_SIPROUND                                                                          \
    do {                                                                                     \
        v0 += v1; v1 = ZT_ROTL(v1, 13); v1 ^= v0; v0 = ZT_ROTL(v0, 32);                      \
        v2 += v3; v3 = ZT_ROTL(v3, 16); v3 ^= v2;                                            \
        v0 += v3; v3 = ZT_ROTL(v3, 21); v3 ^= v0;                                            \
        v2 += v1; v1 = ZT_ROTL(v1, 17); v1 ^= v2; v2 = ZT_ROTL(v2, 32);                      \
    } while (0)

static inline uint64_t zt_hash(const uint64_t k[2], const char *data, size_t len) {
    const uint8_t *in = (const uint8_t *)data;
    uint64_t v0 = 0x736f6d6570736575ULL ^ k[0];
    uint64_t v1 = 0x646f72616e646f6dULL ^ k[1];
    uint64_t v2 = 0x6c7967656e657261ULL ^ k[0];
    uint64_t v3 = 0x7465646279746573ULL ^ k[1];
    uint64_t b = ((uint64_t)len) << 56;
    const uint8_t *end = in + len - (len % 8);
    for (; in != end; in += 8) {
        uint64_t m;
        memcpy(&m, in, 8);
        v3 ^= m;
        ZT_SIPROUND;
        v0 ^= m;
    }
    switch (len & 7) {
    case 7: b |= ((uint64_t)in[6]) << 48; /* fall through */
    case 6: b |= ((uint64_t)in[5]) << 40; /* fall through */
    case 5: b |= ((uint64_t)in[4]) << 32; /* fall through */
    case 4: b |= ((uint64_t)in[3]) << 24; /* fall through */
    case 3: b |= ((uint64_t)in[2]) << 16; /* fall through */
    case 2: b |= ((uint64_t)in[1]) << 8;  /* fall through */
    case 1: b |= ((uint64_t)in[0]); break;
    case 0: break;
    }
    v3 ^= b;
    ZT_SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    ZT_SIPROUND;
    ZT_SIPROUND;
    ZT_SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

/* checksum of an immutable header part (not a security measure: detects a foreign layout) */
static uint64_t zt_checksum(const zt_ident *id, const void *end) {
    static const uint64_t k[2] = {0x7a65616c2d617367ULL, 0x692d6865616465ULL};
    const char *start = (const char *)&id->layout_version;
    return zt_hash(k, start, (size_t)((const char *)end - start));
}

static void zt_abi_tag(char out[ZT_ABI_MAX]) {
    snprintf(out, ZT_ABI_MAX, "glibc-%s/mutex%zu/layout%u/ptr%zu/le", gnu_get_libc_version(),
             sizeof(pthread_mutex_t), ZT_LAYOUT_VERSION, sizeof(void *));
}

static int zt_random(void *buf, size_t n) {
    return getrandom(buf, n, 0) == (ssize_t)n ? 0 : errno;
}

/* Fill a segment's identity (everything but the magic); 0 or an errno. */
static int zt_ident_init(zt_ident *id, uint64_t size) {
    id->layout_version = ZT_LAYOUT_VERSION;
    zt_abi_tag(id->abi);
    id->total_size = size;
    return zt_random(id->nonce, sizeof id->nonce);
}

/* Validate a segment made by someone else.  Returns 0, or: 1 not initialised (no magic yet),
 * 2 ABI/layout mismatch, 3 corrupt header, 4 size mismatch. */
static int zt_ident_check(const zt_ident *id, size_t size, uint64_t magic, uint64_t stored,
                          const void *checksum_end) {
    uint64_t m = __atomic_load_n(&id->magic, __ATOMIC_ACQUIRE);
    if (m == 0) return 1;
    char abi[ZT_ABI_MAX];
    zt_abi_tag(abi);
    if (m != magic || id->layout_version != ZT_LAYOUT_VERSION) return 2;
    if (strncmp(abi, id->abi, ZT_ABI_MAX) != 0) return 2;
    if (stored != zt_checksum(id, checksum_end)) return 3;
    if (id->total_size != size) return 4;
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* small helpers                                                                            */

static inline char *zt_row(const zt_table *t, uint32_t r) {
    return t->rows + (size_t)r * t->g.row_size;
}
static inline uint32_t *zt_seqp(char *row) { return (uint32_t *)row; }
static inline uint8_t zt_state(const char *row) {
    return __atomic_load_n((const uint8_t *)(row + 4), __ATOMIC_ACQUIRE);
}
static inline void zt_set_state(char *row, uint8_t st) {
    __atomic_store_n((uint8_t *)(row + 4), st, __ATOMIC_RELEASE);
}
static inline uint16_t zt_keylen(const char *row) { uint16_t v; memcpy(&v, row + 6, 2); return v; }
static inline uint32_t zt_slot_row(uint64_t v) { return (uint32_t)(v & 0xffffffffu) - 1; }

static inline int64_t zt_now_ns(clockid_t clk) {
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The present, for expiry: 0 on a table whose rows never expire (nothing is ever expired). */
static inline int64_t zt_now(const zt_table *t) {
    return __builtin_expect(t->g.exp_off != 0, 0) ? zt_now_ns(CLOCK_MONOTONIC) : 0;
}
static inline int zt_expired(const zt_table *t, const char *row, int64_t now) {
    if (__builtin_expect(t->g.exp_off == 0, 1)) return 0;
    int64_t e;
    memcpy(&e, row + t->g.exp_off, 8);
    return e != 0 && e <= now;
}
/* A write gives its row a full ttl (inside the write's seqlock section). */
static inline void zt_touch(const zt_table *t, char *row) {
    if (__builtin_expect(t->g.exp_off != 0, 0)) {
        int64_t e = zt_now_ns(CLOCK_MONOTONIC) + t->g.ttl_ns;
        memcpy(row + t->g.exp_off, &e, 8);
    }
}

static inline void zt_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

/* seqlock writer: the row becomes odd; readers retry until it is even again */
static inline uint32_t zt_write_begin(zt_lockslot *slot, char *row, uint32_t r, uint64_t kind) {
    uint32_t s = __atomic_load_n(zt_seqp(row), __ATOMIC_RELAXED);
    if (s & 1) s++; /* defensive: never leave a row odd because an earlier writer died */
    __atomic_store_n(&slot->intent, (kind << 32) | (uint64_t)(r + 1), __ATOMIC_RELAXED);
    __atomic_store_n(zt_seqp(row), s + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    return s;
}
static inline void zt_write_end(zt_lockslot *slot, char *row, uint32_t s) {
    __atomic_store_n(zt_seqp(row), s + 2, __ATOMIC_RELEASE);
    __atomic_store_n(&slot->intent, 0, __ATOMIC_RELEASE);
}

/* Seqlock-checked copy of the first `bytes` (a multiple of 8, at most the row size) of row r, or
 * 0 if a writer was active (caller retries).  The copy is done with relaxed atomic loads so that
 * the racing reads are defined behaviour. */
static inline int zt_copy_prefix(const zt_table *t, uint32_t r, char *dst, uint32_t bytes) {
    const char *row = zt_row(t, r);
    uint32_t s1 = __atomic_load_n((const uint32_t *)row, __ATOMIC_ACQUIRE);
    if (s1 & 1) return 0;
    const uint64_t *src = (const uint64_t *)row;
    uint64_t *d = (uint64_t *)dst;
    size_t n = bytes / 8;
    for (size_t i = 0; i < n; i++) d[i] = __atomic_load_n(src + i, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    uint32_t s2 = __atomic_load_n((const uint32_t *)row, __ATOMIC_RELAXED);
    return s1 == s2;
}

static inline int zt_key_eq(const zt_table *t, const char *row, const char *key, uint16_t klen) {
    return zt_keylen(row) == klen && memcmp(row + t->g.key_off, key, klen) == 0;
}

/* ---------------------------------------------------------------------------------------- */
/* column access (on a row we own or on a private copy)                                      */

static inline int64_t zt_get_int(const char *row, const zt_col *c) {
    const char *p = row + c->offset;
    switch (c->width) {
    case 1: { int8_t v; memcpy(&v, p, 1); return v; }
    case 2: { int16_t v; memcpy(&v, p, 2); return v; }
    case 4: { int32_t v; memcpy(&v, p, 4); return v; }
    default: { int64_t v; memcpy(&v, p, 8); return v; }
    }
}
static inline void zt_put_int(char *row, const zt_col *c, int64_t v) {
    char *p = row + c->offset;
    switch (c->width) {
    case 1: { int8_t x = (int8_t)v; memcpy(p, &x, 1); break; }
    case 2: { int16_t x = (int16_t)v; memcpy(p, &x, 2); break; }
    case 4: { int32_t x = (int32_t)v; memcpy(p, &x, 4); break; }
    default: memcpy(p, &v, 8); break;
    }
}
static inline int zt_int_fits(int width, int64_t v) {
    switch (width) {
    case 1: return v >= INT8_MIN && v <= INT8_MAX;
    case 2: return v >= INT16_MIN && v <= INT16_MAX;
    case 4: return v >= INT32_MIN && v <= INT32_MAX;
    default: return 1;
    }
}
static inline double zt_get_float(const char *row, const zt_col *c) {
    double v; memcpy(&v, row + c->offset, 8); return v;
}
static inline void zt_put_float(char *row, const zt_col *c, double v) {
    memcpy(row + c->offset, &v, 8);
}
/* Length of a string column.  Clamped to the column size: the copy may come from a row a dead
 * writer tore, and a torn length must never make us read past the column. */
static inline uint32_t zt_get_slen(const char *row, const zt_col *c) {
    const char *p = row + c->offset;
    uint32_t n;
    switch (c->width) {
    case 1: { uint8_t v; memcpy(&v, p, 1); n = v; break; }
    case 2: { uint16_t v; memcpy(&v, p, 2); n = v; break; }
    default: { uint32_t v; memcpy(&v, p, 4); n = v; break; }
    }
    return n > c->size ? c->size : n;
}
static inline const char *zt_get_sptr(const char *row, const zt_col *c) {
    return row + c->offset + c->width;
}
static inline void zt_put_str(char *row, const zt_col *c, const char *s, uint32_t n) {
    char *p = row + c->offset;
    switch (c->width) {
    case 1: { uint8_t v = (uint8_t)n; memcpy(p, &v, 1); break; }
    case 2: { uint16_t v = (uint16_t)n; memcpy(p, &v, 2); break; }
    default: memcpy(p, &n, 4); break;
    }
    if (n) memcpy(p + c->width, s, n);
}

static inline void zt_apply(char *row, const zt_col *cols, const zt_delta *d, int n) {
    for (int i = 0; i < n; i++) {
        const zt_col *c = &cols[d[i].col];
        switch (c->type) {
        case ZT_INT: zt_put_int(row, c, d[i].i); break;
        case ZT_FLOAT: zt_put_float(row, c, d[i].f); break;
        default: zt_put_str(row, c, d[i].s, d[i].slen); break;
        }
        if (i == 0) ZT_CRASHPOINT(ZT_CP_UPDATE_MID);
    }
}

/* Every column (and the expiry) of a row zeroed, the key kept. */
static inline void zt_zero_columns(const zt_table *t, char *row) {
    memset(row + ZT_ROW_HDR, 0, t->g.key_off - ZT_ROW_HDR);
    memset(row + t->g.key_off + t->g.key_limit, 0, t->g.row_size - t->g.key_off - t->g.key_limit);
}

/* ---------------------------------------------------------------------------------------- */
/* locks                                                                                    */

static int zt_mutex_init(pthread_mutex_t *m) {
    pthread_mutexattr_t a;
    int rc = pthread_mutexattr_init(&a);
    if (rc) return rc;
    /* PTHREAD_MUTEX_ROBUST is an enum in glibc, so it cannot be feature-tested with #ifdef:
     * call the setter unconditionally and check what it says. */
    if ((rc = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED)) == 0 &&
        (rc = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST)) == 0) {
        rc = pthread_mutex_init(m, &a);
    }
    pthread_mutexattr_destroy(&a);
    return rc;
}

/* 1 if a fresh mutex attribute reads back as robust + process-shared (asserted by a test) */
static int zt_robust_supported(void) {
    pthread_mutexattr_t a;
    int robust = 0, pshared = 0;
    if (pthread_mutexattr_init(&a)) return 0;
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    pthread_mutexattr_getrobust(&a, &robust);
    pthread_mutexattr_getpshared(&a, &pshared);
    pthread_mutexattr_destroy(&a);
    return robust == PTHREAD_MUTEX_ROBUST && pshared == PTHREAD_PROCESS_SHARED;
}

static void zt_repair_stripe(zt_table *t, zt_lockslot *slot);
static void zt_repair_global(zt_table *t);

/* We own a lock whose previous holder died: repair what it protects, then mark it consistent
 * (unlocking without pthread_mutex_consistent would make the mutex unrecoverable). */
static void zt_recover(zt_table *t, zt_lockslot *slot, int is_global) {
    if (is_global) zt_repair_global(t);
    else zt_repair_stripe(t, slot);
    __atomic_add_fetch(&t->hdr->lock_recoveries, 1, __ATOMIC_RELAXED);
    t->local_recoveries++;
    pthread_mutex_consistent(&slot->m);
}

static int zt_timed_lock(const zt_table *t, zt_lockslot *slot) {
    struct timespec dl;
    clock_gettime(CLOCK_MONOTONIC, &dl);
    int64_t ns = dl.tv_nsec + t->lock_timeout_ns;
    dl.tv_sec += ns / 1000000000LL;
    dl.tv_nsec = ns % 1000000000LL;
    return pthread_mutex_clocklock(&slot->m, CLOCK_MONOTONIC, &dl);
}

/* Lock a slot.  Spins a little with trylock (the GIL held: bounded), then releases the GIL for
 * the blocking wait.  *ts receives the saved thread state if the GIL was released; the caller
 * restores it only after unlocking everything (never reacquire the GIL while holding a lock).
 * EOWNERDEAD is handled here for every path, including trylock. */
static int zt_acquire(zt_table *t, zt_lockslot *slot, int is_global, PyThreadState **ts) {
    int rc = pthread_mutex_trylock(&slot->m);
    for (int i = 0; rc == EBUSY && i < ZT_LOCK_SPINS; i++) {
        zt_cpu_relax();
        rc = pthread_mutex_trylock(&slot->m);
    }
    if (rc == EBUSY) {
        if (*ts == NULL && PyGILState_Check()) *ts = PyEval_SaveThread();
        rc = zt_timed_lock(t, slot);
    }
    if (rc == 0) return ZT_OK;
    if (rc == EOWNERDEAD) {
        zt_recover(t, slot, is_global);
        return ZT_OK;
    }
    if (rc == ETIMEDOUT) {
        __atomic_add_fetch(&t->hdr->lock_timeouts, 1, __ATOMIC_RELAXED);
        return ZT_ETIMEDOUT;
    }
    return ZT_ELOCK;
}

static inline void zt_release(zt_lockslot *slot) { pthread_mutex_unlock(&slot->m); }

static inline void zt_regain_gil(PyThreadState **ts) {
    if (*ts) { PyEval_RestoreThread(*ts); *ts = NULL; }
}

/* ---------------------------------------------------------------------------------------- */
/* index                                                                                    */

static inline uint64_t zt_slot_val(uint64_t h, uint32_t r) {
    return (h & 0xffffffff00000000ULL) | (uint64_t)(r + 1);
}
static inline zt_lockslot *zt_stripe(const zt_table *t, uint64_t h) {
    return &t->stripes[(uint32_t)(h >> 40) & t->stripe_mask];
}
static inline uint64_t zt_row_hash(const zt_table *t, const char *row) {
    return zt_hash(t->hkey, row + t->g.key_off, zt_keylen(row));
}

/* Lock-free probe.  Returns the row of `key` and fills `copy` with a validated snapshot of its
 * first `bytes` (the whole row: t->g.row_size; at least its head and key), or -1.  A miss is only returned when no structural change moved index slots during the probe.  When it
 * gives up, *busy says why: ZT_BUSY_ROW (a row stayed mid-write; its index is in *busy_row) or
 * ZT_BUSY_INDEX (the index kept changing). */
#define ZT_BUSY_ROW 1
#define ZT_BUSY_INDEX 2
static int64_t zt_lookup(const zt_table *t, const char *key, uint16_t klen, uint64_t h, char *copy,
                         uint32_t bytes, int *busy, uint32_t *busy_row) {
    const uint64_t tag = h & 0xffffffff00000000ULL;
    *busy = 0;
    for (int attempt = 0; attempt < ZT_READ_SPINS; attempt++) {
        uint64_t s0 = __atomic_load_n(&t->hdr->index_seq, __ATOMIC_ACQUIRE);
        if (s0 & 1) { zt_cpu_relax(); continue; }
        uint64_t pos = h & t->index_mask;
        int retry = 0;
        for (uint64_t n = 0; n <= t->index_mask; n++, pos = (pos + 1) & t->index_mask) {
            uint64_t v = __atomic_load_n(&t->index[pos], __ATOMIC_ACQUIRE);
            if (v == 0) break;
            if ((v & 0xffffffff00000000ULL) != tag) continue;
            uint32_t r = zt_slot_row(v);
            if (r >= t->g.capacity) { retry = 1; break; }
            int ok = 0;
            for (int s = 0; s < ZT_READ_SPINS; s++) {
                if (zt_copy_prefix(t, r, copy, bytes)) { ok = 1; break; }
                zt_cpu_relax();
            }
            if (!ok) { *busy = ZT_BUSY_ROW; *busy_row = r; return -1; }
            if (copy[4] == ZT_LIVE && zt_key_eq(t, copy, key, klen)) return r;
        }
        if (retry) continue;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&t->hdr->index_seq, __ATOMIC_RELAXED) == s0) return -1;
    }
    *busy = ZT_BUSY_INDEX;
    return -1;
}

/* Probe under the global lock (the index is stable): slot position of `key` or -1. */
static int64_t zt_find_slot_locked(const zt_table *t, const char *key, uint16_t klen, uint64_t h) {
    const uint64_t tag = h & 0xffffffff00000000ULL;
    uint64_t pos = h & t->index_mask;
    for (uint64_t n = 0; n <= t->index_mask; n++, pos = (pos + 1) & t->index_mask) {
        uint64_t v = t->index[pos];
        if (v == 0) return -1;
        if ((v & 0xffffffff00000000ULL) != tag) continue;
        if (zt_key_eq(t, zt_row(t, zt_slot_row(v)), key, klen)) return (int64_t)pos;
    }
    return -1;
}

/* Probe for the row of `key` while holding its stripe lock (rows of this key cannot change
 * state under us, but a concurrent delete of another key may shift slots: a miss here is only a
 * hint and the caller confirms it under the global lock). */
static int64_t zt_find_row_striped(const zt_table *t, const char *key, uint16_t klen, uint64_t h) {
    const uint64_t tag = h & 0xffffffff00000000ULL;
    uint64_t pos = h & t->index_mask;
    for (uint64_t n = 0; n <= t->index_mask; n++, pos = (pos + 1) & t->index_mask) {
        uint64_t v = __atomic_load_n(&t->index[pos], __ATOMIC_ACQUIRE);
        if (v == 0) return -1;
        if ((v & 0xffffffff00000000ULL) != tag) continue;
        uint32_t r = zt_slot_row(v);
        if (r >= t->g.capacity) return -1;
        const char *row = zt_row(t, r);
        if (zt_state(row) == ZT_LIVE && zt_key_eq(t, row, key, klen)) return r;
    }
    return -1;
}

static void zt_index_insert_locked(zt_table *t, uint64_t h, uint32_t r) {
    uint64_t pos = h & t->index_mask;
    while (t->index[pos] != 0) pos = (pos + 1) & t->index_mask;
    __atomic_store_n(&t->index[pos], zt_slot_val(h, r), __ATOMIC_RELEASE);
}

/* Backward-shift deletion (Knuth 6.4 algorithm R); index_seq is odd meanwhile so lock-free
 * readers do not trust a miss seen during the shift. */
static void zt_index_remove_locked(zt_table *t, uint64_t pos) {
    uint64_t mask = t->index_mask;
    __atomic_add_fetch(&t->hdr->index_seq, 1, __ATOMIC_ACQ_REL);
    uint64_t hole = pos;
    uint64_t j = pos;
    for (;;) {
        j = (j + 1) & mask;
        uint64_t v = t->index[j];
        if (v == 0) break;
        uint64_t home = zt_row_hash(t, zt_row(t, zt_slot_row(v))) & mask;
        /* can the entry at j move to the hole? only if its home is not cyclically in (hole, j] */
        int stays = (hole <= j) ? (home > hole && home <= j) : (home > hole || home <= j);
        if (stays) continue;
        __atomic_store_n(&t->index[hole], v, __ATOMIC_RELEASE);
        ZT_CRASHPOINT(ZT_CP_DELETE_MID_SHIFT);
        hole = j;
    }
    __atomic_store_n(&t->index[hole], 0, __ATOMIC_RELEASE);
    __atomic_add_fetch(&t->hdr->index_seq, 1, __ATOMIC_ACQ_REL);
}

/* ---------------------------------------------------------------------------------------- */
/* repair                                                                                   */

/* The stripe's previous holder died.  If it was writing a row (intent set and seq odd), the row
 * may be torn: make it DEAD (lookups miss it, iteration skips it) and count it as lost. */
static void zt_repair_stripe(zt_table *t, zt_lockslot *slot) {
    uint64_t intent = __atomic_load_n(&slot->intent, __ATOMIC_ACQUIRE);
    uint32_t r1 = (uint32_t)(intent & 0xffffffffu);
    if (r1 != 0 && r1 <= t->g.capacity) {
        char *row = zt_row(t, r1 - 1);
        uint32_t s = __atomic_load_n(zt_seqp(row), __ATOMIC_ACQUIRE);
        if ((s & 1) && (intent >> 32) != ZT_W_SINGLE) {
            uint8_t st = zt_state(row);
            if (st == ZT_LIVE) __atomic_sub_fetch(&t->hdr->row_count, 1, __ATOMIC_RELAXED);
            if (st == ZT_LIVE || st == ZT_BUSY) {
                zt_set_state(row, ZT_DEAD);
                __atomic_add_fetch(&t->hdr->dead_rows, 1, __ATOMIC_RELAXED);
                __atomic_add_fetch(&t->hdr->rows_lost, 1, __ATOMIC_RELAXED);
            }
        }
        /* a single word was either stored or not: the row is whole, only the seq is odd */
        if (s & 1) __atomic_store_n(zt_seqp(row), s + 1, __ATOMIC_RELEASE);
    }
    __atomic_store_n(&slot->intent, 0, __ATOMIC_RELEASE);
}

/* The global lock's previous holder died mid insert/delete/clear.  Row states are the truth:
 * rebuild the index, the free list and the counts from them. */
static void zt_repair_global(zt_table *t) {
    zt_header *h = t->hdr;
    /* Take every stripe, in ascending order (the only multi-stripe holder, and it holds the
     * global lock: no deadlock; at most 1024 robust locks, under the kernel's 2048 limit).  A
     * stripe whose holder died is repaired by that acquisition; while we hold them all, no row
     * can change state under the rebuild, so the count it computes is exact.  A stripe held by a
     * live but stuck process times out and is skipped: nobody else can repair it meanwhile. */
    uint64_t held[ZT_MAX_STRIPES / 64] = {0};
    for (uint32_t s = 0; s <= t->stripe_mask; s++) {
        int rc = zt_timed_lock(t, &t->stripes[s]);
        if (rc == EOWNERDEAD) {
            zt_recover(t, &t->stripes[s], 0);
            rc = 0;
        }
        if (rc == 0) held[s >> 6] |= 1ULL << (s & 63);
    }
    __atomic_add_fetch(&h->index_seq, 1, __ATOMIC_ACQ_REL);
    for (uint64_t i = 0; i <= t->index_mask; i++) __atomic_store_n(&t->index[i], 0, __ATOMIC_RELAXED);
    uint32_t limit = h->next_unused > t->g.capacity ? t->g.capacity : h->next_unused;
    int64_t live = 0;
    uint32_t free_head = 0;
    for (uint32_t r = limit; r-- > 0;) {
        char *row = zt_row(t, r);
        uint8_t st = zt_state(row);
        if (st == ZT_LIVE && zt_keylen(row) <= t->g.key_limit) {
            zt_index_insert_locked(t, zt_row_hash(t, row), r);
            live++;
        } else {
            if (st == ZT_BUSY) __atomic_add_fetch(&h->rows_lost, 1, __ATOMIC_RELAXED);
            uint32_t s = __atomic_load_n(zt_seqp(row), __ATOMIC_RELAXED);
            if (s & 1) s++;
            __atomic_store_n(zt_seqp(row), s + 1, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_RELEASE);
            zt_set_state(row, ZT_FREE);
            memcpy(row + t->g.key_off, &free_head, 4);
            __atomic_store_n(zt_seqp(row), s + 2, __ATOMIC_RELEASE);
            free_head = r + 1;
        }
    }
    h->free_head = free_head;
    h->next_unused = limit;
    __atomic_store_n(&h->row_count, live, __ATOMIC_RELAXED);
    __atomic_store_n(&h->dead_rows, 0, __ATOMIC_RELAXED);
    __atomic_add_fetch(&h->index_seq, 1, __ATOMIC_ACQ_REL);
    for (uint32_t s = 0; s <= t->stripe_mask; s++)
        if (held[s >> 6] & (1ULL << (s & 63))) pthread_mutex_unlock(&t->stripes[s].m);
}

/* The row count.  A process killed inside an insert or a delete leaves the count off until the
 * global lock is taken again.  The kernel marks the futex word of a robust lock whose holder died
 * (FUTEX_OWNER_DIED; glibc's futex word is the mutex's first field): then take the lock now, so
 * its recovery recounts the rows before anyone reads a wrong count. */
_Static_assert(offsetof(pthread_mutex_t, __data.__lock) == 0, "glibc: the futex word comes first");
static int64_t zt_count(zt_table *t) {
    if (__atomic_load_n(&t->global->m.__data.__lock, __ATOMIC_RELAXED) & FUTEX_OWNER_DIED) {
        int rc = pthread_mutex_trylock(&t->global->m);
        if (rc == EOWNERDEAD) {
            PyThreadState *ts = PyEval_SaveThread(); /* the repair may wait for stripe locks */
            zt_recover(t, t->global, 1);
            PyEval_RestoreThread(ts);
        }
        if (rc == 0 || rc == EOWNERDEAD) zt_release(t->global);
    }
    return __atomic_load_n(&t->hdr->row_count, __ATOMIC_RELAXED);
}

/* ---------------------------------------------------------------------------------------- */
/* structural operations (global lock held)                                                  */

/* Remove row r, found at index slot `pos`, from the table (global and stripe lock held). */
static void zt_unlink_locked(zt_table *t, zt_lockslot *stripe, uint32_t r, uint64_t pos) {
    zt_header *h = t->hdr;
    char *row = zt_row(t, r);
    uint8_t st = zt_state(row);
    uint32_t s = zt_write_begin(stripe, row, r, ZT_W_SINGLE);
    zt_set_state(row, ZT_FREE);
    zt_write_end(stripe, row, s);
    ZT_CRASHPOINT(ZT_CP_DELETE_FREED);
    zt_index_remove_locked(t, pos);
    memcpy(row + t->g.key_off, &h->free_head, 4); /* a free row links the free list in its key */
    h->free_head = r + 1;
    if (st == ZT_LIVE) __atomic_sub_fetch(&h->row_count, 1, __ATOMIC_RELAXED);
    else if (st == ZT_DEAD) __atomic_sub_fetch(&h->dead_rows, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&h->deletes, 1, __ATOMIC_RELAXED);
}

/* The table is full: free the rows torn by dead writers and the expired rows.  Each is checked
 * again under its stripe lock (`held` is the stripe the caller already holds). */
static void zt_reclaim_locked(zt_table *t, zt_lockslot *held, PyThreadState **ts) {
    int64_t now = zt_now(t);
    for (uint32_t r = 0; r < t->hdr->next_unused; r++) {
        char *row = zt_row(t, r);
        uint8_t st = zt_state(row);
        if (st != ZT_DEAD && !(st == ZT_LIVE && zt_expired(t, row, now))) continue;
        uint64_t h = zt_row_hash(t, row); /* the key of a DEAD or LIVE row is whole */
        zt_lockslot *stripe = zt_stripe(t, h);
        if (stripe != held && zt_acquire(t, stripe, 0, ts) != ZT_OK) continue;
        st = zt_state(row);
        if (st == ZT_DEAD || (st == ZT_LIVE && zt_expired(t, row, now))) {
            uint64_t pos = h & t->index_mask;
            while (t->index[pos] != 0 && zt_slot_row(t->index[pos]) != r)
                pos = (pos + 1) & t->index_mask;
            if (t->index[pos] != 0) zt_unlink_locked(t, stripe, r, pos);
        }
        if (stripe != held) zt_release(stripe);
    }
}

static int64_t zt_alloc_row_locked(zt_table *t, zt_lockslot *held, PyThreadState **ts) {
    zt_header *h = t->hdr;
    if (h->free_head == 0 && h->next_unused >= t->g.capacity && (h->dead_rows > 0 || t->g.exp_off))
        zt_reclaim_locked(t, held, ts);
    if (h->free_head != 0) {
        uint32_t r = h->free_head - 1;
        uint32_t next;
        memcpy(&next, zt_row(t, r) + t->g.key_off, 4);
        h->free_head = next;
        return r;
    }
    if (h->next_unused < t->g.capacity) return h->next_unused++;
    return -1;
}

/* ---------------------------------------------------------------------------------------- */
/* public operations                                                                        */

/* Wait for the writer of row r to finish, or repair the row if that writer died: lock the stripe
 * whose intent names r (the row's key may be mid-write, so its stripe cannot be hashed). */
static int zt_settle_row(zt_table *t, uint32_t r, PyThreadState **ts) {
    for (uint32_t s = 0; s <= t->stripe_mask; s++) {
        uint64_t intent = __atomic_load_n(&t->stripes[s].intent, __ATOMIC_ACQUIRE);
        if ((uint32_t)(intent & 0xffffffffu) == r + 1) {
            int rc = zt_acquire(t, &t->stripes[s], 0, ts);
            if (rc) return rc;
            zt_release(&t->stripes[s]);
            return ZT_OK;
        }
    }
    return ZT_OK; /* nobody is writing it any more */
}

/* Take the global lock, then the stripe of `h` (the order every structural change uses). */
static int zt_lock_both(zt_table *t, zt_lockslot *stripe, PyThreadState **ts) {
    int rc = zt_acquire(t, t->global, 1, ts);
    if (rc) return rc;
    rc = zt_acquire(t, stripe, 0, ts);
    if (rc) zt_release(t->global);
    return rc;
}

/* Does column `c` of `row` hold the value of `d`? (compare_and_set's and delete_if's test) */
static int zt_col_equals(const char *row, const zt_col *c, const zt_delta *d) {
    if (c->type == ZT_INT) return zt_get_int(row, c) == d->i;
    if (c->type == ZT_FLOAT) return zt_get_float(row, c) == d->f;
    return zt_get_slen(row, c) == d->slen && memcmp(zt_get_sptr(row, c), d->s, d->slen) == 0;
}

/* delete: 1 deleted, 0 missing (or expired, or not matching), <0 error.  With `only_expired`,
 * the row is removed only when it is still expired now that its locks are held; with `expect`
 * (a column of `cols` and a value), only when that column still holds the value: a writer that
 * changed the row since the caller looked keeps it. */
static int zt_remove(zt_table *t, const char *key, uint16_t klen, int only_expired,
                     const zt_col *cols, const zt_delta *expect) {
    uint64_t h = zt_hash(t->hkey, key, klen);
    PyThreadState *ts = NULL;
    zt_lockslot *stripe = zt_stripe(t, h);
    int rc = zt_lock_both(t, stripe, &ts);
    if (rc) { zt_regain_gil(&ts); return rc; }
    int64_t pos = zt_find_slot_locked(t, key, klen, h);
    int deleted = 0;
    if (pos >= 0) {
        uint32_t r = zt_slot_row(t->index[pos]);
        char *row = zt_row(t, r);
        int expired = zt_expired(t, row, zt_now(t));
        int match = expect == NULL ||
                    (!expired && zt_state(row) == ZT_LIVE && zt_col_equals(row, &cols[expect->col], expect));
        if ((expired || !only_expired) && match) {
            deleted = zt_state(row) == ZT_LIVE && !expired;
            zt_unlink_locked(t, stripe, r, (uint64_t)pos);
        }
    }
    zt_release(stripe);
    zt_release(t->global);
    zt_regain_gil(&ts);
    return deleted;
}

/* Read `key` into `copy` (row_size bytes).  Returns 1 found, 0 missing, <0 error. */
static int zt_get(zt_table *t, const char *key, uint16_t klen, char *copy) {
    uint64_t h = zt_hash(t->hkey, key, klen);
    int busy, found = 0;
    uint32_t busy_row = 0;
    PyThreadState *ts = NULL;
    for (int round = 0; round < 4; round++) {
        if (zt_lookup(t, key, klen, h, copy, t->g.row_size, &busy, &busy_row) >= 0) {
            if (__builtin_expect(t->g.exp_off == 0, 1)) { zt_regain_gil(&ts); return 1; }
            found = 1;
            goto done;
        }
        if (!busy) goto done;
        __atomic_add_fetch(&t->hdr->read_fallbacks, 1, __ATOMIC_RELAXED);
        if (busy == ZT_BUSY_INDEX) break;
        /* Only that row's writer is in the way: wait for it (bounded by the lock timeout), never
         * for the whole table. */
        int rc = zt_settle_row(t, busy_row, &ts);
        if (rc) { zt_regain_gil(&ts); return rc; }
    }
    /* The index kept moving under us: read it while structural changes are held off. */
    zt_lockslot *stripe = zt_stripe(t, h);
    int rc = zt_lock_both(t, stripe, &ts);
    if (rc) { zt_regain_gil(&ts); return rc; }
    int64_t pos = zt_find_slot_locked(t, key, klen, h);
    if (pos >= 0) {
        const char *row = zt_row(t, zt_slot_row(t->index[pos]));
        if (zt_state(row) == ZT_LIVE) { memcpy(copy, row, t->g.row_size); found = 1; }
    }
    zt_release(stripe);
    zt_release(t->global);
done:
    zt_regain_gil(&ts);
    if (found && zt_expired(t, copy, zt_now(t))) {
        zt_remove(t, key, klen, 1, NULL, NULL); /* a miss either way: a lock timeout here changes nothing */
        return 0;
    }
    return found;
}

static inline uint64_t zt_kind_of(const zt_col *cols, const zt_delta *d, int nd) {
    return nd == 1 && (cols[d[0].col].type == ZT_INT || cols[d[0].col].type == ZT_FLOAT)
               ? ZT_W_SINGLE
               : ZT_W_MULTI;
}

/* One write section on row r (its stripe lock held): the deltas applied and the expiry renewed.
 * With `fresh` the row starts again (a revived or expired row): its columns are zeroed first and
 * it is LIVE at the end. */
static inline __attribute__((always_inline)) void zt_write(
    zt_table *t, zt_lockslot *stripe, uint32_t r, const zt_col *cols, const zt_delta *d, int nd,
    int fresh) {
    char *row = zt_row(t, r);
    uint32_t s = zt_write_begin(stripe, row, r, fresh ? ZT_W_MULTI : zt_kind_of(cols, d, nd));
    if (fresh) zt_zero_columns(t, row);
    else ZT_CRASHPOINT(ZT_CP_UPDATE_AFTER_ODD);
    zt_apply(row, cols, d, nd);
    zt_touch(t, row);
    if (fresh) zt_set_state(row, ZT_LIVE);
    zt_write_end(stripe, row, s);
}

/* Insert or revive the row of `key` under the global lock, with the deltas `d` already applied,
 * so that readers see no row or the complete new row and never a zeroed intermediate one.
 * Returns the row (the stripe lock stays held) with *created = 1, or the existing live row with
 * *created = 0 (deltas not applied), or <0. */
static int64_t zt_upsert_locked(zt_table *t, const char *key, uint16_t klen, uint64_t h,
                                zt_lockslot *stripe, const zt_col *cols, const zt_delta *d, int nd,
                                int *created, PyThreadState **ts) {
    int64_t pos = zt_find_slot_locked(t, key, klen, h);
    *created = 1;
    if (pos >= 0) {
        uint32_t r = zt_slot_row(t->index[pos]);
        char *row = zt_row(t, r);
        if (zt_state(row) == ZT_LIVE) { *created = 0; return r; }
        /* DEAD row of this key (torn by a dead writer): revive it, zeroed, with the deltas */
        zt_write(t, stripe, r, cols, d, nd, 1);
        __atomic_sub_fetch(&t->hdr->dead_rows, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&t->hdr->row_count, 1, __ATOMIC_RELAXED);
        return r;
    }
    int64_t rr = zt_alloc_row_locked(t, stripe, ts);
    if (rr < 0) return ZT_EFULL;
    uint32_t r = (uint32_t)rr;
    char *row = zt_row(t, r);
    uint32_t s = zt_write_begin(stripe, row, r, ZT_W_MULTI);
    zt_set_state(row, ZT_BUSY);
    memset(row + ZT_ROW_HDR, 0, t->g.row_size - ZT_ROW_HDR);
    memcpy(row + 6, &klen, 2);
    memcpy(row + t->g.key_off, key, klen);
    ZT_CRASHPOINT(ZT_CP_INSERT_BUSY);
    zt_apply(row, cols, d, nd);
    zt_touch(t, row);
    zt_set_state(row, ZT_LIVE);
    zt_write_end(stripe, row, s);
    ZT_CRASHPOINT(ZT_CP_INSERT_UNPUBLISHED);
    zt_index_insert_locked(t, h, r);
    __atomic_add_fetch(&t->hdr->row_count, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&t->hdr->inserts, 1, __ATOMIC_RELAXED);
    return r;
}

/* Lock the key's stripe and find its row; when missing and `create`, insert it with the deltas
 * `d` applied (see zt_upsert_locked), *created = 1.  An expired row is a missing row: with
 * `create` it is rewritten in place as a new one (zeroed, the deltas, a fresh expiry) in the same
 * locked step.  On success the stripe lock is held (the global lock is not); ZT_NOTFOUND when
 * missing and not creating; *ts may hold a released GIL state. */
static int64_t zt_locate(zt_table *t, const char *key, uint16_t klen, uint64_t h, int create,
                         const zt_col *cols, const zt_delta *d, int nd, zt_lockslot **stripe_out,
                         PyThreadState **ts, int *created) {
    zt_lockslot *stripe = zt_stripe(t, h);
    *stripe_out = stripe;
    *created = 0;
    int rc = zt_acquire(t, stripe, 0, ts);
    if (rc) return rc;
    int64_t r = zt_find_row_striped(t, key, klen, h);
    if (r < 0) {
        zt_release(stripe);
        rc = zt_lock_both(t, stripe, ts);
        if (rc) return rc;
        if (create) {
            r = zt_upsert_locked(t, key, klen, h, stripe, cols, d, nd, created, ts);
        } else {
            int64_t pos = zt_find_slot_locked(t, key, klen, h);
            r = ZT_NOTFOUND;
            if (pos >= 0 && zt_state(zt_row(t, zt_slot_row(t->index[pos]))) == ZT_LIVE)
                r = zt_slot_row(t->index[pos]);
        }
        zt_release(t->global);
        if (r < 0 || *created) {
            if (r < 0) zt_release(stripe);
            return r;
        }
    }
    if (__builtin_expect(t->g.exp_off != 0, 0) && zt_expired(t, zt_row(t, r), zt_now(t))) {
        if (!create) { zt_release(stripe); return ZT_NOTFOUND; }
        zt_write(t, stripe, (uint32_t)r, cols, d, nd, 1);
        *created = 1;
    }
    return r;
}

/* set(): merge the deltas into the row, creating it (zeroed + deltas) when missing. */
static int zt_set(zt_table *t, const char *key, uint16_t klen, const zt_col *cols,
                  const zt_delta *d, int nd) {
    uint64_t h = zt_hash(t->hkey, key, klen);
    PyThreadState *ts = NULL;
    zt_lockslot *stripe;
    int created;
    int64_t r = zt_locate(t, key, klen, h, 1, cols, d, nd, &stripe, &ts, &created);
    if (r < 0) { zt_regain_gil(&ts); return (int)r; }
    if (!created) zt_write(t, stripe, (uint32_t)r, cols, d, nd, 0);
    zt_release(stripe);
    zt_regain_gil(&ts);
    return ZT_OK;
}

/* incr of a numeric column by d->i (INT: is_int) or d->f (FLOAT); the new value in *out_i /
 * *out_f.  Overflow (or a non-finite FLOAT result, unless allowed) leaves the row, or its absence,
 * unchanged and reports the current value.  Inlined where called: each caller passes a constant
 * is_int, so the INT path carries no FLOAT code. */
static inline __attribute__((always_inline)) int zt_incr(
    zt_table *t, const char *key, uint16_t klen, const zt_col *cols, const zt_delta *d,
    int is_int, int allow_nonfinite, int64_t *out_i, double *out_f) {
    const zt_col *c = &cols[d->col];
    uint64_t h = zt_hash(t->hkey, key, klen);
    PyThreadState *ts = NULL;
    zt_lockslot *stripe;
    int created, rc = ZT_OK;
    /* a new row holds 0 + by: refuse before creating anything if that already overflows (a
     * FLOAT step is finite here; 0.0 + by is the sum, not the step: 0.0 + -0.0 is +0.0) */
    zt_delta nd = {d->col, d->i, 0.0 + d->f, NULL, 0};
    int64_t r = zt_locate(t, key, klen, h, 0, cols, &nd, 1, &stripe, &ts, &created);
    if (r == ZT_NOTFOUND) {
        if (is_int && !zt_int_fits(c->width, d->i)) { *out_i = 0; zt_regain_gil(&ts); return ZT_EOVERFLOW; }
        r = zt_locate(t, key, klen, h, 1, cols, &nd, 1, &stripe, &ts, &created);
    }
    if (r < 0) { zt_regain_gil(&ts); return (int)r; }
    char *row = zt_row(t, (uint32_t)r);
    if (created) {
        *out_i = nd.i;
        *out_f = nd.f;
    } else if (is_int) {
        int64_t cur = zt_get_int(row, c);
        if (__builtin_add_overflow(cur, d->i, out_i) || !zt_int_fits(c->width, *out_i)) {
            rc = ZT_EOVERFLOW;
            *out_i = cur;
        }
    } else {
        *out_f = zt_get_float(row, c) + d->f;
        if (!allow_nonfinite && !isfinite(*out_f)) {
            rc = ZT_ENONFINITE;
            *out_f = zt_get_float(row, c);
        }
    }
    if (!created && rc == ZT_OK) {
        uint32_t s = zt_write_begin(stripe, row, (uint32_t)r, ZT_W_SINGLE);
        ZT_CRASHPOINT(ZT_CP_INCR_AFTER_ODD);
        if (is_int) zt_put_int(row, c, *out_i);
        else zt_put_float(row, c, *out_f);
        zt_touch(t, row);
        zt_write_end(stripe, row, s);
    }
    zt_release(stripe);
    zt_regain_gil(&ts);
    return rc;
}

/* compare_and_set on one column; a missing row compares as the zero row (0, 0.0, "") and is
 * created, with the new value, only when that comparison succeeds.  *swapped = 1 when written. */
static int zt_cas(zt_table *t, const char *key, uint16_t klen, const zt_col *cols,
                  const zt_delta *expected, const zt_delta *desired, int *swapped) {
    uint64_t h = zt_hash(t->hkey, key, klen);
    PyThreadState *ts = NULL;
    zt_lockslot *stripe;
    int created;
    *swapped = 0;
    const zt_col *c = &cols[expected->col];
    int zero_match;
    if (c->type == ZT_INT) zero_match = expected->i == 0;
    else if (c->type == ZT_FLOAT) zero_match = expected->f == 0.0;
    else zero_match = expected->slen == 0;
    int64_t r = zt_locate(t, key, klen, h, zero_match, cols, desired, 1, &stripe, &ts, &created);
    /* ZT_NOTFOUND: missing, and the zero row does not match (nothing written) */
    if (r < 0) { zt_regain_gil(&ts); return r == ZT_NOTFOUND ? ZT_OK : (int)r; }
    if (created) {
        *swapped = 1;
    } else if (zt_col_equals(zt_row(t, (uint32_t)r), c, expected)) {
        zt_write(t, stripe, (uint32_t)r, cols, desired, 1, 0);
        *swapped = 1;
    }
    zt_release(stripe);
    zt_regain_gil(&ts);
    return ZT_OK;
}

/* clear: every row freed.  Stripes are taken one at a time (never all at once: the kernel walks
 * at most 2048 robust locks of a dying thread). */
static int zt_clear(zt_table *t) {
    PyThreadState *ts = NULL;
    int rc = zt_acquire(t, t->global, 1, &ts);
    if (rc) { zt_regain_gil(&ts); return rc; }
    zt_header *h = t->hdr;
    __atomic_add_fetch(&h->index_seq, 1, __ATOMIC_ACQ_REL);
    for (uint32_t r = 0; r < h->next_unused; r++) {
        char *row = zt_row(t, r);
        if (zt_state(row) == ZT_FREE) continue;
        zt_lockslot *stripe = zt_stripe(t, zt_row_hash(t, row));
        rc = zt_acquire(t, stripe, 0, &ts);
        if (rc) break;
        uint32_t s = zt_write_begin(stripe, row, r, ZT_W_SINGLE);
        zt_set_state(row, ZT_FREE);
        zt_write_end(stripe, row, s);
        zt_release(stripe);
    }
    if (rc == ZT_OK) {
        for (uint64_t i = 0; i <= t->index_mask; i++)
            __atomic_store_n(&t->index[i], 0, __ATOMIC_RELAXED);
        h->free_head = 0;
        h->next_unused = 0;
        __atomic_store_n(&h->row_count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&h->dead_rows, 0, __ATOMIC_RELAXED);
    } else {
        /* Some rows were freed but the index still points at them: rebuild from row states. */
        zt_repair_global(t);
    }
    __atomic_add_fetch(&h->index_seq, 1, __ATOMIC_ACQ_REL);
    zt_release(t->global);
    zt_regain_gil(&ts);
    return rc;
}

/* Iteration step: consistent copy of row r if it is LIVE (and not expired).  1 live, 0 not,
 * ZT_EBUSYREAD when a writer stayed mid-row for the whole spin budget (the caller settles it and
 * retries). */
static int zt_read_at(zt_table *t, uint32_t r, char *copy) {
    for (int s = 0; s < ZT_READ_SPINS; s++) {
        if (zt_copy_prefix(t, r, copy, t->g.row_size))
            return copy[4] == ZT_LIVE && zt_keylen(copy) <= t->g.key_limit &&
                   !zt_expired(t, copy, zt_now(t));
        zt_cpu_relax();
    }
    return ZT_EBUSYREAD;
}

/* Settle row r (wait for its writer, or repair the row if that writer died), then copy it. */
static int zt_read_at_locked(zt_table *t, uint32_t r, char *copy) {
    PyThreadState *ts = NULL;
    int rc = zt_settle_row(t, r, &ts);
    zt_regain_gil(&ts);
    if (rc) return rc;
    return zt_read_at(t, r, copy);
}

/* ---------------------------------------------------------------------------------------- */
/* initialisation and attach                                                                */

static void zt_bind(zt_table *t, char *base) {
    zt_header *h = (zt_header *)base;
    t->base = base;
    t->hdr = h;
    t->g = h->g;
    t->global = (zt_lockslot *)(base + h->g.off_global);
    t->stripes = (zt_lockslot *)(base + h->g.off_stripes);
    t->index = (uint64_t *)(base + h->g.off_index);
    t->rows = base + h->g.off_rows;
    t->index_mask = h->g.index_slots - 1;
    t->stripe_mask = h->g.n_stripes - 1;
    memcpy(t->hkey, h->hash_key, sizeof t->hkey);
    t->local_recoveries = 0;
}

/* Initialise a zero-filled mapping; 0 or an errno.  The magic is stored last with release
 * semantics: an attacher that sees it sees a fully initialised segment. */
static int zt_init(zt_table *t, char *base, const zt_geometry *g, const char *schema,
                   uint32_t schema_len) {
    zt_header *h = (zt_header *)base;
    if (schema_len > ZT_SCHEMA_MAX || g->n_stripes > ZT_MAX_STRIPES) return EINVAL;
    int rc = zt_ident_init(&h->id, g->total_size);
    if (rc || (rc = zt_random(h->hash_key, sizeof h->hash_key))) return rc;
    h->g = *g;
    h->schema_len = schema_len;
    h->created_ns = (uint64_t)zt_now_ns(CLOCK_REALTIME);
    memcpy(h->schema, schema, schema_len);
    h->checksum = zt_checksum(&h->id, &h->checksum);
    zt_bind(t, base);
    rc = zt_mutex_init(&t->global->m);
    for (uint32_t s = 0; rc == 0 && s < g->n_stripes; s++) rc = zt_mutex_init(&t->stripes[s].m);
    if (rc) return rc;
    __atomic_store_n(&h->id.magic, ZT_MAGIC_TABLE, __ATOMIC_RELEASE);
    return 0;
}

/* Validate a mapping made by someone else (see zt_ident_check for the codes). */
static int zt_check(const char *base, size_t size) {
    const zt_header *h = (const zt_header *)base;
    if (size < ZT_HEADER_SIZE) return 1;
    int rc = zt_ident_check(&h->id, size, ZT_MAGIC_TABLE, h->checksum, &h->checksum);
    if (rc == 0 && h->g.n_stripes > ZT_MAX_STRIPES) return 3;
    return rc;
}

/* ---------------------------------------------------------------------------------------- */
/* Atomic: a lock-free int64 on its own cache line                                           */

typedef struct {
    zt_ident id;
    uint64_t checksum;
    __attribute__((aligned(64))) int64_t value;
} zt_atomic_seg;

_Static_assert(offsetof(zt_atomic_seg, value) % 64 == 0, "the counter owns its cache line");

static inline int64_t zt_a_load(int64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void zt_a_store(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
/* 0 and the new value in *out, or -1 on signed overflow with the counter unchanged */
static inline int zt_a_add(int64_t *p, int64_t d, int64_t *out) {
    int64_t old = __atomic_load_n(p, __ATOMIC_RELAXED), nw;
    do {
        if (__builtin_add_overflow(old, d, &nw)) { *out = old; return -1; }
    } while (!__atomic_compare_exchange_n(p, &old, nw, 1, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    *out = nw;
    return 0;
}
static inline int zt_a_cas(int64_t *p, int64_t expect, int64_t desired) {
    return __atomic_compare_exchange_n(p, &expect, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
}

static int zt_atomic_init(zt_atomic_seg *a, size_t size, int64_t v) {
    int rc = zt_ident_init(&a->id, size);
    if (rc) return rc;
    a->checksum = zt_checksum(&a->id, &a->checksum);
    __atomic_store_n(&a->value, v, __ATOMIC_RELAXED);
    __atomic_store_n(&a->id.magic, ZT_MAGIC_ATOMIC, __ATOMIC_RELEASE);
    return 0;
}

static int zt_atomic_check(const zt_atomic_seg *a, size_t size) {
    if (size < sizeof(zt_atomic_seg)) return 1;
    return zt_ident_check(&a->id, size, ZT_MAGIC_ATOMIC, a->checksum, &a->checksum);
}


/* ---- bounded increment (appended: rate limiting and other quotas) -------------------------- */

/* The value `nd` that an add of `by` to `cur` (cur->i or cur->f, as column `c` is INT or FLOAT)
 * gives, a value below `floor_` first replaced by `reset_`: 1 when it stays <= `bound`, 0 when
 * not, ZT_EOVERFLOW / ZT_ENONFINITE when it would not fit the column. */
static int zt_bounded_next(const zt_col *c, const zt_delta *cur, const zt_delta *by,
                           const zt_delta *bound, const zt_delta *floor_, const zt_delta *reset_,
                           int allow_nonfinite, zt_delta *nd) {
    if (c->type == ZT_INT) {
        int64_t base = floor_ != NULL && floor_->i > cur->i ? reset_->i : cur->i;
        if (__builtin_add_overflow(base, by->i, &nd->i) || !zt_int_fits(c->width, nd->i))
            return ZT_EOVERFLOW;
        return nd->i <= bound->i;
    }
    nd->f = (floor_ != NULL && floor_->f > cur->f ? reset_->f : cur->f) + by->f;
    if (!allow_nonfinite && !isfinite(nd->f)) return ZT_ENONFINITE;
    return nd->f <= bound->f;
}

/* Add `by` to a numeric column only when the result stays <= `bound`, in one locked step.  With
 * `floor_`, a value below it is first replaced by `reset_` (by the floor itself when `reset_` is
 * NULL): a stale deadline counts as now, an ended window starts again.  A missing row counts as
 * zero and is created only when the add applies.  *applied = 1 and *out_* the new value when
 * written; else *applied = 0 and *out_* the value as it is (0: no row).  ZT_EOVERFLOW /
 * ZT_ENONFINITE when the result would not fit the column (nothing written). */
static int zt_incr_bounded(zt_table *t, const char *key, uint16_t klen, const zt_col *cols, int ci,
                           const zt_delta *by, const zt_delta *bound, const zt_delta *floor_,
                           const zt_delta *reset_, int allow_nonfinite, int64_t *out_i,
                           double *out_f, int *applied) {
    const zt_col *c = &cols[ci];
    uint64_t h = zt_hash(t->hkey, key, klen);
    PyThreadState *ts = NULL;
    zt_lockslot *stripe;
    int created;
    zt_delta cur = {ci, 0, 0.0, NULL, 0}, nd = cur;
    *applied = 0;
    *out_i = 0;
    *out_f = 0.0;
    if (reset_ == NULL) reset_ = floor_;
    /* the value a missing (zero) row would get; refuse before creating anything */
    int rc = zt_bounded_next(c, &cur, by, bound, floor_, reset_, allow_nonfinite, &nd);
    if (rc < 0) return rc;
    /* ZT_NOTFOUND: missing, and the add would pass the bound (nothing written) */
    int64_t r = zt_locate(t, key, klen, h, rc, cols, &nd, 1, &stripe, &ts, &created);
    if (r < 0) { zt_regain_gil(&ts); return r == ZT_NOTFOUND ? ZT_OK : (int)r; }
    if (!created) {
        char *row = zt_row(t, (uint32_t)r);
        if (c->type == ZT_INT) cur.i = zt_get_int(row, c);
        else cur.f = zt_get_float(row, c);
        rc = zt_bounded_next(c, &cur, by, bound, floor_, reset_, allow_nonfinite, &nd);
        if (rc == 1) zt_write(t, stripe, (uint32_t)r, cols, &nd, 1, 0);
    }
    /* applied: the new value (a created row was applied); else the value as it is */
    *applied = rc == 1;
    *out_i = rc == 1 ? nd.i : cur.i;
    *out_f = rc == 1 ? nd.f : cur.f;
    zt_release(stripe);
    zt_regain_gil(&ts);
    return rc < 0 ? rc : ZT_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Cells: FLOAT columns of rows located once, then updated in place with lock-free atomics.   */
/*
 * A cell is the 8-byte FLOAT column of a live row, addressed directly: an update is one atomic
 * instruction on the double's bits (a CAS loop for add), so it takes no lock, cannot tear, and a
 * process killed at any point leaves every cell whole.  Two rules keep that sound, and the caller
 * owns them: rows written through cells are never written through the locked path as well (its
 * read-modify-write would race with the CAS), and are never deleted while another process may
 * hold their cells (a freed row is reused for another key), so their table has no ttl.  Readers
 * copy rows word by word with atomic loads (zt_copy_prefix), so every cell they see holds a value
 * some writer stored.
 */

/* The row of `key` (created zeroed when missing) in *row; ZT_EFULL, ZT_ETIMEDOUT, ZT_ELOCK. */
static int zt_row_ref(zt_table *t, const char *key, uint16_t klen, const zt_col *cols, char **row) {
    uint64_t h = zt_hash(t->hkey, key, klen);
    PyThreadState *ts = NULL;
    zt_lockslot *stripe;
    int created;
    int64_t r = zt_locate(t, key, klen, h, 1, cols, NULL, 0, &stripe, &ts, &created);
    if (r >= 0) {
        *row = zt_row(t, (uint32_t)r);
        zt_release(stripe);
    }
    zt_regain_gil(&ts);
    return r < 0 ? (int)r : ZT_OK;
}

static inline double zt_cell_get(const uint64_t *p) {
    uint64_t b = __atomic_load_n(p, __ATOMIC_RELAXED);
    double v;
    memcpy(&v, &b, 8);
    return v;
}

static inline void zt_cell_set(uint64_t *p, double v) {
    uint64_t b;
    memcpy(&b, &v, 8);
    __atomic_store_n(p, b, __ATOMIC_RELAXED);
}

/* *p += by; ZT_ENONFINITE, with the cell unchanged, when the sum is not finite (NaN or inf). */
static inline int zt_cell_add(uint64_t *p, double by) {
    uint64_t old = __atomic_load_n(p, __ATOMIC_RELAXED), nw;
    double cur, sum;
    do {
        memcpy(&cur, &old, 8);
        sum = cur + by;
        if (!isfinite(sum)) return ZT_ENONFINITE;
        memcpy(&nw, &sum, 8);
    } while (!__atomic_compare_exchange_n(p, &old, nw, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return ZT_OK;
}

/* A histogram's observation: cells[i] += 1 for the first bound >= v (bounds ascend, the last is
 * +inf), and cells[n] += v.  The sum goes first: a refused (non-finite) sum counts nothing. */
static inline int zt_cell_observe(uint64_t *const *cells, const double *bounds, int n, double v) {
    int rc = zt_cell_add(cells[n], v);
    if (rc) return rc;
    int i = 0;
    while (i < n - 1 && v > bounds[i]) i++;
    return zt_cell_add(cells[i], 1.0);
}

/* ---------------------------------------------------------------------------------------- */
/* leases (appended: zeal_asgi.shm.lease and the host locks)                                */

/* A lease word is (deadline ms of CLOCK_MONOTONIC << 22) | holder tag (a pid): positive. */
#define ZT_LEASE_TAG_BITS 22
#define ZT_LEASE_TAG_MASK ((1LL << ZT_LEASE_TAG_BITS) - 1)
#define ZT_LEASE_BUSY_OWNER (-1) /* a holder whose deadline has not passed has the lease */
#define ZT_LEASE_BUSY_TURN (-2)  /* another process waits for its turn to take it */

static inline int64_t zt_lease_word(int64_t deadline_ms, int64_t tag) {
    return ((deadline_ms > 1 ? deadline_ms : 1) << ZT_LEASE_TAG_BITS) | (tag & ZT_LEASE_TAG_MASK);
}

/* One word of the row in its own write section: a writer killed between two such writes
 * leaves every column whole (a multi-column section would make the row DEAD, its fence lost). */
static inline void zt_lease_put(zt_table *t, zt_lockslot *stripe, uint32_t r, const zt_col *cols,
                                int col, int64_t v) {
    zt_delta d = {col, v, 0.0, NULL, 0};
    zt_write(t, stripe, r, cols, &d, 1, 0);
}

/* Take the lease in INT(8) column `oc` of `key` for `ms` as `tag`, in one locked step.  Free:
 * the word is 0, its deadline has passed, or it equals `stale` (a word whose holder the caller
 * found dead).  With a turn column `tc` (>= 0), a live turn of another process (not
 * `stale_turn`) keeps the lease for that process: *out_fence = ZT_LEASE_BUSY_TURN, *out_word =
 * the turn.  When a holder has it: *out_fence = ZT_LEASE_BUSY_OWNER, *out_word = its word, and
 * with `tc` this process takes the turn for `turn_ms`.  Taken: *out_word = the word written,
 * *out_fence = the fence column `fc` plus one (0 without `fc`), and a turn of ours is cleared.
 * A missing row is a free lease (the row is created); its fence starts at CLOCK_REALTIME in us
 * (at least 1), so tokens keep rising across server runs, whose tables start empty (the cluster
 * scope floors at Redis's clock alike).  ZT_EOVERFLOW if the fence is at its limit (nothing
 * written). */
static int zt_lease_acquire(zt_table *t, const char *key, uint16_t klen, const zt_col *cols,
                            int oc, int64_t ms, int64_t tag, int64_t stale, int fc, int tc,
                            int64_t turn_ms, int64_t stale_turn, int64_t *out_word,
                            int64_t *out_fence) {
    uint64_t h = zt_hash(t->hkey, key, klen);
    int64_t now = zt_now_ns(CLOCK_MONOTONIC) / 1000000;
    int64_t word = zt_lease_word(now + ms, tag);
    PyThreadState *ts = NULL;
    zt_lockslot *stripe;
    int created, rc = ZT_OK;
    zt_delta d[2] = {{oc, word, 0.0, NULL, 0}, {fc, 1, 0.0, NULL, 0}};
    int64_t r = zt_locate(t, key, klen, h, 1, cols, d, fc >= 0 ? 2 : 1, &stripe, &ts, &created);
    if (r < 0) { zt_regain_gil(&ts); return (int)r; }
    *out_word = word;
    *out_fence = fc >= 0 ? 1 : 0;
    if (created && fc >= 0) {
        /* The clock only here: a row lives as long as its server run, and each take after the
         * first adds one (no clock read on the path of every lock). */
        int64_t us = zt_now_ns(CLOCK_REALTIME) / 1000;
        if (us > 1) {
            *out_fence = us;
            zt_lease_put(t, stripe, (uint32_t)r, cols, fc, us);
        }
    } else if (!created) {
        char *row = zt_row(t, (uint32_t)r);
        int64_t owner = zt_get_int(row, &cols[oc]);
        int64_t turn = tc >= 0 ? zt_get_int(row, &cols[tc]) : 0;
        if (turn != 0 && (turn & ZT_LEASE_TAG_MASK) != tag && (turn >> ZT_LEASE_TAG_BITS) >= now &&
            turn != stale_turn) {
            *out_fence = ZT_LEASE_BUSY_TURN;
            *out_word = turn;
        } else if (owner != 0 && (owner >> ZT_LEASE_TAG_BITS) >= now && owner != stale) {
            *out_fence = ZT_LEASE_BUSY_OWNER;
            *out_word = owner;
            if (tc >= 0 && turn_ms > 0)
                zt_lease_put(t, stripe, (uint32_t)r, cols, tc, zt_lease_word(now + turn_ms, tag));
        } else if (fc >= 0 && __builtin_add_overflow(zt_get_int(row, &cols[fc]), 1, out_fence)) {
            rc = ZT_EOVERFLOW;
        } else {
            zt_lease_put(t, stripe, (uint32_t)r, cols, oc, word);
            if (fc >= 0) zt_lease_put(t, stripe, (uint32_t)r, cols, fc, *out_fence);
            if (turn != 0) zt_lease_put(t, stripe, (uint32_t)r, cols, tc, 0);
        }
    }
    zt_release(stripe);
    zt_regain_gil(&ts);
    return rc;
}

#endif /* ZT_CORE_H */
