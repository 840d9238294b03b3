"""Evaluate stage: fidelity of the trained converter per teacher target, head accuracy, and cost.

Reads the checkpoint named by ``runs/<job>/train.json`` and the held-out split of the feature
store (plain pyarrow reader, no Ray). ``run_evaluate(job, storage)`` (the CLI's entry) unpacks the
job into ``evaluate_stage(cfg: EvaluateConfig, storage, *, store: FeatureStore, registry:
ModelRegistry, run_dir: "runs/<job>", train: TrainConfig)``. Beside the model it scores the
current ``latest`` and the floor: ``evaluate.floor: auto`` trains ``baseline_interp_linear`` with
``train``'s budget once (``pipeline.budget``: Ray Train, resumable, reused while settings and store
are unchanged) and scores it on the same split. Writes under the storage root::

    runs/<job>/eval/metrics.json          metrics: fidelity, head, "converter" (cost), "latest",
                                          "floor" (its headline figures, or {"skipped": why})
    runs/<job>/eval/sample.safetensors    reference I/O: "student" (k, N, Ds) input, "out.<target>"
                                          outputs and "logits" of the evaluated model on k clips
    runs/<job>/eval/details.json          per-clip / per-token / per-class data for the report
                                          (``DETAILS_SCHEMA``, below; too large for metrics.json)
    runs/<job>/eval/report.html           pipeline.report (plots need matplotlib)
    runs/<job>/floor/                     the floor: its runs, train.json, budget.json, eval/

details.json (compact JSON; C clips, N_t tokens of target t, K classes)::

    {"schema": "tokconv.eval.details/1", "clips": C,
     "video_ids": [C str] | null,                  # clip order of the per-clip lists
     "targets": {t: {"tokens": N_t, "grid": [T, H, W] | null,
                     "per_clip_cosine": [C floats],   # mean token cosine of each clip
                     "per_token_cosine": [N_t floats]}},  # token cosine averaged over clips,
                                                          # row-major on the grid (t*H*W + h*W + w)
     "head": {"class_names": [K str], "confusion": [K][K ints],  # row: true class, column: top-1
              "support": [K ints], "per_class_accuracy": [K floats | null]} | null}

Fidelity is measured in the standardised teacher space the converter learns (store mean/std):
mean per-token cosine, MSE, and pooled R^2 = 1 - SSE / SST with SST about the split's own
per-channel mean.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import posixpath
import statistics
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .artifacts import EVAL_DIR, ModelRegistry, job_run_dir, load_trained, stats_tensors
from .config import EvaluateConfig, JobConfig, TrainConfig
from .featurestore import FeatureStore, device_label
from .meters import ConfusionMeter, FidelityMeter, topk_correct
from .storage import Storage

SAMPLE_CLIPS = 2
DETAILS_SCHEMA = "tokconv.eval.details/1"
# what metrics.json holds for promotion (export.metric and the job checks read these), True where
# higher is better: mean_<m> over targets and targets.<t>.<m> per fidelity metric, and the head's
FIDELITY_METRICS = {"cosine": True, "mse": False, "r2": True}
HEAD_METRICS = {"top1": True, "top5": True}
FLOOR_DIR = "floor"  # <run_dir>/floor/: the floor's training runs, train.json and eval/
# the floor's figures metrics.json keeps under "floor" (its own metrics.json has them all)
FLOOR_KEYS = ("clips", "targets", "mean_cosine", "mean_mse", "mean_r2", "top1", "top5",
              "mean_class_accuracy", "converter", "checkpoint")


def promotion_metrics(targets: Iterable[str]) -> dict[str, bool]:
    """Every metrics.json key ``export.metric`` may name -> whether higher is better."""
    return {**{f"mean_{m}": up for m, up in FIDELITY_METRICS.items()}, **HEAD_METRICS,
            **{f"targets.{t}.{m}": up for t in targets for m, up in FIDELITY_METRICS.items()}}


def gflops_per_clip(converter: nn.Module, student_shape: tuple[int, int]) -> float:
    """FLOPs (2 per multiply-add, torch.utils.flop_counter) of forward_all on one clip, in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros(1, *student_shape)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        converter.forward_all(x)
    return counter.get_total_flops() / 1e9


