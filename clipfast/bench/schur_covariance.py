"""The Schur-complement benchmark (CPU, fp32, d = 512): ``python -m clipfast.bench --op schur_covariance``.

Cases, each against baselines measured in the same run:

- cosine kernel (published column-cosine convention), n in {1,000, 10,000, 100,000}: clipfast's SCE
  (covariance + Schur complement + spectra) against the three d x d GEMMs over n it needs (the
  ceiling), the plain-PyTorch GEMM formulation, and, at n = 1,000 only, the faithful port of the
  published procedure (a Python double loop of column cosines; quadratic in d and slow);
- Gaussian kernel through random Fourier features, m = 2,500 (F = 2m = 5,000): clipfast's covariance
  blocks against one GEMM of the same size (the joint (n, 2F) feature matrix times its transpose,
  whose three distinct blocks are what is computed), the plain-PyTorch formulation (materialising the
  n x 2m features), and the published per-sample outer-product loop, timed on its first 128 samples
  and scaled linearly in n (it is linear in n, and minutes long at n = 10,000);
- every time is the median of repetitions after one warm-up run (the first ``eigvalsh`` of a process
  alone costs seconds). ``quick`` runs the small sizes only and shows the published procedures and the
  targets (which apply at the large sizes) as "not run".
- streaming ``SchurComplementEntropy`` over 1,000,000 samples in batches of 10,000: time and peak
  extra memory (bounded by O(F^2), independent of n).

The cases (:func:`cases`) are shared with ``benchmarks/bench_schur_covariance.py``; :func:`run` measures
them and prints the table, the targets, ``schur_covariance.csv`` and the plots.
"""

from __future__ import annotations

import contextlib

import torch

from clipfast.bench import cases as bench_cases
from clipfast.bench import report

DIM = 512
RFF_DIM = 2500
SIGMA = 3.5
COSINE_SIZES = (1000, 10000, 100000)
RFF_SIZES = (1000, 10000)
PUBLISHED_COSINE_MAX_N = 1000
PUBLISHED_RFF_SAMPLES = 128
PUBLISHED_RFF_BATCH = 16  # its per-sample cost does not depend on the batch; 64 would hold 6.4 GB of outer products
STREAM_SAMPLES, STREAM_BATCH = 1_000_000, 10_000


