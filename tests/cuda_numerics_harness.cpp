// kernels/numerics.cuh compiled as host C++ (the same functions the CUDA kernels run on the device),
// exported over arrays for tests/test_cuda_numerics.py to compare with float64.
#include <numerics.cuh>

#include <stdint.h>

using namespace mmfast;

extern "C" {

// Row r of x (rows × n) → its logsumexp, as a kernel forms it: the row cut into `parts` chunks, each
// chunk's max, then Σ exp in fp32 per chunk (a thread's register sum) with the entries equal to the
// max counted apart (exp_rest / exp_top), chunks merged in order with lse_merge. naive = 1: the top
// entries summed with the rest in fp32 (what exp_top avoids), for the test that shows the difference.
void row_lse(const float* x, int64_t rows, int64_t n, int64_t parts, int naive, double* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * n;
    Lse total = lse_empty();
    const int64_t step = (n + parts - 1) / parts;
    for (int64_t c0 = 0; c0 < n; c0 += step) {
      const int64_t c1 = c0 + step < n ? c0 + step : n;
      float mx = -INFINITY;
      for (int64_t c = c0; c < c1; ++c) mx = nan_max(mx, row[c]);
      float rest = 0.f, top = 0.f;
      for (int64_t c = c0; c < c1; ++c) {
        if (naive) {
          rest += mx == -INFINITY ? 0.f : expf(row[c] - mx);
        } else {
          rest += exp_rest(row[c], mx);
          top += exp_top(row[c], mx);
        }
      }
      total = lse_merge(total, Lse{mx, (double)top + (double)rest});
    }
    out[r] = lse_value(total);
  }
}

// out_i = exp(x_i − stat_i) through split(stat_i) (hi = 1) or through fp32(stat_i) alone (hi = 0).
void exp_minus_stat(const float* x, const double* stat, int64_t n, int use_split, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = use_split ? exp_minus(x[i], split(stat[i])) : expf(x[i] - (float)stat[i]);
  }
}

void softmax_grads(const float* z, const double* r, const float* wr, const double* c, const float* wc, int64_t n,
                   float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = softmax_grad(z[i], split(r[i]), wr[i], split(c[i]), wc[i]);
}

void target_grads(const double* x_y, const double* lse, const double* w, float eps, float z, int64_t v, int64_t n,
                  float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = target_grad(x_y[i], lse[i], w[i], eps, z, v);
}

// kind 0: softplus, 1: sigmoid, 2: sigmoid_grad with t = ±1 (t[i]) and w = 1.
void sigmoid_forms(const float* z, const float* t, int64_t n, int kind, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = kind == 0 ? softplus(z[i]) : kind == 1 ? sigmoid(z[i]) : sigmoid_grad(z[i], t[i], 1.f);
  }
}

void ordered_keys(const float* x, int64_t n, int32_t* keys, float* back) {
  for (int64_t i = 0; i < n; ++i) {
    keys[i] = ordered_key(x[i]);
    back[i] = key_value(keys[i]);
  }
}

// out_i = 1 if (x_i, col_i) ranks before (x_j, col_j) under top-k's order.
void ranks(const float* xa, const int64_t* ca, const float* xb, const int64_t* cb, int64_t n, int32_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = ranks_before(ordered_key(xa[i]), ca[i], ordered_key(xb[i]), cb[i]);
}

}  // extern "C"