def latency_ms(converter: nn.Module, student_shape: tuple[int, int], repeats: int = 5,
               device: str | torch.device = "cpu", batch: int = 1) -> float:
    """Median wall time of forward_all on a batch of ``batch`` clips on ``device`` (after one
    warm-up run; CUDA-synchronised), in ms per clip."""
    device = torch.device(device)
    model = copy.deepcopy(converter).to(device).eval()
    x = torch.randn(batch, *student_shape, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        model.forward_all(x)
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            model.forward_all(x)
            sync()
            times.append((time.perf_counter() - t0) * 1e3 / batch)
    return statistics.median(times)


def evaluate_model(converter: nn.Module, head: nn.Module | None,
                   batches: Iterable[dict[str, torch.Tensor]],
                   *, mean: dict[str, torch.Tensor], std: dict[str, torch.Tensor],
                   device: str | torch.device = "cpu", output_map=None,
                   class_names: list[str] | None = None, return_details: bool = False):
    """Run ``converter`` (+ ``head``) over ``batches`` ({"student": (B,N,Ds), <target>: (B,Nt,Dt),
    "label_index": (B,), optional "video_id": [B str]}) on ``device``; returns (metrics, sample)
    where sample holds the reference I/O of the first ``SAMPLE_CLIPS`` clips, computed on CPU
    (portable bit-exact reference). ``output_map(out) -> out`` (optional) maps outputs into this
    ``mean``/``std`` space for the fidelity metrics only (a model trained on other store stats);
    the head sees the raw outputs. ``class_names`` (K, the head's classes) label the confusion
    matrix. With ``return_details`` returns (metrics, sample, details), details in the
    details.json layout of the module docstring."""
    from tokconv.losses import standardize
    num_classes = ((getattr(head, "config", None) or {}).get("num_classes")
                   if head is not None else None)
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise ValueError(f"evaluate: {len(class_names)} class_names "
                         f"for a head of {num_classes} classes")
    device = torch.device(device)
    cpu_models = (copy.deepcopy(converter).cpu().eval(),
                  copy.deepcopy(head).cpu().eval() if head else None)
    converter = converter.to(device).eval()
    if head is not None:
        head = head.to(device).eval()
    mean = {k: v.to(device) for k, v in mean.items()}
    std = {k: v.to(device) for k, v in std.items()}
    targets = list(mean)
    meters: dict[str, FidelityMeter] = {}
    confusion: ConfusionMeter | None = None
    correct = {1: 0, 5: 0}
    labelled = clips = 0
    video_ids: list[str] | None = []
    sample: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for batch in batches:
            x = batch["student"].to(device, torch.float32)
            out = converter.forward_all(x)
            fid = output_map(out) if output_map is not None else out
            for t in targets:
                teach = standardize(batch[t].to(device, torch.float32), mean[t], std[t])
                meters.setdefault(t, FidelityMeter(teach.shape[-1])).update(fid[t], teach)
            labels = batch["label_index"].to(device).long()
            if head is not None:
                logits = head(x, out)
                for k, v in topk_correct(logits, labels).items():
                    correct[k] += v
                confusion = confusion or ConfusionMeter(logits.shape[1])
                confusion.update(logits, labels)
            labelled += int((labels >= 0).sum())
            clips += x.shape[0]
            ids = batch.get("video_id")
            video_ids = video_ids + list(ids) if video_ids is not None and ids is not None else None
            if not sample:  # its own CPU forward on exactly these inputs, so a consumer can redo it
                conv_cpu, head_cpu = cpu_models
                xs = x[:SAMPLE_CLIPS].cpu().contiguous()
                outs = conv_cpu.forward_all(xs)
                sample = {"student": xs, **{f"out.{t}": outs[t].contiguous() for t in targets}}
                if head_cpu is not None:
                    sample["logits"] = head_cpu(xs, outs).contiguous()
    if clips == 0:
        raise ValueError("evaluate: the split has no clips")
    per_target = {t: m.compute() for t, m in meters.items()}
    head_details = confusion.compute() if confusion is not None else None
    metrics: dict[str, Any] = {
        "clips": clips, "targets": per_target,
        **{f"mean_{m}": statistics.fmean(v[m] for v in per_target.values())
           for m in FIDELITY_METRICS},
        "labelled_clips": labelled,
        "top1": correct[1] / labelled if head is not None and labelled else None,
        "top5": correct[5] / labelled if head is not None and labelled else None,
        "mean_class_accuracy": head_details.pop("mean_class_accuracy") if head_details else None,
    }
    if not return_details:
        return metrics, sample
    if head_details is not None:
        k = len(head_details["support"])
        if class_names is not None and len(class_names) != k:
            raise ValueError(f"evaluate: {len(class_names)} class_names for {k} head outputs")
        head_details = {"class_names": list(class_names) if class_names is not None else
                        [str(i) for i in range(k)], **head_details}
    specs = getattr(converter, "targets", None) or {}
    details = {"schema": DETAILS_SCHEMA, "clips": clips, "video_ids": video_ids,
               "targets": {t: {"tokens": len(d["per_token_cosine"]),
                               "grid": (list(specs[t].grid)
                                        if t in specs and specs[t].grid else None),
                               **d}
                           for t, d in ((t, meters[t].details()) for t in targets)},
               "head": head_details}
    return metrics, sample, details


def details_json(details: dict) -> bytes:
    """details -> compact JSON bytes (floats to 6 decimals: cosines need no more)."""
    def r(v):
        if isinstance(v, float):
            return round(v, 6) if math.isfinite(v) else None
        if isinstance(v, list):
            return [r(x) for x in v]
        if isinstance(v, dict):
            return {k: r(x) for k, x in v.items()}
        return v
    return json.dumps(r(details), separators=(",", ":")).encode()


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes (bit-exact comparison key)."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def evaluate_latest(cfg: EvaluateConfig, store: FeatureStore, registry: ModelRegistry, *, mean, std,
                    device: str) -> dict[str, Any] | None:
    """Evaluate the registry's current ``latest`` model on the same split, so export compares both
    on today's data. Its outputs are mapped from its own standardisation (exported with it) into
    the store's current one. None when nothing is exported; {"version", "skipped"} when its token
    layouts differ from the store's."""
    from tokconv.losses import destandardize, standardize

    latest = registry.latest()
    if latest is None:
        return None
    model = registry.load(latest["version"])
    conv, head = model.converter, model.head
    specs = {k: v.to_dict() for k, v in store.specs().items()}
    layouts = {"student": conv.config["student"], **conv.config["targets"]}
    if layouts != {k: specs.get(k) for k in layouts} or set(conv.config["targets"]) != set(mean):
        return {"version": model.version,
                "skipped": "its token layouts differ from the feature store's"}
    n_classes = len(store.read_meta().get("class_names", []))
    if head is not None and head.config["num_classes"] != n_classes:
        head = None  # other classes: fidelity only
    dev = torch.device(device)
    old_mean = {t: model.mean[t].to(dev) for t in mean}
    old_std = {t: model.std[t].to(dev) for t in mean}
    cur_mean = {t: v.to(dev) for t, v in mean.items()}
    cur_std = {t: v.to(dev) for t, v in std.items()}

    def to_current(out):
        return {t: standardize(destandardize(o, old_mean[t], old_std[t]), cur_mean[t], cur_std[t])
                for t, o in out.items()}

    batches = store.iter_torch(split=cfg.split, batch_size=cfg.batch_size)
    m, _ = evaluate_model(conv, head, batches, mean=mean, std=std, device=device,
                          output_map=to_current)
    return {"version": model.version, **m}


