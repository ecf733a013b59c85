// CPU implementations of the contrastive primitives' schemas (module.cpp): argument checks, fp32
// contiguous views, and the per-instruction-set tile kernels (contrastive_cpu_kernel.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "contrastive_cpu.h"
#include "cpu_capability.h"

namespace mmfast {
namespace {

at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// positives: the sigmoid loss's positive column per row, (N,) int64 (see contrastive_cpu.h).
at::Tensor positives_arg(const std::optional<at::Tensor>& positives, const at::Tensor& a, bool sigmoid) {
  if (!sigmoid || !positives.has_value()) return at::Tensor();
  check_indices("positives", *positives, a.size(0));
  return positives->to(at::kLong).contiguous();
}

std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& a_in, const at::Tensor& b_in, double scale,
                                         double bias, const std::optional<at::Tensor>& positives, bool sigmoid,
                                         bool with_cols) {
  check_pair("a", a_in, "b", b_in);
  const at::Tensor a = as_f32(a_in), b = as_f32(b_in);
  const auto f64 = a.options().dtype(at::kDouble);
  at::Tensor row = at::empty({a.size(0)}, f64);
  at::Tensor col = at::empty({with_cols && !sigmoid ? b.size(0) : 0}, f64);
  at::Tensor col_arg = col.numel() > 0 ? col : at::Tensor();
  MMFAST_CPU_DISPATCH(contrastive_stats, a, b, float(scale), float(bias), sigmoid, positives_arg(positives, a, sigmoid),
                      row, col_arg);
  return {row, col};
}

// An empty col or col_weight means "no column term".
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grad(
    const at::Tensor& a_in, const at::Tensor& b_in, double scale, double bias,
    const std::optional<at::Tensor>& positives, bool sigmoid, const at::Tensor& row, const at::Tensor& col, const at::Tensor& row_weight,
    const at::Tensor& col_weight, bool need_a, bool need_b) {
  check_pair("a", a_in, "b", b_in);
  const at::Tensor a = as_f32(a_in), b = as_f32(b_in);
  const bool with_cols = !sigmoid && col.numel() > 0;
  check_vector("row_weight", row_weight, a.size(0));
  if (!sigmoid) check_vector("row", row, a.size(0));
  if (with_cols) {
    check_vector("col", col, b.size(0));
    check_vector("col_weight", col_weight, b.size(0));
  }
  at::Tensor da = need_a ? at::zeros_like(a) : at::Tensor();
  at::Tensor db = need_b ? at::zeros_like(b) : at::Tensor();
  const at::Tensor row_f = sigmoid ? at::Tensor() : row.to(at::kDouble).contiguous();
  const auto [scale_grad, bias_grad] = MMFAST_CPU_DISPATCH(
      contrastive_grad, a, b, float(scale), float(bias), sigmoid, positives_arg(positives, a, sigmoid), row_f,
      with_cols ? col.to(at::kDouble).contiguous() : at::Tensor(), as_f32(row_weight),
      with_cols ? as_f32(col_weight) : at::Tensor(), da, db);
  const at::Tensor grad_scale = at::scalar_tensor(scale_grad, a.options());
  const at::Tensor grad_bias = at::scalar_tensor(bias_grad, a.options());
  // Two distinct empty tensors when a gradient is not wanted: outputs of an op may not alias each other.
  return {need_a ? da.to(a_in.scalar_type()) : at::empty({0}, a_in.options()),
          need_b ? db.to(b_in.scalar_type()) : at::empty({0}, b_in.options()), grad_scale, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("cpu_contrastive_stats", &stats);
  m.impl("cpu_contrastive_grad", &grad);
}

}  // namespace mmfast
