"""The distributed losses on 2 and 4 gloo processes (127.0.0.1, free port, bounded time):

- per rank, loss and every gradient equal open_clip 3.3.0's module in the same configuration
  (ClipLoss: the four local_loss x gather_with_grad combinations and the ring; DistillClipLoss: the four
  combinations; CoCaLoss: the global and the local loss; SigLipLoss: every dist_impl);
- the production setting (local loss, gather with grad; the ring) summed over ranks equals a
  single-process computation over the full batch;
- multi-positive group ids and labels through the local loss (this rank's rows against the gathered
  columns, with their ids) average over ranks to the one-process loss, gradients included;
- mismatched per-rank batch sizes and feature dimensions raise the same ValueError on every rank.

Workers write their findings to JSON files; the assertions run in the test process.
"""

import json
import os

import pytest
import torch

import clipfast
from clipfast.testing.gloo import run_gloo

pytest.importorskip("open_clip.loss", reason="open-clip-torch is not installed")

N_PER_RANK, DIM = 6, 10
CLIP_CONFIGS = [  # (local_loss, gather_with_grad, dist_impl)
    (False, False, None), (False, True, None), (True, False, None), (True, True, None), (True, True, "ring"),
]
SIGLIP_IMPLS = ["bidir", "shift", "reduce", "gather"]


def _global_batch(world_size, dtype=torch.float64):
    g = torch.Generator().manual_seed(1234)
    image = torch.nn.functional.normalize(torch.randn(world_size * N_PER_RANK, DIM, generator=g, dtype=dtype), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(world_size * N_PER_RANK, DIM, generator=g, dtype=dtype), dim=-1)
    return image, text


def _run_module(module, image, text, log_scale, bias, siglip):
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    log_scale, bias = log_scale.clone().requires_grad_(), bias.clone().requires_grad_()
    args = (image, text, log_scale.exp(), bias)
    loss = module(*args)
    grads = torch.autograd.grad(loss, (image, text, log_scale, bias))
    return [loss.item()] + [g.flatten().tolist() for g in grads]


def _run_coca(module, image, text, log_scale, logits, labels):
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    log_scale, logits = log_scale.clone().requires_grad_(), logits.clone().requires_grad_()
    contrastive, caption = module(image, text, logits, labels, log_scale.exp())
    grads = torch.autograd.grad(contrastive + caption, (image, text, log_scale, logits))
    return [contrastive.item(), caption.item()] + [g.flatten().tolist() for g in grads]


def _run_distill(module, image, text, log_scale, teacher_image, teacher_text, teacher_scale):
    image, text, log_scale = image.clone().requires_grad_(), text.clone().requires_grad_(), log_scale.clone().requires_grad_()
    contrastive, distill = module(image, text, log_scale.exp(), teacher_image, teacher_text, teacher_scale)
    grads = torch.autograd.grad(contrastive + 0.7 * distill, (image, text, log_scale))
    return [contrastive.item(), distill.item()] + [g.flatten().tolist() for g in grads]


def _max_diff(a, b):
    if isinstance(a, float):
        return abs(a - b)
    return max(abs(x - y) for x, y in zip(a, b))


