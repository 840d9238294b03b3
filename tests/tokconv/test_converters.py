"""Every registered preset (H2's ssm_* presets included automatically): layouts, budget,
gradients, determinism, tiny target sets, masking and the regulariser API."""

import copy
import pickle
import warnings

import pytest
import torch

from tokconv import (
    STUDENT,
    TEACHERS,
    TargetSpec,
    create_converter,
    get_converter_fn,
    list_converters,
)
from tokconv.converters import Converter, count_params

PRESETS = list_converters()
MISSION_BUDGET = (1_000_000, 5_000_000)
# the smoke job's widths: full grids, student 64 wide, teachers 48
SMOKE_STUDENT = TargetSpec("student", 2048, 64, (8, 16, 16))
SMOKE_TARGETS = {n: TargetSpec(n, s.tokens, 48, s.grid) for n, s in TEACHERS.items()}
# a very small layout set (odd grids, up- and down-sampling, a global token)
TINY_STUDENT = TargetSpec("student", 4 * 6 * 6, 24, (4, 6, 6))
TINY_TARGETS = {"down": TargetSpec("down", 2 * 5 * 5, 16, (2, 5, 5)),
                "up": TargetSpec("up", 6 * 7 * 7, 12, (6, 7, 7)),
                "cls": TargetSpec("cls", 1, 20, None)}


def test_registry_has_every_design():
    for prefix in ("baseline_interp_linear", "perceiver_", "convmix_", "tokenlearner_"):
        assert any(n.startswith(prefix) for n in PRESETS), prefix
    with pytest.raises(ValueError, match="unknown converter 'nope'"):
        create_converter("nope")


@pytest.mark.parametrize("name", PRESETS)
def test_full_size_layouts_and_budget(name):
    torch.manual_seed(0)
    model = create_converter(name)
    assert isinstance(model, Converter)
    n_params = count_params(model)
    lo, hi = getattr(get_converter_fn(name), "param_budget", MISSION_BUDGET)
    assert lo <= n_params <= hi, f"{name}: {n_params} params outside its budget [{lo}, {hi}]"
    assert MISSION_BUDGET[0] <= n_params <= MISSION_BUDGET[1]
    x = torch.randn(2, STUDENT.tokens, STUDENT.dim)
    with torch.no_grad():
        out = model.eval()(x)
        vivit = model(x, "vivit")
    assert set(out) == set(TEACHERS)
    for tname, spec in TEACHERS.items():
        assert out[tname].shape == (2, spec.tokens, spec.dim), tname
        assert torch.isfinite(out[tname]).all(), tname
        assert out[tname].std() > 0, tname
    assert torch.equal(vivit, out["vivit"])                        # one target == its dict entry
    assert out["videomae"][0].std(0).mean() > 0                        # tokens differ by position


@pytest.mark.parametrize("name", PRESETS)
def test_smoke_widths(name):
    torch.manual_seed(0)
    model = create_converter(name, student=SMOKE_STUDENT, targets=SMOKE_TARGETS).eval()
    assert model.config["name"] == name
    assert model.config["targets"]["vivit"]["dim"] == 48
    with torch.no_grad():
        out = model(torch.randn(1, SMOKE_STUDENT.tokens, SMOKE_STUDENT.dim))
    for tname, spec in SMOKE_TARGETS.items():
        assert out[tname].shape == (1, spec.tokens, 48)
        assert torch.isfinite(out[tname]).all()
    with pytest.raises(KeyError, match="unknown target 'nope'"):
        model(torch.randn(1, 2048, 64), "nope")
    with pytest.raises(ValueError, match=r"\(B, 2048, 64\)"):
        model(torch.randn(1, 2048, 32))


