// Fused similarity and streaming top-k on CPU (design.md §1.2), over S = s·n(A)·n(B)ᵀ with
// A: (N, D), B: (M, D) and n an optional L2 normalisation. The schema implementations
// (similarity_cpu.cpp) fold s and the row norms of A into an fp32 copy of A (O(N·D)) and pass
// the inverse norms of B as a column scale, so the kernels below see S = A'·B'ᵀ·diag(col_scale).
//
// topk_similarity: for each row of S its k largest entries, sorted descending, ties to the lower
//   column index; NaN ranks above every number (as torch.topk), NaNs among themselves by index.
//   a: (N, D) fp32 contiguous (scale and row norms folded in), b: (M, D) fp32 contiguous,
//   col_scale: M floats or null, 1 <= k <= M; values (N, k) fp32, indices (N, k) int64.
// similarity_rows: out (N, M) of any float dtype ← A'·B'ᵀ, row block by row block through a
//   thread-local fp32 buffer (no N×M fp32 temporary when out is bf16/fp16).
#pragma once

#include <ATen/core/Tensor.h>

namespace mmfast {

#define MMFAST_DECLARE_SIMILARITY_KERNELS(CAP)                                                      \
  namespace CAP {                                                                                   \
  void topk_similarity(const at::Tensor& a, const at::Tensor& b, const float* col_scale, int64_t k, \
                       at::Tensor& values, at::Tensor& indices);                                    \
  void similarity_rows(const at::Tensor& a, const at::Tensor& b, at::Tensor& out);                  \
  }

#ifdef CPU_CAPABILITY
MMFAST_DECLARE_SIMILARITY_KERNELS(CPU_CAPABILITY)
#else
MMFAST_DECLARE_SIMILARITY_KERNELS(DEFAULT)
MMFAST_DECLARE_SIMILARITY_KERNELS(AVX2)
MMFAST_DECLARE_SIMILARITY_KERNELS(AVX512)
#endif

}  // namespace mmfast
