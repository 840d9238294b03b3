"""One training step and one validation pass, shared by the Ray Train and torchrun loops.

* ``Objective``: per-target distillation on standardised teacher features, head cross-entropy and
  the weighted deficiency regularisers, under bf16 autocast on CUDA (fp32 master weights);
* ``wrap_ddp``: DDP without ``find_unused_parameters`` unless a probe step finds parameters that
  take no part in the loss; ``make_optimizer`` (fused AdamW on CUDA), ``make_scheduler`` (timm's
  warm-up + cosine, per step); ``seed_step``: every step's RNG from (seed, rank, step);
* ``validate``: ``pipeline.evaluate.FidelityMeter`` per target (cosine, R^2) and head top-1.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from .train import _TrainModule
from .train_data import ClipReader
from .train_plan import LABEL

_log = logging.getLogger(__name__)

class Objective:
    """Loss of one batch: distillation per target on standardised teachers, head cross-entropy,
    weighted deficiency regularisers.

    __call__(model, batch, step) -> (loss scalar, {"loss.<target>", "loss.head", "reg.<name>":
    scalar});
    ``weights(step)`` -> {"<regulariser>": current weight}.
    """

    def __init__(self, tc, mean: dict[str, torch.Tensor], std: dict[str, torch.Tensor], *,
                 bf16: bool):
        from tokconv.deficiency import WarmupSchedule
        d = tc.deficiency
        self.loss, self.mean, self.std, self.bf16 = tc.loss, mean, std, bf16
        self.schedules = {"nuclear": WarmupSchedule(d.w_nuclear, d.warmup_steps),
                          "selection": WarmupSchedule(d.w_selection, d.warmup_steps),
                          "jacobian": WarmupSchedule(d.w_jacobian, d.warmup_steps)}

    def weights(self, step: int) -> dict[str, float]:
        return {k: s(step) for k, s in self.schedules.items()}

    def __call__(self, model, batch: dict[str, torch.Tensor], step: int):
        from tokconv.losses import distill_loss
        w = self.weights(step)
        x = batch["student"]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out, logits, regs, jac = model(x, with_jacobian=w["jacobian"] > 0)
        loss, per_target = distill_loss(out, batch, mean=self.mean, std=self.std,
                                        w_cos=self.loss.w_cos, w_sl1=self.loss.w_sl1,
                                        target_weights=self.loss.target_weights or None)
        terms = {f"loss.{t}": v for t, v in per_target.items()}
        ce = loss.new_zeros(())
        if logits is not None:  # unlabelled clips (-1) count for nothing; no host sync to find them
            labels = batch[LABEL]
            ok = labels >= 0
            ce = (F.cross_entropy(logits.float(), labels.clamp_min(0), reduction="none") * ok).sum()
            ce = ce / ok.sum().clamp_min(1)
            loss = loss + self.loss.w_head * ce
        terms["loss.head"] = ce
        if jac is not None:
            regs = {**regs, "jacobian": jac}
        for name, value in regs.items():
            terms[f"reg.{name}"] = value
            if w.get(name, 0.0) > 0:
                loss = loss + w[name] * value
        return loss, terms


def step_once(model, objective: Objective, optimizer, params, batch: dict[str, torch.Tensor],
              step: int, grad_clip: float | None):
    """One optimiser step on ``batch`` -> (loss, terms, grad norm before clipping); no host sync."""
    loss, terms = objective(model, batch, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf, foreach=True)
    optimizer.step()
    return loss, terms, grad_norm


def make_scheduler(optimizer, optim_cfg, total_steps: int):
    from timm.scheduler import CosineLRScheduler
    warmup = min(optim_cfg.warmup_steps, max(total_steps - 1, 0))
    return CosineLRScheduler(optimizer, t_initial=max(total_steps, 1), lr_min=optim_cfg.lr * 0.01,
                             warmup_t=warmup, warmup_lr_init=optim_cfg.lr * 0.01,
                             warmup_prefix=True, t_in_epochs=False)


def make_optimizer(params, optim_cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused on CUDA (one kernel for all parameters)."""
    return torch.optim.AdamW(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay,
                             fused=device.type == "cuda")


def wrap_ddp(module: _TrainModule, device: torch.device, world: int,
             student_shape: tuple[int, int]):
    """DDP over the process group (NCCL on CUDA, gloo on CPU) when world > 1; finding unused
    parameters (an extra pass per step) only when one probe step leaves some without a gradient."""
    if world == 1:
        return module
    x = torch.randn(1, *student_shape, device=device)
    out, logits, regs, _ = module(x)
    total = sum(o.float().sum() for o in out.values()) + sum(r.sum() for r in regs.values())
    (total + (logits.sum() if logits is not None else 0)).backward()
    unused = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    module.zero_grad(set_to_none=True)
    if unused:
        _log.info("[train] DDP with find_unused_parameters: %d parameters take no part (%s...)",
                  len(unused), unused[0])
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=bool(unused))


def seed_step(seed: int, rank: int, step: int) -> None:
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


# ---------------------------------------------------------------- validation

@torch.no_grad()
def validate(module: _TrainModule, reader: ClipReader, mean, std, *,
             bf16: bool) -> dict[str, float | None]:
    """{"val.<target>.cosine", "val.<target>.r2", "val.top1", "val.mean_cosine"} on ``reader``'s
    split."""
    from tokconv.losses import standardize

    from .evaluate import FidelityMeter, topk_correct
    module.eval()
    meters: dict[str, FidelityMeter] = {}
    correct = labelled = 0
    for batch in reader.batches(0):
        x = batch["student"]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = module.converter.forward_all(x)
            logits = module.head(x, out) if module.head is not None else None
        for t in mean:
            teach = standardize(batch[t], mean[t], std[t])
            meters.setdefault(t, FidelityMeter(teach.shape[-1])).update(out[t].float(), teach)
        if logits is not None:
            correct += topk_correct(logits.float(), batch[LABEL], ks=(1,))[1]
            labelled += int((batch[LABEL] >= 0).sum())
    module.train()
    res: dict[str, float | None] = {}
    for t, m in meters.items():
        r = m.compute()
        res[f"val.{t}.cosine"], res[f"val.{t}.r2"] = r["cosine"], finite(r["r2"])
    res["val.top1"] = correct / labelled if labelled else None
    res["val.mean_cosine"] = float(np.mean([res[f"val.{t}.cosine"] for t in meters]))
    return res


def validation_metrics(targets) -> list[str]:
    """The keys ``validate`` returns for ``targets``: what ``train.best_metric`` may name."""
    return ["val.mean_cosine", "val.top1",
            *(f"val.{t}.{m}" for t in targets for m in ("cosine", "r2"))]


def finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


