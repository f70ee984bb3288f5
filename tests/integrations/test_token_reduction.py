"""Token reduction patched into real towers (open_clip, timm, transformers), against plain-PyTorch
implementations of the same procedures that use the models' own (unfused) attention maps:

- given scores (A-CLIP): the tokens after the positional embedding, top-K by the given scores (A-CLIP's
  block rule through bilinear 2x downsampling in block mode), gathered in order after [CLS];
- self attention (EViT): explicit softmax maps, [CLS] row averaged over heads, top-K, EViT's fused token;
- medoids (CenterCLIP): the reference k-medoids of each segment before the chosen block;
- merging (ToMe): explicit softmax with log(size) on the keys, and the port of ToMe's matching and merge
  (:mod:`clipfast.testing.tome`) on the head-mean keys, block by block with ToMe's schedules.

With everything kept the patched towers equal the unpatched ones; the patches are instance-only and
reversible, and compile with ``fullgraph=True``.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clipfast
from clipfast import TokenMedoids, TokenMerging, TokenRemoval
from clipfast.reference.token_medoids import token_medoids_index_reference
from clipfast.testing import tome
from clipfast.testing.tome import parse_r

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

GRID, PATCH, WIDTH, DEPTH, HEADS = 4, 8, 64, 4, 4
PATCHES = GRID * GRID


def _open_clip_visual():
    torch.manual_seed(0)
    return open_clip.transformer.VisionTransformer(image_size=GRID * PATCH, patch_size=PATCH, width=WIDTH,
                                                   layers=DEPTH, heads=HEADS, mlp_ratio=4.0, output_dim=32).eval()


def _open_clip_attention_visual():
    """open_clip's CustomResidualAttentionBlock / Attention with every option EViT must respect."""
    torch.manual_seed(0)
    visual = open_clip.transformer.VisionTransformer(
        image_size=GRID * PATCH, patch_size=PATCH, width=WIDTH, layers=DEPTH, heads=HEADS, mlp_ratio=4.0,
        output_dim=32, ls_init_value=0.5, qk_norm=True, scale_heads=True, scale_attn_inner=True, scale_attn=True,
        scale_fc=True).eval()
    with torch.no_grad():
        for block in visual.transformer.resblocks:
            block.attn.head_scale.uniform_(0.5, 1.5)  # starts at ones, which would hide a dropped head scale
    return visual


def _timm_vit():
    torch.manual_seed(0)
    # LayerScale and q/k norms on, so that the patched blocks must respect them.
    return timm.models.vision_transformer.VisionTransformer(
        img_size=GRID * PATCH, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=0,
        init_values=0.5, qk_norm=True).eval()


def _hf_clip(attn_implementation="sdpa"):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=99, max_position_embeddings=16),
        vision_config=dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=DEPTH,
                           num_attention_heads=HEADS, image_size=GRID * PATCH, patch_size=PATCH),
        projection_dim=32)
    config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    return transformers.CLIPModel(config).eval()


def _images(batch=3, seed=1):
    return torch.randn(batch, 3, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(seed))


def _scores(batch=3, seed=2):
    return torch.rand(batch, PATCHES, generator=torch.Generator().manual_seed(seed))


def _plain_keep(tokens, scores, num_keep, prefix=1):
    index = torch.topk(scores, num_keep, dim=1).indices.sort(dim=1).values
    patches = tokens[:, prefix:]
    kept = torch.gather(patches, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :prefix], kept], dim=1), index