def run_evaluate(job: JobConfig, storage: Storage) -> dict[str, Any]:
    """The CLI's evaluate stage: ``evaluate_stage`` on the job's store, registry and run dir, with
    the job's train config for the floor."""
    return evaluate_stage(job.evaluate, storage, store=FeatureStore(storage, job.store),
                          registry=ModelRegistry(storage, job.model_name),
                          run_dir=job_run_dir(job.name), metric=job.export.metric,
                          higher_is_better=job.export.higher_is_better, train=job.train)


def floor_to_train(job: JobConfig, storage: Storage) -> bool:
    """Whether the evaluate stage of ``job`` will train the floor (it then needs Ray)."""
    from .budget import FLOOR, budget_config, budget_key, finished_run
    if job.evaluate.floor == "off" or job.train.converter == FLOOR:
        return False
    key = budget_key(budget_config(job.train, FLOOR), FeatureStore(storage, job.store))
    return finished_run(storage, posixpath.join(job_run_dir(job.name), FLOOR_DIR), key) is None


def _device(cfg: EvaluateConfig) -> str:
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return "cuda" if use_cuda else "cpu"


def score_run(cfg: EvaluateConfig, storage: Storage, *, store: FeatureStore, run_dir: str,
              device: str) -> tuple[dict[str, Any], dict, dict, dict]:
    """The checkpoint named by ``<run_dir>/train.json`` on ``cfg.split`` of ``store``: fidelity,
    head accuracy and cost on ``device``; returns (metrics, sample, details, train.json). The cost
    adds ``converter.like_backbones`` when the store's meta holds the backbones' latency: the
    converter timed at their batch on their kind of device (when this host has it)."""
    with tempfile.TemporaryDirectory() as tmp:
        converter, head, info = load_trained(storage, run_dir, tmp)
    targets = list(converter.config["targets"])
    mean, std = stats_tensors(store.stats(), targets)
    meta = store.read_meta()
    batches = store.iter_torch(split=cfg.split, batch_size=cfg.batch_size)
    print(f"[evaluate] {info['converter']} on split {cfg.split!r} of store {store.name!r}",
          flush=True)
    class_names = meta.get("class_names") if head is not None else None
    metrics, sample, details = evaluate_model(converter, head, batches, mean=mean, std=std,
                                              device=device, class_names=class_names,
                                              return_details=True)
    converter, head = converter.cpu(), head.cpu() if head is not None else None
    shape = tuple(sample["student"].shape[1:])
    lat = latency_ms(converter, shape, device=device)
    cost = {
        "name": converter.config["name"],
        "params": sum(p.numel() for p in converter.parameters()),
        "head_params": sum(p.numel() for p in head.parameters()) if head is not None else 0,
        "gflops_per_clip": gflops_per_clip(converter, shape),
        "latency_ms_per_clip": lat,
        "latency_device": device_label(device),
        "latency_ms_per_clip_cpu": lat if device == "cpu" else latency_ms(converter, shape),
    }
    where = meta.get("backbone_device") or ""
    kind = "cuda" if where.startswith("cuda") else "cpu"
    if where and (kind == "cpu" or torch.cuda.is_available()):
        batch = int(meta.get("backbone_latency_batch") or 1)
        cost["like_backbones"] = {"latency_ms_per_clip": latency_ms(converter, shape, device=kind,
                                                                    batch=batch),
                                  "device": device_label(kind), "batch": batch}
    metrics.update(converter=cost, split=cfg.split, checkpoint=info["checkpoint"])
    return metrics, sample, details, info


