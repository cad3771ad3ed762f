// Kernels of the native-versus-remoted benchmark (bench.c). Built by device/libvgpu-bench.sh
// into bench_kernels.fatbin (sm_90 code and compute_90 PTX); loaded with cuModuleLoadData, so
// every symbol is extern "C" (unmangled).

// Does nothing: launch overhead only.
extern "C" __global__ void empty(void) {}

// Compute-bound: eight independent FMA chains per thread, `iters` rounds, 16 FLOP per round
// per thread. a and b keep the values bounded (|a| < 1). One store per thread, so the compiler
// cannot drop the loop and memory traffic is negligible.
extern "C" __global__ void fma_loop(float *out, int iters, float a, float b) {
    float x0 = threadIdx.x * 1e-3f, x1 = x0 + 0.1f, x2 = x0 + 0.2f, x3 = x0 + 0.3f;
    float x4 = x0 + 0.4f, x5 = x0 + 0.5f, x6 = x0 + 0.6f, x7 = x0 + 0.7f;
#pragma unroll 4
    for (int i = 0; i < iters; i++) {
        x0 = fmaf(x0, a, b);
        x1 = fmaf(x1, a, b);
        x2 = fmaf(x2, a, b);
        x3 = fmaf(x3, a, b);
        x4 = fmaf(x4, a, b);
        x5 = fmaf(x5, a, b);
        x6 = fmaf(x6, a, b);
        x7 = fmaf(x7, a, b);
    }
    out[(unsigned long long)blockIdx.x * blockDim.x + threadIdx.x] =
        x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7;
}
