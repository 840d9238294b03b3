"""``bench/converters.py cost``: every preset's ``forward_all`` and forward+backward against the
student encoder's forward, timed in the same run, eager and (``--compile``) under torch.compile.

Timings are medians of synchronised calls (bench.common.seconds_per_call). fwd: bf16 weights,
inference mode. fwd+bwd: fp32 weights under bf16 autocast, train mode, the backward of all three
outputs and the regularisers (and eager with pure bf16 weights). Params, GFLOPs and 1-clip
latency come from pipeline.evaluate (``gflops_per_clip``, ``latency_ms``): one metering for the
bench and the model cards.
"""
from __future__ import annotations

import copy
import fnmatch
import time

import torch

from bench.common import seconds_per_call
from bench.converter_data import make, presets, write
from pipeline.evaluate import gflops_per_clip, latency_ms
from tokconv import STUDENT
from tokconv.converters import count_params
from tokconv.ops import HAS_FUSED_SSD, backend


def ms_per_call(fn, device: torch.device, iters: int, warmup: int) -> float:
    return 1e3 * seconds_per_call(fn, device, iters, warmup)


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
        out["stock_eager"] = ms_per_call(run, device, iters, min(3, iters))
        rewrites = bb.model_rewrites(bb.ModelsConfig(), "student")
        model = bb._finish("student", model, rewrites, device)
        out["pipeline_eager"] = ms_per_call(run, device, iters, min(3, iters))
    return out


def kernel_label(name: str) -> str:
    """A CUDA kernel's function name without namespaces, templates and arguments."""
    base = name.split("(")[0] if not name.startswith("void ") else name[5:].split("(")[0]
    return base.split("<")[0].split("::")[-1][:60] or name[:60]


