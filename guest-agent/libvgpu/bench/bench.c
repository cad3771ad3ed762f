/* Native-versus-remoted benchmark of the CUDA driver API (device/libvgpu-bench.sh runs it
 * natively and through libvgpu + host-proxy and puts the two side by side).
 *
 * Usage: bench [KERNEL_DIR]   (KERNEL_DIR holds bench_kernels.fatbin; default ".")
 * BENCH_ONLY=GROUP[,GROUP...] runs only those groups: calls, alloc, launch, graph, copies,
 * compute;
 * BENCH_REPEAT=N runs them N times (device/libvgpu-profile.sh uses both to profile one kind of
 * work long enough that start-up does not dominate the samples).
 *
 * Prints one measure per line, `name value unit`; lines starting with '#' are comments.
 * Units: ns, us and ms (lower is better), GB/s (10^9 bytes per second) and GFLOP/s (higher is
 * better). Latencies are the median (p50) of individually timed repetitions; bandwidths are
 * given as best-of and as mean (total bytes / total time) over the timed repetitions. Every
 * measure is warmed up first. Host time is CLOCK_MONOTONIC.
 *
 * Only entry points that libvgpu serves are used, so the program runs unchanged through it.
 * Pinned host memory: one 64 MiB cuMemAllocHost block (libvgpu carves pinned memory out of
 * its 256 MiB shared window). */
#include "../tests/c/common.h"

#include <time.h>

#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)
#define BIG (64 * MiB)

static CUstream g_s;
static CUfunction g_empty, g_fma;
static CUdeviceptr g_dbuf;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of v[0..n) (sorts v). */
static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void report(const char *name, double value, const char *unit) {
    printf("%s %.4f %s\n", name, value, unit);
}

static double *samples(int n) { return (double *)xmalloc((size_t)n * sizeof(double)); }

/* ---- cheapest calls ---- */

/* cuCtxGetDevice: answered inside libvgpu (no host round trip). Timed in batches of 1000
 * calls (the clock costs more than the call); the median batch, per call. */
static void bench_ctx_get_device(void) {
    enum { BATCH = 1000, BATCHES = 200 };
    CUdevice d;
    for (int i = 0; i < 10 * BATCH; i++) CHECK(cuCtxGetDevice(&d));
    double *v = samples(BATCHES);
    for (int b = 0; b < BATCHES; b++) {
        uint64_t t0 = now_ns();
        for (int i = 0; i < BATCH; i++) CHECK(cuCtxGetDevice(&d));
        v[b] = (double)(now_ns() - t0) / BATCH;
    }
    report("call_ctx_get_device_p50", median(v, BATCHES), "ns");
    free(v);
}

/* cuCtxSetCurrent of the context already current: natively, what host-proxy's worker pays
 * on every request (its backend makes the zone's context current before each driver call);
 * through libvgpu, answered in the guest. Batches of 1000, the median batch, per call. */
static void bench_ctx_set_current(void) {
    enum { BATCH = 1000, BATCHES = 200 };
    CUcontext c;
    CHECK(cuCtxGetCurrent(&c));
    for (int i = 0; i < 10 * BATCH; i++) CHECK(cuCtxSetCurrent(c));
    double *v = samples(BATCHES);
    for (int b = 0; b < BATCHES; b++) {
        uint64_t t0 = now_ns();
        for (int i = 0; i < BATCH; i++) CHECK(cuCtxSetCurrent(c));
        v[b] = (double)(now_ns() - t0) / BATCH;
    }
    report("call_ctx_set_current_same_p50", median(v, BATCHES), "ns");
    free(v);
}

