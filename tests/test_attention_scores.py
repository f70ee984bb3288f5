"""[CLS]-attention scores (A-CLIP): the one-row kernel against the materialised softmax, and the hooked
single forward of open_clip / timm / transformers towers against plain re-implementations that keep
every layer's full attention map; hooks leave no trace, also on errors."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from clipfast import TokenRemoval
from clipfast.attention_scores import attention_scores, cls_attention_scores
from clipfast.integrations import vision_blocks
from clipfast.integrations._handle import MARKER_ATTR
from clipfast.testing import assert_close_to_reference

IMAGES = 3  # batch of every tower test


def _images(channels=3, size=32):
    return torch.randn(IMAGES, channels, size, size, generator=torch.Generator().manual_seed(1))


def _materialised(q, k, scale, prefix):
    """softmax(q k^T * scale)[:, :, 0, P:].mean(1) in float64, the full N x N map included."""
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, dim=-1)
    return probs[:, :, 0, prefix:].mean(1), probs[:, :, 0, :prefix].mean(1).sum(-1)


def _layer_mean_score(maps, prefix):
    """A-CLIP's definition: stack [L, B, H, N, N], mean over layers, row 0 from column P, mean over heads."""
    return torch.stack(maps).mean(0)[:, :, 0, prefix:].mean(1)


# ---------------------------------------------------------------------------------------------------
# cls_attention_scores


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix", [1, 3])
def test_cls_scores_equal_the_materialised_softmax(dtype, prefix):
    q, k = (4 * torch.randn(3, 4, 17, 8, dtype=torch.float64).to(dtype) for _ in range(2))
    for scale in (None, 0.3):
        got = cls_attention_scores(q, k, scale=scale, num_prefix_tokens=prefix)
        want, prefix_mass = _materialised(q, k, 8 ** -0.5 if scale is None else scale, prefix)
        assert got.shape == (3, 17 - prefix)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        # bfloat16 inputs are upcast before any arithmetic: the float32 tolerance applies to their values.
        assert_close_to_reference(got, want, torch.float64 if dtype == torch.float64 else torch.float32)
        assert (got >= 0).all()
        assert_close_to_reference(got.double().sum(-1) + prefix_mass, torch.ones(3, dtype=torch.float64),
                                  torch.float32, name="row sum + prefix mass")


def test_cls_scores_compute_only_the_cls_row():
    b, h, n, dh = 2, 3, 257, 16
    q, k = torch.randn(b, h, n, dh), torch.randn(b, h, n, dh)
    with FlopCounterMode(display=False) as counter:
        cls_attention_scores(q, k)
    assert counter.get_total_flops() == 2 * b * h * n * dh  # one (1 x Dh) @ (Dh x N) per head, no N x N


def test_cls_scores_refuse_autograd_but_run_under_no_grad():
    q, k = torch.randn(2, 2, 5, 4, requires_grad=True), torch.randn(2, 2, 5, 4)
    with pytest.raises(RuntimeError, match="no backward"):
        cls_attention_scores(q, k)
    with torch.no_grad():
        assert not cls_attention_scores(q, k).requires_grad
    assert cls_attention_scores(q.detach(), k).shape == (2, 4)


@pytest.mark.parametrize("q_shape, k_shape, kwargs, match", [
    ((2, 2, 5), (2, 2, 5), {}, "same shape"),
    ((2, 2, 5, 4), (2, 2, 6, 4), {}, "same shape"),
    ((2, 2, 5, 4), (2, 2, 5, 4), {"num_prefix_tokens": 0}, r"\[1, 5\)"),
    ((2, 2, 5, 4), (2, 2, 5, 4), {"num_prefix_tokens": 5}, r"\[1, 5\)"),
    ((2, 2, 5, 4), (2, 2, 5, 4), {"num_prefix_tokens": True}, r"\[1, 5\)"),
    ((2, 2, 5, 4), (2, 2, 5, 4), {"num_prefix_tokens": 1.0}, r"\[1, 5\)"),
])
def test_cls_scores_reject_bad_inputs(q_shape, k_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls_attention_scores(torch.randn(q_shape), torch.randn(k_shape), **kwargs)


def test_cls_scores_reject_integer_inputs():
    with pytest.raises(ValueError, match="floating point"):
        cls_attention_scores(torch.ones(1, 1, 3, 2, dtype=torch.long), torch.ones(1, 1, 3, 2, dtype=torch.long))


def test_cls_scores_compile_fullgraph():
    q, k = torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    compiled = torch.compile(lambda q, k: cls_attention_scores(q, k, scale=0.5, num_prefix_tokens=2),
                             backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k), cls_attention_scores(q, k, scale=0.5, num_prefix_tokens=2),
                               rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# Plain re-implementations of each tower's forward that keep every layer's full [B, H, N, N] map.


def _explicit_attention(q, k, v, scale):
    """(output (B, N, H*Dh), map (B, H, N, N)) for q, k, v (B, H, N, Dh)."""
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    out = probs @ v
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1), probs


