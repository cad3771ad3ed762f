// Kernels for the driver API conformance programs. Built by device/libvgpu-gpu.sh into
// kernels.ptx, kernels.cubin and kernels.fatbin (sm_90); the programs load them with the
// module and library APIs, so every symbol here is extern "C" (unmangled).

struct Pair16 {
    long long a;
    long long b;
};

__device__ unsigned g_scale;
__device__ unsigned g_table[64];

// p[i] = v for i < n (grid-stride).
extern "C" __global__ void fill_u32(unsigned *p, unsigned v, unsigned long long n) {
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride)
        p[i] = v;
}

// Spins for about spin_cycles clock cycles per thread, then fills like fill_u32.
extern "C" __global__ void spin_fill(unsigned *p, unsigned v, unsigned long long n,
                                     long long spin_cycles) {
    long long start = clock64();
    while (clock64() - start < spin_cycles) {
    }
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride)
        p[i] = v;
}

// y = a*x + y, rounded as separate multiply and add (no contraction to FMA).
extern "C" __global__ void scale_add(float a, const float *x, float *y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __fadd_rn(__fmul_rn(a, x[i]), y[i]);
}

// Writes every parameter's bits into out[0..11] and an FNV-1a-32 of them into out[12].
extern "C" __global__ void mixed_params(char c, short s, int i, long long l, float f, double d,
                                        Pair16 pair, unsigned *out) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    unsigned v[13];
    unsigned long long ul = (unsigned long long)l;
    unsigned long long ud = (unsigned long long)__double_as_longlong(d);
    unsigned long long pa = (unsigned long long)pair.a;
    unsigned long long pb = (unsigned long long)pair.b;
    v[0] = (unsigned)(int)c;
    v[1] = (unsigned)(int)s;
    v[2] = (unsigned)i;
    v[3] = (unsigned)ul;
    v[4] = (unsigned)(ul >> 32);
    v[5] = __float_as_uint(f);
    v[6] = (unsigned)ud;
    v[7] = (unsigned)(ud >> 32);
    v[8] = (unsigned)pa;
    v[9] = (unsigned)(pa >> 32);
    v[10] = (unsigned)pb;
    v[11] = (unsigned)(pb >> 32);
    unsigned h = 2166136261u;
    for (int k = 0; k < 12; k++) h = (h ^ v[k]) * 16777619u;
    v[12] = h;
    for (int k = 0; k < 13; k++) out[k] = v[k];
}

extern "C" __global__ void add_one_i32(int *p, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] += 1;
}

// out[i] = g_scale * i + g_table[i % 64]; the globals are set with cuModuleGetGlobal.
extern "C" __global__ void read_global(unsigned *out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = g_scale * (unsigned)i + g_table[i & 63];
}

// Reverses each block's chunk of in[] through dynamic shared memory (blockDim.x words).
extern "C" __global__ void reverse_block(const unsigned *in, unsigned *out, int n) {
    extern __shared__ unsigned sh[];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    sh[threadIdx.x] = i < n ? in[i] : 0u;
    __syncthreads();
    int j = blockIdx.x * blockDim.x + (blockDim.x - 1 - threadIdx.x);
    if (j < n) out[j] = sh[threadIdx.x];
}

extern "C" __global__ void empty(void) {}