/* cuStreamQuery of an idle stream: one host round trip through libvgpu. */
static void bench_stream_query(void) {
    enum { N = 20000 };
    CHECK(cuStreamSynchronize(g_s));
    for (int i = 0; i < 2000; i++) CHECK(cuStreamQuery(g_s));
    double *v = samples(N);
    for (int i = 0; i < N; i++) {
        uint64_t t0 = now_ns();
        CHECK(cuStreamQuery(g_s));
        v[i] = (double)(now_ns() - t0) / 1e3;
    }
    report("call_stream_query_idle_p50", median(v, N), "us");
    /* The same call with the current context set again just before it, as host-proxy's
     * worker does for every request: natively, whether re-setting the context makes the
     * next driver call dearer than the two calls' separate costs. */
    CUcontext c;
    CHECK(cuCtxGetCurrent(&c));
    for (int i = 0; i < N; i++) {
        uint64_t t0 = now_ns();
        CHECK(cuCtxSetCurrent(c));
        CHECK(cuStreamQuery(g_s));
        v[i] = (double)(now_ns() - t0) / 1e3;
    }
    report("call_set_current_stream_query_p50", median(v, N), "us");
    free(v);
}

/* ---- allocation ---- */

static void bench_alloc_free(void) {
    enum { N = 2000 };
    CUdeviceptr p;
    for (int i = 0; i < 200; i++) {
        CHECK(cuMemAlloc(&p, MiB));
        CHECK(cuMemFree(p));
    }
    double *v = samples(N);
    for (int i = 0; i < N; i++) {
        uint64_t t0 = now_ns();
        CHECK(cuMemAlloc(&p, MiB));
        CHECK(cuMemFree(p));
        v[i] = (double)(now_ns() - t0) / 1e3;
    }
    report("alloc_free_1MiB_p50", median(v, N), "us");
    free(v);
}

/* ---- launches ---- */

static void launch_empty(void) { CHECK(cuLaunchKernel(g_empty, 1, 1, 1, 1, 1, 1, 0, g_s, NULL, NULL)); }

/* ROUNDS rounds of N back-to-back launches: time to issue them (the closing synchronize
 * excluded), per launch, median round; and the same including the synchronize that drains
 * them (the rate the GPU actually ran them at). */
static void bench_launch_async(void) {
    enum { N = 10000, ROUNDS = 7 };
    for (int i = 0; i < 1000; i++) launch_empty();
    CHECK(cuStreamSynchronize(g_s));
    double issue[ROUNDS], drained[ROUNDS];
    for (int r = 0; r < ROUNDS; r++) {
        uint64_t t0 = now_ns();
        for (int i = 0; i < N; i++) launch_empty();
        uint64_t t1 = now_ns();
        CHECK(cuStreamSynchronize(g_s));
        uint64_t t2 = now_ns();
        issue[r] = (double)(t1 - t0) / 1e3 / N;
        drained[r] = (double)(t2 - t0) / 1e3 / N;
    }
    report("launch_async_p50", median(issue, ROUNDS), "us");
    report("launch_async_drained_p50", median(drained, ROUNDS), "us");
}

static void bench_launch_sync(void) {
    enum { N = 5000 };
    for (int i = 0; i < 500; i++) {
        launch_empty();
        CHECK(cuStreamSynchronize(g_s));
    }
    double *v = samples(N);
    for (int i = 0; i < N; i++) {
        uint64_t t0 = now_ns();
        launch_empty();
        CHECK(cuStreamSynchronize(g_s));
        v[i] = (double)(now_ns() - t0) / 1e3;
    }
    report("launch_sync_p50", median(v, N), "us");
    free(v);
}

/* ---- graphs ---- */

/* A chain of NODES empty kernels captured from g_s: launched and synchronized as one graph,
 * against the same NODES launches issued one by one and synchronized (per iteration, p50).
 * Through libvgpu the graph is one posted request; the eager chain NODES of them. */
