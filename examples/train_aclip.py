"""Train an open_clip CLIP with Attentive Mask CLIP (A-CLIP) token removal on synthetic data.

Shows clipfast's A-CLIP pieces in a training loop: ``clipfast.attention_scores`` ranks the patches of
each image with an EMA copy of the image tower, ``clipfast.patch_open_clip`` with
``TokenRemoval.given_scores(0.5, block=2)`` makes the online tower keep the best-scored 2 x 2 patch
blocks (int(n_blocks * 0.5) + 1 of them: 100 of 196 patches for ViT-B/16 at 224 px), and
``clipfast.nn.ClipLoss`` is the contrastive loss. The model is a real ``open_clip.CLIP`` (random init,
nothing downloaded): by default a tiny ViT that trains in seconds on a CPU, or any open_clip ViT config
by name (``--model ViT-B-16``). Everything runs on the CPU.

One step, as A-CLIP's:

1. EMA update of the scoring tower (a copy of ``model.visual``, no gradients):
   ``p_ema = m * p_ema + (1 - m) * p``, with ``m`` rising from ``--momentum`` to 1 on a cosine schedule
   over the run.
2. The EMA tower scores the patches of the EMA view (all tokens, one forward under no_grad).
3. Each of the two online views gets those scores mapped into its own crop (below), and the online
   tower, inside ``handle.keep_scores(scores)``, encodes both views (one 2B batch) keeping 50% of the
   patches (2 x 2 blocks).
4. Loss ``0.5 * ClipLoss(view 1, text) + 0.5 * ClipLoss(view 2, text)``, the text encoded once; AdamW
   with open_clip's parameter groups; ``logit_scale`` clamped to [0, ln 100].

Views, and how they simplify A-CLIP's: each online view is a random resized crop (area 50-100% of the
image, aspect 3/4-4/3) flipped horizontally with probability 1/2 and resized back to the input size.
A-CLIP's EMA view is a zoom-out box containing both online crops, enlarged at random towards the image
border; here it is always the whole image, the box enlarged all the way. Score projection is A-CLIP's
per sample: the EMA view's score grid is resized (bilinear) to the EMA box's pixel size, which is the
image size here, the online crop is cut out of it and resized back to the patch grid, and then flipped
with the view. Left out of A-CLIP's recipe: its photometric augmentations, the SimCLR and BYOL
auxiliary losses (and with them the EMA text tower and projectors) and the frozen patch embedding;
what remains is the part token removal changes.

Images are Gaussian noise and captions random token ids (SOT, words, EOT, zero padding, as open_clip's
tokenizer lays them out) from a seeded generator, so runs with the same ``--seed`` see the same data
and start from the same weights.

    python examples/train_aclip.py --steps 20 --batch-size 32
    python examples/train_aclip.py --model ViT-B-16 --batch-size 4 --steps 2

The run ends with

    done: <steps> steps, <ms>/step, peak memory <MiB> MiB, kept <k> of <L> patches

(mean wall-clock time per step without the first, which pays one-time allocations; the peak resident
memory of the process; the number of patch tokens the online tower's transformer received in the last
step). Then, unless ``--no-compare``, the same run with every token kept goes in a fresh subprocess, so
that its peak resident memory is its own, and the script prints

    without removal: <ms>/step, peak memory <MiB> MiB, speed-up <x>x

Without removal there is nothing to score, so that run skips the EMA tower and its update: it trains
the same model on the same two views with all patches, so the speed-up (its step time over this run's)
weighs what removal saves in the online tower against what the EMA forward costs. ``--no-removal`` runs
that configuration alone. On a CPU shared with other jobs, ``OMP_NUM_THREADS=1`` keeps the two timings
comparable: OpenMP threads spin-waiting for a busy core can slow either run down several times over.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import subprocess
import sys
import time

import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm

import clipfast
from clipfast.attention_scores import attention_scores
# Shared with the plain CLIP example next to this file: open_clip's AdamW parameter groups, peak RSS.
from train_clip import build_optimizer, peak_rss_mib, synthetic_captions

KEEP_RATIO = 0.5  # A-CLIP's, hard-coded there too
BLOCK = 2  # A-CLIP selects 2 x 2 blocks of patches

# open_clip's ViT CLIP config layout (as model_configs/ViT-B-16.json) at a size where a step takes about a
# second on two CPU cores: 64 px images in patches of 8 give an 8 x 8 grid, i.e. 16 blocks of 2 x 2, of
# which A-CLIP's rule keeps 9 (36 of 64 patches). head_width 32 gives 4 heads.
TINY = "tiny"
TINY_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "head_width": 32, "layers": 4},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 128, "heads": 4, "layers": 2},
}
DONE_LINE = re.compile(r"done: \d+ steps, (?P<ms>\d+(\.\d+)?) ms/step, peak memory (?P<mib>\d+) MiB, "
                       r"kept \d+ of \d+ patches")


def parse_args(argv=None):
    v = TINY_CFG["vision_cfg"]
    parser = argparse.ArgumentParser(
        description="Train an open_clip CLIP with A-CLIP's attentive token removal on synthetic image-text pairs.")
    parser.add_argument("--model", default=TINY,
                        help=f"'{TINY}' ({v['image_size']} px, patch {v['patch_size']}, width {v['width']}, "
                             f"{v['layers']} layers) or an open_clip ViT model name, e.g. ViT-B-16 "
                             "(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="image-text pairs per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--wd", type=float, default=0.2, help="AdamW weight decay (default: %(default)s)")
    parser.add_argument("--momentum", type=float, default=0.996,
                        help="EMA momentum at the first step, cosine-scheduled to 1 (default: %(default)s, A-CLIP's)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the model init, the synthetic data and the crops (default: %(default)s)")
    parser.add_argument("--no-removal", action="store_true",
                        help="keep every token (no EMA tower): the baseline of the comparison")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                        help="after the run, run the same steps without removal in a subprocess and print its "
                             "step time and peak memory (default: on; ignored with --no-removal)")
    parser.add_argument("--log-losses", metavar="PATH", help="write one JSON line per step: step, loss")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be at least 1")
    if args.model != TINY and args.model not in open_clip.list_models():
        parser.error(f"--model must be '{TINY}' or an open_clip model name, got {args.model!r}")
    return args


def build_model(name: str) -> torch.nn.Module:
    model = open_clip.CLIP(**TINY_CFG) if name == TINY else open_clip.create_model(name, pretrained=None)
    # ResNet and timm image towers have no patch tokens for A-CLIP to select.
    if not isinstance(model.visual, open_clip.transformer.VisionTransformer):
        raise SystemExit(f"--model {name}: A-CLIP needs open_clip's ViT image tower, this model has "
                         f"{type(model.visual).__name__}")
    return model


def synthetic_batches(seed: int, batch_size: int, image_size: int, context: int, vocab: int):
    """Yields (images, token ids) forever, plus the generator, which the crops draw from too."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
        yield images, synthetic_captions(batch_size, context, vocab, generator), generator


