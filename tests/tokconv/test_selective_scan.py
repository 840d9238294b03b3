"""Chunked reference scan == literal recurrence (values and gradients); backend selection."""
from __future__ import annotations

import pytest
import torch

import tokconv.ops.selective_scan as ss
from tokconv.ops import selective_scan_fn, selective_scan_naive, selective_scan_ref, use_backend


def _inputs(batch=2, dim=6, dstate=4, length=37, bc="variable", groups=2, with_z=True, with_d=True,
            dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    shape_bc = {"constant": (dim, dstate), "variable": (batch, dstate, length),
                "grouped": (batch, groups, dstate, length)}[bc]
    x = {"u": r(batch, dim, length), "delta": r(batch, dim, length) * 0.5,
             "A": -torch.rand(dim, dstate, generator=g, dtype=dtype) * 4 - 0.1,
             "B": r(*shape_bc), "C": r(*shape_bc),
             "D": r(dim) if with_d else None, "z": r(batch, dim, length) if with_z else None,
             "delta_bias": r(dim) * 0.1}
    return {k: (v.requires_grad_() if v is not None else None) for k, v in x.items()}


def _grads(fn, x, **kw):
    out, last = fn(**x, return_last_state=True, **kw)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)  # not just sum()
    names = [k for k, v in x.items() if v is not None]
    grads = torch.autograd.grad((out * w).sum(), [x[k] for k in names])
    return out, last, dict(zip(names, grads))


@pytest.mark.parametrize("length,chunk", [(37, 8), (64, 16), (5, 64), (50, 1)])
@pytest.mark.parametrize("bc", ["constant", "variable", "grouped"])
@pytest.mark.parametrize("softplus", [True, False])
def test_reference_matches_naive_values_and_grads(length, chunk, bc, softplus):
    x = _inputs(length=length, bc=bc)
    out_r, last_r, g_r = _grads(selective_scan_ref, x, delta_softplus=softplus, chunk=chunk)
    out_n, last_n, g_n = _grads(selective_scan_naive, x, delta_softplus=softplus)
    assert out_r.shape == (2, 6, length)
    torch.testing.assert_close(out_r, out_n, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last_r, last_n, rtol=1e-10, atol=1e-10)
    assert set(g_r) == {"u", "delta", "A", "B", "C", "D", "z", "delta_bias"}
    for k in g_r:
        torch.testing.assert_close(g_r[k], g_n[k], rtol=1e-9, atol=1e-9, msg=f"grad wrt {k}")
        assert g_r[k].abs().sum() > 0, k


@pytest.mark.parametrize("shape_b,shape_c", [("constant", "grouped"), ("grouped", "variable")])
def test_reference_mixed_b_c_layouts(shape_b, shape_c):
    xb, xc = _inputs(bc=shape_b, groups=3), _inputs(bc=shape_c, groups=3)
    x = {**xb, "C": xc["C"]}
    out_r, last_r, g_r = _grads(selective_scan_ref, x, delta_softplus=True, chunk=8)
    out_n, last_n, g_n = _grads(selective_scan_naive, x, delta_softplus=True)
    torch.testing.assert_close(out_r, out_n, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last_r, last_n, rtol=1e-10, atol=1e-10)
    for k in g_r:
        torch.testing.assert_close(g_r[k], g_n[k], rtol=1e-9, atol=1e-9, msg=f"grad wrt {k}")


def test_naive_is_the_recurrence_by_hand():
    # one channel, one state, L=3, no softplus: h = a h + delta*b*u, y = c h + D u
    u = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.float64)
    delta = torch.tensor([[[0.5, 1.0, 2.0]]], dtype=torch.float64)
    A = torch.tensor([[-1.0]], dtype=torch.float64)
    B = torch.tensor([[[1.0, 1.0, 2.0]]], dtype=torch.float64)
    C = torch.tensor([[[1.0, 3.0, 1.0]]], dtype=torch.float64)
    Dv = torch.tensor([0.5], dtype=torch.float64)
    h, ys = 0.0, []
    for t in range(3):
        d = float(delta[0, 0, t])
        h = torch.exp(torch.tensor(-d)).item() * h + d * float(B[0, 0, t]) * float(u[0, 0, t])
        ys.append(float(C[0, 0, t]) * h + 0.5 * float(u[0, 0, t]))
    expect = torch.tensor([[ys]], dtype=torch.float64)
    for fn in (selective_scan_naive, selective_scan_ref):
        torch.testing.assert_close(fn(u, delta, A, B, C, Dv), expect)


