"""Token reduction inside ViT vision towers, shared by ``patch_open_clip``, ``patch_timm_vit`` and
``patch_hf_clip``: what to do (:class:`TokenRemoval`, :class:`TokenMedoids`) and how it is inserted.

Three insertions, each on the given instance only and undone by ``handle.unpatch()``:

- **given scores** (Attentive Mask CLIP): a forward hook on the module whose output is the token sequence
  right after the positional embedding (open_clip's ``patch_dropout``, timm's ``patch_drop``, HF's
  ``embeddings``) replaces it by :func:`clipfast.attentive_token_keep` of the scores set with
  :meth:`VisionPatchHandle.keep_scores`. The prefix tokens and their positional embeddings stay; the
  patches carry theirs, as in A-CLIP (positional embedding added before the gather).
- **self attention** (EViT): the chosen blocks' ``forward`` is replaced (an instance attribute) by the same
  computation split in two: attention (fused SDPA, from the block's own weights), then the tokens are
  reduced by that block's [CLS] attention (:func:`clipfast.cls_attention_scores` on the same q, k), then
  the MLP on the kept tokens. Both halves come from the block's description
  (:class:`~clipfast.integrations.vision_blocks.VisionBlock`), the same one :func:`clipfast.attention_scores`
  reads, so EViT and the scores support the same blocks.
- **medoids** (CenterCLIP): a forward pre-hook on the chosen block replaces its input by
  :func:`clipfast.segment_medoids` of it (video frames folded into the batch: ``(B*T, 1+L, D)`` becomes
  ``(B*S, 1+K, D)``, so the tower returns one embedding per segment).
- **merging** (ToMe): from the first block whose ``r`` is positive on, every block's ``forward`` is replaced
  by attention (with ToMe's proportional attention, ``log(size)`` of the keys as SDPA's additive bias), then
  :func:`clipfast.token_merge` of ``r`` tokens by the keys averaged over heads, then the MLP. The token
  sizes pass from block to block through a small state object that the first merging block resets on every
  forward (no list popped per block); blocks before it run unpatched.

All shapes are fixed, and checked, when the patch is made (a count, grid or block size that does not fit the
model, or EViT removal on a tower without a class token, raises then, not at the first forward), so
``torch.compile(fullgraph=True)`` traces the patched towers without graph breaks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import operator
import types
from typing import Callable, List, Optional, Tuple, Union

import torch

from clipfast.attention_scores import cls_attention_scores
from clipfast.functional import attentive_token_keep, resolve_num_keep, segment_medoids, token_merge
from clipfast.inputs import as_int, int_in_range, is_int_like
from clipfast.integrations._handle import PatchHandle
from clipfast.integrations.vision_blocks import VisionBlock, VisionTower


@dataclasses.dataclass(frozen=True)
class TokenRemoval:
    """Attentive token removal in a vision tower. Build it with one of the two constructors:

    - :meth:`given_scores` (A-CLIP): after the positional embedding keep ``num_keep`` patches chosen by
      scores the caller passes per forward (``with handle.keep_scores(scores): ...``), e.g. an EMA
      model's :func:`clipfast.attention_scores`. Outside ``keep_scores`` the tower keeps every token
      (evaluation).
    - :meth:`self_attention` (EViT): at ``blocks`` (0-based), between attention and MLP, keep
      ``ceil(keep_ratio * L)`` of the current L patch tokens by that block's own [CLS] attention,
      optionally appending EViT's fused token of the dropped ones.
    """

    mode: str
    num_keep: Union[int, float] = 1.0
    grid: Optional[Tuple[int, int]] = None
    block: int = 1
    blocks: Tuple[int, ...] = ()
    fuse_dropped: bool = False

    @classmethod
    def given_scores(cls, num_keep: Union[int, float], *, grid: Optional[Tuple[int, int]] = None,
                     block: int = 1) -> "TokenRemoval":
        """``num_keep`` patches (an int, or a ratio by :func:`clipfast.num_keep_for_ratio`); ``block=2``
        is A-CLIP's 2 x 2 block selection (``grid`` defaults to the model's patch grid)."""
        return cls("given_scores", num_keep, None if grid is None else tuple(grid), block)

    @classmethod
    def self_attention(cls, keep_ratio: float = 0.7, *, blocks: Tuple[int, ...] = (3, 6, 9),
                       fuse_dropped: bool = False) -> "TokenRemoval":
        """EViT's defaults: keep rate 0.7 at the 4th, 7th and 10th blocks."""
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real) or not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
        blocks = tuple(operator.index(b) if is_int_like(b) else b for b in blocks)
        return cls("self_attention", float(keep_ratio), blocks=blocks, fuse_dropped=bool(fuse_dropped))

    def __post_init__(self):
        if self.mode not in ("given_scores", "self_attention"):
            raise ValueError(f"TokenRemoval mode must be 'given_scores' or 'self_attention', got {self.mode!r}; "
                             "use TokenRemoval.given_scores(...) or TokenRemoval.self_attention(...)")


