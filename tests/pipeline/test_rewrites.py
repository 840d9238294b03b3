"""models.rewrites: each speed rewrite of the transformers modules computes what the upstream module
computes (real classes, tiny configs, CPU float32); the CUDA-only GELU epilogue is checked in
test_backbones' gpu tests."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from pipeline import backbones as bb
from pipeline import rewrites as rw
from pipeline.config import ModelsConfig
from pipeline.preprocess import derive_inputs


@pytest.fixture(scope="module")
def upstream():
    return bb.build_models(ModelsConfig(weights="tiny", rewrites=[]), device="cpu")


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, 32, 256, 256, 3), dtype=torch.uint8, generator=g)
    return derive_inputs(frames)


def _tokens(name, model, x):
    with torch.inference_mode():
        return bb.forward(name, model, x)


@pytest.mark.parametrize("conv,shape", [
    # V-JEPA 2 / VideoMAE / ViViT
    (nn.Conv3d(3, 8, (2, 16, 16), stride=(2, 16, 16)), (2, 3, 4, 32, 48)),
    # TimeSformer; 8 and 3 pixels short of a patch
    (nn.Conv2d(3, 8, 16, stride=16), (3, 3, 40, 35)),
])
def test_patch_linear_equals_the_convolution(conv, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    # (B, T, C, ..) viewed
    permuted = torch.randn(shape[0], shape[2], shape[1], *shape[3:]).transpose(1, 2)
    for inp in (x, permuted):
        want, got = conv(inp), rw.PatchLinear(conv)(inp)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the embeddings' next step: no copy
    assert rw.PatchLinear(conv)(x).flatten(2).transpose(1, 2).is_contiguous()


def test_only_non_overlapping_patch_convolutions_are_replaced():
    model = nn.Sequential(nn.Conv2d(3, 4, 16, stride=16), nn.Conv2d(4, 4, 3, stride=1, padding=1),
                          nn.Conv2d(4, 4, 2, stride=2, padding=1),
                          nn.Conv3d(4, 4, 2, stride=2, padding="valid"),
                          nn.Conv2d(4, 4, 3, stride=1, padding="same"),
                          nn.Conv2d(4, 4, 2, stride=2, groups=2))
    assert rw.use_matmul_patch_embeddings(model) == 2
    assert [type(m).__name__ for m in model] == ["PatchLinear", "Conv2d", "Conv2d", "PatchLinear",
                                                 "Conv2d", "Conv2d"]
    with pytest.raises(ValueError, match="kernel == stride"):
        rw.PatchLinear(nn.Conv2d(3, 4, 3, stride=1))


@pytest.mark.parametrize("name", bb.MODEL_NAMES)
def test_matmul_patch_embeddings_keep_the_tokens(upstream, inputs, name):
    model = copy.deepcopy(upstream[name])
    assert rw.use_matmul_patch_embeddings(model) == 1
    want = _tokens(name, upstream[name], inputs[name])
    torch.testing.assert_close(_tokens(name, model, inputs[name]), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", bb.MODEL_NAMES)
def test_linear_gelu_is_the_tanh_gelu_of_the_mlp(upstream, inputs, name):
    """fuse_linear_gelu rewrites one MLP per block (the predictor's blocks too); off CUDA LinearGELU
    runs unfused with the same tanh GELU as the epilogue, within 1e-4 of the models' own GELU here.
    """
    model = copy.deepcopy(upstream[name])
    blocks = [b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m]
    assert rw.fuse_linear_gelu(model) == len(blocks) > 0
    assert rw.fuse_linear_gelu(model) == 0  # nothing left to fuse
    fused = [m for m in model.modules() if isinstance(m, rw.LinearGELU)]
    x = torch.randn(5, fused[0].in_features)
    tanh_gelu = F.gelu(F.linear(x, fused[0].weight, fused[0].bias), approximate="tanh")
    torch.testing.assert_close(fused[0](x), tanh_gelu)
    want = _tokens(name, upstream[name], inputs[name])
    torch.testing.assert_close(_tokens(name, model, inputs[name]), want, rtol=1e-4, atol=1e-4)


def test_folded_temporal_dense_keeps_timesformer_tokens(upstream, inputs):
    model = copy.deepcopy(upstream["timesformer"])
    for layer in model.encoder.layer:  # the checkpoint's temporal_dense is not near the identity
        nn.init.normal_(layer.temporal_dense.weight, std=0.5)
    want = _tokens("timesformer", model, inputs["timesformer"])
    rw.fold_timesformer_temporal_dense(model)
    assert all(isinstance(layer.temporal_dense, nn.Identity) for layer in model.encoder.layer)
    torch.testing.assert_close(_tokens("timesformer", model, inputs["timesformer"]), want,
                               rtol=1e-4, atol=1e-4)


# 2 clips x 196 patches = 392 groups of 16 frames
@pytest.mark.parametrize("pack,calls", [(8, 49), (3, 392)])
def test_packed_temporal_attention_keeps_timesformer_tokens(upstream, inputs, monkeypatch, pack,
                                                            calls):
    """8 groups per attention call with the block-diagonal mask give the per-group attention's
    tokens; a pack that does not divide the groups (3) falls back to one group per sequence."""
    model = rw.use_packed_temporal_attention(copy.deepcopy(upstream["timesformer"]), pack)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.append((tuple(q.shape), kwargs.get("attn_mask") is not None))
        return sdpa(q, *args, **kwargs)
    monkeypatch.setattr(rw.F, "scaled_dot_product_attention", spy)
    got = _tokens("timesformer", model, inputs["timesformer"])
    temporal = [s for s in seen if s[0][2] in (16, 16 * pack)]
    assert temporal and all(s[0][0] == calls for s in temporal)
    assert all(masked == (calls == 49) for _, masked in temporal)
    want = _tokens("timesformer", upstream["timesformer"], inputs["timesformer"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rewrites_follow_the_config():
    default = bb.build_models(ModelsConfig(weights="tiny"), device="cpu")
    none = bb.build_models(ModelsConfig(weights="tiny", rewrites=[]), device="cpu")
    for name in bb.MODEL_NAMES:
        assert any(isinstance(m, rw.PatchLinear) for m in default[name].modules()), name
        assert not any(isinstance(m, rw.PatchLinear | rw.LinearGELU)
                       for m in none[name].modules()), name
        # CUDA only
        assert not any(isinstance(m, rw.LinearGELU) for m in default[name].modules()), name
    assert isinstance(default["timesformer"].encoder.layer[0].temporal_dense, nn.Identity)
    assert not isinstance(none["timesformer"].encoder.layer[0].temporal_dense, nn.Identity)
    with pytest.raises(ValidationError, match="rewrites"):
        ModelsConfig(rewrites=["patch_matmull"])
    with pytest.raises(ValueError, match=r"models.rewrites: unknown \['fuse'\]"):
        rw.apply_rewrites("vivit", none["vivit"], ["fuse"], torch.device("cpu"))


def test_a_float8_model_keeps_its_mlp_linears_plain():
    """models.fp8 converts nn.Linear layers: the GELU epilogue is left out for the models it names.
    """
    cfg = ModelsConfig(fp8=["student"])
    assert "gelu_epilogue" not in bb.model_rewrites(cfg, "student")
    assert bb.model_rewrites(cfg, "vivit") == cfg.rewrites