def pairs(n: int, d: int = DIM, seed: int = 0):
    """CLIP-like paired embeddings: images correlated with their texts, not normalised."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(n, d, generator=g)
    image = 0.6 * text + 0.8 * torch.randn(n, d, generator=g)
    return text, image


def rff_inputs(n: int):
    """The paired embeddings of :func:`pairs` and the (d, m) RFF frequencies for sigma = SIGMA."""
    text, image = pairs(n)
    return text, image, torch.randn(DIM, RFF_DIM, generator=torch.Generator().manual_seed(7)) / SIGMA


def ceiling_three_gemms(text, image):
    """The three d x d products over n that the cosine covariance needs, into preallocated outputs."""
    out = [torch.empty(text.shape[1], text.shape[1]) for _ in range(3)]

    def run():
        torch.mm(text.T, text, out=out[0])
        torch.mm(text.T, image, out=out[1])
        torch.mm(image.T, image, out=out[2])
        return out[2]
    return run


def ceiling_joint_gemm(n: int, features: int):
    """(n, 2 features)^T (n, 2 features): one GEMM of the size of the joint feature covariance."""
    joint = torch.randn(n, 2 * features)
    out = torch.empty(2 * features, 2 * features)
    return lambda: torch.mm(joint.T, joint, out=out)


def stream_metric():
    """An empty streaming SCE metric (cosine, the published convention)."""
    from clipfast.nn.schur_covariance import SchurComplementEntropy

    return SchurComplementEntropy(kernel="cosine", convention="clip-dissection")


def stream_step(metric):
    """SchurComplementEntropy over STREAM_SAMPLES samples arriving in batches of STREAM_BATCH."""
    def step():
        for i in range(STREAM_SAMPLES // STREAM_BATCH):
            metric.update(*reversed(pairs(STREAM_BATCH, seed=i)))  # update(images, texts)
        return metric.compute()
    return bench_cases.plain_step(step)


@contextlib.contextmanager
def with_backend(backend: str, step):
    """``step`` measured with every clipfast op forced to ``backend``."""
    import clipfast

    with clipfast.use_backend(backend):
        yield step


def cases(quick: bool = False) -> list[bench_cases.OpCase]:
    """Cosine SCE per n against its three GEMMs, RFF covariance per n against one joint GEMM (each with the
    plain-PyTorch formulation and, in the full run, the published procedure), then the streaming metric."""
    from clipfast.ops.schur_covariance import kernel_covariance
    from clipfast.reference import schur_covariance as published
    from clipfast.schur_covariance import sce_score

    op_cases = []
    for n in COSINE_SIZES[:2] if quick else COSINE_SIZES:
        common = dict(op="schur_covariance", group="cosine", mode="fwd", x_name="n", x_value=n,
                      shape=(("n", n), ("d", DIM)), inputs=(pairs, n), baseline="three_gemms",
                      reps=3 if n <= 10000 else 2)

        def sce(inputs):
            text, image = inputs
            return lambda: sce_score(image, text, kernel="cosine", convention="clip-dissection")

        op_cases += [
            bench_cases.OpCase(provider="three_gemms", step=lambda i: bench_cases.plain_step(ceiling_three_gemms(*i)),
                               **common),
            bench_cases.OpCase(provider="clipfast", step=lambda i, sce=sce: bench_cases.plain_step(sce(i)), **common),
            bench_cases.OpCase(provider="reference", step=lambda i, sce=sce: with_backend("reference", sce(i)), **common)]
        if n <= PUBLISHED_COSINE_MAX_N and not quick:
            op_cases.append(bench_cases.OpCase(
                provider="published", **{**common, "reps": 2},
                step=lambda i: bench_cases.plain_step(lambda: published.published_sce_score(*reversed(i), "cosine"))))
    for n in RFF_SIZES[:1] if quick else RFF_SIZES:
        common = dict(op="schur_covariance", group="rff", mode="fwd", x_name="n", x_value=n,
                      shape=(("n", n), ("d", DIM), ("m", RFF_DIM)), inputs=(rff_inputs, n), baseline="joint_gemm",
                      reps=3 if n <= 1000 else 2)

        def covariance(inputs):
            text, image, omegas = inputs
            return lambda: kernel_covariance(image, text, "rff", omegas)

        def published_loop(inputs, k=PUBLISHED_RFF_SAMPLES):
            text, image, omegas = inputs
            return lambda: published.published_covariances(image[:k], text[:k], "gaussian", omegas, PUBLISHED_RFF_BATCH)

        op_cases += [
            bench_cases.OpCase(provider="joint_gemm", step=lambda i, n=n: bench_cases.plain_step(
                ceiling_joint_gemm(n, 2 * RFF_DIM)), **common),
            bench_cases.OpCase(provider="clipfast", step=lambda i, f=covariance: bench_cases.plain_step(f(i)), **common),
            bench_cases.OpCase(provider="reference", step=lambda i, f=covariance: with_backend("reference", f(i)),
                               **common)]
        if not quick:  # linear in n: timed on the first samples, scaled to n
            op_cases.append(bench_cases.OpCase(
                provider="published_loop", **{**common, "reps": 2}, time_scale=n / PUBLISHED_RFF_SAMPLES,
                step=lambda i, f=published_loop: bench_cases.plain_step(f(i))))
    if not quick:
        op_cases.append(bench_cases.OpCase(
            op="schur_covariance", group="stream", provider="clipfast_streaming", mode="fwd", x_name="samples",
            x_value=STREAM_SAMPLES, shape=(("samples", STREAM_SAMPLES), ("batch", STREAM_BATCH), ("d", DIM)),
            inputs=(stream_metric,), step=stream_step, reps=1, warmup=0))
    return op_cases


def judge(rows: list[report.Row]) -> report.Targets:
    """The targets of this run's rows; those at sizes the run did not reach are reported as not run."""
    targets = report.Targets()
    n = max(COSINE_SIZES)
    ours, ceiling = (bench_cases.find_row(rows, "cosine", p, x_value=n) for p in ("clipfast", "three_gemms"))
    if ours:
        targets.check(ours.p50 <= 1.5 * ceiling.p50, f"cosine SCE at n={n}: {ours.p50:.3f} s = "
                                                     f"{ours.p50 / ceiling.p50:.2f}x the three GEMMs' "
                                                     f"{ceiling.p50:.3f} s (target <= 1.5x)")
    else:
        targets.not_run(f"cosine SCE at n={n} <= 1.5x the three d x d GEMMs", f"quick mode stops at n={COSINE_SIZES[1]}")
    n = max(RFF_SIZES)
    ours, ceiling, loop = (bench_cases.find_row(rows, "rff", p, x_value=n)
                           for p in ("clipfast", "joint_gemm", "published_loop"))
    if ours and loop:
        targets.check(loop.p50 >= 50 * ours.p50, f"RFF covariance at n={n}, m={RFF_DIM}: {loop.p50 / ours.p50:.0f}x "
                                                 f"faster than the published loop (target >= 50x)")
        targets.check(ours.p50 <= 1.5 * ceiling.p50, f"RFF covariance at n={n}: {ours.p50:.2f} s = "
                                                     f"{ours.p50 / ceiling.p50:.2f}x one GEMM of the same size, "
                                                     f"{ceiling.p50:.2f} s (target <= 1.5x)")
    else:
        targets.not_run(f"RFF covariance at n={n}: >= 50x faster than the published loop and <= 1.5x one GEMM of the "
                        f"same size", f"quick mode stops at n={RFF_SIZES[0]}")
    stream = bench_cases.find_row(rows, "stream", "clipfast_streaming")
    if stream:
        targets.check(stream.peak_extra_bytes < 256 * 2**20, f"streaming over {STREAM_SAMPLES:,} samples in bounded "
                                                             f"memory: {stream.peak_extra_bytes / 2**20:.0f} MiB extra")
    else:
        targets.not_run(f"streaming over {STREAM_SAMPLES:,} samples in bounded memory", "make bench runs it")
    return targets


