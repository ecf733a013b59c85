// Argument checks of the registered CPU ops. Users can call torch.ops.mmfast.cpu_* directly, past the
// Python API's checks, so every schema implementation validates what its kernels rely on. Each check
// names the argument; in Python a failed TORCH_CHECK_TYPE raises TypeError, TORCH_CHECK_VALUE ValueError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace mmfast {

inline bool is_float_dtype(const at::Tensor& t) {
  const auto d = t.scalar_type();
  return d == at::kFloat || d == at::kBFloat16 || d == at::kHalf;
}

// A (rows, cols) float32/bfloat16/float16 matrix.
inline void check_matrix(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(t), name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

// Two matrices that share their second dimension (D or Dh) and dtype.
inline void check_pair(const char* a_name, const at::Tensor& a, const char* b_name, const at::Tensor& b) {
  check_matrix(a_name, a);
  check_matrix(b_name, b);
  TORCH_CHECK_VALUE(a.size(1) == b.size(1), a_name, " and ", b_name, " must share their last dimension, got ",
                    a.sizes(), " and ", b.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), b_name, " must have the dtype of ", a_name, " (",
                   a.scalar_type(), "), got ", b.scalar_type());
}

// A 1-D tensor of n entries of a floating dtype (weights, statistics).
inline void check_vector(const char* name, const at::Tensor& t, int64_t n) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must be 1-D with ", n, " entries, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.scalar_type());
}

// A 1-D int64 (or int32) tensor of n indices.
inline void check_indices(const char* name, const at::Tensor& t, int64_t n) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must be 1-D with ", n, " entries, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name,
                   " must hold indices as int64 (or int32), got ", t.scalar_type());
}

}  // namespace mmfast