def _split_heads(x, heads):
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def open_clip_reference(visual, images):
    """(pooled features, scores) of an open_clip VisionTransformer (token pooling, no patch dropout)."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x)
    maps = []
    for block in visual.transformer.resblocks:
        attn = block.attn
        q, k, v = (_split_heads(t, attn.num_heads)
                   for t in F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1))
        if not isinstance(attn, nn.MultiheadAttention):  # open_clip's Attention: optional qk-norm
            q, k = attn.ln_q(q), attn.ln_k(k)
        out, probs = _explicit_attention(q, k, v, q.shape[-1] ** -0.5)
        maps.append(probs)
        out = attn.out_proj(out)
        if hasattr(block, "ln_attn"):
            out = block.ln_attn(out)
        x = x + block.ls_1(out)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return visual.ln_post(x)[:, 0] @ visual.proj, _layer_mean_score(maps, 1)


def timm_reference(model, images):
    """(forward_features output, scores) of a timm VisionTransformer with standard blocks."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    maps = []
    for block in model.blocks:
        attn = block.attn
        qkv = attn.qkv(block.norm1(x)).reshape(x.shape[0], x.shape[1], 3, attn.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out, probs = _explicit_attention(attn.q_norm(q), attn.k_norm(k), v, attn.scale)
        maps.append(probs)
        x = x + block.ls1(attn.proj(attn.norm(out)))
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.norm(x), _layer_mean_score(maps, model.num_prefix_tokens)


def hf_reference(tower, images):
    """(last_hidden_state, scores) of a transformers CLIPVisionModel (5.x layout)."""
    x = tower.pre_layrnorm(tower.embeddings(images))
    maps = []
    for layer in tower.encoder.layers:
        attn = layer.self_attn
        h = layer.layer_norm1(x)
        q, k, v = (_split_heads(proj(h), attn.num_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        out, probs = _explicit_attention(q, k, v, attn.scale)
        maps.append(probs)
        x = x + attn.out_proj(out)
        x = x + layer.mlp(layer.layer_norm2(x))
    return x, _layer_mean_score(maps, 1)


# ---------------------------------------------------------------------------------------------------
# Towers


def _open_clip_tower(**options):
    transformer = pytest.importorskip("open_clip.transformer", reason="open-clip-torch is not installed")
    return transformer.VisionTransformer(image_size=32, patch_size=8, width=64, layers=3, heads=4, mlp_ratio=2.0,
                                         output_dim=16, **options).eval()


def _timm_tower(**options):
    vit = pytest.importorskip("timm.models.vision_transformer", reason="timm is not installed")
    return vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, **options).eval()


def _hf_config():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
    return transformers, dict(tower, image_size=32, patch_size=8)


def _hf_tower():
    transformers, config = _hf_config()
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**config)).eval()


def _hf_clip_model():
    transformers, config = _hf_config()
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
                max_position_embeddings=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=config,
                                                          projection_dim=16)).eval()


def _open_clip_model():
    open_clip = pytest.importorskip("open_clip", reason="open-clip-torch is not installed")
    vision = dict(image_size=32, patch_size=8, width=64, layers=3, head_width=16, mlp_ratio=2.0)
    text = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


def _build(name):
    """(model given to attention_scores, the tower inside it, the tower's reference)."""
    if name == "open_clip":
        model = _open_clip_tower()
        return model, model, open_clip_reference
    if name == "open_clip_attention":  # open_clip's own Attention class without qk-norm: keys never formed
        model = _open_clip_tower(block_type="custom")
        return model, model, open_clip_reference
    if name == "open_clip_qk_norm":  # open_clip's own Attention class (custom blocks)
        model = _open_clip_tower(qk_norm=True, ls_init_value=0.5)
        return model, model, open_clip_reference
    if name == "open_clip_model":
        model = _open_clip_model()
        return model, model.visual, open_clip_reference
    if name == "timm":
        model = _timm_tower()
        return model, model, timm_reference
    if name == "timm_registers_qk_norm":
        model = _timm_tower(reg_tokens=2, qk_norm=True, init_values=0.3)
        return model, model, timm_reference
    if name == "hf_vision_model":
        model = _hf_tower()
        return model, model, hf_reference
    model = _hf_clip_model()
    return model, model.vision_model, hf_reference


