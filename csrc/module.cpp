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
  // Similarity family (csrc/similarity_cpu.h).
  m.def("cpu_topk_similarity(Tensor a, Tensor b, int k, float scale, bool normalize) -> (Tensor values, Tensor indices)");
  m.def("cpu_similarity(Tensor a, Tensor b, float scale, bool normalize, ScalarType out_dtype) -> Tensor");
  m.def("cpu_capability() -> str", [] { return std::string(mmfast::capability_name(mmfast::cpu_capability())); });
}

static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mmfast's compiled torch ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module_def); }
