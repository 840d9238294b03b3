"""Converter benchmark (issue 18): cost against the student on the GPU, fidelity on held-out
SOURCES.

``cost``: the student encoder (V-JEPA 2 ViT-L, random init, bf16, batch --batch) timed in the same
run as every preset's ``forward_all`` (bf16 weights, inference) and forward+backward (autocast bf16
over fp32 weights, train mode, regularisers included; and pure bf16), CUDA-event medians; the
ratios to the student; torch.profiler's top kernels; params, GFLOPs and 1-clip latency on GPU and
CPU through pipeline.evaluate's ``gflops_per_clip`` / ``latency_ms``.

``quality``: every preset trained on the same feature store with the same budget (steps, batches,
seed, optimiser, loss, head), train data resident on the device; evaluated on the store's ``val``
split (held-out sources: bench/footage.py) with pipeline.evaluate's ``FidelityMeter`` (mean token
cosine, R^2 of standardised features) per target, and the residual head's top-1, beside
``baseline_interp_linear`` trained the same way.

``sweep``: one preset, the deficiency knobs one at a time (low-rank rank, mask ratio, Jacobian
weight) and all together, head on: fidelity and head top-1 per setting.

    python bench/converters.py cost --out $OUT/cost.json
    python bench/converters.py quality --store /tmp/store --steps 2000 --out $OUT/quality.json
    python bench/converters.py sweep --store /tmp/store --preset convmix_small --out $OUT/sweep.json
    # CPU smoke test of the script only (random pairs, narrow widths; never a result):
    python bench/converters.py quality --synthetic --student-dim 32 --teacher-dim 24 --steps 3
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import fnmatch
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from pipeline.artifacts import stats_tensors
from pipeline.config import DeficiencyConfig, HeadConfig, OptimConfig, TrainConfig
from pipeline.evaluate import FidelityMeter, gflops_per_clip, latency_ms, topk_correct
from pipeline.train import build_models
from pipeline.train_step import make_scheduler
from tokconv import STUDENT, TEACHERS, TargetSpec, create_converter, list_converters
from tokconv.converters import count_params
from tokconv.deficiency import WarmupSchedule, jacobian_penalty
from tokconv.losses import distill_loss, standardize
from tokconv.ops import HAS_FUSED_SSD, backend

BASELINE = "baseline_interp_linear"


# ------------------------------------------------------------------------------------------ data

@dataclass
class Pairs:
    """Feature pairs on the device: split -> {"student", <target>...: (N, tokens, dim) fp16,
    "label_index"}."""
    train: dict
    val: dict
    specs: dict[str, TargetSpec]
    stats: dict = field(default_factory=dict)           # target -> {"mean", "std"} (train split)
    classes: list[str] = field(default_factory=list)
    desc: str = ""

    @property
    def targets(self) -> list[str]:
        return [k for k in self.specs if k != "student"]


def load_store(url: str, name: str, device: torch.device) -> Pairs:
    from pipeline.featurestore import FeatureStore
    from pipeline.storage import Storage
    store = FeatureStore(Storage(url), name)
    specs = store.specs()
    if "student" not in specs or len(specs) < 2:
        raise SystemExit(f"--store {url}: needs 'student' and teacher tensors, has {sorted(specs)}")
    keys = [*specs, "label_index"]

    def take(split):
        batches = store.iter_torch(split=split, batch_size=32, columns=[*keys, "split"])
        parts = [{k: b[k].to(device) for k in keys} for b in batches]
        if not parts:
            raise SystemExit(f"--store {url}: no {split!r} clips "
                             "(the footage manifest holds sources out as 'val')")
        return {k: torch.cat([p[k] for p in parts]) for k in keys}

    train, val = take("train"), take("val")
    targets = [t for t in specs if t != "student"]
    mean, std = stats_tensors(store.stats("train"), targets, device)
    stats = {t: {"mean": mean[t], "std": std[t]} for t in targets}
    classes = store.read_meta().get("class_names", [])
    desc = (f"store {url} ({name}): {train['student'].shape[0]} train / "
            f"{val['student'].shape[0]} held-out clips, {len(classes)} classes")
    return Pairs(train, val, specs, stats, classes, desc)


def synthetic_pairs(args, device: torch.device) -> Pairs:
    """SMOKE TEST ONLY: random student tokens, each teacher a fixed random function of them."""
    g = torch.Generator().manual_seed(1234)
    student = TargetSpec("student", STUDENT.tokens, args.student_dim, STUDENT.grid)
    specs = {"student": student, **{n: TargetSpec(n, t.tokens, args.teacher_dim, t.grid)
                                    for n, t in TEACHERS.items()}}
    n = args.train_clips + args.eval_clips
    x = torch.randn(n, student.tokens, student.dim, generator=g)
    data = {"student": x.half(), "label_index": torch.randint(0, 3, (n,), generator=g)}
    from tokconv.layers import resample_tokens
    for name, spec in specs.items():
        if name != "student":
            w = torch.randn(student.dim, spec.dim, generator=g) / student.dim ** 0.5
            y = resample_tokens(x, student.grid, spec.grid) @ w
            data[name] = (torch.tanh(y) * 2 + 0.5).half()
    split = lambda sl: {k: v[sl].to(device) for k, v in data.items()}
    train = split(slice(0, args.train_clips))
    stats = {t: {"mean": train[t].float().mean((0, 1)), "std": train[t].float().std((0, 1))}
             for t in specs if t != "student"}
    return Pairs(train, split(slice(args.train_clips, n)), specs, stats, ["a", "b", "c"],
                 f"SYNTHETIC pairs (smoke test, not a result): {args.train_clips} train / "
                 f"{args.eval_clips} held-out")


def load_pairs(args, device: torch.device) -> Pairs:
    if args.synthetic:
        return synthetic_pairs(args, device)
    return load_store(args.store, args.store_name, device)


# ------------------------------------------------------------------------------------------ cost

def device_ms(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Median ms of ``fn()`` (CUDA events on CUDA, wall clock otherwise)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def student_ms(batch: int, device: torch.device, iters: int) -> dict[str, float]:
    """V-JEPA 2 ViT-L encoder forward on (batch, 16, 3, 256, 256), bf16 weights, eager: stock
    transformers, then with the pipeline's rewrites (pipeline.backbones._finish)."""
    from pipeline import backbones as bb
    with torch.device(device):
        model = bb.VJEPA2Model._from_config(bb.full_configs()["student"], dtype=torch.bfloat16,
                                            attn_implementation="sdpa").eval()
    x = torch.randn(batch, 16, 3, 256, 256, device=device, dtype=torch.bfloat16)
    run = lambda: model(pixel_values_videos=x, skip_predictor=True)
    out = {}
    with torch.inference_mode():
        out["stock_eager"] = device_ms(run, device, iters, min(3, iters))
        rewrites = bb.model_rewrites(bb.ModelsConfig(), "student")
        model = bb._finish("student", model, rewrites, device)
        out["pipeline_eager"] = device_ms(run, device, iters, min(3, iters))
    return out


