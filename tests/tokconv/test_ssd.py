"""Chunked SSD scan (Mamba-2) == the literal recurrence, values and gradients; dispatch, errors."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tokconv.ops import ssd_scan_fn, ssd_scan_naive, ssd_scan_ref, use_backend


def _inputs(batch=2, length=37, heads=4, headdim=3, groups=2, dstate=5, dtype=torch.float64,
            seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    x = {"x": r(batch, length, heads, headdim), "dt": r(batch, length, heads) * 0.5,
         "A": -torch.rand(heads, generator=g, dtype=dtype) * 4 - 0.1,
         "B": r(batch, length, groups, dstate), "C": r(batch, length, groups, dstate)}
    kw = {"D": r(heads), "z": r(batch, length, heads, headdim), "dt_bias": r(heads) * 0.1}
    return ({k: v.requires_grad_() for k, v in x.items()},
            {k: v.requires_grad_() for k, v in kw.items()})


def _grads(fn, args, kw, **extra):
    out, last = fn(*args.values(), **extra, **kw, dt_softplus=True, return_final_states=True)
    # weighted, not just sum(); on the output's device (the CUDA test runs this too)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    leaves = {**args, **kw}
    grads = torch.autograd.grad((out * w).sum() + last.square().sum(), list(leaves.values()))
    return out, last, dict(zip(leaves, grads))


@pytest.mark.parametrize("length,chunk", [(37, 8), (64, 16), (5, 64), (20, 1), (2048, 64)])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_chunked_equals_sequential_values_and_gradients(length, chunk, groups):
    args, kw = _inputs(length=length, groups=groups, batch=1 if length > 100 else 2)
    out_r, last_r, g_r = _grads(ssd_scan_ref, args, kw, chunk_size=chunk)
    out_n, last_n, g_n = _grads(ssd_scan_naive, args, kw)
    assert out_r.shape == args["x"].shape and last_r.shape == (out_r.shape[0], 4, 3, 5)
    torch.testing.assert_close(out_r, out_n, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last_r, last_n, rtol=1e-10, atol=1e-10)
    for k in g_r:
        torch.testing.assert_close(g_r[k], g_n[k], rtol=1e-9, atol=1e-9, msg=f"grad wrt {k}")
        assert g_r[k].abs().sum() > 0, k


def test_optional_inputs_and_per_channel_skip():
    args, _ = _inputs()
    a = [v.detach() for v in args.values()]
    torch.testing.assert_close(ssd_scan_ref(*a, 8), ssd_scan_naive(*a), rtol=1e-10, atol=1e-10)
    D = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(ssd_scan_ref(*a, 8, D=D), ssd_scan_naive(*a, D=D),
                               rtol=1e-10, atol=1e-10)


def test_bfloat16_close_to_float64():
    args, _ = _inputs(length=256, dstate=16)
    a = [v.detach() for v in args.values()]
    ref = ssd_scan_naive(*a, dt_softplus=True)
    low = ssd_scan_ref(*[t.to(torch.bfloat16) if t.dim() > 1 else t.float() for t in a], 64,
                       dt_softplus=True)
    assert low.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(low.double().flatten(), ref.flatten(), dim=0)
    assert cos > 0.999, cos


def test_dispatch_uses_the_reference_on_cpu_and_flops_are_counted():
    args, _ = _inputs(length=64)
    a = [v.detach() for v in args.values()]
    with use_backend("reference"):
        torch.testing.assert_close(ssd_scan_fn(*a, 16), ssd_scan_ref(*a, 16))
    torch.testing.assert_close(ssd_scan_fn(*a, 16), ssd_scan_ref(*a, 16))   # auto: no CUDA here
    # its arithmetic is matmuls, so FlopCounterMode (pipeline.evaluate.gflops_per_clip) sees it
    with FlopCounterMode(display=False) as fc:
        ssd_scan_fn(*a, 16)
    assert fc.get_total_flops() > 2 * 64 * 4 * 3 * 5        # at least one multiply-add per state


def test_bad_shapes_name_the_input():
    args, _ = _inputs()
    a = list(args.values())
    with pytest.raises(ValueError, match="dt must be"):
        ssd_scan_ref(a[0], a[1][:, :-1], *a[2:])
    with pytest.raises(ValueError, match="A must be"):
        ssd_scan_ref(a[0], a[1], a[2][:-1], *a[3:])
    with pytest.raises(ValueError, match="G \\| 4"):
        ssd_scan_ref(*a[:3], a[3][:, :, :1].expand(-1, -1, 3, -1),
                     a[4][:, :, :1].expand(-1, -1, 3, -1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)])
def test_reference_on_cuda_and_fused_kernel_equal_the_recurrence(dtype, tol):
    """On CUDA: the chunked reference (and mamba_ssm's Triton kernel when it imports) == the
    float64 recurrence, values and gradients, relative to their scale."""
    from tokconv.ops import HAS_FUSED_SSD
    args, kw = _inputs(length=300, heads=4, headdim=16, groups=2, dstate=16)
    ref_out, _, ref_g = _grads(ssd_scan_naive, args, kw)
    cuda = {k: v.detach().cuda().to(dtype if v.dim() > 1 else torch.float32).requires_grad_()
            for k, v in {**args, **kw}.items()}
    cuda_args = {k: cuda[k] for k in args}
    cuda_kw = {k: cuda[k] for k in kw}
    paths = {"reference": ssd_scan_ref} | ({"fused": ssd_scan_fn} if HAS_FUSED_SSD else {})
    for path, fn in paths.items():
        with use_backend(path if path == "fused" else "reference"):
            out, _, grads = _grads(fn, cuda_args, cuda_kw, chunk_size=64)
        scale = ref_out.abs().max()
        assert (out.double().cpu() - ref_out).abs().max() <= tol * scale, path
        for k, g in grads.items():
            gs = ref_g[k].abs().max().clamp(min=1e-6)
            assert (g.double().cpu() - ref_g[k]).abs().max() <= 5 * tol * gs, (path, k)