def _parity_worker(rank, world_size, out_dir):
    import open_clip.loss as oc

    image, text = _global_batch(world_size)
    rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    image, text = image[rows], text[rows]
    log_scale, bias = torch.tensor(2.659, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    report = {}
    for local_loss, gather_with_grad, dist_impl in CLIP_CONFIGS:
        kwargs = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)
        ours = _run_module(clipfast.nn.ClipLoss(**kwargs, dist_impl=dist_impl), image, text, log_scale, bias, False)
        theirs = _run_module(oc.ClipLoss(**kwargs), image, text, log_scale, bias, False)
        report[f"clip-{local_loss}-{gather_with_grad}-{dist_impl}"] = {
            "ours": ours, "diff": [_max_diff(a, b) for a, b in zip(ours, theirs)]}
    teacher_g = torch.Generator().manual_seed(200 + rank)  # this rank's teacher features, another width
    teacher_image = torch.randn(N_PER_RANK, DIM + 3, generator=teacher_g, dtype=torch.float64)
    teacher_text = torch.randn(N_PER_RANK, DIM + 3, generator=teacher_g, dtype=torch.float64)
    teacher_scale = torch.tensor(30.0, dtype=torch.float64)
    for local_loss, gather_with_grad, _ in CLIP_CONFIGS[:4]:
        kwargs = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)
        ours = _run_distill(clipfast.nn.DistillClipLoss(**kwargs), image, text, log_scale, teacher_image, teacher_text,
                            teacher_scale)
        theirs = _run_distill(oc.DistillClipLoss(**kwargs), image, text, log_scale, teacher_image, teacher_text,
                              teacher_scale)
        report[f"distill-{local_loss}-{gather_with_grad}"] = {
            "ours": ours, "diff": [_max_diff(a, b) for a, b in zip(ours, theirs)]}
    g = torch.Generator().manual_seed(100 + rank)  # this rank's captions
    logits = torch.randn(N_PER_RANK, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (N_PER_RANK, 5), generator=g)
    for local_loss, gather_with_grad in ((False, False), (True, True)):
        kwargs = dict(caption_loss_weight=2.0, clip_loss_weight=1.0, local_loss=local_loss,
                      gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)
        ours = _run_coca(clipfast.nn.CoCaLoss(**kwargs), image, text, log_scale, logits, labels)
        theirs = _run_coca(oc.CoCaLoss(**kwargs), image, text, log_scale, logits, labels)
        report[f"coca-{local_loss}-{gather_with_grad}"] = {
            "ours": ours, "diff": [_max_diff(a, b) for a, b in zip(ours, theirs)]}
    for impl in SIGLIP_IMPLS:
        kwargs = dict(rank=rank, world_size=world_size, dist_impl=impl)
        ours = _run_module(clipfast.nn.SigLipLoss(**kwargs), image, text, log_scale, bias, True)
        theirs = _run_module(oc.SigLipLoss(**kwargs), image, text, log_scale, bias, True)
        report[f"siglip-{impl}"] = {"ours": ours, "diff": [_max_diff(a, b) for a, b in zip(ours, theirs)]}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def _error_worker(rank, world_size, out_dir):
    image, text = _global_batch(world_size, torch.float32)
    s, b = torch.tensor(10.0), torch.tensor(-1.0)
    bad = {
        "batch": (image[: N_PER_RANK + rank], text[: N_PER_RANK + rank]),  # rank-dependent n
        "dim": (image[:N_PER_RANK, : DIM - rank], text[:N_PER_RANK, : DIM - rank]),  # rank-dependent D
    }
    messages = {}
    for name, (i, t) in bad.items():
        for label, module in (("clip", clipfast.nn.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank,
                                                            world_size=world_size)),
                              ("ring", clipfast.nn.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank,
                                                            world_size=world_size, dist_impl="ring")),
                              ("siglip", clipfast.nn.SigLipLoss(rank=rank, world_size=world_size))):
            try:
                module(i, t, s, b)
                messages[f"{name}-{label}"] = "no error"
            except ValueError as error:
                messages[f"{name}-{label}"] = str(error)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(messages, f)


def _read(out_dir, world_size):
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(world_size)]


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_per_rank_parity_with_open_clip(world_size, tmp_path):
    run_gloo(_parity_worker, world_size, (str(tmp_path),), timeout=240)
    reports = _read(tmp_path, world_size)
    for rank, report in enumerate(reports):
        for config, result in report.items():
            # loss, d image, d text, d logit_scale (log), d bias
            assert max(result["diff"]) < 1e-10, f"rank {rank} {config}: max differences {result['diff']}"

    # Summed over ranks, the production setting and the ring equal one process over the full batch.
    image, text = _global_batch(world_size)
    image.requires_grad_()
    text.requires_grad_()
    log_scale = torch.tensor(2.659, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64)
    for loss_name, config, full_loss in (
        ("clip", "clip-True-True-None", clipfast.clip_loss),
        ("clip ring", "clip-True-True-ring", clipfast.clip_loss),
        ("siglip", "siglip-bidir", clipfast.siglip_loss),
    ):
        full = full_loss(image, text, log_scale.exp(), bias)
        g_image, g_text, g_scale = torch.autograd.grad(full, (image, text, log_scale))
        per_rank = [r[config]["ours"] for r in reports]
        mean_loss = sum(p[0] for p in per_rank) / world_size
        assert abs(mean_loss - full.item()) < 1e-10, loss_name
        # Each rank's feature gradient is the sum over ranks' losses: / W is the gradient of the mean.
        dist_image = torch.tensor([v for p in per_rank for v in p[1]], dtype=torch.float64).reshape(-1, DIM) / world_size
        dist_text = torch.tensor([v for p in per_rank for v in p[2]], dtype=torch.float64).reshape(-1, DIM) / world_size
        torch.testing.assert_close(dist_image, g_image, rtol=1e-9, atol=1e-12, msg=loss_name)
        torch.testing.assert_close(dist_text, g_text, rtol=1e-9, atol=1e-12, msg=loss_name)
        # logit_scale: rank-local gradients, averaged by DDP.
        assert abs(sum(p[3][0] for p in per_rank) / world_size - g_scale.item()) < 1e-10, loss_name