def _aclip_block_index(scores, grid, keep_ratio=0.5):
    """A-CLIP's get_att_mask: bilinear 2x downsampling (the 2x2 block mean), the int(n*r)+1 best blocks,
    expanded to their patches."""
    blocks = F.interpolate(scores.reshape(-1, 1, grid, grid), scale_factor=0.5, mode="bilinear",
                           align_corners=False).flatten(1)
    count = int(blocks.shape[1] * keep_ratio) + 1
    best = torch.argsort(blocks, dim=1, descending=True)[:, :count]
    mask = torch.zeros_like(blocks).scatter_(1, best, 1.0).reshape(-1, 1, grid // 2, grid // 2)
    mask = F.interpolate(mask, scale_factor=2, mode="nearest").flatten(1)
    return torch.nonzero(mask)[:, 1].reshape(scores.shape[0], -1)


def _hook_output(module, fn):
    return module.register_forward_hook(lambda m, i, out: fn(out))


# ---------------------------------------------------------------------------------------------- given scores

GIVEN_TOWERS = {
    "open_clip": (_open_clip_visual, lambda m: m.patch_dropout, lambda m, x: m(x), clipfast.patch_open_clip),
    "timm": (_timm_vit, lambda m: m.patch_drop, lambda m, x: m(x), clipfast.patch_timm_vit),
    "hf": (_hf_clip, lambda m: m.vision_model.embeddings, lambda m, x: m.get_image_features(pixel_values=x),
           clipfast.patch_hf_clip),
}


def _image_output(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("tower", list(GIVEN_TOWERS))
def test_given_scores_equal_plain_topk_gather(tower):
    build, slot, run, patch = GIVEN_TOWERS[tower]
    model, images, scores = build(), _images(), _scores()
    hook = _hook_output(slot(model), lambda out: _plain_keep(out, scores, 6)[0])
    want = _image_output(run(model, images))
    hook.remove()
    handle = patch(model, token_removal=TokenRemoval.given_scores(6))
    with handle.keep_scores(scores):
        got = _image_output(run(model, images))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    handle.unpatch()


@pytest.mark.parametrize("tower", list(GIVEN_TOWERS))
def test_given_scores_block_mode_is_aclip_selection(tower):
    build, slot, run, patch = GIVEN_TOWERS[tower]
    model, images, scores = build(), _images(), _scores()
    index = _aclip_block_index(scores, GRID)
    assert index.shape[1] == 12  # int(4 * 0.5) + 1 = 3 of 4 blocks

    def plain(out):
        kept = torch.gather(out[:, 1:], 1, index.unsqueeze(-1).expand(-1, -1, out.shape[-1]))
        return torch.cat([out[:, :1], kept], dim=1)

    hook = _hook_output(slot(model), plain)
    want = _image_output(run(model, images))
    hook.remove()
    with patch(model, token_removal=TokenRemoval.given_scores(0.5, block=2)) as handle:
        with handle.keep_scores(scores):
            got = _image_output(run(model, images))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tower", list(GIVEN_TOWERS))
def test_given_scores_keeping_everything_or_no_scores_changes_nothing(tower):
    build, _, run, patch = GIVEN_TOWERS[tower]
    model, images = build(), _images()
    want = _image_output(run(model, images))
    with patch(model, token_removal=TokenRemoval.given_scores(PATCHES)) as handle:
        torch.testing.assert_close(_image_output(run(model, images)), want, rtol=0, atol=0)
        with handle.keep_scores(_scores()):
            torch.testing.assert_close(_image_output(run(model, images)), want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- EViT


def _evit_plain_reduce(x, attn_map, keep_ratio, fuse):
    """EViT between attention and MLP from an explicit (B, N, N) head-averaged map (or (B, H, N, N))."""
    if attn_map.dim() == 4:
        attn_map = attn_map.mean(1)
    scores = attn_map[:, 0, 1:]
    num_keep = math.ceil(keep_ratio * scores.shape[1])
    kept, index = _plain_keep(x, scores, num_keep)
    if not fuse:
        return kept
    dropped = torch.ones_like(scores, dtype=torch.bool).scatter_(1, index, False)
    fused = (scores * dropped).unsqueeze(-1).mul(x[:, 1:]).sum(1, keepdim=True)
    return torch.cat([kept, fused], dim=1)


def _plain_open_clip_block(block, x, keep_ratio, fuse):
    h = block.ln_1(x)
    out, attn_map = block.attn(h, h, h, need_weights=True, average_attn_weights=True)
    x = x + block.ls_1(out)
    x = _evit_plain_reduce(x, attn_map, keep_ratio, fuse)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _plain_open_clip_attention_block(block, x, keep_ratio, fuse):
    """open_clip's own Attention for the output; its softmax map written out from the same weights."""
    attn, h = block.attn, block.ln_1(x)
    q, k, _ = (t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)
               for t in F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1))
    attn_map = torch.softmax(attn.ln_q(q) @ attn.ln_k(k).transpose(-1, -2) * attn.scale, dim=-1)
    x = x + block.ls_1(block.ln_attn(attn(h)))
    x = _evit_plain_reduce(x, attn_map, keep_ratio, fuse)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _plain_timm_block(block, x, keep_ratio, fuse):
    captured = {}
    block.attn.fused_attn = False  # timm's explicit path; its attn_drop sees the softmax map
    hook = block.attn.attn_drop.register_forward_hook(lambda m, i, out: captured.setdefault("map", out))
    try:
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    finally:
        hook.remove()
        block.attn.fused_attn = True
    x = _evit_plain_reduce(x, captured["map"], keep_ratio, fuse)
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _plain_hf_layer(layer, x, keep_ratio, fuse):
    out, attn_map = layer.self_attn(layer.layer_norm1(x), attention_mask=None)
    x = x + out
    x = _evit_plain_reduce(x, attn_map, keep_ratio, fuse)
    return x + layer.mlp(layer.layer_norm2(x))


EVIT_TOWERS = {
    "open_clip": (_open_clip_visual, lambda m: m.transformer.resblocks, _plain_open_clip_block,
                  lambda m, x: m(x), clipfast.patch_open_clip),
    "open_clip_attention": (_open_clip_attention_visual, lambda m: m.transformer.resblocks,
                            _plain_open_clip_attention_block, lambda m, x: m(x), clipfast.patch_open_clip),
    "timm": (_timm_vit, lambda m: m.blocks, _plain_timm_block, lambda m, x: m(x), clipfast.patch_timm_vit),
    "hf": (lambda: _hf_clip("eager"), lambda m: m.vision_model.encoder.layers, _plain_hf_layer,
           lambda m, x: m.get_image_features(pixel_values=x), clipfast.patch_hf_clip),
}


def _replace_forwards(blocks, indices, plain, keep_ratio, fuse):
    originals = {}
    for i in indices:
        originals[i] = blocks[i].forward
        blocks[i].forward = (lambda blk: lambda x, *a, **k: plain(blk, x, keep_ratio, fuse))(blocks[i])
    return lambda: [delattr(blocks[i], "forward") for i in originals]


@pytest.mark.parametrize("fuse", [False, True], ids=["drop", "fuse"])
@pytest.mark.parametrize("tower", list(EVIT_TOWERS))
def test_self_attention_equals_plain_evit(tower, fuse):
    build, blocks_of, plain, run, patch = EVIT_TOWERS[tower]
    model, images = build(), _images()
    restore = _replace_forwards(blocks_of(model), (1, 2), plain, 0.7, fuse)
    want = _image_output(run(model, images))
    restore()
    with patch(model, token_removal=TokenRemoval.self_attention(0.7, blocks=(1, 2), fuse_dropped=fuse)):
        got = _image_output(run(model, images))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tower", list(EVIT_TOWERS))
def test_self_attention_keeping_everything_equals_unpatched(tower):
    build, _, _, run, patch = EVIT_TOWERS[tower]
    model, images = build(), _images()
    want = _image_output(run(model, images))
    with patch(model, token_removal=TokenRemoval.self_attention(1.0, blocks=(0, 3))):
        got = _image_output(run(model, images))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- medoids

MEDOID_TOWERS = {
    "open_clip": (_open_clip_visual, lambda m: m.transformer.resblocks, clipfast.patch_open_clip),
    "timm": (_timm_vit, lambda m: m.blocks, clipfast.patch_timm_vit),
}


def _plain_segment_medoids(x, frames, segments, k):
    videos, per_segment = x.shape[0] // frames, frames // segments
    grouped = x.reshape(videos * segments, per_segment, x.shape[1], x.shape[2])
    cls = grouped[:, :, :1].mean(1)
    patches = grouped[:, :, 1:].reshape(videos * segments, -1, x.shape[2])
    index, _ = token_medoids_index_reference(patches.detach(), k, "euclidean", 100, 0)
    return torch.cat([cls, torch.gather(patches, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[2]))], dim=1)


