/* One tenant process for device/tenancy-gpu.sh: attaches (cuInit, a context), allocates
 * CHUNK bytes at a time until TARGET bytes are held or the driver refuses, says what it
 * holds on one line, keeps it until the file GO exists (at most 120 s), then exits.
 *
 *   tenant_alloc TARGET CHUNK GO
 *
 * Output: "attached held=<bytes> stop=<CUDA error name or 'target'>", or
 * "refused <CUDA error name>" when cuInit or the context fails (a session over a zone's
 * limits). Built against the toolkit's cuda.h and stub libcuda; run natively or through
 * libvgpu. */
#define _POSIX_C_SOURCE 199309L
#include <cuda.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static const char *name(CUresult r) {
    const char *s = NULL;
    if (cuGetErrorName(r, &s) != CUDA_SUCCESS || s == NULL) return "unknown";
    return s;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s TARGET CHUNK GO\n", argv[0]);
        return 2;
    }
    unsigned long long target = strtoull(argv[1], NULL, 0), chunk = strtoull(argv[2], NULL, 0);
    CUresult r = cuInit(0);
    CUdevice dev;
    CUcontext ctx;
    if (r == CUDA_SUCCESS) r = cuDeviceGet(&dev, 0);
    if (r == CUDA_SUCCESS) r = cuDevicePrimaryCtxRetain(&ctx, dev);
    if (r == CUDA_SUCCESS) r = cuCtxSetCurrent(ctx);
    if (r != CUDA_SUCCESS) {
        printf("refused %s\n", name(r));
        fflush(stdout);
        return 0;
    }
    unsigned long long held = 0;
    const char *stop = "target";
    while (chunk > 0 && held + chunk <= target) {
        CUdeviceptr p;
        r = cuMemAlloc(&p, chunk);
        if (r != CUDA_SUCCESS) {
            stop = name(r);
            break;
        }
        held += chunk;
    }
    printf("attached held=%llu stop=%s\n", held, stop);
    fflush(stdout);
    /* Hold until told to go. */
    for (int i = 0; i < 2400 && access(argv[3], F_OK) != 0; i++) {
        struct timespec t = {0, 50 * 1000 * 1000};
        nanosleep(&t, NULL);
    }
    return 0;
}
