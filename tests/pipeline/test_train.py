"""Train stage: model assembly and warm-start choice (unit), and a real 2-worker DDP run on a local
Ray cluster against a real S3 endpoint (integration): warm start, loss decreases, an injected
failure restarts from the last checkpoint, the checkpoint restores, evaluate/export follow."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
from safetensors.torch import load_file
from tiny_features import CLASS_NAMES, SPECS, STUDENT, TEACHERS, make_tiny_store, publish_checkpoint

from pipeline.artifacts import ModelRegistry, job_run_dir, load_trained
from pipeline.config import JobConfig
from pipeline.storage import Storage
from pipeline.train import build_models, run_train


def _job(url: str, options: dict, **train) -> JobConfig:
    return JobConfig.model_validate({
        "name": "tt", "model_name": "tc", "storage": {"url": url, "options": options},
        "train": {"epochs": 3, "batch_size": 4, "num_workers": 2, "cpus_per_worker": 0.5,
                  "max_failures": 1, "optim": {"lr": 0.02, "warmup_steps": 2},
                  "head": {"hidden": 16}, **train},
        "evaluate": {"batch_size": 4, "report_html": False},
        "export": {"version": "v1"}})


def test_build_models_for_store_layouts():
    job = _job("unused", {}, deficiency={"rank": 4, "mask_ratio": 0.25})
    conv, head = build_models(job.train, SPECS, len(CLASS_NAMES))
    assert set(conv.targets) == set(TEACHERS) and conv.rank == 4 and conv.mask_ratio == 0.25
    x = torch.randn(2, STUDENT.tokens, STUDENT.dim)
    out = conv.eval().forward_all(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == \
        {k: (2, s.tokens, s.dim) for k, s in TEACHERS.items()}
    assert head(x, out).shape == (2, len(CLASS_NAMES))
    assert "nuclear" in conv.regularisers()
    with pytest.raises(ValueError, match="head"):
        build_models(job.train, SPECS, 0)
    no_head = job.train.model_copy(
        update={"head": job.train.head.model_copy(update={"enabled": False})})
    assert build_models(no_head, SPECS, 0)[1] is None


def test_train_module_regularisers_and_jacobian_backprop():
    """The DDP-wrapped module: one forward gives outputs, logits, deficiency terms and the Jacobian
    penalty, and a backward reaches every parameter."""
    from pipeline.train import _TrainModule
    job = _job("unused", {}, deficiency={"rank": 4, "w_nuclear": 0.1, "w_jacobian": 0.1})
    conv, head = build_models(job.train, SPECS, len(CLASS_NAMES))
    module = _TrainModule(converter=conv, head=head).train()
    out, logits, regs, jac = module(torch.randn(2, STUDENT.tokens, STUDENT.dim), with_jacobian=True)
    assert set(out) == set(TEACHERS) and logits.shape == (2, len(CLASS_NAMES))
    assert regs["nuclear"].item() > 0 and jac.item() > 0
    (sum(o.square().mean() for o in out.values()) + logits.sum() + regs["nuclear"] + jac).backward()
    assert all(p.grad is not None for p in module.parameters())


def test_warm_start_needs_a_matching_latest(tmp_path):
    """The driver picks `latest` for a warm start only when converter and head configs match."""
    from pipeline.evaluate import run_evaluate
    from pipeline.export import run_export
    from pipeline.train import _warm_start_version

    storage = Storage(str(tmp_path))
    make_tiny_store(storage)
    job = _job(storage.root_url, {})
    registry = ModelRegistry(storage, job.model_name)
    conv, head = build_models(job.train, SPECS, len(CLASS_NAMES))
    assert _warm_start_version(registry, conv, head) is None  # nothing exported yet
    publish_checkpoint(storage, job, seed=1)
    run_evaluate(job, storage)
    run_export(job, storage)
    assert _warm_start_version(registry, conv, head) == "v1"
    other = _job(storage.root_url, {}, deficiency={"rank": 4})
    assert _warm_start_version(registry, *build_models(other.train, SPECS, 3)) is None
    wider = _job(storage.root_url, {}, head={"hidden": 32})
    assert _warm_start_version(registry, *build_models(wider.train, SPECS, 3)) is None


@pytest.mark.integration
def test_train_on_s3_restart_evaluate_export(ray_cluster, s3_server, monkeypatch):
    """One real 2-worker DDP run (gloo) against the moto S3 endpoint: warm start from an exported
    v0, an injected failure after epoch 1 resumes from that checkpoint, the loss falls, the final
    checkpoint restores, and evaluate + export promote v1 over v0 and reload it bit for bit."""
    from pipeline.evaluate import run_evaluate
    from pipeline.export import run_export
    from tokconv.io import load_converter

    bucket = s3_server.make_bucket("train")
    storage = Storage(f"s3://{bucket}/p", s3_server.storage_options)
    make_tiny_store(storage)
    v0 = _job(storage.root_url, s3_server.storage_options)
    v0.export.version = "v0"
    publish_checkpoint(storage, v0, seed=1)  # an untrained model as the current `latest`
    run_evaluate(v0, storage)
    assert run_export(v0, storage)["promoted"]

    job = _job(storage.root_url, s3_server.storage_options, epochs=2, batch_size=2)
    # rank 0 dies once after the epoch-1 checkpoint
    monkeypatch.setenv("TOKCONV_FAIL_AFTER_EPOCH", "1")
    s = run_train(job, storage)
    monkeypatch.delenv("TOKCONV_FAIL_AFTER_EPOCH")
    m = s["metrics"]
    assert s["warm_start"] == "v0" and m["warm_started_from"] == "v0"
    assert m["epoch"] == 2 and m["resumed_from_epoch"] == 1
    hist = m["loss_history"]
    assert len(hist) == 2 and hist[-1] < 0.8 * hist[0], hist
    assert s["checkpoint"].startswith(f"s3://{bucket}/p/runs/tt/train-")
    assert storage.read_json("runs/tt/train.json")["checkpoint_rel"] == s["checkpoint_rel"]

    # the checkpoint restores: tokconv.io files hold exactly the weights of the final train state
    with tempfile.TemporaryDirectory() as d:
        conv, head, _ = load_trained(storage, job_run_dir(job.name), d)
        state = torch.load(os.path.join(d, "train_state.pt"), weights_only=False)
        # 24 clips / (2 workers x 2) per epoch
        assert state["epoch"] == 2 and state["step"] == 2 * 6
        for k, v in conv.state_dict().items():
            assert torch.equal(v, state["model"][f"converter.{k}"]), k
        for k, v in head.state_dict().items():
            assert torch.equal(v, state["model"][f"head.{k}"]), k

    ev = run_evaluate(job, storage)
    v0_cos = storage.read_json("models/tc/latest.json")["value"]
    # learnable teachers: far above v0
    assert ev["clips"] == 8 and ev["mean_cosine"] > v0_cos + 0.25
    ex = run_export(job, storage)
    assert ex["promoted"] and ex["previous"]["version"] == "v0"
    assert ex["uri"] == f"s3://{bucket}/p/models/tc/v1"
    with tempfile.TemporaryDirectory() as d:
        ModelRegistry(storage, "tc").download("latest", d)
        ref = load_file(os.path.join(d, "reference_io.safetensors"))
        with torch.no_grad():
            out = load_converter(d).eval().forward_all(ref["student"])
        for t in TEACHERS:
            assert torch.equal(out[t], ref[f"out.{t}"]), t
