"""bench.plain_loop (path (4) of bench/extract.py) on CPU with tiny models and real videos: the
stock transformers models compute the project's tokens, and the loops, per video and per clip,
deliver every clip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.plain_loop import StockModels, run_loop
from pipeline.backbones import MODEL_NAMES, FeatureExtractor
from pipeline.config import DecodeConfig, ModelsConfig
from pipeline.decode import decode_clips

TINY = ModelsConfig(weights="tiny", device="cpu", dtype="float32")
DECODE = DecodeConfig(window=32, stride=2, clips_per_video=2, short_side=64, short_video="loop")


@pytest.fixture(scope="module")
def videos(sample_files):
    return [sample_files["carphone_pristine.mp4"], sample_files["bikes.mp4"]]


def test_stock_models_give_the_projects_tokens(videos):
    """The same weights without the project's rewrites (SDPA TimeSformer, cached RoPE, CLS-only
    ViViT layer, fused GELU, patch matmuls, folded/packed temporal attention): same tokens."""
    frames = torch.from_numpy(np.stack([c for _, c in decode_clips(str(videos[0]), DECODE)]))
    stock, fx = StockModels(TINY, torch.device("cpu")), FeatureExtractor(TINY, device="cpu")
    a, b = stock(frames), fx(frames)
    assert stock.specs == fx.specs
    for n in MODEL_NAMES:
        assert a[n].shape == b[n].shape == (2, fx.specs[n].tokens, fx.specs[n].dim)
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("per_clip, blocking", [(False, False), (True, True)])
def test_the_loop_delivers_every_clip(videos, per_clip, blocking):
    seen = []

    def forward(frames):
        seen.append(frames.clone())
        return {"x": frames.float().mean((1, 2, 3, 4))[:, None, None]}  # (B, 1, 1)

    res = run_loop(forward, videos, DECODE, batch_size=2, workers=0, device=torch.device("cpu"),
                   per_clip=per_clip, blocking_copies=blocking)
    assert res["clips"] == 4 and res["per_clip"] == per_clip and res["clips_per_s"] > 0
    want = [c for v in videos for _, c in decode_clips(str(v), DECODE)]
    assert torch.equal(torch.cat(seen), torch.from_numpy(np.stack(want)))  # in order, all clips
    assert res["first_batch_s"] is not None and res["first_batch_s"] <= res["seconds"]