def run(quick: bool = False, out_dir: str = "bench-results", log=print) -> tuple[str, bool]:
    """Measures :func:`cases`, checks the targets, writes the CSV and plots; returns (report, all met)."""
    rows = bench_cases.measure_cases(cases(quick), log)
    notes = ["three_gemms / joint_gemm: the ceilings, plain torch.mm into preallocated outputs (cosine: the three "
             f"d x d products over n; rff: (n x {4 * RFF_DIM})^T (n x {4 * RFF_DIM})); clipfast: sce_score "
             "(cosine) and kernel_covariance (rff); reference: the same under clipfast.use_backend('reference'), the "
             "plain-PyTorch GEMM formulation (rff: materialising the n x 2m features).",
             f"published: the published procedure's port (a Python double loop of column cosines, n <= "
             f"{PUBLISHED_COSINE_MAX_N}); published_loop: its per-sample outer products, timed on the first "
             f"{PUBLISHED_RFF_SAMPLES} samples and scaled by n/{PUBLISHED_RFF_SAMPLES} (no peak memory)."]
    if quick:
        notes.append("not run in quick mode: published and published_loop (minutes of Python loops), the largest n, "
                     "streaming (make bench runs them).")
    else:
        notes.append(f"stream: {STREAM_SAMPLES:,} samples in batches of {STREAM_BATCH:,}; the samples alone would be "
                     f"{2 * STREAM_SAMPLES * DIM * 4 / 2**30:.1f} GiB.")
    title = (f"Schur-complement kernel covariance, CPU x{torch.get_num_threads()} threads, fp32, d={DIM}; "
             "median of repetitions after a warm-up run")
    targets = judge(rows)
    text = report.publish("schur_covariance", title, rows, targets, out_dir, report.device_name(),
                          report.op_columns("s", group_width=8, shape_width=22, provider_width=20), notes,
                          {"x_label": f"n (samples), d = {DIM}, fp32", "time_label": "time [s]"})
    return text, targets.met
