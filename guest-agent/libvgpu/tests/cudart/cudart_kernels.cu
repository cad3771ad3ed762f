// CUDA runtime kernels as nvcc builds them (fatbins registered by the runtime, launched
// with <<<>>> and cudaLaunchKernel): device/cudart-gpu.sh builds this with nvcc (static
// and shared libcudart), runs it natively and through libvgpu, and compares the outputs.
// Every check prints "ok: ..." with values that are the same on any run; the first
// failure prints "FAIL: ..." and exits 1.
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>
#include <unistd.h>

#define CHECK(call)                                                                      \
    do {                                                                                 \
        cudaError_t err_ = (call);                                                       \
        if (err_ != cudaSuccess) {                                                       \
            printf("FAIL: %s -> %s: %s\n", #call, cudaGetErrorName(err_),                \
                   cudaGetErrorString(err_));                                            \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

__constant__ float scale_c;
__device__ int counter_d;

__global__ void add_one(float *x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += 1.0f;
}

template <typename T> __global__ void axpy(T a, const T *x, T *y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] * scale_c + y[i];
}

// Reads a texture of an array at (x + 0.5, y + 0.5) (point filtering: the texel itself)
// and writes twice the value through a surface of another array.
__global__ void tex_to_surf(cudaTextureObject_t tex, cudaSurfaceObject_t surf, int w, int h) {
    int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x < w && y < h) surf2Dwrite(2.0f * tex2D<float>(tex, x + 0.5f, y + 0.5f), surf, x * (int)sizeof(float), y);
}

// Reads a texture of linear memory (one float per texel) at every index.
__global__ void fetch_linear(cudaTextureObject_t tex, float *out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = tex1Dfetch<float>(tex, i) + 1.0f;
}

__global__ void count(int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) atomicAdd(&counter_d, 1);
}

__global__ void reverse_shared(int *x, int n) {
    extern __shared__ int s[];
    int t = threadIdx.x;
    if (t < n) s[t] = x[t];
    __syncthreads();
    if (t < n) x[t] = s[n - 1 - t];
}

static volatile int release_gate = 0;
static volatile int gate_ran = 0;

// A host function that holds its stream until the main thread releases it (at most 5 s).
static void CUDART_CB gate(void *) {
    for (int i = 0; i < 5000 && !release_gate; i++) usleep(1000);
    gate_ran = 1;
}

