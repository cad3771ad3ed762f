/* Streams and events: creation flags and priorities, queries, synchronization, timing, and
 * cross-stream ordering through cuStreamWaitEvent (kernels from kernels.fatbin in argv[1]). */
#include "common.h"

/* About 0.15-0.3 s at H100/H200 clocks: long enough that queries right after the launch see
 * the work still running, natively and through a remoting layer. */
#define SPIN_CYCLES 400000000LL

static CUfunction g_spin, g_fill;

static void spin_fill(CUdeviceptr p, unsigned v, unsigned long long n, CUstream s) {
    long long spin = SPIN_CYCLES;
    void *params[] = {&p, &v, &n, &spin};
    CHECK(cuLaunchKernel(g_spin, 1, 1, 1, 256, 1, 1, 0, s, params, NULL));
}

static void fill(CUdeviceptr p, unsigned v, unsigned long long n, CUstream s) {
    void *params[] = {&p, &v, &n};
    CHECK(cuLaunchKernel(g_fill, 256, 1, 1, 256, 1, 1, 0, s, params, NULL));
}

static void verify_words(const char *what, const unsigned *h, size_t n, unsigned v) {
    for (size_t i = 0; i < n; i++) REQUIRE(h[i] == v, "%s: word %zu is 0x%x, want 0x%x", what, i, h[i], v);
    printf("%s: %zu words = 0x%08x verified\n", what, n, v);
}

static void show_stream(const char *name, CUstream s) {
    unsigned flags = 99;
    int prio = 99;
    CHECK(cuStreamGetFlags(s, &flags));
    CHECK(cuStreamGetPriority(s, &prio));
    printf("stream %s: flags=%u priority=%d query -> %s\n", name, flags, prio, err_name(cuStreamQuery(s)));
}

