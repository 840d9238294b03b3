"""Train stage: Ray Train ``TorchTrainer`` (DDP) fits a converter for every teacher target plus a
residual classification head on the feature store.

``run_train(job, storage)`` (the CLI's entry) unpacks the job into ``train_stage(tc: TrainConfig,
storage, *, store: FeatureStore, registry: ModelRegistry, run_dir: "runs/<job>")``: the stage reads
only its own sub-config. Layout written under the storage root (``pipeline.artifacts``)::

    runs/<job>/train-<UTC stamp>/checkpoint_*/   Ray checkpoints: a model directory + train_state.pt
    runs/<job>/train.json                        pointer: final checkpoint, metrics, model config

Every worker streams its shard of the store with ``get_dataset_shard("train").iter_torch_batches``
and a collate that turns the raw-bytes columns into tensors (``FeatureStore.to_torch``). The
converter learns *standardised* teacher features (store stats); the head reads the student tokens
and the converted (standardised) tokens. Restarts (``FailureConfig``) resume from the last
checkpoint; ``train.warm_start`` starts from the registry's ``latest`` when its config matches.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokconv import create_converter
from tokconv.targets import TargetSpec, specs_from_dict, specs_to_dict

from .artifacts import (
    TRAIN_STATE,
    ModelRegistry,
    job_run_dir,
    load_weights,
    save_model_dir,
    stats_tensors,
    write_trained,
)
from .config import JobConfig, TrainConfig
from .featurestore import FeatureStore
from .storage import Storage, utc_now

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


def _unwrap(model: nn.Module) -> _TrainModule:
    return model.module if hasattr(model, "module") else model


# ---------------------------------------------------------------- the per-worker loop

class _Collate:
    """Arrow batch -> dict of tensors via ``FeatureStore.to_torch`` (raw bytes, no per-element work)."""

    def __init__(self, store: FeatureStore, keys: list[str]):
        self.store, self.keys = store, keys

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        t = self.store.to_torch(batch)
        return {k: t[k] for k in self.keys}


def _collate_fn(store: FeatureStore, keys: list[str]):
    from ray.data.collate_fn import ArrowBatchCollateFn

    class ArrowCollate(_Collate, ArrowBatchCollateFn):
        pass

    return ArrowCollate(store, keys)


def _make_scheduler(optimizer, optim_cfg, total_steps: int):
    from timm.scheduler import CosineLRScheduler
    warmup = min(optim_cfg.warmup_steps, max(total_steps - 1, 0))
    return CosineLRScheduler(optimizer, t_initial=max(total_steps, 1), lr_min=optim_cfg.lr * 0.01,
                             warmup_t=warmup, warmup_lr_init=optim_cfg.lr * 0.01, warmup_prefix=True,
                             t_in_epochs=False)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker; ``config`` is plain data (see ``run_train``)."""
    import ray.train
    import ray.train.torch

    from tokconv.deficiency import WarmupSchedule
    from tokconv.losses import distill_loss

    tc = TrainConfig.model_validate(config["train"])
    storage = Storage(config["storage_url"], config["storage_options"])
    store = FeatureStore(storage, config["store"])
    registry = ModelRegistry(storage, config["model_name"])
    specs = specs_from_dict(config["specs"])
    targets = list(teacher_specs(specs))
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()

    torch.manual_seed(tc.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    converter, head = build_models(tc, specs, config["num_classes"])
    module = _TrainModule(converter=converter, head=head)

    start_epoch, step, state, history, resumed_from, warm_from = 0, 0, None, [], None, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # restart after a failure: resume exactly where the last report left off
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, TRAIN_STATE), map_location="cpu", weights_only=False)
        module.load_state_dict(state["model"])
        start_epoch, step = state["epoch"], state["step"]
        history, resumed_from = list(state["metrics"]["loss_history"]), state["epoch"]
        warm_from = state["metrics"].get("warm_started_from")
        if rank == 0:
            _log.info("[train] resumed from the checkpoint of epoch %d", start_epoch)
    elif config.get("warm_start_version"):
        with tempfile.TemporaryDirectory() as d:
            registry.download(config["warm_start_version"], d)
            load_weights(module.converter, module.head, d)
        warm_from = config["warm_start_version"]
        if rank == 0:
            _log.info("[train] warm start from %s/%s", registry.name, warm_from)

    use_ddp = ctx.get_world_size() > 1
    model = ray.train.torch.prepare_model(
        module, parallel_strategy="ddp" if use_ddp else None,
        parallel_strategy_kwargs={"find_unused_parameters": True} if use_ddp else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.optim.lr, weight_decay=tc.optim.weight_decay)
    total_steps = config["steps_per_epoch"] * tc.epochs
    scheduler = _make_scheduler(optimizer, tc.optim, total_steps)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    mean, std = stats_tensors(config["stats"], targets, device)
    d = tc.deficiency
    sched_w = {"nuclear": WarmupSchedule(d.w_nuclear, d.warmup_steps),
               "selection": WarmupSchedule(d.w_selection, d.warmup_steps)}
    sched_jac = WarmupSchedule(d.w_jacobian, d.warmup_steps)
    keys = ["student", *targets, "label_index"]
    shard = ray.train.get_dataset_shard("train")
    torch.manual_seed(tc.seed * 1000 + rank + 1)  # per-rank randomness (token masking, shuffling)

    for epoch in range(start_epoch, tc.epochs):
        model.train()
        sums = torch.zeros(4, dtype=torch.float64)  # loss, distill, head ce, n batches
        correct = torch.zeros(2, dtype=torch.float64)  # correct, labelled
        for batch in shard.iter_torch_batches(batch_size=tc.batch_size, collate_fn=_collate_fn(store, keys),
                                              local_shuffle_buffer_size=4 * tc.batch_size,
                                              local_shuffle_seed=tc.seed + epoch * 101 + rank):
            x = batch["student"].to(device, torch.float32)
            teach = {k: batch[k].to(device, torch.float32) for k in targets}
            labels = batch["label_index"].to(device).long()
            w_jac = sched_jac(step)
            out, logits, regs, jac = model(x, with_jacobian=w_jac > 0)
            loss, _ = distill_loss(out, teach, mean=mean, std=std, w_cos=tc.loss.w_cos, w_sl1=tc.loss.w_sl1,
                                   target_weights=tc.loss.target_weights or None)
            distill = loss.detach()
            ce = torch.zeros((), device=device)
            if logits is not None and (labels >= 0).any():
                ce = F.cross_entropy(logits, labels, ignore_index=-1)
                loss = loss + tc.loss.w_head * ce
                ok = labels >= 0
                correct += torch.tensor([(logits.argmax(1)[ok] == labels[ok]).sum().item(), ok.sum().item()],
                                        dtype=torch.float64)
            for name, value in regs.items():
                w = sched_w[name](step) if name in sched_w else 0.0
                if w > 0:
                    loss = loss + w * value
            if jac is not None:
                loss = loss + w_jac * jac
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, tc.optim.grad_clip)
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            sums += torch.tensor([loss.item(), distill.item(), ce.item(), 1.0], dtype=torch.float64)

        if use_ddp:  # epoch means over all workers (gloo all_reduce on CPU tensors)
            both = torch.cat([sums, correct]).to(device)
            torch.distributed.all_reduce(both)
            sums, correct = both[:4].cpu(), both[4:].cpu()
        n = max(sums[3].item(), 1.0)
        history.append(sums[0].item() / n)
        metrics = {"epoch": epoch + 1, "step": step, "loss": sums[0].item() / n, "loss_history": list(history),
                   "resumed_from_epoch": resumed_from, "warm_started_from": warm_from,
                   "distill_loss": sums[1].item() / n, "head_loss": sums[2].item() / n,
                   "train_top1": correct[0].item() / correct[1].item() if correct[1] > 0 else None,
                   "lr": optimizer.param_groups[0]["lr"]}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                inner = _unwrap(model)
                save_model_dir(inner.converter, inner.head, tmp)
                torch.save({"model": inner.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "step": step,
                            "metrics": metrics}, os.path.join(tmp, TRAIN_STATE))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                _log.info(f"[train] epoch {epoch + 1}/{tc.epochs} step {step} loss {metrics['loss']:.4f} "
                          f"distill {metrics['distill_loss']:.4f} head {metrics['head_loss']:.4f} "
                          f"lr {metrics['lr']:.2e}")
            ray.train.report(metrics, checkpoint=checkpoint)
        if rank == 0 and config.get("fail_after_epoch") == epoch + 1 and ckpt is None:
            # fault injection ($TOKCONV_FAIL_AFTER_EPOCH, restart tests): first attempt only
            raise RuntimeError(f"injected failure after epoch {epoch + 1}")


