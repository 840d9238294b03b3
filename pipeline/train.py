"""Train stage: Ray Train ``TorchTrainer`` (DDP) fits a converter for every teacher target plus a
residual classification head on the feature store.

The per-worker loop is ``pipeline.train_loop`` (data path: ``pipeline.train_data``); this module
holds the model pieces, the driver and the Ray Train wiring. Layout under the storage root::

    runs/<job>/train/<job>-<NNN>/            one training run (Ray Train's run directory)
        run.json                             settings a resume must share (written before training)
        step-<step>/                         checkpoints (last train.keep_checkpoints): tokconv.io
                                             model files + train_state.pt (optimiser, scheduler, progress)
        best-<step>/  best.json              the best validated model files, and what made it best
        metrics.jsonl                        the per-step log (below)
        result.json                          written when the run finished: a finished run is never resumed
    runs/<job>/train.json                    pointer for evaluate/export: checkpoint, metrics, model config

Run names come from the job (``<job>-000``, ``<job>-001``, ...): a re-submitted job continues its
last run when that has no result.json (``train.resume: auto``); a worker that dies restarts the
group from the last checkpoint (``FailureConfig``); a finished job's re-run starts the next run.

metrics.jsonl, one JSON object per line, appended while training runs (a resume drops the
records after its checkpoint's step)::

    {"kind": "step", "step", "epoch", "time" (unix s), "loss", "loss.<target>", "loss.head",
     "reg.<name>", "w.<name>", "lr", "grad_norm", "clips_per_s", "data_wait_frac"}
    {"kind": "val", "step", "epoch", "val.<target>.cosine", "val.<target>.r2", "val.top1" (or null),
     "val.mean_cosine"}
"""
from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import time
from typing import Any

import torch
from torch import nn

from tokconv import create_converter
from tokconv.targets import TargetSpec, specs_from_dict, specs_to_dict

from .config import JobConfig
from .featurestore import FeatureStore
from .storage import Storage
from .train_data import plan_blocks

TRAIN_STATE = "train_state.pt"
# worker-side progress: Ray Train's worker log handler prints each record once on the driver
# (a plain print() there is both logged and tee'd, i.e. shown twice)
_log = logging.getLogger(__name__)


def _store_name(job: JobConfig) -> str:
    """The feature store's name (one accessor: the field is moving to the job level)."""
    return job.extract.store


def _model_name(job: JobConfig) -> str:
    """The exported model's name (one accessor: the field is moving to the job level)."""
    return job.export.model_name


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


def build_models(train_cfg, specs: dict[str, TargetSpec], num_classes: int) -> tuple[nn.Module, nn.Module | None]:
    """Converter for all teacher targets (+ ResidualHead when enabled), as configured."""
    from tokconv.heads import ResidualHead

    d = train_cfg.deficiency
    converter = create_converter(train_cfg.converter, student=specs["student"], targets=teacher_specs(specs),
                                 rank=d.rank, mask_ratio=d.mask_ratio, **train_cfg.converter_kwargs)
    head = None
    if train_cfg.head.enabled:
        if num_classes < 1:
            raise ValueError("train.head.enabled: the feature store has no class names (unlabelled videos); "
                             "set train.head.enabled=false")
        head = ResidualHead(student_dim=specs["student"].dim,
                            target_dims={k: s.dim for k, s in teacher_specs(specs).items()},
                            num_classes=num_classes, hidden=train_cfg.head.hidden, dropout=train_cfg.head.dropout)
    return converter, head


