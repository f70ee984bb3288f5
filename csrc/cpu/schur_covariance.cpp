// Feature Gram sums for the Schur-complement kernel covariance ("Dissecting CLIP", arXiv 2412.18645),
// on the CPU, in one pass over the n paired rows (image rows x_i, text rows t_i; images first in every
// signature):
//
//   S_tt = sum_i phi(t_i) phi(t_i)^T,   S_tx = sum_i phi(t_i) phi(x_i)^T,   S_xx = sum_i phi(x_i) phi(x_i)^T
//
// with phi the features of the covariance (clipfast/reference/schur_covariance.py): "column_cosine" the raw
// rows (phi(z) = z; the column normalisation is applied to the sums in Python), "row_cosine" the unit rows
// (z / max(|z|, 1e-12)), "rff" random Fourier features of the Gaussian kernel (phi(z) = [cos(z W), sin(z W)]
// / sqrt(m), W: (d, m)).
//
// Algorithm: rows are processed in tiles of kTileRows; each tile's features are made on the fly (for RFF
// one tile GEMM z W, then cos and sin straight into the two halves of the feature tile) and added into
// the three (F, F) sums with BLAS rank-k updates. The n x F feature matrices never exist: memory is
// O(F^2 + kTileRows * F). The backward recomputes each tile's features and applies the chain rule:
//   dphi_x = phi_x (G_xx + G_xx^T) + phi_t G_tx,   dphi_t = phi_t (G_tt + G_tt^T) + phi_x G_tx^T,
// then through phi row by row. BLAS parallelises each product (the tiles are processed in order, so the
// sums are deterministic for a fixed thread count). fp64 inputs compute in fp64, everything else in fp32.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "clipfast/checks.h"

