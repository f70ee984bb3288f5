"""The references are the spec: check them against the naive definitions, in float64."""

import math

import torch

from clipfast.reference import contrastive as ref


def _naive_ce(logits, labels, eps):
    n, c = logits.shape
    total = 0.0
    for i in range(n):
        lse = math.log(sum(math.exp(x) for x in logits[i].tolist()))
        target = [(1 - eps) * (j == labels[i]) + eps / c for j in range(c)]
        total += sum(t * (lse - x) for t, x in zip(target, logits[i].tolist()))
    return total / n


def _features(n, d, seed):
    return torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_clip_reference_matches_naive_definition():
    a, b = _features(6, 3, 0), _features(6, 3, 1)
    s, beta = torch.tensor(2.5, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    logits = s * a @ b.T + beta
    labels = list(range(6))
    for eps in (0.0, 0.2):
        want = (_naive_ce(logits, labels, eps) + _naive_ce(logits.T, labels, eps)) / 2
        got = ref.clip_loss_reference(a, b, s, beta, label_smoothing=eps)
        assert abs(got.item() - want) < 1e-12


def test_rectangular_reference_matches_naive_definition():
    q, k = _features(3, 4, 2), _features(7, 4, 3)
    s = torch.tensor(1.5, dtype=torch.float64)
    want = _naive_ce(s * q @ k.T, [2, 3, 4], 0.1)
    got = ref.clip_loss_reference(q, k, s, label_offset=2, symmetric=False, label_smoothing=0.1)
    assert abs(got.item() - want) < 1e-12


def test_siglip_reference_matches_naive_definition():
    a, b = _features(4, 3, 4), _features(6, 3, 5)
    s, beta = torch.tensor(3.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    logits = (s * a @ b.T + beta).tolist()
    for offset, negative_only in ((1, False), (0, True)):
        want = 0.0
        for i in range(4):
            for j in range(6):
                z = 1.0 if (j == i + offset and not negative_only) else -1.0
                want += math.log1p(math.exp(-z * logits[i][j]))
        got = ref.siglip_loss_reference(a, b, s, beta, label_offset=offset, negative_only=negative_only)
        assert abs(got.item() - want / 4) < 1e-12


def test_references_gradcheck():
    a, b = _features(5, 3, 6).requires_grad_(), _features(5, 3, 7).requires_grad_()
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: ref.clip_loss_reference(*x, label_smoothing=0.1), (a, b, s, beta))
    assert torch.autograd.gradcheck(ref.siglip_loss_reference, (a, b, s, beta))


def test_kernel_contract_references_agree_with_autograd():
    """The kernel-level references return exactly the pieces the op layer assembles."""
    x, y = _features(5, 3, 8), _features(7, 3, 9)
    s = torch.tensor(1.7, dtype=torch.float64)
    logits = s * x @ y.T
    row, col = ref.contrastive_lse_reference(x, y, s, True)
    torch.testing.assert_close(row, torch.logsumexp(logits, 1))
    torch.testing.assert_close(col, torch.logsumexp(logits, 0))
    gx, gy = ref.contrastive_grad_reference(x, y, s, row, col, 0.3, 0.6)
    g = 0.3 * torch.softmax(logits, 1) + 0.6 * torch.softmax(logits, 0)
    torch.testing.assert_close(gx, g @ y)
    torch.testing.assert_close(gy, g.T @ x)
