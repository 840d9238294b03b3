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
  support in transformers, so ``rewrites.use_sdpa_timesformer`` swaps in an SDPA attention forward.

Speed rewrites of the loaded modules (exact, or within bf16 rounding: ``ModelsConfig.rewrites``) live in
:mod:`pipeline.rewrites`; :func:`build_models` applies them after loading.
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
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from pipeline.config import ModelsConfig
from pipeline.dtypes import TORCH_DTYPES as DTYPES
from pipeline.rewrites import (
    apply_rewrites,
    fuse_fast_gelu,
    use_cached_rope_vjepa2,
    use_cls_only_last_layer_vivit,
    use_float8_linears,
    use_sdpa_timesformer,
)
from pipeline.storage import Storage, is_remote
from tokconv.targets import TargetSpec

MODEL_NAMES = ("student", "videomae", "timesformer", "vivit")
MODEL_CLASSES = {"student": VJEPA2Model, "videomae": VideoMAEModel,
                 "timesformer": TimesformerModel, "vivit": VivitModel}
INIT_KWARGS = {"vivit": {"add_pooling_layer": False}}  # the k400 checkpoint has no pooler; CLS is read raw


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


def _finish(name: str, model: nn.Module, rewrites=(), device: torch.device | None = None) -> nn.Module:
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
    apply_rewrites(name, model, rewrites, device or next(model.parameters()).device)
    model.eval().requires_grad_(False)
    return model


def model_rewrites(cfg: ModelsConfig, name: str) -> list[str]:
    """``cfg.rewrites`` for one model: a model in ``cfg.fp8`` keeps its MLP linear a plain ``nn.Linear``
    (no ``gelu_epilogue``), so that float8 covers every linear layer."""
    return [r for r in cfg.rewrites if not (r == "gelu_epilogue" and name in cfg.fp8)]


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
            source = _local_copy(spec.source, storage_options or cfg.storage_options) \
                if is_remote(spec.source) else spec.source.removeprefix("file://")
            model = cls.from_pretrained(source, revision=spec.revision, dtype=dtype, **kw).to(device)
        elif device.type == "meta":  # shapes only: nothing to draw
            with torch.device("meta"):
                model = cls._from_config(configs[name], dtype=dtype, **kw)
        elif cfg.weights == "random":  # full size: drawn once per (config, seed), then loaded like a checkpoint
            model = cls.from_pretrained(_random_checkpoint(name, configs[name], cfg.seed + i, kw),
                                        dtype=dtype, **kw).to(device)
        else:
            model = _seeded_init(name, configs[name], cfg.seed + i, kw).to(device=device, dtype=dtype)
        models[name] = _finish(name, model, model_rewrites(cfg, name), device)
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