# ---------------------------------------------------------------- driver side

def _same_config(a: dict, b: dict) -> bool:
    import json
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


def _rel(storage: Storage, path: str) -> str:
    root = storage.root.rstrip("/")
    path = path.split("://", 1)[-1] if storage.protocol != "file" else path
    if not path.startswith(root + "/"):
        raise ValueError(f"checkpoint path {path!r} is not under the storage root {root!r}")
    return path[len(root) + 1:]


def run_train(job: JobConfig, storage: Storage) -> dict[str, Any]:
    """The CLI's train stage: ``train_stage`` on the job's store, registry and run directory."""
    return train_stage(job.train, storage, store=FeatureStore(storage, job.store),
                       registry=ModelRegistry(storage, job.model_name),
                       run_dir=job_run_dir(job.name))


def train_stage(tc: TrainConfig, storage: Storage, *, store: FeatureStore, registry: ModelRegistry,
                run_dir: str) -> dict[str, Any]:
    """Train converter + head with Ray Train on ``store`` (warm start from ``registry``'s latest);
    checkpoints and the train.json pointer go under ``run_dir``. Returns a summary with the
    checkpoint URL."""
    import ray.train
    from ray.train.torch import TorchTrainer

    specs = store.specs()
    if "student" not in specs or not teacher_specs(specs):
        raise ValueError(f"feature store {store.name!r}: needs 'student' and at least one teacher, "
                         f"has {sorted(specs)}")
    class_names = class_names_of(store) if tc.head.enabled else []
    stats = store.stats()
    stats_plain = {k: {"mean": [float(v) for v in stats[k]["mean"]], "std": [float(v) for v in stats[k]["std"]]}
                   for k in teacher_specs(specs)}
    n_train = store.num_clips("train")  # from the commit records: no pass over the data
    if n_train == 0:
        raise ValueError(f"feature store {store.name!r} has no clips in split 'train'")
    ds = store.read_dataset(split="train")
    store_mb = sum(r["bytes"] for r in store.commits()) / 2**20
    if store_mb <= tc.materialize_max_mb:  # small: read once, not once per epoch
        ds = ds.materialize()
    per_step = tc.batch_size * tc.num_workers
    steps_per_epoch = -(-n_train // per_step)

    converter, head = build_models(tc, specs, len(class_names))  # driver copy: config + parameter count
    warm = _warm_start_version(registry, converter, head) if tc.warm_start else None

    run_name = f"train-{utc_now(basic=True)}"
    runs_dir = storage.path(run_dir)
    storage.fs.makedirs(runs_dir, exist_ok=True)
    run_config = ray.train.RunConfig(
        name=run_name, storage_path=runs_dir,
        storage_filesystem=storage.pyarrow_filesystem() if storage.protocol != "file" else None,
        failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2))
    # absolute root: a relative local URL would resolve against each worker's own cwd
    config = {"train": tc.model_dump(mode="json"), "store": store.name, "model_name": registry.name,
              "storage_url": storage.root if storage.protocol == "file" else storage.root_url,
              "storage_options": storage.options, "specs": specs_to_dict(specs), "stats": stats_plain,
              "num_classes": len(class_names), "steps_per_epoch": steps_per_epoch, "warm_start_version": warm,
              "fail_after_epoch": int(os.environ.get("TOKCONV_FAIL_AFTER_EPOCH", "0"))}
    print(f"[train] {tc.converter}: {n_train} train clips, {tc.num_workers} workers x batch {tc.batch_size}, "
          f"{tc.epochs} epochs ({steps_per_epoch} steps each) -> {storage.url(run_dir, run_name)}",
          flush=True)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=run_config, datasets={"train": ds})
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} finished without a checkpoint")
    ckpt_rel = _rel(storage, result.checkpoint.path)
    n_params = sum(p.numel() for p in converter.parameters())
    summary = {
        "run": storage.url(run_dir, run_name),
        "checkpoint": storage.url(ckpt_rel), "checkpoint_rel": ckpt_rel,
        "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str, list, type(None)))},
        "converter": tc.converter, "converter_params": n_params,
        "head_params": sum(p.numel() for p in head.parameters()) if head is not None else 0,
        "class_names": class_names, "train_clips": n_train, "warm_start": warm,
        "specs": specs_to_dict(specs),
    }
    pointer = write_trained(storage, run_dir, summary)
    summary = {k: v for k, v in summary.items() if k not in ("specs", "class_names")}  # short CLI summary
    summary["pointer"] = pointer
    print(f"[train] done: loss {summary['metrics'].get('loss')} checkpoint {summary['checkpoint']}", flush=True)
    return summary

