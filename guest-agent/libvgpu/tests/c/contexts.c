/* Contexts: primary context life cycle, explicit contexts and the context stack, context
 * queries and limits, and the error paths of an empty stack and a destroyed context. */
#include "common.h"

static CUcontext current(void) {
    CUcontext c = (CUcontext)(uintptr_t)0xdeadbeef;
    CHECK(cuCtxGetCurrent(&c));
    return c;
}

static void show_primary_state(CUdevice dev, const char *when) {
    unsigned flags = 0xffffffffu;
    int active = -1;
    CHECK(cuDevicePrimaryCtxGetState(dev, &flags, &active));
    printf("primary state %s: flags=0x%x active=%d\n", when, flags, active);
}

static void show_ctx_info(const char *label) {
    unsigned flags = 0;
    CUdevice d = -1;
    int least = 99, greatest = 99;
    CHECK(cuCtxGetFlags(&flags));
    CHECK(cuCtxGetDevice(&d));
    CHECK(cuCtxGetStreamPriorityRange(&least, &greatest));
    printf("%s: flags=0x%x device=%d priority range least=%d greatest=%d\n", label, flags, (int)d,
           least, greatest);
}

static void limits(void) {
    static const struct {
        CUlimit lim;
        const char *name;
        size_t set;
    } L[] = {
        {CU_LIMIT_STACK_SIZE, "stack size", 4096},
        {CU_LIMIT_PRINTF_FIFO_SIZE, "printf fifo size", 2u << 20},
        {CU_LIMIT_MALLOC_HEAP_SIZE, "malloc heap size", 16u << 20},
    };
    for (size_t i = 0; i < sizeof L / sizeof L[0]; i++) {
        size_t v = 0;
        CHECK(cuCtxGetLimit(&v, L[i].lim));
        printf("limit %s default: %zu\n", L[i].name, v);
        CHECK(cuCtxSetLimit(L[i].lim, L[i].set));
        CHECK(cuCtxGetLimit(&v, L[i].lim));
        printf("limit %s after set %zu: %zu\n", L[i].name, L[i].set, v);
    }
    size_t v = 0;
    SHOW("cuCtxGetLimit(invalid 0x1234)", cuCtxGetLimit(&v, (CUlimit)0x1234));
    SHOW("cuCtxSetLimit(invalid 0x1234)", cuCtxSetLimit((CUlimit)0x1234, 1));
}

