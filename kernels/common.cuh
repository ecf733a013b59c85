// What every CUDA source of mmfast shares on the host side of a launch: the exported-function
// convention, the dtype codes Python passes, the device scope, element conversions.
//
// The library is framework-free: an exported launcher takes raw pointers, sizes, the device index
// and a cudaStream_t (torch's current stream, passed by mmfast/_cuda.py as an integer) and returns a
// cudaError_t (0 = success; the launch's own error otherwise). Python allocates every output and
// workspace with torch, so the library never allocates device memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

// Every exported launcher: `MMFAST_API int mmfast_<name>(int device, cudaStream_t stream, ...)`.
// The library is compiled with -fvisibility=hidden: only these symbols are visible to ctypes.
#define MMFAST_API extern "C" __attribute__((visibility("default")))

namespace mmfast {

// Element types, as mmfast/_cuda.py's DTYPE_CODES.
enum Dtype : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// An argument the kernels cannot take (Python checks first, so this means a caller bug).
constexpr int kInvalidArgument = static_cast<int>(cudaErrorInvalidValue);

// Makes `device` current for a launch and restores the caller's device afterwards (torch keeps its
// own notion of the current device; a launcher must not change it).
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    cudaGetDevice(&previous_);
    if (previous_ != device) cudaSetDevice(device);
  }
  ~DeviceScope() {
    int now = previous_;
    cudaGetDevice(&now);
    if (now != previous_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

// The status of the launches just made on this thread (cudaGetLastError also clears it).
inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

// ⌈a / b⌉ for positive b.
__host__ __device__ __forceinline__ int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Element ↔ fp32; stores round to nearest even, as torch's own casts.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

}  // namespace mmfast

// Runs BODY with T bound to the element type of dtype code CODE; an unknown code returns
// kInvalidArgument from the enclosing launcher.
#define MMFAST_DISPATCH_DTYPE(CODE, T, ...)        \
  switch (CODE) {                                  \
    case ::mmfast::kF32: {                         \
      using T = float;                             \
      __VA_ARGS__;                                 \
    } break;                                       \
    case ::mmfast::kF16: {                         \
      using T = __half;                            \
      __VA_ARGS__;                                 \
    } break;                                       \
    case ::mmfast::kBF16: {                        \
      using T = __nv_bfloat16;                     \
      __VA_ARGS__;                                 \
    } break;                                       \
    default:                                       \
      return ::mmfast::kInvalidArgument;           \
  }