def test_reference_float32_long_sequence_and_dtype():
    # L=300 (not a multiple of 64), bf16 in -> bf16 out, fp32 math inside
    x = {k: (v.detach().float() if v is not None else None)
         for k, v in _inputs(batch=1, dim=4, dstate=3, length=300, with_z=False).items()}
    ref = selective_scan_ref(**x, delta_softplus=True)
    naive = selective_scan_naive(**x, delta_softplus=True)
    torch.testing.assert_close(ref, naive, rtol=1e-4, atol=1e-4)
    xb = {k: (v.bfloat16() if k in ("u", "delta", "B", "C") else v)
          for k, v in x.items() if v is not None}
    out = selective_scan_ref(**xb, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), naive, rtol=0.05, atol=0.05)


def test_shape_errors_name_the_input():
    x = _inputs()
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_ref(**{**x, "A": x["A"][:3]})
    with pytest.raises(ValueError, match="C must be"):
        selective_scan_ref(**{**x, "C": x["C"][..., :5]})
    with pytest.raises(ValueError, match="u and delta"):
        selective_scan_ref(**{**x, "delta": x["delta"][..., :5]})


@pytest.mark.parametrize("env,has,override,expect", [
    (None, False, None, "reference"), (None, True, None, "fused"), ("auto", True, None, "fused"),
    ("0", True, None, "reference"), ("1", True, None, "fused"),
    ("1", True, "reference", "reference"), ("0", True, "fused", "fused"),
    (None, False, "reference", "reference"),
])
def test_resolve_backend_rule(env, has, override, expect):
    assert ss.resolve_backend(env, has, override) == expect


def test_resolve_backend_errors_and_warning():
    with pytest.warns(RuntimeWarning, match="TOKCONV_FUSED=1"):
        assert ss.resolve_backend("1", False) == "reference"
    with pytest.raises(RuntimeError, match="not importable"):
        ss.resolve_backend(None, False, "fused")
    with pytest.raises(ValueError, match="TOKCONV_FUSED"):
        ss.resolve_backend("maybe", True)
    with pytest.raises(ValueError, match="override"):
        ss.resolve_backend(None, True, "triton")


def test_backend_chosen_once_from_env_at_import(monkeypatch):
    import importlib
    try:
        monkeypatch.setenv("TOKCONV_FUSED", "0")
        mod = importlib.reload(ss)
        assert mod.backend() == "reference"
        monkeypatch.setenv("TOKCONV_FUSED", "1")  # later env changes do not move the choice
        assert mod.backend() == "reference"
    finally:
        monkeypatch.delenv("TOKCONV_FUSED", raising=False)
        importlib.reload(ss)


def test_override_and_cpu_fallback():
    x = {k: (v.detach() if v is not None else None) for k, v in _inputs().items()}
    expect = selective_scan_ref(**x, delta_softplus=True)
    with use_backend("reference"):
        assert ss.backend() == "reference"
        torch.testing.assert_close(selective_scan_fn(**x, delta_softplus=True), expect)
    assert ss.backend() == ss._BACKEND  # restored
    if ss.HAS_FUSED:  # CPU inputs take the reference even with the kernel selected
        with use_backend("fused"):
            torch.testing.assert_close(selective_scan_fn(**x, delta_softplus=True), expect)
    else:
        with pytest.raises(RuntimeError, match="not importable"), use_backend("fused"):
            pass
        torch.testing.assert_close(selective_scan_fn(**x, delta_softplus=True), expect)
