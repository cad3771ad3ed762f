/* Modules, libraries and kernel launches: kernels.ptx, kernels.cubin and kernels.fatbin from
 * the directory argv[1]; every kernel launched with kernelParams, mixed_params also through
 * the `extra` buffer and cuLaunchKernelEx; globals set through cuModuleGetGlobal and
 * cuLibraryGetGlobal; results verified on the host. */
#include "common.h"

typedef struct {
    long long a;
    long long b;
} Pair16;

static CUstream g_s;

static void launch(CUfunction f, unsigned grid, unsigned block, unsigned shmem, CUstream s,
                   void **params) {
    CHECK(cuLaunchKernel(f, grid, 1, 1, block, 1, 1, shmem, s, params, NULL));
}

static CUfunction get_fn(CUmodule m, const char *name) {
    CUfunction f;
    CHECK(cuModuleGetFunction(&f, m, name));
    return f;
}

/* ---- fill_u32 ---- */
static void check_fill(const char *label, CUdeviceptr d, size_t n, unsigned v) {
    unsigned *h = xmalloc(n * 4);
    CHECK(cuMemcpyDtoH(h, d, n * 4));
    for (size_t i = 0; i < n; i++) REQUIRE(h[i] == v, "%s: element %zu is 0x%x, want 0x%x", label, i, h[i], v);
    printf("%s: %zu words = 0x%08x fnv=%016llx\n", label, n, v, (unsigned long long)fnv1a(h, n * 4));
    free(h);
}

static void test_fill(const char *label, CUfunction f, unsigned v) {
    unsigned long long n = 1000003;
    CUdeviceptr d;
    CHECK(cuMemAlloc(&d, n * 4));
    CHECK(cuMemsetD32(d, 0, n));
    void *params[] = {&d, &v, &n};
    launch(f, 1024, 256, 0, g_s, params);
    CHECK(cuStreamSynchronize(g_s));
    check_fill(label, d, n, v);
    CHECK(cuMemFree(d));
}

/* ---- scale_add ---- */
static void test_scale_add(const char *label, CUfunction f) {
    int n = 100003;
    float a = 2.5f;
    float *x = xmalloc(n * sizeof(float)), *y = xmalloc(n * sizeof(float));
    for (int i = 0; i < n; i++) {
        x[i] = (float)(i % 1024);
        y[i] = (float)(i % 77) - 30.0f;
    }
    CUdeviceptr dx, dy;
    CHECK(cuMemAlloc(&dx, n * sizeof(float)));
    CHECK(cuMemAlloc(&dy, n * sizeof(float)));
    CHECK(cuMemcpyHtoD(dx, x, n * sizeof(float)));
    CHECK(cuMemcpyHtoD(dy, y, n * sizeof(float)));
    void *params[] = {&a, &dx, &dy, &n};
    launch(f, (unsigned)(n + 255) / 256, 256, 0, NULL, params);
    CHECK(cuMemcpyDtoH(y, dy, n * sizeof(float)));
    for (int i = 0; i < n; i++) {
        float want = a * (float)(i % 1024) + ((float)(i % 77) - 30.0f);
        REQUIRE(y[i] == want, "%s: y[%d] = %g, want %g", label, i, (double)y[i], (double)want);
    }
    printf("%s: scale_add verified fnv=%016llx\n", label, (unsigned long long)fnv1a(y, n * sizeof(float)));
    CHECK(cuMemFree(dx));
    CHECK(cuMemFree(dy));
    free(x);
    free(y);
}

/* ---- mixed_params ---- */
static const char MP_C = -7;
static const short MP_S = -1234;
static const int MP_I = -123456789;
static const long long MP_L = 0x1122334455667788LL;
static const float MP_F = 3.25f;
static const Pair16 MP_PAIR = {0x0102030405060708LL, -2};
#define MP_D (-1.0 / 3.0)
/* Offsets of the parameters by the C ABI (what cuFuncGetParamInfo should report). */
static const size_t MP_OFF[8] = {0, 2, 4, 8, 16, 24, 32, 48};
static const size_t MP_SIZE[8] = {1, 2, 4, 8, 4, 8, 16, 8};
#define MP_TOTAL 56

