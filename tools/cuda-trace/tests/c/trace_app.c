/* The program cuda-trace's integration test runs against the fake driver, with the tracer as
 * libcuda.so.1: calls driver functions directly, through cuGetProcAddress pointers and
 * through export tables, and checks that every result reached it unchanged. Prints one
 * line per failed check and "OK" at the end, then leaves through _exit (the trace must be
 * complete anyway). With the argument "cuInit" it only prints cuInit(0)'s result. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

typedef int CUresult;
typedef struct { unsigned char bytes[16]; } CUuuid;

CUresult cuInit(unsigned flags);
CUresult cuDriverGetVersion(int *version);
CUresult cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shmem, void *stream, void **params, void **extra);
CUresult cuLaunchHostFunc(void *stream, void (*fn)(void *), void *user);
CUresult cuStreamAddCallback(void *stream, void (*cb)(void *, CUresult, void *), void *user,
                             unsigned flags);
CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, uint64_t flags);
CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, uint64_t flags,
                             int *status);
CUresult cuGetExportTable(const void **table, const CUuuid *id);

typedef CUresult (*get_proc_fn)(const char *, void **, int, uint64_t, int *);
typedef CUresult (*launch_fn)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                              unsigned, void *, void **, void **);
typedef CUresult (*memcpy_fn)(uint64_t, uint64_t, size_t, void *);
typedef CUresult (*export_table_fn)(const void **, const CUuuid *);
typedef int64_t (*fn7)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
typedef int64_t (*fn8)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
typedef int64_t (*fn_mixed)(int64_t, double, int64_t, double, int64_t, int64_t, int64_t, int64_t,
                            int64_t);
typedef int64_t (*fn0)(void);
typedef int64_t (*fn_cb)(void (*)(void *), void *);

static int failures;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            printf("FAIL line %d: %s\n", __LINE__, #cond);                                         \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

static const CUuuid uuid_a = {{0x0a, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0xff}};
static const CUuuid uuid_b = {{0x0b, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb,
                               0xcc, 0xdd, 0xee, 0xf0, 0x01}};
static const CUuuid uuid_none = {{0x0c}};

/* Pointers the callbacks use, set up by main. */
static launch_fn launch_via_proc;
static const void **table_b;

/* What a callback saw. */
struct seen {
    CUresult version_rc;
    int version;
    int64_t slot_b0;
    CUresult launch_rc;
    CUresult init_rc;
};

/* Runs on another thread (slot b1, cuStreamAddCallback) or on the caller's (slot b2,
 * cuLaunchHostFunc): calls back into traced functions of each kind. */
static void callback(void *user) {
    struct seen *s = user;
    s->version_rc = cuDriverGetVersion(&s->version);
    s->slot_b0 = ((fn0)table_b[0])();
    s->launch_rc = launch_via_proc((void *)0xf00d, 1, 2, 3, 4, 5, 6, 7, (void *)0x5eed,
                                   (void **)0x9a9a, (void **)0xe0e0);
    s->init_rc = cuInit(0);
}

static void stream_callback(void *stream, CUresult status, void *user) {
    (void)stream;
    (void)status;
    callback(user);
}

static void check_seen(const struct seen *s, int line) {
    if (s->version_rc != 0 || s->version != 13000 || s->slot_b0 != 0xb0 || s->launch_rc != 0 ||
        s->init_rc != 0) {
        printf("FAIL callback checked at line %d: %d %d %lld %d %d\n", line, s->version_rc,
               s->version, (long long)s->slot_b0, s->launch_rc, s->init_rc);
        failures++;
    }
}

