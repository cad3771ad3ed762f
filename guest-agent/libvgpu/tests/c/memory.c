/* Memory: device and host allocations, address ranges, pitch, pointer attributes, every copy
 * direction sync/async/unified with pageable and pinned host memory at several sizes,
 * memsets at odd offsets and counts, and the error paths. */
#include "common.h"

static CUcontext g_ctx;

static const size_t SIZES[] = {1, 4096, (1u << 20) + 3, 64u << 20};
#define NSIZES (sizeof SIZES / sizeof SIZES[0])

static void *host_alloc(int pinned, size_t n) {
    void *p = NULL;
    if (pinned)
        CHECK(cuMemAllocHost(&p, n));
    else
        p = xmalloc(n);
    return p;
}

static void host_free(int pinned, void *p) {
    if (pinned)
        CHECK(cuMemFreeHost(p));
    else
        free(p);
}

static void verify(const char *what, size_t n, const char *host, const void *got, const void *want) {
    long long at = first_diff(got, want, n);
    REQUIRE(at < 0, "%s n=%zu host=%s: first difference at byte %lld", what, n, host, at);
    printf("%-24s n=%-9zu host=%-8s verified fnv=%016llx\n", what, n, host,
           (unsigned long long)fnv1a(got, n));
}

/* Sync, async, unified and unified-async round trips host -> d1 -> d2 -> host. */
static void copies(CUstream s) {
    for (size_t k = 0; k < NSIZES; k++) {
        size_t n = SIZES[k];
        for (int pinned = 0; pinned < 2; pinned++) {
            const char *hk = pinned ? "pinned" : "pageable";
            unsigned char *src = host_alloc(pinned, n), *dst = host_alloc(pinned, n);
            CUdeviceptr d1, d2;
            fill_pattern(src, n, (uint32_t)(n * 2 + (size_t)pinned));
            CHECK(cuMemAlloc(&d1, n));
            CHECK(cuMemAlloc(&d2, n));

            memset(dst, 0, n);
            CHECK(cuMemcpyHtoD(d1, src, n));
            CHECK(cuMemcpyDtoD(d2, d1, n));
            CHECK(cuMemcpyDtoH(dst, d2, n));
            verify("HtoD/DtoD/DtoH", n, hk, dst, src);

            memset(dst, 0, n);
            CHECK(cuMemsetD8(d1, 0, n));
            CHECK(cuMemsetD8(d2, 0, n));
            CHECK(cuMemcpyHtoDAsync(d1, src, n, s));
            CHECK(cuMemcpyDtoDAsync(d2, d1, n, s));
            CHECK(cuMemcpyDtoHAsync(dst, d2, n, s));
            CHECK(cuStreamSynchronize(s));
            verify("async HtoD/DtoD/DtoH", n, hk, dst, src);

            memset(dst, 0, n);
            CHECK(cuMemsetD8(d1, 0, n));
            CHECK(cuMemsetD8(d2, 0, n));
            CHECK(cuMemcpy(d1, (CUdeviceptr)(uintptr_t)src, n));
            CHECK(cuMemcpy(d2, d1, n));
            CHECK(cuMemcpy((CUdeviceptr)(uintptr_t)dst, d2, n));
            verify("cuMemcpy (unified)", n, hk, dst, src);

            memset(dst, 0, n);
            CHECK(cuMemsetD8(d1, 0, n));
            CHECK(cuMemsetD8(d2, 0, n));
            CHECK(cuMemcpyAsync(d1, (CUdeviceptr)(uintptr_t)src, n, s));
            CHECK(cuMemcpyAsync(d2, d1, n, s));
            CHECK(cuMemcpyAsync((CUdeviceptr)(uintptr_t)dst, d2, n, s));
            CHECK(cuStreamSynchronize(s));
            verify("cuMemcpyAsync (unified)", n, hk, dst, src);

            /* Default (NULL) stream async copies. */
            memset(dst, 0, n);
            CHECK(cuMemcpyHtoDAsync(d2, src, n, NULL));
            CHECK(cuMemcpyDtoHAsync(dst, d2, n, NULL));
            CHECK(cuCtxSynchronize());
            verify("async on NULL stream", n, hk, dst, src);

            CHECK(cuMemFree(d1));
            CHECK(cuMemFree(d2));
            host_free(pinned, src);
            host_free(pinned, dst);
        }
    }

    /* Unaligned offsets on both sides. */
    size_t n = (1u << 20) + 3, len = n - 9;
    unsigned char *src = xmalloc(n), *dst = xmalloc(n), *want = xmalloc(n);
    CUdeviceptr d1, d2;
    fill_pattern(src, n, 77);
    memset(dst, 0xee, n);
    memcpy(want, dst, n);
    memcpy(want + 5, src + 1, len);
    CHECK(cuMemAlloc(&d1, n + 64));
    CHECK(cuMemAlloc(&d2, n + 64));
    CHECK(cuMemcpyHtoD(d1 + 7, src + 1, len));
    CHECK(cuMemcpyDtoD(d2 + 3, d1 + 7, len));
    CHECK(cuMemcpyDtoH(dst + 5, d2 + 3, len));
    verify("odd offsets", n, "pageable", dst, want);
    CHECK(cuMemFree(d1));
    CHECK(cuMemFree(d2));
    free(src);
    free(dst);
    free(want);
}

