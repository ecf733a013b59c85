// The masked-LM softmax's row kernel on CPU (design.md §1.3). For rows t of x: (rows, V) fp32 with
// row stride ldx, and targets y_t (any value outside [0, V) marks an ignored row):
//   lse_t  = logsumexp_v x_tv                                               (fp64)
//   loss_t = lse_t − (1 − ε)·x_{t,y_t} − ε·mean_v x_tv + z·lse_t²           (0 for an ignored row)
// and, when w (rows,) is given, the gradient of Σ_t w_t·loss_t, written to g (row stride ldg; g may
// be x itself, which the row then no longer holds):
//   g_tv   = w_t·(softmax_tv·(1 + 2z·lse_t) − ε/V) − w_t·(1 − ε)·[v = y_t]    (0 for an ignored row)
// Rows run in parallel (at::parallel_for). Sums over V are carried in fp64 (V reaches 250k).
//
// The linear variant: the same per-row loss over x = h·wᵀ + bias for the kept rows only, walked in
// tiles of kept rows × vocabulary chunks so that no row of x is ever whole in memory:
//   forward:  loss (T,) fp32 and lse (T,) fp64 (both written for kept rows only)       2·T_kept·V·Dh FLOPs
//   backward: with the forward's lse and weights w (T,), the gradients of Σ_t w_t·loss_t
//             added into dh (T, Dh), dw (V, Dh), dbias (V,) (fp32, zero-filled)        6·T_kept·V·Dh FLOPs
//   fused:    both, from the forward's own logits: each block of kept rows keeps its whole rows of
//             x (kLinearBlockRows × V fp32) between its two walks over the chunks        6·T_kept·V·Dh FLOPs
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace mmfast {

struct CrossEntropyRows {
  const float* x;
  int64_t ldx;
  int64_t rows, vocab;
  const int64_t* target;
  float eps, z;
  float* loss;       // (rows,)
  double* lse;       // (rows,)
  const float* w;    // (rows,) or null: no gradient
  float* g;          // (rows, ldg), used when w is given
  int64_t ldg;
};

// Kept rows per block of the linear variant's tiles (the fused path holds a block's rows of x whole).
constexpr int64_t kLinearBlockRows = 256;

struct LinearCrossEntropy {
  at::Tensor h;       // (T, Dh) fp32 contiguous
  at::Tensor w;       // (V, Dh) fp32 contiguous
  at::Tensor bias;    // (V,) fp32, or undefined
  at::Tensor kept;    // (T_kept,) int64: the rows whose target is kept
  const int64_t* target;  // (T,), in [0, V) for kept rows
  float eps, z;
};

#define MMFAST_DECLARE_CROSS_ENTROPY_KERNELS(CAP)                                                      \
  namespace CAP {                                                                                      \
  void cross_entropy_rows(const CrossEntropyRows& args);                                               \
  void linear_cross_entropy_forward(const LinearCrossEntropy& args, float* loss, double* lse);         \
  void linear_cross_entropy_backward(const LinearCrossEntropy& args, const double* lse, const float* w, \
                                     at::Tensor& dh, at::Tensor& dw, at::Tensor& dbias);               \
  void linear_cross_entropy_fused(const LinearCrossEntropy& args, const float* w, float* loss,         \
                                  double* lse, at::Tensor& dh, at::Tensor& dw, at::Tensor& dbias);     \
  }

#ifdef CPU_CAPABILITY
MMFAST_DECLARE_CROSS_ENTROPY_KERNELS(CPU_CAPABILITY)
#else
MMFAST_DECLARE_CROSS_ENTROPY_KERNELS(DEFAULT)
MMFAST_DECLARE_CROSS_ENTROPY_KERNELS(AVX2)
MMFAST_DECLARE_CROSS_ENTROPY_KERNELS(AVX512)
#endif

}  // namespace mmfast
