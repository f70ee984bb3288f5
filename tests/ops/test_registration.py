"""torch.library.opcheck on every registered op of every clipfast op stem (clipfast:: and clipfast_C::),
with and without requires_grad, and a meta-test that no registered op lacks a case."""

import pytest
import torch

import clipfast  # noqa: F401  (registers the ops)
from clipfast import backends
from clipfast.testing import unit_features


def _features(n, m, d, requires_grad, dtype=torch.float32):
    a = unit_features(n, d, dtype=dtype, seed=1).requires_grad_(requires_grad)
    b = unit_features(m, d, dtype=dtype, seed=2).requires_grad_(requires_grad)
    return a, b


def _scalar(value, requires_grad, shape=()):
    return torch.full(shape, value, requires_grad=requires_grad)


def _public_cases(requires_grad):
    a, b = _features(12, 12, 8, requires_grad)
    q, k = _features(5, 12, 8, requires_grad)
    s, beta = _scalar(7.0, requires_grad), _scalar(-2.0, requires_grad, (1,))
    lse = torch.ops.clipfast.contrastive_loss(a, b, s, None, 0, True, 0.0)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8])  # multi-positive groups of the 12 pairs
    query_ids, key_ids = torch.tensor([7, 0, 9, 9, 2]), torch.arange(12)  # labels as ids
    teacher_a, teacher_b = _features(12, 12, 10, False)
    teacher_q, teacher_k = _features(5, 12, 10, False)
    t = _scalar(20.0, False)
    distill = torch.ops.clipfast.distill_loss(a.detach(), b.detach(), s.detach(), teacher_a, teacher_b, t, 0, True)
    return {
        "contrastive_loss": [
            (a, b, s, None, 0, True, 0.0),
            (a, b, s, beta, 0, True, 0.1),
            (q, k, s, None, 3, False, 0.0),
            (a, b, s, None, 0, True, 0.1, ids, ids),
            (q, k, s, None, 0, False, 0.0, query_ids, key_ids),
        ],
        "contrastive_loss_backward": [
            (torch.tensor(1.5), a.detach(), b.detach(), s.detach(), lse[1], lse[2], 0, True, 0.1),
            (torch.tensor(1.5), a.detach(), b.detach(), s.detach(), lse[1], lse[2], 0, True, 0.0, ids, ids),
        ],
        "siglip_loss": [
            (a, b, s, beta, 0, False),
            (q, k, s, beta, 3, False),
            (q, k, s, beta, 0, True),
            (a, b, s, beta, 0, False, ids, ids),
        ],
        "siglip_loss_backward": [
            (torch.tensor(0.5), a.detach(), b.detach(), s.detach(), beta.detach(), 0, False),
            (torch.tensor(0.5), a.detach(), b.detach(), s.detach(), beta.detach(), 0, False, ids, ids),
        ],
        "distill_loss": [
            (a, b, s, teacher_a, teacher_b, t, 0, True),
            (q, k, s, teacher_q, teacher_k, t, 3, False),
        ],
        "distill_loss_backward": [
            (torch.tensor(1.5), torch.tensor(0.5), a.detach(), b.detach(), s.detach(), *distill[2:], 0, True),
        ],
        **_schur_cases(requires_grad),
        **_keep_cases(requires_grad),
        **_merge_cases(requires_grad),
        # Indices only: the API always calls it on detached tokens (the gather carries the gradient).
        "token_medoids_index": [(torch.randn(3, 12, 8), 4, "euclidean", 100, 0),
                                (torch.randn(4, 9, 5), 3, "cosine", 5, 2)],
    }


def _schur_cases(requires_grad):
    x, t = _features(20, 20, 6, requires_grad)
    omegas = torch.randn(6, 5)
    grads = [torch.randn(6, 6) for _ in range(3)]
    rff_grads = [torch.randn(10, 10) for _ in range(3)]
    return {
        "schur_covariance_gram": [(x, t, "column_cosine", None), (x, t, "row_cosine", None), (x, t, "rff", omegas)],
        "schur_covariance_gram_backward": [(*grads, x.detach(), t.detach(), "row_cosine", None),
                                           (*rff_grads, x.detach(), t.detach(), "rff", omegas)],
    }


