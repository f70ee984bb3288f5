"""torch.compile(fullgraph=True) over every loss and module, forward and backward: equal to eager,
zero graph breaks. aot_eager everywhere (fast); one Inductor smoke test per op."""

import pytest
import torch

import clipfast
from clipfast.testing import unit_features


def _inputs(n=24, d=16):
    image = unit_features(n, d, seed=3).requires_grad_()
    text = unit_features(n, d, seed=4).requires_grad_()
    log_scale = torch.tensor(2.5, requires_grad=True)
    bias = torch.tensor(-4.0, requires_grad=True)
    return image, text, log_scale, bias


FUNCTIONS = {
    "clip_loss": lambda i, t, ls, b: clipfast.clip_loss(i, t, ls.exp(), b, label_smoothing=0.1),
    "siglip_loss": lambda i, t, ls, b: clipfast.siglip_loss(i, t, ls.exp(), b),
    "contrastive_cross_entropy": lambda i, t, ls, b: clipfast.contrastive_cross_entropy(
        i[:8], t, ls.exp(), label_offset=8),
    "nn.ClipLoss": lambda i, t, ls, b: clipfast.nn.ClipLoss()(i, t, ls.exp(), output_dict=True)["contrastive_loss"],
    "nn.SigLipLoss": lambda i, t, ls, b: clipfast.nn.SigLipLoss()(i, t, ls.exp(), b),
    "nn.CoCaLoss": lambda i, t, ls, b: sum(clipfast.nn.CoCaLoss(2.0, 1.0)(
        i, t, _caption_logits(i, t), CAPTION_LABELS, ls.exp())),
}


# Caption logits (B, L, V) = (24, 2, 24) made from the features, so that gradients reach them through the
# caption term too; the last token of each caption is padding (id 0, ignored).
CAPTION_LABELS = torch.stack([torch.arange(24) % 7 + 1, torch.zeros(24, dtype=torch.long)], dim=1)


def _caption_logits(image, text):
    return torch.stack([image @ text.T, text @ image.T], dim=1)


def _run(fn, inputs):
    loss = fn(*inputs)
    return [loss.detach(), *torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)]


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_compiled_equals_eager_without_graph_breaks(name):
    fn = FUNCTIONS[name]
    inputs = _inputs()
    explanation = torch._dynamo.explain(fn)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for got, want in zip(_run(compiled, inputs), _run(fn, inputs)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["clip_loss", "siglip_loss"])
def test_inductor_smoke(name):
    fn = FUNCTIONS[name]
    inputs = _inputs()
    compiled = torch.compile(fn, fullgraph=True)
    for got, want in zip(_run(compiled, inputs), _run(fn, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