static void mixed_expected(unsigned v[13]) {
    unsigned long long ul = (unsigned long long)MP_L, ud, pa = (unsigned long long)MP_PAIR.a,
                       pb = (unsigned long long)MP_PAIR.b;
    double d = MP_D;
    float f = MP_F;
    memcpy(&ud, &d, 8);
    v[0] = (unsigned)(int)MP_C;
    v[1] = (unsigned)(int)MP_S;
    v[2] = (unsigned)MP_I;
    v[3] = (unsigned)ul;
    v[4] = (unsigned)(ul >> 32);
    memcpy(&v[5], &f, 4);
    v[6] = (unsigned)ud;
    v[7] = (unsigned)(ud >> 32);
    v[8] = (unsigned)pa;
    v[9] = (unsigned)(pa >> 32);
    v[10] = (unsigned)pb;
    v[11] = (unsigned)(pb >> 32);
    unsigned h = 2166136261u;
    for (int k = 0; k < 12; k++) h = (h ^ v[k]) * 16777619u;
    v[12] = h;
}

enum mp_how { MP_PARAMS, MP_EXTRA, MP_EX };

static void test_mixed(const char *label, CUfunction f, enum mp_how how) {
    char c = MP_C;
    short s = MP_S;
    int i = MP_I;
    long long l = MP_L;
    float fl = MP_F;
    double d = MP_D;
    Pair16 pair = MP_PAIR;
    CUdeviceptr out;
    unsigned got[13], want[13];
    CHECK(cuMemAlloc(&out, sizeof got));
    CHECK(cuMemsetD32(out, 0, 13));
    void *params[] = {&c, &s, &i, &l, &fl, &d, &pair, &out};
    const char *how_s = "kernelParams";
    if (how == MP_PARAMS) {
        launch(f, 1, 32, 0, g_s, params);
    } else if (how == MP_EXTRA) {
        how_s = "extra buffer";
        _Alignas(16) unsigned char buf[MP_TOTAL];
        memset(buf, 0, sizeof buf);
        for (int k = 0; k < 8; k++) memcpy(buf + MP_OFF[k], params[k], MP_SIZE[k]);
        size_t size = sizeof buf;
        void *extra[] = {CU_LAUNCH_PARAM_BUFFER_POINTER, buf, CU_LAUNCH_PARAM_BUFFER_SIZE, &size,
                         CU_LAUNCH_PARAM_END};
        CHECK(cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, g_s, NULL, extra));
    } else {
        how_s = "cuLaunchKernelEx";
        CUlaunchConfig cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.gridDimX = cfg.gridDimY = cfg.gridDimZ = 1;
        cfg.blockDimX = 32;
        cfg.blockDimY = cfg.blockDimZ = 1;
        cfg.hStream = g_s;
        CHECK(cuLaunchKernelEx(&cfg, f, params, NULL));
    }
    CHECK(cuStreamSynchronize(g_s));
    CHECK(cuMemcpyDtoH(got, out, sizeof got));
    mixed_expected(want);
    for (int k = 0; k < 13; k++)
        REQUIRE(got[k] == want[k], "%s mixed_params (%s): word %d is 0x%08x, want 0x%08x", label,
                how_s, k, got[k], want[k]);
    printf("%s: mixed_params via %s:", label, how_s);
    for (int k = 0; k < 13; k++) printf(" %08x", got[k]);
    printf("\n");
    CHECK(cuMemFree(out));
}

static void param_info(const char *label, CUfunction f) {
    for (size_t k = 0; k <= 8; k++) {
        size_t off = 0, size = 0;
        CUresult r = cuFuncGetParamInfo(f, k, &off, &size);
        if (r == CUDA_SUCCESS)
            printf("%s: mixed_params param %zu offset=%zu size=%zu (C ABI: %s)\n", label, k, off,
                   size, yes_no(k < 8 && off == MP_OFF[k] && size == MP_SIZE[k]));
        else
            printf("%s: mixed_params param %zu -> %s\n", label, k, err_name(r));
    }
}