TOWERS = ["open_clip", "open_clip_attention", "open_clip_qk_norm", "open_clip_model", "timm", "timm_registers_qk_norm",
          "hf_vision_model", "hf_clip_model"]


@pytest.fixture(params=TOWERS)
def tower_case(request):
    torch.manual_seed(0)
    model, tower, reference = _build(request.param)
    # Default inits give near-uniform attention (timm's varies by < 1 % across patches), which would
    # hide a wrong scale or prefix; larger matrices make the [CLS] rows peaked and distinct, and
    # nonzero biases (open_clip starts them at 0) make a dropped bias visible.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2 or name.endswith("bias"):
                parameter.normal_(0, 0.2)
    return model, tower, reference


def _tensors(out):
    """The tensors of a tower's output: a tensor, or a transformers ModelOutput."""
    return [out] if torch.is_tensor(out) else [v for v in out.values() if torch.is_tensor(v)]


def _hook_counts(module):
    return {name: tuple(len(getattr(m, attr)) for attr in ("_forward_hooks", "_forward_pre_hooks",
                                                            "_forward_hooks_with_kwargs",
                                                            "_forward_pre_hooks_with_kwargs"))
            for name, m in module.named_modules()}


def test_scores_equal_the_all_maps_definition(tower_case):
    model, tower, reference = tower_case
    images = _images()
    with torch.no_grad():
        want_hidden, want = reference(tower, images)
        # The reference is the tower's own forward written out: check it computes the same features.
        hidden = tower.forward_features(images) if reference is timm_reference else tower(images)
        hidden = hidden if torch.is_tensor(hidden) else hidden.last_hidden_state
        torch.testing.assert_close(want_hidden, hidden, rtol=1e-4, atol=1e-5)
    got = attention_scores(model, images)
    assert got.dtype == torch.float32 and got.shape == want.shape == (IMAGES, 16)
    assert_close_to_reference(got, want, torch.float32)


def test_outputs_unchanged_and_hooks_removed(tower_case):
    model, tower, _ = tower_case
    images = _images()
    seen = []
    probe = tower.register_forward_hook(lambda module, args, out: seen.append(out))
    before = _hook_counts(model)
    attention_scores(model, images)
    assert _hook_counts(model) == before
    probe.remove()
    with torch.no_grad():
        want = tower(images)
    assert len(seen) == 1 and len(_tensors(seen[0])) == len(_tensors(want))
    for got, expected in zip(_tensors(seen[0]), _tensors(want)):
        assert torch.equal(got, expected)
    assert not tower.training


def test_hooks_removed_after_errors(tower_case):
    model, tower, _ = tower_case
    before = _hook_counts(model)
    with pytest.raises(RuntimeError):
        attention_scores(model, _images(channels=5))  # the patch embedding fails before any block
    assert _hook_counts(model) == before

    blocks = [m for name, m in tower.named_modules() if name.endswith(("resblocks.1", "blocks.1", "layers.1"))]

    class Boom(Exception):
        pass

    def boom(module, args):
        raise Boom

    failing = blocks[0].register_forward_pre_hook(boom)
    before = _hook_counts(model)
    with pytest.raises(Boom):  # mid-forward, after block 0's hooks ran
        attention_scores(model, _images())
    assert _hook_counts(model) == before
    failing.remove()


def test_training_flag_kept_and_gradients_off():
    model = _timm_tower(qkv_bias=True).train()
    images = _images()
    scores = attention_scores(model, images)
    assert model.training and all(m.training for m in model.modules())
    assert not scores.requires_grad
    # No dropout or stochastic depth configured: training mode computes the same scores.
    torch.testing.assert_close(scores, attention_scores(model.eval(), images), rtol=0, atol=0)


def test_float64_tower_gives_float32_scores():
    model = _open_clip_tower().double()
    images = _images().double()
    with torch.no_grad():
        _, want = open_clip_reference(model, images)
    got = attention_scores(model, images)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# Unsupported towers


def test_unsupported_modules_raise_type_error():
    with pytest.raises(TypeError, match="matches none"):
        attention_scores(nn.Linear(4, 4), _images())
    with pytest.raises(TypeError, match="vision tower module"):
        attention_scores(torch.randn(2, 2), _images())


