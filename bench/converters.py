"""Converter benchmark: every preset x every target, side by side with the baseline, ONE run.

For each preset of ``tokconv.list_converters(--presets)``, trained on the same feature pairs
with the same batches, seed, optimiser and number of steps as ``baseline_interp_linear``:

* parameters (whole converter, all targets; and the trunk/target split is not guessed);
* GFLOPs per clip of ``forward(x, target)`` and of ``forward_all`` (torch FlopCounterMode:
  matmul/conv/attention; elementwise work is not counted, so for ssm_* the selective scan's
  ~9*E*N*L FLOPs per direction are added analytically, mamba's own estimate);
* latency of ``forward(x, target)`` / ``forward_all`` per batch on --device (eval, no grad,
  bf16 autocast with --dtype bfloat16), median of --iters after --warmup;
* fidelity on held-out pairs in standardised teacher space (per-channel mean/std of the store):
  mean token cosine and R^2 (same definitions as pipeline.evaluate.FidelityMeter).

Ratios are against the baseline measured in the same run: latency / baseline latency,
GFLOPs / baseline GFLOPs, cosine and R^2 minus the baseline's. A markdown table is printed last
and, with --results, appended to bench/RESULTS.md with the date and device.

Feature pairs come from a pipeline feature store (``--store URL`` [--store-name features]):
"train" clips train, "val" clips are held out (or the last --holdout fraction when the store
has no "val" split). ``--synthetic`` makes random pairs with a fixed hidden mapping ONLY to
smoke-test this script; such results are labelled synthetic everywhere.

H200: see bench/README.md. CPU dry run (small widths, few steps):
    python bench/converters.py --synthetic --student-dim 64 --teacher-dim 48 --steps 3 \\
        --train-clips 8 --eval-clips 4 --batch-size 2 --latency-batch 2 --iters 2 --warmup 1
"""
from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from tokconv import STUDENT, TEACHERS, TargetSpec, create_converter, list_converters
from tokconv.converters import count_params
from tokconv.losses import distill_loss, standardize

BASELINE = "baseline_interp_linear"


# ------------------------------------------------------------------------------------- data

def load_store_pairs(args) -> tuple[dict, dict, dict[str, TargetSpec], dict, str]:
    """(train, held-out) dicts {"student": (N, Ns, Ds) fp16, <target>: ...} from a feature store,
    the specs, per-target {"mean","std"} tensors and a description."""
    from pipeline.featurestore import FeatureStore  # needs pyarrow + fsspec only (no Ray)
    from pipeline.storage import Storage
    options = dict(kv.split("=", 1) for kv in args.storage_option)
    store = FeatureStore(Storage(args.store, options), args.store_name)
    specs = store.specs()
    targets = [t for t in specs if t != "student" and (not args.targets or t in args.targets)]
    if "student" not in specs or not targets:
        raise SystemExit(f"--store {args.store}: needs 'student' and teacher tensors, has {sorted(specs)}")
    cols = ["student", *targets, "split"]

    def take(split, limit):
        parts, n = [], 0
        for batch in store.iter_torch(split=split, batch_size=min(limit, 32), columns=cols):
            parts.append({k: batch[k].clone() for k in ("student", *targets)})
            n += parts[-1]["student"].shape[0]
            if n >= limit:
                break
        if not parts:
            return None
        return {k: torch.cat([p[k] for p in parts])[:limit] for k in parts[0]}

    train = take("train", args.train_clips + args.eval_clips)
    if train is None:
        raise SystemExit(f"--store {args.store}: no 'train' clips")
    held = take("val", args.eval_clips)
    if held is None:  # no val split: hold out the tail of train
        n_hold = max(1, min(args.eval_clips, round(train["student"].shape[0] * args.holdout)))
        held = {k: v[-n_hold:] for k, v in train.items()}
        train = {k: v[:-n_hold] for k, v in train.items()}
    train = {k: v[:args.train_clips] for k, v in train.items()}
    try:
        st = store.stats("train")
        stats = {t: {k: torch.as_tensor(st[t][k], dtype=torch.float32) for k in ("mean", "std")} for t in targets}
    except (FileNotFoundError, KeyError):
        stats = feature_stats(train, targets)
    desc = f"store {args.store} ({args.store_name}): {train['student'].shape[0]} train / {held['student'].shape[0]} held-out clips"
    return train, held, {k: specs[k] for k in ("student", *targets)}, stats, desc


