"""Each representation-deficiency regulariser does what it claims."""

import itertools

import pytest
import torch

from tokconv import TargetSpec, create_converter
from tokconv.deficiency import (
    LowRankLinear,
    WarmupSchedule,
    jacobian_penalty,
    mask_tokens,
    nuclear_norm,
    selection_penalty,
)

STUDENT = TargetSpec("student", 4 * 6 * 6, 16, (4, 6, 6))
TARGETS = {"grid": TargetSpec("grid", 2 * 5 * 5, 12, (2, 5, 5)), "cls": TargetSpec("cls", 1, 12, None)}


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_low_rank_map_has_rank_at_most_r_and_nuclear_norm_is_exact(rank):
    torch.manual_seed(0)
    lr = LowRankLinear(32, 24, rank=rank)
    w = lr.weight
    assert w.shape == (24, 32)
    assert int(torch.linalg.matrix_rank(w)) == rank
    nuc = nuclear_norm(lr)
    assert torch.allclose(nuc, torch.linalg.svdvals(w.detach()).sum(), rtol=1e-4)
    assert torch.allclose(nuclear_norm(w), nuc, rtol=1e-4)
    nuc.backward()
    assert lr.up.weight.grad.abs().sum() > 0 and lr.down.weight.grad.abs().sum() > 0


def test_nuclear_norm_of_bfloat16_weights_and_under_autocast():
    # QR/SVD have no bf16 kernels: the penalty is computed in float32 whatever the weights / autocast
    torch.manual_seed(0)
    lr = LowRankLinear(32, 24, rank=4)
    ref = nuclear_norm(lr).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert nuclear_norm(lr).item() == pytest.approx(ref, rel=1e-5)
    low = nuclear_norm(lr.to(torch.bfloat16))
    assert low.dtype == torch.float32 and low.item() == pytest.approx(ref, rel=2e-2)
    assert nuclear_norm(torch.nn.Linear(8, 6).to(torch.bfloat16)).dtype == torch.float32


def test_converter_low_rank_input_map_and_nuclear_penalty_shrinks_it():
    torch.manual_seed(0)
    model = create_converter("convmix_small", student=STUDENT, targets=TARGETS, rank=3,
                             dim=32, hidden=64)
    assert int(torch.linalg.matrix_rank(model.in_proj.weight)) <= 3
    before = model.regularisers()["nuclear"].item()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        model.regularisers()["nuclear"].backward()
        opt.step()
    assert model.regularisers()["nuclear"].item() < 0.9 * before


def test_mask_tokens_drops_the_configured_share():
    x = torch.randn(4, 100, 8) + 5.0                                   # no token is zero by chance
    xm, mask = mask_tokens(x, 0.3)
    assert mask.shape == (4, 100) and mask.sum(1).tolist() == [30] * 4
    assert torch.all(xm[mask] == 0)
    assert torch.equal(xm[~mask], x[~mask])
    assert not torch.equal(mask[0], mask[1])                           # per-sample draws
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(mask_tokens(x, 0.5, g1)[1], mask_tokens(x, 0.5, g2)[1])
    assert not mask_tokens(x, 0.0)[1].any()
    with pytest.raises(ValueError, match="ratio"):
        mask_tokens(x, 1.0)


def test_selection_penalty_entropy_and_l1():
    one_hot = torch.zeros(2, 5, 10)
    one_hot[..., 3] = 1.0
    uniform = torch.full((2, 5, 10), 0.1)
    assert selection_penalty(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    assert selection_penalty(uniform).item() == pytest.approx(1.0, abs=1e-6)
    peaked = torch.softmax(torch.tensor([4.0, 0, 0, 0]), 0)
    assert 0 < selection_penalty(peaked).item() < selection_penalty(torch.full((4,), 0.25)).item()
    # dim selects the normalised axis (TokenLearner normalises over tokens, dim=1)
    assert selection_penalty(uniform.transpose(1, 2), dim=1).item() == pytest.approx(1.0, abs=1e-6)
    gates = torch.tensor([0.0, 0.5, 1.0, -2.0])
    assert selection_penalty(gates, "l1").item() == pytest.approx(0.875)
    with pytest.raises(ValueError, match="kind"):
        selection_penalty(gates, "l2")


@pytest.mark.parametrize("method", ["jvp", "vjp"])
def test_jacobian_penalty_estimates_frobenius_norm(method):
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    x = torch.randn(8, 5, 6)                                           # 5 tokens, each y = W x
    est = jacobian_penalty(lin, x, n_probes=50, method=method, normalize=False)
    exact = 5 * lin.weight.detach().square().sum()                    # ||J||_F^2 per sample
    assert est.item() == pytest.approx(exact.item(), rel=0.15)
    norm = jacobian_penalty(lin, x, n_probes=50, method=method)
    assert norm.item() == pytest.approx(exact.item() / 20, rel=0.15)   # / output size
    norm.backward()
    assert lin.weight.grad.abs().sum() > 0 and lin.bias.grad is None  # bias does not move J


def _sensitivity(model, x, eps=1e-2):
    torch.manual_seed(99)
    with torch.no_grad():
        y = model(x)
        d = torch.randn_like(x)
        y2 = model(x + eps * d / d.norm(dim=-1, keepdim=True))
    return sum((y2[k] - y[k]).norm() for k in y).item()


def test_jacobian_penalty_lowers_output_sensitivity():
    # same init, same fixed batch and targets, 8 Adam steps with and without the penalty
    student = TargetSpec("student", 2 * 4 * 4, 16, (2, 4, 4))
    targets = {"grid": TargetSpec("grid", 2 * 3 * 3, 12, (2, 3, 3)), "cls": TargetSpec("cls", 1, 12)}
    torch.manual_seed(0)
    x = torch.randn(4, student.tokens, student.dim)
    y = {n: torch.randn(4, s.tokens, s.dim) for n, s in targets.items()}
    sens = {}
    for w_jac in (0.0, 300.0):
        torch.manual_seed(1)
        model = create_converter("convmix_small", student=student, targets=targets, dim=32,
                                 hidden=64).eval()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(8):
            opt.zero_grad()
            out = model(x)
            loss = sum((out[k] - y[k]).square().mean() for k in y)
            if w_jac:
                loss = loss + w_jac * jacobian_penalty(model, x)
            loss.backward()
            opt.step()
        sens[w_jac] = _sensitivity(model, x)
    assert sens[300.0] < 0.6 * sens[0.0], sens


def test_warmup_schedule_goes_from_small_to_large():
    s = WarmupSchedule(2.0, 10)
    values = [s(k) for k in range(15)]
    assert values[0] == 0.0 and values[5] == pytest.approx(1.0) and values[10] == 2.0
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert values[14] == 2.0
    assert WarmupSchedule(2.0, 10, start=0.1)(0) == pytest.approx(0.2)
    assert WarmupSchedule(0.5, 0)(0) == 0.5
    with pytest.raises(ValueError):
        WarmupSchedule(-1.0, 5)