def random_crops(batch_size: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 5) integer boxes top, left, height, width, flip: area 50-100%, aspect 3/4-4/3 (clamped to the
    image instead of resampled), flip with probability 1/2."""
    area = size * size * (0.5 + 0.5 * torch.rand(batch_size, generator=generator))
    aspect = torch.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand(batch_size, generator=generator))
    width = torch.sqrt(area * aspect).round().clamp(1, size)
    height = torch.sqrt(area / aspect).round().clamp(1, size)
    top = ((size - height + 1) * torch.rand(batch_size, generator=generator)).floor()
    left = ((size - width + 1) * torch.rand(batch_size, generator=generator)).floor()
    flip = torch.rand(batch_size, generator=generator) < 0.5
    return torch.stack([top, left, height, width, flip.float()], 1).long()


def crop_views(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image's box, resized back to the image size (bilinear) and flipped where asked."""
    size = images.shape[-1]
    views = []
    for image, (top, left, height, width, flip) in zip(images, boxes.tolist()):
        view = F.interpolate(image[None, :, top:top + height, left:left + width], size=(size, size),
                             mode="bilinear", align_corners=False)
        views.append(view.flip(-1) if flip else view)
    return torch.cat(views)


def project_scores(scores: torch.Tensor, grid: tuple, image_size: int, boxes: torch.Tensor) -> torch.Tensor:
    """The EMA view's patch scores (B, L) as seen by each online crop (B, L), as A-CLIP's ``get_mask``:
    score grid -> bilinear to the EMA box's pixels -> cut the crop -> bilinear back to the grid. The EMA
    box is the whole image here, so the crop's offsets are its own; then the flip of the view."""
    projected = []
    for score, (top, left, height, width, flip) in zip(scores, boxes.tolist()):
        pixels = F.interpolate(score.view(1, 1, *grid), size=(image_size, image_size), mode="bilinear",
                               align_corners=False)
        crop = F.interpolate(pixels[..., top:top + height, left:left + width], size=grid, mode="bilinear",
                             align_corners=False)
        projected.append((crop.flip(-1) if flip else crop).flatten())
    return torch.stack(projected)