/* ---- add_one_i32 ---- */
static void test_add_one(const char *label, CUfunction f) {
    int n = 5000;
    int *h = xmalloc(n * sizeof(int));
    for (int i = 0; i < n; i++) h[i] = i - 500;
    CUdeviceptr d;
    CHECK(cuMemAlloc(&d, n * sizeof(int)));
    CHECK(cuMemcpyHtoD(d, h, n * sizeof(int)));
    void *params[] = {&d, &n};
    launch(f, (unsigned)(n + 127) / 128, 128, 0, g_s, params);
    launch(f, (unsigned)(n + 127) / 128, 128, 0, g_s, params);
    CHECK(cuStreamSynchronize(g_s));
    CHECK(cuMemcpyDtoH(h, d, n * sizeof(int)));
    for (int i = 0; i < n; i++) REQUIRE(h[i] == i - 498, "%s: add_one h[%d]=%d", label, i, h[i]);
    printf("%s: add_one_i32 twice verified fnv=%016llx\n", label, (unsigned long long)fnv1a(h, n * sizeof(int)));
    CHECK(cuMemFree(d));
    free(h);
}

/* ---- read_global (g_scale, g_table) ---- */
static void test_globals(const char *label, CUfunction f, CUdeviceptr gscale, size_t scale_bytes,
                         CUdeviceptr gtable, size_t table_bytes, unsigned seed) {
    printf("%s: g_scale bytes=%zu g_table bytes=%zu\n", label, scale_bytes, table_bytes);
    unsigned scale = 3 + seed, table[64];
    for (unsigned k = 0; k < 64; k++) table[k] = k * k + seed;
    CHECK(cuMemcpyHtoD(gscale, &scale, 4));
    CHECK(cuMemcpyHtoD(gtable, table, sizeof table));
    int n = 1000;
    CUdeviceptr out;
    CHECK(cuMemAlloc(&out, n * 4));
    void *params[] = {&out, &n};
    launch(f, 4, 256, 0, NULL, params);
    unsigned *h = xmalloc(n * 4);
    CHECK(cuMemcpyDtoH(h, out, n * 4));
    for (int i = 0; i < n; i++)
        REQUIRE(h[i] == scale * (unsigned)i + table[i & 63], "%s: read_global out[%d]=%u", label, i, h[i]);
    unsigned back = 0;
    CHECK(cuMemcpyDtoH(&back, gscale, 4));
    printf("%s: read_global verified (g_scale reads back %u) fnv=%016llx\n", label, back,
           (unsigned long long)fnv1a(h, n * 4));
    CHECK(cuMemFree(out));
    free(h);
}

/* ---- reverse_block (dynamic shared memory) ---- */
static void run_reverse(const char *label, CUfunction f, unsigned shmem) {
    int n = 256 * 100;
    unsigned *h = xmalloc(n * 4);
    for (int i = 0; i < n; i++) h[i] = (unsigned)i * 2654435761u;
    CUdeviceptr in, out;
    CHECK(cuMemAlloc(&in, n * 4));
    CHECK(cuMemAlloc(&out, n * 4));
    CHECK(cuMemcpyHtoD(in, h, n * 4));
    void *params[] = {&in, &out, &n};
    launch(f, 100, 256, shmem, g_s, params);
    CHECK(cuStreamSynchronize(g_s));
    CHECK(cuMemcpyDtoH(h, out, n * 4));
    for (int i = 0; i < n; i++) {
        int b = i / 256, t = i % 256;
        unsigned want = (unsigned)(b * 256 + 255 - t) * 2654435761u;
        REQUIRE(h[i] == want, "%s: reverse_block out[%d]", label, i);
    }
    printf("%s: reverse_block with %u bytes dynamic shared memory verified fnv=%016llx\n", label,
           shmem, (unsigned long long)fnv1a(h, n * 4));
    CHECK(cuMemFree(in));
    CHECK(cuMemFree(out));
    free(h);
}

