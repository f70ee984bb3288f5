"""Train a small open_clip CLIP model on synthetic data with open_clip's or clipfast's contrastive loss.

Shows ``clipfast.nn.ClipLoss`` dropped into open_clip's own training recipe in place of
``open_clip.loss.ClipLoss``: a real ``open_clip.CLIP`` model (ViT image tower, causal text transformer,
random init, nothing downloaded), AdamW with open_clip's parameter groups and ViT defaults, the loss
called as ``loss(**model_out, output_dict=True)``, ``logit_scale`` clamped to [0, ln 100] after every
step, and under torchrun DistributedDataParallel over gloo with the loss gathering features across
processes (``--local-loss --gather-with-grad`` by default there, as production open_clip runs).

Batches are random images and random captions from a seeded generator. Every process draws the same
global batch and trains on its own slice of it, so a run's data does not depend on the number of
processes, and runs with ``--loss open_clip`` and ``--loss clipfast`` from the same seed produce the same
loss sequence up to float rounding (compare two ``--log-losses`` files).

One process:

    python examples/train_clip.py --loss clipfast --steps 50 --batch-size 128

Two processes on one machine (``--batch-size`` is per process: the same global batch of 128):

    torchrun --nproc_per_node=2 examples/train_clip.py --loss clipfast --steps 50 --batch-size 64

Rank 0 shows a progress bar and ends with
``done: <steps> steps, <images/s> images/s, peak memory <MiB> MiB`` (global images per second over all
steps; peak resident memory of the rank-0 process).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time

import open_clip
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import clipfast

# open_clip's ViT CLIP config layout (as model_configs/ViT-B-32.json), at toy size so that a step takes well
# under a second on two CPU cores. head_width 32 gives the image tower 2 heads, like the text tower.
MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "head_width": 32, "layers": 2},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 2},
}


def describe_model(cfg=MODEL_CFG) -> str:
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    return (f"open_clip.CLIP, embed dim {cfg['embed_dim']}; "
            f"image tower: ViT, {v['image_size']}x{v['image_size']} px, patch {v['patch_size']}, width {v['width']}, "
            f"{v['layers']} layers, {v['width'] // v['head_width']} heads; "
            f"text tower: causal transformer, context {t['context_length']}, vocab {t['vocab_size']}, "
            f"width {t['width']}, {t['layers']} layers, {t['heads']} heads")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=f"Train a small CLIP ({describe_model()}) on synthetic image-text pairs.")
    parser.add_argument("--loss", choices=("open_clip", "clipfast"), default="clipfast",
                        help="open_clip.loss.ClipLoss or its drop-in clipfast.nn.ClipLoss (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per process (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=5e-4,
                        help="AdamW learning rate (default: %(default)s, open_clip's for ViTs)")
    parser.add_argument("--wd", type=float, default=0.2,
                        help="AdamW weight decay (default: %(default)s, open_clip's)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the model init and the synthetic data (default: %(default)s)")
    parser.add_argument("--local-loss", action=argparse.BooleanOptionalAction, default=None,
                        help="each process computes the loss of its own rows against all columns "
                             "(default: on with more than one process)")
    parser.add_argument("--gather-with-grad", action=argparse.BooleanOptionalAction, default=None,
                        help="backpropagate through the feature all-gather "
                             "(default: on with more than one process)")
    parser.add_argument("--dist-impl", choices=("gather", "ring"), default="gather",
                        help="how features travel between processes: all-gather, as open_clip, or clipfast's "
                             "ring (clipfast only; no process holds the gathered features) (default: %(default)s)")
    parser.add_argument("--log-losses", metavar="PATH",
                        help="rank 0 writes one JSON line per step and process: step, rank, loss")
    args = parser.parse_args(argv)
    if args.dist_impl == "ring" and args.loss != "clipfast":
        parser.error("--dist-impl ring needs --loss clipfast")
    return args


def synthetic_batches(seed: int, per_rank: int, rank: int, world_size: int):
    """Yields this process's slice of an endless stream of global batches (images, token ids).

    Every process draws the whole global batch from the same generator, so the data is the same for any
    number of processes. Captions look like open_clip tokenizer output: SOT, words, EOT, zero padding;
    EOT is the largest id, which is what the text tower pools on.
    """
    vision, text = MODEL_CFG["vision_cfg"], MODEL_CFG["text_cfg"]
    size = vision["image_size"]
    global_batch = per_rank * world_size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    generator = torch.Generator().manual_seed(seed)
    while True:
        images = torch.randn(global_batch, 3, size, size, generator=generator)
        tokens = synthetic_captions(global_batch, text["context_length"], text["vocab_size"], generator)
        yield images[mine], tokens[mine]


def synthetic_captions(batch: int, context: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, context) token ids shaped like open_clip tokenizer output: SOT, random words, EOT (the
    largest id, which the text tower pools on), zero padding."""
    sot, eot = vocab - 2, vocab - 1
    words = torch.randint(1, sot, (batch, context), generator=generator)
    n_words = torch.randint(1, context - 1, (batch, 1), generator=generator)
    tokens = torch.where(torch.arange(context) <= n_words, words, 0)
    tokens[:, 0] = sot
    return tokens.scatter_(1, n_words + 1, eot)


