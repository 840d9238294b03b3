"""Shared layers: coordinates, grid-aware resampling, attention, conv, low-rank projection."""
import pytest
import torch
import torch.nn.functional as F

from tokconv.layers import (
    AttentionBlock,
    CoordQueries,
    CrossAttention,
    DSConv3dBlock,
    LowRankLinear,
    grid_coords,
    make_projection,
    resample_tokens,
    tokens_to_volume,
    volume_to_tokens,
)


def test_grid_coords_are_cell_centres_in_shared_space():
    c = grid_coords((2, 3, 4))
    assert c.shape == (24, 3)
    assert c.min() > -1 and c.max() < 1
    # token t*H*W + h*W + w has coordinates (t, h, w); t axis: centres of 2 cells
    assert torch.allclose(c[0], torch.tensor([-0.5, -2 / 3, -0.75]))
    assert torch.allclose(c[1 * 12 + 2 * 4 + 3], torch.tensor([0.5, 2 / 3, 0.75]))
    # the same physical centre on two grids gets the same coordinate
    assert torch.allclose(grid_coords((1, 1, 1)), torch.zeros(1, 3))


def test_coord_queries_shapes_and_global_query():
    q = CoordQueries(dim=32, hidden=16)
    assert q((8, 14, 14)).shape == (1568, 32)
    assert q(None).shape == (1, 32)
    assert not torch.allclose(q((2, 2, 2))[0], q((2, 2, 2))[1])  # position-dependent
    with pytest.raises(ValueError, match="global query"):
        CoordQueries(dim=8, global_query=False)(None)


def test_volume_round_trip_keeps_thw_order():
    x = torch.arange(2 * 24 * 3, dtype=torch.float32).reshape(2, 24, 3)
    v = tokens_to_volume(x, (2, 3, 4))
    assert v.shape == (2, 3, 2, 3, 4)
    assert torch.equal(v[1, :, 1, 2, 3], x[1, 1 * 12 + 2 * 4 + 3])
    assert torch.equal(volume_to_tokens(v), x)


def test_resample_is_3d_not_flattened_1d():
    # A field that varies only along W must stay constant along T and H after resampling;
    # a 1D interpolation over the flattened sequence would mix rows and frames.
    src, dst = (8, 16, 16), (16, 14, 14)
    w = grid_coords(src)[:, 2]
    x = w.reshape(1, -1, 1).repeat(2, 1, 3)
    y = resample_tokens(x, src, dst)
    assert y.shape == (2, 16 * 14 * 14, 3)
    vol = tokens_to_volume(y, dst)[0, 0]                              # (T, H, W)
    assert torch.allclose(vol, vol[:1, :1, :].expand_as(vol), atol=1e-6)
    ref = F.interpolate(tokens_to_volume(x, src), size=dst, mode="trilinear", align_corners=False)
    assert torch.allclose(y, volume_to_tokens(ref))


def test_resample_global_and_identity_and_bad_grid():
    x = torch.randn(2, 64, 5)
    assert torch.allclose(resample_tokens(x, (4, 4, 4), None), x.mean(1, keepdim=True))
    assert resample_tokens(x, (4, 4, 4), (4, 4, 4)) is x
    with pytest.raises(ValueError, match="do not fill grid"):
        resample_tokens(x, (4, 4, 3), (2, 2, 2))


def test_cross_attention_matches_explicit_softmax_and_weights_sum_to_one():
    torch.manual_seed(0)
    attn = CrossAttention(dim=16, kv_dim=24, num_heads=4).eval()
    q, kv = torch.randn(10, 16), torch.randn(3, 40, 24)
    fused = attn(q, kv)
    explicit, w = attn(q, kv, return_weights=True)
    assert fused.shape == (3, 10, 16) and w.shape == (3, 10, 40)
    assert torch.allclose(fused, explicit, atol=1e-5)
    assert torch.allclose(w.sum(-1), torch.ones(3, 10), atol=1e-5)


def test_attention_block_cross_and_self():
    cross = AttentionBlock(dim=16, kv_dim=8, num_heads=2)
    assert cross(torch.randn(5, 16), torch.randn(2, 30, 8)).shape == (2, 5, 16)
    with pytest.raises(ValueError, match="needs kv"):
        cross(torch.randn(2, 5, 16))
    selfb = AttentionBlock(dim=16, num_heads=2, mlp_ratio=0)
    assert selfb.mlp is None and selfb(torch.randn(2, 7, 16)).shape == (2, 7, 16)


def test_dsconv_block_mixes_neighbours_only():
    torch.manual_seed(0)
    blk = DSConv3dBlock(dim=8, kernel_size=3).eval()
    x = torch.zeros(1, 4 * 4 * 4, 8)
    y0 = blk(x, (4, 4, 4))
    x[0, 0] = torch.randn(8)                                           # poke token (0, 0, 0)
    diff = (blk(x, (4, 4, 4)) - y0).abs().sum(-1)[0].reshape(4, 4, 4)
    assert diff[0, 0, 0] > 0 and diff[1, 1, 1] > 0                      # 3x3x3 neighbourhood
    assert torch.all(diff[2:] == 0) and torch.all(diff[:, 2:] == 0)    # nothing beyond it
    assert blk(torch.randn(2, 1, 8), (1, 1, 1)).shape == (2, 1, 8)


def test_low_rank_projection_rank_and_scale():
    torch.manual_seed(0)
    lr = make_projection(64, 48, rank=5)
    assert isinstance(lr, LowRankLinear)
    assert int(torch.linalg.matrix_rank(lr.weight)) == 5
    x = torch.randn(4096, 64)
    assert torch.allclose(lr(x), x @ lr.weight.t() + lr.up.bias, atol=1e-5)
    dense = make_projection(64, 48)
    assert 0.5 < lr(x).std() / dense(x).std() < 2.0                    # comparable init scale
    with pytest.raises(ValueError, match="rank 65"):
        LowRankLinear(64, 128, rank=65)
