"""Path (4) of bench/extract.py: the loop a user writes without Ray, as strong as a careful user
writes it.

A torch ``DataLoader`` over the videos (decord in ``workers`` processes, one decode per video
giving all its clips, as the pipeline's decode tasks do), batches of ``batch_size`` clips in pinned
memory, copied to the GPU without blocking, the four backbones in sequence, fp16 features copied
back into pinned host memory without blocking, one batch in flight: the host waits for batch i
only once batch i+1 is queued behind it, so the GPU does not idle on the host.

``per_clip=True, blocking_copies=True`` is the loop as it was before 2026-12-02 (one decode per
clip, ``.cpu()`` of every output after each batch), kept to measure the difference in one run.

:class:`StockModels` is the model side a user loads: the four transformers models from the same
weights, bf16 weights and activations, SDPA where transformers has it, no rewrites, no compile.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from bench.timing import GpuSampler, rates
from pipeline import backbones as bb
from pipeline.config import DecodeConfig, ModelsConfig
from pipeline.preprocess import INPUT_SPECS, derive_inputs


class StockModels:
    """The four backbones as transformers builds them: uint8 (B, window, S, S, 3) -> {name: tokens
    (B, tokens, dim)}; inputs derived on the device (``preprocess.derive_inputs``). TimeSformer's
    layers are told the 16 frames it is fed (its k400 config says 8), else its temporal attention
    would group the wrong tokens; ViViT computes its whole last layer."""

    def __init__(self, cfg: ModelsConfig, device: torch.device):
        self.device = device
        self.dtype = bb.DTYPES[cfg.dtype] if device.type == "cuda" else torch.float32
        self.models = {n: bb.load_model(cfg, n, device).eval().requires_grad_(False)
                       for n in bb.MODEL_NAMES}
        for layer in self.models["timesformer"].encoder.layer:
            layer.config.num_frames = INPUT_SPECS["timesformer"].frames
        self.specs = {n: bb.layout_spec(n, m.config) for n, m in self.models.items()}

    @torch.inference_mode()
    def __call__(self, frames) -> dict[str, torch.Tensor]:
        frames = torch.as_tensor(frames).to(self.device, non_blocking=True)
        inputs = derive_inputs(frames, dtype=self.dtype)
        return {n: bb.select_tokens(n, bb.forward(n, m, inputs[n]), self.specs[n])
                for n, m in self.models.items()}


class _Videos(torch.utils.data.Dataset):
    """One item per video: all its clips, uint8 (clips_per_video, window, S, S, 3)."""

    def __init__(self, paths: list[str], dcfg: DecodeConfig):
        self.paths, self.dcfg = paths, dcfg

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from pipeline.decode import decode_clips
        return torch.from_numpy(np.stack([c for _, c in decode_clips(self.paths[i], self.dcfg)]))


class _Clips(torch.utils.data.Dataset):
    """One item per clip (the old loop): each clip opens and decodes its video again."""

    def __init__(self, items: list[tuple[str, int]], dcfg: DecodeConfig):
        self.items, self.dcfg = items, dcfg

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from pipeline.decode import decode_clips
        path, ci = self.items[i]
        return torch.from_numpy(decode_clips(path, self.dcfg, clip_indices=[ci])[0][1])


def _cat(videos: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(videos)


def _launch(forward, frames: torch.Tensor, device: torch.device):
    """H2D, the models, fp16 outputs D2H into fresh pinned buffers; nothing waits. Returns the
    host outputs and an event recorded after the copies (None on CPU: already done)."""
    out = forward(frames.to(device, non_blocking=True))
    cuda = device.type == "cuda"
    host = {}
    for k, v in out.items():
        v = v.to(torch.float16)
        host[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=cuda)
        host[k].copy_(v, non_blocking=cuda)
    done = torch.cuda.Event(blocking=True) if cuda else None
    if done is not None:
        done.record()
    return host, done


def run_loop(forward, videos: list[Path], dcfg: DecodeConfig, *, batch_size: int, workers: int,
             device: torch.device, per_clip: bool = False, blocking_copies: bool = False) -> dict:
    """(4): clips/s overall (from the loader's start, the first call's compile included), after
    the first batch, and in the 20-90% window; ``first_batch_s``; GPU utilisation."""
    cuda = device.type == "cuda"
    cpv = dcfg.clips_per_video
    if per_clip:
        data = _Clips([(str(v), c) for v in videos for c in range(cpv)], dcfg)
        per_batch, collate = batch_size, None
    else:  # batch_size clips = batch_size / clips_per_video whole videos
        data = _Videos([str(v) for v in videos], dcfg)
        per_batch, collate = max(1, batch_size // cpv), _cat
    loader = torch.utils.data.DataLoader(
        data, batch_size=per_batch, num_workers=workers, collate_fn=collate, pin_memory=cuda,
        prefetch_factor=4 if per_clip and workers else None)
    times: list[tuple[float, int]] = []  # (seconds, clips on the host)
    clips, in_flight = 0, None
    with GpuSampler() as gpu, torch.inference_mode():
        t0 = time.perf_counter()
        for frames in loader:
            if blocking_copies:
                out = forward(frames.to(device, non_blocking=True))
                _ = {k: v.to(torch.float16).cpu() for k, v in out.items()}
                clips += frames.shape[0]
                times.append((time.perf_counter() - t0, clips))
                continue
            launched = (*_launch(forward, frames, device), frames.shape[0])
            if in_flight is not None:  # batch i+1 is queued: now wait for batch i
                clips += _finish(*in_flight)
                times.append((time.perf_counter() - t0, clips))
            in_flight = launched
        if in_flight is not None:
            clips += _finish(*in_flight)
            times.append((time.perf_counter() - t0, clips))
    r = rates(times)
    seconds = times[-1][0] if times else 0.0
    return {"clips": clips, "seconds": round(seconds, 2),
            "clips_per_s": round(clips / seconds, 2) if seconds else 0.0,
            "steady_clips_per_s": r["steady"], "window_clips_per_s": r["window"],
            "first_batch_s": r["first_s"], "workers": workers, "per_clip": per_clip,
            "blocking_copies": blocking_copies, "gpu": gpu.summary()}


def _finish(host: dict[str, torch.Tensor], done, n: int) -> int:
    """Wait for one launched batch's copies (its features are then on the host); its clips."""
    if done is not None:
        done.synchronize()
    return n