def synthetic_pairs(args) -> tuple[dict, dict, dict[str, TargetSpec], dict, str]:
    """SMOKE TEST ONLY: random student tokens; each teacher a fixed random function of them
    (per-target linear map of the trilinearly resampled tokens, a tanh, noise)."""
    g = torch.Generator().manual_seed(1234)
    student = TargetSpec("student", STUDENT.tokens, args.student_dim or STUDENT.dim, STUDENT.grid)
    specs = {"student": student}
    for name, t in TEACHERS.items():
        if not args.targets or name in args.targets:
            specs[name] = TargetSpec(name, t.tokens, args.teacher_dim or t.dim, t.grid)
    n = args.train_clips + args.eval_clips
    x = torch.randn(n, student.tokens, student.dim, generator=g)
    data = {"student": x.half()}
    for name, spec in specs.items():
        if name == "student":
            continue
        w = torch.randn(student.dim, spec.dim, generator=g) / student.dim ** 0.5
        v = x.transpose(1, 2).reshape(n, student.dim, *student.grid)
        if spec.grid is None:
            r = x.mean(1, keepdim=True) * student.tokens ** 0.5
        else:
            r = F.interpolate(v, size=spec.grid, mode="trilinear").flatten(2).transpose(1, 2)
        y = torch.tanh(r @ w) * 2 + 0.1 * torch.randn(n, spec.tokens, spec.dim, generator=g) + 0.5
        data[name] = y.half()
    train = {k: v[:args.train_clips] for k, v in data.items()}
    held = {k: v[args.train_clips:] for k, v in data.items()}
    targets = [k for k in specs if k != "student"]
    return train, held, specs, feature_stats(train, targets), f"SYNTHETIC pairs: {args.train_clips} train / {args.eval_clips} held-out"


def feature_stats(data: dict, targets) -> dict:
    return {t: {"mean": data[t].float().reshape(-1, data[t].shape[-1]).mean(0),
                "std": data[t].float().reshape(-1, data[t].shape[-1]).std(0)} for t in targets}


# ---------------------------------------------------------------------------------- measures

def scan_flops(model: torch.nn.Module, tokens: int) -> int:
    """Selective-scan FLOPs per clip that FlopCounterMode cannot see (elementwise): mamba's
    estimate 9 * E * N * L per scanned channel set; both directions of every BiMambaBlock."""
    from tokconv.converters.ssm import BiMambaBlock
    total = 0
    for m in model.modules():
        if isinstance(m, BiMambaBlock):
            for d in (m.fwd, m.bwd):
                total += 9 * d.A_log.shape[0] * d.A_log.shape[1] * tokens
    return total


def gflops_per_clip(model, specs, device, target=None) -> float:
    x = torch.randn(1, specs["student"].tokens, specs["student"].dim, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x, target)
    return (fc.get_total_flops() + scan_flops(model, specs["student"].tokens)) / 1e9


