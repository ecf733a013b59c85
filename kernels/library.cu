// The library's own entry points: what mmfast/_cuda.py asks before it uses any launcher.
#include "common.cuh"

// Bumped whenever a launcher's signature changes: mmfast/_cuda.py refuses a library of another version.
#define MMFAST_CUDA_ABI 1

#ifndef MMFAST_CUDA_ARCHS
#define MMFAST_CUDA_ARCHS "unknown"
#endif

namespace {
__global__ void probe_kernel(int* out) {
  if (out != nullptr) *out = 1;
}
}  // namespace

MMFAST_API int mmfast_cuda_abi() { return MMFAST_CUDA_ABI; }

// The architectures compiled in, as kernels/build.py named them ("80;90a", PTX for the newest).
MMFAST_API const char* mmfast_cuda_archs() { return MMFAST_CUDA_ARCHS; }

MMFAST_API const char* mmfast_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

// 0 if this library holds code the device can run (a cubin for its architecture, or PTX the driver
// can compile), else the CUDA error (cudaErrorNoKernelImageForDevice, an old driver, no device).
MMFAST_API int mmfast_cuda_probe(int device) {
  mmfast::DeviceScope scope(device);
  cudaFuncAttributes attributes;
  return static_cast<int>(cudaFuncGetAttributes(&attributes, probe_kernel));
}