def _floor(cfg: EvaluateConfig, storage: Storage, *, store: FeatureStore, registry: ModelRegistry,
           run_dir: str, train: TrainConfig | None, device: str) -> dict[str, Any]:
    """metrics.json's "floor": the floor's headline numbers (``FLOOR_KEYS``), trained once with
    ``train``'s budget under ``<run_dir>/floor/`` and scored on this split; {"skipped": why}."""
    from .budget import FLOOR, budget_config, train_once
    if cfg.floor == "off":
        return {"skipped": "evaluate.floor is off"}
    if train is None:
        return {"skipped": "no train config was given to train it with"}
    if train.converter == FLOOR:
        return {"skipped": f"this model is the floor ({FLOOR})"}
    floor_dir = posixpath.join(run_dir, FLOOR_DIR)
    info, trained = train_once(budget_config(train, FLOOR), storage, store=store,
                               registry=registry, run_dir=floor_dir)
    m, _, _, _ = score_run(cfg, storage, store=store, run_dir=floor_dir, device=device)
    m["train"] = info.get("metrics", {})
    rel = posixpath.join(floor_dir, EVAL_DIR, "metrics.json")
    storage.write_json(rel, m)
    print(f"[evaluate] floor {FLOOR}: mean cosine {m['mean_cosine']:.4f} "
          f"({'trained now' if trained else 'reused'})", flush=True)
    return {**{k: m[k] for k in FLOOR_KEYS if k in m}, "run": info.get("run"),
            "trained_now": trained, "metrics_url": storage.url(rel)}


