"""The port of the published "Dissecting CLIP" procedure against its definitions, on tiny float64 inputs
computed independently with NumPy."""

import math

import numpy as np
import torch

from clipfast.reference import schur_covariance as published


def _pairs(n, d, seed=0):
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=d) + 0.3  # unequal, uncentred columns
    image = 0.6 * text @ rng.normal(size=(d, d)) / math.sqrt(d) + 0.8 * rng.normal(size=(n, d))
    return torch.from_numpy(image), torch.from_numpy(text)


def _column_cosine(a, b):
    a, b = a.numpy(), b.numpy()
    d = a.shape[1]
    out = np.zeros((d, d))
    for i in range(d):
        for j in range(d):
            out[i, j] = np.sum(a[:, i] * b[:, j]) / (max(np.sqrt(np.sum(a[:, i] ** 2)), 1e-8)
                                                     * max(np.sqrt(np.sum(b[:, j] ** 2)), 1e-8)) / d
    return out


def _phi(z, w):
    u = z.numpy() @ w.numpy()
    return np.concatenate([np.cos(u), np.sin(u)], axis=1) / math.sqrt(w.shape[1])


def test_column_cosine_loop_is_the_column_cosine_over_d():
    image, text = _pairs(9, 4)
    image[:, 2] = 0.0  # a zero column: cosine_similarity's 1e-8 clamp makes its cosines 0
    got = published.column_cosine_covariance_loop(text, image).numpy()
    np.testing.assert_allclose(got, _column_cosine(text, image), rtol=1e-13, atol=1e-15)
    assert np.all(got[:, 2] == 0)
    np.testing.assert_allclose(np.trace(published.column_cosine_covariance_loop(text, text).numpy()), 1.0, rtol=1e-14)


def test_rff_loop_is_phi_gram_over_n_and_approximates_the_gaussian_kernel():
    image, text = _pairs(10, 3, seed=1)
    w = torch.randn(3, 5, dtype=torch.float64) / 2.0
    for batch_size in (3, 64):  # a batch size that does not divide n, and one larger than n
        got = published.rff_covariance_loop(text, image, w, batch_size).numpy()
        np.testing.assert_allclose(got, _phi(text, w).T @ _phi(image, w) / 10, rtol=1e-12, atol=1e-15)
    sigma = 1.5
    u, v = text[:1], image[:1]
    w_big = torch.randn(3, 20000, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) / sigma
    phi_u, phi_v = published.rff_features(u, w_big), published.rff_features(v, w_big)
    exact = math.exp(-((u - v) ** 2).sum().item() / (2 * sigma ** 2))
    assert abs((phi_u @ phi_v.T).item() - exact) < 0.03  # Monte-Carlo error ~ 1/sqrt(m)
    assert abs((phi_u @ phi_u.T).item() - 1.0) < 1e-12  # cos^2 + sin^2


def test_published_omegas_are_float32_randn_over_sigma():
    torch.manual_seed(7)
    w = published.published_omegas(4, 6, 3.5)
    torch.manual_seed(7)
    assert w.dtype == torch.float32 and w.shape == (4, 6)
    torch.testing.assert_close(w, torch.randn(4, 6) / 3.5, rtol=1e-6, atol=0)


