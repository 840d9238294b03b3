"""The outside world is checked first thing in a job, before Ray starts (pipeline.checks.preflight),
against a real S3 endpoint (moto server) and a closed 127.0.0.1 port; a failed job prints one
line and its summary.json says which stage failed; credentials never reach summary.json."""
from __future__ import annotations

import json
import socket

import pytest
import ray
from tiny_features import make_tiny_store, publish_checkpoint

from pipeline.__main__ import error_line, main
from pipeline.checks import PreflightError, preflight
from pipeline.config import load_job
from pipeline.storage import MASK, Storage

SMOKE = "jobs/smoke.yaml"
pytestmark = pytest.mark.integration


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def _problems(overrides: list[str], stages=("extract",)) -> list[str]:
    with pytest.raises(PreflightError) as err:
        preflight(load_job(SMOKE, overrides), list(stages))
    return err.value.problems


def _s3(url: str, options: dict, key: str = "storage") -> list[str]:
    opt_key = "storage.options" if key == "storage" else f"{key}.storage_options"
    url_key = "storage.url" if key == "storage" else "sources.uri"
    return [f"{url_key}={url}", f"{opt_key}={json.dumps(options)}"]


def test_a_missing_bucket_is_named_and_not_created(s3_server):
    opts = s3_server.storage_options
    assert _problems(_s3("s3://no-such-bucket-pf/runs", opts)) == [
        (f"storage.url s3://no-such-bucket-pf/runs: bucket 'no-such-bucket-pf' does not exist "
         f"(endpoint {s3_server.endpoint_url})")]
    assert not s3_server.fs().exists("no-such-bucket-pf")
    # the sources' bucket and prefix too
    bucket = s3_server.make_bucket("pf")
    runs = _s3(f"s3://{bucket}/runs", opts)
    out = _problems(runs + _s3("s3://other-bucket-pf/v", opts, "sources"))
    assert out == [(f"sources.uri s3://other-bucket-pf/v: bucket 'other-bucket-pf' does not exist "
                    f"(endpoint {s3_server.endpoint_url})")]
    out = _problems(runs + _s3(f"s3://{bucket}/videos", opts, "sources"))
    assert out == [(f"sources.uri s3://{bucket}/videos: does not exist "
                    f"(endpoint {s3_server.endpoint_url})")]
    s3_server.fs().pipe(f"{bucket}/videos/a/x.mp4", b"x")
    preflight(load_job(SMOKE, _s3(f"s3://{bucket}/runs", opts) +
                       _s3(f"s3://{bucket}/videos", opts, "sources")), ["extract"])
    assert s3_server.fs().find(bucket) == [f"{bucket}/videos/a/x.mp4"]  # the probe was deleted


def test_missing_credentials(s3_server, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    bucket = s3_server.make_bucket("pf")
    opts = {"endpoint_url": s3_server.endpoint_url, "skip_instance_cache": True}
    (line,) = _problems(_s3(f"s3://{bucket}/runs", opts))
    assert line.startswith(f"storage.url s3://{bucket}/runs: no credentials (Unable to locate "
                           f"credentials): set key/secret in the options")


def test_unreachable_endpoint(tmp_path):
    port = _closed_port()
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s",
            "config_kwargs": {"retries": {"max_attempts": 1}}}
    (line,) = _problems(_s3("s3://some-bucket/runs", opts))
    assert line.startswith("storage.url s3://some-bucket/runs: endpoint unreachable: Could not "
                           f"connect to the endpoint URL: \"http://127.0.0.1:{port}/some-bucket")
    assert line.endswith(f"(endpoint http://127.0.0.1:{port})")
    # the same for the sources, behind a reachable local storage
    out = _problems([f"storage.url={tmp_path}", *_s3("s3://some-bucket/v", opts, "sources")])
    assert len(out) == 1
    assert out[0].startswith("sources.uri s3://some-bucket/v: endpoint unreachable")


def test_local_sources_models_and_stage_inputs(tmp_path, s3_server):
    runs = tmp_path / "runs"
    assert _problems([f"storage.url={runs}", f"sources.uri={tmp_path / 'nope'}"]) == [
        f"sources.uri {tmp_path / 'nope'}: does not exist"]
    (tmp_path / "one.mp4").write_bytes(b"x")
    assert _problems([f"storage.url={runs}", f"sources.uri={tmp_path / 'one.mp4'}"]) == [
        f"sources.uri {tmp_path / 'one.mp4'}: is a file, not a directory or prefix"]
    assert _problems([f"storage.url={runs}", f"sources.manifest={tmp_path / 'm.csv'}"]) == [
        f"sources.manifest {tmp_path / 'm.csv'}: does not exist"]
    bucket = s3_server.make_bucket("models")
    models = [f"storage.url={runs}", "sources.uri=samples", "models.weights=pretrained",
              f"models.student.source=s3://{bucket}/student",
              f"models.storage_options={json.dumps(s3_server.storage_options)}"]
    assert _problems(models) == [
        (f"models.student.source s3://{bucket}/student/config.json: does not exist (endpoint "
         f"{s3_server.endpoint_url}) (a save_pretrained directory holds config.json)")]
    # a stage run without the one before it needs that stage's output
    assert _problems([f"storage.url={runs}"], ["train", "evaluate", "export"]) == [
        (f"train: {runs}/features/features/meta.json does not exist; run the extract stage first "
         f"(or add it to the stages)")]
    assert _problems([f"storage.url={runs}"], ["export"]) == [
        (f"export: {runs}/runs/smoke/eval/metrics.json does not exist; run the evaluate stage "
         f"first (or add it to the stages)")]