static void test_reverse(const char *label, CUfunction f) {
    run_reverse(label, f, 256 * 4);
    int n = 256;
    CUdeviceptr in = 0, out = 0;
    CHECK(cuMemAlloc(&in, 4096));
    CHECK(cuMemAlloc(&out, 4096));
    void *params[] = {&in, &out, &n};
    printf("%s: launch with 80 KiB dynamic shared memory before opting in -> %s\n", label,
           err_name(cuLaunchKernel(f, 1, 1, 1, 256, 1, 1, 80 * 1024, g_s, params, NULL)));
    CHECK(cuStreamSynchronize(g_s));
    CHECK(cuMemFree(in));
    CHECK(cuMemFree(out));
    CHECK(cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 80 * 1024));
    int v = 0;
    CHECK(cuFuncGetAttribute(&v, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, f));
    printf("%s: MAX_DYNAMIC_SHARED_SIZE_BYTES after set: %d\n", label, v);
    run_reverse(label, f, 80 * 1024);
}

/* ---- empty and bad launch configurations ---- */
static void test_empty(const char *label, CUfunction f) {
    launch(f, 1, 1, 0, NULL, NULL);
    launch(f, 65536, 1024, 0, g_s, NULL);
    CHECK(cuCtxSynchronize());
    printf("%s: empty launched\n", label);
    printf("%s: empty with 2048 threads per block -> %s\n", label,
           err_name(cuLaunchKernel(f, 1, 1, 1, 2048, 1, 1, 0, NULL, NULL, NULL)));
    printf("%s: empty with grid 0 -> %s\n", label,
           err_name(cuLaunchKernel(f, 0, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL)));
    printf("%s: empty with 1 MiB dynamic shared memory -> %s\n", label,
           err_name(cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 1u << 20, NULL, NULL, NULL)));
    CHECK(cuCtxSynchronize());
}

/* ---- cuLaunchKernelEx on fill_u32 ---- */
static void test_launch_ex(const char *label, CUfunction f) {
    unsigned long long n = 300007;
    CUdeviceptr d;
    CHECK(cuMemAlloc(&d, n * 4));
    unsigned v = 0x600d0001u;
    void *params[] = {&d, &v, &n};
    CUlaunchConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.gridDimX = 64;
    cfg.gridDimY = cfg.gridDimZ = 1;
    cfg.blockDimX = 128;
    cfg.blockDimY = cfg.blockDimZ = 1;
    cfg.sharedMemBytes = 0;
    cfg.hStream = g_s;
    cfg.attrs = NULL;
    cfg.numAttrs = 0;
    CHECK(cuLaunchKernelEx(&cfg, f, params, NULL));
    CHECK(cuStreamSynchronize(g_s));
    char l2[128];
    snprintf(l2, sizeof l2, "%s: cuLaunchKernelEx no attributes", label);
    check_fill(l2, d, n, v);

    CUlaunchAttribute attr[2];
    memset(attr, 0, sizeof attr);
    attr[0].id = CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
    attr[0].value.cooperative = 0;
    attr[1].id = CU_LAUNCH_ATTRIBUTE_PRIORITY;
    attr[1].value.priority = 0;
    cfg.attrs = attr;
    cfg.numAttrs = 2;
    v = 0x600d0002u;
    CHECK(cuLaunchKernelEx(&cfg, f, params, NULL));
    CHECK(cuStreamSynchronize(g_s));
    snprintf(l2, sizeof l2, "%s: cuLaunchKernelEx COOPERATIVE=0,PRIORITY=0", label);
    check_fill(l2, d, n, v);

    memset(attr, 0, sizeof attr);
    attr[0].id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr[0].value.clusterDim.x = 2;
    attr[0].value.clusterDim.y = 1;
    attr[0].value.clusterDim.z = 1;
    cfg.numAttrs = 1;
    v = 0x600d0003u;
    CHECK(cuLaunchKernelEx(&cfg, f, params, NULL));
    CHECK(cuStreamSynchronize(g_s));
    snprintf(l2, sizeof l2, "%s: cuLaunchKernelEx cluster 2x1x1", label);
    check_fill(l2, d, n, v);

    cfg.gridDimX = 63; /* not a multiple of the cluster size */
    printf("%s: cuLaunchKernelEx cluster 2 with grid 63 -> %s\n", label,
           err_name(cuLaunchKernelEx(&cfg, f, params, NULL)));
    CHECK(cuStreamSynchronize(g_s));
    CHECK(cuMemFree(d));
}