@pytest.mark.parametrize("tower", list(MEDOID_TOWERS))
def test_medoids_equal_plain_procedure(tower):
    build, blocks_of, patch = MEDOID_TOWERS[tower]
    model = build()
    frames = _images(batch=2 * 6, seed=5)  # 2 videos x 6 frames
    config = TokenMedoids(block=2, num_frames=6, num_segments=2, num_medoids=8)
    hook = blocks_of(model)[2].register_forward_pre_hook(
        lambda m, args: (_plain_segment_medoids(args[0], 6, 2, 8),) + args[1:])
    want = model(frames)
    hook.remove()
    with patch(model, token_medoids=config):
        got = model(frames)
    assert got.shape[0] == 2 * 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_medoids_and_self_attention_removal_combine():
    model = _timm_vit()
    frames = _images(batch=4, seed=6)
    with clipfast.patch_timm_vit(model, token_removal=TokenRemoval.self_attention(0.5, blocks=(0,)),
                                 token_medoids=TokenMedoids(block=2, num_frames=4, num_segments=2, num_medoids=5)):
        out = model.forward_features(frames)
    assert out.shape == (2, 1 + 5, WIDTH)


# ---------------------------------------------------------------------------------------------- compile

COMPILE_CASES = {
    "open_clip-given": (_open_clip_visual, clipfast.patch_open_clip,
                        dict(token_removal=TokenRemoval.given_scores(0.5, block=2)), 3),
    "open_clip-evit": (_open_clip_visual, clipfast.patch_open_clip,
                       dict(token_removal=TokenRemoval.self_attention(0.5, blocks=(1,), fuse_dropped=True)), 3),
    "open_clip-medoids": (_open_clip_visual, clipfast.patch_open_clip,
                          dict(token_medoids=TokenMedoids(block=2, num_frames=3, num_segments=1, num_medoids=6)), 6),
    "open_clip_attention-evit": (_open_clip_attention_visual, clipfast.patch_open_clip,
                                 dict(token_removal=TokenRemoval.self_attention(0.5, blocks=(0, 2))), 3),
    "timm-given": (_timm_vit, clipfast.patch_timm_vit, dict(token_removal=TokenRemoval.given_scores(7)), 3),
    "timm-evit": (_timm_vit, clipfast.patch_timm_vit,
                  dict(token_removal=TokenRemoval.self_attention(0.7, blocks=(1, 3))), 3),
    "timm-medoids": (_timm_vit, clipfast.patch_timm_vit,
                     dict(token_medoids=TokenMedoids(block=1, num_frames=2, num_segments=2, num_medoids=4)), 4),
    "hf-given": (_hf_clip, clipfast.patch_hf_clip, dict(token_removal=TokenRemoval.given_scores(9)), 3),
    "hf-evit": (_hf_clip, clipfast.patch_hf_clip,
                dict(token_removal=TokenRemoval.self_attention(0.6, blocks=(0, 2))), 3),
}


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_patched_towers_compile_fullgraph(case):
    build, patch, config, batch = COMPILE_CASES[case]
    model = build()
    images = _images(batch=batch).requires_grad_()
    handle = patch(model, **config)
    forward = (lambda x: model.get_image_features(pixel_values=x)) if case.startswith("hf") else model

    def run(fn):
        with handle.keep_scores(_scores(batch)):
            out = _image_output(fn(images))
        return out, torch.autograd.grad(out.square().sum(), images)[0]

    torch._dynamo.reset()
    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    for got, want in zip(run(compiled), run(forward)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    handle.unpatch()


# ---------------------------------------------------------------------------------------------- handles


def test_unpatch_restores_the_instance():
    model = _timm_vit()
    images = _images()
    want = model(images)
    hooks_before = [dict(b._forward_pre_hooks) for b in model.blocks] + [dict(model.patch_drop._forward_hooks)]
    handle = clipfast.patch_timm_vit(model, token_removal=TokenRemoval.self_attention(0.5, blocks=(1,)),
                                     token_medoids=TokenMedoids(block=2, num_frames=3, num_segments=1, num_medoids=4))
    assert "forward" in vars(model.blocks[1])
    with pytest.raises(RuntimeError, match="already patched"):
        clipfast.patch_timm_vit(model, token_removal=TokenRemoval.given_scores(4))
    handle.unpatch()
    assert "forward" not in vars(model.blocks[1])
    assert [dict(b._forward_pre_hooks) for b in model.blocks] + [dict(model.patch_drop._forward_hooks)] == hooks_before
    torch.testing.assert_close(model(images), want, rtol=0, atol=0)


def test_bad_configurations_raise_and_leave_the_model_unpatched():
    model = _open_clip_visual()
    with pytest.raises(ValueError, match="block index 7"):
        clipfast.patch_open_clip(model, token_removal=TokenRemoval.self_attention(0.5, blocks=(7,)))
    with pytest.raises(ValueError, match="not divisible"):
        clipfast.patch_open_clip(model, token_medoids=TokenMedoids(block=1, num_frames=5, num_segments=2,
                                                                   num_medoids=3))
    with pytest.raises(ValueError, match="keep_ratio"):
        TokenRemoval.self_attention(1.5)
    with pytest.raises(ValueError, match="token_removal"):
        clipfast.patch_open_clip(model)
    with pytest.raises(TypeError, match="open_clip"):
        clipfast.patch_open_clip(torch.nn.Linear(2, 2), token_removal=TokenRemoval.given_scores(4))
    dropout_model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, patch_drop_rate=0.5)
    with pytest.raises(ValueError, match="patch dropout"):
        clipfast.patch_timm_vit(dropout_model, token_removal=TokenRemoval.given_scores(4))
    clipfast.patch_open_clip(model, token_removal=TokenRemoval.given_scores(4)).unpatch()  # nothing left over