int main() {
    const int n = 1 << 20;
    float *d = nullptr;
    CHECK(cudaMalloc(&d, n * sizeof(float)));
    CHECK(cudaMemset(d, 0, n * sizeof(float)));
    add_one<<<(n + 255) / 256, 256>>>(d, n);
    add_one<<<(n + 255) / 256, 256>>>(d, n);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    float *h = (float *)malloc(n * sizeof(float));
    CHECK(cudaMemcpy(h, d, n * sizeof(float), cudaMemcpyDeviceToHost));
    for (int i = 0; i < n; i++)
        if (h[i] != 2.0f) { printf("FAIL: add_one x[%d] = %f\n", i, h[i]); return 1; }
    printf("ok: two <<<>>> launches of add_one over %d floats\n", n);

    // Templates, __constant__ memory and cudaLaunchKernel.
    float s = 0.5f;
    CHECK(cudaMemcpyToSymbol(scale_c, &s, sizeof s));
    float *y = nullptr;
    CHECK(cudaMalloc(&y, n * sizeof(float)));
    for (int i = 0; i < n; i++) h[i] = (float)(i % 100);
    CHECK(cudaMemcpy(y, h, n * sizeof(float), cudaMemcpyHostToDevice));
    float a = 3.0f;
    int nn = n;
    const float *dx = d;
    void *args[] = {&a, &dx, &y, &nn};
    CHECK(cudaLaunchKernel((const void *)axpy<float>, dim3((n + 127) / 128), dim3(128), args, 0, 0));
    CHECK(cudaMemcpy(h, y, n * sizeof(float), cudaMemcpyDeviceToHost));
    for (int i = 0; i < n; i++) {
        float want = 3.0f * 2.0f * 0.5f + (float)(i % 100);
        if (h[i] != want) { printf("FAIL: axpy y[%d] = %f, want %f\n", i, h[i], want); return 1; }
    }
    printf("ok: cudaLaunchKernel of axpy<float> with a __constant__ scale\n");

    // A __device__ global, atomics, cudaMemcpyFromSymbol.
    int zero = 0, got = -1;
    CHECK(cudaMemcpyToSymbol(counter_d, &zero, sizeof zero));
    count<<<64, 128>>>(5000);
    CHECK(cudaMemcpyFromSymbol(&got, counter_d, sizeof got));
    if (got != 5000) { printf("FAIL: counter %d\n", got); return 1; }
    printf("ok: atomics on a __device__ global: %d\n", got);

    // Dynamic shared memory, a stream, function attributes.
    int *xi = nullptr, hi[256];
    for (int i = 0; i < 256; i++) hi[i] = i;
    CHECK(cudaMalloc(&xi, sizeof hi));
    cudaStream_t st;
    CHECK(cudaStreamCreate(&st));
    CHECK(cudaMemcpyAsync(xi, hi, sizeof hi, cudaMemcpyHostToDevice, st));
    reverse_shared<<<1, 256, 256 * sizeof(int), st>>>(xi, 256);
    CHECK(cudaMemcpyAsync(hi, xi, sizeof hi, cudaMemcpyDeviceToHost, st));
    CHECK(cudaStreamSynchronize(st));
    for (int i = 0; i < 256; i++)
        if (hi[i] != 255 - i) { printf("FAIL: reverse x[%d] = %d\n", i, hi[i]); return 1; }
    printf("ok: dynamic shared memory on a stream\n");
    cudaFuncAttributes fa;
    CHECK(cudaFuncGetAttributes(&fa, reverse_shared));
    printf("ok: reverse_shared: max threads per block %d\n", fa.maxThreadsPerBlock);

    // Zero-copy: mapped pinned host memory written by a kernel, read by the host.
    float *zh = nullptr, *zd = nullptr;
    CHECK(cudaHostAlloc((void **)&zh, 4096 * sizeof(float), cudaHostAllocMapped));
    for (int i = 0; i < 4096; i++) zh[i] = (float)i;
    CHECK(cudaHostGetDevicePointer((void **)&zd, zh, 0));
    add_one<<<16, 256>>>(zd, 4096);
    CHECK(cudaDeviceSynchronize());
    for (int i = 0; i < 4096; i++)
        if (zh[i] != (float)i + 1.0f) { printf("FAIL: zero-copy x[%d] = %f\n", i, zh[i]); return 1; }
    unsigned int hflags = 0;
    CHECK(cudaHostGetFlags(&hflags, zh));
    printf("ok: zero-copy host memory written by a kernel (flags %u)\n", hflags);
    CHECK(cudaFreeHost(zh));

    // A host function runs in stream order and holds the stream's later work.
    cudaEvent_t after;
    CHECK(cudaEventCreate(&after));
    CHECK(cudaLaunchHostFunc(st, gate, nullptr));
    CHECK(cudaEventRecord(after, st));
    usleep(20000);
    cudaError_t held = cudaEventQuery(after);
    release_gate = 1;
    CHECK(cudaEventSynchronize(after));
    printf("ok: a host function holds its stream: query while held -> %s, then ran %d\n", cudaGetErrorName(held),
           gate_ran);
    CHECK(cudaEventDestroy(after));

    // Texture and surface objects: a kernel samples one array and writes another.
    {
        const int w = 64, hh = 32;
        cudaChannelFormatDesc ch = cudaCreateChannelDesc<float>();
        cudaArray_t in = nullptr, out = nullptr;
        CHECK(cudaMallocArray(&in, &ch, w, hh));
        CHECK(cudaMallocArray(&out, &ch, w, hh, cudaArraySurfaceLoadStore));
        static float img[32][64], res[32][64];
        for (int y = 0; y < hh; y++)
            for (int x = 0; x < w; x++) img[y][x] = (float)(y * 100 + x);
        CHECK(cudaMemcpy2DToArray(in, 0, 0, img, w * sizeof(float), w * sizeof(float), hh, cudaMemcpyHostToDevice));
        cudaResourceDesc rin = {}, rout = {};
        rin.resType = cudaResourceTypeArray;
        rin.res.array.array = in;
        rout.resType = cudaResourceTypeArray;
        rout.res.array.array = out;
        cudaTextureDesc td = {};
        td.addressMode[0] = td.addressMode[1] = cudaAddressModeClamp;
        td.filterMode = cudaFilterModePoint;
        td.readMode = cudaReadModeElementType;
        cudaTextureObject_t tex = 0;
        cudaSurfaceObject_t surf = 0;
        CHECK(cudaCreateTextureObject(&tex, &rin, &td, nullptr));
        CHECK(cudaCreateSurfaceObject(&surf, &rout));
        tex_to_surf<<<dim3(w / 16, hh / 16), dim3(16, 16)>>>(tex, surf, w, hh);
        CHECK(cudaGetLastError());
        CHECK(cudaMemcpy2DFromArray(res, w * sizeof(float), out, 0, 0, w * sizeof(float), hh, cudaMemcpyDeviceToHost));
        for (int y = 0; y < hh; y++)
            for (int x = 0; x < w; x++)
                if (res[y][x] != 2.0f * img[y][x]) { printf("FAIL: surface (%d, %d) = %f\n", x, y, res[y][x]); return 1; }
        printf("ok: a kernel read a texture object of an array and wrote a surface object\n");
        // A texture of linear memory, fetched by index.
        float *lin = nullptr, *fetched = nullptr;
        CHECK(cudaMalloc(&lin, 256 * sizeof(float)));
        CHECK(cudaMalloc(&fetched, 256 * sizeof(float)));
        CHECK(cudaMemcpy(lin, img, 256 * sizeof(float), cudaMemcpyHostToDevice));
        cudaResourceDesc rl = {};
        rl.resType = cudaResourceTypeLinear;
        rl.res.linear.devPtr = lin;
        rl.res.linear.desc = ch;
        rl.res.linear.sizeInBytes = 256 * sizeof(float);
        cudaTextureObject_t ltex = 0;
        CHECK(cudaCreateTextureObject(&ltex, &rl, &td, nullptr));
        fetch_linear<<<1, 256>>>(ltex, fetched, 256);
        static float fl[256];
        CHECK(cudaMemcpy(fl, fetched, sizeof fl, cudaMemcpyDeviceToHost));
        for (int i = 0; i < 256; i++)
            if (fl[i] != (&img[0][0])[i] + 1.0f) { printf("FAIL: linear texel %d = %f\n", i, fl[i]); return 1; }
        printf("ok: a kernel fetched a texture object of linear memory\n");
        CHECK(cudaDestroyTextureObject(ltex));
        CHECK(cudaDestroyTextureObject(tex));
        CHECK(cudaDestroySurfaceObject(surf));
        CHECK(cudaFreeArray(in));
        CHECK(cudaFreeArray(out));
        CHECK(cudaFree(lin));
        CHECK(cudaFree(fetched));
    }

    // A launch error is reported as natively.
    add_one<<<1, 4096>>>(d, n);
    cudaError_t e = cudaGetLastError();
    printf("ok: 4096 threads per block -> %s\n", cudaGetErrorName(e));

    CHECK(cudaStreamDestroy(st));
    CHECK(cudaFree(d));
    CHECK(cudaFree(y));
    CHECK(cudaFree(xi));
    free(h);
    printf("PASSED\n");
    return 0;
}