namespace clipfast {
namespace {

constexpr int64_t kTileRows = 1024;
constexpr double kRowNormEps = 1e-12;

constexpr const char* kOp = "schur_covariance_gram";

enum class Covariance { kColumnCosine, kRowCosine, kRff };

Covariance parse_covariance(c10::string_view name) {
  if (name == "column_cosine") return Covariance::kColumnCosine;
  if (name == "row_cosine") return Covariance::kRowCosine;
  if (name == "rff") return Covariance::kRff;
  TORCH_CHECK(false, kOp, ": covariance must be 'column_cosine', 'row_cosine' or 'rff', got '", std::string(name),
              "'");
}

at::Tensor compute_copy(const at::Tensor& t) {
  const auto dtype = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return t.detach().to(dtype).contiguous();
}

struct Problem {
  at::Tensor image, text, omegas;  // computation dtype, contiguous; omegas only for RFF
  Covariance covariance;
  int64_t features;  // F
};

Problem make_problem(const at::Tensor& image, const at::Tensor& text, c10::string_view covariance,
                     const std::optional<at::Tensor>& omegas) {
  check_feature_pair(image, text, kOp);
  TORCH_CHECK(image.size(0) == text.size(0), kOp, ": image has ", image.size(0), " rows but text has ", text.size(0),
              " (pairs are rows)");
  Problem p{compute_copy(image), compute_copy(text), at::Tensor(), parse_covariance(covariance), image.size(1)};
  if (p.covariance == Covariance::kRff) {
    TORCH_CHECK(omegas.has_value() && omegas->dim() == 2 && omegas->size(0) == image.size(1), kOp,
                ": 'rff' needs omegas of shape (", image.size(1), ", m)");
    TORCH_CHECK(omegas->size(1) > 0, kOp, ": omegas needs at least one frequency");
    p.omegas = omegas->detach().to(p.image.scalar_type()).contiguous();
    p.features = 2 * omegas->size(1);
  }
  return p;
}

// phi of a tile of rows. For RFF also returns u = z W (the backward needs cos u and sin u).
at::Tensor tile_features(const Problem& p, const at::Tensor& z, at::Tensor* u_out = nullptr) {
  switch (p.covariance) {
    case Covariance::kColumnCosine:
      return z;
    case Covariance::kRowCosine:
      return z / z.norm(2, {1}, /*keepdim=*/true).clamp_min(kRowNormEps);
    case Covariance::kRff: {
      const int64_t m = p.omegas.size(1);
      at::Tensor u = at::mm(z, p.omegas);
      at::Tensor phi = at::empty({z.size(0), 2 * m}, z.options());
      at::Tensor cos_half = phi.narrow(1, 0, m), sin_half = phi.narrow(1, m, m);
      at::cos_out(cos_half, u);
      at::sin_out(sin_half, u);
      phi.mul_(1.0 / std::sqrt(static_cast<double>(m)));
      if (u_out != nullptr) *u_out = u;
      return phi;
    }
  }
  TORCH_INTERNAL_ASSERT(false, "unhandled covariance");
}

// d z from d phi for one tile (the chain rule through phi).
at::Tensor tile_input_grad(const Problem& p, const at::Tensor& z, const at::Tensor& phi, const at::Tensor& u,
                           const at::Tensor& dphi) {
  switch (p.covariance) {
    case Covariance::kColumnCosine:
      return dphi;
    case Covariance::kRowCosine: {
      // phi = z / r, r = |z| (clamped): dz = (dphi - phi <phi, dphi>) / r where |z| > eps, dphi / eps below.
      const at::Tensor norm = z.norm(2, {1}, true);
      const at::Tensor r = norm.clamp_min(kRowNormEps);
      const at::Tensor radial = (phi * dphi).sum(1, true) * (norm > kRowNormEps);
      return (dphi - phi * radial) / r;
    }
    case Covariance::kRff: {
      // phi = [cos u, sin u] / sqrt(m): du = (-sin u * dphi_cos + cos u * dphi_sin) / sqrt(m); dz = du W^T.
      const int64_t m = p.omegas.size(1);
      const at::Tensor du = (at::cos(u) * dphi.narrow(1, m, m) - at::sin(u) * dphi.narrow(1, 0, m))
                                .mul_(1.0 / std::sqrt(static_cast<double>(m)));
      return at::mm(du, p.omegas.t());
    }
  }
  TORCH_INTERNAL_ASSERT(false, "unhandled covariance");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> schur_covariance_gram_cpu(const at::Tensor& image,
                                                                         const at::Tensor& text,
                                                                         c10::string_view covariance,
                                                                         const std::optional<at::Tensor>& omegas) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Problem p = make_problem(image, text, covariance, omegas);
  const auto options = p.image.options();
  at::Tensor s_tt = at::zeros({p.features, p.features}, options);
  at::Tensor s_tx = at::zeros_like(s_tt), s_xx = at::zeros_like(s_tt);
  const int64_t n = p.image.size(0);
  for (int64_t r0 = 0; r0 < n; r0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, n - r0);
    const at::Tensor phi_x = tile_features(p, p.image.narrow(0, r0, rows));
    const at::Tensor phi_t = tile_features(p, p.text.narrow(0, r0, rows));
    s_tt.addmm_(phi_t.t(), phi_t);
    s_tx.addmm_(phi_t.t(), phi_x);
    s_xx.addmm_(phi_x.t(), phi_x);
  }
  return {s_tt, s_tx, s_xx};
}

std::tuple<at::Tensor, at::Tensor> schur_covariance_gram_backward_cpu(
    const at::Tensor& grad_tt, const at::Tensor& grad_tx, const at::Tensor& grad_xx, const at::Tensor& image,
    const at::Tensor& text, c10::string_view covariance, const std::optional<at::Tensor>& omegas) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Problem p = make_problem(image, text, covariance, omegas);
  for (const at::Tensor* g : {&grad_tt, &grad_tx, &grad_xx}) {
    TORCH_CHECK(g->dim() == 2 && g->size(0) == p.features && g->size(1) == p.features,
                "schur_covariance_gram_backward: gradients must be (", p.features, ", ", p.features, "), got ",
                g->sizes());
  }
  const auto dtype = p.image.scalar_type();
  const at::Tensor sym_tt = (grad_tt + grad_tt.t()).to(dtype), sym_xx = (grad_xx + grad_xx.t()).to(dtype);
  const at::Tensor g_tx = grad_tx.to(dtype).contiguous();
  at::Tensor d_image = at::empty_like(p.image), d_text = at::empty_like(p.text);
  const int64_t n = p.image.size(0);
  for (int64_t r0 = 0; r0 < n; r0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, n - r0);
    const at::Tensor x = p.image.narrow(0, r0, rows), t = p.text.narrow(0, r0, rows);
    at::Tensor u_x, u_t;
    const at::Tensor phi_x = tile_features(p, x, &u_x), phi_t = tile_features(p, t, &u_t);
    const at::Tensor dphi_x = at::mm(phi_x, sym_xx).addmm_(phi_t, g_tx);
    const at::Tensor dphi_t = at::mm(phi_t, sym_tt).addmm_(phi_x, g_tx.t());
    d_image.narrow(0, r0, rows).copy_(tile_input_grad(p, x, phi_x, u_x, dphi_x));
    d_text.narrow(0, r0, rows).copy_(tile_input_grad(p, t, phi_t, u_t, dphi_t));
  }
  return {d_image.to(image.scalar_type()), d_text.to(text.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast_C, CPU, m) {
  m.impl("schur_covariance_gram", &schur_covariance_gram_cpu);
  m.impl("schur_covariance_gram_backward", &schur_covariance_gram_backward_cpu);
}

}  // namespace clipfast
