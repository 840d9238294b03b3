"""The four video backbones: student (V-JEPA 2 ViT-L) and three teachers (VideoMAE-B, TimeSformer-B, ViViT-B).

Real ``transformers`` classes, loaded three ways (``ModelsConfig.weights``): ``pretrained``
(``from_pretrained`` of a hub id, a local directory or an ``s3://``/fsspec directory), ``random``
(the hub architectures written out in :func:`full_configs`, seeded random init: benchmarks on hosts
without hub access) and ``tiny`` (:func:`tiny_configs`: same classes, hidden 48-64, 1-2 layers, but
the FULL input sizes, so tiny models emit exactly the full-size token layouts).

One decoded window (B, 32, S, S, 3) uint8 serves all four models: :func:`derive_inputs` takes each
model's frames and geometry from :data:`INPUT_SPECS` (the hub preprocessor settings) on the tensor's
device; all four see the same field of view (the whole decoded square). Token layouts
(:func:`layout_spec`) are derived from the configs; every grid output is flattened row-major over
(T, H, W): token ``t*H*W + h*W + w``.

Layout notes (transformers 5.x):
* V-JEPA 2 uses 3D RoPE whose row length is ``crop_size // patch_size``: inputs must be ``crop_size``
  square; any frame count works (``skip_predictor=True``: encoder output only).
* VideoMAE and ViViT have fixed position tables: exactly ``config.num_frames`` frames at ``image_size``.
  ViViT's target is its CLS token alone, so its last layer computes that row only
  (:func:`use_cls_only_last_layer_vivit`: ``last_hidden_state`` is (B, 1, 768)).
* TimeSformer interpolates its time embeddings to the frame count, but its divided space-time layers
  reshape with ``config.num_frames``; after loading the k400 checkpoint (8 frames) the layers get a
  config copy saying 16, else temporal attention silently groups the wrong tokens. Its
  tokens come out patch-major ((H, W, T) order) and are reordered to (T, H, W). It has no SDPA
  support in transformers, so :func:`use_sdpa_timesformer` swaps in an SDPA attention forward.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    PreTrainedConfig,
    TimesformerConfig,
    TimesformerModel,
    VideoMAEConfig,
    VideoMAEModel,
    VivitConfig,
    VivitModel,
    VJEPA2Config,
    VJEPA2Model,
)
from transformers.activations import FastGELUActivation
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.timesformer.modeling_timesformer import TimesformerSelfAttention
from transformers.models.vjepa2.modeling_vjepa2 import VJEPA2RopeAttention

from pipeline.config import ModelsConfig
from pipeline.storage import Storage
from tokconv.targets import TargetSpec

MODEL_NAMES = ("student", "videomae", "timesformer", "vivit")
MODEL_CLASSES = {"student": VJEPA2Model, "videomae": VideoMAEModel,
                 "timesformer": TimesformerModel, "vivit": VivitModel}
INIT_KWARGS = {"vivit": {"add_pooling_layer": False}}  # the k400 checkpoint has no pooler; CLS is read raw
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class InputSpec:
    """How one model's input is derived from the decoded window (hub preprocessor settings).

    frames: frames fed to the model, taken every ``frame_step``-th frame of the window from index 0.
    resize: shortest edge after the (antialiased bilinear) resize; crop: square center crop after it.
    mean/std: per-channel normalisation of [0, 1] pixels.
    """
    frames: int
    frame_step: int
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def window(self) -> int:
        """Decoded frames needed."""
        return (self.frames - 1) * self.frame_step + 1

    @property
    def frame_indices(self) -> range:
        return range(0, self.window, self.frame_step)


# Hub preprocessors: MCG-NJU/videomae-base (shortest edge 224, crop 224, ImageNet mean/std);
# facebook/timesformer-base-finetuned-k400 (224/224, mean 0.45, std 0.225); google/vivit-b-16x2-kinetics400
# (224/224, pixels scaled to [-1, 1], the checkpoint's JAX training input; its preprocessor_config also sets
# do_normalize with mean=std=0.5 on top of the offset rescale, which would give [-3, 1]: not reproduced).
# V-JEPA 2 (VJEPA2VideoProcessor: crop 256, ImageNet mean/std) would resize to int(256*256/224) = 292 first,
# i.e. see the central 88% only. We feed it the whole square (resize 256) so that all four models see the
# same field of view and the student and teacher grids share one normalised space, which the converters'
# grid resampling assumes; V-JEPA 2 was pretrained on random resized crops at 256, so this is in-distribution.
# (resize=292 gives V-JEPA 2's own eval view.)
INPUT_SPECS: dict[str, InputSpec] = {
    "student": InputSpec(16, 2, 256, 256, tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)),
    "videomae": InputSpec(16, 2, 224, 224, tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)),
    "timesformer": InputSpec(16, 2, 224, 224, (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)),
    "vivit": InputSpec(32, 1, 224, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def full_configs() -> dict[str, PreTrainedConfig]:
    """The hub checkpoints' architectures written out (values from their config.json)."""
    return {
        # facebook/vjepa2-vitl-fpc64-256
        "student": VJEPA2Config(crop_size=256, patch_size=16, tubelet_size=2, frames_per_clip=64, hidden_size=1024,
                                num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4.0, layer_norm_eps=1e-6,
                                pred_hidden_size=384, pred_num_hidden_layers=12, pred_num_attention_heads=12,
                                pred_num_mask_tokens=10, num_pooler_layers=3),
        # MCG-NJU/videomae-base (its config has use_mean_pooling=false: final LayerNorm applied)
        "videomae": VideoMAEConfig(image_size=224, patch_size=16, num_frames=16, tubelet_size=2, hidden_size=768,
                                   num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                   layer_norm_eps=1e-12, use_mean_pooling=False),
        # facebook/timesformer-base-finetuned-k400 (trained on 8 frames; fed 16)
        "timesformer": TimesformerConfig(image_size=224, patch_size=16, num_frames=8, hidden_size=768,
                                         num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                         layer_norm_eps=1e-6, attention_type="divided_space_time"),
        # google/vivit-b-16x2-kinetics400
        "vivit": VivitConfig(image_size=224, num_frames=32, tubelet_size=[2, 16, 16], hidden_size=768,
                             num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             hidden_act="gelu_fast", layer_norm_eps=1e-6),
    }


