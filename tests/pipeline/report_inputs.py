"""REAL inputs for report tests: converters trained on the tiny real feature store (tiny_features)
by a short plain-torch loop that writes the training log in the schema of
``pipeline.report.trainlog``, then evaluated with ``evaluate_model`` on the held-out split.

``real_evaluation(storage)`` -> Evaluation(metrics, details, floor, train_log_text): "this model"
(tokenlearner_small, rank 4: it has regularisers), the floor (baseline_interp_linear, same loop and
budget) and a "latest" (the same design after one epoch, evaluated on the same split, as
``evaluate_latest`` does), all from real computation.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tiny_features import CLASS_NAMES, STUDENT, TEACHERS, make_tiny_store

from pipeline.artifacts import stats_tensors
from pipeline.evaluate import evaluate_model, gflops_per_clip, latency_ms


@dataclass
class Evaluation:
    metrics: dict
    details: dict
    floor: dict
    train_log: str  # JSONL text


def train_tiny(
    name: str,
    store,
    *,
    epochs: int,
    log: list[str] | None = None,
    seed: int = 0,
    batch_size: int = 6,
    **kw,
):
    """AdamW + cosine LR on the store's train split; appends schema records to ``log``."""
    from tokconv import create_converter
    from tokconv.heads import ResidualHead
    from tokconv.losses import distill_loss

    torch.manual_seed(seed)
    conv = create_converter(name, student=STUDENT, targets=TEACHERS, **kw)
    head = ResidualHead(
        student_dim=STUDENT.dim,
        target_dims={k: s.dim for k, s in TEACHERS.items()},
        num_classes=len(CLASS_NAMES),
        hidden=16,
    )
    mean, std = stats_tensors(store.stats(), list(TEACHERS))
    params = [*conv.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)
    steps = epochs * -(-store.num_clips("train") // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.2)
    step = 0
    for epoch in range(epochs):
        conv.train()
        head.train()
        it = store.iter_torch(split="train", batch_size=batch_size)
        while True:
            t0 = time.perf_counter()
            b = next(it, None)
            if b is None:
                break
            t1 = time.perf_counter()
            x = b["student"].float()
            out = conv(x)
            total, per = distill_loss(out, {t: b[t] for t in TEACHERS}, mean=mean, std=std)
            regs = conv.regularisers()
            w = min(1.0, (step + 1) / 10) * 1e-3  # warm-up of the regulariser weight
            ce = F.cross_entropy(head(x, out), b["label_index"])
            loss = total + ce + w * sum(regs.values())
            opt.zero_grad()
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, 10.0)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            step += 1
            t2 = time.perf_counter()
            if log is not None:
                log.append(
                    json.dumps(
                        {
                            "kind": "step",
                            "step": step,
                            "epoch": epoch,
                            "time": time.time(),
                            "loss": loss.item(),
                            **{f"loss.{t}": v.item() for t, v in per.items()},
                            "loss.head": ce.item(),
                            **{f"reg.{k}": v.item() for k, v in regs.items()},
                            **{f"w.{k}": w for k in regs},
                            "lr": lr,
                            "grad_norm": gn.item(),
                            "clips_per_s": x.shape[0] / (t2 - t0),
                            "data_wait_frac": (t1 - t0) / (t2 - t0),
                        }
                    )
                )
        with (
            torch.no_grad()
        ):  # a no-grad forward: the converter's last regulariser terms held the graph
            conv.eval()(x)
        if log is not None:
            m, _ = evaluate_model(
                conv, head, store.iter_torch(split="val", batch_size=8), mean=mean, std=std
            )
            log.append(
                json.dumps(
                    {
                        "kind": "val",
                        "step": step,
                        "epoch": epoch,
                        "val.mean_cosine": m["mean_cosine"],
                        "val.top1": m["top1"],
                        "val.top5": m["top5"],
                        **{
                            f"val.{t}.{k}": r[k]
                            for t, r in m["targets"].items()
                            for k in ("cosine", "r2", "mse")
                        },
                    }
                )
            )
    return conv.eval(), head.eval()


def _evaluate(conv, head, store, **kw):
    mean, std = stats_tensors(store.stats(), list(TEACHERS))
    res = evaluate_model(
        conv,
        head,
        store.iter_torch(split="val", batch_size=8),
        mean=mean,
        std=std,
        class_names=CLASS_NAMES,
        **kw,
    )
    m = res[0]
    shape = (STUDENT.tokens, STUDENT.dim)
    m["converter"] = {
        "name": conv.config["name"],
        "params": sum(p.numel() for p in conv.parameters()),
        "head_params": sum(p.numel() for p in head.parameters()),
        "gflops_per_clip": gflops_per_clip(conv, shape),
        "latency_ms_per_clip": latency_ms(conv, shape),
        "latency_device": "cpu",
    }
    m["split"] = "val"
    return res


def real_evaluation(storage, epochs: int = 6) -> Evaluation:
    store = make_tiny_store(storage, n_train=36, n_val=36, shard_clips=12)
    log: list[str] = []
    conv, head = train_tiny("tokenlearner_small", store, epochs=epochs, log=log, rank=4)
    metrics, _, details = _evaluate(conv, head, store, return_details=True)
    floor, _ = _evaluate(*train_tiny("baseline_interp_linear", store, epochs=epochs), store)
    latest, _ = _evaluate(*train_tiny("tokenlearner_small", store, epochs=1, rank=4), store)
    metrics["latest"] = {
        "version": "20261201T000000Z",
        **{k: v for k, v in latest.items() if k != "split"},
    }
    metrics["checkpoint"] = storage.url("runs", "report", "ckpt")
    return Evaluation(metrics, details, floor, "\n".join(log) + "\n")
