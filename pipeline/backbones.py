"""The four video backbones: student (V-JEPA 2 ViT-L) and three teachers (VideoMAE-B,
TimeSformer-B, ViViT-B).

Real ``transformers`` classes, loaded three ways (``ModelsConfig.weights``): ``pretrained``
(``from_pretrained`` of a hub id, a local directory or an ``s3://``/fsspec directory), ``random``
(the hub architectures written out in :func:`full_configs`, seeded random init: benchmarks on
hosts without hub access) and ``tiny`` (:func:`tiny_configs`: same classes, hidden 48-64, 1-2
layers, but the FULL input sizes, so tiny models emit exactly the full-size token layouts).

One decoded window (B, 32, S, S, 3) uint8 serves all four models: ``pipeline.preprocess``
derives each model's input from it. Token layouts (:func:`layout_spec`) are derived from the
configs; every grid output is flattened row-major over (T, H, W): token ``t*H*W + h*W + w``.

Layout notes (transformers 5.x):
* V-JEPA 2 uses 3D RoPE whose row length is ``crop_size // patch_size``: inputs must be
  ``crop_size`` square; any frame count works (``skip_predictor=True``: encoder output only).
* VideoMAE and ViViT have fixed position tables: exactly ``config.num_frames`` frames at
  ``image_size``. ViViT's target is its CLS token alone, so its last layer computes that row only
  (:func:`use_cls_only_last_layer_vivit`: ``last_hidden_state`` is (B, 1, 768)).
* TimeSformer interpolates its time embeddings to the frame count, but its divided space-time
  layers reshape with ``config.num_frames``; after loading the k400 checkpoint (8 frames) the
  layers get a config copy saying 16, else temporal attention silently groups the wrong tokens.
  Its tokens come out patch-major ((H, W, T) order) and are reordered to (T, H, W). It has no SDPA
  support in transformers, so ``rewrites.use_sdpa_timesformer`` swaps in an SDPA attention.

Speed rewrites of the loaded modules (exact, or within bf16 rounding: ``ModelsConfig.rewrites``)
live in :mod:`pipeline.rewrites`; :func:`build_models` applies them after loading.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
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

from pipeline.config import ModelsConfig
from pipeline.dtypes import TORCH_DTYPES as DTYPES
from pipeline.preprocess import INPUT_SPECS, InputSpec, derive_inputs
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
# the k400 checkpoint has no pooler; CLS is read raw
INIT_KWARGS = {"vivit": {"add_pooling_layer": False}}


def full_configs() -> dict[str, PreTrainedConfig]:
    """The hub checkpoints' architectures written out (values from their config.json)."""
    vit_b = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072}
    return {
        # facebook/vjepa2-vitl-fpc64-256
        "student": VJEPA2Config(
            crop_size=256, patch_size=16, tubelet_size=2, frames_per_clip=64, hidden_size=1024,
            num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4.0, layer_norm_eps=1e-6,
            pred_hidden_size=384, pred_num_hidden_layers=12, pred_num_attention_heads=12,
            pred_num_mask_tokens=10, num_pooler_layers=3),
        # MCG-NJU/videomae-base (its config has use_mean_pooling=false: final LayerNorm applied)
        "videomae": VideoMAEConfig(image_size=224, patch_size=16, num_frames=16, tubelet_size=2,
                                   layer_norm_eps=1e-12, use_mean_pooling=False, **vit_b),
        # facebook/timesformer-base-finetuned-k400 (trained on 8 frames; fed 16)
        "timesformer": TimesformerConfig(image_size=224, patch_size=16, num_frames=8,
                                         layer_norm_eps=1e-6,
                                         attention_type="divided_space_time", **vit_b),
        # google/vivit-b-16x2-kinetics400
        "vivit": VivitConfig(image_size=224, num_frames=32, tubelet_size=[2, 16, 16],
                             hidden_act="gelu_fast", layer_norm_eps=1e-6, **vit_b),
    }


