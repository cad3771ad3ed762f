/* Records NVIDIA's exact error names and strings: for every code 0..1000 that
 * cuGetErrorName knows, prints `code<TAB>name<TAB>string`. Run natively only. */
#include "common.h"

int main(void) {
    int known = 0;
    for (int code = 0; code <= 1000; code++) {
        const char *name = NULL, *str = NULL;
        if (cuGetErrorName((CUresult)code, &name) != CUDA_SUCCESS || name == NULL) continue;
        if (cuGetErrorString((CUresult)code, &str) != CUDA_SUCCESS || str == NULL) str = "";
        printf("%d\t%s\t%s\n", code, name, str);
        known++;
    }
    fprintf(stderr, "errstr_dump: %d codes\n", known);
    return known > 0 ? 0 : 1;
}
