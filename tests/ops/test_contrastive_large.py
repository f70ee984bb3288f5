"""Index math is 64-bit: a problem with N * M > 2^31 logits through the native CPU kernels, in a fresh
process whose peak memory is measured, so that an N x M allocation (8.6 GB here) would also be caught."""

import json
import subprocess
import sys
import textwrap

import pytest

from clipfast import backends

pytestmark = pytest.mark.skipif(not backends.native_available(),
                                reason=f"native library not loaded: {backends.native_load_error}")

N = 46341  # N * N = 2,147,488,281 > 2^31

SCRIPT = textwrap.dedent(f"""
    import json, torch, clipfast
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn({N}, 4, generator=g), dim=-1).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn({N}, 4, generator=g), dim=-1).requires_grad_()
    s = torch.tensor(30.0, requires_grad=True)
    open("/proc/self/clear_refs", "w").write("5")
    before = rss("VmRSS")
    with clipfast.use_backend("cpu"):
        loss = clipfast.clip_loss(x, y, s)
        gx, gy, gs = torch.autograd.grad(loss, (x, y, s))
    peak = rss("VmHWM") - before
    row, col = torch.ops.clipfast_C.contrastive_lse(x.detach(), y.detach(), s.detach(), True)
    # Float64 checks, chunked (an N x N float64 matrix would be 17 GB), one exp per logit for both
    # directions: unit-norm rows keep |S| <= s, so exp(S - s) lies in [e^-2s, 1], safe in float64.
    xd, yd, sd, n = x.detach().double(), y.detach().double(), 30.0, {N}
    row_sum, col_sum = torch.empty(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    chunk = torch.empty(2048, n, dtype=torch.float64)
    for i in range(0, n, 2048):
        e = chunk[:min(2048, n - i)]
        torch.mm(xd[i:i + 2048], yd.T, out=e)
        e.mul_(sd).sub_(sd).exp_()
        row_sum[i:i + e.shape[0]] = e.sum(1)
        col_sum += e.sum(0)
    row_ref, col_ref = sd + row_sum.log(), sd + col_sum.log()
    loss_ref = 0.5 * (row_ref.sum() + col_ref.sum() - 2 * sd * (xd * yd).sum()) / n
    idx = [0, 1, 12345, 46339, n - 1]
    logits = sd * xd[idx] @ yd.T  # (5, N)
    g = (torch.exp(logits - row_ref[idx, None]) + torch.exp(logits - col_ref[None, :])) / (2 * n)
    gx_ref = sd * (g @ yd - yd[idx] / n)
    print(json.dumps({{
        "peak": peak, "loss": loss.item(), "loss_ref": loss_ref.item(),
        "row_err": (row.double() - row_ref).abs().max().item(),
        "col_err": (col.double() - col_ref).abs().max().item(),
        "gx_err": (gx[idx].double() - gx_ref).abs().max().item(), "gx_scale": gx_ref.abs().max().item(),
        "grads_finite": bool(torch.isfinite(gx).all() and torch.isfinite(gy).all() and torch.isfinite(gs)),
    }}))
""")


@pytest.mark.slow
def test_more_than_2_pow_31_logits_without_an_n_by_m_buffer():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["row_err"] < 1e-4 and out["col_err"] < 1e-4, out
    assert abs(out["loss"] - out["loss_ref"]) < 1e-4 * abs(out["loss_ref"]), out
    assert out["grads_finite"], out
    assert out["gx_err"] < 1e-3 * out["gx_scale"], out
    # An N x M float32 buffer would be 8.6 GB; everything the kernels need is O((N + M) * D).
    assert out["peak"] < 256 * 2**20, f"peak extra memory {out['peak'] / 2**20:.0f} MiB"
