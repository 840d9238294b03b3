"""The per-worker training loop: the same code under Ray Train (``pipeline.train``) and torchrun
(``LocalSession``; bench/train.py).

One step: the rank's batch arrives on the device (``pipeline.train_data``), converter + head run
under bf16 autocast on CUDA (fp32 master weights), DDP averages the gradients
(``find_unused_parameters`` only when a design leaves parameters out of the loss), the gradient
norm is clipped, fused AdamW steps, timm's warm-up + cosine schedule sets the lr. Every step's RNG
is seeded from (seed, rank, step) and the data order from (seed, epoch, rank): a run resumed from
a checkpoint at step s takes exactly the steps an uninterrupted run would.

Rank 0 validates on the held-out split every ``val_every_steps`` and at epoch ends
(``pipeline.evaluate.FidelityMeter``: cosine and R^2 per target, head top-1), keeps the best model
apart, writes the per-step metrics log, and saves checkpoints (model files, optimiser, scheduler,
step, epoch, position in the epoch) through the session at ``checkpoint_every_steps`` and epoch
ends.
"""
from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from tokconv.targets import specs_from_dict

from .artifacts import TRAIN_STATE, ModelRegistry, load_weights, save_model_dir, stats_tensors
from .config import TrainConfig
from .featurestore import FeatureStore
from .storage import Storage
from .train import _TrainModule, build_models, teacher_specs
from .train_data import ClipReader
from .train_plan import resolve_cache
from .train_step import (
    Objective,
    finite,
    make_optimizer,
    make_scheduler,
    seed_step,
    step_once,
    validate,
    wrap_ddp,
)

_log = logging.getLogger(__name__)


# ---------------------------------------------------------------- sessions

class LocalSession:
    """Training without Ray Train (one process, or torchrun): rank and world from torch.distributed,
    checkpoints in the local directory ``root`` (the latest ``keep`` kept)."""

    def __init__(self, root: str | None = None, device: torch.device | None = None, keep: int = 2):
        on = dist.is_initialized()
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.device = device or torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
                                             if torch.cuda.is_available() else "cpu")
        self.root, self.keep = root, keep

    def restore(self) -> dict | None:
        names = sorted(os.listdir(self.root)) if self.root and os.path.isdir(self.root) else []
        return load_state(os.path.join(self.root, names[-1])) if names else None

    def report(self, metrics: dict, directory: str | None, name: str) -> None:
        if self.rank == 0 and directory and self.root:
            shutil.copytree(directory, os.path.join(self.root, name), dirs_exist_ok=True)
            for old in sorted(os.listdir(self.root))[:-self.keep]:
                shutil.rmtree(os.path.join(self.root, old))


def load_state(directory: str) -> dict:
    return torch.load(os.path.join(directory, TRAIN_STATE), map_location="cpu", weights_only=False)


# ---------------------------------------------------------------- metrics log

class MetricsLog:
    """The per-step JSONL log (rank 0): one record per step, one per validation (schema in
    pipeline/train.py). Kept readable while training runs: appended locally, re-written on object
    stores (no append there). A resume keeps only records up to the checkpoint's step."""

    def __init__(self, storage: Storage, rel: str, keep_through: int):
        self.storage, self.rel = storage, rel
        old = storage.read_bytes(rel).decode().splitlines() if storage.exists(rel) else []
        self.lines = [ln for ln in old if _step_of(ln) <= keep_through]
        self.storage.write_bytes(rel, "".join(ln + "\n" for ln in self.lines).encode())
        self.written = len(self.lines)
        self.pending: list[tuple[dict, list[str], torch.Tensor]] = []

    def step(self, host: dict, terms: dict[str, torch.Tensor]) -> None:
        """A step record: ``host`` fields now, the device scalars ``terms`` copied at the next
        flush."""
        values = torch.stack([v.detach().float() for v in terms.values()])
        self.pending.append((host, list(terms), values))

    def add(self, record: dict) -> None:
        self._drain()
        self.lines.append(json.dumps(record))

    def _drain(self) -> None:
        if not self.pending:
            return
        # one sync for all of them
        values = torch.cat([v for _, _, v in self.pending]).cpu().tolist()
        i = 0
        for host, names, v in self.pending:
            rec = dict(host)
            for n, x in zip(names, values[i:i + len(names)]):
                rec[n] = finite(x)
            i += len(names)
            self.lines.append(json.dumps(rec))
        self.pending = []

    def flush(self) -> None:
        self._drain()
        new = self.lines[self.written:]
        if not new:
            return
        if self.storage.protocol == "file":
            with open(self.storage.path(self.rel), "a") as f:
                f.writelines(ln + "\n" for ln in new)
        else:
            self.storage.write_bytes(self.rel, "".join(ln + "\n" for ln in self.lines).encode())
        self.written = len(self.lines)