def _keep_cases(requires_grad):
    tokens = torch.randn(3, 1 + 12, 8, requires_grad=requires_grad)
    weights = torch.rand(3, 12, requires_grad=requires_grad)
    index = torch.tensor([[0, 3, 4, 9, 11], [1, 2, 5, 6, 7], [0, 1, 2, 3, 4]])
    return {
        # Indices only (not differentiable): the API calls it on detached scores.
        "token_keep_index": [(torch.randn(3, 12), 5, 0, 1), (torch.randn(2, 16), 8, 4, 2)],
        "token_keep_gather": [(tokens, index, None, 1), (tokens, index, weights, 1), (tokens, index, None, 0)],
        "token_keep_gather_backward": [(torch.randn(3, 7, 8), tokens.detach(), index, weights.detach(), 1),
                                       (torch.randn(3, 6, 8), tokens.detach(), index, None, 1)],
    }


def _merge_cases(requires_grad):
    from clipfast.reference.token_merge import token_merge_match_reference, token_merge_reduce_reference

    x = torch.randn(3, 13, 8, requires_grad=requires_grad)
    dest = token_merge_match_reference(torch.randn(3, 13, 4), 3, 1)  # 10 output rows
    size = 1.0 + torch.rand(3, 13)
    _, merged_size = token_merge_reduce_reference(x.detach(), dest, size, 10)
    return {
        # Indices only (not differentiable): the API calls it on a detached metric.
        "token_merge_match": [(torch.randn(3, 13, 4), 3, 1), (torch.randn(2, 8, 5), 2, 0), (torch.randn(2, 5, 3), 0, 1)],
        "token_merge_reduce": [(x, dest, None, 10), (x, dest, size, 10)],
        "token_merge_reduce_backward": [(torch.randn(3, 10, 8), dest, size, merged_size)],
    }


def _native_cases():
    a, b = _features(9, 13, 8, False)
    s, beta = torch.tensor(5.0), torch.tensor(-1.0)
    row, col = torch.ops.clipfast_C.contrastive_lse(a, b, s, True)
    return {
        "contrastive_lse": [(a, b, s, True), (a, b, s, False)],
        "contrastive_grad": [(a, b, s, row, col, 0.5, 0.25), (a, b, s, row, torch.empty(0), 1.0, 0.0),
                             (a, b, s, row, col, 0.5, 0.25, torch.randn(9, 5), torch.randn(13, 5))],
        "siglip_softplus": [(a, b, s, beta)],
        "siglip_grad": [(a, b, s, beta)],
        "schur_covariance_gram": [(a, a, "rff", torch.randn(8, 3)), (a, a, "column_cosine", None)],
        "schur_covariance_gram_backward": [(*(torch.randn(8, 8) for _ in range(3)), a, a, "row_cosine", None)],
        "token_medoids_index": [(torch.randn(3, 12, 8), 4, "euclidean", 100, 0)],
        **_keep_cases(False),
        **_merge_cases(False),
    }


PUBLIC_OPS = sorted(_public_cases(False))
NATIVE_OPS = sorted(name for names in backends.native_op_names().values() for name in names)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name", PUBLIC_OPS)
def test_opcheck_public_ops(name, requires_grad):
    op = getattr(torch.ops.clipfast, name)
    for args in _public_cases(requires_grad)[name]:
        torch.library.opcheck(op, args)


@pytest.mark.skipif(not backends.native_available(), reason=f"native library not loaded: {backends.native_load_error}")
@pytest.mark.parametrize("name", NATIVE_OPS)
def test_opcheck_native_ops(name):
    op = getattr(torch.ops.clipfast_C, name)
    for args in _native_cases()[name]:
        # The native ops have no autograd kernel (they are called inside clipfast ops): skip that sub-test.
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def _registered(namespace):
    ns = getattr(torch.ops, namespace)
    names = set()
    for qualified in torch._C._dispatch_get_all_op_names():
        if qualified.startswith(namespace + "::"):
            names.add(qualified.split("::", 1)[1].split(".", 1)[0])
    return names or set(dir(ns))


def test_every_registered_op_has_an_opcheck_case():
    assert _registered("clipfast") == set(PUBLIC_OPS)
    if backends.native_available():
        assert _registered("clipfast_C") == set(NATIVE_OPS)
