/* JIT linking (cuLinkCreate / cuLinkAddData / cuLinkAddFile / cuLinkComplete / cuLinkDestroy):
 * two PTX inputs, one calling a function the other defines (relocatable device code), linked,
 * loaded with cuModuleLoadData and launched; the JIT logs through the option buffers; a link
 * with an unresolved function. On the GPU machine device/libvgpu-gpu.sh compares the output
 * natively and through libvgpu; tests/cudarc_sim.rs runs it on the simulated GPU (whose linker
 * concatenates PTX and whose fill_u32 writes its value, not twice it). */
#include "common.h"

#include <unistd.h>

static const char ptx_kernel[] =
    ".version 8.0\n"
    ".target sm_90\n"
    ".address_size 64\n"
    ".extern .func (.param .b32 out) twice(.param .b32 x);\n"
    ".visible .entry fill_u32(.param .u64 p, .param .u32 v, .param .u64 n)\n"
    "{\n"
    "  .reg .b32 %r<4>;\n"
    "  .reg .b64 %rd<6>;\n"
    "  .reg .pred %q;\n"
    "  ld.param.u64 %rd1, [p];\n"
    "  ld.param.u32 %r1, [v];\n"
    "  ld.param.u64 %rd2, [n];\n"
    "  mov.u32 %r2, %tid.x;\n"
    "  cvt.u64.u32 %rd3, %r2;\n"
    "  setp.ge.u64 %q, %rd3, %rd2;\n"
    "  @%q bra DONE;\n"
    "  {\n"
    "    .param .b32 a;\n"
    "    .param .b32 r;\n"
    "    st.param.b32 [a], %r1;\n"
    "    call.uni (r), twice, (a);\n"
    "    ld.param.b32 %r3, [r];\n"
    "  }\n"
    "  cvta.to.global.u64 %rd4, %rd1;\n"
    "  shl.b64 %rd5, %rd3, 2;\n"
    "  add.u64 %rd4, %rd4, %rd5;\n"
    "  st.global.u32 [%rd4], %r3;\n"
    "DONE:\n"
    "  ret;\n"
    "}\n";

static const char ptx_helper[] =
    ".version 8.0\n"
    ".target sm_90\n"
    ".address_size 64\n"
    ".visible .func (.param .b32 out) twice(.param .b32 x)\n"
    "{\n"
    "  .reg .b32 %r<3>;\n"
    "  ld.param.b32 %r1, [x];\n"
    "  add.u32 %r2, %r1, %r1;\n"
    "  st.param.b32 [out], %r2;\n"
    "  ret;\n"
    "}\n";

int main(void) {
    CHECK(cuInit(0));
    CUdevice dev;
    CUcontext ctx;
    CHECK(cuDeviceGet(&dev, 0));
    CHECK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CHECK(cuCtxSetCurrent(ctx));

    /* Options: both logs, verbose; the sizes come back as what was filled. */
    char info[4096], error[4096];
    memset(info, 0, sizeof info);
    memset(error, 0, sizeof error);
    CUjit_option opts[5] = {CU_JIT_INFO_LOG_BUFFER, CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES, CU_JIT_ERROR_LOG_BUFFER,
                            CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES, CU_JIT_LOG_VERBOSE};
    void *vals[5] = {info, (void *)(uintptr_t)sizeof info, error, (void *)(uintptr_t)sizeof error, (void *)(uintptr_t)1};
    CUlinkState link;
    CHECK(cuLinkCreate(5, opts, vals, &link));
    CHECK(cuLinkAddData(link, CU_JIT_INPUT_PTX, (void *)ptx_kernel, sizeof ptx_kernel, "kernel.ptx", 0, NULL, NULL));
    /* The second input from a file, without its NUL. */
    char path[] = "/tmp/vgpu-link-XXXXXX";
    int fd = mkstemp(path);
    REQUIRE(fd >= 0, "mkstemp");
    REQUIRE(write(fd, ptx_helper, sizeof ptx_helper - 1) == (ssize_t)(sizeof ptx_helper - 1), "write");
    close(fd);
    CHECK(cuLinkAddFile(link, CU_JIT_INPUT_PTX, path, 0, NULL, NULL));
    unlink(path);
    void *image = NULL;
    size_t size = 0;
    CHECK(cuLinkComplete(link, &image, &size));
    REQUIRE(image != NULL && size > 0, "linked image");
    size_t info_filled = (size_t)(uintptr_t)vals[1];
    const char *slot = info_filled == strlen(info) + 1 ? "length + 1"
                       : info_filled == strlen(info)   ? "length"
                       : info_filled == sizeof info    ? "unchanged"
                                                       : "other";
    printf("linked: image %s, info log %s (size slot: %s)\n", size > 0 ? "non-empty" : "empty",
           info[0] ? "non-empty" : "empty", slot);

    CUmodule mod;
    CUfunction fn;
    CHECK(cuModuleLoadData(&mod, image));
    CHECK(cuLinkDestroy(link));
    CHECK(cuModuleGetFunction(&fn, mod, "fill_u32"));
    unsigned int nfuncs = 0;
    CHECK(cuModuleGetFunctionCount(&nfuncs, mod));
    CUfunction listed[4] = {NULL, NULL, NULL, NULL};
    CHECK(cuModuleEnumerateFunctions(listed, nfuncs < 4 ? nfuncs : 4, mod));
    printf("the linked module lists %u function(s)\n", nfuncs);
    /* The listed function is the one launched below. */
    REQUIRE(nfuncs == 1 && listed[0] != NULL, "one listed function");
    fn = listed[0];
    CUdeviceptr d;
    const size_t n = 64;
    CHECK(cuMemAlloc(&d, n * 4));
    CHECK(cuMemsetD32(d, 0, n));
    unsigned int v = 21;
    uint64_t count = n;
    void *args[] = {&d, &v, &count};
    CHECK(cuLaunchKernel(fn, 1, 1, 1, (unsigned)n, 1, 1, 0, NULL, args, NULL));
    CHECK(cuCtxSynchronize());
    uint32_t out[64];
    CHECK(cuMemcpyDtoH(out, d, sizeof out));
    int same = 1;
    for (size_t i = 1; i < n; i++) same &= out[i] == out[0];
    printf("launched the linked kernel: out[0] = %u, all equal %s\n", out[0], yes_no(same));
    CHECK(cuMemFree(d));
    CHECK(cuModuleUnload(mod));

    /* A link whose function is defined nowhere. */
    memset(error, 0, sizeof error);
    vals[3] = (void *)(uintptr_t)sizeof error;
    CHECK(cuLinkCreate(5, opts, vals, &link));
    CHECK(cuLinkAddData(link, CU_JIT_INPUT_PTX, (void *)ptx_kernel, sizeof ptx_kernel, "kernel.ptx", 0, NULL, NULL));
    CUresult r = cuLinkComplete(link, &image, &size);
    printf("unresolved: cuLinkComplete -> %s, error log %s\n", err_name(r), error[0] ? "non-empty" : "empty");
    CHECK(cuLinkDestroy(link));

    /* Options whose values point into the program are refused by libvgpu (not used here
     * natively); a NULL input is an error both ways. */
    CHECK(cuLinkCreate(0, NULL, NULL, &link));
    SHOW("cuLinkAddData(NULL)", cuLinkAddData(link, CU_JIT_INPUT_PTX, NULL, 10, "x", 0, NULL, NULL));
    CHECK(cuLinkDestroy(link));
    CHECK(cuDevicePrimaryCtxRelease(dev));
    printf("OK link\n");
    return 0;
}
