// CPU implementations of the masked-LM softmax schemas (module.cpp): cross-entropy over given
// logits, and linear + cross-entropy over the kept rows only, both on the row kernel of
// cross_entropy_cpu.h (compiled per instruction set, cross_entropy_cpu_kernel.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_capability.h"
#include "cross_entropy_cpu.h"

namespace mmfast {
namespace {

// Targets as the row kernel takes them: int64, -1 for an ignored row; any other value outside
// [0, V) is an error (the Python API reports it first, naming the argument).
at::Tensor kernel_targets(const at::Tensor& target, int64_t ignore_index, int64_t vocab) {
  at::Tensor t = target.to(at::kLong).contiguous().clone();
  int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (p[i] == ignore_index) {
      p[i] = -1;
    } else {
      TORCH_CHECK(p[i] >= 0 && p[i] < vocab, "target[", i, "] = ", p[i], " is outside [0, ", vocab, ")");
    }
  }
  return t;
}

void check_logits(const at::Tensor& x, const at::Tensor& target) {
  TORCH_CHECK(x.dim() == 2, "logits must be 2-D (T, V), got ", x.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == x.size(0), "target must be (T,) with T = ", x.size(0));
}

// Rows of logits in another dtype are converted to fp32 this many at a time (a block of at most
// 8 MB): the fp32 path reads the tensor in place.
int64_t convert_rows(int64_t vocab) { return std::max<int64_t>(1, (int64_t(2) << 20) / std::max<int64_t>(vocab, 1)); }

// Runs the row kernel over all rows of x, in fp32 (converted block by block), with the gradient
// written to grad when row_weight is defined.
void run_rows(const at::Tensor& x, const at::Tensor& y, double eps, double z, float* loss, double* lse,
              const at::Tensor& row_weight, const at::Tensor& grad) {
  const int64_t rows = x.size(0), vocab = x.size(1);
  const bool with_grad = row_weight.defined();
  const float* w = with_grad ? row_weight.data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat && x.is_contiguous() && (!with_grad || grad.is_contiguous())) {
    MMFAST_CPU_DISPATCH(cross_entropy_rows, CrossEntropyRows{x.data_ptr<float>(), vocab, rows, vocab,
                        y.data_ptr<int64_t>(), float(eps), float(z), loss, lse, w,
                        with_grad ? grad.data_ptr<float>() : nullptr, vocab});
    return;
  }
  const int64_t step = convert_rows(vocab);
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t r1 = std::min(rows, r0 + step);
    at::Tensor block = x.slice(0, r0, r1).to(at::kFloat).contiguous();
    MMFAST_CPU_DISPATCH(cross_entropy_rows, CrossEntropyRows{block.data_ptr<float>(), vocab, r1 - r0, vocab,
                        y.data_ptr<int64_t>() + r0, float(eps), float(z), loss + r0, lse + r0,
                        with_grad ? w + r0 : nullptr, block.data_ptr<float>(), vocab});
    if (with_grad) grad.slice(0, r0, r1).copy_(block);
  }
}

std::tuple<at::Tensor, at::Tensor> cross_entropy(const at::Tensor& x, const at::Tensor& target,
                                                 int64_t ignore_index, double eps, double z) {
  check_logits(x, target);
  const at::Tensor y = kernel_targets(target, ignore_index, x.size(1));
  at::Tensor loss = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({x.size(0)}, x.options().dtype(at::kDouble));
  run_rows(x, y, eps, z, loss.data_ptr<float>(), lse.data_ptr<double>(), at::Tensor(), at::Tensor());
  return {loss, lse};
}

// Writes the gradient of Σ_t row_weight_t·loss_t into out, which may be x itself.
void cross_entropy_grad(const at::Tensor& x, const at::Tensor& target, const at::Tensor& row_weight,
                        int64_t ignore_index, double eps, double z, at::Tensor& out) {
  check_logits(x, target);
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(), "out must be like logits");
  TORCH_CHECK(row_weight.numel() == x.size(0), "row_weight must have T entries");
  const at::Tensor y = kernel_targets(target, ignore_index, x.size(1));
  std::vector<float> loss(x.size(0));
  std::vector<double> lse(x.size(0));
  run_rows(x, y, eps, z, loss.data(), lse.data(), row_weight.to(at::kFloat).contiguous(), out);
}

// The linear variant's inputs as the tile kernels take them (cross_entropy_cpu.h). y_all holds
// the kernel targets and must outlive the returned struct.
LinearCrossEntropy linear_args(const at::Tensor& h, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                               const at::Tensor& y_all, double eps, double z) {
  TORCH_CHECK(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1), "hidden (T, Dh) and weight (V, Dh) expected, got ",
              h.sizes(), " and ", w.sizes());
  TORCH_CHECK(y_all.size(0) == h.size(0), "target must be (T,) with T = ", h.size(0));
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == w.size(0)), "bias must be (V,)");
  return {h.to(at::kFloat).contiguous(), w.to(at::kFloat).contiguous(),
          bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor(), at::nonzero(y_all >= 0).squeeze(1),
          y_all.data_ptr<int64_t>(), float(eps), float(z)};
}

// → loss (T,) fp32 and lse (T,) fp64, 0 for ignored rows (2·T_kept·V·Dh FLOPs).
std::tuple<at::Tensor, at::Tensor> linear_cross_entropy(const at::Tensor& h, const at::Tensor& w,
                                                        const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                                        int64_t ignore_index, double eps, double z) {
  const at::Tensor y = kernel_targets(target, ignore_index, w.size(0));
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
  const at::Tensor y = kernel_targets(target, ignore_index, w.size(0));
  const LinearCrossEntropy args = linear_args(h, w, bias, y, eps, z);
  TORCH_CHECK(lse.numel() == h.size(0) && row_weight.numel() == h.size(0), "lse and row_weight must have T entries");
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
  if (kLinearBlockRows * w.size(0) * 4 > kFusedBlockBytes) {
    auto [loss, lse] = linear_cross_entropy(h, w, bias, target, ignore_index, eps, z);
    auto [dh, dw, db] = linear_cross_entropy_grad(h, w, bias, target, lse, row_weight, ignore_index, eps, z);
    return {loss, lse, dh, dw, db};
  }
  const at::Tensor y = kernel_targets(target, ignore_index, w.size(0));
  const LinearCrossEntropy args = linear_args(h, w, bias, y, eps, z);
  TORCH_CHECK(row_weight.numel() == h.size(0), "row_weight must have T entries");
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
