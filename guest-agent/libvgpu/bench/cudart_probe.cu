// A minimal CUDA runtime program (cudaMalloc, a kernel launch, cudaDeviceSynchronize):
// device/cudart-probe.sh runs it natively and through libvgpu to show where runtime
// (libcudart) programs stand — they need cuGetExportTable's private tables, which libvgpu
// does not have.
#include <cstdio>
#include <cuda_runtime.h>
__global__ void add(float *x, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] += 1.0f; }
int main() {
    float *d = nullptr;
    cudaError_t e = cudaMalloc(&d, 1024 * sizeof(float));
    printf("cudaMalloc -> %s (%s)\n", cudaGetErrorName(e), cudaGetErrorString(e));
    if (e != cudaSuccess) return 1;
    add<<<4, 256>>>(d, 1024);
    e = cudaDeviceSynchronize();
    printf("kernel + cudaDeviceSynchronize -> %s\n", cudaGetErrorName(e));
    return e != cudaSuccess;
}
