"""Token medoids on a GPU: Triton (default) and the opt-in CUDA kernels against the reference, exact
indices on margin inputs. Runs in `make gpu-check`; skips elsewhere."""

import os

import pytest
import torch

import clipfast
from clipfast import backends
from clipfast.bench.token_medoids import margin_rows, video_like
from clipfast.reference.token_medoids import token_medoids_index_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs in make gpu-check)"),
]

GPU_BACKENDS = [b for b in os.environ.get("CLIPFAST_GPU_BACKENDS", "triton,cuda").split(",")
                if torch.cuda.is_available()
                and backends.refusal_reason("token_medoids", b, torch.device("cuda")) is None]


@pytest.mark.parametrize("split_size", [None, 16])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_margin_inputs_exact(backend, split_size):
    x, truth = margin_rows(32, 49)
    with clipfast.use_backend(backend):
        _, index, assignment = clipfast.token_medoids(x.cuda(), 49, split_size=split_size)
    want_index, want_assignment = token_medoids_index_reference(x.double(), 49, "euclidean", 100, split_size or 0)
    assert torch.equal(index.cpu(), truth) and torch.equal(index.cpu(), want_index)
    assert torch.equal(assignment.cpu(), want_assignment)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_video_like_objective_matches_cpu(backend):
    x = video_like(16, 12, 49, 3)
    _, cpu_index, _ = clipfast.token_medoids(x, 49, split_size=16)
    with clipfast.use_backend(backend):
        _, gpu_index, _ = clipfast.token_medoids(x.cuda(), 49, split_size=16)
    dist = torch.cdist(x.double(), x.double())
    def objective(index):
        return torch.gather(dist, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[1])).min(1).values.sum().item()
    assert abs(objective(gpu_index.cpu()) - objective(cpu_index)) <= 1e-5 * objective(cpu_index)
