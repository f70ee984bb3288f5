"""Token merging on a GPU: Triton (default) and the opt-in CUDA kernels against the reference run on the CPU,
through the registered ops. The matching exactly on metrics with a margin (ViT-B/16's 197 tokens with [CLS],
two prefix tokens, none, and a row long enough to need more than the default shared memory), fp32 and bf16;
the merged tokens, sizes and gradients to the fp32 tolerance, 16-bit results within one rounding. Runs in
`make gpu-check`; skips elsewhere."""

import os

import pytest
import torch

import clipfast
from clipfast import backends
from clipfast.reference.token_merge import (merge_count, token_merge_match_reference,
                                            token_merge_reduce_backward_reference, token_merge_reduce_reference)
from clipfast.testing.tome import margin_metric

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs in make gpu-check)"),
]

GPU_BACKENDS = [b for b in os.environ.get("CLIPFAST_GPU_BACKENDS", "triton,cuda").split(",")
                if torch.cuda.is_available()
                and backends.refusal_reason("token_merge", b, torch.device("cuda")) is None]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,num_prefix,r", [(197, 1, 16), (197, 2, 40), (50, 0, 7), (4097, 1, 300)])
def test_match_equals_reference(backend, dtype, n, num_prefix, r):
    metric = margin_metric(3, n, num_prefix=num_prefix, dtype=dtype)
    with clipfast.use_backend(backend):
        dest = torch.ops.clipfast.token_merge_match(metric.cuda(), r, num_prefix).cpu()
    assert torch.equal(dest, token_merge_match_reference(metric.double(), r, num_prefix))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_size", [False, True])
def test_reduce_and_backward_close_to_reference(backend, dtype, with_size):
    g = torch.Generator().manual_seed(3)
    n, dim, num_prefix, r = 197, 768, 1, 16
    x = torch.randn(4, n, dim, generator=g).to(dtype)
    dest = token_merge_match_reference(torch.randn(4, n, 64, generator=g, dtype=torch.float64), r, num_prefix)
    size = 1.0 + torch.randint(0, 4, (4, n), generator=g).float() if with_size else None
    num_out = n - merge_count(n, r, num_prefix)
    grad = torch.randn(4, num_out, dim, generator=g).to(dtype)
    want, want_size = token_merge_reduce_reference(x.double(), dest, None if size is None else size.double(), num_out)
    want_grad = token_merge_reduce_backward_reference(grad.double(), dest, None if size is None else size.double(),
                                                      want_size)
    with clipfast.use_backend(backend):
        cuda_size = None if size is None else size.cuda()
        merged, merged_size = torch.ops.clipfast.token_merge_reduce(x.cuda(), dest.cuda(), cuda_size, num_out)
        grad_x = torch.ops.clipfast.token_merge_reduce_backward(grad.cuda(), dest.cuda(), cuda_size, merged_size)
    rtol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(merged.cpu().double(), want, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(merged_size.cpu().double(), want_size, rtol=0, atol=0)
    torch.testing.assert_close(grad_x.cpu().double(), want_grad, rtol=rtol, atol=1e-6)