def test_shapes_are_checked_at_patch_time():
    """Everything a patch fixes fails when the patch is made, and leaves the model unpatched."""
    def no_class_token():
        torch.manual_seed(0)
        return timm.models.vision_transformer.VisionTransformer(
            img_size=GRID * PATCH, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=0,
            class_token=False, global_pool="avg").eval()

    model = no_class_token()
    with pytest.raises(ValueError, match="no class token"):
        clipfast.patch_timm_vit(model, token_removal=TokenRemoval.self_attention(1.0, blocks=(0,)))
    assert "forward" not in vars(model.blocks[0])
    vit = _timm_vit()  # GRID x GRID patches
    patches = GRID * GRID
    bad = [TokenRemoval.given_scores(patches + 1), TokenRemoval.given_scores(0),
           TokenRemoval.given_scores(0.5, grid=(GRID + 1, GRID)), TokenRemoval.given_scores(3, block=2)]
    if GRID % 2:
        bad.append(TokenRemoval.given_scores(0.5, block=2))  # an odd grid has no 2 x 2 blocks
    for removal in bad:
        with pytest.raises(ValueError, match="does not fit this model"):
            clipfast.patch_timm_vit(vit, token_removal=removal)
        assert not vit.patch_drop._forward_hooks
    odd = open_clip.transformer.VisionTransformer(image_size=7 * PATCH, patch_size=PATCH, width=WIDTH, layers=1,
                                                  heads=HEADS, mlp_ratio=4.0, output_dim=32)
    with pytest.raises(ValueError, match="not divisible into 2 x 2 blocks"):
        clipfast.patch_open_clip(odd, token_removal=TokenRemoval.given_scores(0.5, block=2))
    with pytest.raises(ValueError, match=r"num_medoids must be an int in \[1, 2 \*|num_medoids must be an int in"):
        clipfast.patch_timm_vit(vit, token_medoids=TokenMedoids(block=1, num_frames=4, num_segments=2,
                                                                num_medoids=2 * patches + 1))
    with pytest.raises(ValueError, match="num_medoids"):  # fewer patches after EViT removal in block 0
        clipfast.patch_timm_vit(vit, token_removal=TokenRemoval.self_attention(0.5, blocks=(0,)),
                                token_medoids=TokenMedoids(block=1, num_frames=2, num_segments=2,
                                                           num_medoids=patches))
    assert not any(b._forward_pre_hooks for b in vit.blocks) and "forward" not in vars(vit.blocks[0])


