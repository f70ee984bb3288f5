"""`make gpu-check`: the one-shot script for a machine with a GPU (under 8 minutes).

1. environment report (python -m clipfast.info);
2. the GPU tests (tests/gpu: Triton and CUDA kernels against the float64 reference, compile, memory);
3. the GPU benchmark (fp32, D = 512, N up to 65536; open_clip up to 16384) and the token-keep kernel
   (B = 64, L = 196, D = 768, keep 98) per GPU backend against topk + gather, and A-CLIP's scores
   (ViT-B/16, batch 32) against materialising every attention map;
4. a short table, last.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

import clipfast
from clipfast import info
from clipfast.bench import token_keep


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA device; none is visible here.")
        return 2
    started = time.perf_counter()
    print(info.report(), flush=True)
    results = {}
    for backend in ("triton", "cuda"):  # separate processes: a faulting kernel must not poison the other
        env = {**os.environ, "CLIPFAST_GPU_BACKENDS": backend}
        results[backend] = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/gpu"], env=env).returncode
    from clipfast.bench import __main__ as bench

    # The CUDA kernels join the benchmark only when their tests passed (an illegal access would end it).
    exclude = () if results["cuda"] == 0 else ("clipfast-cuda",)
    rows, _ = bench.run("cuda", (1024, 4096, 16384, 65536), ("clip", "siglip"), "bench-results/gpu",
                        log=lambda m: print(m, flush=True), exclude=exclude)
    keep = {}
    for backend in [b for b in ("triton", "cuda") if results[b] == 0]:
        with clipfast.use_backend(backend):
            keep[backend] = token_keep.keep_kernel_rows(quick=False, device="cuda")
    from clipfast.bench import attention_scores

    score_rows = attention_scores.run(batch=32, device="cuda")
    print(f"\ngpu-check summary ({torch.cuda.get_device_name()}, {time.perf_counter() - started:.0f} s)")
    for backend, code in results.items():
        print(f"  GPU tests, {backend}: {'passed' if code == 0 else f'FAILED (pytest exit {code})'}")
    print(f"{'loss':<7}{'N':>7}  {'provider':<19}{'time':>10}{'peak extra':>14}")
    for row in rows:
        if row.provider.startswith("clipfast-") or row.provider == "open_clip":
            print(f"{row.loss:<7}{row.n:>7}  {row.provider:<19}{row.p50 * 1e3:>8.2f} ms{row.peak_extra_bytes / 2**20:>10.0f} MiB")
    for backend, timings in keep.items():
        print(f"token keep ({backend}): fwd {timings['ours_fwd'].p50 * 1e3:.3f} ms (copy {timings['copy'].p50 * 1e3:.3f} ms), "
              f"fwd+bwd {timings['ours'].p50 * 1e3:.3f} ms vs topk+gather {timings['base'].p50 * 1e3:.3f} ms")
    for row in score_rows:
        print(f"scores, {row['method']}: {row['ms']:.1f} ms, {row['peak_extra_mb']:.0f} MiB peak extra")
    return max(results.values())


if __name__ == "__main__":
    sys.exit(main())