def tiny_configs() -> dict[str, PreTrainedConfig]:
    """Tiny configs of the same classes: full input sizes and patching, so full-size token layouts.

    Widths follow the smoke job: student 64, teachers 48.
    """
    return {
        "student": VJEPA2Config(crop_size=256, patch_size=16, tubelet_size=2, frames_per_clip=64, hidden_size=64,
                                num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2.0, layer_norm_eps=1e-6,
                                pred_hidden_size=32, pred_num_hidden_layers=1, pred_num_attention_heads=2,
                                pred_num_mask_tokens=2, num_pooler_layers=1),
        "videomae": VideoMAEConfig(image_size=224, patch_size=16, num_frames=16, tubelet_size=2, hidden_size=48,
                                   num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                                   use_mean_pooling=False, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                                   decoder_num_attention_heads=2, decoder_intermediate_size=64),
        "timesformer": TimesformerConfig(image_size=224, patch_size=16, num_frames=8, hidden_size=48,
                                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=96),
        "vivit": VivitConfig(image_size=224, num_frames=32, tubelet_size=[2, 16, 16], hidden_size=48,
                             num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, hidden_act="gelu_fast"),
    }


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def layout_spec(name: str, config: PreTrainedConfig, inputs: InputSpec | None = None) -> TargetSpec:
    """The token layout a model emits for its :data:`INPUT_SPECS` input (the layout rules).

    Raises ValueError when the input does not fit a model with a fixed position table.
    """
    inputs = inputs or INPUT_SPECS[name]
    if name == "student":
        ph, pw = _pair(config.patch_size)
        if inputs.crop != config.crop_size:
            raise ValueError(f"student: input {inputs.crop}px but RoPE rows assume crop_size {config.crop_size}")
        grid = (inputs.frames // config.tubelet_size, inputs.crop // ph, inputs.crop // pw)
    elif name == "videomae":
        ph, pw = _pair(config.patch_size)
        if (inputs.frames, inputs.crop) != (config.num_frames, _pair(config.image_size)[0]):
            raise ValueError(f"videomae: fixed position table needs {config.num_frames} frames at "
                             f"{config.image_size}px, got {inputs.frames} at {inputs.crop}px")
        grid = (inputs.frames // config.tubelet_size, inputs.crop // ph, inputs.crop // pw)
    elif name == "timesformer":
        ph, pw = _pair(config.patch_size)
        grid = (inputs.frames, inputs.crop // ph, inputs.crop // pw)  # CLS dropped, one token per frame patch
    elif name == "vivit":
        if (inputs.frames, inputs.crop) != (config.num_frames, _pair(config.image_size)[0]):
            raise ValueError(f"vivit: fixed position table needs {config.num_frames} frames at "
                             f"{config.image_size}px, got {inputs.frames} at {inputs.crop}px")
        return TargetSpec(name, 1, config.hidden_size, None)  # CLS token only
    else:
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(MODEL_NAMES)}")
    return TargetSpec(name, math.prod(grid), config.hidden_size, grid)


# ----------------------------------------------------------------------------------------------- inputs

def _resize_crop(x: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, crop, crop): shortest edge to ``resize`` (antialiased bilinear), center crop.

    Same geometry as the transformers processors (``shortest_edge`` resize, then ``center_crop``).
    uint8 input (CPU) stays uint8, rounded after resizing like the processors.
    """
    h, w = x.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(resize * long / short)
    size = (resize, new_long) if h <= w else (new_long, resize)
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    if crop > min(size):
        raise ValueError(f"center crop {crop} larger than the resized frame {size}")
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2  # floor, as transformers' center_crop
    return x[..., top:top + crop, left:left + crop]


@functools.lru_cache(maxsize=32)
def _affine(spec: InputSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of shape (1, 1, 3, 1, 1) with (x/255 - mean)/std == x*scale - shift, made once per device."""
    std, mean = torch.tensor(spec.std, dtype=torch.float64), torch.tensor(spec.mean, dtype=torch.float64)
    scale, shift = 1.0 / (255.0 * std), mean / std
    return tuple(t.float().view(1, 1, 3, 1, 1).to(device) for t in (scale, shift))


def _take(x: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """x[:, indices] as a view (a strided slice) when the indices are evenly spaced, else a gather."""
    step = indices[1] - indices[0] if len(indices) > 1 else 1
    if step > 0 and list(range(indices[0], indices[-1] + 1, step)) == list(indices):
        return x[:, indices[0]:indices[-1] + 1:step]
    return x[:, indices]


def derive_inputs(frames: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                  specs: dict[str, InputSpec] | None = None) -> dict[str, torch.Tensor]:
    """One decoded window -> every model's ``pixel_values`` on the window's device.

    frames: uint8 (B, window, S, S', 3) (a numpy array is accepted). Returns {name: (B, T, 3, H, W)}
    contiguous in ``dtype``. Models sharing a geometry share one resize of the union of their frames.
    """
    specs = specs or INPUT_SPECS
    frames = torch.as_tensor(frames)
    if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 (B, window, H, W, 3), got {tuple(frames.shape)} {frames.dtype}")
    b, window = frames.shape[:2]
    by_geometry: dict[tuple[int, int], list[str]] = {}
    for name, spec in specs.items():
        if spec.window > window:
            raise ValueError(f"{name}: needs a window of {spec.window} frames, got {window}")
        by_geometry.setdefault((spec.resize, spec.crop), []).append(name)
    out: dict[str, torch.Tensor] = {}
    for (resize, crop), names in by_geometry.items():
        idx = sorted({i for n in names for i in specs[n].frame_indices})
        x = _take(frames, idx).flatten(0, 1).permute(0, 3, 1, 2)  # (N, 3, H, W), channels-last memory
        if x.device.type != "cpu":
            x = x.float()  # CUDA has no uint8 antialias kernel; CPU's uint8 channels-last one is ~6x faster
        x = _resize_crop(x, resize, crop).unflatten(0, (b, len(idx)))
        pos = {i: k for k, i in enumerate(idx)}
        for n in names:
            spec = specs[n]
            scale, shift = _affine(spec, x.device)
            sel = _take(x, [pos[i] for i in spec.frame_indices])
            sel = sel.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # never alias x
            out[n] = sel.mul_(scale).sub_(shift).to(dtype)  # (x/255 - mean)/std
    return out


# ------------------------------------------------------------------------------------------------ models

def _sdpa_self_attention(self, hidden_states, output_attentions: bool = False):
    """TimesformerSelfAttention.forward through F.scaled_dot_product_attention (same math)."""
    if output_attentions:
        return type(self).forward(self, hidden_states, output_attentions)
    b, n, c = hidden_states.shape
    q, k, v = self.qkv(hidden_states).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    p = self.attn_drop.p if self.training else 0.0
    ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
    return (ctx.transpose(1, 2).reshape(b, n, c),)


def use_sdpa_timesformer(model: TimesformerModel) -> TimesformerModel:
    """Route every TimeSformer self-attention through SDPA (transformers has no SDPA path for it)."""
    for m in model.modules():
        if isinstance(m, TimesformerSelfAttention):
            m.forward = types.MethodType(_sdpa_self_attention, m)
    return model


def _rope_block(size: int, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (n, size) of one RoPE block, computed exactly as ``rotate_queries_or_keys`` does (in ``dtype``)."""
    omega = torch.arange(size // 2, dtype=dtype, device=pos.device)
    omega /= size / 2.0
    omega = 1.0 / 10000**omega
    freq = pos.unsqueeze(-1) * omega  # (n, size/2)
    return freq.cos().repeat(1, 2), freq.sin().repeat(1, 2)


def _rope_tables(self: VJEPA2RopeAttention, pos_ids, n: int, dtype: torch.dtype):
    """(cos, sin), each (n, head_dim), for all three (frame, height, width) blocks at once; cached per
    (n, dtype, device). Dims past the three blocks get cos 1, sin 0 (left unrotated, as upstream)."""
    key = (n, dtype, pos_ids[0].device)
    cache = self.__dict__.setdefault("_rope_cache", {})
    if key not in cache:
        blocks = [_rope_block(size, pos, dtype) for pos, size in zip(pos_ids, (self.d_dim, self.h_dim, self.w_dim))]
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
    swapped = torch.stack((-qk[..., 1::2], qk[..., 0::2]), dim=-1).flatten(-2)  # pairs (a, b) -> (-b, a)
    return (qk * cos) + (swapped * sin)


def use_cached_rope_vjepa2(model: VJEPA2Model) -> VJEPA2Model:
    """Route every V-JEPA 2 RoPE through :func:`_cached_rotary_embeddings` (fewer, larger kernels)."""
    for m in model.modules():
        if isinstance(m, VJEPA2RopeAttention):
            m.apply_rotary_embeddings = types.MethodType(_cached_rotary_embeddings, m)
    return model


def _cls_only_vivit_layer(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
    """VivitLayer.forward when only the CLS token is read after it: (B, N, C) -> (B, 1, C), the full
    layer's row 0. Keys and values still come from every token; the query, the output projection and
    the MLP run on the CLS row alone (ViViT keeps no attention mask)."""
    att, b = self.attention, hidden_states.shape[0]
    normed = self.layernorm_before(hidden_states)
    q, k, v = (proj(x).view(b, x.shape[1], -1, att.head_dim).transpose(1, 2)
               for proj, x in ((att.q_proj, normed[:, :1]), (att.k_proj, normed), (att.v_proj, normed)))
    ctx = F.scaled_dot_product_attention(q, k, v, scale=att.scaling).transpose(1, 2).reshape(b, 1, -1)
    cls = att.o_proj(ctx) + hidden_states[:, :1]
    return self.mlp(self.layernorm_after(cls)) + cls


def use_cls_only_last_layer_vivit(model: VivitModel) -> VivitModel:
    """ViViT's last layer computes the CLS token only (the one token read: its 1 x 768 target), 1/12 of
    ViViT's work less; ``last_hidden_state`` is then (B, 1, C)."""
    last = model.layers[-1]
    last.forward = types.MethodType(_cls_only_vivit_layer, last)
    return model


def fuse_fast_gelu(model: nn.Module) -> nn.Module:
    """transformers' FastGELUActivation (ViViT's ``gelu_fast``: six elementwise kernels over the MLP's widest
    activation) -> ``nn.GELU(approximate="tanh")``, the same formula in one kernel (computed in float32)."""
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, FastGELUActivation):
                setattr(parent, child_name, nn.GELU(approximate="tanh"))
    return model


def use_float8_linears(model: nn.Module, granularity: str = "row") -> nn.Module:
    """Every ``nn.Linear`` of ``model`` (on CUDA) -> torchao's dynamic float8: weights stored e4m3 with one
    scale per output row (``granularity="tensor"``: one per tensor), activations scaled likewise at each
    call, matmuls through ``torch._scaled_mm`` (twice the bf16 tensor-core rate on Hopper); outputs stay
    in the weights' dtype. Needs ``torch.compile`` to pay off: eager, the scaling passes cost more than the
    matmuls gain (bench/RESULTS.md)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"models.fp8: float8 matmuls need a CUDA device; {type(model).__name__} is on {device}")
    if torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"models.fp8: float8 matmuls need compute capability >= 8.9; "
                         f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}")
    try:
        from torchao import quantization as ao
    except ImportError as e:
        raise ImportError("models.fp8 needs torchao: pip install 'tokconv-pipeline[cuda]'") from e
    gran = {"row": ao.PerRow, "tensor": ao.PerTensor}[granularity]()
    # activation_value_lb: an all-zero row (a zero-initialised CLS token after LayerNorm) would get scale 0
    # and turn into NaN; set_inductor_config=False: its tuning is process-wide and lengthens every compile
    ao.quantize_(model, ao.Float8DynamicActivationFloat8WeightConfig(
        granularity=gran, activation_value_lb=1e-12, set_inductor_config=False))
    return model


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _cached_model_dir(name: str, fill) -> str:
    """``TOKCONV_MODEL_CACHE/<name>`` holding a model directory (it has a config.json); made once by
    ``fill(tmp_dir)`` in a temporary directory beside it, then renamed: concurrent actors never see half a
    copy, and a copy that loses the race is removed."""
    root = Path(os.environ.get("TOKCONV_MODEL_CACHE", Path(tempfile.gettempdir()) / "tokconv-models"))
    dest = root / name
    if not (dest / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root))
        try:
            fill(str(tmp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            tmp.rename(dest)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def _local_copy(source: str, storage_options: dict | None = None) -> str:
    """fsspec URL (s3://...) -> a local directory holding its files (cached per URL; see TOKCONV_MODEL_CACHE)."""
    src = Storage(source, storage_options)

    def fill(tmp: str) -> None:
        if not src.exists("config.json"):
            raise FileNotFoundError(f"model source {source!r}: no config.json there")
        src.download("", tmp, recursive=True)
    return _cached_model_dir(hashlib.sha1(source.encode()).hexdigest()[:16], fill)


def _seeded_init(name: str, config: PreTrainedConfig, seed: int, kw: dict) -> nn.Module:
    """Random float32 init on the CPU RNG: the same seed gives the same weights on every device (CUDA's
    generator would draw different ones); the global RNG is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODEL_CLASSES[name]._from_config(config, dtype=torch.float32, **kw)


def _random_checkpoint(name: str, config: PreTrainedConfig, seed: int, kw: dict) -> str:
    """A save_pretrained directory of :func:`_seeded_init`'s weights, cached under TOKCONV_MODEL_CACHE by
    (class, config, seed): drawing the four full-size models took 13 s of CPU per process on the H200
    host; actors load them instead."""
    key = hashlib.sha1(json.dumps([name, config.to_dict(), seed, sorted(kw.items())], sort_keys=True,
                                  default=str).encode()).hexdigest()[:16]
    return _cached_model_dir(f"random-{name}-{key}",
                             lambda tmp: _seeded_init(name, config, seed, kw).save_pretrained(tmp))


def _finish(name: str, model: nn.Module) -> nn.Module:
    if name == "timesformer":
        # its layers reshape with config.num_frames (see module doc): give them a copy holding the frames fed,
        # and keep model.config the checkpoint's, so save_pretrained still round-trips
        layer_config = copy.deepcopy(model.config)
        layer_config.num_frames = INPUT_SPECS[name].frames
        for layer in model.encoder.layer:
            layer.config = layer_config
        use_sdpa_timesformer(model)
    if name == "student":
        use_cached_rope_vjepa2(model)
    if name == "vivit":
        use_cls_only_last_layer_vivit(model)
    fuse_fast_gelu(model)
    model.eval().requires_grad_(False)
    return model


def build_models(cfg: ModelsConfig, *, device: str | torch.device | None = None,
                 storage_options: dict | None = None) -> dict[str, nn.Module]:
    """Load the four backbones per ``cfg.weights``; eval mode, no grads, on ``device``.

    Weights are ``cfg.dtype`` on CUDA and float32 on CPU. Random/tiny inits are seeded per model
    (``cfg.seed + index``) without touching the global RNG.
    """
    device = resolve_device(cfg.device if device is None else device)
    dtype = DTYPES[cfg.dtype] if device.type == "cuda" else torch.float32
    configs = {"random": full_configs, "tiny": tiny_configs}.get(cfg.weights, lambda: None)()
    models: dict[str, nn.Module] = {}
    for i, name in enumerate(MODEL_NAMES):
        cls, kw = MODEL_CLASSES[name], dict(INIT_KWARGS.get(name, {}))
        if cls._supports_sdpa:
            kw["attn_implementation"] = "sdpa"
        if cfg.weights == "pretrained":
            spec = getattr(cfg, name)
            source = _local_copy(spec.source, storage_options) if "://" in spec.source and not \
                spec.source.startswith("file://") else spec.source.removeprefix("file://")
            model = cls.from_pretrained(source, revision=spec.revision, dtype=dtype, **kw).to(device)
        elif device.type == "meta":  # shapes only: nothing to draw
            with torch.device("meta"):
                model = cls._from_config(configs[name], dtype=dtype, **kw)
        elif cfg.weights == "random":  # full size: drawn once per (config, seed), then loaded like a checkpoint
            model = cls.from_pretrained(_random_checkpoint(name, configs[name], cfg.seed + i, kw),
                                        dtype=dtype, **kw).to(device)
        else:
            model = _seeded_init(name, configs[name], cfg.seed + i, kw).to(device=device, dtype=dtype)
        models[name] = _finish(name, model)
    return models


def _tokens(name: str, hidden: torch.Tensor, spec: TargetSpec) -> torch.Tensor:
    """last_hidden_state -> the tokens used, (B, spec.tokens, dim), grids in (T, H, W) order."""
    if name == "vivit":
        return hidden[:, :1]
    if name == "timesformer":  # drop CLS; tokens come patch-major (H, W, T)
        t, h, w = spec.grid
        return hidden[:, 1:].unflatten(1, (h * w, t)).transpose(1, 2).flatten(1, 2).contiguous()
    return hidden


class FeatureExtractor:
    """The four backbones behind one call: decoded window -> {name: tokens (B, tokens, dim)}.

    CUDA: weights and activations in ``cfg.dtype`` (``cfg.autocast`` adds torch.autocast: norms and
    softmax in float32), SDPA backend per ``cfg.attention``, float8 linears per ``cfg.fp8``
    (:func:`use_float8_linears`); CPU: float32. ``cfg.compile`` names the
    models to ``torch.compile`` on CUDA (compile per model: it regresses some); they compile at the
    first call (~10-20 s each, less with a warm inductor cache). Not on a side thread while eager
    calls go on: FX tracing patches ``nn.Module.__call__`` process-wide, so a concurrent eager call
    fails ("FX to symbolically trace a dynamo-optimized function", seen on the H200).
    """

    def __init__(self, cfg: ModelsConfig, device: str | torch.device | None = None, *,
                 storage_options: dict | None = None):
        for field in ("compile", "fp8"):
            unknown = set(getattr(cfg, field)) - set(MODEL_NAMES)
            if unknown:
                raise ValueError(f"models.{field}: unknown model names {sorted(unknown)}; known: {MODEL_NAMES}")
        self.device = resolve_device(cfg.device if device is None else device)
        self.dtype = DTYPES[cfg.dtype] if self.device.type == "cuda" else torch.float32
        self.models = build_models(cfg, device=self.device, storage_options=storage_options)
        self.specs: dict[str, TargetSpec] = {n: layout_spec(n, m.config) for n, m in self.models.items()}
        self.fp8 = [n for n in MODEL_NAMES if n in cfg.fp8] if self.device.type == "cuda" else []
        for n in self.fp8:  # before compiling: the compiled graphs see the float8 weights
            use_float8_linears(self.models[n])
        self.compiled = [n for n in MODEL_NAMES if n in cfg.compile] if self.device.type == "cuda" else []
        self.compile_scope = cfg.compile_scope
        self._run: dict[str, nn.Module] = {n: (self._compile(m) if n in self.compiled else m)
                                           for n, m in self.models.items()}
        self.autocast = cfg.autocast and self.device.type == "cuda" and self.dtype != torch.float32
        self.attention = cfg.attention

    def _compile(self, model: nn.Module, backend: str = "inductor") -> nn.Module:
        """torch.compile per ``compile_scope``: the whole model (a wrapper is returned), or each block of
        the model's repeated-layer ModuleLists in place (regional compilation: same-class blocks share
        one compiled graph, since dynamo treats their parameters as inputs). Compiles at the first call."""
        if self.compile_scope == "model":
            return torch.compile(model, backend=backend)
        blocks = [b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m]
        if not blocks:
            raise ValueError(f"compile_scope=layers: {type(model).__name__} has no ModuleList of blocks")
        for block in blocks:
            block.compile(backend=backend)
        return model

    def _context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if self.autocast:
            stack.enter_context(torch.autocast("cuda", dtype=self.dtype))
        if self.attention != "auto" and self.device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            order = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                     "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
            first = order.pop(self.attention)
            stack.enter_context(sdpa_kernel([first, *order.values()], set_priority=True))
        return stack

    @torch.inference_mode()
    def run(self, name: str, pixel_values: torch.Tensor) -> torch.Tensor:
        """One model on its own input (B, T, 3, H, W) -> (B, tokens, dim)."""
        with self._context():
            if name == "student":
                out = self._run[name](pixel_values_videos=pixel_values, skip_predictor=True)
            else:
                out = self._run[name](pixel_values=pixel_values)
        return _tokens(name, out.last_hidden_state, self.specs[name])

    @torch.inference_mode()
    def __call__(self, frames) -> dict[str, torch.Tensor]:
        """frames: uint8 (B, window, S, S, 3) tensor/array (pinned CPU memory copies asynchronously)."""
        frames = torch.as_tensor(frames).to(self.device, non_blocking=True)
        inputs = derive_inputs(frames, dtype=self.dtype)
        return {n: self.run(n, inputs[n]) for n in MODEL_NAMES}