int main(int argc, char **argv) {
    start();
    CUdevice dev;
    CUcontext prim = init_primary(&dev);
    size_t len;
    void *fatbin = read_file(kernel_dir(argc, argv), "kernels.fatbin", &len, 0);
    CUmodule mod;
    CHECK(cuModuleLoadData(&mod, fatbin));
    CHECK(cuModuleGetFunction(&g_spin, mod, "spin_fill"));
    CHECK(cuModuleGetFunction(&g_fill, mod, "fill_u32"));

    /* ---- streams ---- */
    int least = 0, greatest = 0;
    CHECK(cuCtxGetStreamPriorityRange(&least, &greatest));
    printf("stream priority range: least=%d greatest=%d\n", least, greatest);
    CUstream s0, s1, s2, s3, s4;
    CHECK(cuStreamCreate(&s0, CU_STREAM_DEFAULT));
    CHECK(cuStreamCreate(&s1, CU_STREAM_NON_BLOCKING));
    CHECK(cuStreamCreateWithPriority(&s2, CU_STREAM_DEFAULT, greatest));
    CHECK(cuStreamCreateWithPriority(&s3, CU_STREAM_NON_BLOCKING, least));
    CHECK(cuStreamCreateWithPriority(&s4, CU_STREAM_DEFAULT, greatest - 100));
    show_stream("s0 (default)", s0);
    show_stream("s1 (non-blocking)", s1);
    show_stream("s2 (greatest priority)", s2);
    show_stream("s3 (non-blocking, least priority)", s3);
    show_stream("s4 (priority beyond greatest, clamped)", s4);
    show_stream("NULL", NULL);
    CUcontext sc = NULL;
    CHECK(cuStreamGetCtx(s1, &sc));
    printf("cuStreamGetCtx(s1) is the primary context: %s\n", yes_no(sc == prim));
    printf("cuStreamSynchronize(CU_STREAM_LEGACY) -> %s\n", err_name(cuStreamSynchronize(CU_STREAM_LEGACY)));
    printf("cuStreamSynchronize(CU_STREAM_PER_THREAD) -> %s\n",
           err_name(cuStreamSynchronize(CU_STREAM_PER_THREAD)));
    printf("cuStreamQuery(CU_STREAM_PER_THREAD) -> %s\n", err_name(cuStreamQuery(CU_STREAM_PER_THREAD)));
    CUstream bad;
    printf("cuStreamCreate(flags 0x10) -> %s\n", err_name(cuStreamCreate(&bad, 0x10)));

    /* ---- events ---- */
    CUevent e_def, e_nt, e_bs, e_start, e_end;
    CHECK(cuEventCreate(&e_def, CU_EVENT_DEFAULT));
    CHECK(cuEventCreate(&e_nt, CU_EVENT_DISABLE_TIMING));
    CHECK(cuEventCreate(&e_bs, CU_EVENT_BLOCKING_SYNC));
    CHECK(cuEventCreate(&e_start, CU_EVENT_DEFAULT));
    CHECK(cuEventCreate(&e_end, CU_EVENT_DEFAULT));
    CUevent bad_ev;
    printf("cuEventCreate(flags 0x100) -> %s\n", err_name(cuEventCreate(&bad_ev, 0x100)));
    printf("cuEventCreate(INTERPROCESS without DISABLE_TIMING) -> %s\n",
           err_name(cuEventCreate(&bad_ev, CU_EVENT_INTERPROCESS)));
    printf("cuEventQuery(never recorded) -> %s\n", err_name(cuEventQuery(e_def)));
    printf("cuEventSynchronize(never recorded) -> %s\n", err_name(cuEventSynchronize(e_def)));
    float ms = -1.0f;
    printf("cuEventElapsedTime(never recorded) -> %s\n", err_name(cuEventElapsedTime(&ms, e_start, e_end)));

    const unsigned long long n = 4u << 20;
    CUdeviceptr buf, buf2;
    CHECK(cuMemAlloc(&buf, n * 4));
    CHECK(cuMemAlloc(&buf2, n * 4));
    unsigned *h = xmalloc(n * 4);

    /* Timing on s0. */
    CHECK(cuEventRecord(e_start, s0));
    fill(buf, 0x11111111u, n, s0);
    CHECK(cuEventRecord(e_end, s0));
    CHECK(cuEventSynchronize(e_end));
    printf("cuEventQuery(e_end) after synchronize -> %s\n", err_name(cuEventQuery(e_end)));
    ms = -1.0f;
    CHECK(cuEventElapsedTime(&ms, e_start, e_end));
    printf("cuEventElapsedTime: ms>=0: %s\n", yes_no(ms >= 0.0f));
    CHECK(cuEventRecord(e_nt, s0));
    CHECK(cuStreamSynchronize(s0));
    printf("cuEventElapsedTime with a DISABLE_TIMING event -> %s\n",
           err_name(cuEventElapsedTime(&ms, e_start, e_nt)));
    CHECK(cuEventRecordWithFlags(e_def, s1, CU_EVENT_RECORD_DEFAULT));
    CHECK(cuEventSynchronize(e_def));
    printf("cuEventRecordWithFlags then synchronize: query -> %s\n", err_name(cuEventQuery(e_def)));
    CHECK(cuEventRecord(e_def, NULL));
    CHECK(cuEventSynchronize(e_def));
    printf("event recorded on the NULL stream: query -> %s\n", err_name(cuEventQuery(e_def)));

    /* Busy stream: queries see the work in flight. */
    spin_fill(buf, 0x22222222u, n, s1);
    CHECK(cuEventRecord(e_bs, s1));
    printf("cuStreamQuery while a kernel spins -> %s\n", err_name(cuStreamQuery(s1)));
    printf("cuEventQuery while a kernel spins -> %s\n", err_name(cuEventQuery(e_bs)));
    CHECK(cuEventSynchronize(e_bs));
    printf("after cuEventSynchronize: event -> %s, stream -> %s\n", err_name(cuEventQuery(e_bs)),
           err_name(cuStreamQuery(s1)));
    CHECK(cuMemcpyDtoH(h, buf, n * 4));
    verify_words("spin_fill on s1", h, n, 0x22222222u);

    /* Ordering: a slow writer on s1, s3 waits on an event then copies. */
    CHECK(cuMemsetD32(buf, 0, n));
    CHECK(cuMemsetD32(buf2, 0, n));
    spin_fill(buf, 0x33333333u, n, s1);
    CHECK(cuEventRecord(e_nt, s1));
    CHECK(cuStreamWaitEvent(s3, e_nt, 0));
    CHECK(cuMemcpyDtoDAsync(buf2, buf, n * 4, s3));
    memset(h, 0, n * 4);
    CHECK(cuMemcpyDtoHAsync(h, buf2, n * 4, s3));
    CHECK(cuStreamSynchronize(s3));
    verify_words("s3 copy after cuStreamWaitEvent(s1 event)", h, n, 0x33333333u);
    printf("cuStreamWaitEvent(flags 0x1234) -> %s\n", err_name(cuStreamWaitEvent(s3, e_nt, 0x1234)));

    /* The legacy NULL stream waits for blocking stream s0. */
    spin_fill(buf, 0x44444444u, n, s0);
    CHECK(cuMemsetD32Async(buf, 0x55555555u, n, NULL));
    CHECK(cuMemcpyDtoHAsync(h, buf, n * 4, NULL));
    CHECK(cuStreamSynchronize(NULL));
    verify_words("NULL stream after blocking s0", h, n, 0x55555555u);

    /* A non-blocking stream waits on an event of another (priority) stream. */
    spin_fill(buf, 0x66666666u, n, s2);
    CHECK(cuEventRecord(e_def, s2));
    CHECK(cuStreamWaitEvent(s1, e_def, CU_EVENT_WAIT_DEFAULT));
    fill(buf, 0x77777777u, n, s1);
    CHECK(cuStreamSynchronize(s1));
    CHECK(cuMemcpyDtoH(h, buf, n * 4));
    verify_words("s1 fill ordered after s2 spin_fill", h, n, 0x77777777u);

    CHECK(cuCtxSynchronize());
    CUstream all[] = {s0, s1, s2, s3, s4};
    for (int i = 0; i < 5; i++) {
        CHECK(cuStreamSynchronize(all[i]));
        CHECK(cuStreamDestroy(all[i]));
    }
    CUevent evs[] = {e_def, e_nt, e_bs, e_start, e_end};
    for (int i = 0; i < 5; i++) CHECK(cuEventDestroy(evs[i]));
    printf("streams and events destroyed\n");
    printf("cuStreamDestroy(NULL) -> %s\n", err_name(cuStreamDestroy(NULL)));
    printf("cuEventDestroy(NULL) -> %s\n", err_name(cuEventDestroy(NULL)));

    CHECK(cuMemFree(buf));
    CHECK(cuMemFree(buf2));
    CHECK(cuModuleUnload(mod));
    free(h);
    free(fatbin);
    release_primary(dev);
    finish("streams_events");
    return 0;
}
