/* Device and driver queries: version, count, name, UUID, memory, every device attribute. */
#include "common.h"

static void query_device(CUdevice dev) {
    char name[256];
    CUuuid uuid;
    size_t total = 0;
    int major = -1, minor = -1;

    CHECK(cuDeviceGetName(name, (int)sizeof name, dev));
    printf("device %d name: %s\n", (int)dev, name);
    /* A short buffer truncates (NUL-terminated) rather than failing. */
    char shortname[8];
    memset(shortname, 'x', sizeof shortname);
    CHECK(cuDeviceGetName(shortname, (int)sizeof shortname, dev));
    printf("device %d name in 8 bytes: %.8s (terminated: %s)\n", (int)dev, shortname,
           yes_no(memchr(shortname, '\0', sizeof shortname) != NULL));

    CHECK(cuDeviceGetUuid(&uuid, dev));
    printf("device %d uuid:", (int)dev);
    for (int i = 0; i < 16; i++) printf("%s%02x", (i == 4 || i == 6 || i == 8 || i == 10) ? "-" : "",
                                        (unsigned char)uuid.bytes[i]);
    printf("\n");

    CHECK(cuDeviceTotalMem(&total, dev));
    printf("device %d total memory: %zu bytes\n", (int)dev, total);

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    /* Deprecated but still declared in CUDA 13.0's cuda.h. */
    CUresult r = cuDeviceComputeCapability(&major, &minor, dev);
    if (r == CUDA_SUCCESS)
        printf("device %d compute capability (cuDeviceComputeCapability): %d.%d\n", (int)dev, major,
               minor);
    else
        printf("device %d cuDeviceComputeCapability -> %s\n", (int)dev, err_name(r));
    CUdevprop prop;
    memset(&prop, 0, sizeof prop);
    r = cuDeviceGetProperties(&prop, dev);
    if (r == CUDA_SUCCESS)
        printf("device %d props: maxThreadsPerBlock=%d maxThreadsDim=%d,%d,%d maxGridSize=%d,%d,%d "
               "sharedMemPerBlock=%d totalConstantMemory=%d SIMDWidth=%d memPitch=%d "
               "regsPerBlock=%d clockRate=%d textureAlign=%d\n",
               (int)dev, prop.maxThreadsPerBlock, prop.maxThreadsDim[0], prop.maxThreadsDim[1],
               prop.maxThreadsDim[2], prop.maxGridSize[0], prop.maxGridSize[1], prop.maxGridSize[2],
               prop.sharedMemPerBlock, prop.totalConstantMemory, prop.SIMDWidth, prop.memPitch,
               prop.regsPerBlock, prop.clockRate, prop.textureAlign);
    else
        printf("device %d cuDeviceGetProperties -> %s\n", (int)dev, err_name(r));
#pragma GCC diagnostic pop

    for (int a = 1; a < (int)CU_DEVICE_ATTRIBUTE_MAX; a++) {
        int v = 0;
        r = cuDeviceGetAttribute(&v, (CUdevice_attribute)a, dev);
        if (r == CUDA_SUCCESS)
            printf("attr %d = %d\n", a, v);
        else
            printf("attr %d -> %s\n", a, err_name(r));
    }
    int v = 0;
    SHOW("cuDeviceGetAttribute(CU_DEVICE_ATTRIBUTE_MAX)",
         cuDeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_MAX, dev));
    SHOW("cuDeviceGetAttribute(0)", cuDeviceGetAttribute(&v, (CUdevice_attribute)0, dev));
    SHOW("cuDeviceGetAttribute(100000)",
         cuDeviceGetAttribute(&v, (CUdevice_attribute)100000, dev));
}

int main(void) {
    start();
    int count = -1, version = -1;

    /* Before cuInit. */
    SHOW("cuDeviceGetCount before cuInit", cuDeviceGetCount(&count));
    CHECK(cuDriverGetVersion(&version));
    printf("driver version: %d\n", version);

    SHOW("cuInit(1) (bad flags)", cuInit(1));
    CHECK(cuInit(0));
    CHECK(cuInit(0)); /* idempotent */
    CHECK(cuDeviceGetCount(&count));
    printf("device count: %d\n", count);
    REQUIRE(count >= 1, "no device");

    for (int i = 0; i < count; i++) {
        CUdevice dev;
        CHECK(cuDeviceGet(&dev, i));
        printf("cuDeviceGet(%d) returns ordinal %d: %s\n", i, (int)dev, yes_no((int)dev == i));
        query_device(dev);
    }

    CUdevice bad;
    SHOW("cuDeviceGet(count)", cuDeviceGet(&bad, count));
    SHOW("cuDeviceGet(-1)", cuDeviceGet(&bad, -1));
    int v = 0;
    SHOW("cuDeviceGetAttribute on device count",
         cuDeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_WARP_SIZE, (CUdevice)count));
    char name[64];
    SHOW("cuDeviceGetName on device count", cuDeviceGetName(name, (int)sizeof name, (CUdevice)count));
    size_t total;
    SHOW("cuDeviceTotalMem on device count", cuDeviceTotalMem(&total, (CUdevice)count));
    SHOW("cuDeviceGetCount(NULL)", cuDeviceGetCount(NULL));

    finish("device_query");
    return 0;
}
