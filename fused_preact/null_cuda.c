/* A libcuda.so.1 that launches nothing: every driver call Triton's CUDA
 * launcher makes succeeds at once, with the figures of an H100 (sm_90, 132
 * SMs, 227 KiB of shared memory per block).
 *
 * fused_preact/null_driver.py builds and loads it (LD_LIBRARY_PATH, TRITON_LIBCUDA_PATH)
 * on a machine without a GPU, so that a Triton launch runs its whole host
 * path for real -- JITFunction.run, argument binding and specialisation, the
 * kernel cache, the autotuner's cache, the compiled C launcher marshalling
 * every argument -- and stops at cuLaunchKernelEx. Kernels are compiled for
 * sm_90 with Triton's own ptxas; nothing is executed, and pointers are never
 * dereferenced. Attribute numbers: CUdevice_attribute / CUfunction_attribute
 * in cuda.h. */
#include <stddef.h>
#include <string.h>
typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
CUresult cuInit(unsigned f) { return 0; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return 0; }
CUresult cuDeviceGet(CUdevice *d, int i) { *d = 0; return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return 0; }
CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
  switch (attr) {
    case 75: *v = 9; break;                 /* compute capability major */
    case 76: *v = 0; break;                 /* minor */
    case 97: *v = 232448; break;            /* max shared per block optin */
    case 81: *v = 233472; break;            /* max shared per SM */
    case 12: *v = 65536; break;             /* max registers per block */
    case 16: *v = 132; break;               /* SMs */
    case 10: *v = 32; break;                /* warp size */
    case 1: *v = 1024; break;               /* max threads per block */
    default: *v = 1; break;
  }
  return 0;
}
static int ctx_token;
CUresult cuCtxGetCurrent(void **c) { *c = &ctx_token; return 0; }
CUresult cuCtxSetCurrent(void *c) { return 0; }
CUresult cuCtxGetDevice(CUdevice *d) { *d = 0; return 0; }
CUresult cuCtxGetLimit(size_t *v, int l) { *v = 0; return 0; }
CUresult cuCtxSetLimit(int l, size_t v) { return 0; }
CUresult cuDevicePrimaryCtxRetain(void **c, CUdevice d) { *c = &ctx_token; return 0; }
static int module_token, function_token;
CUresult cuModuleLoadData(void **m, const void *img) { *m = &module_token; return 0; }
CUresult cuModuleUnload(void *m) { return 0; }
CUresult cuModuleGetFunction(void **f, void *m, const char *name) { *f = &function_token; return 0; }
CUresult cuFuncGetAttribute(int *v, int attr, void *f) { *v = attr == 0 ? 1024 : 0; return 0; }
CUresult cuFuncSetAttribute(void *f, int attr, int v) { return 0; }
CUresult cuFuncSetCacheConfig(void *f, int c) { return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { *s = "null driver"; return 0; }
CUresult cuPointerGetAttribute(void *data, int attr, CUdeviceptr p) { return 0; }
CUresult cuPointerGetAttributes(unsigned n, int *attrs, void **data, CUdeviceptr p) { return 0; }
CUresult cuLaunchKernelEx(const void *config, void *f, void **params, void **extra) { return 0; }
CUresult cuOccupancyMaxActiveClusters(int *n, void *f, const void *config) { *n = 1; return 0; }
CUresult cuTensorMapEncodeTiled(void) { return 0; }
CUresult cuTensorMapEncodeIm2col(void) { return 0; }
CUresult cuGetProcAddress(const char *sym, void **fn, int v, unsigned long long flags, void *status) { *fn = NULL; return 1; }
