"""Selective scan (Mamba S6): fused CUDA kernel when available, pure-torch reference otherwise.

Same calling convention as ``mamba_ssm.ops.selective_scan_interface``::

    u:      (B, D, L)   input
    delta:  (B, D, L)   step size (before ``delta_bias`` / softplus)
    A:      (D, N)      real state matrix (negative for a stable scan)
    B, C:   (D, N) time-invariant, (B, N, L) or (B, G, N, L) input-dependent (G groups divide D)
    D:      (D,)        skip connection, optional
    z:      (B, D, L)   gate, optional: out *= silu(z)
    delta_bias: (D,)    added to delta before softplus
    returns out (B, D, L) in u's dtype, plus the last state (B, D, N) when ``return_last_state``.

Recurrence, per (batch, channel d, state n)::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t ;   y_t = <C_t, h_t> + D * u_t

``selective_scan_fn`` dispatches; ``selective_scan_ref`` is the chunked parallel pure-torch
scan (no Python loop over L); ``selective_scan_naive`` is the literal sequential recurrence
that the tests compare both against. The backend is chosen once (env ``TOKCONV_FUSED=0/1``,
auto by default); ``use_backend(...)`` overrides it for tests (nanochat flash_attention style).
At run time the reference is used whenever the kernel is missing or inputs are not on CUDA.
Neither path's arithmetic is seen by torch's FlopCounterMode (see tokconv/converters/ssm.py).
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch
import torch.nn.functional as F

__all__ = [
    "HAS_FUSED",
    "backend",
    "resolve_backend",
    "selective_scan_fn",
    "selective_scan_naive",
    "selective_scan_ref",
    "use_backend",
]

CHUNK = 64  # reference scan: a loop over positions inside chunks of this length, then over chunks


def _load_fused():
    """mamba_ssm's CUDA selective scan, or None (CPU-only machines, import errors of any kind)."""
    if not torch.cuda.is_available():
        return None
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fn
    except Exception:  # noqa: BLE001 -- ImportError, missing .so, ABI mismatch: fall back
        return None
    return fn


_fused_fn = _load_fused()
HAS_FUSED = _fused_fn is not None

# Test override: "fused", "reference" or None (env / auto). Set through ``use_backend``.
_override: str | None = None


def resolve_backend(env: str | None, has_fused: bool, override: str | None = None) -> str:
    """Pure decision rule: returns "fused" or "reference".

    override wins ("fused" without the kernel raises); env "0" forces the reference; env "1"
    asks for the kernel (warns and falls back when it is missing); unset/"auto" uses the kernel
    when it imports.
    """
    if override is not None:
        if override not in ("fused", "reference"):
            raise ValueError("backend override must be 'fused', 'reference' or None, "
                             f"got {override!r}")
        if override == "fused" and not has_fused:
            raise RuntimeError("backend override 'fused' but mamba_ssm's selective scan "
                               "is not importable")
        return override
    env = (env or "auto").strip().lower()
    if env in ("0", "false", "no", "off"):
        return "reference"
    if env in ("1", "true", "yes", "on"):
        if not has_fused:
            warnings.warn("TOKCONV_FUSED=1 but mamba_ssm's selective scan is not importable; "
                          "using the pure-torch reference", RuntimeWarning, stacklevel=2)
        return "fused" if has_fused else "reference"
    if env != "auto":
        raise ValueError(f"TOKCONV_FUSED must be 0, 1 or auto, got {env!r}")
    return "fused" if has_fused else "reference"


_BACKEND = resolve_backend(os.environ.get("TOKCONV_FUSED"), HAS_FUSED)


def backend() -> str:
    """The backend selective_scan_fn uses for CUDA inputs ("fused" or "reference")."""
    return resolve_backend(None, HAS_FUSED, _override) if _override is not None else _BACKEND


@contextlib.contextmanager
def use_backend(name: str | None):
    """Temporarily force "fused" / "reference" (None: back to env/auto). For tests and benches."""
    global _override
    resolve_backend(None, HAS_FUSED, name)  # validate before switching
    prev, _override = _override, name
    try:
        yield
    finally:
        _override = prev


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """Selective scan; shapes in the module docstring. Fused kernel on CUDA when selected."""
    if (backend() == "fused" and u.is_cuda
            and u.dtype in (torch.float32, torch.float16, torch.bfloat16) and not A.is_complex()):
        return _fused_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                              return_last_state)


