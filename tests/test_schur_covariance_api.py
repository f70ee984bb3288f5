"""clipfast.schur_covariance (Schur-complement kernel covariance, SCE, defocus), its streaming module and CLI.

The compatibility convention is checked against the port of the published procedure
(clipfast/reference/schur_covariance.py); the normalized convention against its definitions and properties."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from clipfast import schur_covariance as schur
from clipfast.nn.schur_covariance import SchurComplementEntropy
from clipfast.reference import schur_covariance as published
from clipfast.sce import main as sce_main


def _pairs(n, d, dtype=torch.float64, seed=0):
    """Correlated, uncentred pairs with unequal column scales (column and row cosines then differ)."""
    g = torch.Generator().manual_seed(seed)
    scales = 0.5 + 1.5 * torch.rand(d, generator=g, dtype=torch.float64)
    text = torch.randn(n, d, generator=g, dtype=torch.float64) * scales + 0.3
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    image = 0.6 * text @ mix + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return image.to(dtype), text.to(dtype)


def _omegas(d, m, sigma=2.0, seed=1, dtype=torch.float64):
    return (torch.randn(d, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / sigma).to(dtype)


def _close(actual, expected, rtol, atol=0.0):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------------
# Compatibility convention == the published procedure
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel,n,d,m", [("cosine", 200, 12, None), ("gaussian", 150, 6, 10)])
def test_clip_dissection_matches_published_float64(kernel, n, d, m):
    image, text = _pairs(n, d, seed=n)
    w = _omegas(d, m) if m else None
    kw = dict(kernel=kernel, convention="clip-dissection", omegas=w)
    got = schur.schur_complement(image, text, **kw)
    want = published.published_schur_complement(image, text, kernel, w)
    for name, a, b in zip(("C_tt", "C_tx", "C_xx", "P", "S"), (got.text_cov, got.cross_cov, got.image_cov,
                                                                 got.text_part, got.complement), want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=lambda s: f"{name}: {s}")
    assert got.ridge == 1e-12 and got.convention == "clip-dissection"
    for a, b in zip(schur.sce_score(image, text, **kw), published.published_sce_score(image, text, kernel, w)):
        _close(a, b, rtol=1e-10)

    images, texts = _pairs(5, d, seed=100 + n)
    corrected, a_star = schur.defocus(images, texts, reference_images=image, reference_texts=text,
                                      kernel=kernel, convention="clip-dissection", omegas=w)
    want_corrected, want_a = published.published_defocus(images, texts, image, text, kernel, w)
    _close(a_star, want_a, rtol=1e-10, atol=1e-12)
    _close(corrected, want_corrected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel,n,d,m", [("cosine", 8, 12, None), ("gaussian", 12, 6, 10)])
def test_clip_dissection_singular_text_covariance(kernel, n, d, m):
    """n < F: C_tt has rounding-level (~1e-17) singular values that the published 1e-12 jitter lifts above
    pinv's float64 cut-off (~1e-15), so the published inverse amplifies rounding differences of the
    blocks by ~1e12. Blocks agree to rounding, equal blocks give equal splits, and the end-to-end scores
    (the degenerate SCE ~ 1 of this regime) agree to ~1e-5 (measured 4e-6)."""
    image, text = _pairs(n, d, seed=n)
    w = _omegas(d, m) if m else None
    kw = dict(kernel=kernel, convention="clip-dissection", omegas=w)
    got = schur.schur_complement(image, text, **kw)
    c_tt, c_tx, c_xx, _, _ = published.published_schur_complement(image, text, kernel, w)
    for a, b in ((got.text_cov, c_tt), (got.cross_cov, c_tx), (got.image_cov, c_xx)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    text_part = got.cross_cov.T @ published.published_text_inverse(got.text_cov) @ got.cross_cov
    torch.testing.assert_close(got.text_part, text_part, rtol=1e-14, atol=1e-16)
    for a, b in zip(schur.sce_score(image, text, **kw), published.published_sce_score(image, text, kernel, w)):
        _close(a, b, rtol=1e-4)


def test_clip_dissection_float32_follows_the_published_float32_run():
    """The inverse and the scores run in float32, as published (well-posed case: the pinv cut-off keeps
    every singular value, so the two orders of summation agree to float32 rounding)."""
    image, text = _pairs(200, 12, dtype=torch.float32, seed=3)
    got = schur.sce_score(image, text, convention="clip-dissection")
    want = published.published_sce_score(image, text, "cosine")
    assert got[0].dtype == torch.float32
    for a, b in zip(got, want):
        _close(a, b, rtol=1e-4)


def test_rff_covariance_is_phi_gram_over_n():
    image, text = _pairs(64, 5, seed=4)
    w = _omegas(5, 7)
    phi_t, phi_x = published.rff_features(text, w), published.rff_features(image, w)
    for convention in schur.CONVENTIONS:
        got = schur.schur_complement(image, text, kernel="gaussian", omegas=w, convention=convention)
        _close(got.text_cov, phi_t.T @ phi_t / 64, rtol=1e-12, atol=1e-15)
        _close(got.cross_cov, phi_t.T @ phi_x / 64, rtol=1e-12, atol=1e-15)
        _close(got.image_cov, phi_x.T @ phi_x / 64, rtol=1e-12, atol=1e-15)
        assert torch.equal(got.omegas, w)
    torch.testing.assert_close(schur.rff_features(text, w), phi_t, rtol=0, atol=0)


def test_frequencies_are_reproducible_and_shared_across_dtypes():
    image, text = _pairs(50, 4, seed=5)
    kw = dict(kernel="gaussian", sigma=1.5, rff_dim=6)
    a = schur.schur_complement(image, text, generator=torch.Generator().manual_seed(3), **kw)
    b = schur.schur_complement(image.float(), text.float(), generator=torch.Generator().manual_seed(3), **kw)
    assert a.omegas.dtype == torch.float64 and b.omegas.dtype == torch.float32
    assert torch.equal(a.omegas, b.omegas.double())  # drawn in float32 for both dtypes
    torch.manual_seed(11)  # generator=None: the global RNG, exactly like the published draw
    c = schur.schur_complement(image, text, **kw)
    torch.manual_seed(11)
    assert torch.equal(c.omegas, published.published_omegas(4, 6, 1.5).double())


# ---------------------------------------------------------------------------------------------------
# Exact-kernel cross-check
# ---------------------------------------------------------------------------------------------------

def test_n_space_formula_equals_feature_space_split():
    """The push-through (n-space) formulas of exact_gaussian_schur, fed the Grams of random Fourier
    features, give the non-zero spectra of the feature-space split with the same absolute ridge."""
    image, text = _pairs(30, 4, seed=6)
    m, eta = 40, 1e-3
    w = _omegas(4, m)
    split = schur.schur_complement(image, text, kernel="gaussian", omegas=w, ridge=eta * 2 * m)  # eta = r / F
    phi_t, phi_x = published.rff_features(text, w), published.rff_features(image, w)
    s_n, p_n = schur._n_space_spectra(phi_t @ phi_t.T, phi_x @ phi_x.T, eta)
    _close(s_n, torch.linalg.eigvalsh(split.complement)[-30:], rtol=1e-8, atol=1e-13)
    _close(p_n, torch.linalg.eigvalsh(split.text_part)[-30:], rtol=1e-8, atol=1e-13)


def test_rff_scores_approach_the_exact_gaussian_kernel():
    image, text = _pairs(60, 5, seed=7)
    sigma, eta = 2.5, 1e-3
    exact = schur.exact_gaussian_schur(image, text, sigma=sigma, ridge=eta)
    assert abs((exact.complement_eigenvalues.sum() + exact.text_part_eigenvalues.sum()).item() - 1) < 1e-12
    trace_s = exact.complement_eigenvalues.sum()

    def mean_error(m):
        errors = []
        for seed in range(4):
            split = schur.schur_complement(image, text, kernel="gaussian", sigma=sigma, rff_dim=m,
                                           ridge=eta * 2 * m, generator=torch.Generator().manual_seed(seed))
            sce = schur.matrix_score(split.complement, "normalized", 1.0)
            errors.append([abs(sce / exact.sce - 1).item(), abs(torch.trace(split.complement) / trace_s - 1).item()])
        return torch.tensor(errors).mean(0)

    coarse, fine = mean_error(16), mean_error(256)
    # Monte-Carlo error ~ 1/sqrt(m): 16x more frequencies, ~4x smaller error (measured 0.28 -> 0.03).
    assert torch.all(fine < coarse / 3), (coarse, fine)
    assert torch.all(fine < 0.08), fine


# ---------------------------------------------------------------------------------------------------
# Normalized convention: dtype agreement, properties, gradients
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["cosine", "gaussian"])
def test_float32_and_float64_agree_with_the_default_ridge(kernel):
    """n = 2000, d = 64 (measured gap <= 1e-6 relative; see schur.DEFAULT_RIDGE)."""
    image, text = _pairs(2000, 64, seed=8)
    kw = dict(kernel="gaussian", omegas=_omegas(64, 256, sigma=10.0)) if kernel == "gaussian" else {}
    s64 = schur.sce_score(image, text, **kw)
    kw32 = dict(kw, omegas=kw["omegas"].float()) if kw else {}
    s32 = schur.sce_score(image.float(), text.float(), **kw32)
    for a, b in zip(s32, s64):
        assert a.dtype == torch.float32
        _close(a.double(), b, rtol=1e-5)


def test_float32_and_float64_agree_with_the_default_ridge_when_text_covariance_is_singular():
    """n = 200 < F = 300: the ridge decides the complement (measured gap ~2e-4; on the same data the
    published pinv path gives SCE 1.125 in float32 and 1.000 in float64)."""
    image, text = _pairs(200, 16, seed=20)
    w = _omegas(16, 150, sigma=8.0)
    s64 = schur.sce_score(image, text, kernel="gaussian", omegas=w)
    s32 = schur.sce_score(image.float(), text.float(), kernel="gaussian", omegas=w.float())
    for a, b in zip(s32, s64):
        _close(a.double(), b, rtol=1e-3)


def test_more_features_than_pairs_computes_in_float64():
    """F = 1000 >= n = 100 (the regime of 500 pairs with 2500 frequencies): the ridge decides S below
    float32's resolution, so float32 inputs are computed in float64 (schur.work_dtype) and agree with a
    float64 run to 1e-3; forcing float32 shows why (a gap of percents)."""
    image, text = _pairs(100, 16, seed=21)
    w = _omegas(16, 500, sigma=4.0)
    assert schur.work_dtype(torch.float32, "normalized", 1000, 100) == torch.float64
    assert schur.work_dtype(torch.float32, "normalized", 64, 100) == torch.float32
    s64 = schur.sce_score(image, text, kernel="gaussian", omegas=w)
    s32 = schur.sce_score(image.float(), text.float(), kernel="gaussian", omegas=w.float())
    forced = schur.sce_score(image.float(), text.float(), kernel="gaussian", omegas=w.float(),
                             compute_dtype=torch.float32)
    for a, b in zip(s32, s64):
        assert a.dtype == torch.float32
        _close(a.double(), b, rtol=1e-3)
    assert abs(float(forced[0]) - float(s64[0])) > 1e-2 * float(s64[0])


@pytest.mark.parametrize("convention", schur.CONVENTIONS)
def test_zero_embeddings_raise_with_the_cosine_kernel(convention):
    """All-zero embeddings have no direction: a clear error, not the valid-looking (1.0, 1.0)."""
    image, text = _pairs(50, 8, seed=3)
    with pytest.raises(ValueError, match="all-zero"):
        schur.sce_score(torch.zeros_like(image), torch.zeros_like(text), convention=convention)
    image[7 if convention == "normalized" else 0, :] = 0
    image[:, 2] = 0 if convention == "clip-dissection" else image[:, 2]
    with pytest.raises(ValueError, match="image_features has an all-zero"):
        schur.sce_score(image, text, convention=convention)
    # The Gaussian kernel of equal embeddings is a constant feature: one direction, score 1 is the answer.
    w = _omegas(8, 16)
    sce, text_part = schur.sce_score(torch.zeros(50, 8, dtype=torch.float64), torch.zeros(50, 8, dtype=torch.float64),
                                     kernel="gaussian", omegas=w)
    _close(sce, torch.tensor(1.0, dtype=torch.float64), rtol=1e-6)


def test_non_finite_embeddings_raise_under_compile():
    fn = torch.compile(lambda a, b: schur.sce_score(a, b)[0], backend="aot_eager", fullgraph=True)
    image, text = _pairs(20, 4, seed=1)
    image[3, 1] = math.nan
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        fn(image, text)


@pytest.mark.parametrize("convention", schur.CONVENTIONS)
@pytest.mark.parametrize("kernel", schur.KERNELS)
def test_split_properties(kernel, convention):
    image, text = _pairs(300, 8, seed=9)
    kw = dict(kernel=kernel, convention=convention, omegas=_omegas(8, 6) if kernel == "gaussian" else None)
    split = schur.schur_complement(image, text, **kw)
    torch.testing.assert_close(split.text_part + split.complement, split.image_cov, rtol=0, atol=1e-15)
    scale = torch.trace(split.image_cov).item()
    assert torch.linalg.eigvalsh(split.text_part).min() > -1e-12 * scale
    assert torch.linalg.eigvalsh(split.complement).min() > -1e-12 * scale
    assert 0 < torch.trace(split.complement) < torch.trace(split.image_cov)

    same = schur.schur_complement(text, text, **kw)  # images equal to their prompts: nothing unexplained
    if convention == "clip-dissection":  # what the 1e-12 jitter leaves: C - C (C + 1e-12 I)^{-1} C ~ 1e-12
        assert same.complement.abs().max() < 1e-11
    else:  # S = eta C (C + eta I)^{-1}: PSD, trace <= F * eta = ridge * tr(C_tt) = ridge
        assert torch.linalg.eigvalsh(same.complement).min() > -1e-14
        assert torch.trace(same.complement) <= schur.DEFAULT_RIDGE * (1 + 1e-9)


@pytest.mark.parametrize("kernel,convention", [("cosine", "normalized"), ("gaussian", "normalized"),
                                               ("cosine", "clip-dissection")])
def test_gradcheck_float64(kernel, convention):
    """Tiny, well-conditioned (n > F, distinct eigenvalues): autograd through the covariance op, the
    Cholesky solve (or pinv) and eigvalsh matches finite differences."""
    image, text = _pairs(9, 3, seed=10)
    kw = dict(kernel=kernel, convention=convention, omegas=_omegas(3, 2, sigma=1.5) if kernel == "gaussian" else None)
    orders = [1, 2, math.inf] if convention == "normalized" else [1]

    def scores(x, t):
        return torch.stack([s for q in orders for s in schur.sce_score(x, t, order=q, **kw)])

    assert torch.autograd.gradcheck(scores, (image.requires_grad_(), text.requires_grad_()))


def test_compiles_fullgraph_and_matches_eager():
    image, text = _pairs(100, 8, dtype=torch.float32, seed=19)
    w = _omegas(8, 4, dtype=torch.float32)

    def fn(x, t):
        return schur.sce_score(x, t, kernel="gaussian", omegas=w, order=2)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(image, text), fn(image, text)):
        _close(a, b, rtol=1e-6)


@pytest.mark.parametrize("convention", schur.CONVENTIONS)
def test_gradients_reach_both_inputs_float32(convention):
    image, text = _pairs(100, 16, dtype=torch.float32, seed=11)
    image.requires_grad_()
    text.requires_grad_()
    sce, text_score = schur.sce_score(image, text, convention=convention)
    grads = torch.autograd.grad(sce + text_score, (image, text))
    for g in grads:
        assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().max() > 0


def test_renyi_family():
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    scores = schur.renyi_scores(torch.diag(p * 0.4))  # the family is scale-free
    assert set(scores) == set(schur.ORDERS)
    want = {1.0: 2 ** 1.5, 1.5: (p ** 1.5).sum().item() ** -2, 2.0: 1 / 0.375,
            2.5: (p ** 2.5).sum().item() ** (-1 / 1.5), math.inf: 2.0}
    for q, value in want.items():
        assert abs(scores[q].item() - value) < 1e-12, q
    values = [scores[q].item() for q in schur.ORDERS]
    assert all(a >= b for a, b in zip(values, values[1:]))
    uniform = schur.renyi_scores(torch.eye(4, dtype=torch.float64))
    assert all(abs(v.item() - 4) < 1e-12 for v in uniform.values())

    image, text = _pairs(100, 6, seed=12)
    split = schur.schur_complement(image, text)
    sce2, text2 = schur.sce_score(image, text, order=2)
    _close(sce2, schur.renyi_scores(split.complement)[2.0], rtol=1e-12)
    _close(text2, schur.renyi_scores(split.text_part)[2.0], rtol=1e-12)


# ---------------------------------------------------------------------------------------------------
# Defocus
# ---------------------------------------------------------------------------------------------------

def test_defocus_normalized_cosine_leaves_the_complement():
    """Over the reference pairs, the corrected unit rows have covariance S (exact with ridge 0)."""
    ref_images, ref_texts = _pairs(120, 6, seed=13)
    corrected, a_star = schur.defocus(ref_images, ref_texts, reference_images=ref_images,
                                      reference_texts=ref_texts, ridge=0.0)
    split = schur.schur_complement(ref_images, ref_texts, ridge=0.0)
    _close(corrected.T @ corrected / 120, split.complement, rtol=1e-9, atol=1e-14)
    again, same_a = schur.defocus(ref_images[:7], ref_texts[:7], a_star=a_star)
    assert same_a is a_star or torch.equal(same_a, a_star)
    torch.testing.assert_close(again, corrected[:7], rtol=0, atol=0)


def test_defocus_gaussian_uses_the_fitted_frequencies():
    ref_images, ref_texts = _pairs(80, 4, seed=14)
    images, texts = _pairs(6, 4, seed=15)
    w = _omegas(4, 5)
    corrected, a_star = schur.defocus(images, texts, reference_images=ref_images, reference_texts=ref_texts,
                                      kernel="gaussian", omegas=w)
    split = schur.schur_complement(ref_images, ref_texts, kernel="gaussian", omegas=w)
    factor = torch.linalg.cholesky(split.text_cov + schur.DEFAULT_RIDGE / 10 * torch.eye(10, dtype=torch.float64))
    _close(a_star, torch.cholesky_solve(split.cross_cov, factor), rtol=1e-10, atol=1e-12)
    want = schur.rff_features(images, w) - schur.rff_features(texts, w) @ a_star
    _close(corrected, want, rtol=1e-12, atol=1e-14)
    reused, _ = schur.defocus(images, texts, kernel="gaussian", omegas=w, a_star=a_star)
    torch.testing.assert_close(reused, corrected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------

_X, _T = _pairs(10, 4)
_BAD = [
    (lambda: schur.sce_score(_X, _T[:9]), ValueError, "paired row by row"),
    (lambda: schur.sce_score(_X[:1], _T[:1]), ValueError, "at least 2 pairs"),
    (lambda: schur.sce_score(_X[0], _T[0]), ValueError, "2-D"),
    (lambda: schur.sce_score(_X.long(), _T.long()), TypeError, "float"),
    (lambda: schur.sce_score(_X, _T.float()), TypeError, "dtypes differ"),
    (lambda: schur.sce_score(_X.numpy(), _T), TypeError, "torch.Tensor"),
    (lambda: schur.sce_score(_X, _T[:, :3]), ValueError, "feature dimensions differ"),
    (lambda: schur.sce_score(torch.where(_X > 1, math.nan, _X), _T), ValueError, "NaN or Inf"),
    (lambda: schur.sce_score(_X, torch.where(_T > 1, math.inf, _T)), ValueError, "NaN or Inf"),
    (lambda: schur.sce_score(_X, _T, kernel="gaussian", rff_dim=8), ValueError, "needs sigma"),
    (lambda: schur.sce_score(_X, _T, kernel="gaussian", sigma=0.0, rff_dim=8), ValueError, "sigma must be"),
    (lambda: schur.sce_score(_X, _T, kernel="gaussian", sigma=-1.0, rff_dim=8), ValueError, "sigma must be"),
    (lambda: schur.sce_score(_X, _T, kernel="gaussian", sigma=1.0), ValueError, "needs rff_dim"),
    (lambda: schur.sce_score(_X, _T, kernel="gaussian", omegas=_omegas(5, 3)), ValueError, "one row per"),
    (lambda: schur.sce_score(_X, _T, kernel="gaussian", omegas=_omegas(4, 3), sigma=1.0), ValueError, "not both"),
    (lambda: schur.sce_score(_X, _T, sigma=1.0), ValueError, "only apply to kernel='gaussian'"),
    (lambda: schur.sce_score(_X, _T, kernel="laplace"), ValueError, "kernel must be"),
    (lambda: schur.sce_score(_X, _T, convention="vendi"), ValueError, "convention must be"),
    (lambda: schur.sce_score(_X, _T, order=3), ValueError, "order must be"),
    (lambda: schur.sce_score(_X, _T, convention="clip-dissection", order=2), ValueError, "order-1"),
    (lambda: schur.sce_score(_X, _T, ridge=-1e-3), ValueError, "ridge must be"),
    (lambda: schur.defocus(_X, _T, kernel="gaussian", reference_images=_X, reference_texts=_T), ValueError,
     "needs omegas"),
    (lambda: schur.defocus(_X, _T), ValueError, "reference_images and reference_texts"),
    (lambda: schur.defocus(_X, _T, a_star=torch.eye(3, dtype=torch.float64)), ValueError, r"\(4, 4\)"),
    (lambda: schur.exact_gaussian_schur(_X, _T, sigma=1.0, ridge=0.0), ValueError, "ridge must be"),
    (lambda: SchurComplementEntropy(kernel="gaussian", rff_dim=4), ValueError, "needs sigma"),
    (lambda: schur.rff_omegas(4, 0, 1.0), ValueError, "rff_dim must be"),
]


@pytest.mark.parametrize("call,error,match", _BAD, ids=[f"bad{i}" for i in range(len(_BAD))])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------------------
# Streaming module
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("convention", schur.CONVENTIONS)
@pytest.mark.parametrize("kernel", schur.KERNELS)
def test_streaming_equals_one_shot(kernel, convention):
    image, text = _pairs(300, 8, seed=16)
    kw = dict(kernel=kernel, convention=convention)
    if kernel == "gaussian":
        kw.update(sigma=2.0, rff_dim=12)
    metric = SchurComplementEntropy(**kw, generator=torch.Generator().manual_seed(5) if kernel == "gaussian" else None)
    for start in range(0, 300, 37):  # uneven batches, the last one short
        metric.update(image[start:start + 37], text[start:start + 37])
    features = 24 if kernel == "gaussian" else 8
    assert metric.text_gram.shape == (features, features) and int(metric.count) == 300  # O(F^2) state
    one_shot = schur.sce_score(image, text, **kw,
                               generator=torch.Generator().manual_seed(5) if kernel == "gaussian" else None)
    for a, b in zip(metric.compute(), one_shot):
        _close(a, b, rtol=1e-10)

    metric.reset()
    with pytest.raises(ValueError, match="at least 2 pairs"):
        metric.compute()
    metric.update(image[:150], text[:150])
    metric.update(image[150:], text[150:])
    for a, b in zip(metric.compute(), one_shot):
        _close(a, b, rtol=1e-10)
    with pytest.raises(ValueError, match="every batch"):
        metric.update(image[:5, :4], text[:5, :4])


def test_streaming_float32_matches_one_shot():
    image, text = _pairs(500, 16, dtype=torch.float32, seed=17)
    metric = SchurComplementEntropy()
    for start in range(0, 500, 64):
        metric.update(image[start:start + 64], text[start:start + 64])
    for a, b in zip(metric.compute(), schur.sce_score(image, text)):
        assert a.dtype == torch.float32
        _close(a, b, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

def test_cli_prints_scores_and_writes_the_spectra(tmp_path, capsys):
    image, text = _pairs(120, 8, dtype=torch.float32, seed=18)
    np.save(tmp_path / "images.npy", image.numpy())
    np.save(tmp_path / "texts.npy", text.numpy())
    png = tmp_path / "spectra.png"
    assert sce_main([str(tmp_path / "images.npy"), str(tmp_path / "texts.npy"), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    sce = schur.sce_score(image, text)[0].item()
    assert f"{sce:.6g}" in out and "Renyi" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    args = [str(tmp_path / "images.npy"), str(tmp_path / "texts.npy"), "--kernel", "gaussian", "--sigma", "3",
            "--rff-dim", "16", "--convention", "clip-dissection", "--seed", "2", "--dtype", "float64"]
    done = subprocess.run([sys.executable, "-m", "clipfast.sce", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    want = schur.sce_score(image.double(), text.double(), kernel="gaussian", sigma=3.0, rff_dim=16,
                           convention="clip-dissection", generator=torch.Generator().manual_seed(2))[0].item()
    assert f"{want:.6g}" in done.stdout

    with pytest.raises(SystemExit):
        sce_main([str(tmp_path / "images.npy"), str(tmp_path / "texts.npy"), "--kernel", "gaussian"])


def test_cli_missing_file_and_help(tmp_path, capsys):
    """A missing file is one error line (no traceback); --help is plain text with the defaults."""
    np.save(tmp_path / "t.npy", np.ones((4, 3), dtype=np.float32))
    with pytest.raises(SystemExit) as exit_info:
        sce_main([str(tmp_path / "missing.npy"), str(tmp_path / "t.npy")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read" in err and "missing.npy" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        sce_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out
    assert "(default: cosine)" in out and "(default: normalized" not in out and "normalized (default)" in out
    assert "(default: 0)" in out