static void func_attributes(const char *label, CUmodule m) {
    static const char *names[] = {"fill_u32", "scale_add", "mixed_params", "add_one_i32",
                                  "read_global", "reverse_block", "empty", "spin_fill"};
    for (size_t k = 0; k < sizeof names / sizeof names[0]; k++) {
        CUfunction f = get_fn(m, names[k]);
        int maxt = -1, regs = -1, bin = -1, shared = -1;
        CHECK(cuFuncGetAttribute(&maxt, CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, f));
        CHECK(cuFuncGetAttribute(&regs, CU_FUNC_ATTRIBUTE_NUM_REGS, f));
        CHECK(cuFuncGetAttribute(&bin, CU_FUNC_ATTRIBUTE_BINARY_VERSION, f));
        CHECK(cuFuncGetAttribute(&shared, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, f));
        printf("%s: %s max threads=%d num regs>0: %s binary version=%d static shared=%d\n", label,
               names[k], maxt, yes_no(regs > 0), bin, shared);
    }
    CUfunction f = get_fn(m, "empty");
    int v;
    printf("%s: cuFuncGetAttribute(invalid 9999) -> %s\n", label,
           err_name(cuFuncGetAttribute(&v, (CUfunction_attribute)9999, f)));
}

static void module_tests(const char *label, const void *image, unsigned seed) {
    CUmodule m, mex;
    char l2[96];
    CHECK(cuModuleLoadData(&m, image));
    printf("%s: cuModuleLoadData ok\n", label);
    CUfunction f;
    printf("%s: cuModuleGetFunction(no_such_kernel) -> %s\n", label,
           err_name(cuModuleGetFunction(&f, m, "no_such_kernel")));
    func_attributes(label, m);
    param_info(label, get_fn(m, "mixed_params"));

    test_fill(label, get_fn(m, "fill_u32"), 0xa5a50000u + seed);
    test_scale_add(label, get_fn(m, "scale_add"));
    test_mixed(label, get_fn(m, "mixed_params"), MP_PARAMS);
    test_mixed(label, get_fn(m, "mixed_params"), MP_EXTRA);
    test_mixed(label, get_fn(m, "mixed_params"), MP_EX);
    test_add_one(label, get_fn(m, "add_one_i32"));

    CUdeviceptr gs, gt;
    size_t bs, bt;
    CHECK(cuModuleGetGlobal(&gs, &bs, m, "g_scale"));
    CHECK(cuModuleGetGlobal(&gt, &bt, m, "g_table"));
    test_globals(label, get_fn(m, "read_global"), gs, bs, gt, bt, seed);
    CHECK(cuModuleGetGlobal(&gs, NULL, m, "g_scale"));
    printf("%s: cuModuleGetGlobal(no_such_global) -> %s\n", label,
           err_name(cuModuleGetGlobal(&gs, &bs, m, "no_such_global")));

    test_reverse(label, get_fn(m, "reverse_block"));
    test_empty(label, get_fn(m, "empty"));
    test_launch_ex(label, get_fn(m, "fill_u32"));

    CHECK(cuModuleLoadDataEx(&mex, image, 0, NULL, NULL));
    snprintf(l2, sizeof l2, "%s (cuModuleLoadDataEx)", label);
    test_fill(l2, get_fn(mex, "fill_u32"), 0x5a5a0000u + seed);
    CHECK(cuModuleUnload(mex));
    CHECK(cuModuleUnload(m));
    printf("%s: modules unloaded\n", label);
}

