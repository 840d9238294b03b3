"""Evaluate stage: fidelity/accuracy values against numpy, and a real converter on a real store."""
from __future__ import annotations

import json

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


# ---------------------------------------------------------------- details for the report

def test_fidelity_details_match_numpy_across_batches():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(11, 6, 5, generator=g)
    p = t + 0.8 * torch.randn(11, 6, 5, generator=g)
    m = FidelityMeter(5)
    for sl in (slice(0, 3), slice(3, 4), slice(4, 11)):
        m.update(p[sl], t[sl])
    pn, tn = p.double().numpy(), t.double().numpy()
    # (clips, tokens)
    cos = (pn * tn).sum(-1) / (np.linalg.norm(pn, axis=-1) * np.linalg.norm(tn, axis=-1))
    d = m.details()
    np.testing.assert_allclose(d["per_clip_cosine"], cos.mean(1), rtol=1e-12)
    np.testing.assert_allclose(d["per_token_cosine"], cos.mean(0), rtol=1e-12)
    r = m.compute()
    assert r["cosine_p05"] == pytest.approx(np.quantile(cos.mean(1), 0.05), rel=1e-12)
    assert r["cosine"] == pytest.approx(cos.mean(), rel=1e-12)
    with pytest.raises(ValueError, match="tokens"):
        m.update(p[:2, :5], t[:2, :5])
    with pytest.raises(ValueError, match="no clips"):
        FidelityMeter(5).details()