int main(void) {
    start();
    CUdevice dev, d;
    CUcontext prim, prim2, a, b, popped;
    unsigned ver = 0;

    CHECK(cuInit(0));
    CHECK(cuDeviceGet(&dev, 0));

    /* No context yet. */
    printf("initial current is NULL: %s\n", yes_no(current() == NULL));
    SHOW("cuCtxPopCurrent on empty stack", cuCtxPopCurrent(&popped));
    SHOW("cuCtxSynchronize without context", cuCtxSynchronize());
    SHOW("cuCtxGetDevice without context", cuCtxGetDevice(&d));
    unsigned flags;
    SHOW("cuCtxGetFlags without context", cuCtxGetFlags(&flags));
    size_t lim;
    SHOW("cuCtxGetLimit without context", cuCtxGetLimit(&lim, CU_LIMIT_STACK_SIZE));
    CUdeviceptr p;
    SHOW("cuMemAlloc without context", cuMemAlloc(&p, 4096));

    /* Primary context. */
    show_primary_state(dev, "initially");
    CHECK(cuDevicePrimaryCtxSetFlags(dev, CU_CTX_SCHED_BLOCKING_SYNC));
    show_primary_state(dev, "after SetFlags(BLOCKING_SYNC)");
    CHECK(cuDevicePrimaryCtxRetain(&prim, dev));
    show_primary_state(dev, "after Retain");
    CHECK(cuDevicePrimaryCtxRetain(&prim2, dev));
    printf("second Retain returns the same context: %s\n", yes_no(prim == prim2));
    printf("retain does not make it current: %s\n", yes_no(current() == NULL));
    CHECK(cuCtxSetCurrent(prim));
    printf("current is primary after SetCurrent: %s\n", yes_no(current() == prim));
    show_ctx_info("primary");
    CHECK(cuCtxGetApiVersion(prim, &ver));
    printf("primary api version: %u\n", ver);
    limits();
    CHECK(cuCtxSynchronize());
    CHECK(cuCtxSynchronize_v2(prim));
    CHECK(cuCtxGetDevice_v2(&d, prim));
    printf("cuCtxGetDevice_v2(primary): %d\n", (int)d);
    SHOW("cuDevicePrimaryCtxSetFlags while active (SCHED_SPIN)",
         cuDevicePrimaryCtxSetFlags(dev, CU_CTX_SCHED_SPIN));
    show_primary_state(dev, "after SetFlags while active");
    SHOW("cuDevicePrimaryCtxSetFlags(bad flags 0x1000)", cuDevicePrimaryCtxSetFlags(dev, 0x1000));

    /* An allocation survives a release as long as a reference remains. */
    CHECK(cuMemAlloc(&p, 1 << 20));
    CHECK(cuDevicePrimaryCtxRelease(dev));
    show_primary_state(dev, "after one Release of two");
    CHECK(cuMemsetD8(p, 0x5a, 1 << 20));
    unsigned char byte = 0;
    CHECK(cuMemcpyDtoH(&byte, p + 12345, 1));
    printf("allocation still usable after one Release: %s\n", yes_no(byte == 0x5a));
    CHECK(cuMemFree(p));
    CHECK(cuCtxSetCurrent(NULL));
    printf("current is NULL after SetCurrent(NULL): %s\n", yes_no(current() == NULL));
    CHECK(cuDevicePrimaryCtxRelease(dev));
    show_primary_state(dev, "after last Release");
    SHOW("cuDevicePrimaryCtxRelease with no reference", cuDevicePrimaryCtxRelease(dev));

    /* Reset: retain, allocate, reset, retain again. */
    CHECK(cuDevicePrimaryCtxRetain(&prim, dev));
    CHECK(cuCtxSetCurrent(prim));
    CHECK(cuMemAlloc(&p, 4096));
    CHECK(cuCtxSetCurrent(NULL));
    CHECK(cuDevicePrimaryCtxReset(dev));
    show_primary_state(dev, "after Reset");
    CHECK(cuDevicePrimaryCtxRetain(&prim, dev));
    show_primary_state(dev, "after Retain following Reset");
    CHECK(cuCtxSetCurrent(prim));
    CHECK(cuMemAlloc(&p, 4096));
    CHECK(cuMemFree(p));
    CHECK(cuCtxSetCurrent(NULL));
    CHECK(cuDevicePrimaryCtxRelease(dev));
    CHECK(cuDevicePrimaryCtxSetFlags(dev, 0));
    show_primary_state(dev, "after Release and SetFlags(0)");

    /* Explicit contexts and the stack. */
    CHECK(cuCtxCreate(&a, NULL, 0, dev));
    printf("create makes the new context current: %s\n", yes_no(current() == a));
    show_ctx_info("context a (flags 0)");
    CHECK(cuCtxCreate(&b, NULL, CU_CTX_SCHED_SPIN, dev));
    printf("second create pushes: current is b: %s, b differs from a: %s\n", yes_no(current() == b),
           yes_no(a != b));
    show_ctx_info("context b (SCHED_SPIN)");
    CHECK(cuCtxGetApiVersion(b, &ver));
    printf("context b api version: %u\n", ver);
    unsigned long long ida = 0, idb = 0;
    CHECK(cuCtxGetId(a, &ida));
    CHECK(cuCtxGetId(b, &idb));
    printf("context ids differ: %s\n", yes_no(ida != idb));
    CHECK(cuCtxPopCurrent(&popped));
    printf("pop returns b: %s, current is a: %s\n", yes_no(popped == b), yes_no(current() == a));
    CHECK(cuCtxPushCurrent(b));
    printf("push b: current is b: %s\n", yes_no(current() == b));
    CHECK(cuCtxSetCurrent(a));
    printf("SetCurrent(a) replaces the top: current is a: %s\n", yes_no(current() == a));
    CHECK(cuCtxPopCurrent(&popped));
    printf("pop returns a: %s, current is a: %s\n", yes_no(popped == a), yes_no(current() == a));
    CHECK(cuCtxPopCurrent(&popped));
    printf("pop returns a: %s, current is NULL: %s\n", yes_no(popped == a), yes_no(current() == NULL));
    SHOW("cuCtxPopCurrent on emptied stack", cuCtxPopCurrent(&popped));

    /* Memory belongs to its context. */
    CHECK(cuCtxPushCurrent(a));
    CUdeviceptr pa;
    CHECK(cuMemAlloc(&pa, 4096));
    CUcontext owner = NULL;
    CHECK(cuPointerGetAttribute(&owner, CU_POINTER_ATTRIBUTE_CONTEXT, pa));
    printf("allocation in a is owned by a: %s\n", yes_no(owner == a));
    CHECK(cuCtxSynchronize());
    CHECK(cuCtxSynchronize_v2(b));
    CHECK(cuCtxGetDevice_v2(&d, b));
    printf("cuCtxGetDevice_v2(b): %d\n", (int)d);
    CHECK(cuCtxPopCurrent(&popped));

    /* Destroy b while it is not current; a stays usable. */
    CHECK(cuCtxDestroy(b));
    printf("current is NULL after destroying a non-current context: %s\n",
           yes_no(current() == NULL));
    SHOW("cuCtxGetApiVersion on destroyed context", cuCtxGetApiVersion(b, &ver));
    SHOW("cuCtxSynchronize_v2 on destroyed context", cuCtxSynchronize_v2(b));
    CHECK(cuCtxPushCurrent(a));
    CHECK(cuMemsetD32(pa, 0x01020304u, 1024));
    unsigned word = 0;
    CHECK(cuMemcpyDtoH(&word, pa + 4092, 4));
    printf("context a usable after destroying b: %s\n", yes_no(word == 0x01020304u));
    CHECK(cuMemFree(pa));

    /* Destroying the current context pops it. */
    CHECK(cuCtxDestroy(a));
    printf("current is NULL after destroying the current context: %s\n", yes_no(current() == NULL));
    SHOW("cuCtxSynchronize after destroying the current context", cuCtxSynchronize());
    SHOW("cuCtxDestroy(NULL)", cuCtxDestroy(NULL));
    SHOW("cuCtxCreate on invalid device", cuCtxCreate(&a, NULL, 0, (CUdevice)9999));
    SHOW("cuCtxCreate with bad flags 0x1000", cuCtxCreate(&a, NULL, 0x1000, dev));

    /* The primary context again, after explicit contexts came and went. */
    prim = init_primary(&dev);
    printf("primary current again: %s\n", yes_no(current() == prim));
    CHECK(cuMemAlloc(&p, 4096));
    CHECK(cuMemFree(p));
    release_primary(dev);
    show_primary_state(dev, "at exit");

    finish("contexts");
    return 0;
}
