"""Shared layers: coordinates, grid-aware resampling (matmul fast path == F.interpolate), attention,
spatial gating, low-rank projection."""
import pytest
import torch
import torch.nn.functional as F

from tokconv.layers import (
    AttentionBlock,
    CoordQueries,
    CrossAttention,
    LowRankLinear,
    SpatialGatingBlock,
    grid_coords,
    make_projection,
    resample_tokens,
    resample_tokens_fn,
    resample_tokens_ref,
    tokens_to_volume,
    volume_to_tokens,
)
from tokconv.targets import STUDENT, TEACHERS


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


GRID_PAIRS = [(STUDENT.grid, TEACHERS["videomae"].grid), (STUDENT.grid, TEACHERS["timesformer"].grid),
              ((4, 6, 6), (6, 7, 7)), ((4, 6, 6), (2, 5, 5)), ((3, 5, 7), (3, 5, 9)), ((2, 3, 3), (5, 3, 3)),
              ((1, 1, 1), (2, 3, 2))]


@pytest.mark.parametrize("src,dst", GRID_PAIRS)
def test_matmul_resample_equals_interpolate_values_and_gradients(src, dst):
    torch.manual_seed(0)
    n = src[0] * src[1] * src[2]
    x = torch.randn(3, n, 5, dtype=torch.float64, requires_grad=True)
    fast, ref = resample_tokens_fn(x, src, dst), resample_tokens_ref(x, src, dst)
    assert fast.shape == (3, dst[0] * dst[1] * dst[2], 5)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(fast)
    (g_fast,), (g_ref,) = torch.autograd.grad(fast, x, g), torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-12, atol=1e-12)
    # forward-mode AD too (the Jacobian regulariser uses jvp)
    v = torch.randn_like(x)
    _, t_fast = torch.func.jvp(lambda z: resample_tokens_fn(z, src, dst), (x.detach(),), (v,))
    _, t_ref = torch.func.jvp(lambda z: resample_tokens_ref(z, src, dst), (x.detach(),), (v,))
    torch.testing.assert_close(t_fast, t_ref, rtol=1e-12, atol=1e-12)
    assert resample_tokens is resample_tokens_fn


def test_matrices_first_built_under_inference_mode_still_serve_autograd():
    src, dst = (3, 4, 4), (5, 3, 3)                                   # a pair no other test uses
    with torch.inference_mode():
        resample_tokens(torch.randn(1, 48, 2), src, dst)
    x = torch.randn(1, 48, 2, requires_grad=True)
    resample_tokens(x, src, dst).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matmul_resample_within_dtype_tolerance(dtype, tol):
    torch.manual_seed(0)
    x = torch.randn(2, STUDENT.tokens, 16).to(dtype)
    for name in ("videomae", "timesformer"):
        fast = resample_tokens_fn(x, STUDENT.grid, TEACHERS[name].grid)
        ref = resample_tokens_ref(x.double(), STUDENT.grid, TEACHERS[name].grid)
        assert fast.dtype == dtype
        assert (fast.double() - ref).abs().max() <= tol * ref.abs().max(), name


def test_cross_attention_matches_explicit_softmax_and_weights_sum_to_one():
    torch.manual_seed(0)
    attn = CrossAttention(dim=16, kv_dim=24, num_heads=4).eval()
    q, kv = torch.randn(10, 16), torch.randn(3, 40, 24)
    fused = attn(q, kv)
    w = attn.weights(q, kv)
    assert fused.shape == (3, 10, 16) and w.shape == (3, 10, 40)
    assert torch.allclose(w.sum(-1), torch.ones(3, 10), atol=1e-5)
    # the explicit softmax, applied per head, gives the fused output
    qh, k, v = attn._heads(q, kv)
    probs = ((qh @ k.transpose(-2, -1)) * attn.head_dim ** -0.5).softmax(-1)
    explicit = attn.proj((probs @ v).transpose(1, 2).reshape(3, 10, 16))
    assert torch.allclose(fused, explicit, atol=1e-5)
    assert torch.allclose(w, probs.mean(1), atol=1e-6)


def test_attention_block_cross_and_self():
    cross = AttentionBlock(dim=16, kv_dim=8, num_heads=2)
    assert cross(torch.randn(5, 16), torch.randn(2, 30, 8)).shape == (2, 5, 16)
    with pytest.raises(ValueError, match="needs kv"):
        cross(torch.randn(2, 5, 16))
    selfb = AttentionBlock(dim=16, num_heads=2, mlp_ratio=0)
    assert selfb.mlp is None and selfb(torch.randn(2, 7, 16)).shape == (2, 7, 16)


def test_spatial_gating_block_starts_as_an_ffn_then_mixes_tokens():
    torch.manual_seed(0)
    grid = (3, 4, 5)
    blk = SpatialGatingBlock(dim=8, hidden=6, grid=grid).double()
    x = torch.randn(2, 60, 8, dtype=torch.float64)
    # fresh: no token mixing (M = 0, bias 1), each token's output depends on that token only
    y = blk(x)
    x2 = x.clone()
    x2[0, 7] += torch.randn(8, dtype=torch.float64)  # not a constant: LayerNorm would remove it
    diff = (blk(x2) - y).abs().sum(-1)
    assert diff[0, 7] > 0 and diff[0].sum() == diff[0, 7] and diff[1].sum() == 0
    # with mixing: M_t mixes a token with the same (h, w) in other frames, M_hw within its frame
    with torch.no_grad():
        blk.mix_t.normal_()
        blk.mix_hw.normal_()
    y = blk(x)
    diff = (blk(x2) - y).abs().sum(-1)[0].reshape(grid)               # token 7 = (t 0, h 1, w 2)
    assert (diff[0] > 0).all()                                        # its whole frame
    assert (diff[1:, 1, 2] > 0).all()                                 # its place in other frames
    assert (diff[1:].flatten()[[i for i in range(40) if i not in (7, 27)]] == 0).all()  # not beyond
    # the gate equals the explicit dense (T x T) (x) I + I (x) (HW x HW) token-mixing matrix
    v = torch.randn(2, 60, 6, dtype=torch.float64)
    dense = torch.kron(blk.mix_t, torch.eye(20, dtype=torch.float64)) + \
        torch.kron(torch.eye(3, dtype=torch.float64), blk.mix_hw)
    torch.testing.assert_close(blk.gate(v), dense @ v + blk.gate_bias)


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
