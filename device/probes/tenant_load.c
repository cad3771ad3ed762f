/* One tenant's load for device/tenants-bench.sh: attaches, warms up, waits for the file GO,
 * then runs MODE for SECONDS and prints one line:
 *   "mode=<m> n=<iterations> rate=<per second> p50_us=<..> p99_us=<..> [gbps=<..>]"
 *
 *   tenant_load MODE SECONDS GO
 *
 * MODE: launch — an empty kernel launch + cuCtxSynchronize per iteration (launch-bound);
 *       copy   — a 4 MiB cuMemcpyHtoD from pinned memory per iteration (copy-bound);
 *       long   — a kernel that spins ~5 ms on the GPU + cuCtxSynchronize (a tenant with
 *                long kernels, for the fairness probe);
 *       fault  — after 1 s of the launch load, a kernel that writes to address 0; prints
 *                "mode=fault error=<what the synchronize returned>" (the containment probe).
 * Kernels are PTX text JIT-compiled by the driver (no toolkit needed at run time). Driver
 * API only; runs natively or through libvgpu. */
#define _POSIX_C_SOURCE 199309L
#include <cuda.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *PTX =
    ".version 8.0\n.target sm_90\n.address_size 64\n"
    ".visible .entry empty()\n{\n ret;\n}\n"
    ".visible .entry spin(.param .u64 cycles)\n{\n .reg .pred %p;\n .reg .b64 %r<4>;\n"
    " ld.param.u64 %r1, [cycles];\n mov.u64 %r2, %clock64;\nLOOP:\n mov.u64 %r3, %clock64;\n"
    " sub.s64 %r3, %r3, %r2;\n setp.lt.u64 %p, %r3, %r1;\n @%p bra LOOP;\n ret;\n}\n"
    ".visible .entry fault()\n{\n .reg .b64 %a;\n .reg .b32 %v;\n mov.u64 %a, 0;\n mov.u32 %v, 1;\n"
    " st.global.u32 [%a], %v;\n ret;\n}\n";

#define CHECK(x)                                                                      \
    do {                                                                              \
        CUresult r_ = (x);                                                            \
        if (r_ != CUDA_SUCCESS) {                                                     \
            const char *s_ = "?";                                                     \
            cuGetErrorName(r_, &s_);                                                  \
            printf("mode=error call=%s error=%s\n", #x, s_);                          \
            return 1;                                                                 \
        }                                                                             \
    } while (0)

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s launch|copy|long SECONDS GO\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1];
    double seconds = atof(argv[2]);
    CUdevice dev;
    CUcontext ctx;
    CUmodule mod;
    CUfunction empty, spin, fault;
    CHECK(cuInit(0));
    CHECK(cuDeviceGet(&dev, 0));
    CHECK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CHECK(cuCtxSetCurrent(ctx));
    CHECK(cuModuleLoadData(&mod, PTX));
    CHECK(cuModuleGetFunction(&empty, mod, "empty"));
    CHECK(cuModuleGetFunction(&spin, mod, "spin"));
    CHECK(cuModuleGetFunction(&fault, mod, "fault"));
    const size_t bytes = 4 << 20;
    CUdeviceptr d;
    void *h;
    CHECK(cuMemAlloc(&d, bytes));
    CHECK(cuMemAllocHost(&h, bytes));
    memset(h, 1, bytes);
    int clock_khz = 0;
    CHECK(cuDeviceGetAttribute(&clock_khz, CU_DEVICE_ATTRIBUTE_CLOCK_RATE, dev));
    unsigned long long cycles = (unsigned long long)clock_khz * 5; /* ~5 ms */
    void *spin_args[] = {&cycles};
    int m = strcmp(mode, "launch") == 0 ? 0 : strcmp(mode, "copy") == 0 ? 1 : strcmp(mode, "long") == 0 ? 2 : 3;
    if (m == 3) seconds = 1.0;
    /* Warm up. */
    for (int i = 0; i < 50; i++) {
        CHECK(cuLaunchKernel(empty, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL));
        CHECK(cuMemcpyHtoD(d, h, bytes));
    }
    CHECK(cuCtxSynchronize());
    printf("ready\n");
    fflush(stdout);
    for (int i = 0; i < 6000 && access(argv[3], F_OK) != 0; i++) {
        struct timespec t = {0, 5 * 1000 * 1000};
        nanosleep(&t, NULL);
    }
    size_t cap = 1 << 22, n = 0;
    double *lat = malloc(cap * sizeof *lat);
    double start = now_us(), end = start + seconds * 1e6, t = start;
    while (t < end && n < cap) {
        double t0 = t;
        if (m == 0 || m == 3) {
            CHECK(cuLaunchKernel(empty, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL));
            CHECK(cuCtxSynchronize());
        } else if (m == 1) {
            CHECK(cuMemcpyHtoD(d, h, bytes));
        } else {
            CHECK(cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, NULL, spin_args, NULL));
            CHECK(cuCtxSynchronize());
        }
        t = now_us();
        lat[n++] = t - t0;
    }
    if (m == 3) {
        CUresult r = cuLaunchKernel(fault, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL);
        if (r == CUDA_SUCCESS) r = cuCtxSynchronize();
        const char *s = "?";
        cuGetErrorName(r, &s);
        printf("mode=fault error=%s\n", s);
        fflush(stdout);
        return 0;
    }
    double elapsed = (t - start) / 1e6;
    qsort(lat, n, sizeof *lat, cmp);
    double p50 = n ? lat[(n - 1) / 2] : 0, p99 = n ? lat[(size_t)((n - 1) * 0.99)] : 0;
    printf("mode=%s n=%zu rate=%.1f p50_us=%.2f p99_us=%.2f", mode, n, n / elapsed, p50, p99);
    if (m == 1) printf(" gbps=%.2f", n * (double)bytes / elapsed / 1e9);
    printf("\n");
    fflush(stdout);
    return 0;
}
