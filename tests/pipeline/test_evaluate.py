"""Evaluate stage: fidelity/accuracy values against numpy, and a real converter on a real store."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_features import CLASS_NAMES, STUDENT, TEACHERS, make_tiny_store

from pipeline.artifacts import stats_tensors
from pipeline.evaluate import (
    FidelityMeter,
    evaluate_model,
    gflops_per_clip,
    tensor_digest,
    topk_correct,
)
from pipeline.storage import Storage


def _np_metrics(pred: np.ndarray, target: np.ndarray) -> dict:
    p, t = pred.astype(np.float64), target.astype(np.float64)
    cos = (p * t).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1))
    flat = t.reshape(-1, t.shape[-1])
    sst = ((flat - flat.mean(0)) ** 2).sum()
    sse = ((p - t) ** 2).sum()
    return {"cosine": cos.mean(1).mean(), "mse": ((p - t) ** 2).mean(), "r2": 1 - sse / sst}


def test_fidelity_perfect_predictions():
    t = torch.randn(5, 7, 4)
    m = FidelityMeter(4)
    m.update(t.clone(), t)
    r = m.compute()
    assert r["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert r["mse"] == 0.0
    assert r["r2"] == pytest.approx(1.0, abs=1e-12)


def test_fidelity_matches_numpy_across_batches():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(9, 6, 5, generator=g) * 3 + 1
    p = t + torch.randn(9, 6, 5, generator=g)
    m = FidelityMeter(5)
    for sl in (slice(0, 4), slice(4, 5), slice(5, 9)):  # uneven batches
        m.update(p[sl], t[sl])
    ref = _np_metrics(p.numpy(), t.numpy())
    got = m.compute()
    for k in ("cosine", "mse", "r2"):
        assert got[k] == pytest.approx(ref[k], rel=1e-9), k
    # predicting the per-channel mean gives R^2 = 0; its negation scores below zero
    mean_pred = t.reshape(-1, 5).mean(0).expand_as(t)
    m0 = FidelityMeter(5)
    m0.update(mean_pred, t)
    assert m0.compute()["r2"] == pytest.approx(0.0, abs=1e-9)


def test_fidelity_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="pred"):
        FidelityMeter(4).update(torch.zeros(1, 2, 4), torch.zeros(1, 3, 4))


def test_topk_correct_vs_numpy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 7, generator=g)
    labels = torch.randint(0, 7, (50,), generator=g)
    labels[:5] = -1  # unlabelled rows are ignored
    got = topk_correct(logits, labels, ks=(1, 5))
    lg, lb = logits.numpy()[5:], labels.numpy()[5:]
    order = np.argsort(-lg, axis=1)
    assert got[1] == int((order[:, 0] == lb).sum())
    assert got[5] == int((order[:, :5] == lb[:, None]).any(1).sum())
    # k capped at 3 classes
    assert topk_correct(logits[:, :3], labels.clamp(max=2), ks=(5,))[5] == 45


def test_tensor_digest_is_bit_exact():
    x = torch.randn(3, 4)
    assert tensor_digest(x) == tensor_digest(x.clone())
    y = x.clone()
    y[0, 0] = torch.nextafter(y[0, 0], torch.tensor(float("inf")))
    assert tensor_digest(x) != tensor_digest(y)
    assert tensor_digest(x) != tensor_digest(x.double())


def test_evaluate_model_known_case(tmp_path):
    """Teachers stored as exactly the converter's outputs (float32 store) and identity stats:
    cosine 1, MSE 0, R^2 1; labels chosen against the head's logits give a known top-1/top-5."""
    from tokconv import create_converter
    from tokconv.heads import ResidualHead

    torch.manual_seed(0)
    conv = create_converter("baseline_interp_linear", student=STUDENT, targets=TEACHERS).eval()
    head = ResidualHead(student_dim=STUDENT.dim,
                        target_dims={k: s.dim for k, s in TEACHERS.items()},
                        num_classes=7, hidden=16).eval()
    store = make_tiny_store(Storage(str(tmp_path)), n_train=0, n_val=10, shard_clips=4,
                            dtype=np.float32)
    # rewrite the store's teachers as the converter's own outputs; labels: 4 top-1, 3 rank-4, 3 last
    batches = []
    for b in store.iter_torch(split="val", batch_size=10):
        with torch.no_grad():
            out = conv.forward_all(b["student"])
            logits = head(b["student"], out)
        order = logits.argsort(dim=1, descending=True)
        labels = torch.cat([order[:4, 0], order[4:7, 3], order[7:, 6]])
        batches.append({"student": b["student"], **out, "label_index": labels})
    zero = {k: torch.zeros(s.dim) for k, s in TEACHERS.items()}
    one = {k: torch.ones(s.dim) for k, s in TEACHERS.items()}
    # evaluate in two batches (different shapes than the reference forward)
    split = [{k: v[:6] for k, v in batches[0].items()}, {k: v[6:] for k, v in batches[0].items()}]
    metrics, sample = evaluate_model(conv, head, split, mean=zero, std=one)
    for t, r in metrics["targets"].items():
        assert r["cosine"] == pytest.approx(1.0, abs=1e-5), t
        assert r["mse"] == pytest.approx(0.0, abs=1e-10), t
        assert r["r2"] == pytest.approx(1.0, abs=1e-6), t
    assert metrics["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["clips"] == 10 and metrics["labelled_clips"] == 10
    assert metrics["top1"] == pytest.approx(0.4)
    assert metrics["top5"] == pytest.approx(0.7)
    # the sample is the first clips' inputs and outputs of the model
    assert sample["student"].shape == (2, STUDENT.tokens, STUDENT.dim)
    with torch.no_grad():
        ref = conv.forward_all(sample["student"])
    for t in TEACHERS:
        assert torch.equal(sample[f"out.{t}"], ref[t])
    assert len(CLASS_NAMES) == 3  # the store's own labels were replaced above


def test_gflops_counts_the_linear_maps():
    from tokconv import create_converter
    conv = create_converter("baseline_interp_linear", student=STUDENT, targets=TEACHERS).eval()
    g = gflops_per_clip(conv, (STUDENT.tokens, STUDENT.dim))
    # at least one (tokens x Ds x Dt) matmul per target, 2 FLOPs per multiply-add
    lower = sum(2 * min(s.tokens, STUDENT.tokens) * STUDENT.dim * s.dim
                for s in TEACHERS.values()) / 1e9
    assert g >= lower * 0.99
    assert g < 1.0


@pytest.mark.gpu
def test_evaluate_on_cuda_matches_cpu_and_keeps_a_cpu_sample(tmp_path):
    from tokconv import create_converter
    from tokconv.heads import ResidualHead

    torch.manual_seed(0)
    conv = create_converter("baseline_interp_linear", student=STUDENT, targets=TEACHERS)
    head = ResidualHead(student_dim=STUDENT.dim,
                        target_dims={k: s.dim for k, s in TEACHERS.items()},
                        num_classes=3, hidden=16)
    store = make_tiny_store(Storage(str(tmp_path)), n_train=4, n_val=8, shard_clips=4)
    mean, std = stats_tensors(store.stats(), TEACHERS)
    m_cpu, s_cpu = evaluate_model(conv, head, store.iter_torch(split="val", batch_size=4),
                                  mean=mean, std=std)
    m_gpu, s_gpu = evaluate_model(conv, head, store.iter_torch(split="val", batch_size=4),
                                  mean=mean, std=std, device="cuda")
    assert m_gpu["mean_cosine"] == pytest.approx(m_cpu["mean_cosine"], abs=1e-3)
    assert m_gpu["top1"] == m_cpu["top1"]
    for k, v in s_cpu.items():
        assert s_gpu[k].device.type == "cpu" and torch.equal(v, s_gpu[k]), k
