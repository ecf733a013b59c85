// CPU implementations of the masked-LM softmax schemas (module.cpp): cross-entropy over given
// logits, and linear + cross-entropy over the kept rows only, both on the row kernel of
// cross_entropy_cpu.h (compiled per instruction set, cross_entropy_cpu_kernel.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu_capability.h"
#include "cross_entropy_cpu.h"

namespace mmfast {
namespace {

// Targets as the row kernel takes them: int64, -1 for an ignored row; any other value outside
// [0, V) is an error (the Python API reports it first, naming the argument).
at::Tensor kernel_targets(const at::Tensor& target, int64_t rows, int64_t ignore_index, int64_t vocab) {
  check_indices("target", target, rows);
  at::Tensor t = target.to(at::kLong).contiguous().clone();
  int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (p[i] == ignore_index) {
      p[i] = -1;
    } else {
      TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < vocab, "target[", i, "] = ", p[i], " is outside [0, ", vocab,
                        ") and is not ignore_index (", ignore_index, ")");
    }
  }
  return t;
}

void check_logits(const at::Tensor& x) {
  check_matrix("x", x);
  TORCH_CHECK_VALUE(x.size(1) > 0, "x must have at least one class (V > 0), got shape ", x.sizes());
}

// Rows of logits in another dtype or layout are converted to fp32 this many at a time (a block of
// at most 8 MB).
int64_t convert_rows(int64_t vocab) { return std::max<int64_t>(1, (int64_t(2) << 20) / std::max<int64_t>(vocab, 1)); }

// Runs the row kernel over all rows of x, in fp32, with the gradient written to grad (contiguous,
// x's dtype) when row_weight is defined. fp32 rows of unit stride are read in place whatever the
// row stride (a padded vocabulary sliced to size, say). Other dtypes and layouts are converted
// block by block into a buffer of the op's own, which the gradient then overwrites: never a view
// of x (a block of a strided x can be contiguous, and x is the caller's).
void run_rows(const at::Tensor& x, const at::Tensor& y, double eps, double z, float* loss, double* lse,
              const at::Tensor& row_weight, const at::Tensor& grad) {
  const int64_t rows = x.size(0), vocab = x.size(1);
  const bool with_grad = row_weight.defined();
  const float* w = with_grad ? row_weight.data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat && x.stride(1) == 1) {
    MMFAST_CPU_DISPATCH(cross_entropy_rows, CrossEntropyRows{x.data_ptr<float>(), x.stride(0), rows, vocab,
                        y.data_ptr<int64_t>(), float(eps), float(z), loss, lse, w,
                        with_grad ? grad.data_ptr<float>() : nullptr, vocab});
    return;
  }
  const int64_t step = convert_rows(vocab);
  at::Tensor buffer = at::empty({std::min(rows, step), vocab}, x.options().dtype(at::kFloat));
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t r1 = std::min(rows, r0 + step);
    at::Tensor block = buffer.slice(0, 0, r1 - r0);
    block.copy_(x.slice(0, r0, r1));
    MMFAST_CPU_DISPATCH(cross_entropy_rows, CrossEntropyRows{block.data_ptr<float>(), vocab, r1 - r0, vocab,
                        y.data_ptr<int64_t>() + r0, float(eps), float(z), loss + r0, lse + r0,
                        with_grad ? w + r0 : nullptr, block.data_ptr<float>(), vocab});
    if (with_grad) grad.slice(0, r0, r1).copy_(block);
  }
}

std::tuple<at::Tensor, at::Tensor> cross_entropy(const at::Tensor& x, const at::Tensor& target,
                                                 int64_t ignore_index, double eps, double z) {
  check_logits(x);
  const at::Tensor y = kernel_targets(target, x.size(0), ignore_index, x.size(1));
  at::Tensor loss = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({x.size(0)}, x.options().dtype(at::kDouble));
  run_rows(x, y, eps, z, loss.data_ptr<float>(), lse.data_ptr<double>(), at::Tensor(), at::Tensor());
  return {loss, lse};
}

