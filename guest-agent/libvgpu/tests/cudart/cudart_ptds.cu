// Per-thread default streams as nvcc's `--default-stream per-thread` builds them: each
// thread's NULL stream is its own stream, so a second thread's work completes while the
// first thread's stream is held by a kernel waiting on a host flag. device/cudart-gpu.sh
// builds this with `--default-stream per-thread`, runs it natively and through libvgpu,
// and compares the outputs (with per-thread streams aliased to the legacy stream, the
// second thread's query would stay cudaErrorNotReady).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>
#include <thread>

#define CHECK(call)                                                                      \
    do {                                                                                 \
        cudaError_t err_ = (call);                                                       \
        if (err_ != cudaSuccess) {                                                       \
            printf("FAIL: %s -> %s\n", #call, cudaGetErrorName(err_));                   \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

__global__ void wait_flag(volatile int *flag) {
    while (*flag == 0) {
    }
}

__global__ void increment(int *x) { atomicAdd(x, 1); }

int main() {
    int *host_flag = nullptr, *dev_flag = nullptr, *x = nullptr;
    CHECK(cudaHostAlloc((void **)&host_flag, sizeof(int), cudaHostAllocMapped));
    *(volatile int *)host_flag = 0;
    CHECK(cudaHostGetDevicePointer((void **)&dev_flag, host_flag, 0));
    CHECK(cudaMalloc(&x, sizeof(int)));
    CHECK(cudaMemset(x, 0, sizeof(int)));
    CHECK(cudaDeviceSynchronize());

    // Thread A: a kernel on its per-thread stream that waits for the host flag.
    std::thread a([&] { wait_flag<<<1, 1>>>((volatile int *)dev_flag); });
    a.join();
    // Thread B: its own per-thread stream is not held by A's.
    cudaError_t b_result = cudaErrorUnknown;
    std::thread b([&] {
        increment<<<1, 1>>>(x);
        auto start = std::chrono::steady_clock::now();
        do {
            b_result = cudaStreamQuery(0);
        } while (b_result == cudaErrorNotReady && std::chrono::steady_clock::now() - start < std::chrono::seconds(5));
    });
    b.join();
    printf("ok: a second thread's stream completed while the first's was held: %s\n", cudaGetErrorName(b_result));
    *(volatile int *)host_flag = 1;
    CHECK(cudaDeviceSynchronize());
    int got = 0;
    CHECK(cudaMemcpy(&got, x, sizeof got, cudaMemcpyDeviceToHost));
    printf("ok: increment ran once: %d\n", got);
    // The legacy stream waits for the per-thread streams (they are blocking streams).
    CHECK(cudaStreamSynchronize(cudaStreamLegacy));
    CHECK(cudaFree(x));
    CHECK(cudaFreeHost(host_flag));
    printf("PASSED\n");
    return 0;
}