/* Memsets at odd offsets and counts; a host model of the same writes is compared. */
static void memsets(CUstream s) {
    const size_t n = 1u << 20;
    unsigned char *model = xmalloc(n), *got = xmalloc(n);
    CUdeviceptr d;
    CHECK(cuMemAlloc(&d, n));
    CHECK(cuMemsetD8(d, 0, n));
    memset(model, 0, n);

    CHECK(cuMemsetD8(d + 3, 0xa5, 1001));
    memset(model + 3, 0xa5, 1001);
    CHECK(cuMemsetD16(d + 2050, 0xbeef, 777));
    for (size_t i = 0; i < 777; i++) memcpy(model + 2050 + 2 * i, &(uint16_t){0xbeef}, 2);
    CHECK(cuMemsetD32(d + 16388, 0xdeadbeefu, 12345));
    for (size_t i = 0; i < 12345; i++) memcpy(model + 16388 + 4 * i, &(uint32_t){0xdeadbeefu}, 4);

    CHECK(cuMemsetD8Async(d + 500001, 0x5a, 99999, s));
    memset(model + 500001, 0x5a, 99999);
    CHECK(cuMemsetD16Async(d + 600002, 0x1234, 33333, s));
    for (size_t i = 0; i < 33333; i++) memcpy(model + 600002 + 2 * i, &(uint16_t){0x1234}, 2);
    CHECK(cuMemsetD32Async(d + 800004, 0xcafebabeu, 22221, s));
    for (size_t i = 0; i < 22221; i++) memcpy(model + 800004 + 4 * i, &(uint32_t){0xcafebabeu}, 4);
    CHECK(cuMemsetD8Async(d + n - 1, 0x77, 1, s));
    model[n - 1] = 0x77;
    CHECK(cuStreamSynchronize(s));

    CHECK(cuMemcpyDtoH(got, d, n));
    verify("memsets D8/D16/D32(+Async)", n, "pageable", got, model);

    SHOW("cuMemsetD16 at odd address", cuMemsetD16(d + 1, 0x1111, 4));
    SHOW("cuMemsetD32 at address 2 mod 4", cuMemsetD32(d + 2, 0x11111111u, 4));
    CHECK(cuMemFree(d));
    free(model);
    free(got);
}

