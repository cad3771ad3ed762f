/* CUDA IPC between two processes (the seeds' producer/consumer flow): the producer writes
 * 42, 43, 44 ..., exports the allocation and passes the handle through a pipe; the consumer
 * opens it, verifies, writes 1000, 1001, ... and closes; the producer verifies. Then: open
 * in the exporting process, a forged handle, and a handle whose allocation was freed.
 * The consumer reports its results to the producer, which prints everything (one writer
 * keeps the output deterministic). */
#include "common.h"

#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define N 4096

struct report {
    CUresult open, copy_in, copy_out, close, forged, revoked;
    int verified;
};

static void full_read(int fd, void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)buf + got, n - got);
        REQUIRE(r > 0, "pipe read");
        got += (size_t)r;
    }
}

static void full_write(int fd, const void *buf, size_t n) {
    REQUIRE(write(fd, buf, n) == (ssize_t)n, "pipe write");
}

static CUcontext primary(void) {
    CUdevice dev;
    CUcontext ctx;
    CHECK(cuInit(0));
    CHECK(cuDeviceGet(&dev, 0));
    CHECK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CHECK(cuCtxSetCurrent(ctx));
    return ctx;
}

/* The consumer: runs in the child, before any CUDA call there. */
static void consumer(int in, int out) {
    struct report r;
    memset(&r, 0, sizeof r);
    CUipcMemHandle h, freed;
    full_read(in, &h, sizeof h);
    primary();
    CUdeviceptr d = 0;
    r.open = cuIpcOpenMemHandle(&d, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
    static unsigned got[N], mine[N];
    if (r.open == CUDA_SUCCESS) {
        r.copy_in = cuMemcpyDtoH(got, d, sizeof got);
        r.verified = 1;
        for (unsigned i = 0; i < N; i++) {
            r.verified &= got[i] == 42 + i;
            mine[i] = 1000 + i;
        }
        r.copy_out = cuMemcpyHtoD(d, mine, sizeof mine);
        r.close = cuIpcCloseMemHandle(d);
    }
    CUipcMemHandle forged = h;
    for (int i = 0; i < 64; i += 7) forged.reserved[i] ^= 0x5a;
    r.forged = cuIpcOpenMemHandle(&d, forged, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
    full_write(out, &r, sizeof r);
    /* The producer frees a second exported allocation, then sends its handle. */
    full_read(in, &freed, sizeof freed);
    r.revoked = cuIpcOpenMemHandle(&d, freed, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
    if (r.revoked == CUDA_SUCCESS) cuIpcCloseMemHandle(d);
    full_write(out, &r, sizeof r);
    exit(0);
}

int main(void) {
    start();
    int to_child[2], to_parent[2];
    REQUIRE(pipe(to_child) == 0 && pipe(to_parent) == 0, "pipe");
    fflush(stdout);
    pid_t pid = fork();
    REQUIRE(pid >= 0, "fork");
    if (pid == 0) {
        consumer(to_child[0], to_parent[1]);
    }
    primary();
    static unsigned vals[N], back[N];
    for (unsigned i = 0; i < N; i++) vals[i] = 42 + i;
    CUdeviceptr d, d2;
    CHECK(cuMemAlloc(&d, sizeof vals));
    CHECK(cuMemcpyHtoD(d, vals, sizeof vals));
    CUipcMemHandle h, h2;
    CHECK(cuIpcGetMemHandle(&h, d));
    printf("producer exported %d words 42, 43, 44 ...\n", N);
    full_write(to_child[1], &h, sizeof h);
    struct report r;
    full_read(to_parent[0], &r, sizeof r);
    printf("consumer: open -> %s, read -> %s, verified 42.. : %s, write -> %s, close -> %s\n", err_name(r.open),
           err_name(r.copy_in), yes_no(r.verified), err_name(r.copy_out), err_name(r.close));
    printf("consumer: forged handle -> %s\n", err_name(r.forged));
    CHECK(cuMemcpyDtoH(back, d, sizeof back));
    int ok = 1;
    for (unsigned i = 0; i < N; i++) ok &= back[i] == 1000 + i;
    printf("producer sees the consumer's writes: %s\n", yes_no(ok));
    CUdeviceptr self = 0;
    SHOW("open in the exporting process", cuIpcOpenMemHandle(&self, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS));
    SHOW("cuIpcGetMemHandle of a non-allocation", cuIpcGetMemHandle(&h2, (CUdeviceptr)0x1000));
    CHECK(cuMemAlloc(&d2, 1 << 20));
    CHECK(cuIpcGetMemHandle(&h2, d2));
    CHECK(cuMemFree(d2));
    full_write(to_child[1], &h2, sizeof h2);
    full_read(to_parent[0], &r, sizeof r);
    printf("consumer: handle of a freed allocation -> %s\n", err_name(r.revoked));
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0, "consumer exit");
    CHECK(cuMemFree(d));
    printf("OK ipc\n");
    return 0;
}
