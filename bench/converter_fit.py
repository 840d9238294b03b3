"""``bench/converters.py quality`` and ``sweep``: presets trained the same way on the same pairs
and scored on held-out sources.

Training is the train stage's own step (pipeline.train_step: ``Objective`` = distillation on
standardised teachers + head cross-entropy + the deficiency terms with their warm-up, under bf16
autocast on CUDA; ``step_once``; fused AdamW and the warm-up + cosine schedule) on the model pair
the stage builds (pipeline.train: ``build_models``, ``_TrainModule``), with the train split
resident on the device and the same batch order for every preset. Scores: pipeline.evaluate's
``FidelityMeter`` (mean token cosine, R^2 of standardised features) per target and the residual
head's top-1.
"""
from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import dataclass

import torch

from bench.converter_data import LABEL, Pairs, load_pairs, presets, split_variant, write
from pipeline.config import DeficiencyConfig, HeadConfig, OptimConfig, TrainConfig
from pipeline.evaluate import FidelityMeter, gflops_per_clip, latency_ms, topk_correct
from pipeline.train import _TrainModule, build_models
from pipeline.train_step import Objective, make_optimizer, make_scheduler, step_once
from tokconv.converters import count_params
from tokconv.losses import standardize


@dataclass
class Budget:
    steps: int = 2000
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0


def train_config(name: str, budget: Budget, deficiency: dict | None = None) -> TrainConfig:
    base, kw = split_variant(name)
    return TrainConfig(converter=base, converter_kwargs=kw, head=HeadConfig(enabled=True),
                       seed=budget.seed,
                       optim=OptimConfig(lr=budget.lr, warmup_steps=budget.warmup),
                       deficiency=DeficiencyConfig(**(deficiency or {})))


def fit(name: str, pairs: Pairs, budget: Budget, device: torch.device,
        deficiency: dict | None = None, compiled: bool = False):
    """Train preset ``name`` + a residual head with the train stage's step; the same batch order
    for every call. Returns (converter, head, log)."""
    cfg = train_config(name, budget, deficiency)
    torch.manual_seed(budget.seed)
    converter, head = build_models(cfg, pairs.specs, len(pairs.classes))
    module = _TrainModule(converter=converter, head=head).to(device).train()
    if compiled:
        module.compile()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg.optim, device)
    sched = make_scheduler(opt, cfg.optim, budget.steps)
    objective = Objective(cfg, {t: s["mean"] for t, s in pairs.stats.items()},
                          {t: s["std"] for t, s in pairs.stats.items()},
                          bf16=device.type == "cuda")
    order_gen = torch.Generator().manual_seed(budget.seed)
    n, order, losses = pairs.train["student"].shape[0], torch.empty(0, dtype=torch.long), []
    t0 = time.perf_counter()
    for step in range(budget.steps):
        if order.numel() < budget.batch:
            order = torch.cat([order, torch.randperm(n, generator=order_gen)])
        idx, order = order[:budget.batch].to(device), order[budget.batch:]
        batch = {k: v[idx] for k, v in pairs.train.items()}
        batch["student"] = batch["student"].float()
        loss, _, _ = step_once(module, objective, opt, params, batch, step, cfg.optim.grad_clip)
        sched.step_update(step + 1)
        if step % 50 == 0 or step == budget.steps - 1:
            losses.append(round(loss.item(), 4))
    return converter, head, {"train_s": round(time.perf_counter() - t0, 1),
                             "loss_first": losses[0], "loss_last": losses[-1],
                             "loss_every_50": losses}


