"""Train stage driver: model assembly, warm-start choice and run naming (unit); then real Ray
Train runs on a local cluster (integration): resources checked before any worker starts, DDP
averaging gradients, a training worker SIGKILLed from outside mid-epoch (its PID from Ray's actor
table) restarting from the last checkpoint on S3 with the weights of an uninterrupted run, and a
re-submitted job resuming its run while a finished job's re-run trains a new one."""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time

import pytest
import torch
from safetensors.torch import load_file
from tiny_features import (
    CLASS_NAMES,
    SPECS,
    STUDENT,
    TEACHERS,
    make_tiny_store,
    publish_checkpoint,
)

from pipeline.artifacts import ModelRegistry, job_run_dir, load_trained
from pipeline.config import JobConfig
from pipeline.storage import Storage
from pipeline.train import _choose_run, build_models, run_train


def _job(url: str, options: dict, **train) -> JobConfig:
    return JobConfig.model_validate({
        "name": "tt", "model_name": "tc", "storage": {"url": url, "options": options},
        "train": {"epochs": 3, "batch_size": 4, "num_workers": 2, "cpus_per_worker": 0.5,
                  "max_failures": 1, "optim": {"lr": 0.02, "warmup_steps": 2},
                  "head": {"hidden": 16}, "shuffle_window": 8, **train},
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


def test_run_names_come_from_the_job_and_a_resume_must_match(tmp_path):
    storage = Storage(str(tmp_path))
    run_dir = job_run_dir("tt")
    sig = {"epochs": 3, "batch_size": 4}
    assert _choose_run(storage, run_dir, "auto", sig) == ("tt-000", None)
    storage.write_json("runs/tt/train/tt-000/run.json",
                       {"run": "tt-000", "signature": sig, "warm_start": None})
    assert _choose_run(storage, run_dir, "auto", sig) == \
        ("tt-000", storage.read_json("runs/tt/train/tt-000/run.json"))
    with pytest.raises(ValueError, match="epochs.*train.resume=never"):
        _choose_run(storage, run_dir, "auto", {**sig, "epochs": 4})
    assert _choose_run(storage, run_dir, "never", sig) == ("tt-001", None)
    storage.write_json("runs/tt/train/tt-000/result.json", {})  # finished: never resumed
    assert _choose_run(storage, run_dir, "auto", {**sig, "epochs": 4}) == ("tt-001", None)
    # another job's runs beside them are not its runs
    storage.write_json("runs/tt/train/other-007/run.json", {"run": "other-007"})
    assert _choose_run(storage, run_dir, "auto", sig) == ("tt-001", None)


# ---------------------------------------------------------------- on a local Ray cluster

def _ray_job(url: str, options: dict, name: str, **train) -> JobConfig:
    # 96 train clips, 2 workers x batch 2: 24 steps per epoch, a checkpoint every 5 steps
    job = _job(url, options, epochs=2, batch_size=2, checkpoint_every_steps=5, **train)
    job.name = name
    return job


def _kill_a_worker_once(storage: Storage, run_rel: str, step: int) -> dict:
    """Once Ray has registered the checkpoint of ``step`` (its checkpoint manager snapshot names
    it), SIGKILL one training worker: its PID from Ray's actor table, class RayTrainWorker (the
    state API would need the dashboard). Returns {"pid", "log_step": last step in the log then}."""
    import ray
    snapshot = storage.path(run_rel, "checkpoint_manager_snapshot.json")
    deadline = time.time() + 240
    while time.time() < deadline:
        storage.fs.invalidate_cache()
        try:
            with storage.fs.open(snapshot, "rb") as f:
                if f"step-{step:08d}" in f.read().decode():
                    break
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    else:
        raise AssertionError(f"no checkpoint of step {step} within the deadline")
    workers = [a for a in ray._private.state.actors().values()
               if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"]
    assert len(workers) == 2
    os.kill(workers[-1]["Pid"], signal.SIGKILL)
    return {"pid": workers[-1]["Pid"]}


def _in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001  (handed to the test)
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _records(storage: Storage, summary: dict) -> list[dict]:
    return [json.loads(x) for x in storage.read_bytes(summary["metrics_log"]).decode().splitlines()]


def _final_state(storage: Storage, summary: dict) -> dict:
    with tempfile.TemporaryDirectory() as d:
        storage.download(summary["last_checkpoint_rel"], d)
        return torch.load(os.path.join(d, "train_state.pt"), weights_only=False)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_resources_are_checked_before_training(ray_cluster, tmp_path):
    """More GPU workers than the cluster has (no autoscaler): a clear error naming
    train.num_workers and what the cluster has, at once; num_workers=auto gives one per GPU (none
    here) or one per node."""
    from pipeline.train import resolve_num_workers
    storage = Storage(str(tmp_path))
    make_tiny_store(storage)
    t0 = time.time()
    with pytest.raises(ValueError,
                       match=r"train.num_workers=2 asks for 2 GPU.*has 0 GPU and 2 CPU"):
        run_train(_job(storage.root_url, {}, use_gpu=True), storage)
    with pytest.raises(ValueError, match=r"train.num_workers=3 .*room for 2 worker"):
        run_train(_job(storage.root_url, {}, num_workers=3, cpus_per_worker=1.0), storage)
    assert time.time() - t0 < 60  # no worker group was ever requested (it would wait forever)
    assert resolve_num_workers(_job("x", {}, num_workers="auto").train) == 1  # CPU: one per node
    with pytest.raises(ValueError, match="train.num_workers=auto with train.use_gpu=true.*no GPUs"):
        resolve_num_workers(_job("x", {}, num_workers="auto", use_gpu=True).train)
    waits = _job("x", {}, use_gpu=True, num_workers=7, wait_for_workers=True)
    assert resolve_num_workers(waits.train) == 7


def _ddp_one_step(config: dict) -> None:
    """A Ray Train worker: one training step on its half of 8 train clips; rank 0 saves the
    weights."""
    import ray.train

    from pipeline.train_step import make_optimizer, step_once, wrap_ddp
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    module, objective, batch = _step_pieces(config)
    model = wrap_ddp(module, torch.device("cpu"), world, (STUDENT.tokens, STUDENT.dim))
    params = list(module.parameters())
    n = 8 // world
    half = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
    optim = JobConfig.model_validate(config["job"]).train.optim
    step_once(model, objective, make_optimizer(params, optim, torch.device("cpu")), params, half,
              0, 1.0)
    if rank == 0:
        torch.save(module.state_dict(), config["out"])


def _step_pieces(config: dict):
    from pipeline.artifacts import stats_tensors
    from pipeline.featurestore import FeatureStore
    from pipeline.train import _TrainModule
    from pipeline.train_step import Objective
    job = JobConfig.model_validate(config["job"])
    store = FeatureStore(Storage(config["url"]), "features")
    torch.manual_seed(0)
    conv, head = build_models(job.train, SPECS, len(CLASS_NAMES))
    mean, std = stats_tensors(store.stats(), list(TEACHERS))
    batch = next(store.iter_torch(split="train", batch_size=8))
    batch = {k: (v.float() if k in SPECS else v) for k, v in batch.items()
             if k in SPECS or k == "label_index"}
    objective = Objective(job.train, mean, std, bf16=False)
    return _TrainModule(converter=conv, head=head), objective, batch


@pytest.mark.integration
def test_ddp_averages_gradients(ray_cluster, tmp_path):
    """2 DDP workers on half batches take the step of 1 worker on the full batch (the loss is a
    per-clip mean, DDP averages the gradients, the norm is clipped after): one AdamW step of each,
    compared."""
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.train_step import make_optimizer, step_once
    # workers cannot import this test file
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    storage = Storage(str(tmp_path))
    make_tiny_store(storage)
    job = _job(storage.root_url, {})
    config = {"job": job.model_dump(mode="json"), "url": storage.root,
              "out": str(tmp_path / "ddp.pt")}
    TorchTrainer(_ddp_one_step, train_loop_config=config,
                 scaling_config=ray.train.ScalingConfig(num_workers=2,
                                                        resources_per_worker={"CPU": 0.5}),
                 run_config=ray.train.RunConfig(name="ddp",
                                                storage_path=str(tmp_path / "ray"))).fit()
    ddp = torch.load(tmp_path / "ddp.pt")

    def one_worker(rows: slice) -> dict:
        module, objective, batch = _step_pieces(config)
        params = list(module.parameters())
        step_once(module, objective, make_optimizer(params, job.train.optim, torch.device("cpu")),
                  params, {k: v[rows] for k, v in batch.items()}, 0, 1.0)
        return module.state_dict()
    full, half = one_worker(slice(0, 8)), one_worker(slice(0, 4))
    init = _step_pieces(config)[0].state_dict()
    moved = [k for k in full if not torch.equal(full[k], init[k])]
    assert len(moved) == len(full)  # every parameter took the step
    for k in full:
        torch.testing.assert_close(ddp[k], full[k], atol=2e-6, rtol=1e-5)
    # one half alone is another step
    assert max((half[k] - full[k]).abs().max().item() for k in full) > 1e-3


@pytest.mark.integration
def test_worker_killed_mid_epoch_resumes_from_its_checkpoint_on_s3(ray_cluster, s3_server):
    """On the moto S3 endpoint, warm-started from an exported v0: a training worker is SIGKILLed
    right after the checkpoint of step 5; FailureConfig restarts the group from the last checkpoint,
    the run ends at the same 48 steps with each step logged once, and its final weights equal those
    of an uninterrupted run with the same seed (exactly: per-step RNG and data order are functions
    of seed, rank, step). Then evaluate + export promote it over v0 and reload it bit for bit."""
    from pipeline.evaluate import run_evaluate
    from pipeline.export import run_export
    from tokconv.io import load_converter

    bucket = s3_server.make_bucket("train")
    opts = s3_server.storage_options
    storage = Storage(f"s3://{bucket}/p", opts)
    make_tiny_store(storage, n_train=96)
    v0 = _job(storage.root_url, opts)
    v0.export.version = "v0"
    publish_checkpoint(storage, v0, seed=1)  # an untrained model as the current `latest`
    run_evaluate(v0, storage)
    assert run_export(v0, storage)["promoted"]

    ref = run_train(_ray_job(storage.root_url, opts, "ref"), storage)
    job = _ray_job(storage.root_url, opts, "tt")
    killer, killed = _in_thread(_kill_a_worker_once, storage, "runs/tt/train/tt-000", 5)
    t0 = time.time()
    s = run_train(job, storage)
    wall = time.time() - t0
    killer.join()
    assert "error" not in killed, killed
    m = s["metrics"]
    assert s["warm_start"] == "v0" and m["warm_started_from"] == "v0" and not s["resumed"]
    assert m["step"] == 48 and m["finished"] and len(m["loss_history"]) == 2
    assert 5 <= m["resumed_from_step"] < 48 and m["resumed_from_step"] % 24, m  # mid-epoch
    assert s["checkpoint"] == f"s3://{bucket}/p/runs/tt/train/tt-000/step-00000048"
    steps = [r["step"] for r in _records(storage, s) if r["kind"] == "step"]
    assert steps == list(range(1, 49))  # records past the checkpoint were dropped on the restart
    vals = [r for r in _records(storage, s) if r["kind"] == "val"]
    assert [v["step"] for v in vals] == [24, 48]
    assert vals[-1]["val.mean_cosine"] > vals[0]["val.mean_cosine"]
    # the rate: 2 epochs of 96 clips, the restart's lost steps not counted twice
    assert m["clips"] == ref["metrics"]["clips"] == 2 * 96
    assert 0 < s["train_seconds"] < wall and s["clips_per_s"] == m["clips"] / s["train_seconds"]
    a, b = _final_state(storage, ref), _final_state(storage, s)
    assert b["progress"]["resumed_from_step"] == m["resumed_from_step"]
    assert a["progress"]["resumed_from_step"] is None
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert [r["loss"] for r in _records(storage, ref) if r["kind"] == "step"] == \
        [r["loss"] for r in _records(storage, s) if r["kind"] == "step"]

    # the checkpoint restores: tokconv.io files hold exactly the weights of the final train state
    with tempfile.TemporaryDirectory() as d:
        conv, head, _ = load_trained(storage, job_run_dir(job.name), d)
        for k, v in conv.state_dict().items():
            assert torch.equal(v, b["model"][f"converter.{k}"]), k
        for k, v in head.state_dict().items():
            assert torch.equal(v, b["model"][f"head.{k}"]), k
    ev = run_evaluate(job, storage)
    v0_cos = storage.read_json("models/tc/latest.json")["value"]
    # learnable teachers: far above v0
    assert ev["clips"] == 8 and ev["mean_cosine"] > v0_cos + 0.25
    ex = run_export(job, storage)
    assert ex["promoted"] and ex["previous"]["version"] == "v0"
    assert ex["uri"] == f"s3://{bucket}/p/models/tc/v1"
    with tempfile.TemporaryDirectory() as d:
        ModelRegistry(storage, "tc").download("latest", d)
        ref_io = load_file(os.path.join(d, "reference_io.safetensors"))
        with torch.no_grad():
            out = load_converter(d).eval().forward_all(ref_io["student"])
        for t in TEACHERS:
            assert torch.equal(out[t], ref_io[f"out.{t}"]), t


@pytest.mark.integration
def test_resubmitted_job_resumes_and_a_finished_job_trains_a_new_run(ray_cluster, tmp_path):
    """max_failures=0: a killed worker ends the job (as a crashed driver or node would);
    submitting the job again continues run rs-000 from its last checkpoint to the end; submitting
    it once more, the run being finished, trains rs-001 from scratch, whose weights (same seed,
    uninterrupted) equal the resumed run's."""
    storage = Storage(str(tmp_path))
    make_tiny_store(storage, n_train=96)
    job = _ray_job(storage.root_url, {}, "rs", max_failures=0, warm_start=False)
    killer, _ = _in_thread(_kill_a_worker_once, storage, "runs/rs/train/rs-000", 5)
    with pytest.raises(Exception, match="(?i)fail|died|error"):
        run_train(job, storage)
    killer.join()
    assert not storage.exists("runs/rs/train.json")
    assert not storage.exists("runs/rs/train/rs-000/result.json")

    resumed = run_train(job, storage)
    assert resumed["run_name"] == "rs-000" and resumed["resumed"]
    assert 5 <= resumed["metrics"]["resumed_from_step"] < 48 and resumed["metrics"]["step"] == 48
    assert [r["step"] for r in _records(storage, resumed) if r["kind"] == "step"] == \
        list(range(1, 49))

    fresh = run_train(job, storage)
    assert fresh["run_name"] == "rs-001" and not fresh["resumed"]
    assert fresh["metrics"]["resumed_from_step"] is None and fresh["metrics"]["step"] == 48
    assert storage.read_json("runs/rs/train.json")["run_name"] == "rs-001"
    a, b = _final_state(storage, resumed), _final_state(storage, fresh)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