@dataclasses.dataclass(frozen=True)
class TokenMedoids:
    """CenterCLIP's token clustering: before block ``block`` (0-based; CenterCLIP uses 6, the 7th of 12)
    the ``num_frames`` frames of each video (consecutive rows of the batch) are grouped into
    ``num_segments`` segments whose patch tokens are reduced to ``num_medoids`` medoid tokens each
    (:func:`clipfast.segment_medoids`); CenterCLIP's MSR-VTT setting is 12 frames, 4 segments, 49 medoids."""

    block: int
    num_frames: int
    num_segments: int
    num_medoids: int
    metric: str = "euclidean"
    max_iters: int = 100
    split_size: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class TokenMerging:
    """ToMe's token merging (Bolya et al., ICLR 2023) in a vision tower: between attention and MLP, block i
    merges ``r_i`` tokens (:func:`clipfast.token_merge` on the block's keys averaged over heads, the prefix
    tokens protected), and from the first merge on attention is proportional (``log(size)`` added to every
    key's logits; ``prop_attn=False`` turns that off).

    ``r`` is ToMe's schedule: an int (every block), ``(r, inflection)`` (a linear ramp from
    ``int(r * (1 - inflection))`` in the first block to ``2 r`` minus that in the last), or a list with one
    count per block (padded with zeros). ToMe's ViT-B/16 setting is ``r=16``.
    """

    r: Union[int, Tuple[int, float], List[int]]
    prop_attn: bool = True

    def schedule(self, depth: int) -> Tuple[int, ...]:
        """The tokens each of ``depth`` blocks merges (ToMe's ``parse_r``); ValueError for a bad ``r``."""
        return merge_schedule(self.r, depth)


def merge_schedule(r, depth: int) -> Tuple[int, ...]:
    """ToMe's schedule of ``r`` over ``depth`` blocks (see :class:`TokenMerging`)."""
    what = "TokenMerging r"
    if isinstance(r, list):
        counts = [as_int(v, what) for v in r]
        if len(counts) > depth:
            raise ValueError(f"{what}: {len(counts)} counts for a {depth}-block tower")
        counts += [0] * (depth - len(counts))
    elif isinstance(r, tuple):
        if len(r) != 2 or isinstance(r[1], bool) or not isinstance(r[1], numbers.Real):
            raise ValueError(f"{what}: a tuple is (r, inflection), got {r!r}; pass a list for one count per block")
        base, inflection = as_int(r[0], what), float(r[1])
        low = int(base * (1.0 - inflection))
        step = (2 * base - 2 * low) / (depth - 1) if depth > 1 else 0.0
        counts = [int(low + step * i) for i in range(depth)]
    else:
        counts = [as_int(r, what)] * depth
    if any(c < 0 for c in counts):
        raise ValueError(f"{what}: the merge counts must be >= 0, got {counts}")
    return tuple(counts)


class _MergeState:
    """The token sizes passed from one merging block to the next within a forward."""

    size: Optional[torch.Tensor] = None


