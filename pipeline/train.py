"""Train stage: Ray Train ``TorchTrainer`` (DDP) fits a converter for every teacher target plus a
residual classification head on the feature store.

``run_train(job, storage)`` (the CLI's entry) unpacks the job into ``train_stage(tc: TrainConfig,
storage, *, store: FeatureStore, registry: ModelRegistry, run_dir: "runs/<job>")``: the stage
reads only its own sub-config. The per-worker loop is ``pipeline.train_loop`` (data path:
``pipeline.train_data``; the worker's entry: ``pipeline.train_worker``); this module holds the
model pieces, the driver and the Ray Train wiring. Layout under the storage root (model
directories: ``pipeline.artifacts``)::

    runs/<job>/train/<job>-<NNN>/    one training run (Ray Train's run directory)
        run.json                     settings a resume must share (written before training)
        step-<step>/                 checkpoints (the last train.keep_checkpoints): a model
                                     directory + train_state.pt (optimiser, scheduler, progress)
        best-<step>/  best.json      the best validated model directory, and what made it best
        metrics.jsonl                the per-step log (below)
        failures.json                each failure of the worker group (``pipeline.train_failures``)
        result.json                  written when the run finished: a finished run is never resumed
    runs/<job>/train.json            pointer for evaluate/export: checkpoint, metrics, model config

Run names come from the job (``<job>-000``, ``<job>-001``, ...): a re-submitted job continues its
last run when that has no result.json (``train.resume: auto``); a worker that dies restarts the
group from the last checkpoint (``FailureConfig``); a finished job's re-run starts the next run.

metrics.jsonl, one JSON object per line, appended while training runs (a resume drops the
records after its checkpoint's step; ``pipeline.report.trainlog`` reads it)::

    {"kind": "step", "step", "epoch", "time" (unix s), "loss", "loss.<target>", "loss.head",
     "reg.<name>", "w.<name>", "lr", "grad_norm", "clips_per_s", "data_wait_frac"}
        (a worker's first step after a start also has "start.<phase>": unix times of its start-up)
    {"kind": "val", "step", "epoch", "val.<target>.cosine", "val.<target>.r2",
     "val.top1" (or null), "val.mean_cosine"}

The summary's ``clips_per_s`` is the run's clips trained over its training seconds: rank 0's
wall time from its first step to its last checkpoint, validations and checkpoints included,
start-up (worker group, models, store plan) and the lost work of restarts excluded.
"""
from __future__ import annotations

import json
import logging
import math
import posixpath
import re
import time
from typing import Any

import torch
from torch import nn

from tokconv import create_converter
from tokconv.targets import TargetSpec, specs_from_dict, specs_to_dict

from .artifacts import ModelRegistry, job_run_dir, write_trained
from .config import JobConfig, TrainConfig
from .featurestore import FeatureStore
from .storage import Storage, StorageError, error_reason, storage_cause
from .train_plan import plan_blocks

# worker-side progress: Ray Train's worker log handler prints each record once on the driver
# (a plain print() there is both logged and tee'd, i.e. shown twice)
_log = logging.getLogger(__name__)


# ---------------------------------------------------------------- model pieces (driver + workers)

def teacher_specs(specs: dict[str, TargetSpec]) -> dict[str, TargetSpec]:
    """The converter targets: every store layout except the student's."""
    return {k: v for k, v in specs.items() if k != "student"}


def class_names_of(store: FeatureStore) -> list[str]:
    meta = store.read_meta()
    names = meta.get("class_names")
    if names is None:
        raise ValueError(f"feature store {store!r}: meta.json has no 'class_names'")
    return list(names)


def build_models(train_cfg, specs: dict[str, TargetSpec],
                 num_classes: int) -> tuple[nn.Module, nn.Module | None]:
    """Converter for all teacher targets (+ ResidualHead when enabled), as configured."""
    from tokconv.heads import ResidualHead

    d = train_cfg.deficiency
    converter = create_converter(train_cfg.converter, student=specs["student"],
                                 targets=teacher_specs(specs), rank=d.rank,
                                 mask_ratio=d.mask_ratio, **train_cfg.converter_kwargs)
    head = None
    if train_cfg.head.enabled:
        if num_classes < 1:
            raise ValueError("train.head.enabled: the feature store has no class names "
                             "(unlabelled videos); set train.head.enabled=false")
        head = ResidualHead(student_dim=specs["student"].dim,
                            target_dims={k: s.dim for k, s in teacher_specs(specs).items()},
                            num_classes=num_classes, hidden=train_cfg.head.hidden,
                            dropout=train_cfg.head.dropout)
    return converter, head


