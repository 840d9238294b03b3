"""Export stage: versioned layout, promotion only when better, s3 (moto server), bit-exact reload.

The "trained" model here is a real converter + head saved in tokconv.io format as a checkpoint
(no Ray needed); evaluate runs for real on a tiny real feature store.
"""
from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
from safetensors.torch import load_file
from tiny_features import SPECS, make_tiny_store, publish_checkpoint

from pipeline.artifacts import ModelRegistry
from pipeline.config import JobConfig
from pipeline.evaluate import run_evaluate
from pipeline.export import is_better, metric_value, run_export
from pipeline.storage import Storage

EXPECTED_FILES = {"model.safetensors", "config.json", "head.safetensors", "head.json",
                  "metrics.json", "README.md", "standardization.safetensors",
                  "reference_io.safetensors", "_published.json"}


def _job(url: str, options: dict | None = None, **export) -> JobConfig:
    return JobConfig.model_validate({
        "name": "exp", "model_name": "tc", "storage": {"url": url, "options": options or {}},
        "train": {"head": {"hidden": 16}},
        "evaluate": {"batch_size": 4, "report_html": True},
        "export": export})


def _trained_and_evaluated(storage: Storage, job: JobConfig, seed: int = 0) -> None:
    """A real (untrained) converter + head as the run's checkpoint, then a real evaluation."""
    publish_checkpoint(storage, job, seed)
    run_evaluate(job, storage)


def _set_metric(storage: Storage, job: JobConfig, key: str, value: float) -> None:
    rel = f"runs/{job.name}/eval/metrics.json"
    m = storage.read_json(rel)
    m[key] = value
    storage.write_json(rel, m)


def _check_reproduces(storage: Storage, name: str, version: str = "latest") -> dict:
    from tokconv.io import load_converter, load_head
    with tempfile.TemporaryDirectory() as d:
        ModelRegistry(storage, name).download(version, d)
        assert EXPECTED_FILES <= set(os.listdir(d))
        conv, head = load_converter(d).eval(), load_head(d).eval()
        ref = load_file(os.path.join(d, "reference_io.safetensors"))
        with torch.no_grad():
            out = conv.forward_all(ref["student"])
            logits = head(ref["student"], out)
        for t in SPECS:
            if t != "student":
                assert torch.equal(out[t], ref[f"out.{t}"]), f"{t}: not the evaluated output"
        assert torch.equal(logits, ref["logits"])
        return json.loads(open(os.path.join(d, "metrics.json")).read())


def test_metric_value_and_is_better():
    m = {"mean_cosine": 0.5, "targets": {"vivit": {"r2": 0.25}}, "top1": None}
    assert metric_value(m, "targets.vivit.r2") == 0.25
    with pytest.raises(KeyError, match="targets.videomae.r2"):
        metric_value(m, "targets.videomae.r2")
    with pytest.raises(TypeError, match="top1"):
        metric_value(m, "top1")
    assert is_better(0.1, None, True) and is_better(0.2, 0.1, True)
    assert not is_better(0.1, 0.1, True)
    assert is_better(0.1, 0.2, False) and not is_better(0.3, 0.2, False)


