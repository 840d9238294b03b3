"""The smoke job end to end on a real local Ray cluster, with videos and storage on a real S3
endpoint (moto's server on 127.0.0.1); then a consumer downloads the exported model from the
bucket and reproduces the evaluated outputs bit for bit."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from pipeline.__main__ import run_job
from pipeline.artifacts import ModelRegistry
from pipeline.config import load_job
from pipeline.storage import Storage
from tokconv.heads import ResidualHead  # noqa: F401  (the consumer-side API under test)
from tokconv.io import load_converter, load_head

SMOKE = Path(__file__).parents[2] / "jobs" / "smoke.yaml"
pytestmark = pytest.mark.integration


def test_smoke_job_on_s3_and_reload_from_bucket(s3_server, sample_videos, tmp_path):
    bucket = s3_server.make_bucket("smoke")
    s3_server.upload(sample_videos, f"s3://{bucket}/videos")
    opts = s3_server.storage_options
    flow = "{" + ", ".join(f"{k}: '{v}'" for k, v in opts.items()) + "}"
    job = load_job(SMOKE, [f"storage.url=s3://{bucket}/smoke", f"storage.options={flow}",
                           f"sources.uri=s3://{bucket}/videos", f"sources.storage_options={flow}",
                           "train.epochs=2"])
    results = run_job(job)

    assert list(results) == ["extract", "train", "evaluate", "export"]
    ext = results["extract"]
    assert ext["listed"] == 4 and ext["processed"] + ext["failed"] == ext["listed"]
    assert ext["failed"] == 0
    ev = results["evaluate"]
    assert ev["clips"] >= 1 and -1.0 <= ev["mean_cosine"] <= 1.0
    exp = results["export"]
    assert exp["promoted"] is True and exp["uri"].startswith(f"s3://{bucket}/smoke/models/")

    # A consumer with only the bucket: download, load with tokconv alone, reproduce.
    storage = Storage(f"s3://{bucket}/smoke", opts)
    local = ModelRegistry(storage, job.model_name).download("latest", str(tmp_path / "model"))
    converter, head = load_converter(local), load_head(local)
    metrics = storage.read_json(f"runs/{job.name}/eval/metrics.json")
    sample = load(storage.read_bytes(f"runs/{job.name}/eval/sample.safetensors"))
    with torch.no_grad():
        outs = converter.forward_all(sample["student"])
        logits = head(sample["student"], outs)
    for target, out in outs.items():
        assert torch.equal(out, sample[f"out.{target}"]), target
    assert torch.equal(logits, sample["logits"])
    assert set(outs) == {"videomae", "timesformer", "vivit"}
    assert metrics["targets"].keys() == outs.keys()
    assert s3_server.fs().exists(f"{bucket}/smoke/runs/{job.name}/summary.json")