class VisionPatchHandle(PatchHandle):
    """A :class:`PatchHandle` that also owns module hooks (removed on :meth:`unpatch`) and, for
    :meth:`TokenRemoval.given_scores`, the scores of the next forwards."""

    def __init__(self, target, name: str):
        super().__init__(target, name)
        self._hooks: List[torch.utils.hooks.RemovableHandle] = []
        self.scores: Optional[torch.Tensor] = None

    def add_hook(self, hook: torch.utils.hooks.RemovableHandle) -> None:
        self._hooks.append(hook)

    @contextlib.contextmanager
    def keep_scores(self, scores: torch.Tensor):
        """Within the block, forwards of the patched tower keep the patches chosen by ``scores (B, L)``."""
        previous, self.scores = self.scores, scores
        try:
            yield self
        finally:
            self.scores = previous

    def unpatch(self) -> None:
        if not self.active:
            return
        super().unpatch()
        for hook in reversed(self._hooks):
            hook.remove()
        self._hooks.clear()
        self.scores = None


def check_block_indices(blocks, depth: int, what: str) -> None:
    for index in blocks:
        if int_in_range(index, 0, depth - 1) is None:
            raise ValueError(f"{what}: block index {index!r} is not in [0, {depth}) for this {depth}-block tower")


def given_scores_num_keep(removal: TokenRemoval, grid: Tuple[int, int]) -> int:
    """The patches a given-scores removal keeps on this model's ``grid``; ValueError (at patch time) when
    the count, ratio, grid or block size does not fit the model."""
    patches = grid[0] * grid[1]
    block_grid = removal.grid or (grid if removal.block != 1 else None)
    try:
        return resolve_num_keep(patches, removal.num_keep, block_grid, removal.block)
    except ValueError as error:
        raise ValueError(f"TokenRemoval.given_scores({removal.num_keep!r}, grid={removal.grid!r}, "
                         f"block={removal.block!r}) does not fit this model's {grid[0]} x {grid[1]} patch grid: "
                         f"{error}") from None


def install_given_scores(handle: VisionPatchHandle, embedding_output: torch.nn.Module, removal: TokenRemoval,
                         num_prefix: int, grid: Tuple[int, int]) -> None:
    """The A-CLIP insertion: a forward hook on ``embedding_output`` (its output: (B, P + L, D))."""
    num_keep = given_scores_num_keep(removal, grid)
    block = operator.index(removal.block)
    keep_grid = tuple(operator.index(g) for g in (removal.grid or grid)) if block > 1 else None

    def keep_hook(module, inputs, output):
        if handle.scores is None:
            return output
        return attentive_token_keep(output, handle.scores, num_keep, num_prefix_tokens=num_prefix,
                                    grid=keep_grid, block=block)[0]

    handle.add_hook(embedding_output.register_forward_hook(keep_hook))


def self_attention_forward(describe_block: Callable[[torch.nn.Module, str], VisionBlock], where: str,
                           removal: TokenRemoval, num_prefix: int):
    """A block ``forward`` (bind with ``types.MethodType``) doing EViT's attention / reduce / MLP.

    The block is described anew on every call, from the block the forward is bound to: a deep copy of the
    patched model then runs its own weights. The closure holds no module."""
    def forward(block, x, *args, **kwargs):
        if any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
            raise NotImplementedError("clipfast's EViT token removal supports unmasked vision blocks only "
                                      "(an attention mask was passed)")
        parts = describe_block(block, where)
        x, q, k = parts.attention(x)
        with torch.no_grad():
            scores = cls_attention_scores(q, k, scale=parts.scale, num_prefix_tokens=num_prefix)
        num_keep = max(1, math.ceil(removal.num_keep * scores.shape[1]))
        x = attentive_token_keep(x, scores, num_keep, num_prefix_tokens=num_prefix,
                                 fuse_dropped=removal.fuse_dropped)[0]
        return parts.mlp(x)

    return forward