@pytest.mark.parametrize("name", PRESETS)
def test_gradients_determinism_rank_and_mask(name):
    x = torch.randn(2, TINY_STUDENT.tokens, TINY_STUDENT.dim)
    models = []
    for _ in range(2):
        torch.manual_seed(7)
        models.append(create_converter(name, student=TINY_STUDENT, targets=TINY_TARGETS, rank=4,
                                       mask_ratio=0.5))
    model = models[0]
    assert model.config["kwargs"]["rank"] == 4
    with torch.no_grad():
        e1, e2 = models[0].eval()(x), models[1].eval()(x)
    assert model.last_mask is None                                     # no masking at eval
    assert all(torch.equal(e1[k], e2[k]) for k in e1), "same seed, different outputs"

    # training: every parameter gets a finite gradient from the sum of the target losses
    model.train()
    out = model(x)
    loss = 0.0
    for tname, spec in TINY_TARGETS.items():
        assert out[tname].shape == (2, spec.tokens, spec.dim)
        assert torch.isfinite(out[tname]).all()
        loss = loss + out[tname].square().mean()
    reg = model.regularisers()
    assert "nuclear" in reg and reg["nuclear"] > 0
    for k, v in reg.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    loss.backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"{name}: parameters without a finite gradient: {missing}"

    # masking: exactly half the student tokens of every sample, and their content is ignored
    assert model.last_mask.sum(1).tolist() == [TINY_STUDENT.tokens // 2] * 2
    torch.manual_seed(1)
    with torch.no_grad():
        y = model(x)
        masked = model.last_mask
        x2 = x.clone()
        x2[masked] = x2[masked] + 100.0
        torch.manual_seed(1)
        y2 = model(x2)
    assert all(torch.allclose(y[k], y2[k]) for k in y)


@pytest.mark.parametrize("name", PRESETS)
def test_deepcopy_and_pickle_after_a_training_step(name):
    # pipeline.evaluate deep-copies the converter it is given, often right after training: the
    # last forward's regulariser terms are non-leaf tensors of its autograd graph
    torch.manual_seed(0)
    model = create_converter(name, student=TINY_STUDENT, targets=TINY_TARGETS, rank=4,
                             mask_ratio=0.5).train()
    x = torch.randn(2, TINY_STUDENT.tokens, TINY_STUDENT.dim)
    out = model(x)
    reg = model.regularisers()
    (sum(o.square().mean() for o in out.values()) + sum(reg.values())).backward()
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    assert set(model.regularisers()) == set(reg) and model.last_mask is not None  # kept
    for c in copies:                         # a copy has run no forward: only the weight term
        assert set(c.regularisers()) == {"nuclear"} and c.last_mask is None
    with torch.no_grad():
        want = model.eval()(x)
        for c in copies:
            got = c.eval()(x)
            assert all(torch.equal(got[k], want[k]) for k in want), name


def test_selection_regulariser_is_a_normalised_entropy():
    torch.manual_seed(0)
    for name in ("tokenlearner_small", "perceiver_small"):
        model = create_converter(name, student=TINY_STUDENT, targets=TINY_TARGETS).train()
        model(torch.randn(2, TINY_STUDENT.tokens, TINY_STUDENT.dim))
        sel = model.regularisers()["selection"]
        assert 0.0 < sel.item() <= 1.0 + 1e-6
        assert "nuclear" not in model.regularisers()                    # full-rank projection


@pytest.mark.parametrize("name", PRESETS)
def test_torchscript_export_matches_eager_on_another_batch(name, tmp_path):
    # pipeline.export traces forward_all; the resampling matrices are buffers, so two traced calls
    # give the same graph (the trace check) and the trace generalises over the batch size
    from pipeline.export import _torchscript
    torch.manual_seed(0)
    kw = {"dim": 64, "headdim": 32} if name.startswith("ssm") else {}
    model = create_converter(name, student=SMOKE_STUDENT, targets=SMOKE_TARGETS, **kw).eval()
    # not saved: the export format is unchanged
    assert not any("resample" in k for k in model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        _torchscript(model, (2048, 64), str(tmp_path / "ts.pt"))
    traced = torch.jit.load(str(tmp_path / "ts.pt"))
    x = torch.randn(2, 2048, 64)
    with torch.no_grad():
        got, want = traced(x), model(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)


def test_tokenlearner_summaries_are_softmax_weighted_sums_of_the_tokens():
    torch.manual_seed(0)
    model = create_converter("tokenlearner_small", student=TINY_STUDENT,
                             targets=TINY_TARGETS).double().eval()
    x = torch.randn(2, TINY_STUDENT.tokens, TINY_STUDENT.dim, dtype=torch.float64)
    z = model.encode(x)[0]
    h = model.in_proj(model.in_norm(x)) + model.in_pos(TINY_STUDENT.grid)
    w = model.select(model.select_norm(h)).softmax(dim=1)            # (B, Ns, K): over the tokens
    expect = torch.einsum("bnk,bnd->bkd", w, h)
    for blk in model.blocks:
        expect = blk(expect)
    torch.testing.assert_close(z, expect)
    torch.testing.assert_close(model.selection_weights(h).sum(-1),
                               torch.ones(2, w.shape[-1], dtype=torch.float64))


@pytest.mark.parametrize("name", ["perceiver_small", "tokenlearner_small"])
def test_output_skip_adds_a_resampled_linear_map_of_the_normalised_student(name):
    torch.manual_seed(0)
    model = create_converter(name, student=TINY_STUDENT, targets=TINY_TARGETS).double().eval()
    assert sorted(model.skip) == ["12", "16", "20"]              # one map per target width
    x = torch.randn(2, TINY_STUDENT.tokens, TINY_STUDENT.dim, dtype=torch.float64)
    with torch.no_grad():
        out = model.forward_all(x)
        xn = model.in_norm(x)
        skips = {n: model.resample[n](model.skip[str(s.dim)](xn))
                 for n, s in TINY_TARGETS.items()}
        model.skip = None
        plain = model.forward_all(x)
    for n in TINY_TARGETS:
        assert skips[n].abs().max() > 1e-3
        torch.testing.assert_close(out[n], plain[n] + skips[n])
    lowrank = create_converter(name, student=TINY_STUDENT, targets=TINY_TARGETS, rank=4)
    assert all(m.rank == 4 for m in lowrank.skip.values())      # the deficiency bottleneck too


def test_bad_constructor_arguments_name_the_input():
    with pytest.raises(ValueError, match="mask_ratio"):
        create_converter("baseline_interp_linear", mask_ratio=1.0)
    with pytest.raises(ValueError, match="needs a"):
        create_converter("baseline_interp_linear", student=TargetSpec("s", 1, 8, None))
    with pytest.raises(ValueError, match="identifier"):
        create_converter("baseline_interp_linear", targets={"a-b": TargetSpec("a-b", 1, 8)})
