"""The GPU benchmark of the GPU check (``bash tools/gpu_check.sh bench``; design: tools/gpu_check.py).

``python -m clipfast.bench.gpu_check [--out DIR] [--budget-s S] [--cuda-backend]``

1. The contrastive losses (CLIP's InfoNCE and SigLIP), forward + backward, D = 512,
   N in (1024, 4096, 16384, 65536), in the order a CLIP run cares about:
   - ``bf16``: bf16 features under ``torch.autocast("cuda", torch.bfloat16)``, the training case;
   - ``tf32``: fp32 features, ``torch.set_float32_matmul_precision("high")``;
   - ``fp32``: fp32 features, ``"highest"`` (exact fp32).
   Providers, all in the same run and mode: ``torch.mm`` of the same shape (N x D by D x N, the
   machine's own ceiling), clipfast's Triton kernels (the default on CUDA) and, with
   ``--cuda-backend`` (set when its GPU tests passed), its CUDA kernels; open_clip's ``ClipLoss`` /
   ``SigLipLoss`` where the N x N logits fit; Inf-CL (``inf_cl``, CLIP only) when importable.
2. The token-keep kernel per GPU backend (B = 64, L = 196, D = 768, keep 98) against topk + gather, and
   A-CLIP's scores (open_clip ViT-B/16, batch 32) against materialising every attention map; after
   the bf16 losses, before tf32 and fp32, so that the slow exact-fp32 rows cannot crowd them out.
3. The targets, judged on this run's own numbers (PASS / FAIL / not run), then a table.

Timing: every case gets 2 untimed warm-ups (the first compiles and autotunes), then 20 / 10 / 5 / 5
timed repetitions at N = 1024 / 4096 / 16384 / 65536 (3 at 65536 in exact fp32); the median, p20 and
p80 of CUDA-synchronised wall-clock times. Peak extra memory: ``torch.cuda.max_memory_allocated``
during the first timed step above the allocation before it. Throughput counts the GEMM-equivalents
the targets are written in (one GEMM = 2 N^2 D FLOPs; 6 per CLIP step, 5 per SigLIP step) for every
provider alike, so the column is a rate that compares providers by time.

Budget: under 5 minutes on an H100 (estimate: imports and CUDA start ~15 s; Triton compiles and
autotunes ~30-60 s in all; bf16 and tf32 rows ~20 s each, the largest one GEMM-equivalent of
N = 65536 being ~6 ms bf16 and ~10 ms tf32; exact fp32 at 65536 ~1-3 s a step, ~15-40 s; token keep
and A-CLIP ~20 s). A deadline (``--budget-s``) still guards it: a case whose estimated cost (its
previous size's step time, scaled by N^2) exceeds the time left is recorded as "not run: time budget",
and every row goes to the JSON file as soon as it is measured.

Output: ``gpu-bench.json`` (every row, the targets, the environment) and ``gpu-bench.md`` (targets and
table) in ``--out``. ``--device cpu`` with small ``--sizes`` runs the same code on a CPU (a smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from typing import Callable, Optional

import torch

import clipfast
from clipfast.bench import cases as bench_cases

SIZES = (1024, 4096, 16384, 65536)
DIM = 512
MODES = ("bf16", "tf32", "fp32")
GEMM_EQUIVALENTS = {"clip": 6, "siglip": 5}  # the targets' count (issue: minimum fused work per fwd+bwd)
GIB = 2 ** 30
TARGET_MM_FRACTION = 0.55
TARGET_OPEN_CLIP_SPEEDUP, TARGET_OPEN_CLIP_N = 1.3, 16384
TARGET_MEMORY_BYTES, TARGET_N = GIB, 65536


def reps_for(n: int, mode: str) -> int:
    if n <= 1024:
        return 20
    if n <= 4096:
        return 10
    return 3 if (n >= 65536 and mode == "fp32") else 5


class Bench:
    def __init__(self, device: str, out: str, budget_s: float, log: Callable[[str], None] = print,
                 reps: Optional[int] = None):
        self.reps = reps
        self.device = device
        self.cuda = device.startswith("cuda")
        self.out = out
        self.deadline = time.monotonic() + budget_s
        self.log = log
        self.rows: list[dict] = []
        self.sections: dict = {}
        self.errors: list[str] = []
        self.targets: list[dict] = []
        self.env: dict = {}
        self._noted: set = set()

    # -------------------------------------------------------------------------------------- plumbing
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def save(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        data = {"environment": self.env, "rows": self.rows, "sections": self.sections, "targets": self.targets,
                "errors": self.errors}
        path = os.path.join(self.out, "gpu-bench.json")
        with open(path + ".tmp", "w") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(path + ".tmp", path)

    def guarded(self, name: str, fn: Callable[[], None]) -> None:
        """Run one section; a failure is logged and recorded, and the next section still runs."""
        started = time.monotonic()
        try:
            fn()
            status = "done"
        except Exception as error:  # noqa: BLE001  (one failing section must not lose the others)
            status = f"error: {type(error).__name__}: {error}"
            self.errors.append(f"{name}: {traceback.format_exc(limit=6)}")
            self.log(f"  {name} FAILED: {type(error).__name__}: {error}")
        self.sections[name] = {"status": status, "seconds": round(time.monotonic() - started, 1)}
        self.free()
        self.save()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def time_step(self, step: Callable[[], object], warmup: int, reps: int) -> dict:
        for _ in range(warmup):
            step()
            self.sync()
        gc.collect()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        times, peak = [], None
        for i in range(reps):
            start = time.perf_counter()
            step()
            self.sync()
            times.append(time.perf_counter() - start)
            if i == 0 and self.cuda:
                peak = torch.cuda.max_memory_allocated() - before
        ordered = sorted(times)

        def q(p):
            return ordered[min(len(ordered) - 1, max(0, round(p * (len(ordered) - 1))))]

        return {"median_ms": statistics.median(times) * 1e3, "p20_ms": q(0.2) * 1e3, "p80_ms": q(0.8) * 1e3,
                "min_ms": ordered[0] * 1e3, "reps": reps, "warmup": warmup,
                "peak_extra_mib": None if peak is None else peak / 2 ** 20}

    # ------------------------------------------------------------------------------------ providers
    def loss_providers(self, loss: str, use_cuda_backend: bool) -> list[str]:
        from clipfast import backends

        names = ["torch.mm"]
        device = torch.device(self.device)
        if self.cuda:
            names.append("clipfast-triton")
            if use_cuda_backend and backends.refusal_reason("contrastive", "cuda", device) is None:
                names.append("clipfast-cuda")
        else:
            names.append(f"clipfast-{backends.select('contrastive', device)}")
        try:
            import open_clip.loss  # noqa: F401
            names.append("open_clip")
        except ImportError:
            self.note_once("open_clip", "open_clip is not importable here: its rows are not run")
        if loss == "clip" and self.cuda:
            try:
                import inf_cl  # noqa: F401
                names.append("inf_cl")
            except ImportError:
                self.note_once("inf_cl", "inf_cl is not importable here: its rows are not run")
        return names

    def note_once(self, key: str, text: str) -> None:
        if key not in self._noted:
            self._noted.add(key)
            self.log(f"  note: {text}")

    def features(self, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.nn.functional.normalize(torch.randn(n, DIM, generator=g), dim=-1)
        return x.to(device=self.device, dtype=dtype).requires_grad_()

    def open_clip_bytes(self, n: int, mode: str) -> float:
        """open_clip's peak for one fwd+bwd: both N x N logits in the matmul dtype, their fp32 copies,
        log-softmax outputs and gradients (cross-entropy runs in fp32 under autocast): ~20-24 bytes N^2."""
        return (20 if mode == "bf16" else 24) * n * n

    def make_step(self, provider: str, loss: str, n: int, mode: str) -> Callable[[], object]:
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        if provider == "torch.mm":
            a, b = self.features(n, dtype, 0).detach(), self.features(n, dtype, 1).detach()
            out = torch.empty(n, n, device=self.device, dtype=dtype)
            return lambda: torch.mm(a, b.T, out=out)
        image, text = self.features(n, dtype, 0), self.features(n, dtype, 1)
        log_scale = torch.tensor(math.log(1 / 0.07) if loss == "clip" else math.log(10.0), device=self.device,
                                 requires_grad=True)
        bias = torch.tensor(-10.0, device=self.device, requires_grad=True)
        params = (image, text, log_scale, bias)
        if provider.startswith("clipfast-"):
            backend = provider.split("-", 1)[1]

            def loss_fn():
                with clipfast.use_backend(backend):
                    if loss == "clip":
                        return clipfast.clip_loss(image, text, log_scale.exp())
                    return clipfast.siglip_loss(image, text, log_scale.exp(), bias)
        elif provider == "open_clip":
            from open_clip.loss import ClipLoss, SigLipLoss

            module = ClipLoss() if loss == "clip" else SigLipLoss()

            def loss_fn():
                if loss == "clip":
                    return module(image, text, log_scale.exp())
                return module(image, text, log_scale.exp(), bias)
        elif provider == "inf_cl":
            from inf_cl import cal_flash_loss  # single-process entry point (no torch.distributed needed)

            def loss_fn():  # the symmetric loss: both directions, as Inf-CLIP trains
                scale = log_scale.exp()
                return 0.5 * (cal_flash_loss(image, text, scale=scale).mean()
                              + cal_flash_loss(text, image, scale=scale).mean())
        else:
            raise ValueError(provider)

        def step():
            with self.autocast(mode):
                value = loss_fn()
            value.backward()
            for t in params:
                t.grad = None

        return step

    def autocast(self, mode: str):
        if mode == "bf16":
            return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -------------------------------------------------------------------------------------- sections
    def losses(self, mode: str, sizes, losses, use_cuda_backend: bool, reserve_s: float) -> None:
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest" if mode == "fp32" else "high")
        try:
            self.log(f"\n[{mode}] contrastive fwd+bwd, D = {DIM}, float32 matmul precision "
                     f"{torch.get_float32_matmul_precision()!r}{', bf16 autocast' if mode == 'bf16' else ''}")
            last: dict = {}
            for n in sizes:
                for loss in losses:
                    for provider in self.loss_providers(loss, use_cuda_backend):
                        if provider == "torch.mm" and loss != losses[0]:
                            continue  # one ceiling per (mode, N)
                        self.one_case(mode, loss if provider != "torch.mm" else "-", provider, n, last, reserve_s)
        finally:
            torch.set_float32_matmul_precision(previous)

    def one_case(self, mode: str, loss: str, provider: str, n: int, last: dict, reserve_s: float) -> None:
        row = {"section": "contrastive", "mode": mode, "loss": loss, "provider": provider, "n": n, "d": DIM}
        reps, warmup = self.reps or reps_for(n, mode), 2
        key = (loss, provider)
        if key in last:
            prev_n, prev_ms = last[key]
            estimate = prev_ms / 1e3 * (n / prev_n) ** 2 * (reps + warmup)
        else:
            estimate = 0.0
        if provider == "open_clip" and self.cuda:
            free, _ = torch.cuda.mem_get_info()
            need = self.open_clip_bytes(n, mode)
            if need > 0.85 * free:
                row["status"] = f"not run: needs ~{need / GIB:.0f} GiB for its N x N logits, {free / GIB:.0f} GiB free"
        if "status" not in row and estimate > self.remaining() - reserve_s:
            row["status"] = f"not run: time budget (estimated {estimate:.0f} s, {self.remaining():.0f} s left)"
        if "status" not in row:
            try:
                step = self.make_step(provider, loss, n, mode)
                row.update(self.time_step(step, warmup, reps))
                row["status"] = "ok"
                last[key] = (n, row["median_ms"])
            except torch.cuda.OutOfMemoryError as error:
                row["status"] = f"oom: {str(error).splitlines()[0][:160]}"
            except Exception as error:  # noqa: BLE001  (recorded; the next case still runs)
                first_line = str(error).splitlines()[0][:200] if str(error) else ""
                row["status"] = f"error: {type(error).__name__}: {first_line}"
                self.errors.append(f"{mode} {loss} {provider} N={n}: {traceback.format_exc(limit=6)}")
            finally:
                step = None
                self.free()
        if row["status"] == "ok":
            gemm = 2.0 * n * n * DIM
            row["tflops"] = gemm * (1 if provider == "torch.mm" else GEMM_EQUIVALENTS[loss]) / (row["median_ms"] / 1e3) / 1e12
            # The provider's own work (clipfast.bench.cases.GEMM_EQUIVALENTS): how busy it keeps the GPU.
            real = 1 if provider == "torch.mm" else bench_cases.gemm_equivalents(provider, loss, "fwd_bwd")
            row["real_tflops"] = gemm * real / (row["median_ms"] / 1e3) / 1e12
            memory = "" if row["peak_extra_mib"] is None else f", {row['peak_extra_mib']:.0f} MiB extra"
            self.log(f"  {mode} {loss:<6} {provider:<16} N={n:<6} {row['median_ms']:9.3f} ms "
                     f"(p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f}, {row['reps']} reps){memory}")
        else:
            self.log(f"  {mode} {loss:<6} {provider:<16} N={n:<6} {row['status']}")
        self.rows.append(row)
        self.save()

    def token_keep(self, use_cuda_backend: bool) -> None:
        from clipfast.bench import token_keep

        for backend in ["triton"] + (["cuda"] if use_cuda_backend else []):
            with clipfast.use_backend(backend):
                timings = token_keep.keep_kernel_rows(quick=False, device=self.device)
            case = f"B={token_keep.BATCH}, L={token_keep.PATCHES}+1, D={token_keep.DIM}, keep {token_keep.KEEP}"
            row = {"section": "token_keep", "provider": f"clipfast-{backend}", "status": "ok", "case": case}
            row.update({f"{name}_ms": t.p50 * 1e3 for name, t in timings.items()})
            self.rows.append(row)
            self.log(f"  token keep ({backend}): forward {row['ours_fwd_ms']:.3f} ms "
                     f"(plain copy {row['copy_ms']:.3f} ms), fwd+bwd {row['ours_ms']:.3f} ms "
                     f"vs topk+gather {row['base_ms']:.3f} ms")
            self.save()

    def aclip_scores(self) -> None:
        from clipfast.bench import attention_scores

        for result in attention_scores.run(batch=32, device=self.device):
            row = {"section": "aclip_scores", "status": "ok", **result}
            self.rows.append(row)
            self.log(f"  A-CLIP scores, {result['method']}: {result['ms']:.1f} ms, "
                     f"{result['peak_extra_mb']:.0f} MiB peak extra")
            self.save()

    # --------------------------------------------------------------------------------------- targets
    def find(self, mode, loss, provider, n) -> Optional[dict]:
        return next((r for r in self.rows if r.get("section") == "contrastive" and r["mode"] == mode
                     and r["loss"] == loss and r["provider"] == provider and r["n"] == n), None)

    def judge(self) -> None:
        clipfast_providers = sorted({r["provider"] for r in self.rows
                                     if r.get("section") == "contrastive" and r["provider"].startswith("clipfast-")})
        targets = []

        def add(name, provider, loss, value, goal, met, why=None):
            targets.append({"target": name, "provider": provider, "loss": loss, "value": value, "goal": goal,
                            "status": "not run" if met is None else "PASS" if met else "FAIL", "why": why})

        for provider in clipfast_providers:
            for loss, count in GEMM_EQUIVALENTS.items():
                ours, mm = self.find("bf16", loss, provider, TARGET_N), self.find("bf16", "-", "torch.mm", TARGET_N)
                name = (f"bf16 N={TARGET_N} D={DIM} fwd+bwd at >= {TARGET_MM_FRACTION:.0%} of torch.mm "
                        f"(on {count} GEMM-equivalents)")
                if ours and mm and ours["status"] == mm["status"] == "ok":
                    fraction = count * mm["median_ms"] / ours["median_ms"]
                    add(name, provider, loss, f"{fraction:.1%}", f">= {TARGET_MM_FRACTION:.0%}",
                        fraction >= TARGET_MM_FRACTION)
                else:
                    add(name, provider, loss, None, None, None, _why(ours, mm))
                oc = self.find("bf16", loss, "open_clip", TARGET_OPEN_CLIP_N)
                ours16 = self.find("bf16", loss, provider, TARGET_OPEN_CLIP_N)
                name = f"bf16 N={TARGET_OPEN_CLIP_N} >= {TARGET_OPEN_CLIP_SPEEDUP}x faster than open_clip"
                if oc and ours16 and oc["status"] == ours16["status"] == "ok":
                    speedup = oc["median_ms"] / ours16["median_ms"]
                    add(name, provider, loss, f"{speedup:.2f}x", f">= {TARGET_OPEN_CLIP_SPEEDUP}x",
                        speedup >= TARGET_OPEN_CLIP_SPEEDUP)
                else:
                    add(name, provider, loss, None, None, None, _why(ours16, oc))
                name = f"bf16 N={TARGET_N} extra memory < {TARGET_MEMORY_BYTES / GIB:.0f} GiB"
                if ours and ours["status"] == "ok" and ours.get("peak_extra_mib") is not None:
                    add(name, provider, loss, f"{ours['peak_extra_mib']:.0f} MiB", "< 1024 MiB",
                        ours["peak_extra_mib"] * 2 ** 20 < TARGET_MEMORY_BYTES)
                else:
                    add(name, provider, loss, None, None, None, _why(ours))
        if not clipfast_providers:
            add("every target", "clipfast", "-", None, None, None, "no clipfast row was measured")
        self.targets = targets

    def report(self) -> str:
        lines = [f"Targets ({self.env.get('device')}, judged on this run):"]
        for t in self.targets:
            verdict = f"{t['value']} (goal {t['goal']})" if t["value"] is not None else f"({t['why']})"
            lines.append(f"  {t['status']} {t['provider']} {t['loss']}: {t['target']}: {verdict}")
        lines.append("")
        header = (f"{'mode':<5} {'loss':<6} {'N':>6}  {'provider':<16}{'median':>11}{'p20-p80':>19}"
                  f"{'extra MiB':>10}{'TFLOP/s*':>9}{'vs mm':>7}{'real**':>8}")
        lines.append(header)
        for r in self.rows:
            if r.get("section") != "contrastive":
                continue
            if r["status"] != "ok":
                lines.append(f"{r['mode']:<5} {r['loss']:<6} {r['n']:>6}  {r['provider']:<16} {r['status']}")
                continue
            mm = self.find(r["mode"], "-", "torch.mm", r["n"])
            vs = (f"{r['tflops'] / mm['tflops']:.0%}" if mm and mm["status"] == "ok" and r["provider"] != "torch.mm"
                  else "")
            extra = "" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
            lines.append(f"{r['mode']:<5} {r['loss']:<6} {r['n']:>6}  {r['provider']:<16}{r['median_ms']:>8.3f} ms"
                         f"{r['p20_ms']:>9.3f}-{r['p80_ms']:<9.3f}{extra:>10}{r['tflops']:>9.1f}{vs:>7}"
                         f"{r['real_tflops']:>8.1f}")
        lines.append("* TFLOP/s counted on 6 (CLIP) / 5 (SigLIP) GEMM-equivalents of 2 N^2 D for every provider "
                     "(torch.mm: 1), so it compares providers by time.")
        lines.append("** TFLOP/s on the GEMM-equivalents the provider really executes (open_clip 6 / 3, Inf-CL 10, "
                     "clipfast 6 / 5; clipfast.bench.cases.GEMM_EQUIVALENTS): how busy it keeps the tensor cores.")
        for r in self.rows:
            if r.get("section") == "token_keep":
                lines.append(f"token keep ({r['provider']}, {r['case']}): forward {r['ours_fwd_ms']:.3f} ms "
                             f"(plain copy {r['copy_ms']:.3f} ms), fwd+bwd {r['ours_ms']:.3f} ms vs topk+gather "
                             f"{r['base_ms']:.3f} ms")
            elif r.get("section") == "aclip_scores":
                lines.append(f"A-CLIP scores, {r['method']}: {r['ms']:.1f} ms, {r['peak_extra_mb']:.0f} MiB peak extra")
        for name, section in self.sections.items():
            if section["status"] != "done":
                lines.append(f"section {name}: {section['status']}")
        return "\n".join(lines)


def _why(*rows) -> str:
    for row in rows:
        if row is None:
            return "not measured in this run"
        if row["status"] != "ok":
            return f"{row['provider']}: {row['status']}"
    return "no memory figure on this device"


def _environment(device: str) -> dict:
    from clipfast import backends

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "clipfast": clipfast.__version__,
           "native": backends.native_available(), "python": sys.version.split()[0]}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    for name in ("open_clip", "inf_cl"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "present")
        except ImportError:
            env[name] = None
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / GIB, 1), multiprocessors=props.multi_processor_count)
    else:
        env["device"] = f"CPU x{torch.get_num_threads()} threads"
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipfast.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench-results/gpu")
    parser.add_argument("--budget-s", type=float, default=270.0, help="deadline for the whole benchmark (default 270)")
    parser.add_argument("--cuda-backend", action="store_true", help="also time the opt-in CUDA kernels")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke test")
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--losses", nargs="+", default=list(GEMM_EQUIVALENTS), choices=list(GEMM_EQUIVALENTS))
    parser.add_argument("--no-extras", action="store_true", help="skip the token-keep and A-CLIP sections")
    parser.add_argument("--reps", type=int, help="timed repetitions of every case (default: by N, see above)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("clipfast.bench.gpu_check: no CUDA device visible; nothing measured (use --device cpu for a smoke test).")
        return 2

    def log(text: str) -> None:
        print(text, flush=True)

    bench = Bench(args.device, args.out, args.budget_s, log, args.reps)
    bench.guarded("environment", lambda: bench.env.update(_environment(args.device)))
    log(f"clipfast GPU benchmark: {bench.env.get('device')}, torch {bench.env.get('torch')}, "
        f"triton {bench.env.get('triton')}, open_clip {bench.env.get('open_clip')}, inf_cl {bench.env.get('inf_cl')}; "
        f"N = {args.sizes}, D = {DIM}, budget {args.budget_s:.0f} s")
    sizes = sorted(args.sizes)
    extras_reserve = 0.0 if args.no_extras else 40.0
    for mode in args.modes:
        reserve = extras_reserve if mode == "bf16" else 0.0
        bench.guarded(f"contrastive {mode}", lambda mode=mode, reserve=reserve: bench.losses(
            mode, sizes, args.losses, args.cuda_backend, reserve))
        if mode == "bf16" and not args.no_extras:
            log("\n[token keep and A-CLIP scores]")
            bench.guarded("token keep", lambda: bench.token_keep(args.cuda_backend))
            bench.guarded("A-CLIP scores", bench.aclip_scores)
    bench.guarded("targets", bench.judge)
    text = bench.report()
    log("\n" + text)
    with open(os.path.join(args.out, "gpu-bench.md"), "w") as f:
        f.write(f"## GPU benchmark ({bench.env.get('device')}, torch {bench.env.get('torch')}, "
                f"triton {bench.env.get('triton')})\n\n```\n{text}\n```\n")
    bench.save()
    log(f"\nRows: {os.path.join(args.out, 'gpu-bench.json')}; summary: {os.path.join(args.out, 'gpu-bench.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
