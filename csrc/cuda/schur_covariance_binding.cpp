// CUDA implementations of the clipfast_C::schur_covariance_gram ops (schemas in csrc/clipfast.cpp), on top of the
// C ABI of csrc/cuda/schur_covariance.cu (csrc/include/clipfast/schur_covariance_cuda.h).
//
// Same algorithm as the CPU kernel (csrc/cpu/schur_covariance.cpp): the n rows are processed in tiles
// of kTileRows; each tile's features go into fp32 scratch buffers allocated once per call through ATen
// (the caching allocator makes this cheap), then feed rank-k updates of the three (F, F) sums (forward)
// or the dphi products and the chain rule through phi (backward). Memory: O(F^2 + kTileRows * F).
// Everything runs in fp32 on the current stream; nothing synchronises with the host.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>

#include "clipfast/checks.h"
#include "clipfast/cuda_binding.h"
#include "clipfast/schur_covariance_cuda.h"

namespace clipfast {
namespace {

constexpr int64_t kTileRows = 1024;
constexpr const char* kOp = "schur_covariance_gram";

int parse_covariance(c10::string_view name) {
  if (name == "column_cosine") return CLIPFAST_SCHUR_COVARIANCE_COLUMN_COSINE;
  if (name == "row_cosine") return CLIPFAST_SCHUR_COVARIANCE_ROW_COSINE;
  if (name == "rff") return CLIPFAST_SCHUR_COVARIANCE_RFF;
  TORCH_CHECK(false, kOp, ": covariance must be 'column_cosine', 'row_cosine' or 'rff', got '", std::string(name),
              "'");
}

struct Problem {
  at::Tensor image, text;  // input dtype, contiguous
  at::Tensor omegas;       // fp32, contiguous, on the inputs' device; RFF only
  int covariance;          // CLIPFAST_SCHUR_COVARIANCE_*
  int dtype;               // CLIPFAST_F32/F16/BF16
  int64_t n, dim, m, features;
};

Problem make_problem(const at::Tensor& image, const at::Tensor& text, c10::string_view covariance,
                     const std::optional<at::Tensor>& omegas, const char* op) {
  check_feature_pair(image, text, kOp);
  TORCH_CHECK(image.size(0) == text.size(0), kOp, ": image has ", image.size(0), " rows but text has ", text.size(0),
              " (pairs are rows)");
  assert_on_cuda(image, op, "image");
  Problem p;
  p.covariance = parse_covariance(covariance);
  p.dtype = cuda_dtype_code(image, op, "image");
  p.image = image.detach().contiguous();
  p.text = text.detach().contiguous();
  p.n = image.size(0);
  p.dim = image.size(1);
  p.m = 0;
  p.features = p.dim;
  if (p.covariance == CLIPFAST_SCHUR_COVARIANCE_RFF) {
    TORCH_CHECK(omegas.has_value() && omegas->dim() == 2 && omegas->size(0) == image.size(1), kOp,
                ": 'rff' needs omegas of shape (", image.size(1), ", m)");
    TORCH_CHECK(omegas->size(1) > 0, kOp, ": omegas needs at least one frequency");
    assert_same_device(*omegas, image, op, "omegas");
    p.omegas = omegas->detach().to(at::kFloat).contiguous();
    p.m = omegas->size(1);
    p.features = 2 * p.m;
  }
  return p;
}

at::TensorOptions fp32_like(const at::Tensor& x) { return x.options().dtype(at::kFloat); }

const void* row_base(const at::Tensor& t) { return t.const_data_ptr(); }

float* float_ptr(at::Tensor& t) { return t.mutable_data_ptr<float>(); }

// phi of the rows [r0, r0 + rows) of z into the tile buffer phi (>= rows * F floats).
void tile_features(const Problem& p, const at::Tensor& z, int64_t r0, int64_t rows, at::Tensor& phi, void* stream,
                   const char* op) {
  const float* omegas = p.covariance == CLIPFAST_SCHUR_COVARIANCE_RFF ? p.omegas.const_data_ptr<float>() : nullptr;
  check_launch(clipfast_schur_covariance_features_cuda(row_base(z), p.dtype, r0, rows, p.dim, p.covariance, omegas,
                                                       p.m, float_ptr(phi), stream),
               op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> schur_covariance_gram_cuda(const at::Tensor& image,
                                                                          const at::Tensor& text,
                                                                          c10::string_view covariance,
                                                                          const std::optional<at::Tensor>& omegas) {
  constexpr const char* op = kOp;
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Problem p = make_problem(image, text, covariance, omegas, op);  // checks first: image is a CUDA tensor
  const c10::cuda::CUDAGuard device_guard(image.device());
  const int64_t f = p.features;
  at::Tensor s_tt = at::zeros({f, f}, fp32_like(p.image));
  at::Tensor s_tx = at::zeros_like(s_tt), s_xx = at::zeros_like(s_tt);
  if (p.n == 0 || f == 0) return {s_tt, s_tx, s_xx};  // empty sums
  const int64_t tile = std::min(kTileRows, p.n);
  at::Tensor phi_x = at::empty({tile, f}, fp32_like(p.image));
  at::Tensor phi_t = at::empty({tile, f}, fp32_like(p.image));
  void* stream = current_stream();
  for (int64_t r0 = 0; r0 < p.n; r0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, p.n - r0);
    tile_features(p, p.image, r0, rows, phi_x, stream, op);
    tile_features(p, p.text, r0, rows, phi_t, stream, op);
    // S_ab += phi_a^T phi_b for (a, b) = (t, t), (t, x), (x, x): the cross block has text features on its rows.
    check_launch(clipfast_schur_covariance_gram_accumulate_cuda(float_ptr(phi_t), float_ptr(phi_t), rows, f,
                                                                float_ptr(s_tt), stream),
                 op);
    check_launch(clipfast_schur_covariance_gram_accumulate_cuda(float_ptr(phi_t), float_ptr(phi_x), rows, f,
                                                                float_ptr(s_tx), stream),
                 op);
    check_launch(clipfast_schur_covariance_gram_accumulate_cuda(float_ptr(phi_x), float_ptr(phi_x), rows, f,
                                                                float_ptr(s_xx), stream),
                 op);
  }
  return {s_tt, s_tx, s_xx};
}

// dz for one tile from its features phi and dphi (both (rows, F) tile buffers), written to dz (rows, dim),
// a slice of the fp32 gradient. For column_cosine (phi = z) dphi already is dz (the caller writes it there).
void tile_input_grad(const Problem& p, const at::Tensor& z, int64_t r0, int64_t rows, at::Tensor& phi,
                     at::Tensor& dphi, at::Tensor& du, float* dz, void* stream, const char* op) {
  if (p.covariance == CLIPFAST_SCHUR_COVARIANCE_ROW_COSINE) {
    check_launch(clipfast_schur_covariance_row_cosine_grad_cuda(row_base(z), p.dtype, r0, rows, p.dim, float_ptr(phi),
                                                                float_ptr(dphi), dz, stream),
                 op);
  } else if (p.covariance == CLIPFAST_SCHUR_COVARIANCE_RFF) {
    // du = (cos u * dphi_sin - sin u * dphi_cos) / sqrt(m), then dz = du W^T (W: (dim, m)).
    check_launch(clipfast_schur_covariance_rff_du_cuda(float_ptr(phi), float_ptr(dphi), rows, p.m, float_ptr(du),
                                                       stream),
                 op);
    check_launch(clipfast_schur_covariance_matmul_cuda(float_ptr(du), p.omegas.const_data_ptr<float>(),
                                                       /*transpose_b=*/1, rows, p.m, p.dim, /*accumulate=*/0, dz,
                                                       stream),
                 op);
  }
}

std::tuple<at::Tensor, at::Tensor> schur_covariance_gram_backward_cuda(
    const at::Tensor& grad_tt, const at::Tensor& grad_tx, const at::Tensor& grad_xx, const at::Tensor& image,
    const at::Tensor& text, c10::string_view covariance, const std::optional<at::Tensor>& omegas) {
  constexpr const char* op = "schur_covariance_gram_backward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Problem p = make_problem(image, text, covariance, omegas, op);  // checks first: image is a CUDA tensor
  const c10::cuda::CUDAGuard device_guard(image.device());
  const int64_t f = p.features;
  for (const at::Tensor* g : {&grad_tt, &grad_tx, &grad_xx}) {
    TORCH_CHECK(g->dim() == 2 && g->size(0) == f && g->size(1) == f, op, ": gradients must be (", f, ", ", f,
                "), got ", g->sizes());
    assert_same_device(*g, image, op, "each gradient");
  }
  at::Tensor d_image = at::empty({p.n, p.dim}, fp32_like(p.image));
  at::Tensor d_text = at::empty({p.n, p.dim}, fp32_like(p.image));
  if (p.n > 0 && p.dim > 0) {
    if (f == 0) {  // no feature (cannot happen for RFF, whose m > 0): nothing flows back
      d_image.zero_();
      d_text.zero_();
    } else {
      const at::Tensor g_tt = grad_tt.detach().to(at::kFloat), g_xx = grad_xx.detach().to(at::kFloat);
      const at::Tensor sym_tt = (g_tt + g_tt.t()).contiguous(), sym_xx = (g_xx + g_xx.t()).contiguous();
      const at::Tensor g_tx = grad_tx.detach().to(at::kFloat).contiguous();
      const float* sym_tt_ptr = sym_tt.const_data_ptr<float>();
      const float* sym_xx_ptr = sym_xx.const_data_ptr<float>();
      const float* g_tx_ptr = g_tx.const_data_ptr<float>();
      const bool raw_rows = p.covariance == CLIPFAST_SCHUR_COVARIANCE_COLUMN_COSINE;
      const int64_t tile = std::min(kTileRows, p.n);
      at::Tensor phi_x = at::empty({tile, f}, fp32_like(p.image));
      at::Tensor phi_t = at::empty({tile, f}, fp32_like(p.image));
      // For the raw rows (phi = z) dphi is dz: the products are written straight into the gradients.
      at::Tensor dphi_x = raw_rows ? at::Tensor() : at::empty({tile, f}, fp32_like(p.image));
      at::Tensor dphi_t = raw_rows ? at::Tensor() : at::empty({tile, f}, fp32_like(p.image));
      at::Tensor du =
          p.covariance == CLIPFAST_SCHUR_COVARIANCE_RFF ? at::empty({tile, p.m}, fp32_like(p.image)) : at::Tensor();
      void* stream = current_stream();
      for (int64_t r0 = 0; r0 < p.n; r0 += kTileRows) {
        const int64_t rows = std::min(kTileRows, p.n - r0);
        float* dz_x = float_ptr(d_image) + r0 * p.dim;
        float* dz_t = float_ptr(d_text) + r0 * p.dim;
        float* dphi_x_ptr = raw_rows ? dz_x : float_ptr(dphi_x);
        float* dphi_t_ptr = raw_rows ? dz_t : float_ptr(dphi_t);
        tile_features(p, p.image, r0, rows, phi_x, stream, op);
        tile_features(p, p.text, r0, rows, phi_t, stream, op);
        // One side's chain rule into its features: dphi = phi_self sym + phi_other op(G_tx).
        const auto side_grad = [&](at::Tensor& phi_self, const float* sym, at::Tensor& phi_other,
                                   int transpose_tx, float* dphi) {
          check_launch(clipfast_schur_covariance_matmul_cuda(float_ptr(phi_self), sym, 0, rows, f, f, 0, dphi, stream),
                       op);
          check_launch(clipfast_schur_covariance_matmul_cuda(float_ptr(phi_other), g_tx_ptr, transpose_tx, rows, f, f,
                                                             1, dphi, stream),
                       op);
        };
        side_grad(phi_x, sym_xx_ptr, phi_t, 0, dphi_x_ptr);  // dphi_x = phi_x (G_xx + G_xx^T) + phi_t G_tx
        side_grad(phi_t, sym_tt_ptr, phi_x, 1, dphi_t_ptr);  // dphi_t = phi_t (G_tt + G_tt^T) + phi_x G_tx^T
        if (!raw_rows) {
          tile_input_grad(p, p.image, r0, rows, phi_x, dphi_x, du, dz_x, stream, op);
          tile_input_grad(p, p.text, r0, rows, phi_t, dphi_t, du, dz_t, stream, op);
        }
      }
    }
  }
  return {d_image.to(image.scalar_type()), d_text.to(text.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast_C, CUDA, m) {
  m.impl("schur_covariance_gram", &schur_covariance_gram_cuda);
  m.impl("schur_covariance_gram_backward", &schur_covariance_gram_backward_cuda);
}

}  // namespace clipfast