def latency_ms(model, x, device, dtype, target, warmup, iters) -> float:
    times = []
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for i in range(warmup + iters):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model(x, target)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def train(model, data, stats, args, device, dtype) -> list[float]:
    """Same batches (seeded order), AdamW + cosine schedule, distill loss of the pipeline."""
    targets = [k for k in data if k != "student"]
    mean = {t: stats[t]["mean"].to(device) for t in targets}
    std = {t: stats[t]["std"].to(device) for t in targets}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, args.steps // 20)) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    g = torch.Generator().manual_seed(args.seed)
    n = data["student"].shape[0]
    order, losses = torch.empty(0, dtype=torch.long), []
    model.train()
    for _ in range(args.steps):
        if order.numel() < args.batch_size:
            order = torch.cat([order, torch.randperm(n, generator=g)])
        idx, order = order[:args.batch_size], order[args.batch_size:]
        x = data["student"][idx].to(device, torch.float32, non_blocking=True)
        teach = {t: data[t][idx].to(device, torch.float32, non_blocking=True) for t in targets}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(x)
        loss, _ = distill_loss({k: v.float() for k, v in out.items()}, teach, mean=mean, std=std)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def fidelity(model, data, stats, args, device, dtype) -> dict[str, dict[str, float]]:
    """Per target: mean token cosine and R^2 of the prediction vs the standardised teacher
    (float64 accumulation, as pipeline.evaluate.FidelityMeter)."""
    targets = [k for k in data if k != "student"]
    acc = {t: {"cos": 0.0, "sse": 0.0, "n": 0, "clips": 0, "sy": 0.0, "sy2": 0.0} for t in targets}
    model.eval()
    with torch.no_grad():
        for i in range(0, data["student"].shape[0], args.latency_batch):
            x = data["student"][i:i + args.latency_batch].to(device, torch.float32)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = model(x)
            for t in targets:
                y = standardize(data[t][i:i + args.latency_batch].to(device, torch.float64),
                                stats[t]["mean"].to(device), stats[t]["std"].to(device))
                p = out[t].double()
                a = acc[t]
                a["cos"] += F.cosine_similarity(p, y, dim=-1).mean(1).sum().item()
                a["clips"] += p.shape[0]
                a["sse"] += (p - y).pow(2).sum().item()
                flat = y.reshape(-1, y.shape[-1])
                a["n"] += flat.shape[0]
                a["sy"] = a["sy"] + flat.sum(0)
                a["sy2"] = a["sy2"] + flat.pow(2).sum(0)
    res = {}
    for t, a in acc.items():
        sst = (a["sy2"] - a["sy"].pow(2) / a["n"]).sum().item()
        res[t] = {"cosine": a["cos"] / a["clips"], "r2": 1.0 - a["sse"] / sst if sst > 0 else float("nan")}
    return res