def test_schur_complement_is_the_least_squares_residual_covariance():
    """n > d: P = C_tx^T pinv(C_tt) C_tx and S = C_xx - P = X~^T (I - Pi_T) X~ / d, Pi_T the projector on
    the span of the column-normalised text columns."""
    image, text = _pairs(40, 5, seed=2)
    c_tt, c_tx, c_xx, p, s = published.published_schur_complement(image, text, "cosine")
    ref_tt, ref_tx, ref_xx = _column_cosine(text, text), _column_cosine(text, image), _column_cosine(image, image)
    for got, want in ((c_tt, ref_tt), (c_tx, ref_tx), (c_xx, ref_xx)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(p.numpy(), ref_tx.T @ np.linalg.pinv(ref_tt) @ ref_tx, rtol=1e-10, atol=1e-14)
    tn = text.numpy() / np.linalg.norm(text.numpy(), axis=0)
    xn = image.numpy() / np.linalg.norm(image.numpy(), axis=0)
    projector = tn @ np.linalg.solve(tn.T @ tn, tn.T)
    np.testing.assert_allclose(s.numpy(), xn.T @ (np.eye(40) - projector) @ xn / 5, rtol=1e-9, atol=1e-13)


def test_gaussian_schur_complement_uses_the_rff_blocks():
    image, text = _pairs(30, 3, seed=3)
    w = torch.randn(3, 4, dtype=torch.float64) / 2.0
    c_tt, c_tx, c_xx, p, s = published.published_schur_complement(image, text, "gaussian", w, batch_size=7)
    pt, px = _phi(text, w), _phi(image, w)
    np.testing.assert_allclose(c_tt.numpy(), pt.T @ pt / 30, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(c_tx.numpy(), pt.T @ px / 30, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(c_xx.numpy(), px.T @ px / 30, rtol=1e-12, atol=1e-15)
    # The 1e-12 jitter is part of the definition: it moves P by ~1e-12 / sigma_min(C_tt)^2 relative.
    want_p = (pt.T @ px / 30).T @ np.linalg.pinv(pt.T @ pt / 30 + 1e-12 * np.eye(8)) @ (pt.T @ px / 30)
    np.testing.assert_allclose(p.numpy(), want_p, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose((p + s).numpy(), c_xx.numpy(), rtol=0, atol=1e-15)


def test_score_uses_unnormalised_weights_and_the_1e10_floor():
    # Trace 1: the Vendi score exp(H_1). diag(0.5, 0.25, 0.25) -> exp(1.5 ln 2) = 2^1.5.
    got = published.published_score(torch.diag(torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)))
    assert abs(got.item() - 2 ** 1.5) < 1e-12
    # Trace 0.4: exp(-sum l log(l / 0.4)) = exp(0.4 ln 2), not the Vendi score 2.
    got = published.published_score(torch.diag(torch.tensor([0.2, 0.2], dtype=torch.float64)))
    assert abs(got.item() - 2 ** 0.4) < 1e-12
    # Negative and zero eigenvalues count as 1e-10, against an explicit NumPy evaluation.
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    eig = np.array([0.3, 0.1, 1e-3, 0.0, -1e-9])
    lam = np.maximum(np.sort(eig), 1e-10)
    want = math.exp(-np.sum(lam * np.log(lam / lam.sum())))
    got = published.published_score(torch.from_numpy(q @ np.diag(eig) @ q.T))
    assert abs(got.item() - want) < 1e-10 * want


def test_defocus_is_the_rescaled_regression_residual():
    """With T^T T invertible, A* = D_T B D_X^{-1}, B = (T^T T)^{-1} T^T X (uncentred least squares),
    D = column norms; corrected = x - t A* on raw rows."""
    ref_images, ref_texts = _pairs(50, 4, seed=5)
    images, texts = _pairs(6, 4, seed=6)
    corrected, a_star = published.published_defocus(images, texts, ref_images, ref_texts, "cosine")
    t, x = ref_texts.numpy(), ref_images.numpy()
    b = np.linalg.solve(t.T @ t, t.T @ x)
    want_a = np.diag(np.linalg.norm(t, axis=0)) @ b @ np.diag(1 / np.linalg.norm(x, axis=0))
    np.testing.assert_allclose(a_star.numpy(), want_a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(corrected.numpy(), images.numpy() - texts.numpy() @ want_a, rtol=1e-9, atol=1e-12)


def test_gaussian_defocus_stays_in_the_fitted_feature_space():
    ref_images, ref_texts = _pairs(40, 3, seed=7)
    images, texts = _pairs(5, 3, seed=8)
    w = torch.randn(3, 4, dtype=torch.float64) / 2.0
    corrected, a_star = published.published_defocus(images, texts, ref_images, ref_texts, "gaussian", w)
    pt, px = _phi(ref_texts, w), _phi(ref_images, w)
    want_a = np.linalg.pinv(pt.T @ pt / 40 + 1e-12 * np.eye(8)) @ (pt.T @ px / 40)
    np.testing.assert_allclose(a_star.numpy(), want_a, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(corrected.numpy(), _phi(images, w) - _phi(texts, w) @ want_a, rtol=1e-10, atol=1e-12)
