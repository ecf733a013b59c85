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

// Rows of kept targets per block of the linear variant: the block's logits are rows × V fp32.
// 256 rows give the dW update (a GEMM with inner size = rows) enough work per pass over dW
// (V × Dh, read and written once per block); the buffer is capped at 32 MB for large vocabularies.
int64_t lce_block_rows(int64_t vocab) {
  return std::clamp<int64_t>((int64_t(8) << 20) / std::max<int64_t>(vocab, 1), 16, 256);
}

// Linear + cross-entropy over the rows whose target is kept: X = H_kept·Wᵀ + bias, a block of rows
// at a time. Returns loss (fp32) and lse (fp64) per row (T,) (0 for ignored rows) and, when row_weight is given,
// the gradients of Σ_t row_weight_t·loss_t: dh (T, Dh) in h's dtype (0 for ignored rows), dw (V, Dh)
// accumulated in fp32 and returned in w's dtype, dbias (V,) (empty without bias). FLOPs:
// 2·T_kept·V·Dh without gradients, 6·T_kept·V·Dh with them (the gradients come from the forward's
// own logits, block by block).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy(
    const at::Tensor& h, const at::Tensor& w, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    const std::optional<at::Tensor>& row_weight, int64_t ignore_index, double eps, double z) {
  TORCH_CHECK(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1), "hidden (T, Dh) and weight (V, Dh) expected, got ",
              h.sizes(), " and ", w.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == h.size(0), "target must be (T,) with T = ", h.size(0));
  const int64_t vocab = w.size(0);
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == vocab), "bias must be (V,)");
  const at::Tensor y_all = kernel_targets(target, ignore_index, vocab);
  const at::Tensor kept = at::nonzero(y_all >= 0).squeeze(1);
  const int64_t n_kept = kept.size(0);
  const auto f32 = h.options().dtype(at::kFloat);

  const at::Tensor hk = h.index_select(0, kept).to(at::kFloat).contiguous();
  const at::Tensor yk = y_all.index_select(0, kept).contiguous();
  const at::Tensor wf = w.to(at::kFloat).contiguous();
  const at::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const bool with_grad = row_weight.has_value();
  const at::Tensor wk = with_grad ? row_weight->to(at::kFloat).index_select(0, kept).contiguous() : at::Tensor();

  at::Tensor loss_k = at::empty({n_kept}, f32), lse_k = at::empty({n_kept}, f32.dtype(at::kDouble));
  at::Tensor dh_k = with_grad ? at::empty({n_kept, h.size(1)}, f32) : at::Tensor();
  at::Tensor dw = with_grad ? at::zeros({vocab, w.size(1)}, f32) : at::Tensor();
  at::Tensor db = with_grad && bf.defined() ? at::zeros({vocab}, f32) : at::Tensor();

  const int64_t block = lce_block_rows(vocab);
  at::Tensor buffer = at::empty({std::min(block, n_kept), vocab}, f32);
  for (int64_t r0 = 0; r0 < n_kept; r0 += block) {
    const int64_t r1 = std::min(n_kept, r0 + block);
    at::Tensor x = buffer.slice(0, 0, r1 - r0);
    const at::Tensor hb = hk.slice(0, r0, r1);
    if (bf.defined()) {
      at::addmm_out(x, bf, hb, wf.t());
    } else {
      at::mm_out(x, hb, wf.t());
    }
    MMFAST_CPU_DISPATCH(cross_entropy_rows, CrossEntropyRows{x.data_ptr<float>(), vocab, r1 - r0, vocab,
                        yk.data_ptr<int64_t>() + r0, float(eps), float(z), loss_k.data_ptr<float>() + r0,
                        lse_k.data_ptr<double>() + r0, with_grad ? wk.data_ptr<float>() + r0 : nullptr,
                        x.data_ptr<float>(), vocab});
    if (!with_grad) continue;
    at::Tensor dh_b = dh_k.slice(0, r0, r1);
    at::mm_out(dh_b, x, wf);
    dw.addmm_(x.t(), hb);
    if (db.defined()) db.add_(x.sum(0));
  }

  at::Tensor loss = at::zeros({h.size(0)}, f32).index_copy_(0, kept, loss_k);
  at::Tensor lse = at::zeros({h.size(0)}, lse_k.options()).index_copy_(0, kept, lse_k);
  // Distinct empty tensors: a custom op's outputs may not alias each other.
  const auto none = [&] { return at::empty({0}, h.options()); };
  if (!with_grad) return {loss, lse, none(), none(), none()};
  at::Tensor dh = at::zeros(h.sizes(), h.options()).index_copy_(0, kept, dh_k.to(h.scalar_type()));
  return {loss, lse, dh, dw.to(w.scalar_type()), db.defined() ? db.to(bias->scalar_type()) : none()};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("cpu_cross_entropy", &cross_entropy);
  m.impl("cpu_cross_entropy_grad", &cross_entropy_grad);
  m.impl("cpu_linear_cross_entropy", &linear_cross_entropy);
}

}  // namespace mmfast