def _step_of(line: str) -> float:
    """A record's step; a line torn by a killed writer counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


# ---------------------------------------------------------------- the loop

@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""
    step: int = 0
    epoch: int = 0
    pos: int = 0                       # batches done in ``epoch``
    epoch_loss: float = 0.0            # sum of this epoch's step losses over ranks so far
    loss_history: list = field(default_factory=list)
    best: float | None = None
    best_step: int | None = None
    stale: int = 0                     # validations since the best
    last_val: dict = field(default_factory=dict)
    finished: bool = False
    resumed_from_step: int | None = None
    warm_started_from: str | None = None
    clips: int = 0                     # clips trained, all ranks
    train_seconds: float = 0.0         # first step to last checkpoint, restarts' lost work excluded


def run_worker(cfg: dict, session, started: dict | None = None) -> None:
    """Train on this rank; ``cfg`` is plain data (``pipeline.train.worker_config``), ``session``
    gives rank / world / device, ``restore() -> train state | None`` and ``report(metrics, dir,
    name)``. ``started``: unix times of the worker's start-up so far (``pipeline.train_worker``);
    rank 0 logs them with the later ones on its first step record as ``start.<phase>``."""
    t_enter = time.perf_counter()
    started = {**(started or {}), "loop": time.time()}
    tc = TrainConfig.model_validate(cfg["train"])
    storage = Storage(cfg["storage_url"], cfg["storage_options"])
    store = FeatureStore(storage, cfg["store"])
    specs = specs_from_dict(cfg["specs"])
    targets = list(teacher_specs(specs))
    rank, world, device = session.rank, session.world_size, session.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")

    state = session.restore()
    prog = Progress(**state["progress"]) if state else Progress()
    if prog.finished:
        return
    names = ["student", *targets]
    local = getattr(session, "local_world_size", 1)
    layouts = {n: store.layouts()[n] for n in names}
    n_rank = sum(len(b["rows"]) for b in cfg["blocks"]) // world
    reader = ClipReader(store, cfg["blocks"], names, rank=rank, world=world,
                        batch_size=tc.batch_size, device=device, seed=tc.seed,
                        window=tc.shuffle_window, read_ahead=tc.read_ahead,
                        cache=resolve_cache(tc.cache, n_rank, layouts, device, local))
    # the first window reads while the model is built, loaded and wrapped
    first = reader.batches(prog.epoch, start=prog.pos) if prog.epoch < tc.epochs else None
    started["reader"] = time.time()

    torch.manual_seed(tc.seed)  # same init on every rank
    converter, head = build_models(tc, specs, cfg["num_classes"])
    module = _TrainModule(converter=converter, head=head)
    if state:
        module.load_state_dict(state["model"])
        prog.resumed_from_step = prog.step
    elif cfg.get("warm_start_version"):
        with tempfile.TemporaryDirectory() as d:
            ModelRegistry(storage, cfg["model_name"]).download(cfg["warm_start_version"], d)
            load_weights(module.converter, module.head, d)
        prog.warm_started_from = cfg["warm_start_version"]
    module.to(device)
    t_model = time.perf_counter() - t_enter
    started["models"] = time.time()
    model = wrap_ddp(module, device, world, (specs["student"].tokens, specs["student"].dim))
    started["ddp"] = time.time()
    params = [p for p in module.parameters() if p.requires_grad]

    val = None
    if rank == 0 and cfg["val_blocks"]:
        n_val = sum(len(b["rows"]) for b in cfg["val_blocks"])
        # cached on the device only if it fits beside the train split
        val_cache = "none" if tc.cache == "none" else resolve_cache(
            tc.cache, n_val + n_rank, layouts, device, local)
        val = ClipReader(store, cfg["val_blocks"], names, rank=0, world=1,
                         batch_size=tc.batch_size, device=device, shuffle=False,
                         read_ahead=tc.read_ahead, cache=val_cache)
    optimizer = make_optimizer(params, tc.optim, device)
    scheduler = make_scheduler(optimizer, tc.optim, reader.steps_per_epoch * tc.epochs)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    scheduler.step_update(prog.step)
    mean, std = stats_tensors(cfg["stats"], targets, device)
    objective = Objective(tc, mean, std, bf16=bf16)
    log = MetricsLog(storage, cfg["metrics_log"], keep_through=prog.step) if rank == 0 else None
    if rank == 0:
        _log.info("[train] rank 0: %d clips, %d steps per epoch, cache %s, %s, from step %d",
                  reader.num_clips, reader.steps_per_epoch, reader.cache,
                  "bf16 autocast" if bf16 else "fp32", prog.step)

    def validate_now() -> bool:
        """Rank 0 validates, logs, keeps the best; every rank learns whether to stop early."""
        stop = False
        if val is not None:
            res = validate(module, val, mean, std, bf16=bf16)
            prog.last_val = res
            log.add({"kind": "val", "step": prog.step, "epoch": prog.epoch, **res})
            value = res.get(tc.best_metric)
            better = value is not None and (prog.best is None or (
                value > prog.best + tc.early_stopping_min_delta if tc.best_mode == "max"
                else value < prog.best - tc.early_stopping_min_delta))
            if better:
                prog.best, prog.best_step, prog.stale = value, prog.step, 0
                save_best(storage, cfg["run_rel"], module, prog, tc.best_metric)
            else:
                prog.stale += 1
            patience = tc.early_stopping_patience
            stop = patience is not None and prog.stale >= patience
            _log.info("[train] step %d val %s: %s%s", prog.step, tc.best_metric, value,
                      " (best)" if better else "")
        if world > 1:
            flag = torch.tensor([float(stop)], device=device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        return stop

    clock = {"since": None}  # start of the training time not yet in prog.train_seconds

    def checkpoint() -> None:
        if clock["since"] is not None:  # the work queued on the device is part of the steps
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            prog.train_seconds += now - clock["since"]
            clock["since"] = now
        metrics = {"step": prog.step, "epoch": prog.epoch, "pos": prog.pos,
                   "finished": prog.finished,
                   "loss": prog.loss_history[-1] if prog.loss_history else None,
                   "loss_history": list(prog.loss_history),
                   "resumed_from_step": prog.resumed_from_step,
                   "warm_started_from": prog.warm_started_from, "best": prog.best,
                   "best_step": prog.best_step, "clips": prog.clips,
                   "train_seconds": prog.train_seconds, **prog.last_val}
        name = f"step-{prog.step:08d}"
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                log.flush()
                save_model_dir(module.converter, module.head, tmp)
                torch.save({"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "progress": asdict(prog)},
                           os.path.join(tmp, TRAIN_STATE))
            session.report(metrics, tmp if rank == 0 else None, name)

    while prog.epoch < tc.epochs and not prog.finished:
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        stop = False
        batches, first = first or reader.batches(prog.epoch, start=prog.pos), None
        try:
            while not stop:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                t1 = time.perf_counter()
                if t_enter is not None:  # where a worker's start-up went
                    clock["since"] = t0
                    unix = time.time() - time.perf_counter()
                    started.update(ready=unix + t0, first_batch=unix + t1)
                    if rank == 0:
                        _log.info("[train] rank 0: first batch %.1f s after the loop started "
                                  "(models on the device %.1f s)", t1 - t_enter, t_model)
                    t_enter = None
                else:
                    started = {}
                seed_step(tc.seed, rank, prog.step)
                weights = objective.weights(prog.step)
                loss, terms, grad_norm = step_once(model, objective, optimizer, params, batch,
                                                   prog.step, tc.optim.grad_clip)
                lr = optimizer.param_groups[0]["lr"]
                prog.step, prog.pos = prog.step + 1, prog.pos + 1
                prog.clips += batch["student"].shape[0] * world  # equal batches on every rank
                scheduler.step_update(prog.step)
                loss_sum += loss.detach()
                if rank == 0:
                    dt = time.perf_counter() - t0
                    log.step({"kind": "step", "step": prog.step, "epoch": prog.epoch,
                              "time": time.time(), "lr": lr,
                              **{f"w.{k}": v for k, v in weights.items() if f"reg.{k}" in terms},
                              "clips_per_s": batch["student"].shape[0] * world / dt,
                              "data_wait_frac": (t1 - t0) / dt,
                              **{f"start.{k}": v for k, v in started.items() if v is not None}},
                             {"loss": loss, **terms, "grad_norm": grad_norm})
                    if prog.step % tc.log_every_steps == 0:
                        log.flush()
                # epoch ends validate and checkpoint below
                inside = prog.pos < reader.steps_per_epoch
                if inside and tc.val_every_steps and prog.step % tc.val_every_steps == 0:
                    stop = validate_now()
                every = tc.checkpoint_every_steps
                if stop or (inside and every and prog.step % every == 0):
                    prog.epoch_loss += _all_sum(loss_sum, world)
                    loss_sum.zero_()
                    prog.finished = stop
                    checkpoint()
        finally:
            batches.close()
        if stop:
            break
        prog.epoch_loss += _all_sum(loss_sum, world)
        prog.loss_history.append(prog.epoch_loss / (reader.steps_per_epoch * world))
        stop = validate_now()
        prog.epoch, prog.pos, prog.epoch_loss = prog.epoch + 1, 0, 0.0
        prog.finished = stop or prog.epoch == tc.epochs
        if rank == 0:
            _log.info("[train] epoch %d/%d step %d loss %.4f", prog.epoch, tc.epochs, prog.step,
                      prog.loss_history[-1])
        checkpoint()
    if rank == 0:
        log.flush()


def _all_sum(x: torch.Tensor, world: int) -> float:
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return float(x.item())


def save_best(storage: Storage, run_rel: str, module: _TrainModule, prog: Progress,
              metric: str) -> None:
    """Model files of the best validation so far under <run>/best-<step>/, then best.json names it
    (written last: a crash in between leaves the previous best named), then the previous one
    goes."""
    rel = posixpath.join(run_rel, f"best-{prog.step:08d}")
    old = storage.read_json(posixpath.join(run_rel, "best.json"), default=None)
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(module.converter, module.head, tmp)
        storage.makedirs(storage.path(rel))
        for f in os.listdir(tmp):
            storage.fs.put_file(os.path.join(tmp, f), storage.path(rel, f))
    storage.write_json(posixpath.join(run_rel, "best.json"),
                       {"dir": rel, "step": prog.step, "epoch": prog.epoch, "metric": metric,
                        "value": prog.best})
    if old and old["dir"] != rel and storage.exists(old["dir"]):
        storage.fs.rm(storage.path(old["dir"]), recursive=True)
