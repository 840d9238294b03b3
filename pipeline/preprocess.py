"""Each backbone's input from ONE decoded window: frames, resize, crop and normalisation per model.

:data:`INPUT_SPECS` holds the hub preprocessor settings; :func:`derive_inputs` applies them on the
window's device (the GPU in the model actor), so one decode serves all four models and all four see
the same field of view (the whole decoded square).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


@dataclass(frozen=True)
class InputSpec:
    """How one model's input is derived from the decoded window (hub preprocessor settings).

    frames: frames fed to the model, taken every ``frame_step``-th frame of the window from index 0.
    resize: shortest edge after the (antialiased bilinear) resize; crop: square center crop after
    it. mean/std: per-channel normalisation of [0, 1] pixels.
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


_IMAGENET = (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
# Hub preprocessors: MCG-NJU/videomae-base (shortest edge 224, crop 224, ImageNet mean/std);
# facebook/timesformer-base-finetuned-k400 (224/224, mean 0.45, std 0.225);
# google/vivit-b-16x2-kinetics400 (224/224, pixels scaled to [-1, 1], the checkpoint's JAX training
# input; its preprocessor_config also sets do_normalize with mean=std=0.5 on top of the offset
# rescale, which would give [-3, 1]: not reproduced). V-JEPA 2 (VJEPA2VideoProcessor: crop 256,
# ImageNet mean/std) would resize to int(256*256/224) = 292 first, i.e. see the central 88% only.
# We feed it the whole square (resize 256) so that all four models see the same field of view and
# the student and teacher grids share one normalised space, which the converters' grid resampling
# assumes; V-JEPA 2 was pretrained on random resized crops at 256, so this is in-distribution.
# (resize=292 gives V-JEPA 2's own eval view.)
INPUT_SPECS: dict[str, InputSpec] = {
    "student": InputSpec(16, 2, 256, 256, *_IMAGENET),
    "videomae": InputSpec(16, 2, 224, 224, *_IMAGENET),
    "timesformer": InputSpec(16, 2, 224, 224, (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)),
    "vivit": InputSpec(32, 1, 224, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def _resize_crop(x: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, crop, crop): shortest edge to ``resize`` (antialiased bilinear), then
    a center crop.

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
    """(scale, shift) of shape (1, 1, 3, 1, 1) with (x/255 - mean)/std == x*scale - shift, made
    once per device."""
    std = torch.tensor(spec.std, dtype=torch.float64)
    mean = torch.tensor(spec.mean, dtype=torch.float64)
    scale, shift = 1.0 / (255.0 * std), mean / std
    return tuple(t.float().view(1, 1, 3, 1, 1).to(device) for t in (scale, shift))


def _take(x: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """x[:, indices] as a view (a strided slice) when the indices are evenly spaced, else a gather.
    """
    step = indices[1] - indices[0] if len(indices) > 1 else 1
    if step > 0 and list(range(indices[0], indices[-1] + 1, step)) == list(indices):
        return x[:, indices[0]:indices[-1] + 1:step]
    return x[:, indices]


def derive_inputs(frames: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                  specs: dict[str, InputSpec] | None = None) -> dict[str, torch.Tensor]:
    """One decoded window -> every model's ``pixel_values`` on the window's device.

    frames: uint8 (B, window, S, S', 3) (a numpy array is accepted). Returns {name: (B, T, 3, H, W)}
    contiguous in ``dtype``. Models sharing a geometry share one resize of the union of their
    frames.
    """
    specs = specs or INPUT_SPECS
    frames = torch.as_tensor(frames)
    if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 (B, window, H, W, 3), got {tuple(frames.shape)} "
                         f"{frames.dtype}")
    b, window = frames.shape[:2]
    by_geometry: dict[tuple[int, int], list[str]] = {}
    for name, spec in specs.items():
        if spec.window > window:
            raise ValueError(f"{name}: needs a window of {spec.window} frames, got {window}")
        by_geometry.setdefault((spec.resize, spec.crop), []).append(name)
    out: dict[str, torch.Tensor] = {}
    for (resize, crop), names in by_geometry.items():
        idx = sorted({i for n in names for i in specs[n].frame_indices})
        # (N, 3, H, W) in channels-last memory
        x = _take(frames, idx).flatten(0, 1).permute(0, 3, 1, 2)
        if x.device.type != "cpu":
            # CUDA has no uint8 antialias kernel; CPU's uint8 channels-last one is ~6x faster
            x = x.float()
        x = _resize_crop(x, resize, crop).unflatten(0, (b, len(idx)))
        pos = {i: k for k, i in enumerate(idx)}
        for n in names:
            spec = specs[n]
            scale, shift = _affine(spec, x.device)
            sel = _take(x, [pos[i] for i in spec.frame_indices])
            # never alias x
            sel = sel.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            out[n] = sel.mul_(scale).sub_(shift).to(dtype)  # (x/255 - mean)/std
    return out