def _float_inputs(u, delta, delta_bias, delta_softplus):
    """u, delta in fp32 math (fp64 stays fp64 for tests), delta biased and softplus'd as asked."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    u, delta = u.to(dtype), delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus, log_decay=False):
    """Validate shapes; return float u (B,D,L), the decay exp(delta*A) (or delta*A when
    ``log_decay``) and delta*B*u, both (B,D,N,L), and C broadcastable to (B,D,N,L)."""
    if A.is_complex():
        raise NotImplementedError("complex A is not supported by the pure-torch selective scan")
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (B, D, L); got u {tuple(u.shape)}, "
                         f"delta {tuple(delta.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D={dim}, N); got {tuple(A.shape)}")
    dstate = A.shape[1]
    u, delta = _float_inputs(u, delta, delta_bias, delta_softplus)
    dtype = u.dtype

    def per_channel(M, name):  # -> (B or 1, D, N, L or 1)
        M = M.to(dtype)
        if M.dim() == 2 and M.shape == (dim, dstate):
            return M[None, :, :, None]
        if M.dim() == 3 and M.shape == (batch, dstate, length):
            return M[:, None]
        if (M.dim() == 4 and M.shape[0] == batch and M.shape[2:] == (dstate, length)
                and dim % M.shape[1] == 0):
            return M.repeat_interleave(dim // M.shape[1], dim=1)
        raise ValueError(f"{name} must be (D, N), (B, N, L) or (B, G, N, L) with G | D "
                         f"(B={batch}, D={dim}, N={dstate}, L={length}); got {tuple(M.shape)}")

    Bm, Cm = per_channel(B, "B"), per_channel(C, "C")
    deltaA = delta[:, :, None, :] * A.to(dtype)[None, :, :, None]              # (B, D, N, L)
    deltaB_u = (delta * u)[:, :, None, :] * Bm                                  # (B, D, N, L)
    return u, (deltaA if log_decay else torch.exp(deltaA)), deltaB_u, Cm


def _finish(u, y, D, z, dtype_in, last_state, return_last_state):
    out = y if D is None else y + u * D.to(y.dtype)[:, None]
    if z is not None:
        out = out * F.silu(z.to(out.dtype))
    out = out.to(dtype_in)
    return (out, last_state) if return_last_state else out


def _to_chunks(x: torch.Tensor, length: int, K: int, n: int) -> torch.Tensor:
    """(..., L) or (..., 1) -> (K, ..., n) contiguous (time-invariant (..., 1) -> (1, ..., 1))."""
    if x.shape[-1] == 1:
        return x.unsqueeze(0)
    if n * K > length:  # zero padding at the end: inputs 0, decays exp(0) = 1, no effect before
        x = F.pad(x, (0, n * K - length))
    return x.reshape(*x.shape[:-1], n, K).movedim(-1, 0).contiguous()


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, chunk: int = CHUNK):
    """Chunked pure-torch scan; same signature and result as the fused kernel.

    L is cut into n = L/chunk chunks, laid out position-in-chunk first, (K, B, G, D/G, N, n),
    so one loop over the K positions advances all chunks at once from a zero state (each step
    a contiguous (B, G, D/G, N, n) slice) and accumulates the decay products prod exp(delta*A)
    (all in (0, 1]: no overflow, unlike exp(-cumsum) factorisations); a loop over the n chunk
    ends then carries the state across chunks.
    That is K + n Python steps (96 for L=2048) and O(L) work; the (B, D, N, L)-sized tensors
    are created directly in the chunk layout (no big permutes) and y is reduced over N inside
    the loop. Groups of B/C (G | D) are a view of D, never materialised per channel.
    """
    if A.is_complex():
        raise NotImplementedError("complex A is not supported by the pure-torch selective scan")
    dtype_in = u.dtype
    batch, dim, length, dstate = *_check(u, delta, A), A.shape[1]
    u, delta = _float_inputs(u, delta, delta_bias, delta_softplus)
    dtype = u.dtype
    Bg = _grouped(B, "B", batch, dim, dstate, length)
    Cg = _grouped(C, "C", batch, dim, dstate, length)
    gb, gc = Bg.shape[1], Cg.shape[1]
    if gb > 1 and gc > 1 and gb != gc:
        raise ValueError(f"B and C must have the same number of groups, got {gb} and {gc}")
    groups = max(gb, gc)
    if groups > 1:  # time-invariant (D, N) factors: split D into (G, D/G) like the rest
        Bg, Cg = (M.reshape(1, groups, dim // groups, dstate, 1) if M.shape[2] == dim else M
                  for M in (Bg, Cg))
    K = max(1, min(chunk, length))
    n = -(-length // K)

    def split(x):  # (B, D, L) -> (K, B, G, D/G, 1, n): only the small inputs are transposed
        return _to_chunks(x.reshape(batch, groups, dim // groups, 1, length), length, K, n)

    # the (B, D, N, L)-sized products are created directly in the chunk layout (no big copies)
    dA = split(delta) * A.to(dtype).reshape(1, 1, groups, dim // groups, dstate, 1)
    b = split(delta * u) * _to_chunks(Bg.to(dtype), length, K, n)      # (K, B, G, D/G, N, n)
    Cc = _to_chunks(Cg.to(dtype), length, K, n)                         # (K|1, B|1, G|1, ., N, n|1)
    # unbind, not a[t]: the backward of each indexing op would allocate a full-size zero tensor
    a_t, b_t = torch.exp(dA).unbind(0), b.unbind(0)
    C_t = Cc.unbind(0) if Cc.shape[0] == K else Cc.expand(K, *Cc.shape[1:]).unbind(0)
    hs, ys, decays = [b_t[0]], [(b_t[0] * C_t[0]).sum(-2)], [a_t[0]]
    for t in range(1, K):  # within-chunk recurrence from a zero state, all chunks in parallel
        hs.append(a_t[t] * hs[-1] + b_t[t])
        ys.append((hs[-1] * C_t[t]).sum(-2))
        if n > 1:  # prod a_{0..t} inside the chunk (products in (0, 1]: no overflow)
            decays.append(a_t[t] * decays[-1])
    y = torch.stack(ys)                                                 # (K, B, G, D/G, n)
    carry = None
    if n > 1:
        dec_end, h_end = decays[-1].unbind(-1), hs[-1].unbind(-1)       # n x (B, G, D/G, N)
        carries = [torch.zeros_like(dec_end[0])]
        for c in range(n - 1):  # state entering chunk c+1
            carries.append(dec_end[c] * carries[-1] + h_end[c])
        carry = torch.stack(carries, dim=-1)                            # (B, G, D/G, N, n)
        decay = torch.stack(decays)                                     # (K, B, G, D/G, N, n)
        y = y + (decay * carry * Cc).sum(-2)
    y = y.movedim(0, -1).reshape(batch, dim, n * K)[..., :length]       # (B, D, L)
    last_state = None
    if return_last_state:
        t_last = length - 1 - (n - 1) * K
        last_state = hs[t_last][..., -1]
        if carry is not None:
            last_state = last_state + decay[t_last, ..., -1] * carry[..., -1]
        last_state = last_state.reshape(batch, dim, dstate)
    return _finish(u, y, D, z, dtype_in, last_state, return_last_state)


def _check(u, delta, A):
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (B, D, L); got u {tuple(u.shape)}, "
                         f"delta {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"A must be (D={u.shape[1]}, N); got {tuple(A.shape)}")
    return u.shape


def _grouped(M, name, batch, dim, dstate, length):
    """B or C -> (B|1, G, D/G|1, N, L|1): (D, N) -> (1, 1, D, N, 1); (B, N, L) -> (B, 1, 1, N, L);
    (B, G, N, L) -> (B, G, 1, N, L)."""
    if M.dim() == 2 and M.shape == (dim, dstate):
        return M.reshape(1, 1, dim, dstate, 1)
    if M.dim() == 3 and M.shape == (batch, dstate, length):
        return M[:, None, None]
    if (M.dim() == 4 and M.shape[0] == batch and M.shape[2:] == (dstate, length)
            and dim % M.shape[1] == 0):
        return M[:, :, None]
    raise ValueError(f"{name} must be (D, N), (B, N, L) or (B, G, N, L) with G | D "
                     f"(B={batch}, D={dim}, N={dstate}, L={length}); got {tuple(M.shape)}")


def selective_scan_naive(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """The literal sequential recurrence (a Python loop over L). Slow; for tests only."""
    dtype_in = u.dtype
    u, a, b, Cm = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    Cm = Cm.expand(a.shape[0], -1, -1, a.shape[-1]) if Cm.shape[-1] == 1 else Cm
    h = a.new_zeros(a.shape[:3])
    ys = []
    for t in range(a.shape[-1]):
        h = a[..., t] * h + b[..., t]
        ys.append((h * Cm[..., t]).sum(dim=2))
    y = torch.stack(ys, dim=2)
    return _finish(u, y, D, z, dtype_in, h if return_last_state else None, return_last_state)
