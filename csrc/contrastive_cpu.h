// The contrastive family's two primitives on CPU (design.md §1.1), over the logits
// Z = scale·A·Bᵀ + bias, A: (N, D), B: (M, D), both fp32 and contiguous. Z is never stored whole:
// both passes walk it in tiles (contrastive_cpu_kernel.cpp). The statistics are fp64: a logsumexp
// of logits of size ~100 rounded to fp32 would be off by up to 4e-6, and exp(Z − r) would carry
// that as a relative error into every gradient; the grad pass subtracts r as hi + lo fp32 parts.
//
// stats: row (N) gets logsumexp_j Z_ij, or Σ_j softplus(−t_ij·Z_ij) when sigmoid, where t_ij = +1
//        if j = pos_i (pos: (N,) int64, a row's positive column; undefined or out of range: none)
//        and −1 otherwise; col (M), when defined, gets logsumexp_i Z_ij (softmax only).
// grad:  with G_ij = wr_i·exp(Z_ij − r_i) + wc_j·exp(Z_ij − c_j)   (softmax; the wc term only when wc is defined)
//        or  G_ij = −t_ij·wr_i·σ(−t_ij·Z_ij)                         (sigmoid),
//        da (N, D) = scale·G·B and db (M, D) = scale·Gᵀ·A, each only when defined (zero-filled on entry);
//        returns (Σ_ij G_ij·(A·Bᵀ)_ij, Σ_ij G_ij): the scale and bias gradients.
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

namespace mmfast {

#define MMFAST_DECLARE_CONTRASTIVE_KERNELS(CAP)                                              \
  namespace CAP {                                                                            \
  void contrastive_stats(const at::Tensor& a, const at::Tensor& b, float scale, float bias, \
                         bool sigmoid, const at::Tensor& pos, at::Tensor& row,               \
                         at::Tensor& col);                                                   \
  std::pair<double, double> contrastive_grad(                                                \
      const at::Tensor& a, const at::Tensor& b, float scale, float bias, bool sigmoid,       \
      const at::Tensor& pos, const at::Tensor& row, const at::Tensor& col, const at::Tensor& wr, const at::Tensor& wc, \
      at::Tensor& da, at::Tensor& db);                                                       \
  }

#ifdef CPU_CAPABILITY
MMFAST_DECLARE_CONTRASTIVE_KERNELS(CPU_CAPABILITY)
#else
MMFAST_DECLARE_CONTRASTIVE_KERNELS(DEFAULT)
MMFAST_DECLARE_CONTRASTIVE_KERNELS(AVX2)
MMFAST_DECLARE_CONTRASTIVE_KERNELS(AVX512)
#endif

}  // namespace mmfast