def test_export_layout_promotion_and_reload(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    job = _job(storage.root_url, version="v1")
    make_tiny_store(storage)
    _trained_and_evaluated(storage, job)
    real = storage.read_json("runs/exp/eval/metrics.json")
    assert -1.0 <= real["mean_cosine"] <= 1.0 and real["clips"] == 8
    report = storage.read_bytes("runs/exp/eval/report.html").decode()
    assert report.count("<img") == 7  # 2 bar charts, histogram, 2 heat maps, confusion, per-class
    assert all(f"<td>{t}</td>" in report for t in SPECS if t != "student")

    _set_metric(storage, job, "mean_cosine", 0.5)
    s1 = run_export(job, storage)
    assert s1["promoted"] and s1["previous"] is None and s1["version"] == "v1"
    assert s1["uri"] == storage.url("models", "tc", "v1")
    assert set(storage.ls("models/tc")) == {"v1", "latest.json"}
    assert set(storage.ls("models/tc/v1")) == EXPECTED_FILES
    card = storage.read_bytes("models/tc/v1/README.md").decode()
    assert "mean_cosine" in card
    assert f"[report.html]({storage.url('runs/exp/eval/report.html')})" in card
    assert "| mean cosine | 0.5000 |" in card  # model_card_summary's figures, pipeline.fmt's format
    assert "**Promotion:** decided by the export stage" in card

    def decision():  # the report as export re-rendered it
        from browser import parse_dom
        page = storage.read_bytes("runs/exp/eval/report.html").decode()
        return parse_dom(page).text
    assert "Promotion: promoted: v1 is latest" in decision()
    assert "first version of the model (mean_cosine 0.5000)" in decision()

    with pytest.raises(FileExistsError, match="v1"):  # versions are immutable
        run_export(job, storage)

    _set_metric(storage, job, "mean_cosine", 0.4)  # worse: published, latest stays
    job.export.version = "v2"
    s2 = run_export(job, storage)
    assert not s2["promoted"] and s2["previous"]["version"] == "v1"
    assert "Promotion: not promoted: v2 published, latest stays v1" in decision()
    assert storage.read_json("models/tc/latest.json")["version"] == "v1"
    assert storage.exists("models/tc/v2/model.safetensors")

    _set_metric(storage, job, "mean_cosine", 0.6)  # better: latest moves
    job.export.version = None  # UTC timestamp
    s3 = run_export(job, storage)
    assert s3["promoted"] and s3["version"].endswith("Z")
    latest = storage.read_json("models/tc/latest.json")
    assert latest["version"] == s3["version"] and latest["value"] == 0.6
    assert latest["metric"] == "mean_cosine"
    assert _check_reproduces(storage, "tc")["mean_cosine"] == 0.6
    assert _check_reproduces(storage, "tc", "v2")["mean_cosine"] == 0.4


def test_lower_is_better_metric(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    job = _job(storage.root_url, version="a", metric="mean_mse", higher_is_better=False)
    make_tiny_store(storage)
    _trained_and_evaluated(storage, job)
    _set_metric(storage, job, "mean_mse", 2.0)
    assert run_export(job, storage)["promoted"]
    _set_metric(storage, job, "mean_mse", 3.0)
    job.export.version = "b"
    assert not run_export(job, storage)["promoted"]
    _set_metric(storage, job, "mean_mse", 1.0)
    job.export.version = "c"
    assert run_export(job, storage)["promoted"]
    assert storage.read_json("models/tc/latest.json")["version"] == "c"


def test_export_compares_with_latest_rescored_on_this_split(tmp_path):
    """evaluate re-scores the current `latest` on the same split; export compares against that."""
    storage = Storage(str(tmp_path / "store"))
    job = _job(storage.root_url, version="v1")
    make_tiny_store(storage)
    _trained_and_evaluated(storage, job, seed=1)
    assert "latest" not in storage.read_json("runs/exp/eval/metrics.json")
    assert run_export(job, storage)["promoted"]
    storage.write_json("models/tc/latest.json",
                       {**storage.read_json("models/tc/latest.json"), "value": -1.0})
    _trained_and_evaluated(storage, job, seed=1)  # the same model again
    m = storage.read_json("runs/exp/eval/metrics.json")
    assert m["latest"]["version"] == "v1"
    assert m["latest"]["mean_cosine"] == pytest.approx(m["mean_cosine"], abs=1e-5)
    assert m["latest"]["top1"] == m["top1"]
    job.export.version = "v2"
    s = run_export(job, storage)  # a tie on today's split (the stale recorded -1.0 is not used)
    assert s["compared_on"] == "this evaluation's split"
    assert s["previous_value"] == pytest.approx(m["mean_cosine"], abs=1e-5)
    assert s["promoted"] is (m["mean_cosine"] > s["previous_value"])
    # another model: promoted only if it beats v1 today
    _trained_and_evaluated(storage, job, seed=2)
    m2 = storage.read_json("runs/exp/eval/metrics.json")
    job.export.version = "v3"
    s3 = run_export(job, storage)
    assert s3["promoted"] == (m2["mean_cosine"] > m2["latest"]["mean_cosine"])


@pytest.mark.integration
def test_export_to_s3_and_reload(s3_server, tmp_path):
    bucket = s3_server.make_bucket("export")
    storage = Storage(f"s3://{bucket}/proj", s3_server.storage_options)
    job = _job(storage.root_url, s3_server.storage_options, version="v1", torchscript=True)
    make_tiny_store(storage)
    _trained_and_evaluated(storage, job)
    s = run_export(job, storage)
    assert s["promoted"] and s["uri"] == f"s3://{bucket}/proj/models/tc/v1"
    assert s["torchscript_error"] is None
    names = {p.rsplit("/", 1)[-1] for p in s3_server.fs().ls(f"{bucket}/proj/models/tc/v1")}
    assert names == EXPECTED_FILES | {"converter.torchscript.pt"}
    _check_reproduces(storage, "tc")
    # the TorchScript module gives the same outputs as the eager model
    with tempfile.TemporaryDirectory() as d:
        ModelRegistry(storage, "tc").download("v1", d)
        ts = torch.jit.load(os.path.join(d, "converter.torchscript.pt"))
        ref = load_file(os.path.join(d, "reference_io.safetensors"))
        out = ts(ref["student"])
        for t in ("videomae", "timesformer", "vivit"):
            torch.testing.assert_close(out[t], ref[f"out.{t}"], rtol=1e-5, atol=1e-6)
