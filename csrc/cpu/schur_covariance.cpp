// Feature Gram sums for the Schur-complement kernel covariance ("Dissecting CLIP", arXiv 2412.18645),
// on the CPU, in one pass over the n paired rows:
//
//   S_tt = sum_i phi(t_i) phi(t_i)^T,   S_tx = sum_i phi(t_i) phi(x_i)^T,   S_xx = sum_i phi(x_i) phi(x_i)^T
//
// with phi one of: linear (phi(z) = z), row-normalised (z / max(|z|, 1e-12), the cosine kernel) or random
// Fourier features of the Gaussian kernel (phi(z) = [cos(z W), sin(z W)] / sqrt(m), W: (d, m)).
//
// Algorithm: rows are processed in tiles of kTileRows; each tile's features are made on the fly (for RFF
// one tile GEMM z W, then cos and sin straight into the two halves of the feature tile) and added into
// the three (F, F) sums with BLAS rank-k updates. The n x F feature matrices never exist: memory is
// O(F^2 + kTileRows * F). The backward recomputes each tile's features and applies the chain rule:
//   dphi_t = phi_t (G_tt + G_tt^T) + phi_x G_tx^T,   dphi_x = phi_x (G_xx + G_xx^T) + phi_t G_tx,
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

enum class FeatureMap { kLinear, kRowNormalized, kRff };

FeatureMap parse_feature_map(c10::string_view name) {
  if (name == "linear") return FeatureMap::kLinear;
  if (name == "row_normalized") return FeatureMap::kRowNormalized;
  if (name == "rff") return FeatureMap::kRff;
  TORCH_CHECK(false, "feature_gram: feature_map must be 'linear', 'row_normalized' or 'rff', got '", std::string(name),
              "'");
}

at::Tensor compute_copy(const at::Tensor& t) {
  const auto dtype = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return t.detach().to(dtype).contiguous();
}

struct Problem {
  at::Tensor text, image, omegas;  // computation dtype, contiguous; omegas only for RFF
  FeatureMap map;
  int64_t features;  // F
};

Problem make_problem(const at::Tensor& text, const at::Tensor& image, c10::string_view feature_map,
                     const std::optional<at::Tensor>& omegas) {
  check_feature_pair(text, image, "feature_gram");
  TORCH_CHECK(text.size(0) == image.size(0), "feature_gram: text has ", text.size(0), " rows but image has ",
              image.size(0), " (pairs are rows)");
  Problem p{compute_copy(text), compute_copy(image), at::Tensor(), parse_feature_map(feature_map), text.size(1)};
  if (p.map == FeatureMap::kRff) {
    TORCH_CHECK(omegas.has_value() && omegas->dim() == 2 && omegas->size(0) == text.size(1),
                "feature_gram: 'rff' needs omegas of shape (", text.size(1), ", m)");
    TORCH_CHECK(omegas->size(1) > 0, "feature_gram: omegas needs at least one frequency");
    p.omegas = omegas->detach().to(p.text.scalar_type()).contiguous();
    p.features = 2 * omegas->size(1);
  }
  return p;
}

