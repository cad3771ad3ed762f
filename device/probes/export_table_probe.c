/* On the GPU machine, against the real driver: calls the slots of a private export table
 * that a library was traced calling (tools/cuda-trace), with the arguments it was seen to
 * pass, and prints what each slot returns and writes, so that libvgpu's answer is data
 * rather than a guess. Table {21318C60-9714-3248-8CA6-41FF7324C8F2}, slots 4, 51 and 39,
 * as cuBLASLt 13.1 calls them before its first heuristics query, and TOOLS_TLS
 * {42D85A81-23F6-CB47-8298-F6E78A3AECDC} slots 1 and 2, whose output cuBLASLt passes to them.
 * Build: gcc -I$CUDA/include export_table_probe.c -o probe -L$CUDA/lib64/stubs -lcuda */
#include <cuda.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef CUresult (*slot2_t)(void *, void *);
typedef CUresult (*slot3_t)(void *, void *, void *);

static void dump(const char *what, const void *p, size_t n) {
    const unsigned char *b = p;
    printf("%s:", what);
    for (size_t i = 0; i < n; i++) printf("%s%02x", i % 8 ? "" : " ", b[i]);
    printf("\n");
}

int main(void) {
    static const CUuuid id = {{(char)0x21, (char)0x31, (char)0x8c, (char)0x60, (char)0x97, (char)0x14, (char)0x32, (char)0x48, (char)0x8c, (char)0xa6, (char)0x41, (char)0xff, (char)0x73, (char)0x24, (char)0xc8, (char)0xf2}};
    const void *table = NULL;
    CUdevice dev;
    CUcontext ctx;
    if (cuInit(0) || cuDeviceGet(&dev, 0) || cuDevicePrimaryCtxRetain(&ctx, dev) || cuCtxSetCurrent(ctx)) {
        printf("FAIL: init\n");
        return 1;
    }
    setvbuf(stdout, NULL, _IONBF, 0); /* a slot that crashes leaves what came before */
    CUresult rc = cuGetExportTable(&table, &id);
    printf("cuGetExportTable -> %d, size word %zu\n", rc, table ? *(const size_t *)table : 0);
    if (rc) return 1;
    const void *const *slots = table;
    uint64_t out[4];
    void *ctxs[2] = {ctx, NULL};
    for (int c = 0; c < 2; c++) {
        printf("== context %s\n", c ? "NULL" : "primary");
        memset(out, 0xaa, sizeof out);
        rc = ((slot2_t)slots[4])(ctxs[c], out);
        printf("slot 4 (ctx, out) -> %d\n", rc);
        dump("  out", out, sizeof out);
        memset(out, 0xaa, sizeof out);
        rc = ((slot3_t)slots[51])(ctxs[c], NULL, out);
        printf("slot 51 (ctx, NULL, out) -> %d\n", rc);
        dump("  out", out, sizeof out);
        void *obj = rc == 0 ? (void *)(uintptr_t)out[0] : NULL;
        if (obj) dump("  *out[0] (first 64 bytes)", obj, 64);
        memset(out, 0xaa, sizeof out);
        rc = ((slot3_t)slots[39])(ctxs[c], obj, out);
        printf("slot 39 (ctx, obj, out) -> %d\n", rc);
        dump("  out", out, sizeof out);
    }
    static const CUuuid tls_id = {{(char)0x42, (char)0xd8, (char)0x5a, (char)0x81, (char)0x23, (char)0xf6,
                                   (char)0xcb, (char)0x47, (char)0x82, (char)0x98, (char)0xf6, (char)0xe7,
                                   (char)0x8a, (char)0x3a, (char)0xec, (char)0xdc}};
    const void *tls = NULL;
    rc = cuGetExportTable(&tls, &tls_id);
    printf("TOOLS_TLS: cuGetExportTable -> %d, size word %zu; current context %p\n", rc,
           tls ? *(const size_t *)tls : 0, (void *)ctx);
    if (rc == 0) {
        for (int s = 1; s <= 2; s++) {
            memset(out, 0xaa, sizeof out);
            rc = ((slot2_t)((const void *const *)tls)[s])(out, NULL);
            printf("TOOLS_TLS slot %d (out) -> %d\n", s, rc);
            dump("  out", out, sizeof out);
        }
        cuCtxSetCurrent(NULL);
        memset(out, 0xaa, sizeof out);
        rc = ((slot2_t)((const void *const *)tls)[2])(out, NULL);
        printf("TOOLS_TLS slot 2 (out) with no current context -> %d\n", rc);
        dump("  out", out, sizeof out);
        cuCtxSetCurrent(ctx);
    }
    int smem = 0;
    cuDeviceGetAttribute(&smem, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev);
    printf("max shared memory per block (opt-in): %d\n", smem);
    return 0;
}
