"""Rewrites of the backbones' transformers modules: the same function on faster kernels.

Each rewrite patches one loaded model in place (``pipeline.backbones`` applies them after loading).
Exact-math rewrites (the same arithmetic, at most another summation order), always applied:

* :func:`use_sdpa_timesformer`: TimeSformer's attention through SDPA (transformers has no SDPA path
  for it);
* :func:`use_cached_rope_vjepa2`: V-JEPA 2's RoPE tables built once, not per layer (bit-identical);
* :func:`use_cls_only_last_layer_vivit`: ViViT's last layer computes the one token read, its CLS;
* :func:`fuse_fast_gelu`: ViViT's six-kernel ``gelu_fast`` as ``nn.GELU(approximate="tanh")``.

``ModelsConfig.rewrites`` (:func:`apply_rewrites`; measured per model in bench/RESULTS.md with
``bench/profile_models.py``):

* ``patch_matmul`` (:class:`PatchLinear`): patch-embedding convolutions as the one matmul they are;
* ``gelu_epilogue`` (:class:`LinearGELU`, CUDA only): MLP linear + GELU in one cuBLASLt call;
* ``fold_temporal_dense`` (:func:`fold_timesformer_temporal_dense`): two linear maps in a row as
  one;
* ``packed_temporal_attention`` (:func:`use_packed_temporal_attention`): TimeSformer's 16-token
  temporal attention, 8 groups per call with a block-diagonal mask.

Opt-in: :func:`use_float8_linears` (``ModelsConfig.fp8``).
"""
from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TimesformerModel, VivitModel, VJEPA2Model
from transformers.activations import FastGELUActivation, GELUActivation
from transformers.models.timesformer.modeling_timesformer import TimesformerSelfAttention
from transformers.models.vjepa2.modeling_vjepa2 import VJEPA2RopeAttention


