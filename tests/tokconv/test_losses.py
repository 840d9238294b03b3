"""Distillation loss: standardisation, cosine + smooth-L1 terms, per-target weights."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokconv.losses import destandardize, distill_loss, standardize, target_loss


def test_standardize_round_trip_and_numpy_stats():
    x = torch.randn(2, 5, 4) * 3 + 1
    mean = np.array([1.0, 0.0, -1.0, 2.0], dtype=np.float32)
    std = np.array([3.0, 1.0, 0.5, 0.0], dtype=np.float32)
    z = standardize(x, mean, std)
    assert torch.allclose(z[..., 0], (x[..., 0] - 1) / 3)
    assert torch.isfinite(z).all()                                    # std 0 is clamped
    assert torch.allclose(destandardize(z, mean, std), x, atol=1e-4)


def test_target_loss_terms():
    p = torch.randn(2, 7, 6)
    assert target_loss(p, p).item() == pytest.approx(0.0, abs=1e-6)
    # pure scale: cosine term 0, smooth-L1 term > 0
    assert target_loss(2 * p, p, w_cos=1, w_sl1=0).item() == pytest.approx(0.0, abs=1e-6)
    assert (target_loss(2 * p, p, w_cos=0, w_sl1=1).item()
            == pytest.approx(F.smooth_l1_loss(2 * p, p).item()))
    assert target_loss(-p, p, w_cos=1, w_sl1=0).item() == pytest.approx(2.0, abs=1e-5)
    with pytest.raises(ValueError, match="differ in shape"):
        target_loss(p, p[:, :3])


def test_distill_loss_standardises_teacher_and_weights_targets():
    torch.manual_seed(0)
    teacher = {"a": torch.randn(2, 8, 4) * 5 + 3, "b": torch.randn(2, 1, 4)}
    mean = {"a": torch.full((4,), 3.0), "b": torch.zeros(4)}
    std = {"a": torch.full((4,), 5.0), "b": torch.ones(4)}
    perfect = {"a": (teacher["a"] - 3) / 5, "b": teacher["b"].clone()}
    total, per = distill_loss(perfect, teacher, mean=mean, std=std)
    assert total.item() == pytest.approx(0.0, abs=1e-5) and set(per) == {"a", "b"}
    pred = {"a": torch.zeros(2, 8, 4) + 0.1, "b": teacher["b"] + 1.0}
    total, per = distill_loss(pred, teacher, mean=mean, std=std, w_cos=0.5, w_sl1=2.0,
                              target_weights={"a": 3.0})
    exp_a = target_loss(pred["a"], perfect["a"], w_cos=0.5, w_sl1=2.0)
    exp_b = target_loss(pred["b"], teacher["b"], w_cos=0.5, w_sl1=2.0)
    assert per["a"].item() == pytest.approx(exp_a.item())
    assert per["b"].item() == pytest.approx(exp_b.item())
    assert total.item() == pytest.approx(3.0 * exp_a.item() + exp_b.item(), rel=1e-5)
    # teacher fp16 is fine; None stats mean already standardised
    t16 = {k: v.half() for k, v in perfect.items()}
    assert distill_loss(perfect, t16, mean=None, std=None)[0].item() == pytest.approx(0.0, abs=1e-3)


def test_distill_loss_errors_name_targets():
    p = {"a": torch.randn(1, 2, 3)}
    with pytest.raises(KeyError, match="'zz'"):
        distill_loss(p, p, mean=None, std=None, target_weights={"zz": 1.0})
    with pytest.raises(KeyError, match="'a'"):
        distill_loss(p, {}, mean=None, std=None)
