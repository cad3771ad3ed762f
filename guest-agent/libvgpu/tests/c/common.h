/* Shared helpers for the CUDA driver API conformance programs (native vs libvgpu).
 *
 * Every program prints only deterministic text (no pointers, timings or free-memory
 * numbers), so the output of a native run and of a run through libvgpu can be diffed.
 * Include this header first: it sets the POSIX feature level before any system header. */
#ifndef VGPU_TEST_COMMON_H
#define VGPU_TEST_COMMON_H

#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include <cuda.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Name of a CUresult; a stable placeholder for codes the driver does not know. */
static inline const char *err_name(CUresult r) {
    static _Thread_local char buf[48];
    const char *s = NULL;
    if (cuGetErrorName(r, &s) != CUDA_SUCCESS || s == NULL) {
        snprintf(buf, sizeof buf, "CUresult(%d)", (int)r);
        return buf;
    }
    return s;
}

/* Aborts the program (exit 1) when a driver call fails. */
#define CHECK(call)                                                                       \
    do {                                                                                  \
        CUresult check_r_ = (call);                                                       \
        if (check_r_ != CUDA_SUCCESS) {                                                   \
            printf("FAIL %s:%d %s -> %s\n", __FILE__, __LINE__, #call, err_name(check_r_)); \
            fprintf(stderr, "FAIL %s:%d %s -> %s\n", __FILE__, __LINE__, #call,           \
                    err_name(check_r_));                                                  \
            fflush(stdout);                                                               \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

/* Aborts the program (exit 1) when a host-side check fails. */
#define REQUIRE(cond, ...)                                                                \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            printf("FAIL %s:%d %s: ", __FILE__, __LINE__, #cond);                         \
            printf(__VA_ARGS__);                                                          \
            printf("\n");                                                                 \
            fprintf(stderr, "FAIL %s:%d %s\n", __FILE__, __LINE__, #cond);                \
            fflush(stdout);                                                               \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

/* Runs a call that may (or is expected to) fail and prints `label -> RESULT_NAME`. */
#define SHOW(label, call)                                                                 \
    do {                                                                                  \
        CUresult show_r_ = (call);                                                        \
        printf("%s -> %s\n", (label), err_name(show_r_));                                 \
    } while (0)

static inline const char *yes_no(int b) { return b ? "yes" : "no"; }

/* FNV-1a 64 of a byte range. */
static inline uint64_t fnv1a(const void *p, size_t n) {
    const unsigned char *b = (const unsigned char *)p;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* Deterministic byte pattern depending on a seed (xorshift). */
static inline void fill_pattern(void *p, size_t n, uint32_t seed) {
    unsigned char *b = (unsigned char *)p;
    uint32_t x = seed * 2654435761u + 0x9e3779b9u;
    if (x == 0) x = 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        b[i] = (unsigned char)(x >> 11);
    }
}

/* Index of the first differing byte, or -1 when equal. */
static inline long long first_diff(const void *a, const void *b, size_t n) {
    const unsigned char *x = (const unsigned char *)a, *y = (const unsigned char *)b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i]) return (long long)i;
    return -1;
}

static inline void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    REQUIRE(p != NULL, "malloc(%zu)", n);
    return p;
}

/* cuInit, device 0, its primary context retained and made current. */
static inline CUcontext init_primary(CUdevice *dev_out) {
    CUdevice dev;
    CUcontext ctx;
    CHECK(cuInit(0));
    CHECK(cuDeviceGet(&dev, 0));
    CHECK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CHECK(cuCtxSetCurrent(ctx));
    if (dev_out) *dev_out = dev;
    return ctx;
}

static inline void release_primary(CUdevice dev) {
    CHECK(cuCtxSetCurrent(NULL));
    CHECK(cuDevicePrimaryCtxRelease(dev));
}

/* Reads dir/name; with nul != 0 a terminating NUL is appended (not counted in *len). */
static inline void *read_file(const char *dir, const char *name, size_t *len, int nul) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    REQUIRE(f != NULL, "cannot open %s", name);
    REQUIRE(fseek(f, 0, SEEK_END) == 0, "seek %s", name);
    long n = ftell(f);
    REQUIRE(n > 0, "empty %s", name);
    REQUIRE(fseek(f, 0, SEEK_SET) == 0, "seek %s", name);
    char *buf = (char *)xmalloc((size_t)n + 1);
    REQUIRE(fread(buf, 1, (size_t)n, f) == (size_t)n, "short read %s", name);
    fclose(f);
    if (nul) buf[n] = '\0';
    if (len) *len = (size_t)n;
    return buf;
}

/* Directory holding kernels.{ptx,cubin,fatbin}: argv[1], else "." */
static inline const char *kernel_dir(int argc, char **argv) {
    return argc > 1 ? argv[1] : ".";
}

/* Line-buffered stdout, so that a crash keeps everything printed before it. Call first. */
static inline void start(void) { setvbuf(stdout, NULL, _IOLBF, 0); }

static inline void finish(const char *prog) {
    printf("OK %s\n", prog);
    fflush(stdout);
}

#endif /* VGPU_TEST_COMMON_H */