def test_confusion_meter_vs_numpy():
    from pipeline.evaluate import ConfusionMeter
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(60, 4, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    labels[::7] = -1  # unlabelled rows are ignored
    labels[labels == 3] = 2  # class 3 never occurs: no accuracy for it
    m = ConfusionMeter(4)
    m.update(logits[:25], labels[:25])
    m.update(logits[25:], labels[25:])
    r = m.compute()
    ok = labels.numpy() >= 0
    ref = np.zeros((4, 4), np.int64)
    np.add.at(ref, (labels.numpy()[ok], logits.numpy()[ok].argmax(1)), 1)
    assert r["confusion"] == ref.tolist()
    assert r["support"] == ref.sum(1).tolist() and r["support"][3] == 0
    acc = [ref[i, i] / ref[i].sum() for i in range(3)]
    assert r["per_class_accuracy"][:3] == pytest.approx(acc) and r["per_class_accuracy"][3] is None
    assert r["mean_class_accuracy"] == pytest.approx(np.mean(acc))
    with pytest.raises(ValueError, match="outside 4 classes"):
        m.update(logits[:2], torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="logits"):
        m.update(logits[:2, :3], labels[:2])


def test_evaluate_model_details_known_case():
    """Teachers equal to the converter's outputs: every clip and token has cosine 1; labels chosen
    against the head's logits give a known confusion matrix."""
    from tokconv import create_converter
    from tokconv.heads import ResidualHead

    torch.manual_seed(0)
    conv = create_converter("baseline_interp_linear", student=STUDENT, targets=TEACHERS).eval()
    head = ResidualHead(student_dim=STUDENT.dim,
                        target_dims={k: s.dim for k, s in TEACHERS.items()},
                        num_classes=4, hidden=16).eval()
    x = torch.randn(9, STUDENT.tokens, STUDENT.dim)
    with torch.no_grad():
        out = conv.forward_all(x)
        logits = head(x, out)
    order = logits.argsort(dim=1, descending=True)
    # 5 right, 3 second-best, 1 unlabelled
    labels = torch.cat([order[:5, 0], order[5:8, 1], torch.tensor([-1])])
    batches = [{"student": x[s], **{k: v[s] for k, v in out.items()}, "label_index": labels[s],
                "video_id": [f"clip{i}" for i in range(9)][s]} for s in (slice(0, 4), slice(4, 9))]
    zero = {k: torch.zeros(s.dim) for k, s in TEACHERS.items()}
    one = {k: torch.ones(s.dim) for k, s in TEACHERS.items()}
    names = ["w", "x", "y", "z"]
    with pytest.raises(ValueError, match="3 class_names for a head of 4"):
        evaluate_model(conv, head, batches, mean=zero, std=one, class_names=names[:3])
    metrics, _, details = evaluate_model(conv, head, batches, mean=zero, std=one, class_names=names,
                                         return_details=True)
    assert details["clips"] == 9 and details["video_ids"] == [f"clip{i}" for i in range(9)]
    for t, spec in TEACHERS.items():
        d = details["targets"][t]
        assert d["tokens"] == spec.tokens and d["grid"] == (list(spec.grid) if spec.grid else None)
        assert d["per_clip_cosine"] == pytest.approx([1.0] * 9, abs=1e-5)
        assert d["per_token_cosine"] == pytest.approx([1.0] * spec.tokens, abs=1e-5)
    h = details["head"]
    pred, true = logits.argmax(1)[:8].tolist(), labels[:8].tolist()
    ref = np.zeros((4, 4), np.int64)
    np.add.at(ref, (true, pred), 1)
    assert h["class_names"] == names and h["confusion"] == ref.tolist()
    assert sum(h["confusion"][i][i] for i in range(4)) == 5 == round(metrics["top1"] * 8)
    seen = [i for i in range(4) if ref[i].sum()]
    assert metrics["mean_class_accuracy"] == pytest.approx(
        np.mean([ref[i, i] / ref[i].sum() for i in seen]))
    # without return_details: the old two-value form, the same metrics
    m2, _ = evaluate_model(conv, head, batches, mean=zero, std=one)
    assert m2 == metrics


def test_details_json_is_compact_and_rounded():
    from pipeline.evaluate import details_json
    d = {"schema": "s",
         "targets": {"a": {"per_clip_cosine": [0.123456789, float("nan")], "grid": [1, 2, 3]}},
         "head": None}
    raw = details_json(d)
    assert b" " not in raw and b"\n" not in raw
    assert json.loads(raw) == {"schema": "s", "targets": {"a": {"per_clip_cosine": [0.123457, None],
                                                                "grid": [1, 2, 3]}}, "head": None}


def test_run_evaluate_writes_details_beside_a_small_metrics_json(tmp_path):
    """run_evaluate on a real store and checkpoint: details.json holds the per-clip/per-token/
    per-class data, metrics.json stays small and points at it, and the report draws the training
    curves from the log named in train.json."""
    from tiny_features import publish_checkpoint

    from pipeline.config import JobConfig
    from pipeline.evaluate import DETAILS_SCHEMA, run_evaluate

    storage = Storage(str(tmp_path / "store"))
    make_tiny_store(storage)
    job = JobConfig.model_validate({"name": "ev", "storage": {"url": storage.root_url},
                                    "train": {"head": {"hidden": 16}},
                                    "evaluate": {"batch_size": 3}})
    publish_checkpoint(storage, job)
    info = storage.read_json("runs/ev/train.json")
    log = [{"step": s, "epoch": 0, "loss": 2.0 / s, "loss.videomae": 1.0 / s, "lr": 1e-3}
           for s in (1, 2, 3)]
    storage.write_bytes("runs/ev/train/metrics.jsonl",
                        "\n".join(json.dumps(r) for r in log).encode())
    storage.write_json("runs/ev/train.json", {**info, "metrics_log": "runs/ev/train/metrics.jsonl"})
    summary = run_evaluate(job, storage)

    metrics = storage.read_json("runs/ev/eval/metrics.json")
    details = json.loads(storage.read_bytes("runs/ev/eval/details.json"))
    assert metrics["details"] == {"uri": storage.url("runs/ev/eval/details.json"),
                                  "schema": DETAILS_SCHEMA}
    assert details["schema"] == DETAILS_SCHEMA and details["clips"] == metrics["clips"] == 8
    # the store's val clips, in order
    assert details["video_ids"] == [f"v{i:04d}" for i in range(24, 32)]
    for t, spec in TEACHERS.items():
        d = details["targets"][t]
        assert len(d["per_clip_cosine"]) == 8 and len(d["per_token_cosine"]) == spec.tokens
        assert np.mean(d["per_clip_cosine"]) == pytest.approx(metrics["targets"][t]["cosine"],
                                                              abs=1e-5)
        assert "per_clip_cosine" not in metrics["targets"][t]
    assert details["head"]["class_names"] == CLASS_NAMES
    assert sum(map(sum, details["head"]["confusion"])) == metrics["labelled_clips"]
    c = metrics["converter"]
    assert c["latency_device"] == "cpu"
    assert c["latency_ms_per_clip_cpu"] == c["latency_ms_per_clip"] > 0
    report = storage.read_bytes("runs/ev/eval/report.html").decode()
    assert summary["report_url"] == storage.url("runs/ev/eval/report.html")
    assert 'alt="training curves"' in report and "3 step records" in report


def test_store_meta_keeps_measured_latency_while_models_are_the_same(tmp_path):
    """What the model actor records survives a re-run's write_meta with the same models, and goes
    with other models (a stale figure would be invented cost)."""
    from tiny_features import SPECS

    store = make_tiny_store(Storage(str(tmp_path)))
    store.record_backbone_latency({"student": 2.0, "vivit": 1.0}, "cpu", 4)

    def rewrite(**extra):
        return store.write_meta(specs=SPECS, dtype="float16", class_names=CLASS_NAMES,
                                extra=extra)
    assert rewrite()["backbone_latency_ms"] == {"student": 2.0, "vivit": 1.0}
    meta = store.read_meta(fresh=True)
    assert meta["backbone_device"] == "cpu" and meta["backbone_latency_batch"] == 4
    assert "backbone_latency_ms" not in rewrite(weights="random")


def _floor_job(url: str, evaluate: dict | None = None, **train):
    from pipeline.config import JobConfig
    return JobConfig.model_validate({
        "name": "fl", "model_name": "fm", "storage": {"url": url},
        "train": {"converter": "tokenlearner_small",
                  "converter_kwargs": {"dim": 32, "num_tokens": 8, "select_hidden": 32,
                                       "heads": 2},
                  "epochs": 1, "batch_size": 4, "num_workers": 2, "cpus_per_worker": 0.5,
                  "optim": {"lr": 0.02, "warmup_steps": 1}, "head": {"hidden": 16},
                  "shuffle_window": 8, **train},
        "evaluate": {"batch_size": 4, **(evaluate or {})}})


@pytest.mark.integration
def test_floor_trained_once_reused_retrained_for_another_budget_and_off(ray_cluster, tmp_path):
    """evaluate.floor=auto trains baseline_interp_linear with the job's budget on Ray Train under
    runs/<job>/floor/, scores it on the same split (metrics.json "floor" == its own metrics.json,
    shown in the report's floor column); a re-run reuses it; another budget trains a new run; a
    setting of how runs execute does not; off skips it."""
    from browser import lookup, parse_dom
    from tiny_features import publish_checkpoint

    from pipeline.evaluate import floor_to_train, run_evaluate
    from pipeline.fmt import FORMATTERS

    storage = Storage(str(tmp_path))
    make_tiny_store(storage)
    job = _floor_job(storage.root_url)
    publish_checkpoint(storage, job)  # the model under evaluation (its own training is not tested)

    def floor_runs():
        return sorted(n for n in storage.ls("runs/fl/floor/train") if n.startswith("floor-"))

    assert floor_to_train(job, storage)
    run_evaluate(job, storage)
    m = storage.read_json("runs/fl/eval/metrics.json")
    f, own = m["floor"], storage.read_json("runs/fl/floor/eval/metrics.json")
    assert f["trained_now"] and floor_runs() == ["floor-000"]
    assert f["converter"]["name"] == own["converter"]["name"] == "baseline_interp_linear"
    for k in ("mean_cosine", "mean_r2", "mean_mse", "top1", "top5", "targets", "checkpoint",
              "clips"):
        assert f[k] == own[k], k
    assert f["clips"] == m["clips"] == 8  # the same split
    assert f["checkpoint"].startswith(storage.url("runs/fl/floor/train/floor-000"))
    sig = storage.read_json("runs/fl/floor/train/floor-000/run.json")
    assert sig["signature"]["converter"] == "baseline_interp_linear"
    assert sig["signature"]["converter_kwargs"] == {} and sig["warm_start"] is None
    for k in ("epochs", "batch_size", "optim", "seed", "head"):  # the job's budget
        assert sig["signature"][k] == json.loads(job.train.model_dump_json())[k], k
    page = parse_dom(storage.read_bytes("runs/fl/eval/report.html").decode())
    shown = {n["attrs"]["data-metric"]: n for n in page.numbers
             if n["attrs"].get("data-source") == "floor"}
    assert {"mean_cosine", "targets.videomae.cosine", "converter.params"} <= set(shown)
    for key, n in shown.items():
        assert n["text"] == FORMATTERS[n["attrs"]["data-fmt"]](lookup(f, key)), key

    assert not floor_to_train(job, storage)
    run_evaluate(job, storage)  # a re-run: the finished floor is reused, scored again
    f2 = storage.read_json("runs/fl/eval/metrics.json")["floor"]
    assert not f2["trained_now"] and floor_runs() == ["floor-000"]
    assert {k: f2[k] for k in ("mean_cosine", "targets")} == {k: f[k] for k in ("mean_cosine",
                                                                                 "targets")}
    assert not floor_to_train(_floor_job(storage.root_url, log_every_steps=1), storage)

    longer = _floor_job(storage.root_url, epochs=2)  # another budget: another floor
    assert floor_to_train(longer, storage)
    run_evaluate(longer, storage)
    f3 = storage.read_json("runs/fl/eval/metrics.json")["floor"]
    assert f3["trained_now"] and floor_runs() == ["floor-000", "floor-001"]

    off = _floor_job(storage.root_url, {"floor": "off"})
    assert not floor_to_train(off, storage)
    run_evaluate(off, storage)
    assert storage.read_json("runs/fl/eval/metrics.json")["floor"] == {
        "skipped": "evaluate.floor is off"}
    assert floor_runs() == ["floor-000", "floor-001"]
    assert "no floor column: evaluate.floor is off" in parse_dom(
        storage.read_bytes("runs/fl/eval/report.html").decode()).text