static void ranges_and_attributes(void) {
    CUdeviceptr p, base = 0;
    size_t size = 0;
    CHECK(cuMemAlloc(&p, 1u << 20));
    CHECK(cuMemGetAddressRange(&base, &size, p + 12345));
    printf("address range of p+12345: base matches: %s size=%zu\n", yes_no(base == p), size);
    CHECK(cuMemGetAddressRange(NULL, &size, p + (1u << 20) - 1));
    printf("address range of last byte (NULL base): size=%zu\n", size);
    SHOW("cuMemGetAddressRange past the end", cuMemGetAddressRange(&base, &size, p + (1u << 20)));
    SHOW("cuMemGetAddressRange(0x1000)", cuMemGetAddressRange(&base, &size, (CUdeviceptr)0x1000));

    unsigned memtype = 0;
    CUcontext owner = NULL;
    int ordinal = -1;
    size_t range = 0;
    CUdeviceptr start = 0;
    unsigned long long managed = 0, mapped = 0;
    CHECK(cuPointerGetAttribute(&memtype, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, p + 100));
    CHECK(cuPointerGetAttribute(&owner, CU_POINTER_ATTRIBUTE_CONTEXT, p + 100));
    CHECK(cuPointerGetAttribute(&ordinal, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, p + 100));
    CHECK(cuPointerGetAttribute(&range, CU_POINTER_ATTRIBUTE_RANGE_SIZE, p + 100));
    CHECK(cuPointerGetAttribute(&start, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, p + 100));
    CHECK(cuPointerGetAttribute(&managed, CU_POINTER_ATTRIBUTE_IS_MANAGED, p + 100));
    CHECK(cuPointerGetAttribute(&mapped, CU_POINTER_ATTRIBUTE_MAPPED, p + 100));
    printf("device pointer attrs: memory type=%u context is current: %s device ordinal=%d "
           "range size=%zu range start matches: %s managed=%d mapped=%d\n",
           memtype, yes_no(owner == g_ctx), ordinal, range, yes_no(start == p), managed != 0,
           mapped != 0);
    SHOW("cuPointerGetAttribute(MEMORY_TYPE) of 0x1000",
         cuPointerGetAttribute(&memtype, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)0x1000));
    SHOW("cuPointerGetAttribute(invalid attribute 9999)",
         cuPointerGetAttribute(&memtype, (CUpointer_attribute)9999, p));
    CHECK(cuMemFree(p));

    void *h = NULL;
    CHECK(cuMemAllocHost(&h, 8192));
    memtype = 0;
    CHECK(cuPointerGetAttribute(&memtype, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)(uintptr_t)h));
    printf("cuMemAllocHost pointer memory type=%u\n", memtype);
    CHECK(cuMemFreeHost(h));

    CUdeviceptr pp;
    size_t pitch = 0;
    CHECK(cuMemAllocPitch(&pp, &pitch, 1000, 37, 4));
    printf("cuMemAllocPitch(1000 bytes x 37 rows, element 4): pitch=%zu\n", pitch);
    CHECK(cuMemGetAddressRange(NULL, &size, pp));
    printf("pitched allocation covers pitch*height: %s\n", yes_no(size >= pitch * 37));
    CHECK(cuMemFree(pp));
    CHECK(cuMemAllocPitch(&pp, &pitch, 3, 5, 16));
    printf("cuMemAllocPitch(3 bytes x 5 rows, element 16): pitch=%zu\n", pitch);
    CHECK(cuMemFree(pp));
    SHOW("cuMemAllocPitch element size 3", cuMemAllocPitch(&pp, &pitch, 64, 4, 3));
}

/* cuMemHostAlloc with flags 0 and PORTABLE, cuMemHostRegister on a page-aligned buffer. */
static void host_memory(CUstream s) {
    const size_t n = 1u << 20;
    unsigned char *check = xmalloc(n);
    CUdeviceptr d;
    CHECK(cuMemAlloc(&d, n));
    static const unsigned flags[] = {0, CU_MEMHOSTALLOC_PORTABLE};
    for (int i = 0; i < 2; i++) {
        unsigned char *h = NULL;
        CHECK(cuMemHostAlloc((void **)&h, n, flags[i]));
        fill_pattern(h, n, 1000u + flags[i]);
        CHECK(cuMemcpyHtoDAsync(d, h, n, s));
        CHECK(cuMemsetD8Async(d, 0x42, 17, s));
        /* The copy reads `h` until it completes: synchronise before reusing the buffer. */
        CHECK(cuStreamSynchronize(s));
        memset(h, 0x42, 17);
        memcpy(check, h, n);
        memset(h, 0, n);
        CHECK(cuMemcpyDtoHAsync(h, d, n, s));
        CHECK(cuStreamSynchronize(s));
        unsigned memtype = 0;
        CHECK(cuPointerGetAttribute(&memtype, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)(uintptr_t)h));
        printf("cuMemHostAlloc flags=0x%x memory type=%u\n", flags[i], memtype);
        verify("cuMemHostAlloc round trip", n, "hostalloc", h, check);
        CHECK(cuMemFreeHost(h));
    }

    void *raw = NULL;
    REQUIRE(posix_memalign(&raw, 4096, n) == 0, "posix_memalign");
    unsigned char *reg = raw;
    unsigned memtype = 0;
    SHOW("cuPointerGetAttribute(MEMORY_TYPE) of unregistered malloc memory",
         cuPointerGetAttribute(&memtype, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)(uintptr_t)reg));
    CHECK(cuMemHostRegister(reg, n, 0));
    memtype = 0;
    CHECK(cuPointerGetAttribute(&memtype, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)(uintptr_t)reg));
    printf("registered memory type=%u\n", memtype);
    SHOW("cuMemHostRegister twice", cuMemHostRegister(reg, n, 0));
    fill_pattern(reg, n, 4242);
    memcpy(check, reg, n);
    CHECK(cuMemcpyHtoDAsync(d, reg, n, s));
    CHECK(cuStreamSynchronize(s));
    memset(reg, 0, n);
    CHECK(cuMemcpyDtoHAsync(reg + 1, d + 1, n - 1, s));
    CHECK(cuStreamSynchronize(s));
    check[0] = 0;
    verify("registered round trip", n, "register", reg, check);
    CHECK(cuMemHostUnregister(reg));
    SHOW("cuMemHostUnregister twice", cuMemHostUnregister(reg));
    SHOW("cuMemHostRegister size 0", cuMemHostRegister(reg, 0, 0));
    free(raw);
    CHECK(cuMemFree(d));
    free(check);
}

