/* A CUDA runtime (libcudart) program without kernels of its own: device count and
 * properties, memory, copies, memsets, streams, events, pinned memory and error names.
 * Built with the system compiler against NVIDIA's libcudart (shared or static, from the
 * PyPI wheels) and run against libvgpu + host-proxy by tests/cudart_sim.rs; the same
 * source runs natively on the GPU machine. Prints "ok: ..." per check, exits 1 at the
 * first failure. */
#include <cuda_runtime_api.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

#define CHECK(call)                                                                        \
    do {                                                                                   \
        cudaError_t err_ = (call);                                                         \
        if (err_ != cudaSuccess) {                                                         \
            printf("FAIL: %s -> %s (%d): %s\n", #call, cudaGetErrorName(err_), (int)err_,  \
                   cudaGetErrorString(err_));                                              \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

#define EXPECT(cond, ...)                                                                  \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            printf("FAIL: " __VA_ARGS__);                                                  \
            printf("\n");                                                                  \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

/* A second thread's first runtime calls: the runtime binds its context to the thread
 * (it asks the driver's context-local storage with no current context first). */
static void *second_thread(void *arg) {
    unsigned char *d = arg;
    static cudaError_t err[3];
    err[0] = cudaMemsetAsync(d, 0x77, 4096, cudaStreamPerThread);
    err[1] = cudaStreamSynchronize(cudaStreamPerThread);
    err[2] = cudaMemset(d + 4096, 0x11, 4096);
    return err;
}

int main(void) {
    int runtime = 0, driver = 0, count = -1;
    CHECK(cudaRuntimeGetVersion(&runtime));
    CHECK(cudaDriverGetVersion(&driver));
    printf("ok: runtime %d, driver %d\n", runtime, driver);
    CHECK(cudaGetDeviceCount(&count));
    EXPECT(count == 1, "device count %d", count);
    printf("ok: %d device\n", count);

    struct cudaDeviceProp prop;
    memset(&prop, 0, sizeof prop);
    CHECK(cudaGetDeviceProperties(&prop, 0));
    EXPECT(prop.name[0] != 0, "device name empty");
    EXPECT(prop.totalGlobalMem > 0, "totalGlobalMem 0");
    EXPECT(prop.major >= 3, "compute capability %d.%d", prop.major, prop.minor);
    printf("ok: properties: %s, cc %d.%d, %zu MiB, %d SMs, warp %d\n", prop.name, prop.major,
           prop.minor, prop.totalGlobalMem >> 20, prop.multiProcessorCount, prop.warpSize);
    int value = 0;
    CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMaxThreadsPerBlock, 0));
    EXPECT(value == prop.maxThreadsPerBlock, "attribute %d vs property %d", value,
           prop.maxThreadsPerBlock);
    printf("ok: max threads per block %d\n", value);
    CHECK(cudaSetDevice(0));
    int dev = -1;
    CHECK(cudaGetDevice(&dev));
    EXPECT(dev == 0, "current device %d", dev);

    size_t free_b = 0, total_b = 0;
    CHECK(cudaMemGetInfo(&free_b, &total_b));
    EXPECT(total_b > 0 && free_b <= total_b, "mem info %zu / %zu", free_b, total_b);
    printf("ok: memory info: free <= total\n");

    /* Copies: host -> device -> device -> host, pageable. */
    const size_t n = (4u << 20) + 3; /* not a multiple of anything nice */
    unsigned char *h = malloc(n), *back = malloc(n);
    for (size_t i = 0; i < n; i++) h[i] = (unsigned char)(i * 7 + 3);
    void *d1 = NULL, *d2 = NULL;
    CHECK(cudaMalloc(&d1, n));
    CHECK(cudaMalloc(&d2, n));
    CHECK(cudaMemcpy(d1, h, n, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(d2, d1, n, cudaMemcpyDeviceToDevice));
    memset(back, 0, n);
    CHECK(cudaMemcpy(back, d2, n, cudaMemcpyDeviceToHost));
    EXPECT(memcmp(h, back, n) == 0, "pageable round trip differs");
    printf("ok: %zu bytes host -> device -> device -> host\n", n);
    CHECK(cudaMemcpy(back, d2, n, cudaMemcpyDefault));
    EXPECT(memcmp(h, back, n) == 0, "cudaMemcpyDefault round trip differs");
    printf("ok: cudaMemcpyDefault\n");

    /* Memset. */
    CHECK(cudaMemset(d1, 0x5a, 1000));
    CHECK(cudaMemcpy(back, d1, 1000, cudaMemcpyDeviceToHost));
    for (int i = 0; i < 1000; i++) EXPECT(back[i] == 0x5a, "memset byte %d = %x", i, back[i]);
    printf("ok: memset\n");

    /* Pinned memory, streams and events. */
    unsigned char *pin = NULL, *pin2 = NULL;
    CHECK(cudaMallocHost((void **)&pin, n));
    CHECK(cudaHostAlloc((void **)&pin2, n, cudaHostAllocDefault));
    for (size_t i = 0; i < n; i++) pin[i] = (unsigned char)(i ^ 0x33);
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    CHECK(cudaEventRecord(e0, s));
    CHECK(cudaMemcpyAsync(d1, pin, n, cudaMemcpyHostToDevice, s));
    CHECK(cudaMemsetAsync(d2, 0, n, s));
    CHECK(cudaMemcpyAsync(d2, d1, n / 2, cudaMemcpyDeviceToDevice, s));
    CHECK(cudaMemcpyAsync(pin2, d2, n, cudaMemcpyDeviceToHost, s));
    CHECK(cudaEventRecord(e1, s));
    CHECK(cudaEventSynchronize(e1));
    CHECK(cudaStreamSynchronize(s));
    for (size_t i = 0; i < n; i++) {
        unsigned char want = i < n / 2 ? (unsigned char)(i ^ 0x33) : 0;
        EXPECT(pin2[i] == want, "async pinned byte %zu = %x, want %x", i, pin2[i], want);
    }
    float ms = -1;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    EXPECT(ms >= 0, "elapsed %f", ms);
    EXPECT(cudaStreamQuery(s) == cudaSuccess, "stream query");
    EXPECT(cudaEventQuery(e1) == cudaSuccess, "event query");
    printf("ok: stream: pinned copies, memset, events\n");
    CHECK(cudaEventDestroy(e0));
    CHECK(cudaEventDestroy(e1));
    CHECK(cudaStreamDestroy(s));
    CHECK(cudaFreeHost(pin));
    CHECK(cudaFreeHost(pin2));

    /* Pitched memory: 2-D and 3-D copies and memsets, pageable and pinned. About 18 MB of
     * rows, more than libvgpu's staging area holds, so pageable copies go in several bands. */
    {
        const size_t w = 3001, rows = 6007, hp = 3006; /* bytes per row, rows, host pitch */
        size_t pitch = 0;
        unsigned char *img = NULL;
        CHECK(cudaMallocPitch((void **)&img, &pitch, w, rows));
        EXPECT(pitch >= w, "pitch %zu < width %zu", pitch, w);
        unsigned char *src = malloc(hp * rows), *dst = malloc(hp * rows);
        for (size_t i = 0; i < hp * rows; i++) src[i] = (unsigned char)(i * 13 + 1);
        memset(dst, 0xee, hp * rows);
        CHECK(cudaMemset2D(img, pitch, 0x42, w, rows));
        /* All but the last column and the last row. */
        CHECK(cudaMemcpy2D(img, pitch, src, hp, w - 1, rows - 1, cudaMemcpyHostToDevice));
        CHECK(cudaMemcpy2D(dst, hp, img, pitch, w, rows, cudaMemcpyDeviceToHost));
        for (size_t y = 0; y < rows; y++) {
            for (size_t x = 0; x < hp; x++) {
                unsigned char want = x >= w ? 0xee : (x < w - 1 && y < rows - 1) ? src[y * hp + x] : 0x42;
                EXPECT(dst[y * hp + x] == want, "2-D byte (%zu, %zu) = %x, want %x", x, y,
                       dst[y * hp + x], want);
            }
        }
        printf("ok: pitched: cudaMemset2D, cudaMemcpy2D host <-> device (pageable, %zu x %zu)\n", w, rows);

        /* Rows wider than libvgpu's staging halves: each row goes in pieces. */
        {
            const size_t ww = (9u << 20) + 5, wh = 2, whp = ww + 3, wdp = ww + 16;
            unsigned char *wsrc = malloc(whp * wh), *wdst = malloc(whp * wh), *wdev = NULL;
            for (size_t i = 0; i < whp * wh; i++) wsrc[i] = (unsigned char)(i * 29 + 5);
            memset(wdst, 0xee, whp * wh);
            CHECK(cudaMalloc((void **)&wdev, wdp * wh));
            CHECK(cudaMemcpy2D(wdev, wdp, wsrc, whp, ww, wh, cudaMemcpyHostToDevice));
            CHECK(cudaMemcpy2D(wdst, whp, wdev, wdp, ww, wh, cudaMemcpyDeviceToHost));
            for (size_t y = 0; y < wh; y++) {
                EXPECT(memcmp(wdst + y * whp, wsrc + y * whp, ww) == 0, "wide row %zu differs", y);
                EXPECT(wdst[y * whp + ww] == 0xee, "wide row %zu: the gap was written", y);
            }
            printf("ok: pitched: rows of %zu bytes (wider than the staging halves) both ways\n", ww);
            CHECK(cudaFree(wdev));
            free(wsrc);
            free(wdst);
        }

        /* Device to device into a second block at an offset, then asynchronously into
         * pinned memory. */
        unsigned char *img2 = NULL, *pin = NULL;
        size_t pitch2 = 0;
        CHECK(cudaMallocPitch((void **)&img2, &pitch2, 512, 64));
        cudaStream_t s2;
        CHECK(cudaStreamCreate(&s2));
        CHECK(cudaMemset2DAsync(img2, pitch2, 0, 512, 64, s2));
        CHECK(cudaStreamSynchronize(s2));
        CHECK(cudaMemcpy2D(img2 + 3 * pitch2 + 7, pitch2, img + pitch + 1, pitch, 100, 50,
                           cudaMemcpyDeviceToDevice));
        CHECK(cudaMallocHost((void **)&pin, 512 * 64));
        memset(pin, 0xee, 512 * 64);
        CHECK(cudaMemcpy2DAsync(pin, 512, img2, pitch2, 512, 64, cudaMemcpyDeviceToHost, s2));
        CHECK(cudaStreamSynchronize(s2));
        for (size_t y = 0; y < 64; y++) {
            for (size_t x = 0; x < 512; x++) {
                int inside = y >= 3 && y < 53 && x >= 7 && x < 107;
                unsigned char want = inside ? src[(y - 3 + 1) * hp + (x - 7 + 1)] : 0;
                EXPECT(pin[y * 512 + x] == want, "2-D device copy byte (%zu, %zu) = %x, want %x", x,
                       y, pin[y * 512 + x], want);
            }
        }
        printf("ok: pitched: device -> device at an offset, asynchronously into pinned memory\n");

        /* 3-D: a 64 x 16 x 4 volume from cudaMalloc3D, there and back. */
        static unsigned char hv[4][16][64], bv[4][16][64];
        for (int z = 0; z < 4; z++)
            for (int y = 0; y < 16; y++)
                for (int x = 0; x < 64; x++) hv[z][y][x] = (unsigned char)(z * 31 + y * 7 + x);
        struct cudaExtent ext = {64, 16, 4};
        struct cudaPitchedPtr vol;
        CHECK(cudaMalloc3D(&vol, ext));
        struct cudaMemcpy3DParms p3;
        memset(&p3, 0, sizeof p3);
        p3.srcPtr = (struct cudaPitchedPtr){hv, 64, 64, 16};
        p3.dstPtr = vol;
        p3.extent = ext;
        p3.kind = cudaMemcpyHostToDevice;
        CHECK(cudaMemcpy3D(&p3));
        memset(&p3, 0, sizeof p3);
        p3.srcPtr = vol;
        p3.dstPtr = (struct cudaPitchedPtr){bv, 64, 64, 16};
        p3.extent = ext;
        p3.kind = cudaMemcpyDeviceToHost;
        CHECK(cudaMemcpy3D(&p3));
        EXPECT(memcmp(hv, bv, sizeof hv) == 0, "3-D round trip differs");
        printf("ok: pitched: cudaMemcpy3D host -> device -> host (64 x 16 x 4)\n");
        CHECK(cudaFree(vol.ptr));
        CHECK(cudaFreeHost(pin));
        CHECK(cudaStreamDestroy(s2));
        CHECK(cudaFree(img2));
        CHECK(cudaFree(img));
        free(src);
        free(dst);
    }

    /* CUDA arrays, texture and surface objects (a kernel reads them in cudart_kernels.cu). */
    {
        struct cudaChannelFormatDesc ch = {32, 0, 0, 0, cudaChannelFormatKindFloat};
        cudaArray_t arr = NULL;
        CHECK(cudaMallocArray(&arr, &ch, 64, 32, cudaArraySurfaceLoadStore));
        static float hf[32][64], bf[32][64];
        for (int y = 0; y < 32; y++)
            for (int x = 0; x < 64; x++) hf[y][x] = (float)(y * 1000 + x);
        CHECK(cudaMemcpy2DToArray(arr, 0, 0, hf, sizeof hf[0], sizeof hf[0], 32, cudaMemcpyHostToDevice));
        CHECK(cudaMemcpy2DFromArray(bf, sizeof bf[0], arr, 0, 0, sizeof bf[0], 32, cudaMemcpyDeviceToHost));
        EXPECT(memcmp(hf, bf, sizeof hf) == 0, "array round trip differs");
        /* Zeros from device memory into a block of the array at (8 floats, row 4). */
        float *dz = NULL;
        CHECK(cudaMalloc((void **)&dz, 16 * 8 * sizeof(float)));
        CHECK(cudaMemset(dz, 0, 16 * 8 * sizeof(float)));
        CHECK(cudaMemcpy2DToArray(arr, 8 * sizeof(float), 4, dz, 16 * sizeof(float), 16 * sizeof(float), 8,
                                  cudaMemcpyDeviceToDevice));
        CHECK(cudaMemcpy2DFromArray(bf, sizeof bf[0], arr, 0, 0, sizeof bf[0], 32, cudaMemcpyDeviceToHost));
        for (int y = 0; y < 32; y++)
            for (int x = 0; x < 64; x++) {
                float want = (y >= 4 && y < 12 && x >= 8 && x < 24) ? 0.0f : hf[y][x];
                EXPECT(bf[y][x] == want, "array (%d, %d) = %f, want %f", x, y, bf[y][x], want);
            }
        struct cudaChannelFormatDesc got;
        struct cudaExtent ext;
        unsigned int aflags = 0;
        CHECK(cudaArrayGetInfo(&got, &ext, &aflags, arr));
        EXPECT(got.x == 32 && got.f == cudaChannelFormatKindFloat && ext.width == 64 && ext.height == 32 &&
                   (aflags & cudaArraySurfaceLoadStore),
               "array info: %d bits, kind %d, %zu x %zu, flags %u", got.x, (int)got.f, ext.width, ext.height, aflags);
        printf("ok: arrays: cudaMallocArray 64 x 32 float, 2-D copies to and from it, cudaArrayGetInfo\n");

        struct cudaResourceDesc rd;
        memset(&rd, 0, sizeof rd);
        rd.resType = cudaResourceTypeArray;
        rd.res.array.array = arr;
        struct cudaTextureDesc td;
        memset(&td, 0, sizeof td);
        td.addressMode[0] = td.addressMode[1] = cudaAddressModeClamp;
        td.filterMode = cudaFilterModePoint;
        td.readMode = cudaReadModeElementType;
        cudaTextureObject_t tex = 0, ltex = 0;
        CHECK(cudaCreateTextureObject(&tex, &rd, &td, NULL));
        struct cudaResourceDesc back;
        memset(&back, 0, sizeof back);
        CHECK(cudaGetTextureObjectResourceDesc(&back, tex));
        EXPECT(back.resType == cudaResourceTypeArray && back.res.array.array == arr, "texture's resource");
        cudaSurfaceObject_t surf = 0;
        CHECK(cudaCreateSurfaceObject(&surf, &rd));
        struct cudaResourceDesc lin;
        memset(&lin, 0, sizeof lin);
        lin.resType = cudaResourceTypeLinear;
        lin.res.linear.devPtr = dz;
        lin.res.linear.desc = ch;
        lin.res.linear.sizeInBytes = 16 * 8 * sizeof(float);
        CHECK(cudaCreateTextureObject(&ltex, &lin, &td, NULL));
        CHECK(cudaDestroyTextureObject(ltex));
        CHECK(cudaDestroySurfaceObject(surf));
        CHECK(cudaDestroyTextureObject(tex));
        CHECK(cudaFreeArray(arr));
        CHECK(cudaFree(dz));
        printf("ok: texture and surface objects of an array, a texture of linear memory\n");
    }

    /* Errors are CUDA-exact. */
    void *huge = NULL;
    cudaError_t err = cudaMalloc(&huge, (size_t)1 << 50);
    EXPECT(err == cudaErrorMemoryAllocation, "1 PiB cudaMalloc -> %s", cudaGetErrorName(err));
    EXPECT(cudaGetLastError() == cudaErrorMemoryAllocation, "last error after failed malloc");
    EXPECT(cudaGetLastError() == cudaSuccess, "last error is reset");
    printf("ok: 1 PiB allocation -> %s\n", cudaGetErrorName(err));
    EXPECT(strcmp(cudaGetErrorName(cudaErrorInvalidValue), "cudaErrorInvalidValue") == 0,
           "error name");
    printf("ok: error string: %s\n", cudaGetErrorString(cudaErrorInvalidDevicePointer));
    err = cudaSetDevice(7);
    EXPECT(err == cudaErrorInvalidDevice, "cudaSetDevice(7) -> %s", cudaGetErrorName(err));
    (void)cudaGetLastError();
    printf("ok: cudaSetDevice(7) -> %s\n", cudaGetErrorName(err));

    /* Another thread uses the runtime: its per-thread stream and the legacy one. */
    pthread_t t;
    EXPECT(pthread_create(&t, NULL, second_thread, d1) == 0, "pthread_create");
    void *ret = NULL;
    pthread_join(t, &ret);
    cudaError_t *terr = ret;
    for (int i = 0; i < 3; i++)
        EXPECT(terr[i] == cudaSuccess, "second thread call %d -> %s", i, cudaGetErrorName(terr[i]));
    CHECK(cudaMemcpy(back, d1, 8192, cudaMemcpyDeviceToHost));
    EXPECT(back[0] == 0x77 && back[4095] == 0x77 && back[4096] == 0x11 && back[8191] == 0x11,
           "second thread's memsets: %x %x", back[0], back[4096]);
    printf("ok: a second thread: memset on its per-thread stream and on the legacy stream\n");

    CHECK(cudaFree(d1));
    CHECK(cudaFree(d2));
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaDeviceReset());
    /* The runtime re-initialises after a reset. */
    CHECK(cudaMalloc(&d1, 64));
    CHECK(cudaFree(d1));
    printf("ok: reset and re-initialised\n");
    free(h);
    free(back);
    printf("%s\n", failures ? "FAILED" : "PASSED");
    return failures ? 1 : 0;
}