def top_kernels(fn, n: int = 6) -> dict[str, list]:
    """One profiled ``fn()``: {"kernels": [[kernel, share of the device time]...], "ops":
    [[aten op, share of the device time of the kernels it launched itself]...]}, ``n`` each."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    time_of = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    avgs = prof.key_averages()
    kern = [e for e in avgs if time_of(e) > 0 and (not cuda or e.device_type.name == "CUDA")]
    ops = [e for e in avgs if e.key.startswith("aten::") and time_of(e) > 0
           and e.device_type.name == "CPU"]
    out = {}
    for key, events, label in (("kernels", kern, kernel_label), ("ops", ops, str)):
        total = sum(time_of(e) for e in events) or 1.0
        shares: dict[str, float] = {}
        for e in events:
            shares[label(e.key)] = shares.get(label(e.key), 0.0) + time_of(e) / total
        out[key] = [[k, round(v, 3)] for k, v in sorted(shares.items(), key=lambda kv: -kv[1])[:n]]
    out["device_ms"] = round(sum(time_of(e) for e in kern) / 1e3, 3)
    return out


def train_step_fn(model, x: torch.Tensor, mode: str):
    """One forward+backward of ``model`` in train mode on ``x`` (fixed random output grads)."""
    device = x.device
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
        grads = {k: torch.randn_like(v) for k, v in model(x).items()}

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=mode == "autocast"):
            out = model(x)
            regs = [r for r in model.regularisers().values() if r.requires_grad]
        torch.autograd.backward([*out.values(), *regs],
                                [*(grads[k] for k in out), *map(torch.ones_like, regs)])
        model.zero_grad(set_to_none=True)
    return step


def timed(cpu_model, x: torch.Tensor, iters: int, *, compiled: bool, modes=("autocast",),
          kernels: bool = False) -> dict:
    """{"fwd_ms", "fwdbwd_ms_<mode>"...} of copies of ``cpu_model`` on ``x``'s device; with
    ``compiled`` each copy is ``nn.Module.compile()``d and its first call (the compile) timed."""
    device, row = x.device, {}
    infer = copy.deepcopy(cpu_model).to(device, torch.bfloat16).eval()
    if compiled:
        infer.compile()
    fwd = lambda: infer.forward_all(x)
    with torch.inference_mode():
        t0 = time.perf_counter()
        row["fwd_out"] = {k: v.float() for k, v in fwd().items()}
        row["compile_s"] = round(time.perf_counter() - t0, 1)
        row["fwd_ms"] = ms_per_call(fwd, device, iters, 3)
        if kernels:
            row["fwd_profile"] = top_kernels(fwd)
            row["fwd_kernels"] = row["fwd_profile"]["kernels"]
    for mode in modes:
        model = copy.deepcopy(cpu_model).to(device).train()
        if mode == "bf16":
            model.to(torch.bfloat16)
        if compiled:
            model.compile()
        step = train_step_fn(model, x, mode)
        t0 = time.perf_counter()
        step()
        if compiled:
            row["compile_s"] += round(time.perf_counter() - t0, 1)
        row[f"fwdbwd_ms_{mode}"] = ms_per_call(step, device, iters, 2)
        if kernels and mode == "autocast":
            row["fwdbwd_profile"] = top_kernels(step)
        del model, step
    return row


def preset_cost(name: str, batch: int, device: torch.device, iters: int, compiled: bool) -> dict:
    torch.manual_seed(0)
    cpu_model = make(name).eval()
    shape = (STUDENT.tokens, STUDENT.dim)
    row = {"params": count_params(cpu_model), "gflops": gflops_per_clip(cpu_model, shape),
           "latency_ms_clip_cpu": latency_ms(cpu_model, shape, repeats=2, device="cpu"),
           "latency_ms_clip_gpu": latency_ms(cpu_model, shape, repeats=5, device=device)}
    x = torch.randn(batch, *shape, device=device, dtype=torch.bfloat16)
    eager = timed(cpu_model, x, iters, compiled=False, modes=("autocast", "bf16"), kernels=True)
    ref = eager.pop("fwd_out")
    eager.pop("compile_s")
    row.update(eager)
    if compiled:
        comp = timed(cpu_model, x, iters, compiled=True, kernels=True)
        out = comp.pop("fwd_out")
        # bf16 outputs of the compiled forward against the eager ones (same weights and input)
        comp["max_abs_diff"] = max(float((out[k] - ref[k]).abs().max()) for k in ref)
        comp["max_abs_ref"] = max(float(ref[k].abs().max()) for k in ref)
        row["compiled"] = comp
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
        # a variant `preset[k=v]` is named exactly (fnmatch reads its brackets as a set)
        compiled = any(name == p or fnmatch.fnmatch(name, p) for p in args.compile.split(",") if p)
        try:
            r = res["rows"][name] = preset_cost(name, args.batch, device, args.iters, compiled)
        except Exception as e:  # noqa: BLE001 -- one failing preset is reported, the others still run
            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"[cost] {name}: FAILED {res['errors'][name]}", flush=True)
            continue
        for r_ in (r, r.get("compiled")):
            if r_:
                r_["fwd_pct_student"] = 100 * r_["fwd_ms"] / ref
                r_["fwdbwd_pct_student"] = 100 * r_["fwdbwd_ms_autocast"] / ref
        c = r.get("compiled")
        print(f"[cost] {name}: fwd {r['fwd_ms']:.2f} ms ({r['fwd_pct_student']:.2f}%), fwd+bwd "
              f"{r['fwdbwd_ms_autocast']:.2f} ms ({r['fwdbwd_pct_student']:.2f}%), bf16 "
              f"{r['fwdbwd_ms_bf16']:.2f}; fwd ops {r['fwd_profile']['ops'][:4]}; fwd+bwd ops "
              f"{r['fwdbwd_profile']['ops'][:6]}; fwd+bwd kernels "
              f"{r['fwdbwd_profile']['kernels'][:4]}"
              + (f"; compiled fwd {c['fwd_ms']:.2f} ({c['fwd_pct_student']:.2f}%), fwd+bwd "
                 f"{c['fwdbwd_ms_autocast']:.2f} ({c['fwdbwd_pct_student']:.2f}%), "
                 f"compile {c['compile_s']} s, max |diff| {c['max_abs_diff']:.3g}" if c else ""),
              flush=True)
        write(args.out, res)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res