// phi of a tile of rows. For RFF also returns u = z W (the backward needs cos u and sin u).
at::Tensor tile_features(const Problem& p, const at::Tensor& z, at::Tensor* u_out = nullptr) {
  switch (p.map) {
    case FeatureMap::kLinear:
      return z;
    case FeatureMap::kRowNormalized:
      return z / z.norm(2, {1}, /*keepdim=*/true).clamp_min(kRowNormEps);
    case FeatureMap::kRff: {
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
  TORCH_INTERNAL_ASSERT(false, "unhandled feature map");
}

// d z from d phi for one tile (the chain rule through phi).
at::Tensor tile_input_grad(const Problem& p, const at::Tensor& z, const at::Tensor& phi, const at::Tensor& u,
                           const at::Tensor& dphi) {
  switch (p.map) {
    case FeatureMap::kLinear:
      return dphi;
    case FeatureMap::kRowNormalized: {
      // phi = z / r, r = |z| (clamped): dz = (dphi - phi <phi, dphi>) / r where |z| > eps, dphi / eps below.
      const at::Tensor norm = z.norm(2, {1}, true);
      const at::Tensor r = norm.clamp_min(kRowNormEps);
      const at::Tensor radial = (phi * dphi).sum(1, true) * (norm > kRowNormEps);
      return (dphi - phi * radial) / r;
    }
    case FeatureMap::kRff: {
      // phi = [cos u, sin u] / sqrt(m): du = (-sin u * dphi_cos + cos u * dphi_sin) / sqrt(m); dz = du W^T.
      const int64_t m = p.omegas.size(1);
      const at::Tensor du = (at::cos(u) * dphi.narrow(1, m, m) - at::sin(u) * dphi.narrow(1, 0, m))
                                .mul_(1.0 / std::sqrt(static_cast<double>(m)));
      return at::mm(du, p.omegas.t());
    }
  }
  TORCH_INTERNAL_ASSERT(false, "unhandled feature map");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_gram_cpu(const at::Tensor& text, const at::Tensor& image,
                                                                c10::string_view feature_map,
                                                                const std::optional<at::Tensor>& omegas) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Problem p = make_problem(text, image, feature_map, omegas);
  const auto options = p.text.options();
  at::Tensor s_tt = at::zeros({p.features, p.features}, options);
  at::Tensor s_tx = at::zeros_like(s_tt), s_xx = at::zeros_like(s_tt);
  const int64_t n = p.text.size(0);
  for (int64_t r0 = 0; r0 < n; r0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, n - r0);
    const at::Tensor phi_t = tile_features(p, p.text.narrow(0, r0, rows));
    const at::Tensor phi_x = tile_features(p, p.image.narrow(0, r0, rows));
    s_tt.addmm_(phi_t.t(), phi_t);
    s_tx.addmm_(phi_t.t(), phi_x);
    s_xx.addmm_(phi_x.t(), phi_x);
  }
  return {s_tt, s_tx, s_xx};
}

std::tuple<at::Tensor, at::Tensor> feature_gram_backward_cpu(const at::Tensor& grad_tt, const at::Tensor& grad_tx,
                                                             const at::Tensor& grad_xx, const at::Tensor& text,
                                                             const at::Tensor& image, c10::string_view feature_map,
                                                             const std::optional<at::Tensor>& omegas) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Problem p = make_problem(text, image, feature_map, omegas);
  for (const at::Tensor* g : {&grad_tt, &grad_tx, &grad_xx}) {
    TORCH_CHECK(g->dim() == 2 && g->size(0) == p.features && g->size(1) == p.features,
                "feature_gram_backward: gradients must be (", p.features, ", ", p.features, "), got ", g->sizes());
  }
  const auto dtype = p.text.scalar_type();
  const at::Tensor sym_tt = (grad_tt + grad_tt.t()).to(dtype), sym_xx = (grad_xx + grad_xx.t()).to(dtype);
  const at::Tensor g_tx = grad_tx.to(dtype).contiguous();
  at::Tensor d_text = at::empty_like(p.text), d_image = at::empty_like(p.image);
  const int64_t n = p.text.size(0);
  for (int64_t r0 = 0; r0 < n; r0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, n - r0);
    const at::Tensor t = p.text.narrow(0, r0, rows), x = p.image.narrow(0, r0, rows);
    at::Tensor u_t, u_x;
    const at::Tensor phi_t = tile_features(p, t, &u_t), phi_x = tile_features(p, x, &u_x);
    const at::Tensor dphi_t = at::mm(phi_t, sym_tt).addmm_(phi_x, g_tx.t());
    const at::Tensor dphi_x = at::mm(phi_x, sym_xx).addmm_(phi_t, g_tx);
    d_text.narrow(0, r0, rows).copy_(tile_input_grad(p, t, phi_t, u_t, dphi_t));
    d_image.narrow(0, r0, rows).copy_(tile_input_grad(p, x, phi_x, u_x, dphi_x));
  }
  return {d_text.to(text.scalar_type()), d_image.to(image.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(clipfast_C, CPU, m) {
  m.impl("feature_gram", &feature_gram_cpu);
  m.impl("feature_gram_backward", &feature_gram_backward_cpu);
}

}  // namespace clipfast