def install_self_attention(handle: VisionPatchHandle, tower: VisionTower, removal: TokenRemoval) -> None:
    """The EViT insertion: the chosen blocks' ``forward`` replaced (instance attributes)."""
    if not tower.has_class_token or tower.num_prefix_tokens < 1:
        raise ValueError(f"{handle.name}: TokenRemoval.self_attention (EViT) ranks patches by the [CLS] token's "
                         "attention, and this model has no class token; use TokenRemoval.given_scores with "
                         "scores of your own")
    check_block_indices(removal.blocks, len(tower.blocks), "TokenRemoval.self_attention")
    for index in map(operator.index, removal.blocks):
        tower.block(index)  # fail at patch time on an unsupported block (attention_scores' error), not at forward
        forward = self_attention_forward(tower.describe_block, tower.block_path(index), removal,
                                         tower.num_prefix_tokens)
        handle.set(tower.blocks[index], "forward", types.MethodType(forward, tower.blocks[index]))


def patches_at_block(block_index: int, patches: int, removal: Optional[TokenRemoval], grid: Tuple[int, int]) -> int:
    """The patch tokens entering block ``block_index`` when every removal before it keeps what it can keep
    (the fewest a forward can see: with given scores, the kept count)."""
    if removal is None:
        return patches
    if removal.mode == "given_scores":
        return min(patches, given_scores_num_keep(removal, grid))
    for index in sorted(removal.blocks):
        if index < block_index:
            patches = max(1, math.ceil(removal.num_keep * patches)) + int(removal.fuse_dropped)
    return patches


def install_medoids(handle: VisionPatchHandle, blocks, medoids: TokenMedoids, num_prefix: int,
                    patches: Optional[int] = None) -> None:
    """The CenterCLIP insertion: a forward pre-hook replacing block ``medoids.block``'s input. ``patches``:
    the patch tokens per frame entering the block, when known, to check ``num_medoids`` at patch time."""
    check_block_indices((medoids.block,), len(blocks), "TokenMedoids")
    num_frames, num_segments = as_int(medoids.num_frames, "num_frames"), as_int(medoids.num_segments, "num_segments")
    if num_frames < 1 or num_segments < 1 or num_frames % num_segments:
        raise ValueError(f"TokenMedoids: num_frames={medoids.num_frames} is not divisible into "
                         f"num_segments={medoids.num_segments} segments")
    if medoids.metric not in ("euclidean", "cosine"):
        raise ValueError(f"TokenMedoids: metric must be 'euclidean' or 'cosine', got {medoids.metric!r}")
    tokens = None if patches is None else num_frames // num_segments * patches
    if int_in_range(medoids.num_medoids, 1, tokens) is None:
        bound = f"[1, {tokens}] (the patch tokens of a {num_frames // num_segments}-frame segment)" \
            if tokens is not None else ">= 1"
        raise ValueError(f"TokenMedoids: num_medoids must be an int in {bound}, got {medoids.num_medoids!r}")
    from clipfast.functional import check_medoid_iterations

    max_iters, split_size = check_medoid_iterations(medoids.max_iters, medoids.split_size)
    num_medoids = operator.index(medoids.num_medoids)
    block = operator.index(medoids.block)

    def medoid_hook(module, args, kwargs):
        reduced = segment_medoids(args[0], num_frames, num_segments, num_medoids,
                                  num_prefix_tokens=num_prefix, metric=medoids.metric, max_iters=max_iters,
                                  split_size=split_size)
        return (reduced,) + tuple(args[1:]), kwargs

    handle.add_hook(blocks[block].register_forward_pre_hook(medoid_hook, with_kwargs=True))


def merging_forward(describe_block: Callable[[torch.nn.Module, str], VisionBlock], where: str, r: int,
                    prop_attn: bool, num_prefix: int, state: _MergeState, first: bool):
    """A block ``forward`` (bind with ``types.MethodType``) doing ToMe's attention / merge / MLP. ``first``:
    this is the first merging block, which starts every forward with unit sizes. Like
    :func:`self_attention_forward`, the block is described anew on every call (no module in the closure)."""
    def forward(block, x, *args, **kwargs):
        if any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
            raise NotImplementedError("clipfast's token merging supports unmasked vision blocks only "
                                      "(an attention mask was passed)")
        parts = describe_block(block, where)
        size = None if first else state.size
        key_bias = None if size is None or not prop_attn else size.log().to(x.dtype)[:, None, None, :]
        x, _, k = parts.attention(x, key_bias)
        if r > 0:
            x, size, _ = token_merge(x, k.mean(dim=1), r, size=size, num_prefix_tokens=num_prefix)
        state.size = size
        return parts.mlp(x)

    return forward