def test_integer_like_patch_arguments():
    vit = _timm_vit()
    with clipfast.patch_timm_vit(vit, token_removal=TokenRemoval.self_attention(0.5, blocks=(np.int64(1),)),
                                 token_medoids=TokenMedoids(block=np.int64(2), num_frames=np.int64(2),
                                                            num_segments=torch.tensor(1), num_medoids=np.int32(3))):
        out = vit.forward_features(torch.randn(4, 3, GRID * PATCH, GRID * PATCH))
    assert out.shape[:2] == (2, 1 + 3)
    with clipfast.patch_timm_vit(vit, token_removal=TokenRemoval.given_scores(np.int64(4))) as handle:
        with handle.keep_scores(torch.rand(2, GRID * GRID)):
            assert vit.forward_features(torch.randn(2, 3, GRID * PATCH, GRID * PATCH)).shape[1] == 1 + 4


# ---------------------------------------------------------------------------------------------- ToMe


TOME_TOWERS = {
    "open_clip": (_open_clip_visual, lambda m: m.transformer.resblocks, tome.open_clip_block, lambda m, x: m(x),
                  clipfast.patch_open_clip),
    "timm": (_timm_vit, lambda m: m.blocks, tome.timm_block, lambda m, x: m(x), clipfast.patch_timm_vit),
    "hf": (_hf_clip, lambda m: m.vision_model.encoder.layers, tome.hf_layer,
           lambda m, x: m.get_image_features(pixel_values=x), clipfast.patch_hf_clip),
}


