// CPU implementations of the contrastive primitives' schemas (module.cpp): argument checks, fp32
// contiguous views, and the per-instruction-set tile kernels (contrastive_cpu_kernel.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "contrastive_cpu.h"
#include "cpu_capability.h"

namespace mmfast {
namespace {

at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

void check_features(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "a and b must be 2-D, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.size(1) == b.size(1), "a and b must share D, got ", a.size(1), " and ", b.size(1));
}

// positives: the sigmoid loss's positive column per row, (N,) int64 (see contrastive_cpu.h).
at::Tensor positives_arg(const std::optional<at::Tensor>& positives, const at::Tensor& a, bool sigmoid) {
  if (!sigmoid || !positives.has_value()) return at::Tensor();
  TORCH_CHECK(positives->numel() == a.size(0) && positives->scalar_type() == at::kLong,
              "positives must be an int64 tensor with one entry per row of a");
  return positives->contiguous();
}

std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& a_in, const at::Tensor& b_in, double scale,
                                         double bias, const std::optional<at::Tensor>& positives, bool sigmoid,
                                         bool with_cols) {
  check_features(a_in, b_in);
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
  check_features(a_in, b_in);
  const at::Tensor a = as_f32(a_in), b = as_f32(b_in);
  const bool with_cols = !sigmoid && col.numel() > 0;
  TORCH_CHECK(row_weight.numel() == a.size(0), "row_weight must have N entries");
  TORCH_CHECK(sigmoid || row.numel() == a.size(0), "row must have N entries");
  TORCH_CHECK(!with_cols || (col.numel() == b.size(0) && col_weight.numel() == b.size(0)),
              "col and col_weight must have M entries");
  at::Tensor da = need_a ? at::zeros_like(a) : at::Tensor();
  at::Tensor db = need_b ? at::zeros_like(b) : at::Tensor();
  const at::Tensor row_f = sigmoid ? at::Tensor() : row.to(at::kDouble).contiguous();
  const auto [scale_grad, bias_grad] = MMFAST_CPU_DISPATCH(
      contrastive_grad, a, b, float(scale), float(bias), sigmoid, positives_arg(positives, a, sigmoid), row_f,
      with_cols ? col.to(at::kDouble).contiguous() : at::Tensor(), as_f32(row_weight),
      with_cols ? as_f32(col_weight) : at::Tensor(), da, db);
  const at::Tensor grad_scale = at::scalar_tensor(scale_grad, a.options());
  const at::Tensor grad_bias = at::scalar_tensor(bias_grad, a.options());
  const at::Tensor none = at::empty({0}, a.options());
  return {need_a ? da.to(a_in.scalar_type()) : none, need_b ? db.to(b_in.scalar_type()) : none,
          grad_scale, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("cpu_contrastive_stats", &stats);
  m.impl("cpu_contrastive_grad", &grad);
}

}  // namespace mmfast
