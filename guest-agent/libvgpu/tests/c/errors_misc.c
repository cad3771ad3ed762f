/* Error names and strings, cuGetProcAddress (and calling what it returns), cuGetExportTable,
 * and threads: per-thread current contexts and concurrent allocate/copy/verify/free. */
#include "common.h"

#include <pthread.h>

static void error_texts(void) {
    static const int codes[] = {0,   1,   2,   3,   4,   100, 101, 200, 201, 209, 218,
                                300, 400, 500, 600, 700, 719, 800, 801, 999, 12345, -1};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        const char *name = NULL, *str = NULL;
        CUresult rn = cuGetErrorName((CUresult)codes[i], &name);
        CUresult rs = cuGetErrorString((CUresult)codes[i], &str);
        printf("code %d: cuGetErrorName -> %s", codes[i], err_name(rn));
        if (rn == CUDA_SUCCESS) printf(" \"%s\"", name ? name : "(null)");
        else printf(" (name %s)", name ? "set" : "NULL");
        printf("; cuGetErrorString -> %s", err_name(rs));
        if (rs == CUDA_SUCCESS) printf(" \"%s\"", str ? str : "(null)");
        else printf(" (string %s)", str ? "set" : "NULL");
        printf("\n");
    }
    /* (cuGetErrorName/String with a NULL out pointer crash natively: not tested.) */
}

typedef CUresult (*PFN_alloc)(CUdeviceptr *, size_t);
typedef CUresult (*PFN_free)(CUdeviceptr);
typedef CUresult (*PFN_htod)(CUdeviceptr, const void *, size_t);
typedef CUresult (*PFN_dtoh)(void *, CUdeviceptr, size_t);

static void *proc(const char *sym, int ver, int print) {
    void *pfn = NULL;
    CUdriverProcAddressQueryResult q = (CUdriverProcAddressQueryResult)99;
    CUresult r = cuGetProcAddress(sym, &pfn, ver, CU_GET_PROC_ADDRESS_DEFAULT, &q);
    if (print)
        printf("cuGetProcAddress(%s, %d) -> %s found: %s query result: %d\n", sym, ver, err_name(r),
               yes_no(pfn != NULL), (int)q);
    return r == CUDA_SUCCESS ? pfn : NULL;
}

static void proc_address(void) {
    static const char *syms[] = {"cuMemAlloc", "cuCtxCreate", "cuLaunchKernel", "cuMemcpyHtoD",
                                 "cuGetProcAddress", "cuNonexistentFunction"};
    static const int vers[] = {12000, 13000};
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++)
        for (size_t j = 0; j < 2; j++) proc(syms[i], vers[j], 1);
    (void)proc("cuMemAlloc", 2000, 1);
    void *pfn = NULL;
    CUdriverProcAddressQueryResult q;
    /* (A NULL symbol crashes natively: not tested.) */
    printf("cuGetProcAddress(bad flags 0x100) -> %s\n",
           err_name(cuGetProcAddress("cuMemAlloc", &pfn, 13000, 0x100, &q)));

    /* Call what came back. */
    for (size_t j = 0; j < 2; j++) {
        PFN_alloc palloc = (PFN_alloc)proc("cuMemAlloc", vers[j], 0);
        PFN_free pfree = (PFN_free)proc("cuMemFree", vers[j], 0);
        PFN_htod phtod = (PFN_htod)proc("cuMemcpyHtoD", vers[j], 0);
        PFN_dtoh pdtoh = (PFN_dtoh)proc("cuMemcpyDtoH", vers[j], 0);
        REQUIRE(palloc && pfree && phtod && pdtoh, "cuGetProcAddress for %d", vers[j]);
        CUdeviceptr d = 0;
        unsigned char a[4096], b[4096];
        fill_pattern(a, sizeof a, (uint32_t)vers[j]);
        memset(b, 0, sizeof b);
        CHECK(palloc(&d, sizeof a));
        CHECK(phtod(d, a, sizeof a));
        CHECK(pdtoh(b, d, sizeof b));
        CHECK(pfree(d));
        REQUIRE(memcmp(a, b, sizeof a) == 0, "round trip through cuGetProcAddress pointers");
        printf("cuGetProcAddress(%d) pointers: alloc/copy/free round trip verified fnv=%016llx\n",
               vers[j], (unsigned long long)fnv1a(b, sizeof b));
    }
}

static void export_table(void) {
    const void *table = NULL;
    CUuuid zero;
    memset(&zero, 0, sizeof zero);
    printf("cuGetExportTable(zero uuid) -> %s\n", err_name(cuGetExportTable(&table, &zero)));
}

/* ---- threads ---- */
#define NTHREADS 8

static CUcontext g_prim;
static CUdevice g_dev;

typedef struct {
    int id;
    int initial_null;
    int current_ok;
    int own_ctx;
    int verified;
    CUresult err;
    uint64_t fnv;
} ThreadResult;