def ema_momentum(step: int, steps: int, base: float) -> float:
    # A-CLIP's schedule (cosine from the base momentum to 1), per step instead of per iteration of an epoch.
    return 1 - (1 - base) * (math.cos(math.pi * step / steps) + 1) / 2


@torch.no_grad()
def ema_update(ema: torch.nn.Module, online: torch.nn.Module, momentum: float) -> None:
    for p_ema, p in zip(ema.parameters(), online.parameters()):
        p_ema.lerp_(p, 1 - momentum)


def main(argv=None) -> None:
    args = parse_args(argv)
    ms_per_step, kept, patches = train(args)
    print(f"done: {args.steps} steps, {ms_per_step:.1f} ms/step, peak memory {peak_rss_mib():.0f} MiB, "
          f"kept {kept} of {patches} patches", flush=True)
    if args.no_removal or not args.compare:
        return
    # A fresh process: ru_maxrss never decreases, so this process's peak would include the run above.
    cmd = [sys.executable, __file__, "--no-removal", "--model", args.model, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--wd", str(args.wd),
           "--seed", str(args.seed)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    baseline = DONE_LINE.search(out)
    if baseline is None:
        raise RuntimeError(f"the run without removal printed no done line:\n{out}")
    baseline_ms = float(baseline["ms"])
    print(f"without removal: {baseline_ms:.1f} ms/step, peak memory {baseline['mib']} MiB, "
          f"speed-up {baseline_ms / ms_per_step:.2f}x", flush=True)


def train(args):
    """Runs the steps; returns (ms per step, patch tokens the transformer saw in the last step, patches)."""
    torch.manual_seed(args.seed)
    model = build_model(args.model)
    visual = model.visual
    grid = tuple(visual.grid_size)
    image_size = visual.image_size[0]
    patches = grid[0] * grid[1]
    ema_visual = None
    if not args.no_removal:
        # Copied before patching: a deep copy of the patched tower would carry the patch's hooks.
        ema_visual = copy.deepcopy(visual).requires_grad_(False).eval()
        handle = clipfast.patch_open_clip(
            model, token_removal=clipfast.TokenRemoval.given_scores(KEEP_RATIO, block=BLOCK))

    # What the blocks actually receive, [CLS] excluded: the count the done line reports.
    seen = {}
    visual.transformer.register_forward_pre_hook(lambda module, inputs: seen.update(patches=inputs[0].shape[1] - 1))

    optimizer = build_optimizer(model, args)
    loss_fn = clipfast.nn.ClipLoss()
    batches = synthetic_batches(args.seed, args.batch_size, image_size, model.context_length, model.vocab_size)
    log = open(args.log_losses, "w") if args.log_losses else None

    model.train()
    times = []
    progress = tqdm(range(args.steps), desc="without removal" if args.no_removal else "A-CLIP")
    for step in progress:
        start = time.perf_counter()
        images, texts, generator = next(batches)
        boxes = [random_crops(args.batch_size, image_size, generator) for _ in range(2)]
        online = torch.cat([crop_views(images, b) for b in boxes])
        text_features = model.encode_text(texts, normalize=True)
        if ema_visual is None:
            image_features = model.encode_image(online, normalize=True)
        else:
            ema_update(ema_visual, visual, ema_momentum(step, args.steps, args.momentum))
            ema_scores = attention_scores(ema_visual, images)
            scores = torch.cat([project_scores(ema_scores, grid, image_size, b) for b in boxes])
            with handle.keep_scores(scores):
                image_features = model.encode_image(online, normalize=True)
        logit_scale = model.logit_scale.exp()
        view1, view2 = image_features.chunk(2)
        loss = 0.5 * loss_fn(view1, text_features, logit_scale) + 0.5 * loss_fn(view2, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # As open_clip_train: keep the temperature within [1, 100] (ln 100 = 4.6052).
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        value = loss.item()
        times.append(time.perf_counter() - start)

        progress.set_postfix(loss=f"{value:.4f}")
        if log is not None:
            log.write(json.dumps({"step": step, "loss": value}) + "\n")
            log.flush()
    progress.close()
    if log is not None:
        log.close()
    timed = times[1:] or times
    return 1000 * sum(timed) / len(timed), seen["patches"], patches


if __name__ == "__main__":
    main()
