"""Train stage: model assembly (unit) and a real 2-worker DDP run on a local Ray cluster against a
real S3 endpoint (integration): loss decreases, an injected failure restarts from the last
checkpoint, the checkpoint restores, evaluate/export follow, and a re-run warm-starts from `latest`."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import JobConfig
from pipeline.storage import Storage
from pipeline.train import build_models, load_trained, run_train
from tiny_features import CLASS_NAMES, SPECS, STUDENT, TEACHERS, make_tiny_store


def _job(url: str, options: dict, **train) -> JobConfig:
    return JobConfig.model_validate({
        "name": "tt", "storage": {"url": url, "options": options},
        "train": {"epochs": 3, "batch_size": 4, "num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 1,
                  "optim": {"lr": 0.02, "warmup_steps": 2}, "head": {"hidden": 16}, **train},
        "evaluate": {"batch_size": 4, "report_html": False},
        "export": {"model_name": "tc", "version": "v1"}})


def test_build_models_for_store_layouts():
    job = _job("unused", {}, deficiency={"rank": 4, "mask_ratio": 0.25})
    conv, head = build_models(job.train, SPECS, len(CLASS_NAMES))
    assert set(conv.targets) == set(TEACHERS) and conv.rank == 4 and conv.mask_ratio == 0.25
    x = torch.randn(2, STUDENT.tokens, STUDENT.dim)
    out = conv.eval().forward_all(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, s.tokens, s.dim) for k, s in TEACHERS.items()}
    assert head(x, out).shape == (2, len(CLASS_NAMES))
    assert "nuclear" in conv.regularisers()
    with pytest.raises(ValueError, match="head"):
        build_models(job.train, SPECS, 0)
    no_head = job.train.model_copy(update={"head": job.train.head.model_copy(update={"enabled": False})})
    assert build_models(no_head, SPECS, 0)[1] is None


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=150 * 1024 * 1024, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.mark.integration
def test_train_restart_evaluate_export_warm_start_on_s3(ray_cluster, s3_server, monkeypatch):
    from pipeline.evaluate import run_evaluate
    from pipeline.export import download_model, run_export
    from tokconv.io import load_converter

    bucket = s3_server.make_bucket("train")
    storage = Storage(f"s3://{bucket}/p", s3_server.storage_options)
    make_tiny_store(storage)
    job = _job(storage.root_url, s3_server.storage_options)

    monkeypatch.setenv("TOKCONV_FAIL_AFTER_EPOCH", "1")  # rank 0 dies once after the epoch-1 checkpoint
    s = run_train(job, storage)
    monkeypatch.delenv("TOKCONV_FAIL_AFTER_EPOCH")
    m = s["metrics"]
    assert m["epoch"] == 3 and m["resumed_from_epoch"] == 1
    hist = m["loss_history"]
    assert len(hist) == 3 and hist[-1] < 0.8 * hist[0], hist
    assert s["checkpoint"].startswith(f"s3://{bucket}/p/runs/tt/train-")
    assert storage.read_json("runs/tt/train.json")["checkpoint_rel"] == s["checkpoint_rel"]

    # the checkpoint restores: tokconv.io files hold exactly the weights of the final train state
    with tempfile.TemporaryDirectory() as d:
        conv, head, info = load_trained(job, storage, d)
        state = torch.load(os.path.join(d, "train_state.pt"), weights_only=False)
        assert state["epoch"] == 3
        for k, v in conv.state_dict().items():
            assert torch.equal(v, state["model"][f"converter.{k}"]), k
        for k, v in head.state_dict().items():
            assert torch.equal(v, state["model"][f"head.{k}"]), k

    ev = run_evaluate(job, storage)
    assert ev["clips"] == 8 and ev["mean_cosine"] > 0.5  # learnable teachers: well above chance
    ex = run_export(job, storage)
    assert ex["promoted"] and ex["uri"] == f"s3://{bucket}/p/models/tc/v1"
    with tempfile.TemporaryDirectory() as d:
        download_model(storage, "tc", "latest", d)
        ref = load_file(os.path.join(d, "reference_io.safetensors"))
        with torch.no_grad():
            out = load_converter(d).eval().forward_all(ref["student"])
        for t in TEACHERS:
            assert torch.equal(out[t], ref[f"out.{t}"]), t

    # a re-run warm-starts from `latest` (same converter/head config): its first epoch beats the cold one
    job2 = _job(storage.root_url, s3_server.storage_options, epochs=1, num_workers=1, cpus_per_worker=1.0)
    s2 = run_train(job2, storage)
    assert s2["warm_start"] == "v1"
    assert s2["metrics"]["loss_history"][0] < hist[0]
    assert s2["checkpoint_rel"] != s["checkpoint_rel"]