static void error_paths(void) {
    CUdeviceptr p, q;
    SHOW("cuMemAlloc(0 bytes)", cuMemAlloc(&p, 0));
    SHOW("cuMemAlloc(1 PiB)", cuMemAlloc(&p, (size_t)1 << 50));
    SHOW("cuMemFree(0x1234)", cuMemFree((CUdeviceptr)0x1234));
    CHECK(cuMemAlloc(&p, 4096));
    CHECK(cuMemAlloc(&q, 4096));
    SHOW("cuMemFree(p+16) (not the base)", cuMemFree(p + 16));
    unsigned char buf[8192];
    memset(buf, 0, sizeof buf);
    SHOW("cuMemcpyDtoH 8192 from a 4096 allocation", cuMemcpyDtoH(buf, p, sizeof buf));
    SHOW("cuMemcpyHtoD crossing the end", cuMemcpyHtoD(p + 4000, buf, 200));
    SHOW("cuMemcpyDtoD crossing the end", cuMemcpyDtoD(q, p + 100, 4096));
    SHOW("cuMemcpyHtoD to 0x1000", cuMemcpyHtoD((CUdeviceptr)0x1000, buf, 16));
    SHOW("cuMemcpyDtoH from 0x1000", cuMemcpyDtoH(buf, (CUdeviceptr)0x1000, 16));
    SHOW("cuMemcpyHtoD of 0 bytes", cuMemcpyHtoD(p, buf, 0));
    CHECK(cuMemFree(q));
    SHOW("cuMemFree twice", cuMemFree(q));
    SHOW("cuMemcpyHtoD into a freed allocation", cuMemcpyHtoD(q, buf, 16));
    SHOW("cuMemFreeHost(NULL)", cuMemFreeHost(NULL));
    SHOW("cuMemGetInfo(NULL, NULL)", cuMemGetInfo(NULL, NULL));

    /* The context survives all of the above. */
    fill_pattern(buf, 4096, 9);
    CHECK(cuMemcpyHtoD(p, buf, 4096));
    memset(buf + 4096, 0, 4096);
    CHECK(cuMemcpyDtoH(buf + 4096, p, 4096));
    REQUIRE(memcmp(buf, buf + 4096, 4096) == 0, "round trip after errors");
    CHECK(cuCtxSynchronize());
    printf("context usable after error paths: yes\n");
    CHECK(cuMemFree(p));
}

int main(void) {
    start();
    CUdevice dev;
    CUstream s;
    g_ctx = init_primary(&dev);
    /* A blocking stream: the synchronous copies and memsets of this program run on the legacy
     * NULL stream and may still be in flight when they return (device-side work, or DMA from
     * the driver's staging buffer); a blocking stream is ordered after them, a non-blocking
     * one would race with them. */
    CHECK(cuStreamCreate(&s, CU_STREAM_DEFAULT));

    size_t freeb = 0, total = 0;
    CHECK(cuMemGetInfo(&freeb, &total));
    printf("cuMemGetInfo: free<=total: %s total>0: %s\n", yes_no(freeb <= total), yes_no(total > 0));

    for (size_t k = 0; k < NSIZES; k++) {
        CUdeviceptr p;
        CHECK(cuMemAlloc(&p, SIZES[k]));
        CHECK(cuMemFree(p));
        printf("cuMemAlloc/cuMemFree %zu bytes: ok\n", SIZES[k]);
    }
    void *h;
    CHECK(cuMemAllocHost(&h, 12345));
    CHECK(cuMemFreeHost(h));
    printf("cuMemAllocHost/cuMemFreeHost 12345 bytes: ok\n");

    ranges_and_attributes();
    copies(s);
    memsets(s);
    host_memory(s);
    error_paths();

    CHECK(cuStreamDestroy(s));
    release_primary(dev);
    finish("memory");
    return 0;
}
