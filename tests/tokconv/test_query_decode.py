"""A and D's query decode (tokconv/converters/query_decode.py): the fused output GEMM equals the
unfused path (values and gradients), the factored skip, and the shared decode of targets that
differ only in frame count."""
import pytest
import torch

from tests.tokconv.test_converters import TINY_STUDENT, TINY_TARGETS
from tokconv import TargetSpec, create_converter
from tokconv.converters import count_params
from tokconv.layers import GridResample, LowRankLinear

DESIGNS = ["perceiver_small", "tokenlearner_small"]
VARIANTS = [{}, {"skip_rank": 4}, {"shared_decode": True}, {"rank": 4},
            {"skip_rank": 4, "shared_decode": True}]
# two targets on the same spatial grid, one with twice the student's frames
PAIR_TARGETS = {"a": TargetSpec("a", 4 * 5 * 5, 12, (4, 5, 5)),
                "b": TargetSpec("b", 8 * 5 * 5, 12, (8, 5, 5)),
                "cls": TargetSpec("cls", 1, 12, None)}


def _run(model, x, grads):
    model.zero_grad(set_to_none=True)
    out = model(x)
    sum((out[n] * grads[n]).sum() for n in out).backward()
    return out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(kw) or "preset")
@pytest.mark.parametrize("name", DESIGNS)
def test_fused_output_equals_the_unfused_path_values_and_gradients(name, kw):
    for targets in (TINY_TARGETS, PAIR_TARGETS):
        torch.manual_seed(0)
        model = create_converter(name, student=TINY_STUDENT, targets=targets, **kw).double()
        model.eval()                     # no masking / selection sampling: one path each
        x = torch.randn(2, TINY_STUDENT.tokens, TINY_STUDENT.dim, dtype=torch.float64)
        grads = {n: torch.randn(2, s.tokens, s.dim, dtype=torch.float64)
                 for n, s in targets.items()}
        model.fused = False
        out_ref, g_ref = _run(model, x, grads)
        model.fused = True
        out_fn, g_fn = _run(model, x, grads)
        # the resampling matrices are fp32 buffers, so their rows sum to one within 1e-7 only
        for n in targets:
            torch.testing.assert_close(out_fn[n], out_ref[n], rtol=1e-5, atol=1e-6)
        assert sorted(g_fn) == sorted(g_ref) == sorted(k for k, _ in model.named_parameters())
        for k in g_ref:
            torch.testing.assert_close(g_fn[k], g_ref[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("name", DESIGNS)
def test_factored_skip_is_low_rank_and_not_a_deficiency_term(name):
    torch.manual_seed(0)
    full = create_converter(name, student=TINY_STUDENT, targets=TINY_TARGETS).train()
    cheap = create_converter(name, student=TINY_STUDENT, targets=TINY_TARGETS,
                             skip_rank=3).train()
    assert all(isinstance(m, LowRankLinear) and m.rank == 3 and not m.deficiency
               for m in cheap.skip.values())
    assert torch.linalg.matrix_rank(cheap.skip["12"].weight.detach()) == 3
    assert count_params(cheap) < count_params(full)
    cheap(torch.randn(2, TINY_STUDENT.tokens, TINY_STUDENT.dim))
    assert "nuclear" not in cheap.regularisers()               # no penalty: a cost choice only
    both = create_converter(name, student=TINY_STUDENT, targets=TINY_TARGETS, skip_rank=3,
                            rank=2)
    assert all(m.rank == 2 and m.deficiency for m in both.skip.values())  # the bottleneck wins
    with pytest.raises(ValueError, match="skip_rank"):
        create_converter(name, student=TINY_STUDENT, targets=TINY_TARGETS, skip_rank=0)


@pytest.mark.parametrize("name", DESIGNS)
def test_shared_decode_runs_one_pass_per_spatial_grid_and_resamples_in_time(name):
    calls = {}
    for shared in (False, True):
        torch.manual_seed(0)
        model = create_converter(name, student=TINY_STUDENT, targets=PAIR_TARGETS,
                                 shared_decode=shared).double().eval()
        seen: list = []
        model.decoder.register_forward_hook(lambda m, a, out, seen=seen: seen.append(out))
        x = torch.randn(2, TINY_STUDENT.tokens, TINY_STUDENT.dim, dtype=torch.float64)
        with torch.no_grad():
            out = model(x)
        calls[shared] = len(seen)
        assert out["b"].shape == (2, 200, 12) and out["cls"].shape == (2, 1, 12)
    assert calls == {False: 3, True: 2}                  # a and b share one decoder pass
    assert model.target_embed is None and model.decode_grids["b"] == (4, 5, 5)
    dec = seen[0]                                        # the shared (B, 100, d_dec) pass
    with torch.no_grad():
        xn = model.in_norm(x)
        want_b = GridResample((4, 5, 5), (8, 5, 5))(model.output_ref("b", dec, xn, {}))
        want_a = model.output_ref("a", dec, xn, {})
    torch.testing.assert_close(out["b"], want_b)
    torch.testing.assert_close(out["a"], want_a)
    assert not torch.allclose(out["a"], out["b"][:, :100])  # per-target output affines differ
