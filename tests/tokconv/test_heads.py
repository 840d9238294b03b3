"""ResidualHead: shapes, both branches matter, it learns a real labelling."""
import pytest
import torch

from tokconv import ResidualHead

DIMS = {"videomae": 12, "timesformer": 12, "vivit": 10}


def _batch(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, 20, 16, generator=g)
    conv = {"videomae": torch.randn(b, 8, 12, generator=g),
            "timesformer": torch.randn(b, 16, 12, generator=g),
            "vivit": torch.randn(b, 1, 10, generator=g)}
    return student, conv


def test_shapes_config_and_both_branches_used():
    torch.manual_seed(0)
    head = ResidualHead(student_dim=16, target_dims=DIMS, num_classes=5, hidden=32)
    student, conv = _batch()
    logits = head(student, conv)
    assert logits.shape == (6, 5) and torch.isfinite(logits).all()
    assert head.config == {"student_dim": 16, "target_dims": DIMS, "num_classes": 5, "hidden": 32,
                           "dropout": 0.0}
    # the residual branch sees the student, the main branch the converted features
    assert not torch.allclose(head(student * 2, conv), logits)
    conv2 = dict(conv, vivit=conv["vivit"] + 1.0 + torch.randn_like(conv["vivit"]))
    assert not torch.allclose(head(student, conv2), logits)
    logits.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_residual_branch_recovers_what_the_converted_features_lack():
    # labels depend only on the student features: converted features are noise, so only the
    # residual branch can fit them
    torch.manual_seed(0)
    student, conv = _batch(b=32, seed=1)
    labels = (student.mean(1)[:, 0] > 0).long() + 2 * (student.mean(1)[:, 1] > 0).long()
    head = ResidualHead(student_dim=16, target_dims=DIMS, num_classes=4, hidden=64)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(student, conv), labels)
        loss.backward()
        opt.step()
    assert (head(student, conv).argmax(1) == labels).float().mean() == 1.0


def test_errors_name_the_bad_input():
    head = ResidualHead(student_dim=16, target_dims=DIMS, num_classes=3)
    student, conv = _batch()
    with pytest.raises(KeyError, match="vivit"):
        head(student, {k: v for k, v in conv.items() if k != "vivit"})
    with pytest.raises(ValueError, match="student must be"):
        head(torch.randn(6, 20, 8), conv)
    with pytest.raises(ValueError, match="num_classes"):
        ResidualHead(student_dim=16, target_dims=DIMS, num_classes=0)


def test_logits_do_not_depend_on_the_order_of_target_dims():
    torch.manual_seed(0)
    head = ResidualHead(student_dim=16, target_dims=DIMS, num_classes=5, hidden=32).eval()
    reordered = ResidualHead(student_dim=16, target_dims=dict(reversed(DIMS.items())),
                             num_classes=5, hidden=32).eval()
    reordered.load_state_dict(head.state_dict())
    student, conv = _batch()
    with torch.no_grad():
        assert torch.equal(head(student, conv), reordered(student, conv))
    assert head.target_names == reordered.target_names == sorted(DIMS)