def top_kernels(fn, n: int = 4) -> list[list]:
    """[kernel, share of the device time] of the ``n`` costliest kernels of one ``fn()``."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    time_of = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = [e for e in prof.key_averages()
              if time_of(e) > 0 and (not cuda or e.device_type.name == "CUDA")]
    total = sum(time_of(e) for e in events) or 1.0
    events.sort(key=lambda e: -time_of(e))
    return [[e.key[:70], round(time_of(e) / total, 3)] for e in events[:n]]


def preset_cost(name: str, batch: int, device: torch.device, iters: int) -> dict:
    torch.manual_seed(0)
    cpu_model = make(name).eval()
    shape = (STUDENT.tokens, STUDENT.dim)
    row = {"params": count_params(cpu_model), "gflops": gflops_per_clip(cpu_model, shape),
           "latency_ms_clip_cpu": latency_ms(cpu_model, shape, repeats=2, device="cpu")}
    row["latency_ms_clip_gpu"] = latency_ms(cpu_model, shape, repeats=5, device=device)
    x = torch.randn(batch, *shape, device=device, dtype=torch.bfloat16)
    infer = copy.deepcopy(cpu_model).to(device, torch.bfloat16).eval()
    fwd = lambda: infer.forward_all(x)
    with torch.inference_mode():
        row["fwd_ms"] = device_ms(fwd, device, iters, 5)
        row["fwd_kernels"] = top_kernels(fwd)
    for mode in ("autocast", "bf16"):
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        model = copy.deepcopy(cpu_model).to(device, dtype).train()
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
            grads = {k: torch.randn_like(v) for k, v in model(x).items()}

        def step(model=model, grads=grads, mode=mode):
            with torch.autocast(device.type, torch.bfloat16, enabled=mode == "autocast"):
                out = model(x)
                regs = [r for r in model.regularisers().values() if r.requires_grad]
            torch.autograd.backward([*out.values(), *regs],
                                    [*(grads[k] for k in out), *map(torch.ones_like, regs)])
            model.zero_grad(set_to_none=True)
        row[f"fwdbwd_ms_{mode}"] = device_ms(step, device, iters, 3)
        if mode == "autocast":
            row["fwdbwd_kernels"] = top_kernels(step)
        del model, grads
    return row


def cmd_cost(args) -> dict:
    device = torch.device(args.device)
    names = presets(args.presets, args.extra)
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "batch": args.batch,
           "ssd_backend": backend() if HAS_FUSED_SSD else "reference",
           "student_ms": student_ms(args.batch, device, args.student_iters), "rows": {}}
    ref = res["student_ms"]["stock_eager"]
    print(f"[cost] student forward, batch {args.batch}: {res['student_ms']}", flush=True)
    for name in names:
        try:
            r = res["rows"][name] = preset_cost(name, args.batch, device, args.iters)
        except Exception as e:  # noqa: BLE001 -- one failing preset is reported, the others still run
            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"[cost] {name}: FAILED {res['errors'][name]}", flush=True)
            continue
        r["fwd_pct_student"] = 100 * r["fwd_ms"] / ref
        r["fwdbwd_pct_student"] = 100 * r["fwdbwd_ms_autocast"] / ref
        print(f"[cost] {name}: fwd {r['fwd_ms']:.2f} ms ({r['fwd_pct_student']:.2f}%), fwd+bwd "
              f"{r['fwdbwd_ms_autocast']:.2f} ms ({r['fwdbwd_pct_student']:.2f}%), "
              f"bf16 {r['fwdbwd_ms_bf16']:.2f}; "
              f"top fwd {r['fwd_kernels'][:2]}", flush=True)
        write(args.out, res)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


# ------------------------------------------------------------------------------- train / evaluate

@dataclass
class Budget:
    steps: int = 2000
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0
    w_head: float = 1.0


def train_config(name: str, budget: Budget, deficiency: dict | None = None) -> TrainConfig:
    base, kw = split_variant(name)
    return TrainConfig(converter=base, converter_kwargs=kw, head=HeadConfig(enabled=True),
                       seed=budget.seed,
                       optim=OptimConfig(lr=budget.lr, warmup_steps=budget.warmup),
                       deficiency=DeficiencyConfig(**(deficiency or {})))


def fit(name: str, pairs: Pairs, budget: Budget, device: torch.device,
        deficiency: dict | None = None):
    """Train preset ``name`` + a residual head like pipeline.train (distill + head CE + deficiency
    terms with warm-up), same batch order for every call. Returns (converter, head, log)."""
    cfg = train_config(name, budget, deficiency)
    torch.manual_seed(budget.seed)
    converter, head = build_models(cfg, pairs.specs, len(pairs.classes))
    converter, head = converter.to(device), head.to(device)
    params = [*converter.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = make_scheduler(opt, cfg.optim, budget.steps)
    d = cfg.deficiency
    w_reg = {"nuclear": WarmupSchedule(d.w_nuclear, d.warmup_steps),
             "selection": WarmupSchedule(d.w_selection, d.warmup_steps)}
    w_jac = WarmupSchedule(d.w_jacobian, d.warmup_steps)
    mean = {t: s["mean"] for t, s in pairs.stats.items()}
    std = {t: s["std"] for t, s in pairs.stats.items()}
    order_gen = torch.Generator().manual_seed(budget.seed)
    n, order, losses = pairs.train["student"].shape[0], torch.empty(0, dtype=torch.long), []
    amp = device.type == "cuda"
    converter.train(), head.train()
    t0 = time.perf_counter()
    for step in range(budget.steps):
        if order.numel() < budget.batch:
            order = torch.cat([order, torch.randperm(n, generator=order_gen)])
        idx, order = order[:budget.batch].to(device), order[budget.batch:]
        x = pairs.train["student"][idx].float()
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            out = converter.forward_all(x)
            regs = converter.regularisers()
            logits = head(x, out)
        out = {k: v.float() for k, v in out.items()}
        teachers = {t: pairs.train[t][idx] for t in pairs.targets}
        loss, _ = distill_loss(out, teachers, mean=mean, std=std)
        ce = F.cross_entropy(logits.float(), pairs.train["label_index"][idx])
        loss = loss + budget.w_head * ce
        for key, value in regs.items():
            if w_reg.get(key) and w_reg[key](step) > 0:
                loss = loss + w_reg[key](step) * value.float()
        if w_jac(step) > 0:
            flat = lambda z: torch.cat([o.flatten(1) for o in converter.forward_all(z).values()], 1)
            loss = loss + w_jac(step) * jacobian_penalty(flat, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        sched.step_update(step + 1)
        if step % 50 == 0 or step == budget.steps - 1:
            losses.append(round(loss.item(), 4))
    sync_s = time.perf_counter() - t0
    return converter, head, {"train_s": round(sync_s, 1), "loss_first": losses[0],
                             "loss_last": losses[-1], "loss_every_50": losses}


@torch.no_grad()
def evaluate(converter, head, pairs: Pairs, device: torch.device, batch: int = 16) -> dict:
    """Held-out fidelity per target (pipeline.evaluate.FidelityMeter on standardised features)
    + top-1."""
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
        labels = val["label_index"][i:i + batch]
        correct += topk_correct(logits.float(), labels, ks=(1,))[1]
        total += int((labels >= 0).sum())
    per = {t: {k: round(v, 5) for k, v in m.compute().items()} for t, m in meters.items()}
    return {"targets": per,
            "mean_cosine": round(statistics.fmean(v["cosine"] for v in per.values()), 5),
            "mean_r2": round(statistics.fmean(v["r2"] for v in per.values()), 5),
            "top1": round(correct / total, 4) if total else None}


def run_one(name, pairs, budget, device, deficiency=None) -> dict:
    converter, head, log = fit(name, pairs, budget, device, deficiency)
    row = {"preset": name, "deficiency": deficiency or {}, **log,
           **evaluate(converter, head, pairs, device)}
    cpu = copy.deepcopy(converter).cpu().eval()
    shape = (pairs.specs["student"].tokens, pairs.specs["student"].dim)
    row.update(params=count_params(converter), gflops=round(gflops_per_clip(cpu, shape), 3),
               latency_ms_clip=round(latency_ms(converter, shape, repeats=5, device=device), 3))
    fid = " ".join(f"{t} {v['cosine']:.3f}/{v['r2']:.3f}" for t, v in row["targets"].items())
    print(f"[{name}{' ' + json.dumps(deficiency) if deficiency else ''}] cos/R2 {fid}; "
          f"mean {row['mean_cosine']:.4f}/{row['mean_r2']:.4f} top1 {row['top1']}; "
          f"loss {log['loss_first']} -> {log['loss_last']} ({log['train_s']} s)", flush=True)
    del converter, head
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def cmd_quality(args) -> dict:
    device = torch.device(args.device)
    pairs = load_pairs(args, device)
    budget = Budget(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
    print(f"# converters quality: {pairs.desc}; {budget}", flush=True)
    res = {"description": pairs.desc, "synthetic": bool(args.synthetic), "budget": budget.__dict__,
           "rows": []}
    for name in presets(args.presets, args.extra):
        guarded(res, name, lambda name=name: run_one(name, pairs, budget, device))
        write(args.out, res)
    return res


def guarded(res: dict, label: str, fn) -> None:
    """Append ``fn()`` to res["rows"]; a failure goes to res["errors"] and the run goes on."""
    try:
        res["rows"].append(fn())
    except Exception as e:  # noqa: BLE001
        res.setdefault("errors", {})[label] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"[{label}] FAILED {res['errors'][label]}", flush=True)


SWEEP = {"rank": (None, 64, 16), "mask_ratio": (0.0, 0.3, 0.6), "w_jacobian": (0.0, 0.1, 1.0)}


def cmd_sweep(args) -> dict:
    device = torch.device(args.device)
    pairs = load_pairs(args, device)
    budget = Budget(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
    warm = {"warmup_steps": args.steps // 4}
    settings = [{}] + [{knob: v, **warm} for knob, values in SWEEP.items() for v in values[1:]]
    settings.append({k: v[-2] for k, v in SWEEP.items()} | warm)          # all knobs on together
    res = {"description": pairs.desc, "preset": args.preset, "budget": budget.__dict__, "rows": []}
    for d in settings:
        guarded(res, json.dumps(d), lambda d=d: run_one(args.preset, pairs, budget, device, d))
        write(args.out, res)
    return res


# ------------------------------------------------------------------------------------------ tables

def markdown(res: dict, command: str) -> str:
    """One table per run, every preset (or setting) a row; differences vs the floor / first row."""
    if command == "cost":
        ref = res["student_ms"]["stock_eager"]
        lines = [(f"student forward (stock, eager, bf16, batch {res['batch']}): {ref:.1f} ms; "
                  f"with the pipeline's rewrites {res['student_ms']['pipeline_eager']:.1f} ms"), "",
                 ("| preset | params (M) | GFLOP/clip | fwd ms | % student | fwd+bwd ms "
                  "| % student | fwd+bwd bf16 ms | 1 clip GPU ms | 1 clip CPU ms "
                  "| top forward kernels |"),
                 "|---|" + "---:|" * 9 + "---|"]
        for name, r in res["rows"].items():
            kern = "; ".join(f"{k[:40]} {100 * v:.0f}%" for k, v in r["fwd_kernels"][:2])
            lines.append(f"| {name} | {r['params'] / 1e6:.2f} | {r['gflops']:.2f} | "
                         f"{r['fwd_ms']:.2f} | {r['fwd_pct_student']:.2f} | "
                         f"{r['fwdbwd_ms_autocast']:.2f} | {r['fwdbwd_pct_student']:.2f} | "
                         f"{r['fwdbwd_ms_bf16']:.2f} | {r['latency_ms_clip_gpu']:.2f} | "
                         f"{r['latency_ms_clip_cpu']:.0f} | {kern} |")
        return "\n".join(lines)
    rows = res["rows"]
    base = rows[0]
    targets = list(base["targets"])
    head = ("| " + ("setting" if command == "sweep" else "preset") + " | "
            + " | ".join(f"{t} cos | {t} R^2" for t in targets)
            + " | mean cos (d) | mean R^2 (d) | top-1 | params (M) | GFLOP | ms/clip |")
    lines = [head, "|---|" + "---:|" * (2 * len(targets) + 6)]
    for r in rows:
        knobs = ", ".join(f"{k}={v}" for k, v in r["deficiency"].items() if k != "warmup_steps")
        label = (knobs or "off") if command == "sweep" else r["preset"]
        cells = " | ".join(f"{r['targets'][t]['cosine']:.3f} | {r['targets'][t]['r2']:.3f}"
                           for t in targets)
        lines.append(f"| {label} | {cells} | {r['mean_cosine']:.4f} "
                     f"({r['mean_cosine'] - base['mean_cosine']:+.4f}) | "
                     f"{r['mean_r2']:.4f} ({r['mean_r2'] - base['mean_r2']:+.4f}) | {r['top1']} | "
                     f"{r['params'] / 1e6:.2f} | {r['gflops']:.2f} | {r['latency_ms_clip']:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main

def presets(pattern: str, extra=()) -> list[str]:
    """The floor, the presets matching ``pattern`` (comma list of globs), then ``extra`` variants
    written ``preset[key=value;key=value]``."""
    return [BASELINE] + [n for n in list_converters() if n != BASELINE and any(
        fnmatch.fnmatch(n, p) for p in pattern.split(","))] + list(extra)


def split_variant(name: str) -> tuple[str, dict]:
    """``preset[key=value;...]`` -> (preset, {key: value parsed as YAML})."""
    import yaml
    base, _, rest = name.partition("[")
    items = (i.split("=", 1) for i in rest.rstrip("]").split(";") if i)
    return base, {k: yaml.safe_load(v) for k, v in items}


def make(name: str):
    base, kw = split_variant(name)
    return create_converter(base, **kw)


def write(path, res) -> None:
    if path:
        res["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(res, indent=1, default=str))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("cost", "quality", "sweep"):
        s = sub.add_parser(name)
        s.add_argument("--out", help="JSON results (rewritten after every preset)")
        s.add_argument("--presets", default="*",
                       help="comma list of globs over list_converters(); the floor always runs")
        s.add_argument("--extra", action="append", default=[], metavar="PRESET[K=V;K=V]",
                       help="also a variant of a preset with these constructor overrides "
                            "(repeatable)")
        if name == "cost":
            s.add_argument("--batch", type=int, default=32)
            s.add_argument("--iters", type=int, default=20)
            s.add_argument("--student-iters", type=int, default=10)
            s.add_argument("--device", default="cuda", help="cpu: a dry run of this script only")
            continue
        data = s.add_mutually_exclusive_group(required=True)
        data.add_argument("--store",
                          help="storage URL of a feature store with train / val (held-out) splits")
        data.add_argument("--synthetic", action="store_true",
                          help="random pairs: ONLY to smoke-test this script")
        s.add_argument("--store-name", default="features")
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--steps", type=int, default=2000 if name == "quality" else 1000)
        s.add_argument("--batch", type=int, default=16)
        s.add_argument("--lr", type=float, default=1e-3)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--train-clips", type=int, default=8, help="--synthetic only")
        s.add_argument("--eval-clips", type=int, default=4, help="--synthetic only")
        s.add_argument("--student-dim", type=int, default=32, help="--synthetic only")
        s.add_argument("--teacher-dim", type=int, default=24, help="--synthetic only")
        if name == "sweep":
            s.add_argument("--preset", default="convmix_small")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    res = {"cost": cmd_cost, "quality": cmd_quality, "sweep": cmd_sweep}[args.command](args)
    res["markdown"] = markdown(res, args.command) if res["rows"] else "(no rows)"
    write(args.out, res)
    print("\n" + res["markdown"], flush=True)
    return res


if __name__ == "__main__":
    main()