def test_towers_without_class_token_raise():
    with pytest.raises(TypeError, match="no class token"):
        attention_scores(_timm_tower(class_token=False, global_pool="avg"), _images())
    transformers, config = _hf_config()
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**config))
    with pytest.raises(TypeError, match="Siglip.* has no class token"):
        attention_scores(siglip, _images())


def test_unsupported_attention_variants_raise_and_leave_no_hooks():
    diff = _timm_tower(attn_layer="diff")
    with pytest.raises(TypeError, match="fused qkv"):
        attention_scores(diff, _images())

    model = _timm_tower()
    model.blocks[2].attn = nn.Identity()  # blocks 0 and 1 were hooked before block 2 failed
    before = _hook_counts(model)
    with pytest.raises(TypeError, match=r"blocks\[2\]\.attn \(Identity\)"):
        attention_scores(model, _images())
    assert _hook_counts(model) == before

    with pytest.raises(TypeError, match="scaled-cosine"):
        attention_scores(_open_clip_tower(scaled_cosine_attn=True), _images())


def test_active_patch_dropout_raises():
    model = _open_clip_tower(patch_dropout=0.5).train()
    with pytest.raises(ValueError, match="random subset"):
        attention_scores(model, _images())
    assert attention_scores(model.eval(), _images()).shape == (IMAGES, 16)


def test_repeated_blocks_raise():
    model = _timm_tower()
    model.blocks[1] = model.blocks[0]  # one module run twice: the hooks see more layers than blocks
    with pytest.raises(RuntimeError, match="ran 5 attention layers, expected one per block"):
        attention_scores(model, _images())


# ---------------------------------------------------------------------------------------------------
# One description per framework's blocks (clipfast.integrations.vision_blocks): the score hooks and EViT
# token removal (TokenRemoval.self_attention) accept, and refuse with the same TypeError, the same blocks.


def _with_block_attention(model, blocks_of, attention_name, attention):
    setattr(blocks_of(model)[1], attention_name, attention)
    return model


def _open_clip_with_timm_block():
    model = _open_clip_tower()
    model.transformer.resblocks[1] = _timm_tower().blocks[1]
    return model


def _hf_image_features(model, images):
    out = model.get_image_features(pixel_values=images)
    return out if torch.is_tensor(out) else out.pooler_output


def _open_clip_blocks(model):
    return model.transformer.resblocks


def _hf_layers(model):
    return model.vision_model.encoder.layers


def _patches():
    """(patch function, forward, blocks) per framework; the patch functions need the frameworks installed."""
    from clipfast import patch_hf_clip, patch_open_clip, patch_timm_vit

    return {"open_clip": (patch_open_clip, lambda m, x: m(x), _open_clip_blocks),
            "timm": (patch_timm_vit, lambda m, x: m(x), lambda m: m.blocks),
            "transformers": (patch_hf_clip, _hf_image_features, _hf_layers)}


# name: (framework, model builder, a regex for the TypeError's "where: why" of a refused model, or None)
SAME_BLOCK_CASES = {
    "open_clip MultiheadAttention": ("open_clip", _open_clip_tower, None),
    "open_clip Attention": ("open_clip", lambda: _open_clip_tower(block_type="custom"), None),
    "open_clip Attention with every option": (
        "open_clip", lambda: _open_clip_tower(qk_norm=True, scale_heads=True, scale_attn_inner=True, scale_attn=True,
                                              scale_fc=True, ls_init_value=0.5), None),
    "open_clip scaled-cosine Attention": ("open_clip", lambda: _open_clip_tower(scaled_cosine_attn=True),
                                          r"transformer\.resblocks\[0\]\.attn \(Attention\): scaled-cosine"),
    "open_clip added key tokens": (
        "open_clip", lambda: _with_block_attention(_open_clip_tower(), _open_clip_blocks, "attn",
                                                   nn.MultiheadAttention(64, 4, batch_first=True, add_bias_kv=True)),
        r"transformer\.resblocks\[1\]\.attn \(MultiheadAttention\): it adds key tokens"),
    "open_clip separate projections": (
        "open_clip", lambda: _with_block_attention(_open_clip_tower(), _open_clip_blocks, "attn",
                                                   nn.MultiheadAttention(64, 4, batch_first=True, kdim=16, vdim=16)),
        r"transformer\.resblocks\[1\]\.attn \(MultiheadAttention\): it has no packed in_proj_weight"),
    "open_clip foreign block": ("open_clip", _open_clip_with_timm_block,
                                r"transformer\.resblocks\[1\] \(Block\): expected open_clip's"),
    "timm Attention": ("timm", lambda: _timm_tower(qk_norm=True, init_values=0.5, reg_tokens=1), None),
    "timm DiffAttention": ("timm", lambda: _timm_tower(attn_layer="diff"), r"blocks\[0\]\.attn \(DiffAttention\)"),
    "timm ResPostBlock": (
        "timm", lambda: _timm_tower(block_fn=pytest.importorskip("timm.models.vision_transformer").ResPostBlock),
        r"blocks\[0\] \(ResPostBlock\): expected timm's Block"),
    "transformers CLIPAttention": ("transformers", _hf_clip_model, None),
    "transformers foreign attention": (
        "transformers", lambda: _with_block_attention(_hf_clip_model(), _hf_layers, "self_attn", nn.Identity()),
        r"encoder\.layers\[1\]\.self_attn \(Identity\)"),
}


