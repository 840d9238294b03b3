"""GPU: mamba_ssm's fused selective scan == the pure-torch reference (values and gradients),
and the reference itself on CUDA. Skipped without CUDA (conftest); the fused comparisons also
need ``mamba_ssm`` (``pip install mamba-ssm --no-build-isolation`` on the GPU host)."""
from __future__ import annotations

import pytest
import torch

import tokconv.ops.selective_scan as ss
from tokconv.ops import selective_scan_naive, selective_scan_ref, use_backend

pytestmark = pytest.mark.gpu
needs_fused = pytest.mark.skipif(not ss.HAS_FUSED, reason="mamba_ssm selective scan not importable")

# (rtol, atol) on outputs / gradients relative to their scale, per input dtype (mamba's own
# tests use about 6e-4 for fp32 and 3e-3/5e-2 for bf16)
TOL = {torch.float32: (1e-3, 1e-3), torch.bfloat16: (3e-2, 3e-2)}


def _inputs(dtype, batch=2, dim=64, dstate=16, length=2048, bc="variable", seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s, dt=dtype: torch.randn(*s, generator=g, device=device, dtype=dt)
    shape_bc = {"variable": (batch, dstate, length), "grouped": (batch, 2, dstate, length)}[bc]
    x = {"u": r(batch, dim, length), "delta": r(batch, dim, length) * 0.5,
             "A": -torch.rand(dim, dstate, generator=g, device=device) * 4 - 0.1,  # fp32 (mamba)
             "B": r(*shape_bc), "C": r(*shape_bc), "D": r(dim, dt=torch.float32),
             "z": r(batch, dim, length), "delta_bias": r(dim, dt=torch.float32) * 0.1}
    return {k: v.requires_grad_() for k, v in x.items()}


def _run(fn, x):
    out = fn(**x, delta_softplus=True)
    w = torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(1),
                    device="cuda", dtype=out.dtype)
    grads = torch.autograd.grad((out * w).sum(), list(x.values()))
    return out, dict(zip(x, grads))


def _close(a, b, dtype, what):
    rtol, atol = TOL[dtype]
    scale = b.float().abs().max().clamp(min=1e-6)
    err = (a.float() - b.float()).abs().max() / scale
    assert err <= max(rtol, atol), f"{what}: max error {err:.2e} of scale {scale:.2e} ({dtype})"


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bc", ["variable", "grouped"])
@pytest.mark.parametrize("length", [2048, 300])
def test_fused_equals_reference(dtype, bc, length):
    x = _inputs(dtype, bc=bc, length=length)
    with use_backend("fused"):
        out_f, g_f = _run(ss.selective_scan_fn, x)
    with use_backend("reference"):
        out_r, g_r = _run(ss.selective_scan_fn, x)
    assert out_f.dtype == out_r.dtype == dtype
    _close(out_f, out_r, dtype, "out")
    for k in g_r:
        _close(g_f[k], g_r[k], dtype, f"grad {k}")


def test_reference_on_cuda_equals_naive():
    x = _inputs(torch.float32, dim=32, length=333)
    out_r, g_r = _run(selective_scan_ref, x)
    out_n, g_n = _run(selective_scan_naive, x)
    _close(out_r, out_n, torch.float32, "out")
    for k in g_r:
        _close(g_r[k], g_n[k], torch.float32, f"grad {k}")


def test_dispatch_on_cuda_follows_the_backend():
    x = {k: v.detach() for k, v in _inputs(torch.float32, dim=16, length=128).items()}
    with use_backend("reference"):
        ref = ss.selective_scan_fn(**x, delta_softplus=True)
    torch.testing.assert_close(ref, selective_scan_ref(**x, delta_softplus=True))
    if ss.HAS_FUSED:
        assert ss.backend() in ("fused", "reference")
        with use_backend("fused"):
            fused = ss.selective_scan_fn(**x, delta_softplus=True)
        assert not torch.equal(fused, ref)          # a different kernel really ran ...
        torch.testing.assert_close(fused, ref, rtol=1e-3, atol=1e-3)  # ... with the same result


@needs_fused
def test_ssm_converter_fused_equals_reference_bf16():
    from tokconv import create_converter
    torch.manual_seed(0)
    model = create_converter("ssm_base").cuda().eval()
    x = torch.randn(2, 2048, 1024, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with use_backend("fused"):
            a = model(x)
        with use_backend("reference"):
            b = model(x)
    for k in a:
        cos = torch.nn.functional.cosine_similarity(a[k].float().flatten(1),
                                                    b[k].float().flatten(1))
        assert cos.min() > 0.999, k