def _sdpa_self_attention(self, hidden_states, output_attentions: bool = False):
    """TimesformerSelfAttention.forward through F.scaled_dot_product_attention (same math)."""
    if output_attentions:
        return type(self).forward(self, hidden_states, output_attentions)
    b, n, c = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(b, n, 3, self.num_heads, c // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    p = self.attn_drop.p if self.training else 0.0
    ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
    return (ctx.transpose(1, 2).reshape(b, n, c),)


def use_sdpa_timesformer(model: TimesformerModel) -> TimesformerModel:
    """Route every TimeSformer self-attention through SDPA (transformers has no SDPA path for it).
    """
    for m in model.modules():
        if isinstance(m, TimesformerSelfAttention):
            m.forward = types.MethodType(_sdpa_self_attention, m)
    return model


def _rope_block(size: int, pos: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (n, size) of one RoPE block, computed exactly as ``rotate_queries_or_keys`` does (in
    ``dtype``)."""
    omega = torch.arange(size // 2, dtype=dtype, device=pos.device)
    omega /= size / 2.0
    omega = 1.0 / 10000**omega
    freq = pos.unsqueeze(-1) * omega  # (n, size/2)
    return freq.cos().repeat(1, 2), freq.sin().repeat(1, 2)


def _rope_tables(self: VJEPA2RopeAttention, pos_ids, n: int, dtype: torch.dtype):
    """(cos, sin), each (n, head_dim), for all three (frame, height, width) blocks at once; cached
    per (n, dtype, device). Dims past the three blocks get cos 1, sin 0 (left unrotated, as
    upstream)."""
    key = (n, dtype, pos_ids[0].device)
    cache = self.__dict__.setdefault("_rope_cache", {})
    if key not in cache:
        sizes = (self.d_dim, self.h_dim, self.w_dim)
        blocks = [_rope_block(size, pos, dtype) for pos, size in zip(pos_ids, sizes)]
        rest = self.attention_head_size - self.d_dim - self.h_dim - self.w_dim
        ones = torch.ones(n, rest, dtype=dtype, device=key[2])
        cache[key] = (torch.cat([c for c, _ in blocks] + [ones], -1),
                      torch.cat([s for _, s in blocks] + [ones * 0], -1))
    return cache[key]


def _cached_rotary_embeddings(self: VJEPA2RopeAttention, qk: torch.Tensor, pos_ids) -> torch.Tensor:
    """VJEPA2RopeAttention.apply_rotary_embeddings with the sin/cos tables built once instead of per
    layer and block: qk (B, heads, n, head_dim) -> same. Same values (tested against upstream)."""
    if pos_ids[0].dim() != 1:  # per-sample masked positions (the predictor): upstream path
        return VJEPA2RopeAttention.apply_rotary_embeddings(self, qk, pos_ids)
    cos, sin = _rope_tables(self, pos_ids, qk.shape[-2], qk.dtype)
    # pairs (a, b) -> (-b, a)
    swapped = torch.stack((-qk[..., 1::2], qk[..., 0::2]), dim=-1).flatten(-2)
    return (qk * cos) + (swapped * sin)


def use_cached_rope_vjepa2(model: VJEPA2Model) -> VJEPA2Model:
    """Route every V-JEPA 2 RoPE through :func:`_cached_rotary_embeddings` (fewer, larger kernels).
    """
    for m in model.modules():
        if isinstance(m, VJEPA2RopeAttention):
            m.apply_rotary_embeddings = types.MethodType(_cached_rotary_embeddings, m)
    return model


def _cls_only_vivit_layer(self, hidden_states: torch.Tensor, attention_mask=None,
                          **kwargs) -> torch.Tensor:
    """VivitLayer.forward when only the CLS token is read after it: (B, N, C) -> (B, 1, C), the full
    layer's row 0. Keys and values still come from every token; the query, the output projection and
    the MLP run on the CLS row alone (ViViT keeps no attention mask)."""
    att, b = self.attention, hidden_states.shape[0]
    normed = self.layernorm_before(hidden_states)
    pairs = ((att.q_proj, normed[:, :1]), (att.k_proj, normed), (att.v_proj, normed))
    q, k, v = (proj(x).view(b, x.shape[1], -1, att.head_dim).transpose(1, 2) for proj, x in pairs)
    ctx = F.scaled_dot_product_attention(q, k, v, scale=att.scaling)
    ctx = ctx.transpose(1, 2).reshape(b, 1, -1)
    cls = att.o_proj(ctx) + hidden_states[:, :1]
    return self.mlp(self.layernorm_after(cls)) + cls


def use_cls_only_last_layer_vivit(model: VivitModel) -> VivitModel:
    """ViViT's last layer computes the CLS token only (the one token read: its 1 x 768 target), 1/12
    of ViViT's work less; ``last_hidden_state`` is then (B, 1, C)."""
    last = model.layers[-1]
    last.forward = types.MethodType(_cls_only_vivit_layer, last)
    return model


def fuse_fast_gelu(model: nn.Module) -> nn.Module:
    """transformers' FastGELUActivation (ViViT's ``gelu_fast``: six elementwise kernels over the
    MLP's widest activation) -> ``nn.GELU(approximate="tanh")``, the same formula in one kernel
    (computed in float32)."""
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, FastGELUActivation):
                setattr(parent, child_name, nn.GELU(approximate="tanh"))
    return model


class PatchLinear(nn.Module):
    """A patch-embedding convolution whose kernel equals its stride (non-overlapping patches) as the
    matmul it is: x (B, C, *S) -> (B, out, *S/k), the same output as the ``nn.Conv2d``/``nn.Conv3d``
    it replaces (trailing pixels short of a whole patch are dropped, as the convolution drops them).
    cuDNN ran these as a generic implicit-GEMM kernel at ~25 TFLOP/s on an H200 (0.86 ms per clip
    for the four backbones' embeddings: 9% of their time; bench/RESULTS.md); as one GEMM they cost
    microseconds."""

    def __init__(self, conv: nn.Conv2d | nn.Conv3d):
        super().__init__()
        if not is_patch_conv(conv):
            raise ValueError(f"PatchLinear needs a convolution with kernel == stride, no padding, "
                             f"dilation or groups; got {conv}")
        self.kernel = tuple(conv.kernel_size)
        # weight (out, C, *kernel): flattened in the patch order below
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *size = x.shape
        grid = [s // k for s, k in zip(size, self.kernel)]
        x = x[(..., *(slice(0, g * k) for g, k in zip(grid, self.kernel)))]
        # (B, C, g1, k1, g2, k2, ...) -> (B, g1, g2, ..., C, k1, k2, ...): one copy, then one matmul
        x = x.reshape(b, c, *(d for gk in zip(grid, self.kernel) for d in gk))
        n = len(grid)
        x = x.permute(0, *range(2, 2 + 2 * n, 2), 1, *range(3, 3 + 2 * n, 2))
        out = F.linear(x.reshape(-1, self.weight[0].numel()), self.weight.flatten(1), self.bias)
        # (B, out, *grid), channels-last memory: flatten(2) is a view
        return out.view(b, *grid, -1).movedim(-1, 1)


def is_patch_conv(conv: nn.Module) -> bool:
    """A 2D/3D convolution over non-overlapping patches: kernel == stride, no padding, dilation or
    groups."""
    if not isinstance(conv, (nn.Conv2d, nn.Conv3d)):
        return False
    unpadded = conv.padding == "valid" if isinstance(conv.padding, str) else not any(conv.padding)
    return (unpadded and tuple(conv.kernel_size) == tuple(conv.stride)
            and all(d == 1 for d in conv.dilation) and conv.groups == 1)


def use_matmul_patch_embeddings(model: nn.Module) -> int:
    """Every patch convolution of ``model`` -> :class:`PatchLinear`; returns how many there were."""
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if is_patch_conv(child):
                setattr(parent, child_name, PatchLinear(child))
                replaced += 1
    return replaced


def _packed_temporal_attention(self, hidden_states, output_attentions: bool = False):
    """TimesformerSelfAttention.forward for the temporal branch, (G, T, C) -> ((G, T, C),): gcd(G,
    ``pack``) consecutive groups share one attention call of length pack*T with a block-diagonal
    mask (each token still sees its own group's T tokens only). Attention kernels tile queries and
    keys by 64-128, so T=16 alone filled an eighth of each tile and ran at ~40 TFLOP/s on an H200
    (bench/RESULTS.md). The qkv output needs no copy: consecutive groups are already consecutive in
    memory."""
    g, t, c = hidden_states.shape
    pack = math.gcd(g, self.pack)
    if output_attentions or self.training or pack == 1:
        return _sdpa_self_attention(self, hidden_states, output_attentions)
    n = pack * t
    qkv = self.qkv(hidden_states).reshape(g // pack, n, 3, self.num_heads, c // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    block = torch.arange(n, device=hidden_states.device) // t
    mask = block[:, None] == block[None, :]  # (n, n): True where attention is allowed
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
    return (ctx.transpose(1, 2).reshape(g, t, c),)


def use_packed_temporal_attention(model: TimesformerModel, pack: int = 8) -> TimesformerModel:
    """Every TimeSformer temporal attention through :func:`_packed_temporal_attention` (``pack``
    groups a call)."""
    for layer in model.encoder.layer:
        if layer.attention_type == "divided_space_time":
            attn = layer.temporal_attention.attention
            attn.pack = pack
            attn.forward = types.MethodType(_packed_temporal_attention, attn)
    return model


class LinearGELU(nn.Module):
    """``gelu_tanh(x W^T + b)``, x (..., in) -> (..., out): on CUDA one cuBLASLt matmul whose
    epilogue adds the bias and applies GELU (``torch._addmm_activation``), so the MLP's widest
    activation is written once, instead of written, read and written again by a separate GELU kernel
    (``torch.compile`` keeps the call as is: inductor has no decomposition for it). The epilogue's
    GELU is the tanh form, ViViT's own ``gelu_fast``; for the exact-GELU models it differs by at
    most 4.7e-4, under half a bf16 step wherever GELU's output exceeds 0.06, and the GEMM result is
    no longer rounded to bf16 before the GELU."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is None:
            raise ValueError(f"LinearGELU needs a linear layer with a bias, got {linear}")
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the CPU kernel's GELU is the exact form, and the fused op has no backward: the same
        # function unfused there and whenever gradients are wanted
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if not x.is_cuda or wants_grad:
            return F.gelu(F.linear(x, self.weight, self.bias), approximate="tanh")
        out = torch._addmm_activation(self.bias, x.reshape(-1, self.in_features), self.weight.t(),
                                      use_gelu=True)
        return out.view(*x.shape[:-1], self.out_features)


# (module holding the MLP's first linear layer, its attribute, the activation's attribute) per
# backbone
_MLP_GELU_ATTRS = (("fc1", "activation"), ("fc1", "activation_fn"),
                   ("dense", "intermediate_act_fn"))
_GELUS = (nn.GELU, FastGELUActivation, GELUActivation)


def fuse_linear_gelu(model: nn.Module) -> int:
    """Every MLP's first linear layer + GELU -> :class:`LinearGELU` (the activation becomes
    Identity). Returns how many were fused (one per transformer block)."""
    fused = 0
    for module in list(model.modules()):
        for linear_attr, act_attr in _MLP_GELU_ATTRS:
            linear, act = getattr(module, linear_attr, None), getattr(module, act_attr, None)
            if (isinstance(linear, nn.Linear) and isinstance(act, _GELUS)
                    and linear.bias is not None):
                setattr(module, linear_attr, LinearGELU(linear))
                setattr(module, act_attr, nn.Identity())
                fused += 1
    return fused


@torch.no_grad()
def fold_timesformer_temporal_dense(model: TimesformerModel) -> TimesformerModel:
    """Each divided space-time layer's temporal branch ends in two linear maps in a row: the
    temporal attention's output projection, then ``temporal_dense`` (only a reshape of the token
    order between them, which a per-token map commutes with). Their product is one map,
    W = W_td W_o, b = W_td b_o + b_td (computed in float64, stored in the weights' dtype): one
    768x768 matmul per layer less, 1/17 of TimeSformer's matmul FLOPs. ``temporal_dense`` becomes
    Identity."""
    for layer in model.encoder.layer:
        if (layer.attention_type != "divided_space_time"
                or isinstance(layer.temporal_dense, nn.Identity)):
            continue
        proj, dense = layer.temporal_attention.output.dense, layer.temporal_dense
        folded = nn.Linear(proj.in_features, dense.out_features, device=proj.weight.device,
                           dtype=proj.weight.dtype)
        w_td = dense.weight.double()
        folded.weight.copy_(w_td @ proj.weight.double())
        folded.bias.copy_(w_td @ proj.bias.double() + dense.bias.double())
        layer.temporal_attention.output.dense = folded.requires_grad_(False)
        layer.temporal_dense = nn.Identity()
    return model


def use_float8_linears(model: nn.Module, granularity: str = "row") -> nn.Module:
    """Every ``nn.Linear`` of ``model`` (on CUDA) -> torchao's dynamic float8: weights stored e4m3
    with one scale per output row (``granularity="tensor"``: one per tensor), activations scaled
    likewise at each call, matmuls through ``torch._scaled_mm`` (twice the bf16 tensor-core rate on
    Hopper); outputs stay in the weights' dtype. Needs ``torch.compile`` to pay off: eager, the
    scaling passes cost more than the matmuls gain (bench/RESULTS.md)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"models.fp8: float8 matmuls need a CUDA device; "
                         f"{type(model).__name__} is on {device}")
    if torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"models.fp8: float8 matmuls need compute capability >= 8.9; "
                         f"{torch.cuda.get_device_name(device)} has "
                         f"{torch.cuda.get_device_capability(device)}")
    try:
        from torchao import quantization as ao
    except ImportError as e:
        raise ImportError("models.fp8 needs torchao: pip install 'tokconv-pipeline[cuda]'") from e
    gran = {"row": ao.PerRow, "tensor": ao.PerTensor}[granularity]()
    # activation_value_lb: an all-zero row (a zero-initialised CLS token after LayerNorm) would get
    # scale 0 and turn into NaN; set_inductor_config=False: its tuning is process-wide and lengthens
    # every compile
    ao.quantize_(model, ao.Float8DynamicActivationFloat8WeightConfig(
        granularity=gran, activation_value_lb=1e-12, set_inductor_config=False))
    return model


REWRITES = ("patch_matmul", "gelu_epilogue", "fold_temporal_dense", "packed_temporal_attention")
TEMPORAL_PACK = 8  # TimeSformer temporal groups per attention call (bench/RESULTS.md)


def apply_rewrites(name: str, model: nn.Module, rewrites, device: torch.device) -> nn.Module:
    """``ModelsConfig.rewrites`` on one loaded backbone (each rewrite: see its function)."""
    unknown = set(rewrites) - set(REWRITES)
    if unknown:
        raise ValueError(f"models.rewrites: unknown {sorted(unknown)}; known: {REWRITES}")
    if "patch_matmul" in rewrites:
        use_matmul_patch_embeddings(model)
    if name == "timesformer" and "fold_temporal_dense" in rewrites:
        fold_timesformer_temporal_dense(model)
    if name == "timesformer" and "packed_temporal_attention" in rewrites:
        use_packed_temporal_attention(model, TEMPORAL_PACK)
    if "gelu_epilogue" in rewrites and device.type == "cuda":  # the CPU keeps the models' own GELU
        fuse_linear_gelu(model)
    return model