#define TCHECK(res, call)                         \
    do {                                          \
        CUresult tr_ = (call);                    \
        if (tr_ != CUDA_SUCCESS) {                \
            (res)->err = tr_;                     \
            return NULL;                          \
        }                                         \
    } while (0)

static void *worker(void *arg) {
    ThreadResult *res = arg;
    CUcontext cur = (CUcontext)(uintptr_t)1, own = NULL;
    TCHECK(res, cuCtxGetCurrent(&cur));
    res->initial_null = cur == NULL;
    res->own_ctx = res->id % 2 == 1;
    if (res->own_ctx) {
        TCHECK(res, cuCtxCreate(&own, NULL, 0, g_dev));
        TCHECK(res, cuCtxGetCurrent(&cur));
        res->current_ok = cur == own;
    } else {
        TCHECK(res, cuCtxSetCurrent(g_prim));
        TCHECK(res, cuCtxGetCurrent(&cur));
        res->current_ok = cur == g_prim;
    }
    const size_t n = (1u << 20) + (size_t)res->id * 4099;
    unsigned char *src = malloc(n), *dst = malloc(n);
    if (!src || !dst) return NULL;
    CUdeviceptr d;
    CUstream s;
    for (int round = 0; round < 4; round++) {
        fill_pattern(src, n, (uint32_t)(res->id * 100 + round));
        memset(dst, 0, n);
        TCHECK(res, cuMemAlloc(&d, n));
        TCHECK(res, cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
        TCHECK(res, cuMemcpyHtoDAsync(d, src, n, s));
        TCHECK(res, cuMemsetD8Async(d, (unsigned char)res->id, 7, s));
        TCHECK(res, cuMemcpyDtoHAsync(dst, d, n, s));
        TCHECK(res, cuStreamSynchronize(s));
        TCHECK(res, cuStreamDestroy(s));
        TCHECK(res, cuMemFree(d));
        memset(src, res->id, 7);
        if (memcmp(src, dst, n) != 0) {
            free(src);
            free(dst);
            return NULL;
        }
        res->fnv ^= fnv1a(dst, n);
    }
    res->verified = 1;
    free(src);
    free(dst);
    if (own) TCHECK(res, cuCtxDestroy(own));
    TCHECK(res, cuCtxSetCurrent(NULL));
    return NULL;
}

/* Holds its own context current while the main thread looks at its own current context. */
static pthread_barrier_t g_barrier;

static void *holder(void *arg) {
    CUcontext *out = arg, own = NULL, cur = NULL;
    CUresult r = cuCtxCreate(&own, NULL, 0, g_dev);
    if (r == CUDA_SUCCESS) r = cuCtxGetCurrent(&cur);
    out[0] = own;
    out[1] = cur;
    pthread_barrier_wait(&g_barrier); /* main looks now */
    pthread_barrier_wait(&g_barrier);
    if (own) cuCtxDestroy(own);
    return NULL;
}

static void threads(void) {
    pthread_t th[NTHREADS];
    ThreadResult res[NTHREADS];
    memset(res, 0, sizeof res);
    for (int i = 0; i < NTHREADS; i++) {
        res[i].id = i;
        REQUIRE(pthread_create(&th[i], NULL, worker, &res[i]) == 0, "pthread_create");
    }
    for (int i = 0; i < NTHREADS; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < NTHREADS; i++) {
        printf("thread %d (%s): initial current NULL: %s, current as set: %s, verified: %s, "
               "error: %s, fnv=%016llx\n",
               i, res[i].own_ctx ? "own context" : "primary context", yes_no(res[i].initial_null),
               yes_no(res[i].current_ok), yes_no(res[i].verified), err_name(res[i].err),
               (unsigned long long)res[i].fnv);
        REQUIRE(res[i].verified && res[i].current_ok && res[i].initial_null, "thread %d", i);
    }

    CUcontext cur = NULL, seen[2] = {NULL, NULL};
    pthread_t t;
    REQUIRE(pthread_barrier_init(&g_barrier, NULL, 2) == 0, "barrier");
    CHECK(cuCtxSetCurrent(g_prim));
    REQUIRE(pthread_create(&t, NULL, holder, seen) == 0, "pthread_create");
    pthread_barrier_wait(&g_barrier);
    CHECK(cuCtxGetCurrent(&cur));
    printf("other thread's context is current there: %s\n", yes_no(seen[0] != NULL && seen[1] == seen[0]));
    printf("this thread still has the primary context: %s\n", yes_no(cur == g_prim));
    pthread_barrier_wait(&g_barrier);
    pthread_join(t, NULL);
    CHECK(cuCtxGetCurrent(&cur));
    printf("after the other thread ended: still primary: %s\n", yes_no(cur == g_prim));
    pthread_barrier_destroy(&g_barrier);
}

int main(void) {
    start();
    error_texts(); /* before cuInit: these need no initialization */
    g_prim = init_primary(&g_dev);
    proc_address();
    export_table();
    threads();
    release_primary(g_dev);
    finish("errors_misc");
    return 0;
}
