"""Storage faults (issue 20 item 3) on a real moto S3 endpoint through the tests' fault proxy
(tests/fault_proxy.py, 127.0.0.1): transient faults (500/503, reset connections, slow answers,
bounded in count and time) survived through botocore's retries as ``storage.options`` configures
them, and a permanent failure (the endpoint goes down mid-stage) that fails the stage in one line
naming the endpoint URL and the cause, leaves no model version visible, and a re-run completes."""
from __future__ import annotations

import os
import tempfile

import pytest
from fault_proxy import FaultProxy, Rule
from tiny_features import make_tiny_store, publish_checkpoint

from pipeline.__main__ import error_line
from pipeline.artifacts import PUBLISHED, ModelRegistry
from pipeline.config import JobConfig
from pipeline.evaluate import run_evaluate
from pipeline.export import run_export
from pipeline.storage import Storage

pytestmark = pytest.mark.integration

# what a job sets for a flaky store: botocore's standard mode (5xx, throttling and connection
# errors retried with exponential backoff), short timeouts so a slow answer is retried too
RETRIES = {"retries": {"max_attempts": 8, "mode": "standard"}, "connect_timeout": 2,
           "read_timeout": 5}


def _job(url: str, options: dict, version: str) -> JobConfig:
    return JobConfig.model_validate({
        "name": "sf", "model_name": "tc", "storage": {"url": url, "options": options},
        "train": {"head": {"hidden": 16}},
        "evaluate": {"batch_size": 4, "report_html": False},
        "export": {"version": version}})


def _evaluated(s3_server, bucket: str) -> None:
    """A tiny store, an (untrained) checkpoint and its evaluation, written straight to moto."""
    storage = Storage(f"s3://{bucket}/p", s3_server.storage_options)
    job = _job(storage.root_url, s3_server.storage_options, "v1")
    make_tiny_store(storage)
    publish_checkpoint(storage, job, seed=0)
    run_evaluate(job, storage)


def _through(proxy: FaultProxy, s3_server, retries: bool = True) -> dict:
    opts = {**s3_server.storage_options, "endpoint_url": proxy.endpoint_url}
    return {**opts, "config_kwargs": RETRIES} if retries else opts


def test_export_survives_transient_faults_with_one_version(s3_server):
    """Every request of the export stage under models/ (uploads, the marker, latest.json, the
    reads) meets 500, 503, resets after moto did the work, and slow answers: the stage completes
    through retries, the version is published once with every file whole and promoted."""
    bucket = s3_server.make_bucket("sfx")
    _evaluated(s3_server, bucket)
    rules = [Rule(r"^PUT .*/models/", share=0.5, count=8, within_s=60, delay_s=6.0),
             Rule(r"^(GET|HEAD) .*/models/", share=0.4, count=4, within_s=60,
                  kinds=("503", "reset", "500", "delay"), delay_s=6.0)]
    with FaultProxy(s3_server.endpoint_url, rules, seed=3) as proxy:
        storage = Storage(f"s3://{bucket}/p", _through(proxy, s3_server))
        out = run_export(_job(storage.root_url, storage.options, "v1"), storage)
        kinds = {k for _, k, _, _ in proxy.injected()}
    assert kinds == {"500", "503", "reset", "delay"}, proxy.injected()
    assert out["promoted"] and out["version"] == "v1"
    direct = Storage(f"s3://{bucket}/p", s3_server.storage_options)
    reg = ModelRegistry(direct, "tc")
    assert direct.ls("models/tc") == ["latest.json", "v1"]  # one version, nothing else
    assert reg.latest()["version"] == "v1"
    marker = reg.read_json("v1", PUBLISHED)
    with tempfile.TemporaryDirectory() as d:
        reg.download("v1", d)
        assert {f: os.path.getsize(os.path.join(d, f)) for f in marker["files"]} == \
            marker["files"]
        assert reg.load("v1").version == "v1"


def test_endpoint_down_mid_export_fails_in_one_line_and_a_rerun_completes(s3_server):
    """The endpoint goes down after the third upload of the version: export fails naming the
    endpoint URL and the cause in one line; the version is not published (not downloadable,
    latest.json not written); with the endpoint back, the same job completes it."""
    bucket = s3_server.make_bucket("sfd")
    _evaluated(s3_server, bucket)
    with FaultProxy(s3_server.endpoint_url) as proxy:
        storage = Storage(f"s3://{bucket}/p", _through(proxy, s3_server))
        job = _job(storage.root_url, storage.options, "v1")
        proxy.down_after(r"^PUT .*/models/tc/v1/", 3)
        with pytest.raises(Exception) as err:
            run_export(job, storage)
        line = error_line(err.value)
        assert "\n" not in line and proxy.endpoint_url in line, line
        assert "connect" in line.lower(), line

        direct = Storage(f"s3://{bucket}/p", s3_server.storage_options)
        reg = ModelRegistry(direct, "tc")
        assert reg.exists("v1") and not reg.is_published("v1") and reg.latest() is None
        with pytest.raises(FileNotFoundError, match="incomplete"):
            reg.download("v1")

        proxy.start()  # the fault clears: the same job, the same version
        storage = Storage(f"s3://{bucket}/p", _through(proxy, s3_server))
        out = run_export(_job(storage.root_url, storage.options, "v1"), storage)
    assert out["promoted"] and reg.is_published("v1") and reg.latest()["version"] == "v1"
    assert reg.load("v1").version == "v1"