def stats_tensors(stats: dict, names, device=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Store stats -> (mean, std) dicts of float32 tensors (dim,) for ``names``."""
    mean = {k: torch.as_tensor(stats[k]["mean"], dtype=torch.float32, device=device) for k in names}
    std = {k: torch.as_tensor(stats[k]["std"], dtype=torch.float32, device=device) for k in names}
    return mean, std




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
        regs = dict(self.converter.regularisers())  # terms of THIS forward; read before the Jacobian pass
        logits = self.head(x, out) if self.head is not None else None
        jac = None
        if with_jacobian:
            from tokconv.deficiency import jacobian_penalty
            conv = self.converter
            jac = jacobian_penalty(lambda z: torch.cat([o.flatten(1) for o in conv.forward_all(z).values()], 1), x)
        return out, logits, regs, jac




def save_model_dir(converter: nn.Module, head: nn.Module | None, path: str) -> None:
    """tokconv.io layout: model.safetensors + config.json (+ head.safetensors + head.json)."""
    from tokconv.io import save_converter, save_head
    save_converter(converter, path)
    if head is not None:
        save_head(head, path)




def _load_weights_from_dir(module: _TrainModule, path: str) -> None:
    """Copy weights of an exported/checkpointed tokconv.io dir into ``module``."""
    from tokconv.io import load_converter, load_head
    module.converter.load_state_dict(load_converter(path).state_dict())
    if module.head is not None and os.path.exists(os.path.join(path, "head.json")):
        module.head.load_state_dict(load_head(path).state_dict())




def _same_config(a: dict, b: dict) -> bool:
    import json
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _warm_start_version(job: JobConfig, storage: Storage, converter, head) -> str | None:
    """The exported `latest` version whose converter/head configs equal the ones to train; else None."""
    name = job.export.model_name
    latest = storage.read_json(f"models/{name}/latest.json", default=None)
    if not latest:
        return None
    base = f"models/{name}/{latest['version']}"
    conf = storage.read_json(f"{base}/config.json", default=None)
    keys = ("name", "student", "targets", "kwargs")  # tokconv.io adds dtype/format_version
    if conf is None or not _same_config({k: conf.get(k) for k in keys}, {k: converter.config.get(k) for k in keys}):
        print(f"[train] warm start skipped: {name}/{latest['version']} has a different converter config")
        return None
    if head is not None:
        hconf = storage.read_json(f"{base}/head.json", default=None)
        if hconf is None or not _same_config(hconf.get("kwargs"), head.config):
            print(f"[train] warm start skipped: {name}/{latest['version']} has a different head config")
            return None
    return latest["version"]


# ---------------------------------------------------------------- driver side

class _RaySession:
    """``pipeline.train_loop``'s view of Ray Train: rank, device, last checkpoint, report."""

    def __init__(self):
        import ray.train
        import ray.train.torch
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.local_world_size = ctx.get_local_world_size()
        self.device = ray.train.torch.get_device()

    def restore(self) -> dict | None:
        import ray.train

        from .train_loop import load_state
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return load_state(d)

    def report(self, metrics: dict, directory: str | None, name: str) -> None:
        import ray.train
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None,
                         checkpoint_dir_name=name)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker; ``config`` is plain data (see ``run_train``)."""
    from .train_loop import run_worker
    run_worker(config, _RaySession())


def resolve_num_workers(tc) -> int:
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
    if tc.num_workers == "auto":
        n = int(gpus) if tc.use_gpu else max(1, sum(1 for r in nodes if r.get("CPU", 0) >= tc.cpus_per_worker))
        if n < 1:
            raise ValueError(f"train.num_workers=auto with train.use_gpu=true: {where} has no GPUs "
                             f"({cpus:g} CPU, 0 GPU)")
    else:
        n = tc.num_workers
    if limits is None and tc.wait_for_workers:
        return n
    gpu_each = 1.0 if tc.use_gpu else 0.0
    if limits:
        fits = min(cpus // tc.cpus_per_worker, gpus // gpu_each if gpu_each else math.inf)
    else:  # each worker on one node
        fits = sum(min(r.get("CPU", 0) // tc.cpus_per_worker, r.get("GPU", 0) // gpu_each if gpu_each else math.inf)
                   for r in nodes)
    if n > fits:
        raise ValueError(
            f"train.num_workers={n} asks for {n * gpu_each:g} GPU and {n * tc.cpus_per_worker:g} CPU "
            f"(train.use_gpu={tc.use_gpu}, train.cpus_per_worker={tc.cpus_per_worker:g} per worker); {where} has "
            f"{gpus:g} GPU and {cpus:g} CPU on {len(nodes)} node(s), room for {int(fits)} worker(s). Lower "
            f"train.num_workers (train.num_workers=auto: one per GPU)"
            + ("" if limits else ", or set train.wait_for_workers=true if an autoscaler will add nodes"))
    return n


def _choose_run(storage: Storage, job: JobConfig, signature: dict) -> tuple[str, dict | None]:
    """(run name, run.json of the unfinished run it continues | None for a new run)."""
    base = posixpath.join("runs", job.name, "train")
    runs = sorted((n for n in storage.ls(base) if re.fullmatch(rf"{re.escape(job.name)}-\d{{3,}}", n)),
                  key=lambda n: int(n.rsplit("-", 1)[1]))
    last = runs[-1] if runs else None
    if last and job.train.resume == "auto" and not storage.exists(base, last, "result.json"):
        info = storage.read_json(posixpath.join(base, last, "run.json"), default=None)
        if info is not None:
            differ = [k for k in signature if json.dumps(info["signature"].get(k), sort_keys=True)
                      != json.dumps(signature[k], sort_keys=True)]
            if differ:
                raise ValueError(f"train.resume=auto: the unfinished run {last} was started with other "
                                 f"{', '.join(differ)}; re-submit with those settings, or train.resume=never "
                                 f"for a new run")
            return last, info
    return f"{job.name}-{int(last.rsplit('-', 1)[1]) + 1 if last else 0:03d}", None


def worker_config(job: JobConfig, storage: Storage, run_rel: str, warm_start: str | None = None) -> dict:
    """What every worker needs, as plain data: the job, storage, store layout and stats, the train and
    validation blocks (``train_data.plan_blocks``), the run's directory and metrics log."""
    tc = job.train
    store = FeatureStore(storage, _store_name(job))
    specs = store.specs()
    if "student" not in specs or not teacher_specs(specs):
        raise ValueError(f"feature store {_store_name(job)!r}: needs 'student' and at least one teacher, "
                         f"has {sorted(specs)}")
    stats = store.stats()
    blocks = plan_blocks(store, "train")  # footers only: no pass over the data
    if not blocks:
        raise ValueError(f"feature store {_store_name(job)!r} has no clips in split 'train'")
    return {"job": job.model_dump(mode="json"),
            # absolute root: a relative local URL would resolve against each worker's own cwd
            "storage_url": storage.root if storage.protocol == "file" else storage.root_url,
            "storage_options": storage.options, "specs": specs_to_dict(specs),
            "stats": {k: {"mean": [float(v) for v in stats[k]["mean"]], "std": [float(v) for v in stats[k]["std"]]}
                      for k in teacher_specs(specs)},
            "class_names": class_names_of(store) if tc.head.enabled else [],
            "num_classes": len(class_names_of(store)) if tc.head.enabled else 0,
            "blocks": blocks, "val_blocks": plan_blocks(store, tc.val_split) if tc.val_split != "train" else [],
            "run_rel": run_rel, "metrics_log": posixpath.join(run_rel, "metrics.jsonl"),
            "warm_start_version": warm_start}


