// The schemas of every native clipfast op, in one place (one TORCH_LIBRARY block per namespace is
// allowed per process). Kernels register themselves per dispatch key in csrc/cpu/<op>.cpp and
// csrc/cuda/<op>_binding.cpp. The user-facing ops live in the `clipfast` namespace (Python,
// clipfast/ops/); these `clipfast_C` ops are the device kernels they call.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(clipfast_C, m) {
  // contrastive (clipfast/ops/contrastive.py): S = scale * x @ y^T is never materialised.
  m.def("contrastive_lse(Tensor x, Tensor y, Tensor scale, bool with_cols) -> (Tensor row_lse, Tensor col_lse)");
  // grad_x = G @ y_values, grad_y = G^T @ x_values; the values default to y and x (the loss's own gradient),
  // other ones (same rows, any width E) contract a teacher's softmax with a student's features (distillation).
  m.def(
      "contrastive_grad(Tensor x, Tensor y, Tensor scale, Tensor row_lse, Tensor col_lse, float row_weight, "
      "float col_weight, Tensor? x_values=None, Tensor? y_values=None) -> (Tensor grad_x, Tensor grad_y)");
  m.def("siglip_softplus(Tensor x, Tensor y, Tensor scale, Tensor bias) -> Tensor row_sum");
  m.def(
      "siglip_grad(Tensor x, Tensor y, Tensor scale, Tensor bias) -> (Tensor grad_x, Tensor grad_y, "
      "Tensor grad_row_sum)");

  // schur_covariance (clipfast/ops/schur_covariance.py): the n x F feature matrices are never materialised.
  m.def(
      "schur_covariance_gram(Tensor image, Tensor text, str covariance, Tensor? omegas) -> (Tensor s_tt, "
      "Tensor s_tx, Tensor s_xx)");
  m.def(
      "schur_covariance_gram_backward(Tensor grad_tt, Tensor grad_tx, Tensor grad_xx, Tensor image, Tensor text, "
      "str covariance, Tensor? omegas) -> (Tensor grad_image, Tensor grad_text)");

  // token_medoids (clipfast/ops/token_medoids.py): indices only; the medoid tokens come from token_keep_gather.
  m.def(
      "token_medoids_index(Tensor x, int num_medoids, str metric, int max_iters, int split_size) -> "
      "(Tensor medoid_index, Tensor assignment)");

  // token_keep (clipfast/ops/token_keep.py): selection, then a row gather whose backward is a row scatter.
  m.def("token_keep_index(Tensor scores, int num_keep, int grid_width, int block) -> Tensor keep_index");
  m.def("token_keep_gather(Tensor tokens, Tensor keep_index, Tensor? fuse_weights, int num_prefix) -> Tensor kept");
  m.def(
      "token_keep_gather_backward(Tensor grad_kept, Tensor tokens, Tensor keep_index, Tensor? fuse_weights, "
      "int num_prefix) -> (Tensor grad_tokens, Tensor grad_weights)");

  // token_merge (clipfast/ops/token_merge.py): ToMe's matching (indices), then a size-weighted row reduction
  // whose backward is a row gather.
  m.def("token_merge_match(Tensor metric, int r, int num_prefix) -> Tensor dest");
  m.def("token_merge_reduce(Tensor x, Tensor dest, Tensor? size, int num_out) -> (Tensor merged, Tensor merged_size)");
  m.def(
      "token_merge_reduce_backward(Tensor grad_merged, Tensor dest, Tensor? size, Tensor merged_size) -> "
      "Tensor grad_x");
}

// `from clipfast import _C` loads this library (and so runs the registrations above) without pybind11.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "clipfast native kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