@pytest.mark.slow
def test_mismatched_shapes_raise_on_every_rank(tmp_path):
    run_gloo(_error_worker, 2, (str(tmp_path),), timeout=120)
    for rank, messages in enumerate(_read(tmp_path, 2)):
        for case, message in messages.items():
            expected = "batch size differs" if case.startswith("batch") else "feature dimension differs"
            assert expected in message, f"rank {rank} {case}: {message}"


def _positives_worker(rank, world_size, out_dir):
    """Multi-positive and labelled InfoNCE over ranks the way open_clip's local loss runs: this rank's rows
    against the gathered (with grad) columns, with their ids / labels."""
    image, text = _global_batch(world_size)
    ids, labels = _global_positives(world_size)
    rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    image, text = image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
    log_scale = torch.tensor(2.659, dtype=torch.float64, requires_grad=True)
    all_image, all_text = clipfast.distributed.gather_features(image, text, local_loss=True, gather_with_grad=True)
    report = {}
    inverse = torch.argsort(labels)  # text j's positive image
    for name, row_kwargs, col_kwargs in (
        ("group_ids", dict(group_ids=(ids[rows], ids)), dict(group_ids=(ids[rows], ids))),
        ("labels", dict(labels=labels[rows]), dict(labels=inverse[rows])),
    ):
        loss = (clipfast.contrastive_cross_entropy(image, all_text, log_scale.exp(), **row_kwargs)
                + clipfast.contrastive_cross_entropy(text, all_image, log_scale.exp(), **col_kwargs)) / 2
        grads = torch.autograd.grad(loss, (image, text, log_scale))
        report[name] = [loss.item()] + [g.flatten().tolist() for g in grads]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def _global_positives(world_size):
    g = torch.Generator().manual_seed(99)
    n = world_size * N_PER_RANK
    return torch.randint(0, n // 3, (n,), generator=g), torch.randperm(n, generator=g)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_multi_positive_and_labels_over_ranks_equal_one_process(world_size, tmp_path):
    run_gloo(_positives_worker, world_size, (str(tmp_path),), timeout=240)
    reports = _read(tmp_path, world_size)
    image, text = _global_batch(world_size)
    image.requires_grad_()
    text.requires_grad_()
    log_scale = torch.tensor(2.659, dtype=torch.float64, requires_grad=True)
    ids, labels = _global_positives(world_size)
    for name, kwargs in (("group_ids", dict(group_ids=ids)), ("labels", dict(labels=labels))):
        full = clipfast.clip_loss(image, text, log_scale.exp(), **kwargs)
        g_image, g_text, g_scale = torch.autograd.grad(full, (image, text, log_scale))
        per_rank = [r[name] for r in reports]
        assert abs(sum(p[0] for p in per_rank) / world_size - full.item()) < 1e-10, name
        dist_image = torch.tensor([v for p in per_rank for v in p[1]], dtype=torch.float64).reshape(-1, DIM) / world_size
        dist_text = torch.tensor([v for p in per_rank for v in p[2]], dtype=torch.float64).reshape(-1, DIM) / world_size
        torch.testing.assert_close(dist_image, g_image, rtol=1e-9, atol=1e-12, msg=name)
        torch.testing.assert_close(dist_text, g_text, rtol=1e-9, atol=1e-12, msg=name)
        assert abs(sum(p[3][0] for p in per_rank) / world_size - g_scale.item()) < 1e-10, name
