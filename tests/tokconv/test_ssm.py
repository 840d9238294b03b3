"""Design C (ssm_*): bidirectional scan (Mamba-2 SSD by default, Mamba-1 S6 as mixer="s6"), both
directions in one grouped scan, layouts, budget, and that it trains on CPU with the pure-torch scans."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokconv import TEACHERS, TargetSpec, create_converter, list_converters
from tokconv.converters import count_params
from tokconv.converters.ssm import BiMambaBlock, BiSSDBlock
from tokconv.ops import selective_scan_naive, ssd_scan_naive

STUDENT = TargetSpec("student", 2 * 4 * 4, 16, (2, 4, 4))
TARGETS = {"up": TargetSpec("up", 3 * 5 * 5, 8, (3, 5, 5)), "cls": TargetSpec("cls", 1, 6, None)}




def _tiny(**kw):
    torch.manual_seed(0)
    kw = {"dim": 16, "d_state": 4, "headdim": 8, "query_hidden": 16, **kw}
    return create_converter("ssm_small", student=STUDENT, targets=TARGETS, **kw)


def test_presets_registered_with_their_budget():
    assert {"ssm_base", "ssm_small"} <= set(list_converters("ssm_*"))
    base = create_converter("ssm_base")
    assert 2_100_000 <= count_params(base) <= 2_400_000           # design C: ~2.1-2.4M, 3 targets
    assert 1_000_000 <= count_params(create_converter("ssm_small")) <= 1_800_000
    assert set(base.targets) == set(TEACHERS)
    assert base.config["kwargs"]["dim"] == 384 and len(base.blocks) == 2
    assert all(isinstance(b, BiSSDBlock) for b in base.blocks)
    s6 = create_converter("ssm_small", mixer="s6")
    assert all(isinstance(b, BiMambaBlock) for b in s6.blocks)
    with pytest.raises(ValueError, match="mixer"):
        create_converter("ssm_small", mixer="s4")
    low = create_converter("ssm_base", rank=64)
    assert count_params(low) < count_params(base)                  # 1024x384 -> 1024x64 + 64x384


def test_shapes_and_global_pooling():
    model = _tiny().eval()
    x = torch.randn(3, STUDENT.tokens, STUDENT.dim)
    with torch.no_grad():
        out = model(x)
    assert out["up"].shape == (3, 75, 8) and out["cls"].shape == (3, 1, 6)
    # only the targets' needs are built: no global query / pooling without a global target
    grid_only = create_converter("ssm_small", student=STUDENT, targets={"up": TARGETS["up"]}, dim=16,
                                 headdim=8)
    assert grid_only.pool_score is None and grid_only.pos.global_query is None


@pytest.mark.parametrize("mixer", ["ssd", "s6"])
def test_trunk_is_bidirectional_over_the_raster_sequence(mixer):
    model = _tiny(mixer=mixer).double().eval()
    x = torch.randn(2, STUDENT.tokens, STUDENT.dim, dtype=torch.float64, requires_grad=True)
    h = model.encode(x)
    g_first = torch.autograd.grad(h[:, 0].square().sum(), x, retain_graph=True)[0]
    g_last = torch.autograd.grad(h[:, -1].square().sum(), x)[0]
    scale = g_first[:, 0].abs().max()
    assert g_first[:, -1].abs().max() > 1e-6 * scale               # token 0 sees the last token
    assert g_last[:, 0].abs().max() > 1e-6 * scale                 # and the last sees token 0


def test_s6_direction_alone_is_causal():
    model = _tiny(mixer="s6").double().eval()
    x = torch.randn(2, STUDENT.tokens, STUDENT.dim, dtype=torch.float64)
    # each direction alone is causal: the forward scan at token 0 ignores the last token
    blk = model.blocks[0]
    u = blk.in_proj(blk.norm(x)).transpose(1, 2).chunk(2, dim=1)[0]
    u2 = u.clone()
    u2[..., -1] += torch.randn(u.shape[1])
    outs = [selective_scan_naive(*blk.fwd.scan_inputs(v)[:5]) for v in (u, u2)]
    assert torch.equal(outs[0][..., :-1], outs[1][..., :-1])
    assert not torch.equal(outs[0][..., -1], outs[1][..., -1])


def test_ssd_block_equals_two_separate_sequential_scans():
    torch.manual_seed(0)
    blk = BiSSDBlock(dim=8, d_state=4, headdim=4, chunk_size=8).double()
    x = torch.randn(2, 19, 8, dtype=torch.float64)
    z, u, bc, dt = torch.split(blk.in_proj(blk.norm(x)), [8, 8, 16, 4], dim=-1)
    u = u.reshape(2, 19, 2, 4)
    B_f, C_f, B_b, C_b = (t.unsqueeze(2) for t in bc.chunk(4, dim=-1))
    A = -torch.exp(blk.A_log)
    kw = {"dt_softplus": True}
    y_f = ssd_scan_naive(u, dt[..., :2], A[:2], B_f, C_f, D=blk.D[:2], dt_bias=blk.dt_bias[:2], **kw)
    y_b = ssd_scan_naive(u.flip(1), dt[..., 2:].flip(1), A[2:], B_b.flip(1), C_b.flip(1), D=blk.D[2:],
                         dt_bias=blk.dt_bias[2:], **kw).flip(1)
    y = (0.5 * (y_f + y_b)).reshape(2, 19, 8)
    expect = x + blk.out_proj(blk.out_norm(y * F.silu(z)))
    torch.testing.assert_close(blk(x), expect, rtol=1e-10, atol=1e-10)


def test_block_fused_directions_equal_two_separate_scans():
    torch.manual_seed(0)
    blk = BiMambaBlock(dim=8, d_state=4).double()
    x = torch.randn(2, 19, 8, dtype=torch.float64)
    u, z = blk.in_proj(blk.norm(x)).transpose(1, 2).chunk(2, dim=1)
    f = blk.fwd.scan_inputs(u)
    b = blk.bwd.scan_inputs(u.flip(-1))
    y_f = selective_scan_naive(*f[:6], z=z, delta_bias=f[6], delta_softplus=True)
    y_b = selective_scan_naive(*b[:6], z=z.flip(-1), delta_bias=b[6], delta_softplus=True).flip(-1)
    expect = x + blk.out_proj((0.5 * (y_f + y_b)).transpose(1, 2))
    torch.testing.assert_close(blk(x), expect, rtol=1e-10, atol=1e-10)


def test_mamba_initialisation():
    ssd = _tiny().blocks[0]
    dt = F.softplus(ssd.dt_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6     # dt in [dt_min, dt_max]
    assert (-torch.exp(ssd.A_log) <= -1 + 1e-6).all() and (-torch.exp(ssd.A_log) >= -16 - 1e-5).all()
    blk = _tiny(mixer="s6").blocks[0]
    dt = F.softplus(blk.fwd.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6     # dt in [dt_min, dt_max]
    assert torch.allclose(-torch.exp(blk.fwd.A_log[0]), -torch.arange(1.0, 5.0))  # S4D-real
    assert torch.equal(blk.fwd.D, torch.ones_like(blk.fwd.D))


@pytest.mark.parametrize("mixer", ["ssd", "s6"])
def test_trains_on_cpu_with_the_reference_scan(mixer):
    # a learnable target: each "up" token is a fixed linear map of the trilinearly resampled
    # student tokens, "cls" a map of their mean; the converter must fit it well
    torch.manual_seed(0)
    model = _tiny(dim=32, mixer=mixer).train()
    w_up, w_cls = torch.randn(16, 8) / 4, torch.randn(16, 6) / 4
    x = torch.randn(16, STUDENT.tokens, STUDENT.dim)
    v = x.transpose(1, 2).reshape(16, 16, 2, 4, 4)
    up = F.interpolate(v, size=(3, 5, 5), mode="trilinear").flatten(2).transpose(1, 2) @ w_up
    cls = x.mean(1, keepdim=True) @ w_cls
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        out = model(x)
        loss = F.mse_loss(out["up"], up) / up.var() + F.mse_loss(out["cls"], cls) / cls.var()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.35 * losses[0], losses[::10]


def test_bad_arguments_name_the_input():
    with pytest.raises(ValueError, match="rank"):
        create_converter("ssm_small", rank=0)
    with pytest.raises(ValueError, match=r"\(B, 32, 16\)"):
        _tiny()(torch.randn(1, 31, 16))


@pytest.mark.parametrize("mixer", ["ssd", "s6"])
def test_same_output_in_bfloat16_autocast_within_tolerance(mixer):
    model = _tiny(mixer=mixer).eval()
    x = torch.randn(2, STUDENT.tokens, STUDENT.dim)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    for k in ref:
        cos = F.cosine_similarity(ref[k].flatten(1), low[k].float().flatten(1)).min()
        assert cos > 0.99, k