def tiny_configs() -> dict[str, PreTrainedConfig]:
    """Tiny configs of the same classes: full input sizes and patching, so full-size token layouts.

    Widths follow the smoke job: student 64, teachers 48.
    """
    tiny_b = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 96}
    return {
        "student": VJEPA2Config(
            crop_size=256, patch_size=16, tubelet_size=2, frames_per_clip=64, hidden_size=64,
            num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2.0, layer_norm_eps=1e-6,
            pred_hidden_size=32, pred_num_hidden_layers=1, pred_num_attention_heads=2,
            pred_num_mask_tokens=2, num_pooler_layers=1),
        "videomae": VideoMAEConfig(
            image_size=224, patch_size=16, num_frames=16, tubelet_size=2, use_mean_pooling=False,
            decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
            decoder_intermediate_size=64, **tiny_b),
        "timesformer": TimesformerConfig(image_size=224, patch_size=16, num_frames=8, **tiny_b),
        "vivit": VivitConfig(image_size=224, num_frames=32, tubelet_size=[2, 16, 16],
                             hidden_act="gelu_fast", **tiny_b),
    }


def model_configs(cfg: ModelsConfig) -> dict[str, PreTrainedConfig]:
    """The four configs ``cfg.weights`` selects: tiny, full (random) or each source's config.json
    (read alone: no weights are fetched)."""
    if cfg.weights == "tiny":
        return tiny_configs()
    if cfg.weights == "random":
        return full_configs()
    configs = {}
    for name in MODEL_NAMES:
        src, cls = getattr(cfg, name), MODEL_CLASSES[name].config_class
        if is_remote(src.source):
            data = Storage(src.source, cfg.storage_options).read_json("config.json")
            configs[name] = cls.from_dict(data)
        else:
            path = src.source.removeprefix("file://")
            configs[name] = cls.from_pretrained(path, revision=src.revision)
    return configs


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
            raise ValueError(f"student: input {inputs.crop}px but RoPE rows assume crop_size "
                             f"{config.crop_size}")
        grid = (inputs.frames // config.tubelet_size, inputs.crop // ph, inputs.crop // pw)
    elif name in ("videomae", "vivit"):
        if (inputs.frames, inputs.crop) != (config.num_frames, _pair(config.image_size)[0]):
            raise ValueError(f"{name}: fixed position table needs {config.num_frames} frames at "
                             f"{config.image_size}px, got {inputs.frames} at {inputs.crop}px")
        if name == "vivit":
            return TargetSpec(name, 1, config.hidden_size, None)  # CLS token only
        ph, pw = _pair(config.patch_size)
        grid = (inputs.frames // config.tubelet_size, inputs.crop // ph, inputs.crop // pw)
    elif name == "timesformer":
        ph, pw = _pair(config.patch_size)
        # CLS dropped, one token per frame patch
        grid = (inputs.frames, inputs.crop // ph, inputs.crop // pw)
    else:
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(MODEL_NAMES)}")
    return TargetSpec(name, math.prod(grid), config.hidden_size, grid)


# ------------------------------------------------------------------------------------------ models

def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _cached_model_dir(name: str, fill) -> str:
    """``TOKCONV_MODEL_CACHE/<name>`` holding a model directory (it has a config.json); made once
    by ``fill(tmp_dir)`` in a temporary directory beside it, then renamed: concurrent actors never
    see half a copy, and a copy that loses the race is removed."""
    default = Path(tempfile.gettempdir()) / "tokconv-models"
    root = Path(os.environ.get("TOKCONV_MODEL_CACHE", default))
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
    """fsspec URL (s3://...) -> a local directory holding its files (cached per URL; see
    TOKCONV_MODEL_CACHE)."""
    src = Storage(source, storage_options)

    def fill(tmp: str) -> None:
        if not src.exists("config.json"):
            raise FileNotFoundError(f"model source {source!r}: no config.json there")
        src.download("", tmp, recursive=True)
    return _cached_model_dir(hashlib.sha1(source.encode()).hexdigest()[:16], fill)


def _seeded_init(name: str, config: PreTrainedConfig, seed: int, kw: dict) -> nn.Module:
    """Random float32 init on the CPU RNG: the same seed gives the same weights on every device
    (CUDA's generator would draw different ones); the global RNG is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODEL_CLASSES[name]._from_config(config, dtype=torch.float32, **kw)


def _random_checkpoint(name: str, config: PreTrainedConfig, seed: int, kw: dict) -> str:
    """A save_pretrained directory of :func:`_seeded_init`'s weights, cached under
    TOKCONV_MODEL_CACHE by (class, config, seed): drawing the four full-size models took 13 s of
    CPU per process on the H200 host; actors load them instead."""
    key = hashlib.sha1(json.dumps([name, config.to_dict(), seed, sorted(kw.items())],
                                  sort_keys=True, default=str).encode()).hexdigest()[:16]
    return _cached_model_dir(f"random-{name}-{key}",
                             lambda tmp: _seeded_init(name, config, seed, kw).save_pretrained(tmp))


def _finish(name: str, model: nn.Module, rewrites=(), device: torch.device | None = None):
    if name == "timesformer":
        # its layers reshape with config.num_frames (see module doc): give them a copy holding the
        # frames fed, and keep model.config the checkpoint's, so save_pretrained still round-trips
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
    """``cfg.rewrites`` for one model: a model in ``cfg.fp8`` keeps its MLP linear a plain
    ``nn.Linear`` (no ``gelu_epilogue``), so that float8 covers every linear layer."""
    return [r for r in cfg.rewrites if not (r == "gelu_epilogue" and name in cfg.fp8)]


def load_model(cfg: ModelsConfig, name: str, device: torch.device,
               storage_options: dict | None = None) -> nn.Module:
    """One backbone as transformers builds it (SDPA where it has it, no rewrites): ``cfg.dtype``
    on CUDA, float32 elsewhere; random/tiny inits seeded with ``cfg.seed + index``."""
    dtype = DTYPES[cfg.dtype] if device.type == "cuda" else torch.float32
    cls, kw = MODEL_CLASSES[name], dict(INIT_KWARGS.get(name, {}))
    if cls._supports_sdpa:
        kw["attn_implementation"] = "sdpa"
    seed = cfg.seed + MODEL_NAMES.index(name)
    if cfg.weights == "pretrained":
        spec = getattr(cfg, name)
        source = (_local_copy(spec.source, storage_options or cfg.storage_options)
                  if is_remote(spec.source) else spec.source.removeprefix("file://"))
        return cls.from_pretrained(source, revision=spec.revision, dtype=dtype, **kw).to(device)
    config = model_configs(cfg)[name]
    if device.type == "meta":  # shapes only: nothing to draw
        with torch.device("meta"):
            return cls._from_config(config, dtype=dtype, **kw)
    if cfg.weights == "random":  # full size: drawn once per (config, seed), then loaded
        return cls.from_pretrained(_random_checkpoint(name, config, seed, kw),
                                   dtype=dtype, **kw).to(device)
    return _seeded_init(name, config, seed, kw).to(device=device, dtype=dtype)


def build_models(cfg: ModelsConfig, *, device: str | torch.device | None = None,
                 storage_options: dict | None = None) -> dict[str, nn.Module]:
    """Load the four backbones per ``cfg.weights`` (:func:`load_model`) and apply the always-on
    and configured rewrites; eval mode, no grads, on ``device``."""
    device = resolve_device(cfg.device if device is None else device)
    return {name: _finish(name, load_model(cfg, name, device, storage_options),
                          model_rewrites(cfg, name), device) for name in MODEL_NAMES}


def select_tokens(name: str, hidden: torch.Tensor, spec: TargetSpec) -> torch.Tensor:
    """last_hidden_state -> the tokens used, (B, spec.tokens, dim), grids in (T, H, W) order."""
    if name == "vivit":
        return hidden[:, :1]
    if name == "timesformer":  # drop CLS; tokens come patch-major (H, W, T)
        t, h, w = spec.grid
        return hidden[:, 1:].unflatten(1, (h * w, t)).transpose(1, 2).flatten(1, 2).contiguous()
    return hidden


def forward(name: str, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """One backbone on its input (B, T, 3, H, W) -> last_hidden_state; the student's encoder only.
    """
    if name == "student":
        return model(pixel_values_videos=pixel_values, skip_predictor=True).last_hidden_state
    return model(pixel_values=pixel_values).last_hidden_state


class FeatureExtractor:
    """The four backbones behind one call: decoded window -> {name: tokens (B, tokens, dim)}.

    CUDA: weights and activations in ``cfg.dtype``, SDPA backend per ``cfg.attention``, float8
    linears per ``cfg.fp8`` (:func:`use_float8_linears`); CPU: float32. ``cfg.compile`` names the
    models whose repeated blocks ``torch.compile`` compiles on CUDA (per model: it regresses some);
    they compile at the first call (~10-20 s each, less with a warm inductor cache). Not on a side
    thread while eager calls go on: FX tracing patches ``nn.Module.__call__`` process-wide, so a
    concurrent eager call fails ("FX to symbolically trace a dynamo-optimized function").
    """

    def __init__(self, cfg: ModelsConfig, device: str | torch.device | None = None, *,
                 storage_options: dict | None = None):
        for field in ("compile", "fp8"):
            unknown = set(getattr(cfg, field)) - set(MODEL_NAMES)
            if unknown:
                raise ValueError(f"models.{field}: unknown model names {sorted(unknown)}; "
                                 f"known: {MODEL_NAMES}")
        self.device = resolve_device(cfg.device if device is None else device)
        cuda = self.device.type == "cuda"
        self.dtype = DTYPES[cfg.dtype] if cuda else torch.float32
        self.models = build_models(cfg, device=self.device, storage_options=storage_options)
        self.specs: dict[str, TargetSpec] = {n: layout_spec(n, m.config)
                                             for n, m in self.models.items()}
        self.fp8 = [n for n in MODEL_NAMES if n in cfg.fp8] if cuda else []
        for n in self.fp8:  # before compiling: the compiled graphs see the float8 weights
            use_float8_linears(self.models[n])
        self.compiled = [n for n in MODEL_NAMES if n in cfg.compile] if cuda else []
        self._run: dict[str, nn.Module] = {n: (self._compile(m) if n in self.compiled else m)
                                           for n, m in self.models.items()}
        self.attention = cfg.attention

    @staticmethod
    def _compile(model: nn.Module, backend: str = "inductor") -> nn.Module:
        """torch.compile each block of the model's repeated-layer ModuleLists in place (regional
        compilation: same-class blocks share one compiled graph, since dynamo treats their
        parameters as inputs); returns the model. Compiles at the first call."""
        blocks = [b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m]
        if not blocks:
            raise ValueError(f"models.compile: {type(model).__name__} has no ModuleList of blocks")
        for block in blocks:
            block.compile(backend=backend)
        return model

    def _context(self) -> contextlib.AbstractContextManager:
        if self.attention == "auto" or self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel
        order = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
        first = order.pop(self.attention)
        return sdpa_kernel([first, *order.values()], set_priority=True)

    @torch.inference_mode()
    def run(self, name: str, pixel_values: torch.Tensor) -> torch.Tensor:
        """One model on its own input (B, T, 3, H, W) -> (B, tokens, dim)."""
        with self._context():
            hidden = forward(name, self._run[name], pixel_values)
        return select_tokens(name, hidden, self.specs[name])

    @torch.inference_mode()
    def __call__(self, frames) -> dict[str, torch.Tensor]:
        """frames: uint8 (B, window, S, S, 3) tensor/array (pinned CPU memory copies
        asynchronously) -> {name: (B, tokens, dim)} on the device."""
        frames = torch.as_tensor(frames).to(self.device, non_blocking=True)
        inputs = derive_inputs(frames, dtype=self.dtype)
        return {n: self.run(n, inputs[n]) for n in MODEL_NAMES}
