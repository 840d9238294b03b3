"""save/load of converters and heads: files, config, bit-identical outputs (every preset)."""
import json

import pytest
import torch

from tokconv import (
    ResidualHead,
    TargetSpec,
    create_converter,
    list_converters,
    load_converter,
    load_head,
    save_converter,
    save_head,
)

STUDENT = TargetSpec("student", 4 * 6 * 6, 24, (4, 6, 6))
TARGETS = {"videomae": TargetSpec("videomae", 2 * 5 * 5, 16, (2, 5, 5)),
           "vivit": TargetSpec("vivit", 1, 16, None)}


@pytest.mark.parametrize("name", list_converters())
def test_converter_round_trip_is_bit_identical(name, tmp_path):
    torch.manual_seed(0)
    model = create_converter(name, student=STUDENT, targets=TARGETS, rank=4).eval()
    with torch.no_grad():                 # move weights off their init so a fresh model differs
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_converter(model, tmp_path / "conv")
    assert (tmp_path / "conv" / "model.safetensors").is_file()
    cfg = json.loads((tmp_path / "conv" / "config.json").read_text())
    assert cfg["name"] == name and cfg["kwargs"]["rank"] == 4 and cfg["dtype"] == "float32"
    assert cfg["targets"]["vivit"]["grid"] is None

    torch.manual_seed(999)                # a different init must be fully overwritten by the load
    loaded = load_converter(tmp_path / "conv")
    assert not loaded.training and type(loaded) is type(model)
    assert loaded.targets == model.targets and loaded.student == model.student
    x = torch.randn(2, STUDENT.tokens, STUDENT.dim)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_converter_round_trip(tmp_path):
    model = create_converter("baseline_interp_linear", student=STUDENT,
                             targets=TARGETS).to(torch.bfloat16)
    save_converter(model, tmp_path)
    loaded = load_converter(tmp_path)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    x = torch.randn(1, STUDENT.tokens, STUDENT.dim, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)["videomae"], loaded(x)["videomae"])


def test_head_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    head = ResidualHead(student_dim=24, target_dims={"videomae": 16, "vivit": 16}, num_classes=7,
                        hidden=32, dropout=0.1).eval()
    save_head(head, tmp_path)
    assert (tmp_path / "head.safetensors").is_file() and (tmp_path / "head.json").is_file()
    torch.manual_seed(5)
    loaded = load_head(tmp_path)
    assert loaded.config == head.config
    s = torch.randn(3, 10, 24)
    conv = {"videomae": torch.randn(3, 50, 16), "vivit": torch.randn(3, 1, 16)}
    with torch.no_grad():
        assert torch.equal(head(s, conv), loaded(s, conv))


def _head_inputs(dims: dict[str, int], seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    conv = {n: torch.randn(3, 1 if n == "vivit" else 50, d, generator=g) for n, d in dims.items()}
    return torch.randn(3, 10, 24, generator=g), conv


def test_head_with_targets_out_of_alphabetical_order_round_trips(tmp_path):
    # head.json is written with sorted keys: the rebuilt head must not concatenate the targets in
    # another order than the saved one
    dims = {"vivit": 8, "videomae": 16, "timesformer": 12}
    torch.manual_seed(0)
    head = ResidualHead(student_dim=24, target_dims=dims, num_classes=5, hidden=32).eval()
    save_head(head, tmp_path)
    saved = json.loads((tmp_path / "head.json").read_text())["kwargs"]["target_dims"]
    assert list(saved) == sorted(dims)                     # the file lost the construction order
    loaded = load_head(tmp_path)
    s, conv = _head_inputs(dims)
    with torch.no_grad():
        assert torch.equal(head(s, conv), loaded(s, conv))


def test_head_json_of_the_previous_format_loads_as_before(tmp_path):
    # what save_head wrote before: kwargs with sorted keys, rebuilt by ResidualHead(**kwargs)
    dims = {"timesformer": 12, "videomae": 16, "vivit": 8}
    torch.manual_seed(0)
    ref = ResidualHead(student_dim=24, target_dims=dims, num_classes=5, hidden=32).eval()
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
              str(tmp_path / "head.safetensors"), metadata={"format": "pt"})
    (tmp_path / "head.json").write_text(json.dumps(
        {"dtype": "float32", "format_version": 1, "kwargs": ref.config}, indent=2, sort_keys=True))
    loaded = load_head(tmp_path)
    s, conv = _head_inputs(dims)
    with torch.no_grad():
        assert torch.equal(ref(s, conv), loaded(s, conv))


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no preset config"):
        save_converter(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_converter(tmp_path / "missing")


def test_a_saved_converter_reloads_after_its_presets_defaults_change(tmp_path, monkeypatch):
    """config.json holds every constructor argument (class defaults too), so a preset whose
    defaults change later (a release re-sizing it) still rebuilds the saved module bit for bit."""
    from tokconv import registry
    from tokconv.converters.base import build_preset
    from tokconv.converters.perceiver import PerceiverConverter
    model = create_converter("perceiver_small", student=STUDENT, targets=TARGETS, n_lat=8,
                             d_lat=32, d_dec=16).eval()
    assert {"drop_path", "track_attention", "skip", "heads"} <= set(model.config["kwargs"])
    save_converter(model, tmp_path)

    def resized(*, student=STUDENT, targets=None, **kwargs):  # a later release's defaults
        return build_preset(PerceiverConverter, "perceiver_small", student=student,
                            targets=targets, defaults={"n_lat": 16, "d_lat": 64, "d_dec": 32,
                                                       "skip": False, "heads": 2},
                            overrides=kwargs)
    monkeypatch.setitem(registry._CONVERTERS, "perceiver_small", resized)
    assert create_converter("perceiver_small", student=STUDENT,
                            targets=TARGETS).config["kwargs"]["skip"] is False
    loaded = load_converter(tmp_path)
    x = torch.randn(2, STUDENT.tokens, STUDENT.dim)
    with torch.no_grad():
        want, got = model(x), loaded(x)
    assert all(torch.equal(want[k], got[k]) for k in want)
