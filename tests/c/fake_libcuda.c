/* A stand-in for the NVIDIA driver (libcuda.so.1) that reports one device and can do nothing else: it lets a
 * machine without a GPU exercise the backend rule's "driver present" branch (liblowvram.so forwarding to the
 * liblowvram_cuda.so beside it, the CLI re-executing lowvram-cuda). It only answers the probe lowvram makes
 * (src/system.rs); nothing here pretends to run CUDA work.
 *
 *   gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o DIR/libcuda.so.1 tests/c/fake_libcuda.c
 *   LD_LIBRARY_PATH=DIR program
 */
#include <stddef.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;

static int context_token;

CUresult cuInit(unsigned flags) { (void)flags; return 0; }
CUresult cuDriverGetVersion(int *version) { *version = 13000; return 0; }
CUresult cuDeviceGetCount(int *count) { *count = 1; return 0; }
CUresult cuDeviceGet(CUdevice *device, int ordinal) { *device = ordinal; return ordinal == 0 ? 0 : 101; }
CUresult cuDeviceGetName(char *name, int len, CUdevice device) {
    (void)device;
    strncpy(name, "fake driver (tests/c/fake_libcuda.c)", (size_t)len - 1);
    name[len - 1] = 0;
    return 0;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice device) { (void)device; *ctx = &context_token; return 0; }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device) { (void)device; return 0; }
CUresult cuCtxPushCurrent_v2(CUcontext ctx) { (void)ctx; return 0; }
CUresult cuCtxPopCurrent_v2(CUcontext *ctx) { if (ctx) *ctx = &context_token; return 0; }
CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total_bytes) {
    *free_bytes = (size_t)1 << 30;
    *total_bytes = (size_t)2 << 30;
    return 0;
}
CUresult cuGetErrorName(CUresult error, const char **name) {
    (void)error;
    *name = "CUDA_ERROR_FAKE_DRIVER";
    return 0;
}