def _type_error(fn):
    """The message of the TypeError ``fn()`` raises, or None when it returns."""
    try:
        fn()
    except TypeError as error:
        return str(error)
    return None


@pytest.mark.parametrize("case", list(SAME_BLOCK_CASES))
def test_scores_and_evit_accept_and_refuse_the_same_blocks(case):
    framework, build, refused_at = SAME_BLOCK_CASES[case]
    model, images = build(), _images()
    patch, forward, blocks_of = _patches()[framework]
    evit_everywhere = TokenRemoval.self_attention(1.0, blocks=tuple(range(len(blocks_of(model)))))

    scores_error = _type_error(lambda: attention_scores(model, images))
    patch_error = _type_error(lambda: patch(model, token_removal=evit_everywhere).unpatch())
    assert scores_error == patch_error  # one block description: the same verdict, in the same words

    if refused_at is None:
        assert attention_scores(model, images).shape == (IMAGES, 16)
        with torch.no_grad():
            want = forward(model, images)
            with patch(model, token_removal=evit_everywhere):  # every token kept: the model's own output
                got = forward(model, images)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    else:
        assert scores_error is not None and re.search(refused_at, scores_error), scores_error
        assert scores_error.startswith("clipfast's [CLS]-attention scores, EViT token removal and token merging do not support ")
    # Neither path leaves anything behind, whether it accepted the model or not.
    assert not any(MARKER_ATTR in vars(m) or "forward" in vars(m) for m in model.modules())


def test_each_framework_has_one_tower_description():
    """attention_scores' find_tower and each patch's own framework function describe a tower the same way."""
    towers = {"open_clip": (_open_clip_model(), vision_blocks.open_clip_tower),
              "timm": (_timm_tower(reg_tokens=2), vision_blocks.timm_tower),
              "transformers": (_hf_clip_model(), vision_blocks.hf_tower)}
    for framework, (model, describe) in towers.items():
        tower, found = describe(model), vision_blocks.find_tower(model)
        assert (found.module, found.blocks, found.describe_block) == (tower.module, tower.blocks, tower.describe_block)
        assert tower.framework == framework and tower.grid == (4, 4) and len(tower.blocks) == 3
        assert tower.has_class_token and tower.num_prefix_tokens == (3 if framework == "timm" else 1)
        assert all(other(model) is None for name, (_, other) in towers.items() if name != framework)
    assert vision_blocks.find_tower(nn.Linear(2, 2)) is None


@pytest.mark.parametrize("name", ["open_clip", "open_clip_qk_norm", "timm_registers_qk_norm", "hf_vision_model"])
def test_block_halves_and_watched_cls_row_agree(name):
    """A block description's two halves are the block's own forward, and the [CLS] row its hooks report during
    that forward is cls_attention_scores of the q, k its attention half returns."""
    torch.manual_seed(0)
    _, tower_module, _ = _build(name)
    tower = vision_blocks.find_tower(tower_module)
    block, description = tower.blocks[1], tower.block(1)
    x = torch.randn(IMAGES, tower.num_prefix_tokens + 16, 64 if tower.framework != "transformers" else 32)
    rows = []
    handles = description.watch_cls_row(rows.append)
    with torch.no_grad():
        want = block(x) if tower.framework != "transformers" else block(x, None)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        after_attention, q, k = description.attention(x)
        got = description.mlp(after_attention)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert len(rows) == 1
    assert_close_to_reference(rows[0][:, 1:], _materialised(q, k, description.scale, 1)[0], torch.float32)
