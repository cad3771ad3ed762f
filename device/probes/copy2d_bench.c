/* 2-D copies and memsets through the CUDA runtime, timed: the same program natively and
 * through libvgpu (device/diag.sh runs both), for docs/BENCHMARKS.md. 16 MiB blocks (4096 rows
 * of 4096 bytes; the device side pitched by cudaMallocPitch), pageable and pinned host memory,
 * 7 rounds of 10 copies each; prints the median and range of GB/s over rounds per case.
 * Build: nvcc -O2 -o copy2d_bench device/probes/copy2d_bench.c */
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHECK(call)                                                                               \
    do {                                                                                          \
        cudaError_t e_ = (call);                                                                  \
        if (e_ != cudaSuccess) {                                                                  \
            printf("FAIL: %s -> %s\n", #call, cudaGetErrorName(e_));                              \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)

enum { W = 4096, H = 4096, ROUNDS = 7, REPS = 10 };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void *dev, *dev2, *pageable, *pinned;
static size_t pitch;
static cudaStream_t s;

static void run(int which) {
    switch (which) {
    case 0: CHECK(cudaMemcpy2D(dev, pitch, pageable, W, W, H, cudaMemcpyHostToDevice)); break;
    case 1: CHECK(cudaMemcpy2D(pageable, W, dev, pitch, W, H, cudaMemcpyDeviceToHost)); break;
    case 2: CHECK(cudaMemcpy2DAsync(dev, pitch, pinned, W, W, H, cudaMemcpyHostToDevice, s)); break;
    case 3: CHECK(cudaMemcpy2DAsync(pinned, W, dev, pitch, W, H, cudaMemcpyDeviceToHost, s)); break;
    case 4: CHECK(cudaMemcpy2DAsync(dev2, pitch, dev, pitch, W, H, cudaMemcpyDeviceToDevice, s)); break;
    case 5: CHECK(cudaMemset2DAsync(dev, pitch, 7, W, H, s)); break;
    case 6: CHECK(cudaMemcpy(dev, pageable, (size_t)W * H, cudaMemcpyHostToDevice)); break;
    }
}

int main(void) {
    static const char *names[] = {
        "cudaMemcpy2D host->device, pageable", "cudaMemcpy2D device->host, pageable",
        "cudaMemcpy2DAsync host->device, pinned", "cudaMemcpy2DAsync device->host, pinned",
        "cudaMemcpy2DAsync device->device", "cudaMemset2DAsync",
        "cudaMemcpy (1-D, same bytes) host->device, pageable",
    };
    CHECK(cudaMallocPitch(&dev, &pitch, W, H));
    CHECK(cudaMallocPitch(&dev2, &pitch, W, H));
    CHECK(cudaMallocHost(&pinned, (size_t)W * H));
    CHECK(cudaStreamCreate(&s));
    pageable = malloc((size_t)W * H);
    memset(pageable, 1, (size_t)W * H);
    memset(pinned, 2, (size_t)W * H);
    for (int which = 0; which < 7; which++) {
        double gbs[ROUNDS];
        run(which); /* warm */
        CHECK(cudaStreamSynchronize(s));
        CHECK(cudaDeviceSynchronize());
        for (int r = 0; r < ROUNDS; r++) {
            double t0 = now();
            for (int i = 0; i < REPS; i++) run(which);
            CHECK(cudaStreamSynchronize(s));
            CHECK(cudaDeviceSynchronize());
            gbs[r] = (double)W * H * REPS / (now() - t0) / 1e9;
        }
        qsort(gbs, ROUNDS, sizeof gbs[0], cmp);
        printf("%-52s %7.2f GB/s [%.2f-%.2f]\n", names[which], gbs[ROUNDS / 2], gbs[0], gbs[ROUNDS - 1]);
    }
    printf("done\n");
    return 0;
}