def run_train(job: JobConfig, storage: Storage) -> dict[str, Any]:
    """Train converter + head with Ray Train; returns a summary with the checkpoint URL."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t_start = time.time()
    tc = job.train
    num_workers = resolve_num_workers(tc)
    config = worker_config(job, storage, run_rel="")
    specs, class_names = specs_from_dict(config["specs"]), config["class_names"]
    n_train = sum(len(b["rows"]) for b in config["blocks"])
    n_val = sum(len(b["rows"]) for b in config["val_blocks"])
    _check_validation(tc, list(teacher_specs(specs)), n_val)
    if n_train < num_workers:
        raise ValueError(f"train.num_workers={num_workers}: more workers than the {n_train} train clips")
    steps_per_epoch = -(-(n_train // num_workers) // tc.batch_size)

    converter, head = build_models(tc, specs, len(class_names))  # driver copy: config + parameter count
    signature = {"num_workers": num_workers, "train_clips": n_train, "store": _store_name(job),
                 **tc.model_dump(mode="json", include={"converter", "converter_kwargs", "head", "loss", "optim",
                                                       "deficiency", "epochs", "batch_size", "seed",
                                                       "shuffle_window"})}
    run_name, resumed = _choose_run(storage, job, signature)
    run_rel = posixpath.join("runs", job.name, "train", run_name)
    if resumed:
        warm = resumed.get("warm_start")
    else:
        warm = _warm_start_version(job, storage, converter, head) if tc.warm_start else None
        storage.write_json(posixpath.join(run_rel, "run.json"), {"run": run_name, "signature": signature,
                                                                 "warm_start": warm})
    runs_dir = storage.path("runs", job.name, "train")
    storage.fs.makedirs(runs_dir, exist_ok=True)
    run_config = ray.train.RunConfig(
        name=run_name, storage_path=runs_dir,
        storage_filesystem=storage.pyarrow_filesystem() if storage.protocol != "file" else None,
        failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints))
    config.update(run_rel=run_rel, metrics_log=posixpath.join(run_rel, "metrics.jsonl"), warm_start_version=warm)
    metrics_rel = config["metrics_log"]
    print(f"[train] {tc.converter}: {n_train} train / {n_val} {tc.val_split} clips, {num_workers} workers x "
          f"batch {tc.batch_size}, {tc.epochs} epochs ({steps_per_epoch} steps each), "
          f"{'resuming' if resumed else 'new'} run -> {storage.url(run_rel)}", flush=True)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=run_config)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} finished without a checkpoint")
    last_rel = _rel(storage, result.checkpoint.path)
    best = storage.read_json(posixpath.join(run_rel, "best.json"), default=None)
    ckpt_rel = best["dir"] if tc.result == "best" and best else last_rel
    n_params = sum(p.numel() for p in converter.parameters())
    summary = {
        "run": storage.url(run_rel), "run_name": run_name, "resumed": resumed is not None,
        "checkpoint": storage.url(ckpt_rel), "checkpoint_rel": ckpt_rel, "last_checkpoint_rel": last_rel,
        "best_checkpoint_rel": best["dir"] if best else None, "best": best, "metrics_log": metrics_rel,
        "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str, list, type(None)))},
        "converter": tc.converter, "converter_params": n_params,
        "head_params": sum(p.numel() for p in head.parameters()) if head is not None else 0,
        "class_names": class_names, "train_clips": n_train, "val_clips": n_val, "num_workers": num_workers,
        "warm_start": warm, "specs": specs_to_dict(specs), "started": t_start,
    }
    storage.write_json(posixpath.join(run_rel, "result.json"), summary)
    storage.write_json(posixpath.join("runs", job.name, "train.json"), summary)
    summary = {k: v for k, v in summary.items() if k not in ("specs", "class_names")}  # short CLI summary
    summary["pointer"] = storage.url("runs", job.name, "train.json")
    print(f"[train] done: loss {summary['metrics'].get('loss')} checkpoint {summary['checkpoint']}", flush=True)
    return summary


def _check_validation(tc, targets: list[str], n_val: int) -> None:
    known = {"val.mean_cosine", "val.top1", *(f"val.{t}.{m}" for t in targets for m in ("cosine", "r2"))}
    if tc.best_metric not in known:
        raise ValueError(f"train.best_metric {tc.best_metric!r} is not a validation metric; known: "
                         f"{', '.join(sorted(known))}")
    if tc.early_stopping_patience and n_val == 0:
        raise ValueError(f"train.early_stopping_patience needs validation clips; split {tc.val_split!r} "
                         f"(train.val_split) has none")


def _rel(storage: Storage, path: str) -> str:
    root = storage.root.rstrip("/")
    path = path.split("://", 1)[-1] if storage.protocol != "file" else path
    if not path.startswith(root + "/"):
        raise ValueError(f"checkpoint path {path!r} is not under the storage root {root!r}")
    return path[len(root) + 1:]


def load_trained(job: JobConfig, storage: Storage, dest: str) -> tuple[nn.Module, nn.Module | None, dict]:
    """Download the checkpoint named by runs/<job>/train.json into ``dest``; load converter + head."""
    from tokconv.io import load_converter, load_head
    info = storage.read_json(posixpath.join("runs", job.name, "train.json"), default=None)
    if info is None:
        raise FileNotFoundError(f"no training result at {storage.url('runs', job.name, 'train.json')}; "
                                f"run the train stage first")
    storage.download(info["checkpoint_rel"], dest)
    converter = load_converter(dest).eval()
    head = load_head(dest).eval() if os.path.exists(os.path.join(dest, "head.json")) else None
    return converter, head, info
