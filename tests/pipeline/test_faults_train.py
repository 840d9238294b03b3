"""Faults during training (issue 20 item 3) in a job run through the CLI, on a real local Ray
cluster with a tiny feature store (2 CPU workers x batch 2, 6 steps per epoch, 2 epochs, a
checkpoint every 3 steps), the run's storage on the moto S3 endpoint behind the tests' fault proxy:

* transient S3 faults on the checkpoint uploads (500/503, resets after moto stored the file,
  answers slower than the read timeout): retried by botocore, never a restart of the worker group;
  each step logged once, each checkpoint written once and whole;
* a training worker SIGKILLed mid-epoch from outside (its PID from Ray's actor table): the job
  completes, and its log, its printed summary and runs/<job>/summary.json say that the worker
  group failed, why, and the step training resumed from (the Ray Train callback
  ``pipeline.train_failures.FailureLog`` on the controller records it in the run's
  failures.json).
Both in one run: a training run's start-up is most of its CI time."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile

import pytest
import torch
import yaml
from fault_proxy import FaultProxy, Rule
from test_faults_extract import _remove_bucket
from test_train import _in_thread, _kill_a_worker_once
from tiny_features import make_tiny_store

from pipeline.artifacts import TRAIN_STATE
from pipeline.storage import Storage

pytestmark = pytest.mark.integration

RETRIES = {"retries": {"max_attempts": 8, "mode": "standard"}, "connect_timeout": 2,
           "read_timeout": 3}
STEPS = 12  # 24 train clips / (2 workers x batch 2) = 6 steps per epoch, 2 epochs


def _job_dict(name: str, url: str, options: dict, **train) -> dict:
    return {"name": name, "model_name": "tc", "storage": {"url": url, "options": options},
            "train": {"epochs": 2, "batch_size": 2, "num_workers": 2, "cpus_per_worker": 0.5,
                      "max_failures": 1, "checkpoint_every_steps": 3, "warm_start": False,
                      "optim": {"lr": 0.02, "warmup_steps": 2}, "head": {"hidden": 16},
                      "shuffle_window": 8, **train},
            "evaluate": {"batch_size": 4, "report_html": False}, "export": {"version": "v1"}}


def _steps(storage: Storage, run_rel: str) -> list[int]:
    lines = storage.read_bytes(f"{run_rel}/metrics.jsonl").decode().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "step"]


@pytest.mark.timeout(360)
def test_killed_worker_and_flaky_checkpoint_uploads_in_a_cli_job(ray_cluster, s3_server,
                                                                 tmp_path):
    """``python -m pipeline run job.yaml --stages train``, the run's storage on S3 behind the
    proxy, which answers half the checkpoint files' uploads (8 in all) with 500, 503, a reset after
    moto stored the file, or a slow answer; a training worker is SIGKILLed right after the
    checkpoint of step 3 is registered. The job exits 0. The one failure of the worker group is
    the kill (the upload faults were retried, not restarted): its log, its printed summary and
    runs/<job>/summary.json say the group failed once (each rank and why: the killed one by Ray's
    health check, the dead actor) and that training resumed from step N, N the train state's; the
    run's failures.json names the checkpoint it restarted from. Steps 1..12 are logged once; the
    four checkpoints are there once each, each loading with its own step."""
    from pipeline.__main__ import main
    bucket = s3_server.make_bucket("ftr")
    direct = Storage(f"s3://{bucket}/p", s3_server.storage_options)
    make_tiny_store(direct)
    run_rel = "runs/fk/train/fk-000"
    rule = Rule(rf"^PUT [^?]*/{run_rel}/step-\d+/", share=0.5, count=8, within_s=240,
                delay_s=4.0)
    with FaultProxy(s3_server.endpoint_url, [rule], seed=2) as proxy:
        opts = {**s3_server.storage_options, "endpoint_url": proxy.endpoint_url,
                "config_kwargs": RETRIES}
        job_file = tmp_path / "job.yaml"
        job_file.write_text(yaml.safe_dump(_job_dict("fk", direct.root_url, opts,
                                                     keep_checkpoints=8)))
        killer, killed = _in_thread(_kill_a_worker_once, direct, run_rel, 3)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(["run", str(job_file), "--stages", "train"])
        killer.join()
        faults = proxy.injected()
    log = out.getvalue()
    assert rc == 0 and "error" not in killed, (killed, log[-3000:])
    assert {k for _, k, _, _ in faults} == {"500", "503", "reset", "delay"}, faults

    train = direct.read_json("runs/fk/summary.json")["stages"]["train"]
    n = train["metrics"]["resumed_from_step"]
    assert n is not None and 3 <= n < STEPS and train["metrics"]["step"] == STEPS, train
    [failure] = train["failures"]  # the kill only
    assert failure["after_checkpoint_step"] == n, failure
    # the killed rank as Ray's health check saw it, and its peer whose collective broke off
    # (the peer alone when its error reached the controller's poll before the death did)
    ranks = failure["ranks"]
    died = [w for w in ranks.values() if "ActorDiedError" in w]
    assert all(w.startswith("WorkerHealthCheckFailedError: A worker health check failed")
               for w in died), died
    assert died or any("Connection reset by peer" in w for w in ranks.values()), ranks
    assert direct.read_json(f"{run_rel}/failures.json") == [failure]
    story = train["recovery"]
    assert story.startswith(f"the worker group failed 1 time ({failure['time']} rank "), story
    assert all(f"rank {r}: {w}" in story for r, w in ranks.items()) and story.endswith(
        f"; training resumed from step {n} (its last checkpoint)"), story
    assert f"[train] {story}" in log  # the stage's log line
    printed = re.search(rf"recovered: train: .*training resumed from step {n} ", log + " ")
    assert printed, log[-2000:]  # the job's printed summary

    assert _steps(direct, run_rel) == list(range(1, STEPS + 1))
    direct.fs.invalidate_cache()
    ckpts = [c for c in direct.ls(run_rel) if c.startswith("step-")]
    assert ckpts == [f"step-{k:08d}" for k in (3, 6, 9, 12)], ckpts
    for name in ckpts:
        with tempfile.TemporaryDirectory() as d:
            direct.download(f"{run_rel}/{name}", d)
            state = torch.load(os.path.join(d, TRAIN_STATE), weights_only=False)
        assert state["progress"]["step"] == int(name[5:]), name
    assert train["checkpoint"] == f"s3://{bucket}/p/{run_rel}/step-{STEPS:08d}"


FEW = {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 1,
       "read_timeout": 20}


def _failed_training(job_file, capsys) -> tuple[str, str]:
    """Run the job's train stage (short leases: a failed run cannot release them), which must fail
    with exit 1 and one ``error:`` line; that line and the whole stderr."""
    from pipeline.__main__ import main
    rc = main(["run", str(job_file), "--stages", "train", "lease.ttl_s=8"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 1 and len(lines) == 1, err[-3000:]
    return lines[0], err


@pytest.mark.timeout(420)
def test_storage_lost_mid_training_fails_in_one_line_and_a_rerun_resumes(ray_cluster, s3_server,
                                                                         tmp_path, capsys):
    """The run's storage on S3 behind the proxy, which goes down right after the checkpoint of
    step 3 was uploaded: the job fails (exit 1) in one line naming the run's s3:// URL and the
    cause, and the job's leases, which it could not release, stay until they expire (a short
    ``lease.ttl_s`` here). With the endpoint back, the same job (waiting for them) resumes its
    unfinished run from step 3, its last checkpoint, and completes: steps 1..12 logged once
    each. Then another job on that store, its bucket removed right after its step-3 checkpoint:
    one line naming its run's s3:// URL and "does not exist", the bucket not re-created by the
    run's writes, and a re-run refused before any work (exit 3) naming what is missing."""
    from pipeline.__main__ import main
    bucket = s3_server.make_bucket("ftd")
    direct = Storage(f"s3://{bucket}/p", s3_server.storage_options)
    make_tiny_store(direct)
    run_rel = "runs/fd/train/fd-000"
    with FaultProxy(s3_server.endpoint_url) as proxy:
        opts = {**s3_server.storage_options, "endpoint_url": proxy.endpoint_url,
                "config_kwargs": FEW}
        job_file = tmp_path / "job.yaml"
        job_file.write_text(yaml.safe_dump(_job_dict("fd", direct.root_url, opts)))
        proxy.down_after(rf"^PUT [^?]*/{run_rel}/checkpoint_manager_snapshot\.json", 1)
        line, err = _failed_training(job_file, capsys)
        assert line.startswith(f"error: job fd, stage train: StorageError: training run "
                               f"s3://{bucket}/p/{run_rel}: endpoint unreachable: "), line
        assert proxy.endpoint_url in line, line  # botocore's cause names the endpoint
        assert "[lease] could not release the job's leases" in err
        proxy.start()
        rc = main(["run", str(job_file), "--stages", "train", "lease.wait_s=90"])
        out = capsys.readouterr().out
        assert rc == 0, out[-3000:]
        assert "[lease] skipped" not in out
        train = direct.read_json("runs/fd/summary.json")["stages"]["train"]
        assert train["metrics"]["resumed_from_step"] == 3 and train["metrics"]["step"] == STEPS
        assert _steps(direct, run_rel) == list(range(1, STEPS + 1))

        # another job on the same store: the bucket removed right after its step-3 checkpoint
        job_file.write_text(yaml.safe_dump(_job_dict("fb", direct.root_url, opts)))
        proxy.on_answer(r"^PUT [^?]*/runs/fb/train/fb-000/checkpoint_manager_snapshot\.json", 1,
                        lambda: _remove_bucket(s3_server, bucket))
        line, _ = _failed_training(job_file, capsys)
        assert line.startswith(f"error: job fb, stage train: StorageError: training run "
                               f"s3://{bucket}/p/runs/fb/train/fb-000: does not exist ("), line
        assert not s3_server.fs().exists(bucket)  # not re-created by the run's own writes
        rc = main(["run", str(job_file), "--stages", "train"])  # nothing left to train on
        err = capsys.readouterr().err
    assert rc == 3 and f"s3://{bucket}/p" in err and "does not exist" in err, err[-2000:]