class _TrainModule(nn.Module):
    """Converter + head in ONE module so DDP sees one forward per step (incl. the Jacobian term).

    forward(student (B, N, Ds)) -> (converted {target: (B, Nt, Dt)}, logits (B, C) | None,
    regularisers {name: scalar}, jacobian scalar | None).
    """

    def __init__(self, *, converter: nn.Module, head: nn.Module | None):
        super().__init__()
        self.converter = converter
        self.head = head

    def forward(self, x: torch.Tensor, with_jacobian: bool = False):
        out = self.converter.forward_all(x)
        regs = dict(self.converter.regularisers())  # THIS forward's terms, before the Jacobian's
        logits = self.head(x, out) if self.head is not None else None
        jac = None
        if with_jacobian:
            from tokconv.deficiency import jacobian_penalty
            conv = self.converter

            def flat(z):
                return torch.cat([o.flatten(1) for o in conv.forward_all(z).values()], 1)
            jac = jacobian_penalty(flat, x)
        return out, logits, regs, jac


def _same_config(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _warm_start_version(registry: ModelRegistry, converter, head) -> str | None:
    """The registry's `latest` version whose converter/head configs equal the ones to train; else
    None."""
    latest = registry.latest()
    if latest is None:
        return None
    version = latest["version"]
    conf = registry.read_json(version, "config.json")
    keys = ("name", "student", "targets", "kwargs")  # tokconv.io adds dtype/format_version
    if conf is None or not _same_config({k: conf.get(k) for k in keys},
                                        {k: converter.config.get(k) for k in keys}):
        print(f"[train] warm start skipped: {registry.name}/{version} has a different converter "
              f"config")
        return None
    if head is not None:
        hconf = registry.read_json(version, "head.json")
        if hconf is None or not _same_config(hconf.get("kwargs"), head.config):
            print(f"[train] warm start skipped: {registry.name}/{version} has a different head "
                  f"config")
            return None
    return version


# ---------------------------------------------------------------- Ray Train wiring

def resolve_num_workers(tc: TrainConfig) -> int:
    """``train.num_workers`` (auto: one per GPU with use_gpu, else one per node), checked against
    what the cluster can ever hold: the autoscaler's maximum when it publishes one, else the
    nodes there now. A request that cannot be met fails here instead of waiting forever."""
    import ray
    from ray._private.state import state

    limits = state.get_max_resources_from_cluster_config()
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    total = limits or {k: sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU")}
    gpus, cpus = float(total.get("GPU", 0)), float(total.get("CPU", 0))
    where = "the autoscaler's maximum" if limits else "the cluster (no autoscaler limits)"
    each = tc.cpus_per_worker
    if tc.num_workers == "auto":
        n = int(gpus) if tc.use_gpu else max(1, sum(1 for r in nodes if r.get("CPU", 0) >= each))
        if n < 1:
            raise ValueError(f"train.num_workers=auto with train.use_gpu=true: {where} has no "
                             f"GPUs ({cpus:g} CPU, 0 GPU)")
    else:
        n = tc.num_workers
    if limits is None and tc.wait_for_workers:
        return n
    gpu_each = 1.0 if tc.use_gpu else 0.0

    def room(c: float, g: float) -> float:
        return min(c // each, g // gpu_each if gpu_each else math.inf)
    fits = room(cpus, gpus) if limits else sum(  # without limits: each worker on one node
        room(r.get("CPU", 0), r.get("GPU", 0)) for r in nodes)
    if n > fits:
        raise ValueError(
            f"train.num_workers={n} asks for {n * gpu_each:g} GPU and {n * each:g} CPU "
            f"(train.use_gpu={tc.use_gpu}, train.cpus_per_worker={each:g} per worker); {where} "
            f"has {gpus:g} GPU and {cpus:g} CPU on {len(nodes)} node(s), room for {int(fits)} "
            f"worker(s). Lower train.num_workers (train.num_workers=auto: one per GPU)"
            + ("" if limits else
               ", or set train.wait_for_workers=true if an autoscaler will add nodes"))
    return n


# ---------------------------------------------------------------- driver side

def _choose_run(storage: Storage, run_dir: str, resume: str,
                signature: dict) -> tuple[str, dict | None]:
    """(run name, run.json of the unfinished run it continues | None for a new run). Runs are
    ``<run_dir>/train/<job>-NNN`` (``<job>``: run_dir's last part)."""
    base, job = posixpath.join(run_dir, "train"), posixpath.basename(run_dir)
    pattern = re.compile(rf"{re.escape(job)}-\d{{3,}}")
    runs = sorted((n for n in storage.ls(base) if pattern.fullmatch(n)),
                  key=lambda n: int(n.rsplit("-", 1)[1]))
    last = runs[-1] if runs else None
    if last and resume == "auto" and not storage.exists(base, last, "result.json"):
        info = storage.read_json(posixpath.join(base, last, "run.json"), default=None)
        if info is not None:
            differ = [k for k in signature if json.dumps(info["signature"].get(k), sort_keys=True)
                      != json.dumps(signature[k], sort_keys=True)]
            if differ:
                raise ValueError(f"train.resume=auto: the unfinished run {last} was started with "
                                 f"other {', '.join(differ)}; re-submit with those settings, or "
                                 f"train.resume=never for a new run")
            return last, info
    return f"{job}-{int(last.rsplit('-', 1)[1]) + 1 if last else 0:03d}", None


def worker_config(tc: TrainConfig, storage: Storage, *, store: FeatureStore,
                  registry: ModelRegistry, run_rel: str, warm_start: str | None = None) -> dict:
    """What every worker needs, as plain data: the train config, storage, store name, layout and
    stats, the model name, the train and validation blocks (``train_plan.plan_blocks``), the
    run's directory and metrics log."""
    specs = store.specs()
    if "student" not in specs or not teacher_specs(specs):
        raise ValueError(f"feature store {store.name!r}: needs 'student' and at least one "
                         f"teacher, has {sorted(specs)}")
    stats = store.stats()
    blocks = plan_blocks(store, "train")  # footers only: no pass over the data
    if not blocks:
        raise ValueError(f"feature store {store.name!r} has no clips in split 'train'")
    class_names = class_names_of(store) if tc.head.enabled else []
    val_blocks = plan_blocks(store, tc.val_split) if tc.val_split != "train" else []
    plain = {k: {"mean": [float(v) for v in stats[k]["mean"]],
                 "std": [float(v) for v in stats[k]["std"]]} for k in teacher_specs(specs)}
    return {"train": tc.model_dump(mode="json"), "store": store.name, "model_name": registry.name,
            # absolute root: a relative local URL would resolve against each worker's own cwd
            "storage_url": storage.root if storage.protocol == "file" else storage.root_url,
            "storage_options": storage.options, "specs": specs_to_dict(specs),
            "stats": plain,
            "class_names": class_names, "num_classes": len(class_names),
            "blocks": blocks, "val_blocks": val_blocks,
            "run_rel": run_rel, "metrics_log": posixpath.join(run_rel, "metrics.jsonl"),
            "warm_start_version": warm_start}


def run_train(job: JobConfig, storage: Storage) -> dict[str, Any]:
    """The CLI's train stage: ``train_stage`` on the job's store, registry and run directory."""
    return train_stage(job.train, storage, store=FeatureStore(storage, job.store),
                       registry=ModelRegistry(storage, job.model_name),
                       run_dir=job_run_dir(job.name))


def train_stage(tc: TrainConfig, storage: Storage, *, store: FeatureStore,
                registry: ModelRegistry, run_dir: str) -> dict[str, Any]:
    """Train converter + head with Ray Train on ``store`` (warm start from ``registry``'s latest);
    runs and the train.json pointer go under ``run_dir``. Returns a summary with the checkpoint
    URL and the training rate."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from .train_failures import FailureLog, read_failures, recovery_line
    from .train_worker import train_loop_per_worker

    t_start = time.time()
    _start_coordinator()
    num_workers = resolve_num_workers(tc)
    config = worker_config(tc, storage, store=store, registry=registry, run_rel="")
    specs, class_names = specs_from_dict(config["specs"]), config["class_names"]
    n_train = sum(len(b["rows"]) for b in config["blocks"])
    n_val = sum(len(b["rows"]) for b in config["val_blocks"])
    _check_validation(tc, list(teacher_specs(specs)), n_val)
    if n_train < num_workers:
        raise ValueError(f"train.num_workers={num_workers}: more workers than the {n_train} "
                         f"train clips")
    steps_per_epoch = -(-(n_train // num_workers) // tc.batch_size)

    # driver copy: config + parameter count
    converter, head = build_models(tc, specs, len(class_names))
    signature = {"num_workers": num_workers, "train_clips": n_train, "store": store.name,
                 **tc.model_dump(mode="json", include={
                     "converter", "converter_kwargs", "head", "loss", "optim", "deficiency",
                     "epochs", "batch_size", "seed", "shuffle_window"})}
    run_name, resumed = _choose_run(storage, run_dir, tc.resume, signature)
    run_rel = posixpath.join(run_dir, "train", run_name)
    if resumed:
        warm = resumed.get("warm_start")
    else:
        warm = _warm_start_version(registry, converter, head) if tc.warm_start else None
        storage.write_json(posixpath.join(run_rel, "run.json"),
                           {"run": run_name, "signature": signature, "warm_start": warm})
    runs_dir = storage.path(run_dir, "train")
    storage.makedirs(runs_dir)
    run_config = ray.train.RunConfig(
        name=run_name, storage_path=runs_dir,
        storage_filesystem=storage.pyarrow_filesystem() if storage.protocol != "file" else None,
        failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
        callbacks=[FailureLog(storage, run_rel)])  # each failure of the group -> failures.json
    config.update(run_rel=run_rel, metrics_log=posixpath.join(run_rel, "metrics.jsonl"),
                  warm_start_version=warm)
    print(f"[train] {tc.converter}: {n_train} train / {n_val} {tc.val_split} clips, "
          f"{num_workers} workers x batch {tc.batch_size}, {tc.epochs} epochs "
          f"({steps_per_epoch} steps each), {'resuming' if resumed else 'new'} run -> "
          f"{storage.url(run_rel)}", flush=True)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=run_config)
    t_fit = time.time()
    try:
        result = trainer.fit()
    except Exception as e:  # a storage fault: one line naming the run and the cause
        cause = storage_cause(e)
        if cause is None:
            raise
        raise StorageError(f"training run {storage.url(run_rel)}: {error_reason(cause)}") from e
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} finished without a checkpoint")
    last_rel = _rel(storage, result.checkpoint.path)
    best = storage.read_json(posixpath.join(run_rel, "best.json"), default=None)
    ckpt_rel = best["dir"] if tc.result == "best" and best else last_rel
    metrics = {k: v for k, v in result.metrics.items()
               if isinstance(v, (int, float, str, list, type(None)))}
    train_s = metrics.get("train_seconds") or 0.0
    failures = read_failures(storage, run_rel)
    summary = {
        "run": storage.url(run_rel), "run_name": run_name, "resumed": resumed is not None,
        "checkpoint": storage.url(ckpt_rel), "checkpoint_rel": ckpt_rel,
        "last_checkpoint_rel": last_rel, "best_checkpoint_rel": best["dir"] if best else None,
        "best": best, "metrics_log": config["metrics_log"], "metrics": metrics,
        "clips_per_s": metrics.get("clips", 0) / train_s if train_s > 0 else None,
        "train_seconds": train_s,
        "converter": tc.converter,
        "converter_params": sum(p.numel() for p in converter.parameters()),
        "head_params": sum(p.numel() for p in head.parameters()) if head is not None else 0,
        "class_names": class_names, "train_clips": n_train, "val_clips": n_val,
        "num_workers": num_workers, "warm_start": warm, "specs": specs_to_dict(specs),
        "started": t_start, "fit_called": t_fit,
        "failures": failures, "recovery": recovery_line(failures, metrics),
    }
    storage.write_json(posixpath.join(run_rel, "result.json"), summary)
    pointer = write_trained(storage, run_dir, summary)
    # short CLI summary
    summary = {k: v for k, v in summary.items() if k not in ("specs", "class_names")}
    summary["pointer"] = pointer
    if summary["recovery"]:
        print(f"[train] {summary['recovery']}", flush=True)
    print(f"[train] done: loss {metrics.get('loss')}, {summary['clips_per_s'] or 0:.1f} clips/s, "
          f"checkpoint {summary['checkpoint']}", flush=True)
    return summary


def _start_coordinator() -> None:
    """Start Ray's autoscaling coordinator (a detached actor the Train controller's first call
    waits for, ~2 s of process start) now, while the driver plans the run; its get-or-create is
    the one the controller calls. A Ray without it: nothing to do."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        return
    get_or_create_autoscaling_coordinator()


def _check_validation(tc: TrainConfig, targets: list[str], n_val: int) -> None:
    """What the store decides (its targets, its validation split); ``pipeline.checks`` checks the
    names at load."""
    from .train_step import validation_metrics
    known = validation_metrics(targets)
    if tc.best_metric not in known:
        raise ValueError(f"train.best_metric {tc.best_metric!r} is not a validation metric of "
                         f"this store; known: {', '.join(known)}")
    if tc.early_stopping_patience and n_val == 0:
        raise ValueError(f"train.early_stopping_patience needs validation clips; split "
                         f"{tc.val_split!r} (train.val_split) has none")


def _rel(storage: Storage, path: str) -> str:
    root = storage.root.rstrip("/")
    path = path.split("://", 1)[-1] if storage.protocol != "file" else path
    if not path.startswith(root + "/"):
        raise ValueError(f"checkpoint path {path!r} is not under the storage root {root!r}")
    return path[len(root) + 1:]
