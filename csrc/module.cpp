// mmfast._C: importing it registers the op schemas below and their CPU kernels with the torch
// dispatcher. The Python package calls them as torch.ops.mmfast.<name>.
#include <Python.h>
#include <torch/library.h>

#include "cpu_capability.h"

TORCH_LIBRARY(mmfast, m) {
  // Contrastive primitives (csrc/contrastive_cpu.h). scale/bias arrive as plain numbers.
  m.def("cpu_contrastive_stats(Tensor a, Tensor b, float scale, float bias, Tensor? positives, bool sigmoid,"
        " bool with_cols) -> (Tensor row, Tensor col)");
  m.def("cpu_contrastive_grad(Tensor a, Tensor b, float scale, float bias, Tensor? positives, bool sigmoid, Tensor row,"
        " Tensor col, Tensor row_weight, Tensor col_weight, bool need_a, bool need_b)"
        " -> (Tensor grad_a, Tensor grad_b, Tensor grad_scale, Tensor grad_bias)");
  // Masked-LM softmax (csrc/cross_entropy_cpu.h): per-row loss (T,) fp32 and lse (T,) fp64; the gradient of
  // Σ_t row_weight_t·loss_t written to out (which may be x); linear + cross-entropy over kept rows
  // (forward, its gradient from the forward's lse, and both at once).
  m.def("cpu_cross_entropy(Tensor x, Tensor target, int ignore_index, float eps, float z) -> (Tensor loss, Tensor lse)");
  m.def("cpu_cross_entropy_grad(Tensor x, Tensor target, Tensor row_weight, int ignore_index, float eps, float z,"
        " Tensor(a!) out) -> ()");
  m.def("cpu_linear_cross_entropy(Tensor h, Tensor w, Tensor? bias, Tensor target, int ignore_index, float eps,"
        " float z) -> (Tensor loss, Tensor lse)");
  m.def("cpu_linear_cross_entropy_grad(Tensor h, Tensor w, Tensor? bias, Tensor target, Tensor lse, Tensor row_weight,"
        " int ignore_index, float eps, float z) -> (Tensor grad_h, Tensor grad_w, Tensor grad_bias)");
  m.def("cpu_linear_cross_entropy_fused(Tensor h, Tensor w, Tensor? bias, Tensor target, Tensor row_weight,"
        " int ignore_index, float eps, float z)"
        " -> (Tensor loss, Tensor lse, Tensor grad_h, Tensor grad_w, Tensor grad_bias)");
  // Similarity family (csrc/similarity_cpu.h).
  m.def("cpu_topk_similarity(Tensor a, Tensor b, int k, float scale, bool normalize) -> (Tensor values, Tensor indices)");
  m.def("cpu_similarity(Tensor a, Tensor b, float scale, bool normalize, ScalarType out_dtype) -> Tensor");
  m.def("cpu_capability() -> str", [] { return std::string(mmfast::capability_name(mmfast::cpu_capability())); });
}

static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mmfast's compiled torch ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module_def); }