@pytest.mark.parametrize("r", [3, (3, 0.5), [0, 4, 0, 2]], ids=["constant", "inflection", "list"])
@pytest.mark.parametrize("tower", list(TOME_TOWERS))
def test_merging_equals_tome_port(tower, r):
    build, blocks_of, port_block, run, patch = TOME_TOWERS[tower]
    model, images = build(), _images()
    schedule = parse_r(DEPTH, r)
    assert TokenMerging(r).schedule(DEPTH) == tuple(schedule)
    restore = tome.patch_blocks(blocks_of(model), schedule, port_block)
    want = _image_output(run(model, images))
    restore()
    with patch(model, token_merging=TokenMerging(r)):
        got = _image_output(run(model, images))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tower", list(TOME_TOWERS))
def test_merging_nothing_is_the_unpatched_model(tower):
    build, blocks_of, _, run, patch = TOME_TOWERS[tower]
    model, images = build(), _images()
    want = _image_output(run(model, images))
    with patch(model, token_merging=TokenMerging(0)):
        assert not any("forward" in vars(b) for b in blocks_of(model))
        got = _image_output(run(model, images))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_merging_without_proportional_attention_and_unpatch():
    model, images = _timm_vit(), _images()
    want = model(images)
    with clipfast.patch_timm_vit(model, token_merging=TokenMerging([0, 5, 5], prop_attn=False)):
        assert "forward" not in vars(model.blocks[0]) and "forward" in vars(model.blocks[3])
        tokens = model.forward_features(images)
    assert tokens.shape[1] == 1 + PATCHES - 5 - 5
    assert not any("forward" in vars(b) for b in model.blocks)
    torch.testing.assert_close(model(images), want, rtol=0, atol=0)


def test_merging_configurations_are_checked_at_patch_time():
    model = _timm_vit()
    for bad, match in ((TokenMerging(-1), "must be >= 0"), (TokenMerging([1] * (DEPTH + 1)), "counts for a"),
                       (TokenMerging((3, 0.5, 1)), "a tuple is"), (TokenMerging(2.5), "must be an int")):
        with pytest.raises((ValueError, TypeError), match=match):
            clipfast.patch_timm_vit(model, token_merging=bad)
    with pytest.raises(ValueError, match="does not combine"):
        clipfast.patch_timm_vit(model, token_merging=TokenMerging(2), token_removal=TokenRemoval.given_scores(4))
    assert not any("forward" in vars(b) for b in model.blocks) and not model.patch_drop._forward_hooks


@pytest.mark.parametrize("tower", list(TOME_TOWERS))
def test_merging_compiles_fullgraph(tower):
    build, _, _, run, patch = TOME_TOWERS[tower]
    model = build()
    images = _images().requires_grad_()
    handle = patch(model, token_merging=TokenMerging((3, 0.5)))

    def step(fn):
        out = _image_output(fn(images))
        return out, torch.autograd.grad(out.square().sum(), images)[0]

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: run(model, x), backend="aot_eager", fullgraph=True)
    for got, want in zip(step(compiled), step(lambda x: run(model, x))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    handle.unpatch()
