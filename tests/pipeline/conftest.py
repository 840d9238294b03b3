"""The smoke run shared by the tests that read its outputs (one per session, so CI pays once):

  ``smoke_run`` -> SmokeRun: ``jobs/smoke.yaml`` through the CLI (``python -m pipeline run``'s
      ``main``) with videos and storage in a bucket of the real S3 endpoint (moto server), 2
      epochs; ``.storage``, ``.job`` (the validated job), ``.overrides`` (the CLI's), ``.stages``
      (runs/<job>/summary.json's per-stage summaries), ``.output`` (what it printed).
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import pytest

SMOKE = Path(__file__).parents[2] / "jobs" / "smoke.yaml"


@dataclass
class SmokeRun:
    storage: object
    job: object
    overrides: list[str]
    stages: dict
    output: str


@pytest.fixture(scope="session")
def smoke_run(s3_server, sample_videos) -> SmokeRun:
    from pipeline.__main__ import main
    from pipeline.config import load_job
    from pipeline.storage import Storage

    bucket = s3_server.make_bucket("smoke")
    s3_server.upload(sample_videos, f"s3://{bucket}/videos")
    opts = s3_server.storage_options
    flow = "{" + ", ".join(f"{k}: '{v}'" for k, v in opts.items()) + "}"
    overrides = [f"storage.url=s3://{bucket}/smoke", f"storage.options={flow}",
                 f"sources.uri=s3://{bucket}/videos", f"sources.storage_options={flow}",
                 "train.epochs=2"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["run", str(SMOKE), *overrides])
    assert rc == 0, out.getvalue()[-5000:]
    job = load_job(SMOKE, overrides)
    storage = Storage(job.storage.url, job.storage.options)
    summary = storage.read_json(f"runs/{job.name}/summary.json")
    return SmokeRun(storage, job, overrides, summary["stages"], out.getvalue())