@torch.no_grad()
def evaluate(converter, head, pairs: Pairs, device: torch.device, batch: int = 16) -> dict:
    """Held-out fidelity per target (FidelityMeter on standardised features) + head top-1."""
    converter.eval(), head.eval()
    meters = {t: FidelityMeter(pairs.specs[t].dim) for t in pairs.targets}
    correct = total = 0
    val = pairs.val
    for i in range(0, val["student"].shape[0], batch):
        x = val["student"][i:i + batch].float()
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            out = converter.forward_all(x)
            logits = head(x, out)
        for t, m in meters.items():
            want = standardize(val[t][i:i + batch].float(), pairs.stats[t]["mean"],
                               pairs.stats[t]["std"])
            m.update(out[t].float(), want)
        labels = val[LABEL][i:i + batch]
        correct += topk_correct(logits.float(), labels, ks=(1,))[1]
        total += int((labels >= 0).sum())
    per = {t: {k: round(v, 5) for k, v in m.compute().items()} for t, m in meters.items()}
    return {"targets": per,
            "mean_cosine": round(statistics.fmean(v["cosine"] for v in per.values()), 5),
            "mean_r2": round(statistics.fmean(v["r2"] for v in per.values()), 5),
            "top1": round(correct / total, 4) if total else None}


def run_one(name, pairs, budget, device, deficiency=None, compiled=False) -> dict:
    converter, head, log = fit(name, pairs, budget, device, deficiency, compiled)
    row = {"preset": name, "deficiency": deficiency or {}, "compiled": compiled, **log,
           **evaluate(converter, head, pairs, device)}
    cpu = copy.deepcopy(converter).cpu().eval()
    shape = (pairs.specs["student"].tokens, pairs.specs["student"].dim)
    row.update(params=count_params(converter), gflops=round(gflops_per_clip(cpu, shape), 3),
               latency_ms_clip=round(latency_ms(cpu, shape, repeats=5, device=device), 3))
    fid = " ".join(f"{t} {v['cosine']:.3f}/{v['r2']:.3f}" for t, v in row["targets"].items())
    print(f"[{name}{' ' + json.dumps(deficiency) if deficiency else ''}] cos/R2 {fid}; "
          f"mean {row['mean_cosine']:.4f}/{row['mean_r2']:.4f} top1 {row['top1']}; "
          f"loss {log['loss_first']} -> {log['loss_last']} ({log['train_s']} s)", flush=True)
    del converter, head
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def guarded(res: dict, label: str, fn) -> None:
    """Append ``fn()`` to res["rows"]; a failure goes to res["errors"] and the run goes on."""
    try:
        res["rows"].append(fn())
    except Exception as e:  # noqa: BLE001
        res.setdefault("errors", {})[label] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"[{label}] FAILED {res['errors'][label]}", flush=True)


def budget_of(args) -> Budget:
    return Budget(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)


def cmd_quality(args) -> dict:
    device = torch.device(args.device)
    pairs, budget = load_pairs(args, device), budget_of(args)
    print(f"# converters quality: {pairs.desc}; {budget}", flush=True)
    res = {"description": pairs.desc, "synthetic": bool(args.synthetic), "budget": budget.__dict__,
           "rows": []}
    names = presets(args.presets, args.extra)
    if args.no_floor:
        names = names[1:]
    for name in names:
        guarded(res, name, lambda name=name: run_one(name, pairs, budget, device,
                                                     compiled=args.compile))
        write(args.out, res)
    return res


SWEEP = {"rank": (None, 64, 16), "mask_ratio": (0.0, 0.3, 0.6), "w_jacobian": (0.0, 0.1, 1.0)}


def sweep_settings(warmup_steps: int, only: str = "") -> list[dict]:
    """Off, each knob's values one at a time, then every knob at its middle value together;
    ``only`` (comma list of indices) keeps a part of that list (a sweep split over processes)."""
    warm = {"warmup_steps": warmup_steps}
    settings = [{}] + [{knob: v, **warm} for knob, values in SWEEP.items() for v in values[1:]]
    settings.append({k: v[-2] for k, v in SWEEP.items()} | warm)
    return [settings[int(i)] for i in only.split(",")] if only else settings


def cmd_sweep(args) -> dict:
    device = torch.device(args.device)
    pairs, budget = load_pairs(args, device), budget_of(args)
    res = {"description": pairs.desc, "preset": args.preset, "budget": budget.__dict__, "rows": []}
    for d in sweep_settings(args.steps // 4, args.settings):
        guarded(res, json.dumps(d), lambda d=d: run_one(args.preset, pairs, budget, device, d))
        write(args.out, res)
    return res
