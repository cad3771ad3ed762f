/* A fake "real driver" for cuda-trace's tests: a few driver functions (one with eleven
 * arguments, two that call user callbacks, one of them from another thread),
 * cuGetProcAddress(_v2) with a _ptsz variant and a hidden function, and cuGetExportTable with
 * two tables: {0A..} begins with its size in bytes and holds three functions of seven and
 * more arguments and one data slot; {0B..} has no size and three functions, then data.
 * Every function checks its arguments and returns a distinct value.
 * Linked with -Bsymbolic so that its own function addresses are its own, not the tracer's. */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

typedef int CUresult;
typedef struct { unsigned char bytes[16]; } CUuuid;

#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_NOT_FOUND 500
#define CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM 2

CUresult cuInit(unsigned flags) { return flags == 0 ? 0 : 101; }

CUresult cuDriverGetVersion(int *version) {
    if (!version) return CUDA_ERROR_INVALID_VALUE;
    *version = 13000;
    return 0;
}

/* Eleven arguments, five of them on the stack: 0 when each is what the test passes, else
 * 1000 + the position of the first wrong one. */
CUresult cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shmem, void *stream, void **params, void **extra) {
    if (f != (void *)0xf00d) return 1000;
    if (gx != 1 || gy != 2 || gz != 3) return 1001;
    if (bx != 4 || by != 5 || bz != 6) return 1004;
    if (shmem != 7) return 1007;
    if (stream != (void *)0x5eed) return 1008;
    if (params != (void **)0x9a9a) return 1009;
    if (extra != (void **)0xe0e0) return 1010;
    return 0;
}

CUresult cuMemcpyAsync(uint64_t dst, uint64_t src, size_t n, void *stream) {
    return dst == 1 && src == 2 && n == 3 && stream == 0 ? 0 : 1;
}

/* The per-thread-default-stream variant, chosen by the flag; its own result tells it apart. */
CUresult cuMemcpyAsync_ptsz(uint64_t dst, uint64_t src, size_t n, void *stream) {
    return dst == 1 && src == 2 && n == 3 && stream == 0 ? 42 : 1;
}

/* Calls the callback on the calling thread. */
CUresult cuLaunchHostFunc(void *stream, void (*fn)(void *), void *user) {
    if (stream != (void *)0x5eed || !fn) return CUDA_ERROR_INVALID_VALUE;
    fn(user);
    return 0;
}

struct callback_call {
    void (*cb)(void *, CUresult, void *);
    void *stream;
    void *user;
};

static void *run_callback(void *arg) {
    struct callback_call *c = arg;
    c->cb(c->stream, 0, c->user);
    return NULL;
}

/* Calls the callback on a new thread and waits for it. */
CUresult cuStreamAddCallback(void *stream, void (*cb)(void *, CUresult, void *), void *user,
                             unsigned flags) {
    struct callback_call c = {cb, stream, user};
    pthread_t t;
    if (!cb || pthread_create(&t, NULL, run_callback, &c) != 0) return CUDA_ERROR_INVALID_VALUE;
    pthread_join(t, NULL);
    return flags == 0 ? 0 : 2;
}

/* ---- export table {0A..}: size field, functions of 7, 8 and 9 arguments, data ---- */

static int64_t slot_a1(int64_t a, int64_t b, int64_t c, int64_t d, int64_t e, int64_t f,
                       int64_t g) {
    return a == 1 && b == 2 && c == 3 && d == 4 && e == 5 && f == 6 && g == 7 ? 0x1a1 : -1;
}

static int64_t slot_a2(int64_t a, int64_t b, int64_t c, int64_t d, int64_t e, int64_t f,
                       int64_t g, int64_t h) {
    return a == 10 && b == 11 && c == 12 && d == 13 && e == 14 && f == 15 && g == 16 && h == 17
               ? 0x1a2
               : -2;
}

/* Integer and floating-point arguments mixed: the vector registers must arrive too. */
static int64_t slot_a3(int64_t a, double x, int64_t b, double y, int64_t c, int64_t d,
                       int64_t e, int64_t f, int64_t g) {
    return a == 21 && x == 1.5 && b == 22 && y == -2.25 && c == 23 && d == 24 && e == 25 &&
                   f == 26 && g == 27
               ? 0x1a3
               : -3;
}

static int table_data = 5;

static const void *table_a[] = {(const void *)(5 * sizeof(void *)), (const void *)slot_a1,
                                 (const void *)slot_a2, (const void *)slot_a3, &table_data};

/* ---- export table {0B..}: no size; three functions, then a data word ---- */

static int64_t slot_b0(void) { return 0xb0; }

struct thread_call {
    void (*fn)(void *);
    void *user;
};

static void *run_thread_call(void *arg) {
    struct thread_call *c = arg;
    c->fn(c->user);
    return NULL;
}

/* Calls fn(user) on another thread and waits for it. */
static int64_t slot_b1(void (*fn)(void *), void *user) {
    struct thread_call c = {fn, user};
    pthread_t t;
    if (pthread_create(&t, NULL, run_thread_call, &c) != 0) return -4;
    pthread_join(t, NULL);
    return 0xb1;
}

/* Calls fn(user) on this thread. */
static int64_t slot_b2(void (*fn)(void *), void *user) {
    fn(user);
    return 0xb2;
}

static const void *table_b[] = {(const void *)slot_b0, (const void *)slot_b1,
                                 (const void *)slot_b2, (const void *)0x123456789};

CUresult cuGetExportTable(const void **table, const CUuuid *id) {
    if (!table || !id) return CUDA_ERROR_INVALID_VALUE;
    switch (id->bytes[0]) {
    case 0x0a: *table = table_a; return 0;
    case 0x0b: *table = table_b; return 0;
    default: return CUDA_ERROR_NOT_FOUND;
    }
}

/* Not exported: reachable only through cuGetProcAddress, so it has no symbol of its own. */
__attribute__((visibility("hidden"))) int64_t fake_hidden(int64_t a, int64_t b, int64_t c,
                                                          int64_t d, int64_t e, int64_t f,
                                                          int64_t g, int64_t h) {
    return a + b + c + d + e + f + g + h == 36 && h == 8 ? 0x8a : -5;
}

CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, uint64_t flags);

CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, uint64_t flags,
                             int *status);

static CUresult lookup(const char *symbol, void **pfn, int version, uint64_t flags, int *status) {
    void *p = NULL;
    if (!symbol || !pfn) return CUDA_ERROR_INVALID_VALUE;
    if (!strcmp(symbol, "cuInit")) p = (void *)cuInit;
    else if (!strcmp(symbol, "cuLaunchKernel")) p = (void *)cuLaunchKernel;
    else if (!strcmp(symbol, "cuMemcpyAsync"))
        p = (flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) ? (void *)cuMemcpyAsync_ptsz
                                                                    : (void *)cuMemcpyAsync;
    else if (!strcmp(symbol, "cuGetExportTable")) p = (void *)cuGetExportTable;
    else if (!strcmp(symbol, "cuGetProcAddress"))
        p = version >= 12000 ? (void *)cuGetProcAddress_v2 : (void *)cuGetProcAddress;
    else if (!strcmp(symbol, "cuFakeHidden")) p = (void *)fake_hidden;
    *pfn = p;
    if (status) *status = p ? 0 : 1;
    return p ? 0 : CUDA_ERROR_NOT_FOUND;
}

CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, uint64_t flags) {
    return lookup(symbol, pfn, version, flags, NULL);
}

CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, uint64_t flags,
                             int *status) {
    return lookup(symbol, pfn, version, flags, status);
}
