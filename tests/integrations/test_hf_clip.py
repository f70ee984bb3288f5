"""patch_hf_clip on a tiny random transformers.CLIPModel (no download): same outputs and gradients as
the unpatched model, instance-only, reversible, and compilable without graph breaks."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from transformers.utils import ModelOutput  # noqa: E402

from clipfast.integrations import PatchHandle, patch_hf_clip  # noqa: E402
from clipfast.testing import assert_close_to_reference  # noqa: E402
from clipfast.integrations._handle import MARKER_ATTR  # noqa: E402

BATCH = 6
PAD, BOS, EOS = 0, 98, 99  # EOS != 2: the text tower pools at the first EOS, not at argmax(input_ids)


def _tiny_clip(seed=0):
    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = transformers.CLIPConfig(
        text_config=dict(tower, vocab_size=100, max_position_embeddings=16, pad_token_id=PAD,
                         bos_token_id=BOS, eos_token_id=EOS),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=16)
    return transformers.CLIPModel(config)


def _inputs(image_size=32):
    """Padded token sequences of different lengths (BOS ... EOS PAD...), their mask, random images."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 10, 5, 7, 10, 4])
    input_ids = torch.randint(1, BOS, (BATCH, 10), generator=g)
    input_ids[:, 0] = BOS
    input_ids[torch.arange(BATCH), lengths - 1] = EOS
    attention_mask = (torch.arange(10) < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD)
    pixel_values = torch.randn(BATCH, 3, image_size, image_size, generator=g)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)


@pytest.fixture
def model():
    return _tiny_clip()


def _leaves(out, path=""):
    """(path, tensor) pairs of a (nested) ModelOutput or tuple, in order."""
    if isinstance(out, ModelOutput):
        return [leaf for key, value in out.items() for leaf in _leaves(value, f"{path}.{key}")]
    if isinstance(out, tuple):
        return [leaf for i, value in enumerate(out) for leaf in _leaves(value, f"{path}[{i}]")]
    return [(path, out)]


def _assert_same_outputs(got, want, with_loss):
    """Same structure and field names; the loss within fp32 rounding, everything else bitwise."""
    assert type(got) is type(want)
    got_leaves, want_leaves = _leaves(got), _leaves(want)
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
    if with_loss:
        (_, got_loss), (_, want_loss) = got_leaves.pop(0), want_leaves.pop(0)
        assert got_loss.shape == want_loss.shape == () and got_loss.dtype == want_loss.dtype == torch.float32
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for (path, g), (_, w) in zip(got_leaves, want_leaves):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m: f"{path}: {m}")


def _loss_and_grads(model, **kwargs):
    out = model(**kwargs, return_loss=True)
    loss = out.loss if isinstance(out, ModelOutput) else out[0]
    params = [p for _, p in model.named_parameters()]
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


# Every way of calling CLIPModel.forward that changes what it returns or how it reads its arguments.
CALLS = {
    "default": lambda m, x: m(**x, return_loss=True),
    "positional": lambda m, x: m(x["input_ids"], x["pixel_values"], x["attention_mask"], None, True),
    "tuple": lambda m, x: m(**x, return_loss=True, return_dict=False),
    "attentions_hidden_states": lambda m, x: m(**x, return_loss=True, output_attentions=True,
                                               output_hidden_states=True),
    "interpolate_pos_encoding": lambda m, x: m(**_inputs(image_size=40), return_loss=True,
                                               interpolate_pos_encoding=True),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_outputs_match_unpatched(model, call):
    x = _inputs()
    want = CALLS[call](model, x)
    with patch_hf_clip(model):
        got = CALLS[call](model, x)
    _assert_same_outputs(got, want, with_loss=True)


def test_gradients_match_unpatched(model):
    x = _inputs()
    want_loss, want_grads = _loss_and_grads(model, **x)
    with patch_hf_clip(model):
        got_loss, got_grads = _loss_and_grads(model, **x)
    x64 = dict(x, pixel_values=x["pixel_values"].double())
    ref_loss, ref_grads = _loss_and_grads(_tiny_clip().double(), **x64)  # same seed: same weights, in float64
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert_close_to_reference(got_loss, ref_loss, torch.float32, "output", "loss")
    for (name, _), g, w, r in zip(model.named_parameters(), got_grads, want_grads, ref_grads):
        assert_close_to_reference(g, r, torch.float32, "grad", f"grad of {name}")
        # Against HF's fp32 gradients, atol scales with the gradient: the embedding rows of BOS/EOS sum
        # many positions (|grad| up to ~5), where both runs are ~2e-6 away from float64.
        atol = 1e-6 * max(1.0, w.abs().max().item())
        torch.testing.assert_close(g, w, rtol=1e-5, atol=atol, msg=lambda m: f"grad of {name}: {m}")
    names = [name for name, _ in model.named_parameters()]
    assert got_grads[names.index("logit_scale")] != 0  # the fused loss does reach logit_scale


@pytest.mark.parametrize("return_loss", [False, None], ids=["false", "omitted"])
def test_without_return_loss_outputs_are_unchanged(model, return_loss):
    x = _inputs()
    kwargs = {} if return_loss is None else {"return_loss": return_loss}
    want = model(**x, **kwargs)
    with patch_hf_clip(model):
        got = model(**x, **kwargs)
    assert got.loss is None
    _assert_same_outputs(got, want, with_loss=False)


def test_unpatch_restores_the_instance(model):
    x = _inputs()
    want = model(**x, return_loss=True)
    before = dict(vars(model))
    handle = patch_hf_clip(model)
    assert isinstance(handle, PatchHandle) and handle.active
    assert handle.attributes == [MARKER_ATTR, "_clipfast_original_forward", "forward"]
    assert "forward" in vars(model) and getattr(model, MARKER_ATTR) is handle
    handle.unpatch()
    assert not handle.active
    assert "forward" not in vars(model) and vars(model) == before
    assert model.forward.__func__ is transformers.CLIPModel.forward
    got = model(**x, return_loss=True)
    for (path, g), (_, w) in zip(_leaves(got), _leaves(want)):  # HF's own loss again: bitwise
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m: f"{path}: {m}")
    handle.unpatch()  # idempotent
    assert vars(model) == before