def install_merging(handle: VisionPatchHandle, tower: VisionTower, merging: TokenMerging) -> None:
    """The ToMe insertion: every block from the first one that merges on gets :func:`merging_forward`."""
    if not isinstance(merging, TokenMerging):
        raise TypeError(f"token_merging must be a clipfast.TokenMerging, got {type(merging).__name__}")
    schedule = merging.schedule(len(tower.blocks))
    first = next((index for index, r in enumerate(schedule) if r > 0), None)
    if first is None:
        return  # nothing merges: the tower stays exactly the unpatched model
    state = _MergeState()
    for index in range(first, len(tower.blocks)):
        tower.block(index)  # fail at patch time on an unsupported block (attention_scores' error), not at forward
        forward = merging_forward(tower.describe_block, tower.block_path(index), schedule[index],
                                  bool(merging.prop_attn), tower.num_prefix_tokens, state, index == first)
        handle.set(tower.blocks[index], "forward", types.MethodType(forward, tower.blocks[index]))


def patch_vision_tower(patch_name: str, model, tower: Optional[VisionTower], expected: str, *,
                       token_removal: Optional[TokenRemoval], token_medoids: Optional[TokenMedoids],
                       token_merging: Optional[TokenMerging] = None) -> VisionPatchHandle:
    """The whole of ``patch_open_clip`` / ``patch_timm_vit`` once ``tower`` (None: ``model`` is not one,
    TypeError naming ``expected``) has been found: a handle on the tower with every insertion asked for."""
    if tower is None:
        raise TypeError(f"{patch_name} expects {expected}, got {type(model).__module__}.{type(model).__qualname__}")
    if token_removal is None and token_medoids is None and token_merging is None:
        raise ValueError(f"{patch_name}: pass token_removal=..., token_medoids=... and/or token_merging=...")
    handle = VisionPatchHandle(tower.module, f"clipfast.{patch_name}")
    install(handle, tower, token_removal=token_removal, token_medoids=token_medoids, token_merging=token_merging)
    return handle


def install(handle: VisionPatchHandle, tower: VisionTower, *, token_removal: Optional[TokenRemoval],
            token_medoids: Optional[TokenMedoids], token_merging: Optional[TokenMerging] = None) -> None:
    """Every insertion asked for, on one tower; on any error the handle is unpatched before re-raising.
    Every shape the patch fixes (kept count, block grid, class token, medoid count, merge schedule) is
    checked here."""
    embedding_output, grid, num_prefix = tower.embedding_output, tower.grid, tower.num_prefix_tokens
    try:
        if token_merging is not None:
            if token_removal is not None or token_medoids is not None:
                raise ValueError(f"{handle.name}: token merging does not combine with token removal or medoids "
                                 "in one patch")
            install_merging(handle, tower, token_merging)
        if token_removal is not None and token_removal.mode == "given_scores":
            if getattr(embedding_output, "prob", 0.0) > 0:
                raise ValueError(f"{handle.name}: the model's random patch dropout is on "
                                 f"(prob={embedding_output.prob}); attentive removal replaces it, turn it off")
            install_given_scores(handle, embedding_output, token_removal, num_prefix, grid)
        elif token_removal is not None:
            install_self_attention(handle, tower, token_removal)
        if token_medoids is not None:
            check_block_indices((token_medoids.block,), len(tower.blocks), "TokenMedoids")
            patches = patches_at_block(operator.index(token_medoids.block), grid[0] * grid[1], token_removal, grid)
            install_medoids(handle, tower.blocks, token_medoids, num_prefix, patches)
    except BaseException:
        handle.unpatch()
        raise
