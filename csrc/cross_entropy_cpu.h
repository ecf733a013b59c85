// The masked-LM softmax's row kernel on CPU (design.md §1.3). For rows t of x: (rows, V) fp32 with
// row stride ldx, and targets y_t (any value outside [0, V) marks an ignored row):
//   lse_t  = logsumexp_v x_tv                                               (fp64)
//   loss_t = lse_t − (1 − ε)·x_{t,y_t} − ε·mean_v x_tv + z·lse_t²           (0 for an ignored row)
// and, when w (rows,) is given, the gradient of Σ_t w_t·loss_t, written to g (row stride ldg; g may
// be x itself, which the row then no longer holds):
//   g_tv   = w_t·(softmax_tv·(1 + 2z·lse_t) − ε/V) − w_t·(1 − ε)·[v = y_t]    (0 for an ignored row)
// Rows run in parallel (at::parallel_for). Sums over V are carried in fp64 (V reaches 250k).
#pragma once

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

#define MMFAST_DECLARE_CROSS_ENTROPY_KERNELS(CAP) \
  namespace CAP {                                 \
  void cross_entropy_rows(const CrossEntropyRows& args); \
  }

#ifdef CPU_CAPABILITY
MMFAST_DECLARE_CROSS_ENTROPY_KERNELS(CPU_CAPABILITY)
#else
MMFAST_DECLARE_CROSS_ENTROPY_KERNELS(DEFAULT)
MMFAST_DECLARE_CROSS_ENTROPY_KERNELS(AVX2)
MMFAST_DECLARE_CROSS_ENTROPY_KERNELS(AVX512)
#endif

}  // namespace mmfast