// Writes the gradient of Σ_t row_weight_t·loss_t into out (contiguous), which may be x itself.
void cross_entropy_grad(const at::Tensor& x, const at::Tensor& target, const at::Tensor& row_weight,
                        int64_t ignore_index, double eps, double z, at::Tensor& out) {
  check_logits(x);
  TORCH_CHECK_VALUE(out.sizes() == x.sizes() && out.is_contiguous(), "out must be a contiguous tensor of x's shape ",
                    x.sizes(), ", got shape ", out.sizes(), out.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK_TYPE(out.scalar_type() == x.scalar_type(), "out must have x's dtype (", x.scalar_type(), "), got ",
                   out.scalar_type());
  check_vector("row_weight", row_weight, x.size(0));
  const at::Tensor y = kernel_targets(target, x.size(0), ignore_index, x.size(1));
  std::vector<float> loss(x.size(0));
  std::vector<double> lse(x.size(0));
  run_rows(x, y, eps, z, loss.data(), lse.data(), row_weight.to(at::kFloat).contiguous(), out);
}

// The linear variant's hidden states h (T, Dh) and weight w (V, Dh) checked, and its kernel targets.
at::Tensor linear_targets(const at::Tensor& h, const at::Tensor& w, const at::Tensor& target, int64_t ignore_index) {
  check_pair("h", h, "w", w);
  TORCH_CHECK_VALUE(w.size(0) > 0, "w must have at least one row (V > 0), got shape ", w.sizes());
  return kernel_targets(target, h.size(0), ignore_index, w.size(0));
}

// The linear variant's inputs as the tile kernels take them (cross_entropy_cpu.h). y_all holds
// the kernel targets and must outlive the returned struct.
LinearCrossEntropy linear_args(const at::Tensor& h, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                               const at::Tensor& y_all, double eps, double z) {
  if (bias.has_value()) {
    check_vector("bias", *bias, w.size(0));
    TORCH_CHECK_TYPE(bias->scalar_type() == w.scalar_type(), "bias must have w's dtype (", w.scalar_type(), "), got ",
                     bias->scalar_type());
  }
  return {h.to(at::kFloat).contiguous(), w.to(at::kFloat).contiguous(),
          bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor(), at::nonzero(y_all >= 0).squeeze(1),
          y_all.data_ptr<int64_t>(), float(eps), float(z)};
}

// → loss (T,) fp32 and lse (T,) fp64, 0 for ignored rows (2·T_kept·V·Dh FLOPs).
std::tuple<at::Tensor, at::Tensor> linear_cross_entropy(const at::Tensor& h, const at::Tensor& w,
                                                        const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                                        int64_t ignore_index, double eps, double z) {
  const at::Tensor y = linear_targets(h, w, target, ignore_index);
  const LinearCrossEntropy args = linear_args(h, w, bias, y, eps, z);
  at::Tensor loss = at::zeros({h.size(0)}, h.options().dtype(at::kFloat));
  at::Tensor lse = at::zeros({h.size(0)}, h.options().dtype(at::kDouble));
  MMFAST_CPU_DISPATCH(linear_cross_entropy_forward, args, loss.data_ptr<float>(), lse.data_ptr<double>());
  return {loss, lse};
}

// → dh (T, Dh), dw (V, Dh), dbias (V,) (empty without bias), in the inputs' dtypes: the gradients of
// Σ_t row_weight_t·loss_t, from the forward's lse (6·T_kept·V·Dh FLOPs). dw is accumulated in fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_grad(
    const at::Tensor& h, const at::Tensor& w, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    const at::Tensor& lse, const at::Tensor& row_weight, int64_t ignore_index, double eps, double z) {
  const at::Tensor y = linear_targets(h, w, target, ignore_index);
  const LinearCrossEntropy args = linear_args(h, w, bias, y, eps, z);
  check_vector("lse", lse, h.size(0));
  check_vector("row_weight", row_weight, h.size(0));
  const auto f32 = h.options().dtype(at::kFloat);
  at::Tensor dh = at::zeros(h.sizes(), f32), dw = at::zeros(w.sizes(), f32);
  at::Tensor db = bias.has_value() ? at::zeros({w.size(0)}, f32) : at::Tensor();
  const at::Tensor lse64 = lse.to(at::kDouble).contiguous(), weight = row_weight.to(at::kFloat).contiguous();
  MMFAST_CPU_DISPATCH(linear_cross_entropy_backward, args, lse64.data_ptr<double>(), weight.data_ptr<float>(), dh, dw, db);
  return {dh.to(h.scalar_type()), dw.to(w.scalar_type()),
          db.defined() ? db.to(bias->scalar_type()) : at::empty({0}, h.options())};
}

// The fused path holds a block of kept rows × the whole vocabulary in fp32: up to 32 MB (V ≤ 32768,
// BERT's 30522 included). Beyond, the forward and backward walks run one after the other (8·T_kept·V·Dh
// FLOPs instead of 6).
constexpr int64_t kFusedBlockBytes = int64_t(32) << 20;

// Loss and the gradients of Σ_t row_weight_t·loss_t at once → (loss (T,), lse (T,), dh, dw, dbias).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fused(
    const at::Tensor& h, const at::Tensor& w, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    const at::Tensor& row_weight, int64_t ignore_index, double eps, double z) {
  check_pair("h", h, "w", w);
  if (kLinearBlockRows * w.size(0) * 4 > kFusedBlockBytes) {
    auto [loss, lse] = linear_cross_entropy(h, w, bias, target, ignore_index, eps, z);
    auto [dh, dw, db] = linear_cross_entropy_grad(h, w, bias, target, lse, row_weight, ignore_index, eps, z);
    return {loss, lse, dh, dw, db};
  }
  const at::Tensor y = linear_targets(h, w, target, ignore_index);
  const LinearCrossEntropy args = linear_args(h, w, bias, y, eps, z);
  check_vector("row_weight", row_weight, h.size(0));
  const auto f32 = h.options().dtype(at::kFloat);
  const at::Tensor weight = row_weight.to(at::kFloat).contiguous();
  at::Tensor loss = at::zeros({h.size(0)}, f32), lse = at::zeros({h.size(0)}, f32.dtype(at::kDouble));
  at::Tensor dh = at::zeros(h.sizes(), f32), dw = at::zeros(w.sizes(), f32);
  at::Tensor db = bias.has_value() ? at::zeros({w.size(0)}, f32) : at::Tensor();
  MMFAST_CPU_DISPATCH(linear_cross_entropy_fused, args, weight.data_ptr<float>(), loss.data_ptr<float>(),
                      lse.data_ptr<double>(), dh, dw, db);
  return {loss, lse, dh.to(h.scalar_type()), dw.to(w.scalar_type()),
          db.defined() ? db.to(bias->scalar_type()) : at::empty({0}, h.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("cpu_cross_entropy", &cross_entropy);
  m.impl("cpu_cross_entropy_grad", &cross_entropy_grad);
  m.impl("cpu_linear_cross_entropy", &linear_cross_entropy);
  m.impl("cpu_linear_cross_entropy_grad", &linear_cross_entropy_grad);
  m.impl("cpu_linear_cross_entropy_fused", &linear_cross_entropy_fused);
}

}  // namespace mmfast
