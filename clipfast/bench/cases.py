"""Benchmark cases and providers, shared by ``python -m clipfast.bench`` and ``benchmarks/bench_*.py``.

Contrastive (:class:`Case`): a provider turns a case into a ``step()`` callable over inputs it creates
once: forward only (``mode="fwd"``) or forward + backward (``mode="fwd_bwd"``), the way a training step
calls the loss (``logit_scale`` is a learnable log-scale exponentiated inside the step, as in open_clip).

Every other op (:class:`OpCase`): each op module, named by the op's stem
(``clipfast.bench.schur_covariance``, ``.token_medoids``, ``.token_keep``), lists its cases in
``cases(quick)``; a case names the function that builds its inputs and the step over them, so nothing
is built before a case runs, and :func:`measure_cases` turns the list into report rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, ContextManager, Optional

import torch

import clipfast
from clipfast import backends
from clipfast.bench import measure as bench_measure
from clipfast.bench import report
from clipfast.reference.contrastive import (clip_loss_reference, distill_loss_reference, multi_positive_loss_reference,
                                            siglip_loss_reference)

# clip, siglip: open_clip's ClipLoss and SigLipLoss. distill: open_clip's DistillClipLoss (a teacher of the
# same width). multipos: multi-positive InfoNCE with five captions per image id (COCO's layout), against the
# materialised formulation (open_clip has none: cross_entropy with probability targets over an N x N mask).
LOSSES = ("clip", "siglip", "distill", "multipos")
SIZES = (1024, 4096, 16384, 65536)
QUICK_SIZES = (1024, 4096)
DIM = 512
# Largest N of a loss (every size of SIZES otherwise): the new losses' targets stop at N = 16384.
LOSS_MAX_N = {"distill": 16384, "multipos": 16384}
CAPTIONS_PER_ID = 5

# Largest N each baseline runs at: open_clip needs ~4 N^2 floats (16 GiB and minutes on 2 CPU cores at
# N = 32768), the references as much; on the CPU the reference curves stop earlier to keep `make bench`
# short, on a GPU every baseline stops at 32768 (64 GiB each at 65536).
BASELINE_MAX_N = {
    "cpu": {"open_clip": 16384, "reference": 4096, "reference_compiled": 4096},
    "cuda": {"open_clip": 32768, "reference": 32768, "reference_compiled": 32768},
}


def baseline(loss: str) -> str:
    """The provider a loss's ratios and targets are taken against: open_clip's module where open_clip has the
    loss, the materialised reference (plain PyTorch) for multi-positive InfoNCE."""
    return "reference" if loss == "multipos" else "open_clip"


@dataclasses.dataclass(frozen=True)
class Case:
    op: str  # clipfast op stem
    loss: str  # "clip" | "siglip"
    provider: str
    n: int
    d: int = DIM
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    mode: str = "fwd_bwd"

    @property
    def flops(self) -> float:
        """The work this provider really executes: its N x N x D GEMM-equivalents (:data:`GEMM_EQUIVALENTS`)
        at 2 FLOPs per multiply-add. Throughput on it is how busy the provider keeps the machine."""
        return gemm_equivalents(self.provider, self.loss, self.mode) * 2.0 * self.n * self.n * self.d

    @property
    def useful_flops(self) -> float:
        """The fused cost model, the same for every provider: 4 GEMMs of N x N x D (1 forward, 3 backward:
        recompute, G @ B, G.T @ A); distillation 8 (the student's 4, the teacher's log-sum-exps and its
        softmaxes contracted with the student's features). Throughput on it compares providers by the
        result they deliver."""
        units = (8 if self.loss == "distill" else 4) if self.mode == "fwd_bwd" else 1
        return units * 2.0 * self.n * self.n * self.d

    @property
    def id(self) -> str:
        return f"{self.loss}-{self.provider}-N{self.n}-D{self.d}-{str(self.dtype)[6:]}-{self.mode}"


# N x N x D GEMM-equivalents each provider executes, per (loss, mode), read from the code:
# - open_clip: ClipLoss multiplies twice (logits_per_image and logits_per_text) and backpropagates both
#   products (2 GEMMs each); SigLipLoss multiplies once.
# - reference (eager and compiled): one logits product, its backward 2.
# - clipfast-cpu: one GEMM per tile gives both LSE directions; backward recomputes each tile once, then
#   G @ B and G.T @ A (csrc/cpu/contrastive.cpp).
# - clipfast-triton / clipfast-cuda: row and column LSE sweeps (1 for SigLIP), then one launch per
#   gradient, each a logit recompute plus G @ y (triton_kernels/contrastive.py, csrc/cuda/contrastive.cu;
#   tests/ops/test_contrastive_triton_work.py counts the Triton ones).
# - inf_cl (GPU benchmark only, CLIP as two one-directional calls): per direction one LSE sweep and two
#   gradient kernels (dq, dk) that each recompute the logits: 1 + 2 x 2 = 5, 10 in all.
# - distill: open_clip builds the student's and the teacher's logits twice each (4) and backpropagates
#   the student's two products (4); the reference builds each once (2) plus the student's backward (2);
#   clipfast-cpu: student and teacher LSE (2), the teacher's softmaxes times the student's features
#   (recompute + 2 products: 3), one gradient sweep for both losses (3); Triton/CUDA: the LSE sweeps
#   are two launches each (4), then 3 + 3.
# - multipos: the kernels of clip (the labels are an O(N D) epilogue).
GEMM_EQUIVALENTS = {
    "inf_cl": {("clip", "fwd"): 2, ("clip", "fwd_bwd"): 10},
    "open_clip": {("clip", "fwd"): 2, ("clip", "fwd_bwd"): 6, ("siglip", "fwd"): 1, ("siglip", "fwd_bwd"): 3,
                  ("distill", "fwd"): 4, ("distill", "fwd_bwd"): 8},
    "reference": {("clip", "fwd"): 1, ("clip", "fwd_bwd"): 3, ("siglip", "fwd"): 1, ("siglip", "fwd_bwd"): 3,
                  ("distill", "fwd"): 2, ("distill", "fwd_bwd"): 4, ("multipos", "fwd"): 1, ("multipos", "fwd_bwd"): 3},
    "clipfast-cpu": {("clip", "fwd"): 1, ("clip", "fwd_bwd"): 4, ("siglip", "fwd"): 1, ("siglip", "fwd_bwd"): 4,
                     ("distill", "fwd"): 5, ("distill", "fwd_bwd"): 8, ("multipos", "fwd"): 1, ("multipos", "fwd_bwd"): 4},
    "clipfast-triton": {("clip", "fwd"): 2, ("clip", "fwd_bwd"): 6, ("siglip", "fwd"): 1, ("siglip", "fwd_bwd"): 5,
                        ("distill", "fwd"): 7, ("distill", "fwd_bwd"): 10, ("multipos", "fwd"): 2,
                        ("multipos", "fwd_bwd"): 6},
}
GEMM_EQUIVALENTS["reference_compiled"] = GEMM_EQUIVALENTS["reference"]
GEMM_EQUIVALENTS["clipfast-reference"] = GEMM_EQUIVALENTS["reference"]
GEMM_EQUIVALENTS["clipfast-cuda"] = GEMM_EQUIVALENTS["clipfast-triton"]


def gemm_equivalents(provider: str, loss: str, mode: str) -> int:
    """How many N x N x D GEMMs ``provider`` executes for one ``loss`` step in ``mode``."""
    try:
        return GEMM_EQUIVALENTS[provider][(loss, mode)]
    except KeyError:
        raise ValueError(f"no GEMM count for provider {provider!r}, loss {loss!r}, mode {mode!r}") from None


def _open_clip_loss(loss: str):
    from open_clip.loss import ClipLoss, DistillClipLoss, SigLipLoss

    return {"clip": ClipLoss, "siglip": SigLipLoss, "distill": DistillClipLoss}[loss]()


# Every provider is fn(loss, image, text, scale, bias, extra) -> the loss to backpropagate; ``extra`` is the
# teacher (features, features, scale) for distill and the (N,) group ids for multipos (see make_step).

def _clipfast(backend: str) -> Callable:
    def fn(loss, image, text, scale, bias, extra):
        with clipfast.use_backend(backend):
            if loss == "clip":
                return clipfast.clip_loss(image, text, scale)
            if loss == "distill":
                return sum(clipfast.clip_distill_loss(image, text, scale, *extra))
            if loss == "multipos":
                return clipfast.clip_loss(image, text, scale, group_ids=extra)
            return clipfast.siglip_loss(image, text, scale, bias)
    return fn


def _reference(loss, image, text, scale, bias, extra):
    if loss == "clip":
        return clip_loss_reference(image, text, scale)
    if loss == "distill":
        return sum(distill_loss_reference(image, text, scale, *extra))
    if loss == "multipos":
        return multi_positive_loss_reference(image, text, scale, extra, extra)
    return siglip_loss_reference(image, text, scale, bias)


_compiled_reference = None


def _reference_compiled(loss, image, text, scale, bias, extra):
    global _compiled_reference
    if _compiled_reference is None:
        _compiled_reference = torch.compile(_reference, fullgraph=True, dynamic=False)
    return _compiled_reference(loss, image, text, scale, bias, extra)


def _open_clip(loss, image, text, scale, bias, extra):
    module = _open_clip_loss(loss)
    if loss == "distill":
        return sum(module(image, text, scale, *extra))
    return module(image, text, scale) if loss == "clip" else module(image, text, scale, bias)


def providers(device: str, loss: str = "clip") -> list[str]:
    """Providers of ``loss`` that can run on ``device`` here, baselines first."""
    names = []
    try:
        import open_clip.loss  # noqa: F401
        if loss != "multipos":  # open_clip has no multi-positive loss
            names.append("open_clip")
    except ImportError:
        pass
    names += ["reference", "reference_compiled"]
    clipfast_backends = [b for b in backends.available_backends("contrastive", device) if b != "reference"]
    if device == "cpu":  # Triton on CPU is the interpreter: a test vehicle, not a benchmark
        clipfast_backends = [b for b in clipfast_backends if b != "triton"]
    return names + [f"clipfast-{b}" for b in clipfast_backends]


def _loss_fn(provider: str) -> Callable:
    if provider == "open_clip":
        return _open_clip
    if provider == "reference":
        return _reference
    if provider == "reference_compiled":
        return _reference_compiled
    if provider.startswith("clipfast-"):
        return _clipfast(provider.split("-", 1)[1])
    raise ValueError(f"unknown provider {provider!r}")


def contrastive_cases(device: str = "cpu", sizes=SIZES, losses=LOSSES, mode: str = "fwd_bwd") -> list[Case]:
    cases = []
    for loss in losses:
        for provider in providers(device, loss):
            max_n = BASELINE_MAX_N["cuda" if device.startswith("cuda") else "cpu"].get(provider, math.inf)
            if provider == baseline(loss):  # the baseline runs wherever its loss's targets are judged
                max_n = max(max_n, BASELINE_MAX_N["cpu"]["open_clip"])
            for n in sizes:
                if n <= min(max_n, LOSS_MAX_N.get(loss, math.inf)):
                    cases.append(Case("contrastive", loss, provider, n, device=device, mode=mode))
    return cases


def make_step(case: Case, seed: int = 0) -> Callable[[], Optional[torch.Tensor]]:
    """Inputs for ``case`` (unit-norm features, CLIP's initial scale 1/0.07, SigLIP's bias -10; distill: a
    frozen teacher of the same width at scale 100; multipos: ids shared by ``CAPTIONS_PER_ID`` pairs, in
    random order) and the step that runs the loss (and its backward in ``fwd_bwd`` mode)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def features(requires_grad=case.mode == "fwd_bwd"):
        x = torch.nn.functional.normalize(torch.randn(case.n, case.d, generator=g), dim=-1)
        return x.to(device=case.device, dtype=case.dtype).requires_grad_(requires_grad)

    image, text = features(), features()
    init_scale = math.log(10.0) if case.loss == "siglip" else math.log(1 / 0.07)
    log_scale = torch.tensor(init_scale, device=case.device, requires_grad=case.mode == "fwd_bwd")
    bias = torch.tensor(-10.0, device=case.device, requires_grad=case.mode == "fwd_bwd")
    extra = None
    if case.loss == "distill":
        extra = (features(False), features(False), torch.tensor(100.0, device=case.device))
    elif case.loss == "multipos":
        extra = (torch.randperm(case.n, generator=g) // CAPTIONS_PER_ID).to(case.device)
    fn = _loss_fn(case.provider)

    def step():
        loss = fn(case.loss, image, text, log_scale.exp(), bias, extra)
        if case.mode == "fwd_bwd":
            loss.backward()
            for t in (image, text, log_scale, bias):
                t.grad = None
        return loss

    return step


def matmul_step(n: int, d: int = DIM, dtype=torch.float32, device="cpu") -> Callable:
    """The machine's own ceiling for the same problem: one N x D by D x N product, written into a
    preallocated output so that it measures the GEMM, not page faults of a fresh N x N buffer."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return lambda: torch.mm(a, b.T, out=out)


# ------------------------------------------------------------------------------------- the other ops
@dataclasses.dataclass(frozen=True)
class OpCase:
    """One provider on one configuration of an op other than the contrastive losses.

    ``inputs`` is ``(function, *args)``: consecutive cases with an equal tuple share one call of
    ``function(*args)`` (a ViT built once for its three providers). ``step(inputs)`` is a context manager
    that yields the callable to time: a patched model is patched only while it is measured. Steps return
    their outputs so that ``benchmarks/bench_<op>.py`` can check them.
    """
    op: str
    group: str  # rows compared with each other (report.Row.group)
    provider: str
    mode: str  # "fwd" | "fwd_bwd"
    x_name: str
    x_value: int
    shape: tuple  # ((name, size), ...): every size of the case
    inputs: tuple  # (function, *args)
    step: Callable[[Any], ContextManager[Callable[[], Any]]]
    baseline: Optional[str] = None  # provider of the same group, size and mode to compare with
    # Time the baseline's step in alternation with this one (measure.measure_alongside) and take the time
    # ratio against those timings: for memory-bound steps, whose speed on a shared machine drifts by more
    # than a target's margin between two cases measured apart. The baseline keeps its own row too.
    paired: bool = False
    reps: int = 3
    warmup: int = 1
    time_scale: float = 1.0  # a step timed on a 1/time_scale slice of the work (an O(n) loop), scaled up
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def id(self) -> str:
        return f"{self.group}-{self.provider}-{self.x_name}{self.x_value}-{self.mode}".replace(" ", "_")

    def build_inputs(self) -> Any:
        function, *args = self.inputs
        return function(*args)


def plain_step(step: Callable[[], Any]) -> ContextManager[Callable[[], Any]]:
    """An :attr:`OpCase.step` result for a step that needs no setting around it."""
    return contextlib.nullcontext(step)


def measure_case(case: OpCase, inputs: Any, baseline_case: Optional[OpCase] = None) -> report.Row:
    """``case`` on ``inputs`` (from ``case.build_inputs()``): ``reps`` timed steps after ``warmup`` ones; with
    ``baseline_case`` (same inputs) its step is timed in alternation (:attr:`OpCase.paired`)."""
    with case.step(inputs) as step, (baseline_case.step(inputs) if baseline_case
                                     else contextlib.nullcontext(None)) as baseline_step:
        timing, paired = bench_measure.measure_alongside(step, baseline_step, case.device, reps=case.reps,
                                                         warmup=case.warmup)
    scaled = case.time_scale != 1.0  # the peak of the sliced run says nothing about the whole one
    return report.Row(case.op, case.group, case.provider, case.mode, case.x_name, case.x_value, dict(case.shape),
                      case.dtype, timing.p50 * case.time_scale, timing.p20 * case.time_scale,
                      timing.p80 * case.time_scale, None if scaled else timing.peak_extra_bytes, case.baseline,
                      paired_baseline_p50=paired.p50 * case.time_scale if paired else None)


def _paired_baseline(case: OpCase, cases: list[OpCase]) -> Optional[OpCase]:
    if not case.paired:
        return None
    baseline = next(c for c in cases if c.group == case.group and c.mode == case.mode and c.x_value == case.x_value
                    and c.provider == case.baseline)
    assert baseline.inputs == case.inputs, f"{case.id}: a paired baseline must share the case's inputs"
    return baseline


def measure_cases(cases: list[OpCase], log=print) -> list[report.Row]:
    """Every case measured in order, as report rows. The inputs of consecutive cases with equal ``inputs``
    are built once, and dropped before the next ones are built."""
    rows, held_key, held = [], None, None
    for case in cases:
        if case.inputs != held_key:
            held = None  # free the previous inputs first: two ViTs need not coexist
            held_key, held = case.inputs, case.build_inputs()
        rows.append(measure_case(case, held, _paired_baseline(case, cases)))
        paired = rows[-1].paired_baseline_p50
        log(f"  {case.id}: {rows[-1].p50:.4f} s" + (f" ({case.baseline} alongside: {paired:.4f} s)" if paired else ""))
    return rows


def find_row(rows: list[report.Row], group: str, provider: str, mode: Optional[str] = None,
             x_value: Optional[int] = None) -> Optional[report.Row]:
    """The row of ``provider`` in ``group`` (at ``mode`` and ``x_value`` when given); None when it did not run."""
    return next((r for r in rows if r.group == group and r.provider == provider
                 and mode in (None, r.mode) and x_value in (None, r.x_value)), None)
