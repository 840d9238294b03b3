"""Save and load converters and heads: safetensors weights + a JSON config (local paths only).

Directory layout: ``model.safetensors`` + ``config.json`` (converter: preset name, student and
target specs, preset kwargs, dtype) and ``head.safetensors`` + ``head.json`` (head ctor kwargs;
JSON with sorted keys, which loses nothing: the head orders its targets by name itself).
A loaded model rebuilt from the files alone reproduces the saved model's outputs bit for bit
(same device and dtype).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .heads import ResidualHead
from .registry import create_converter
from .targets import TargetSpec, specs_from_dict

FORMAT_VERSION = 1
CONVERTER_WEIGHTS, CONVERTER_CONFIG = "model.safetensors", "config.json"
HEAD_WEIGHTS, HEAD_CONFIG = "head.safetensors", "head.json"


def _dtype_name(model: nn.Module) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "float32"


def _save(model: nn.Module, weights: Path, config_path: Path, config: dict) -> None:
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    config_path.write_text(json.dumps({**config, "dtype": _dtype_name(model),
                                       "format_version": FORMAT_VERSION}, indent=2, sort_keys=True))


def _load_weights(model: nn.Module, weights: Path, dtype: str, map_location) -> nn.Module:
    model = model.to(dtype=getattr(torch, dtype))
    model.load_state_dict(load_file(str(weights), device=str(map_location)), strict=True)
    return model.to(map_location).eval()


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    cfg = json.loads(path.read_text())
    if cfg.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {cfg['format_version']} is newer than "
                         f"{FORMAT_VERSION}")
    return cfg


def save_converter(model: nn.Module, directory) -> Path:
    """Write ``model.safetensors`` + ``config.json`` under ``directory``; returns the directory."""
    cfg = getattr(model, "config", None)
    if not cfg or "name" not in cfg:
        raise ValueError("save_converter: model has no preset config "
                         "(build it with create_converter)")
    d = Path(directory)
    _save(model, d / CONVERTER_WEIGHTS, d / CONVERTER_CONFIG, dict(cfg))
    return d


def load_converter(directory, *, map_location="cpu") -> nn.Module:
    """Rebuild the converter saved under ``directory`` (eval mode)."""
    d = Path(directory)
    cfg = _read_config(d / CONVERTER_CONFIG)
    model = create_converter(cfg["name"], student=TargetSpec.from_dict(cfg["student"]),
                             targets=specs_from_dict(cfg["targets"]), **cfg["kwargs"])
    return _load_weights(model, d / CONVERTER_WEIGHTS, cfg.get("dtype", "float32"), map_location)


def save_head(head: ResidualHead, directory) -> Path:
    """Write ``head.safetensors`` + ``head.json`` under ``directory``; returns the directory."""
    d = Path(directory)
    _save(head, d / HEAD_WEIGHTS, d / HEAD_CONFIG, {"kwargs": dict(head.config)})
    return d


def load_head(directory, *, map_location="cpu") -> ResidualHead:
    d = Path(directory)
    cfg = _read_config(d / HEAD_CONFIG)
    head = ResidualHead(**cfg["kwargs"])
    return _load_weights(head, d / HEAD_WEIGHTS, cfg.get("dtype", "float32"), map_location)