# ------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", help="storage URL holding features/<store-name>/ (local path, file://, s3://)")
    src.add_argument("--synthetic", action="store_true", help="random pairs: ONLY to smoke-test this script")
    p.add_argument("--store-name", default="features")
    p.add_argument("--storage-option", action="append", default=[], metavar="K=V",
                   help="fsspec option, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable)")
    p.add_argument("--presets", default="*", help="glob over list_converters(); the baseline always runs")
    p.add_argument("--targets", default="", help="comma list of targets (default: all in the store)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="autocast dtype for training, fidelity and latency (weights stay fp32)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-clips", type=int, default=512)
    p.add_argument("--eval-clips", type=int, default=128)
    p.add_argument("--holdout", type=float, default=0.2, help="held-out fraction when the store has no val split")
    p.add_argument("--latency-batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--student-dim", type=int, default=0, help="--synthetic only: student width (default 1024)")
    p.add_argument("--teacher-dim", type=int, default=0, help="--synthetic only: teacher width (default 768)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: leave)")
    p.add_argument("--out", help="write all results as JSON here")
    p.add_argument("--results", nargs="?", const=str(Path(__file__).with_name("RESULTS.md")),
                   help="append the markdown table to this file (default bench/RESULTS.md)")
    args = p.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    train_data, held, specs, stats, desc = synthetic_pairs(args) if args.synthetic else load_store_pairs(args)
    targets = [t for t in specs if t != "student"]
    names = [BASELINE] + [n for n in list_converters() if fnmatch.fnmatch(n, args.presets) and n != BASELINE]
    from tokconv.ops import selective_scan as ss
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# converters bench: {desc}; device {device} ({dev_name}), {args.dtype}, scan backend "
          f"{ss.backend()} (mamba_ssm {'yes' if ss.HAS_FUSED else 'no'}); {args.steps} steps x {args.batch_size}",
          flush=True)
    x_lat = train_data["student"][:args.latency_batch].to(device, torch.float32)
    if x_lat.shape[0] < args.latency_batch:  # few clips: repeat to the latency batch size
        x_lat = x_lat.repeat(math.ceil(args.latency_batch / x_lat.shape[0]), 1, 1)[:args.latency_batch]
    rows = []
    for name in names:
        torch.manual_seed(args.seed)
        model = create_converter(name, student=specs["student"], targets={t: specs[t] for t in targets}).to(device)
        t0 = time.perf_counter()
        losses = train(model, train_data, stats, args, device, dtype)
        train_s = time.perf_counter() - t0
        fid = fidelity(model, held, stats, args, device, dtype)
        model.eval()
        row = {"preset": name, "params": count_params(model), "train_s": train_s,
               "loss_first": losses[0], "loss_last": statistics.fmean(losses[-max(1, len(losses) // 10):]),
               "targets": {}}
        for t in [None, *targets]:
            key = t or "all"
            row["targets"][key] = {
                "gflops": gflops_per_clip(model, specs, device, t),
                "latency_ms": latency_ms(model, x_lat, device, dtype, t, args.warmup, args.iters),
                **(fid[t] if t else {"cosine": statistics.fmean(f["cosine"] for f in fid.values()),
                                     "r2": statistics.fmean(f["r2"] for f in fid.values())})}
        rows.append(row)
        a = row["targets"]["all"]
        print(f"{name}: {row['params'] / 1e6:.2f}M params, {a['gflops']:.2f} GFLOP/clip, "
              f"{a['latency_ms']:.1f} ms/batch{args.latency_batch}, cos {a['cosine']:.4f}, R2 {a['r2']:.4f}, "
              f"loss {row['loss_first']:.3f} -> {row['loss_last']:.3f} ({train_s:.0f} s)", flush=True)
        if args.out:  # partial results survive a time limit
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"description": desc, "partial": True, "rows": rows}, indent=2))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    table = markdown(rows, args, desc, device, dev_name, ss.backend())
    print("\n" + table)
    result = {"description": desc, "synthetic": bool(args.synthetic), "device": str(device),
              "device_name": dev_name, "dtype": args.dtype, "scan_backend": ss.backend(),
              "args": {k: v for k, v in vars(args).items()}, "rows": rows,
              "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + table + "\n")
    return result


def markdown(rows, args, desc, device, dev_name, backend) -> str:
    base = rows[0]["targets"]
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    tag = " **SYNTHETIC DATA (script smoke test, not a result)**" if args.synthetic else ""
    lines = [f"### Converters, {date}, {device} ({dev_name}), {args.dtype}{tag}", "",
             (f"{desc}; {args.steps} steps x batch {args.batch_size}, lr {args.lr}; latency: median of "
              f"{args.iters} forward passes of batch {args.latency_batch}; selective scan backend: {backend}; "
              f"ratios and deltas vs `{BASELINE}` in the same run."), "",
             "| preset | target | params (M) | GFLOP/clip | x base | latency ms/batch | x base | cosine | d cos | R^2 | d R^2 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for t, v in r["targets"].items():
            b = base[t]
            lines.append(
                f"| {r['preset']} | {t} | {r['params'] / 1e6:.2f} | {v['gflops']:.2f} | {v['gflops'] / b['gflops']:.2f} | "
                f"{v['latency_ms']:.2f} | {v['latency_ms'] / b['latency_ms']:.2f} | {v['cosine']:.4f} | "
                f"{v['cosine'] - b['cosine']:+.4f} | {v['r2']:.4f} | {v['r2'] - b['r2']:+.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
