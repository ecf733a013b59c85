// CPU implementations of the similarity family's schemas (module.cpp): argument checks, the
// O((N + M)·D) preparation (fp32, scale and norms folded into the small operands) and the
// per-instruction-set kernels (similarity_cpu_kernel.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu_capability.h"
#include "similarity_cpu.h"

namespace mmfast {
namespace {

// F.normalize's eps: a row of norm below it is divided by eps (a zero row stays zero).
constexpr double kNormEps = 1e-12;

// 1 / max(‖x_i‖, eps) per row, fp32 (N,).
at::Tensor inverse_norms(const at::Tensor& x32) {
  return at::linalg_vector_norm(x32, 2, {1}).clamp_min(kNormEps).reciprocal();
}

// A' = scale · n(A) as fp32 (N, D) contiguous: one O(N·D) pass, so the tile epilogue never scales.
at::Tensor scaled_rows(const at::Tensor& a_in, double scale, bool normalize) {
  const at::Tensor a = a_in.to(at::kFloat).contiguous();
  if (!normalize && scale == 1.0) return a;
  if (!normalize) return a * scale;
  return a * (inverse_norms(a) * scale).unsqueeze(1);
}

std::tuple<at::Tensor, at::Tensor> topk_similarity(const at::Tensor& a_in, const at::Tensor& b_in, int64_t k,
                                                   double scale, bool normalize) {
  check_pair("a", a_in, "b", b_in);
  TORCH_CHECK_VALUE(k >= 1 && k <= b_in.size(0), "k must be in [1, M=", b_in.size(0), "], got ", k);
  const at::Tensor a = scaled_rows(a_in, scale, normalize);
  const at::Tensor b = b_in.to(at::kFloat).contiguous();
  // The inverse norms of B scale S's columns in the scan (an M×D normalised copy of B would be
  // the largest allocation of the op).
  const at::Tensor col_scale = normalize ? inverse_norms(b).contiguous() : at::Tensor();
  at::Tensor values = at::empty({a.size(0), k}, a.options());
  at::Tensor indices = at::empty({a.size(0), k}, a.options().dtype(at::kLong));
  MMFAST_CPU_DISPATCH(topk_similarity, a, b, normalize ? col_scale.data_ptr<float>() : nullptr, k, values, indices);
  return {values, indices};
}

at::Tensor similarity(const at::Tensor& a_in, const at::Tensor& b_in, double scale, bool normalize,
                      at::ScalarType out_dtype) {
  check_pair("a", a_in, "b", b_in);
  TORCH_CHECK_TYPE(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
  const at::Tensor a = scaled_rows(a_in, scale, normalize);
  const at::Tensor b = scaled_rows(b_in, 1.0, normalize);
  at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options().dtype(out_dtype));
  MMFAST_CPU_DISPATCH(similarity_rows, a, b, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("cpu_topk_similarity", &topk_similarity);
  m.impl("cpu_similarity", &similarity);
}

}  // namespace mmfast