def test_cli_stops_before_ray_with_one_line_per_problem(tmp_path, capsys):
    assert not ray.is_initialized()
    port = _closed_port()
    opts = {"endpoint_url": f"http://127.0.0.1:{port}",
            "config_kwargs": {"retries": {"max_attempts": 1}}}
    rc = main(["run", SMOKE, *_s3("s3://some-bucket/runs", opts), f"sources.uri={tmp_path / 'x'}"])
    out, err = capsys.readouterr()
    assert rc == 3 and not ray.is_initialized()
    assert err.splitlines()[1:] == [f"error: sources.uri {tmp_path / 'x'}: does not exist"]
    assert err.startswith("error: storage.url s3://some-bucket/runs: endpoint unreachable")
    assert "Traceback" not in err and "=== [1/" not in out  # no stage started


def test_failed_stage_is_one_line_and_recorded_and_credentials_stay_out(s3_server, capsys):
    """evaluate (no Ray) on a real S3 store with distinctive keys: summary.json holds the masked
    config; a broken checkpoint pointer fails the stage with one line naming it."""
    bucket = s3_server.make_bucket("pf")
    opts = {**s3_server.storage_options, "key": "AKIAPREFLIGHTKEY", "secret": "pf-secret-value"}
    url = f"s3://{bucket}/root"
    storage = Storage(url, opts)
    args = ["run", SMOKE, "--stages", "evaluate", *_s3(url, opts), "evaluate.report_html=false"]
    job = load_job(SMOKE, args[4:])
    make_tiny_store(storage)
    publish_checkpoint(storage, job)
    assert main(args) == 0
    capsys.readouterr()
    stored = storage.read_bytes("runs/smoke/summary.json").decode()
    assert "AKIAPREFLIGHTKEY" not in stored and "pf-secret-value" not in stored
    summary = json.loads(stored)
    assert summary["config"]["storage"]["options"]["key"] == MASK
    assert summary["config"]["storage"]["url"] == url and "failed" not in summary
    assert -1 <= summary["stages"]["evaluate"]["mean_cosine"] <= 1

    pointer = storage.read_json("runs/smoke/train.json")
    storage.write_json("runs/smoke/train.json", {**pointer, "checkpoint_rel": "runs/smoke/gone"})
    assert main(args) == 1
    err = capsys.readouterr().err
    line = f"stage evaluate: FileNotFoundError: {url}/runs/smoke/gone is not a directory"
    assert err == f"error: job smoke, {line}\n"
    failed = storage.read_json("runs/smoke/summary.json")["failed"]
    assert failed == {"stage": "evaluate", "error": line}
    assert main([*args, "--traceback"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.endswith(f"error: job smoke, {line}\n")


def test_error_line_opens_rays_wrappers():
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import WorkerGroupError
    inner = ValueError("sources.uri: '/x' does not exist\nsecond line")
    task = RayTaskError("decode_batch", "Traceback ...\n  File x", inner)
    assert error_line(task) == "ValueError: sources.uri: '/x' does not exist"
    group = WorkerGroupError("Training failed due to worker errors:\n[Rank 0] ...",
                             {0: RuntimeError("rank 0: CUDA out of memory")})
    group.add_note("stage: train")
    assert error_line(group) == "stage train: RuntimeError: rank 0: CUDA out of memory"


def test_error_line_finds_a_udf_error_lost_on_the_way_from_the_worker():
    """Ray Data raises UserCodeException from a UDF's error; the error itself does not cross
    processes (no ``__cause__`` on the driver), its traceback text does: the line names it."""
    import traceback

    from ray.exceptions import RayTaskError, UserCodeException

    from pipeline.storage import StorageError
    try:
        try:
            try:
                raise ConnectionError("Could not connect to the endpoint URL: http://127.0.0.1:9/b")
            except ConnectionError as e:
                raise StorageError("writing a shard to s3://b/p: endpoint unreachable: ...") from e
        except StorageError as e:
            raise UserCodeException("UDF failed to process a data block.") from e
    except UserCodeException as e:
        text = "".join(traceback.format_exception(e))
    task = RayTaskError("submit", text, UserCodeException("UDF failed to process a data block."))
    assert error_line(task.as_instanceof_cause()) == \
        "StorageError: writing a shard to s3://b/p: endpoint unreachable: ..."