static void bench_graph(void) {
    enum { NODES = 32, N = 2000 };
    CUgraph graph;
    CUgraphExec exec;
    CHECK(cuStreamBeginCapture(g_s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    for (int i = 0; i < NODES; i++) launch_empty();
    CHECK(cuStreamEndCapture(g_s, &graph));
    CHECK(cuGraphInstantiateWithFlags(&exec, graph, 0));
    double *eager = samples(N), *replay = samples(N);
    for (int i = 0; i < 200; i++) {
        CHECK(cuGraphLaunch(exec, g_s));
        CHECK(cuStreamSynchronize(g_s));
    }
    for (int i = 0; i < N; i++) {
        uint64_t t0 = now_ns();
        for (int k = 0; k < NODES; k++) launch_empty();
        CHECK(cuStreamSynchronize(g_s));
        uint64_t t1 = now_ns();
        CHECK(cuGraphLaunch(exec, g_s));
        CHECK(cuStreamSynchronize(g_s));
        uint64_t t2 = now_ns();
        eager[i] = (double)(t1 - t0) / 1e3;
        replay[i] = (double)(t2 - t1) / 1e3;
    }
    report("graph32_eager_launches_sync_p50", median(eager, N), "us");
    report("graph32_replay_sync_p50", median(replay, N), "us");
    free(eager);
    free(replay);
    CHECK(cuGraphExecDestroy(exec));
    CHECK(cuGraphDestroy(graph));
}

/* ---- copies ---- */

static void copy_once(int htod, void *host, size_t n) {
    if (htod)
        CHECK(cuMemcpyHtoD(g_dbuf, host, n));
    else
        CHECK(cuMemcpyDtoH(host, g_dbuf, n));
}

/* Synchronous copies of n bytes; label e.g. "htod_pinned". Small copies: latency p50;
 * large ones: bandwidth best-of and mean. */
static void bench_copy(const char *label, int htod, void *host, size_t n, const char *size_name,
                       int warm, int reps, int latency) {
    char name[128];
    for (int i = 0; i < warm; i++) copy_once(htod, host, n);
    double *v = samples(reps);
    uint64_t total = 0;
    for (int i = 0; i < reps; i++) {
        uint64_t t0 = now_ns();
        copy_once(htod, host, n);
        uint64_t dt = now_ns() - t0;
        total += dt;
        v[i] = (double)dt;
    }
    if (latency) {
        for (int i = 0; i < reps; i++) v[i] /= 1e3;
        snprintf(name, sizeof name, "copy_%s_%s_p50", label, size_name);
        report(name, median(v, reps), "us");
    } else {
        double best = v[0];
        for (int i = 1; i < reps; i++)
            if (v[i] < best) best = v[i];
        snprintf(name, sizeof name, "copy_%s_%s_best", label, size_name);
        report(name, (double)n / best, "GB/s"); /* bytes per ns = GB/s */
        snprintf(name, sizeof name, "copy_%s_%s_mean", label, size_name);
        report(name, (double)n * reps / (double)total, "GB/s");
    }
    free(v);
}

static void bench_copies(void) {
    void *pageable = xmalloc(BIG);
    fill_pattern(pageable, BIG, 7); /* touches every page */
    void *pinned = NULL;
    CHECK(cuMemAllocHost(&pinned, BIG));
    memcpy(pinned, pageable, BIG);

    /* Sanity: 1 MiB there and back through both kinds of host memory. */
    CHECK(cuMemcpyHtoD(g_dbuf, pageable, MiB));
    CHECK(cuMemcpyDtoH(pinned, g_dbuf, MiB));
    REQUIRE(first_diff(pinned, pageable, MiB) < 0, "round trip mismatch");
    memcpy(pinned, pageable, MiB);

    struct {
        const char *label;
        int htod;
        void *host;
    } kinds[4] = {
        {"htod_pageable", 1, pageable},
        {"dtoh_pageable", 0, pageable},
        {"htod_pinned", 1, pinned},
        {"dtoh_pinned", 0, pinned},
    };
    for (int k = 0; k < 4; k++)
        bench_copy(kinds[k].label, kinds[k].htod, kinds[k].host, 4 * KiB, "4KiB", 200, 2000, 1);
    for (int k = 0; k < 4; k++)
        bench_copy(kinds[k].label, kinds[k].htod, kinds[k].host, MiB, "1MiB", 20, 200, 0);
    for (int k = 0; k < 4; k++)
        bench_copy(kinds[k].label, kinds[k].htod, kinds[k].host, BIG, "64MiB", 3, 20, 0);

    CHECK(cuMemFreeHost(pinned));
    free(pageable);
}

/* ---- compute-bound kernel ---- */

static void bench_compute(CUdevice dev) {
    enum { REPS = 15 };
    int sms = 0;
    CHECK(cuDeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev));
    REQUIRE(sms > 0, "SM count %d", sms);
    const unsigned blocks = (unsigned)sms * 8, threads = 256;
    int iters = 1 << 18;
    float a = 0.999f, b = 0.001f;
    CUdeviceptr out;
    CHECK(cuMemAlloc(&out, (size_t)blocks * threads * sizeof(float)));
    void *params[] = {&out, &iters, &a, &b};
    const double flop = 16.0 * iters * blocks * threads;
    printf("# fma_loop: %u blocks x %u threads, %d rounds, %.3g FLOP per launch\n", blocks, threads,
           iters, flop);

    CUevent e0, e1;
    CHECK(cuEventCreate(&e0, CU_EVENT_DEFAULT));
    CHECK(cuEventCreate(&e1, CU_EVENT_DEFAULT));
    for (int i = 0; i < 3; i++)
        CHECK(cuLaunchKernel(g_fma, blocks, 1, 1, threads, 1, 1, 0, g_s, params, NULL));
    CHECK(cuStreamSynchronize(g_s));

    double host_ms[REPS], gpu_ms[REPS];
    for (int r = 0; r < REPS; r++) {
        uint64_t t0 = now_ns();
        CHECK(cuEventRecord(e0, g_s));
        CHECK(cuLaunchKernel(g_fma, blocks, 1, 1, threads, 1, 1, 0, g_s, params, NULL));
        CHECK(cuEventRecord(e1, g_s));
        CHECK(cuStreamSynchronize(g_s));
        host_ms[r] = (double)(now_ns() - t0) / 1e6;
        float ms = 0;
        CHECK(cuEventSynchronize(e1));
        CHECK(cuEventElapsedTime(&ms, e0, e1));
        gpu_ms[r] = ms;
    }
    double h = median(host_ms, REPS), g = median(gpu_ms, REPS);
    report("compute_fma_launch_sync_ms_p50", h, "ms");
    report("compute_fma_gpu_ms_p50", g, "ms");
    report("compute_fma_gflops", flop / (h * 1e6), "GFLOP/s");
    CHECK(cuEventDestroy(e0));
    CHECK(cuEventDestroy(e1));
    CHECK(cuMemFree(out));
}

/* Whether BENCH_ONLY (a comma-separated list of groups) is unset or names `group`. */
static int wanted(const char *group) {
    const char *only = getenv("BENCH_ONLY");
    if (!only || !*only) return 1;
    size_t n = strlen(group);
    for (const char *p = only; p; p = strchr(p, ',')) {
        if (*p == ',') p++;
        if (strncmp(p, group, n) == 0 && (p[n] == ',' || p[n] == '\0')) return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    start();
    CUdevice dev;
    init_primary(&dev);
    char devname[256];
    CHECK(cuDeviceGetName(devname, (int)sizeof devname, dev));
    printf("# device: %s\n", devname);

    size_t len = 0;
    void *image = read_file(kernel_dir(argc, argv), "bench_kernels.fatbin", &len, 0);
    CUmodule mod;
    CHECK(cuModuleLoadData(&mod, image));
    CHECK(cuModuleGetFunction(&g_empty, mod, "empty"));
    CHECK(cuModuleGetFunction(&g_fma, mod, "fma_loop"));
    CHECK(cuStreamCreate(&g_s, CU_STREAM_DEFAULT));
    CHECK(cuMemAlloc(&g_dbuf, BIG));

    const char *repeat_env = getenv("BENCH_REPEAT");
    int repeat = repeat_env ? atoi(repeat_env) : 1;
    for (int rep = 0; rep < (repeat > 0 ? repeat : 1); rep++) {
        if (wanted("calls")) {
            bench_ctx_get_device();
            bench_ctx_set_current();
            bench_stream_query();
        }
        if (wanted("alloc")) bench_alloc_free();
        if (wanted("launch")) {
            bench_launch_async();
            bench_launch_sync();
        }
        if (wanted("graph")) bench_graph();
        if (wanted("copies")) bench_copies();
        if (wanted("compute")) bench_compute(dev);
    }

    CHECK(cuCtxSynchronize());
    CHECK(cuMemFree(g_dbuf));
    CHECK(cuStreamDestroy(g_s));
    CHECK(cuModuleUnload(mod));
    free(image);
    release_primary(dev);
    finish("bench");
    return 0;
}