static void library_tests(const char *label, const void *image, unsigned seed) {
    CUlibrary lib;
    CUkernel k;
    CUfunction f;
    CUmodule lm;
    char l2[96];
    /* A library belongs to no context: it loads with none current (as the runtime loads
     * one lazily from a new thread). */
    CUcontext cur;
    CHECK(cuCtxPopCurrent(&cur));
    CHECK(cuLibraryLoadData(&lib, image, NULL, NULL, 0, NULL, NULL, 0));
    CHECK(cuLibraryGetKernel(&k, lib, "fill_u32"));
    CHECK(cuCtxPushCurrent(cur));
    CHECK(cuLibraryUnload(lib));
    printf("%s: cuLibraryLoadData without a current context ok\n", label);
    CHECK(cuLibraryLoadData(&lib, image, NULL, NULL, 0, NULL, NULL, 0));
    printf("%s: cuLibraryLoadData ok\n", label);
    CHECK(cuLibraryGetKernel(&k, lib, "fill_u32"));
    CHECK(cuKernelGetFunction(&f, k));
    snprintf(l2, sizeof l2, "%s library kernel->function", label);
    test_fill(l2, f, 0x11110000u + seed);
    snprintf(l2, sizeof l2, "%s library CUkernel as CUfunction", label);
    test_fill(l2, (CUfunction)k, 0x22220000u + seed);

    CHECK(cuLibraryGetModule(&lm, lib));
    snprintf(l2, sizeof l2, "%s library module", label);
    test_add_one(l2, get_fn(lm, "add_one_i32"));
    test_mixed(l2, get_fn(lm, "mixed_params"), MP_PARAMS);

    CUdeviceptr gs, gt;
    size_t bs, bt;
    CHECK(cuLibraryGetGlobal(&gs, &bs, lib, "g_scale"));
    CHECK(cuLibraryGetGlobal(&gt, &bt, lib, "g_table"));
    CHECK(cuLibraryGetKernel(&k, lib, "read_global"));
    CHECK(cuKernelGetFunction(&f, k));
    snprintf(l2, sizeof l2, "%s library globals", label);
    test_globals(l2, f, gs, bs, gt, bt, seed + 100);
    printf("%s: cuLibraryGetKernel(no_such_kernel) -> %s\n", label,
           err_name(cuLibraryGetKernel(&k, lib, "no_such_kernel")));
    printf("%s: cuLibraryGetGlobal(no_such_global) -> %s\n", label,
           err_name(cuLibraryGetGlobal(&gs, &bs, lib, "no_such_global")));
    CHECK(cuLibraryUnload(lib));
    printf("%s: library unloaded\n", label);
}

static void error_paths(const void *cubin) {
    printf("cuLaunchKernel(NULL function) -> %s\n",
           err_name(cuLaunchKernel(NULL, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL)));
    CUmodule m;
    CUfunction f;
    printf("cuModuleGetFunction(NULL module) -> %s\n", err_name(cuModuleGetFunction(&f, NULL, "empty")));
    static const char garbage[] = "this is not a module image";
    printf("cuModuleLoadData(garbage text) -> %s\n", err_name(cuModuleLoadData(&m, garbage)));
    static const unsigned char elfish[64] = {0x7f, 'E', 'L', 'F', 2, 1, 1};
    printf("cuModuleLoadData(truncated ELF) -> %s\n", err_name(cuModuleLoadData(&m, elfish)));

    CHECK(cuModuleLoadData(&m, cubin));
    f = get_fn(m, "empty");
    CHECK(cuModuleUnload(m));
    printf("cuLaunchKernel after cuModuleUnload -> %s\n",
           err_name(cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL)));
    printf("cuCtxSynchronize after the bad launches -> %s\n", err_name(cuCtxSynchronize()));
}

int main(int argc, char **argv) {
    start();
    const char *dir = kernel_dir(argc, argv);
    size_t lp, lc, lf;
    char *ptx = read_file(dir, "kernels.ptx", &lp, 1);
    void *cubin = read_file(dir, "kernels.cubin", &lc, 0);
    void *fatbin = read_file(dir, "kernels.fatbin", &lf, 0);

    CUdevice dev;
    init_primary(&dev);
    /* A blocking stream: the synchronous copies and memsets of this program run on the legacy
     * NULL stream and may still be in flight when they return (device-side work, or DMA from
     * the driver's staging buffer); a blocking stream is ordered after them, a non-blocking
     * one would race with them. */
    CHECK(cuStreamCreate(&g_s, CU_STREAM_DEFAULT));

    const struct {
        const char *label;
        const void *image;
    } images[] = {{"ptx", ptx}, {"cubin", cubin}, {"fatbin", fatbin}};
    for (unsigned i = 0; i < 3; i++) {
        module_tests(images[i].label, images[i].image, i);
        library_tests(images[i].label, images[i].image, i);
    }
    error_paths(cubin);

    CHECK(cuStreamDestroy(g_s));
    release_primary(dev);
    free(ptx);
    free(cubin);
    free(fatbin);
    finish("launch");
    return 0;
}