int main(int argc, char **argv) {
    (void)argv;
    if (argc > 1) {
        printf("cuInit=%d\n", cuInit(0));
        fflush(stdout);
        _exit(0);
    }

    /* Direct calls through the exported names. */
    CHECK(cuInit(0) == 0);
    CHECK(cuInit(1) == 101);
    int version = 0;
    CHECK(cuDriverGetVersion(&version) == 0 && version == 13000);
    CHECK(cuLaunchKernel((void *)0xf00d, 1, 2, 3, 4, 5, 6, 7, (void *)0x5eed, (void **)0x9a9a,
                         (void **)0xe0e0) == 0);
    CHECK(cuLaunchKernel((void *)0xf00d, 1, 2, 3, 4, 5, 6, 99, (void *)0x5eed, (void **)0x9a9a,
                         (void **)0xe0e0) == 1007);

    /* Through cuGetProcAddress pointers, the getter itself obtained that way too. */
    int status = -1;
    get_proc_fn gpa = 0;
    CHECK(cuGetProcAddress_v2("cuGetProcAddress", (void **)&gpa, 12000, 0, &status) == 0);
    CHECK(gpa != 0 && status == 0);
    CHECK(gpa("cuLaunchKernel", (void **)&launch_via_proc, 12000, 0, &status) == 0);
    CHECK(launch_via_proc((void *)0xf00d, 1, 2, 3, 4, 5, 6, 7, (void *)0x5eed, (void **)0x9a9a,
                          (void **)0xe0e0) == 0);
    launch_fn again = 0;
    CHECK(gpa("cuLaunchKernel", (void **)&again, 12000, 0, &status) == 0);
    CHECK(again == launch_via_proc);
    memcpy_fn copy_ptsz = 0, copy_legacy = 0;
    CHECK(cuGetProcAddress("cuMemcpyAsync", (void **)&copy_ptsz, 12000, 2) == 0);
    CHECK(copy_ptsz(1, 2, 3, 0) == 42);
    CHECK(cuGetProcAddress("cuMemcpyAsync", (void **)&copy_legacy, 12000, 0) == 0);
    CHECK(copy_legacy(1, 2, 3, 0) == 0);
    fn8 hidden = 0;
    CHECK(gpa("cuFakeHidden", (void **)&hidden, 12000, 0, &status) == 0);
    CHECK(hidden(1, 2, 3, 4, 5, 6, 7, 8) == 0x8a);
    void *none = (void *)1;
    CHECK(gpa("cuNoSuchFunction", &none, 12000, 0, &status) == 500);
    CHECK(none == 0 && status == 1);

    /* Export table {0A..}: through a cuGetProcAddress pointer to cuGetExportTable. */
    export_table_fn get_table = 0;
    CHECK(gpa("cuGetExportTable", (void **)&get_table, 12000, 0, &status) == 0);
    const void **table_a = 0, **table_a2 = 0;
    CHECK(get_table((const void **)&table_a, &uuid_a) == 0);
    CHECK(table_a != 0 && (uintptr_t)table_a[0] == 5 * sizeof(void *));
    CHECK(((fn7)table_a[1])(1, 2, 3, 4, 5, 6, 7) == 0x1a1);
    CHECK(((fn7)table_a[1])(1, 2, 3, 4, 5, 6, 8) == -1);
    CHECK(((fn8)table_a[2])(10, 11, 12, 13, 14, 15, 16, 17) == 0x1a2);
    CHECK(((fn_mixed)table_a[3])(21, 1.5, 22, -2.25, 23, 24, 25, 26, 27) == 0x1a3);
    CHECK(*(const int *)table_a[4] == 5);
    CHECK(cuGetExportTable((const void **)&table_a2, &uuid_a) == 0 && table_a2 == table_a);

    /* Export table {0B..}: through the exported name; callbacks call back in. */
    CHECK(cuGetExportTable((const void **)&table_b, &uuid_b) == 0);
    CHECK(((fn0)table_b[0])() == 0xb0);
    struct seen on_thread = {-1, 0, 0, -1, -1}, on_caller = {-1, 0, 0, -1, -1};
    CHECK(((fn_cb)table_b[1])(callback, &on_thread) == 0xb1);
    check_seen(&on_thread, __LINE__);
    CHECK(((fn_cb)table_b[2])(callback, &on_caller) == 0xb2);
    check_seen(&on_caller, __LINE__);
    const void **table_none = 0;
    CHECK(cuGetExportTable((const void **)&table_none, &uuid_none) == 500);

    /* Driver functions that call user callbacks, on this thread and on another. */
    struct seen host = {-1, 0, 0, -1, -1}, stream = {-1, 0, 0, -1, -1};
    CHECK(cuLaunchHostFunc((void *)0x5eed, callback, &host) == 0);
    check_seen(&host, __LINE__);
    CHECK(cuStreamAddCallback((void *)0x5eed, stream_callback, &stream, 3) == 2);
    check_seen(&stream, __LINE__);

    if (failures) printf("FAILED %d\n", failures);
    else printf("OK\n");
    fflush(stdout);
    _exit(failures ? 1 : 0);
}