def test_unpatch_restores_an_instance_forward_that_was_there_before(model):
    """E.g. accelerate's device hooks set an instance forward: the patch wraps it and gives it back."""
    calls = []

    def hook_forward(*args, **kwargs):
        calls.append(kwargs.get("return_loss"))
        return type(model).forward(model, *args, **kwargs)

    model.forward = hook_forward
    x = _inputs()
    want = model(**x, return_loss=True)
    with patch_hf_clip(model):
        got = model(**x, return_loss=True)
    assert calls == [True, False]  # the patched forward went through the hook, asking for no HF loss
    _assert_same_outputs(got, want, with_loss=True)
    assert vars(model)["forward"] is hook_forward


def test_patching_twice_raises(model):
    handle = patch_hf_clip(model)
    with pytest.raises(RuntimeError, match="already patched by <PatchHandle clipfast.integrations.patch_hf_clip"):
        patch_hf_clip(model)
    handle.unpatch()
    patch_hf_clip(model).unpatch()  # patching again after unpatch is fine


def test_other_instances_and_the_class_are_untouched(model):
    other = _tiny_clip(seed=1)
    x = _inputs()
    other_want = other(**x, return_loss=True)
    class_forward = transformers.CLIPModel.forward
    with patch_hf_clip(model):
        assert transformers.CLIPModel.forward is class_forward
        assert "forward" not in vars(other) and MARKER_ATTR not in vars(other)
        other_got = other(**x, return_loss=True)
        _assert_same_outputs(other_got, other_want, with_loss=False)  # bitwise, loss included: HF's path
        patch_hf_clip(other).unpatch()  # the other instance can be patched independently


def test_deepcopy_of_a_patched_model_uses_its_own_weights(model):
    """EMA-style copies: the copied forward must be bound to the copy, not to the original."""
    x = _inputs()
    with patch_hf_clip(model):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin.logit_scale.add_(1.0)
        got = twin(**x, return_loss=True)
        getattr(twin, MARKER_ATTR).unpatch()
        want = twin(**x, return_loss=True)
    _assert_same_outputs(got, want, with_loss=True)
    assert "forward" not in vars(twin)


def test_unpatch_refuses_to_discard_a_later_replacement(model):
    handle = patch_hf_clip(model)
    patched = model.forward
    model.forward = lambda *a, **k: patched(*a, **k)
    with pytest.raises(RuntimeError, match="CLIPModel.forward was replaced after"):
        handle.unpatch()
    assert handle.active
    model.forward = patched
    handle.unpatch()
    assert "forward" not in vars(model)


def test_handle_sets_plain_instance_attributes_only(model):
    """Registered parameters/submodules live outside __dict__: the handle could not restore them exactly."""
    with patch_hf_clip(model) as handle:
        with pytest.raises(TypeError, match="CLIPModel.logit_scale is .* registered parameter"):
            handle.set(model, "logit_scale", torch.nn.Parameter(torch.zeros(())))
        with pytest.raises(TypeError, match="CLIPModel.text_model is .* submodule"):
            handle.set(model, "text_model", torch.nn.Identity())
    with pytest.raises(RuntimeError, match="already unpatched"):
        handle.set(model, "forward", None)
    assert "forward" not in vars(model)


@pytest.mark.parametrize("not_clip", [
    torch.nn.Linear(2, 2),
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=10)),
], ids=["linear", "clip_text_model"])
def test_non_clip_model_raises_type_error(not_clip):
    with pytest.raises(TypeError, match=rf"expects a transformers\.CLIPModel .*found .*{type(not_clip).__name__}"):
        patch_hf_clip(not_clip)
    assert "forward" not in vars(not_clip) and MARKER_ATTR not in vars(not_clip)


def test_context_manager_unpatches_on_error(model):
    with pytest.raises(ValueError, match="boom"):
        with patch_hf_clip(model) as handle:
            assert getattr(model, MARKER_ATTR) is handle
            raise ValueError("boom")
    assert not handle.active and "forward" not in vars(model) and MARKER_ATTR not in vars(model)


def test_compiled_patched_model_equals_eager_without_graph_breaks(model):
    """Forward under torch.compile(fullgraph=True), backward through the compiled graph, vs eager."""
    x = _inputs()
    params = [p for _, p in model.named_parameters()]

    def loss_fn(input_ids, attention_mask, pixel_values):
        return model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                     return_loss=True).loss

    def run(fn):
        loss = fn(**x)
        return [loss.detach(), *torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)]

    with patch_hf_clip(model):
        explanation = torch._dynamo.explain(loss_fn)(**x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        targets = {str(node.target) for graph in explanation.graphs for node in graph.graph.nodes}
        assert "clipfast.contrastive_loss.default" in targets  # the fused op, not HF's cross-entropy
        assert not any("cross_entropy" in target for target in targets), targets
        torch._dynamo.reset()
        got = run(torch.compile(loss_fn, backend="aot_eager", fullgraph=True))
        want = run(loss_fn)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