def evaluate_stage(cfg: EvaluateConfig, storage: Storage, *, store: FeatureStore,
                   registry: ModelRegistry, run_dir: str, metric: str = "mean_cosine",
                   higher_is_better: bool = True, train: TrainConfig | None = None,
                   compare_latest: bool = True) -> dict[str, Any]:
    """Evaluate the checkpoint trained under ``run_dir`` on ``cfg.split`` of ``store``, beside
    ``registry``'s current latest (``compare_latest``) and the floor (``cfg.floor``, trained with
    ``train``); writes ``<run_dir>/eval/metrics.json`` (+ sample, details, report)."""
    from safetensors.torch import save

    device = _device(cfg)
    metrics, sample, details, info = score_run(cfg, storage, store=store, run_dir=run_dir,
                                               device=device)
    if compare_latest:
        mean, std = stats_tensors(store.stats(), list(metrics["targets"]))
        latest = evaluate_latest(cfg, store, registry, mean=mean, std=std, device=device)
        if latest is not None:
            metrics["latest"] = latest  # the current `latest` on this same split (export compares)
            if "mean_cosine" in latest:
                print(f"[evaluate] current latest {latest['version']}: mean cosine "
                      f"{latest['mean_cosine']:.4f}", flush=True)
    metrics["floor"] = _floor(cfg, storage, store=store, registry=registry, run_dir=run_dir,
                              train=train, device=device)
    metrics["train"] = info.get("metrics", {})

    base = posixpath.join(run_dir, EVAL_DIR)
    storage.write_bytes(f"{base}/sample.safetensors", save(sample))
    storage.write_bytes(f"{base}/details.json", details_json(details))
    metrics["details"] = {"uri": storage.url(base, "details.json"), "schema": DETAILS_SCHEMA}
    metrics["sample"] = {"uri": storage.url(base, "sample.safetensors"),
                         "sha256": {k: tensor_digest(v) for k, v in sample.items()}}
    storage.write_json(f"{base}/metrics.json", metrics)
    summary = {"metrics_url": storage.url(base, "metrics.json"),
               **{k: metrics[k] for k in ("mean_cosine", "mean_r2", "top1", "top5", "clips")}}
    if cfg.report_html:
        from .report import write_run_report
        summary["report_url"] = write_run_report(
            storage, run_dir, metrics, details=details, train_info=info,
            store_meta=store.read_meta(), metric=metric, higher_is_better=higher_is_better)
    print(f"[evaluate] mean cosine {metrics['mean_cosine']:.4f}  mean R2 {metrics['mean_r2']:.4f}  "
          f"top1 {metrics['top1']}  -> {summary['metrics_url']}", flush=True)
    return summary


__all__ = [
    "DETAILS_SCHEMA",
    "ConfusionMeter",
    "FidelityMeter",
    "details_json",
    "evaluate_latest",
    "evaluate_model",
    "evaluate_stage",
    "floor_to_train",
    "gflops_per_clip",
    "latency_ms",
    "run_evaluate",
    "score_run",
    "tensor_digest",
    "topk_correct",
]