def build_loss(args, rank: int, world_size: int):
    # As open_clip_train.main.create_loss builds it.
    kwargs = dict(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, cache_labels=True,
                  rank=rank, world_size=world_size)
    if args.loss == "open_clip":
        return open_clip.loss.ClipLoss(**kwargs)
    # clipfast's all-gather path is dist_impl=None: open_clip's semantics, chosen by local_loss/gather_with_grad.
    return clipfast.nn.ClipLoss(dist_impl="ring" if args.dist_impl == "ring" else None, **kwargs)


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    # open_clip_train's groups: no weight decay on gains, biases and logit_scale.
    def no_decay(name, p):
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [{"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": args.wd}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-6)


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def main(argv=None) -> None:
    args = parse_args(argv)
    # torchrun sets WORLD_SIZE (and RANK, MASTER_ADDR, ...); a plain run has neither.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world_size > 1
    if args.local_loss is None:
        args.local_loss = distributed
    if args.gather_with_grad is None:
        args.gather_with_grad = distributed
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    try:
        train(args, rank, world_size)
    finally:
        if distributed:
            dist.destroy_process_group()


def train(args, rank: int, world_size: int) -> None:
    # Same seed on every process: identical initial weights (DDP would broadcast rank 0's anyway).
    torch.manual_seed(args.seed)
    model = open_clip.CLIP(**MODEL_CFG, output_dict=True)
    module = model
    if world_size > 1:
        model = DistributedDataParallel(model)
    optimizer = build_optimizer(module, args)
    loss_fn = build_loss(args, rank, world_size)
    batches = synthetic_batches(args.seed, args.batch_size, rank, world_size)
    log = open(args.log_losses, "w") if args.log_losses and rank == 0 else None

    model.train()
    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc=f"{args.loss} x{world_size}", disable=rank != 0)
    for step in progress:
        images, texts = next(batches)
        model_out = model(images, texts)
        losses = loss_fn(**model_out, output_dict=True)
        total_loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        optimizer.step()
        # As open_clip_train: keep the temperature within [1, 100] (ln 100 = 4.6052).
        with torch.no_grad():
            module.logit_scale.clamp_(0, math.log(100))

        value = total_loss.item()
        progress.set_postfix(loss=f"{value:.4f}")
        if args.log_losses:
            # Each process has its own loss (with local_loss, over its own rows); rank 0 writes them all.
            values = [value]
            if world_size > 1:
                values = [None] * world_size
                dist.all_gather_object(values, value)
            if log is not None:
                for r, v in enumerate(values):
                    log.write(json.dumps({"step": step, "rank": r, "loss": v}) + "\n")
                log.flush()
    elapsed = time.perf_counter() - start
    progress.close()
    if log is not None:
        log.close()
    if rank == 0:
        images_per_s = args.steps * args.batch_size * world_size / elapsed
        print(f"done: {args.steps} steps, {images_per_s:.1f} images/s, peak memory {peak_rss_mib():.0f} MiB",
              flush=True)


if __name__ == "__main__":
    main()
