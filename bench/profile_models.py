"""Where each backbone's GPU time goes (issue 4), as the pipeline runs it, and what model rewrites
buy.

Per model, on one batch of its derived input from random frames (full-size architectures, random
weights, ``ModelsConfig`` defaults: bf16, regional ``torch.compile`` of
student/VideoMAE/TimeSformer, except ``rewrites=[]``: the upstream modules, which the variants below
rewrite):

* ms per batch (median of CUDA-synchronised calls) and clips/s;
* FLOPs per clip (``torch.utils.flop_counter``: matmuls, convolutions and attention) and TFLOP/s;
* ``torch.profiler`` kernel time by category (gemm, attention, conv, triton = inductor's fused
  kernels, elementwise, copy, other), each with its share of the batch and, for gemm and attention,
  its TFLOP/s;
* the top kernels by time.

Variants, each timed in the same run against ``base``, with the
token cosine to ``base``'s output and their own kernel categories (``--no-variants`` skips them); a
variant names its rewrites joined by ``+``:

* ``patch``: patch-embedding convolutions as one matmul (``rewrites.use_matmul_patch_embeddings``);
* ``gelu``: each MLP's first linear + GELU as one cuBLASLt matmul with a GELU epilogue
  (``rewrites.fuse_linear_gelu``);
* ``fold``: TimeSformer's temporal output projection and ``temporal_dense`` folded into one linear
  map (``rewrites.fold_timesformer_temporal_dense``);
* ``packedN``: TimeSformer's temporal attention, N groups of 16 tokens per attention call with a
  block-diagonal mask (``rewrites.use_packed_temporal_attention``);
* ``compiled``: compiled per block although the pipeline runs the model eagerly (ViViT).

The default ``models.rewrites`` are ``patch+gelu`` (``+fold+packed8`` for TimeSformer).

    python bench/profile_models.py --batch-size 32 --out $OUT/profile.json CPU dry run (tiny models,
    no profiler categories): python bench/profile_models.py --tiny --batch-size 2
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import cosine, seconds_per_call, sync
from pipeline import backbones as bb
from pipeline import rewrites as rw
from pipeline.config import ModelsConfig
from pipeline.preprocess import derive_inputs

# kernel name -> category, first match wins (inductor's kernels: triton_*; cuBLAS on Hopper: nvjet_*
# / sm90_xmma_*; cuDNN SDPA: cudnn_generated_fort_native_sdpa*; PyTorch's flash / mem-efficient:
# flash_fwd* / fmha_*)
CATEGORIES = (("triton", r"^triton_"), ("attention", r"sdpa|fmha|flash|attention|softmax"),
              ("conv", r"conv|implicit_convolve|cudnn"),
              ("gemm", r"gemm|nvjet|xmma|cutlass|cublas|sm90_|splitk"),
              ("copy", r"memcpy|memset|copy|cat|gather|index"),
              ("elementwise", r"elementwise|vectorized|reduce|layer_norm|norm|gelu|unrolled"))
VARIANTS = {"student": ("patch", "gelu", "patch+gelu"), "videomae": ("patch", "gelu", "patch+gelu"),
            "timesformer": ("patch", "gelu", "fold", "packed4", "packed8", "packed16",
                            "patch+gelu+fold+packed8"),
            "vivit": ("patch", "gelu", "patch+gelu", "compiled", "patch+gelu+compiled")}


def category(kernel: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, kernel, re.IGNORECASE):
            return cat
    return "other"


def flops_per_call(fn) -> dict[str, int]:
    """FLOPs of one call by operator family (matmul, attention, conv)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    fam = {"matmul": 0, "attention": 0, "conv": 0}
    for op, n in counter.get_flop_counts()["Global"].items():
        name = str(op)
        key = "attention" if "attention" in name else "conv" if "convolution" in name else "matmul"
        fam[key] += int(n)
    return fam


def kernel_profile(fn, device: torch.device, iters: int = 3) -> dict[str, dict[str, float]]:
    """{kernel name: total µs over ``iters`` calls} from torch.profiler (CUDA kernels only)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        sync(device)
    kernels: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time_total / iters
    return kernels


def summarise(kernels: dict[str, float], flops: dict[str, int], batch_ms: float, top: int) -> dict:
    """Per category: ms per batch, share of the batch's wall time, TFLOP/s for gemm / attention."""
    cats: dict[str, float] = {}
    for k, us in kernels.items():
        cats[category(k)] = cats.get(category(k), 0.0) + us / 1e3
    out = {"categories": {}}
    for cat, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
        row = {"ms": round(ms, 3), "share": round(ms / batch_ms, 3)}
        fl = {"gemm": flops["matmul"], "attention": flops["attention"],
              "conv": flops["conv"]}.get(cat)
        if fl:
            row["tflops"] = round(fl / (ms / 1e3) / 1e12, 1)
        out["categories"][cat] = row
    out["kernels_ms"] = round(sum(cats.values()), 3)
    out["top"] = [(k[:110], round(us / 1e3, 3), category(k))
                  for k, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]]
    return out


def variant_model(fx: bb.FeatureExtractor, name: str, variant: str) -> torch.nn.Module:
    """A copy of ``name``'s eager model with ``variant``'s rewrites, compiled as the pipeline would.
    """
    model = copy.deepcopy(fx.models[name])
    parts = variant.split("+")
    if "patch" in parts:
        assert rw.use_matmul_patch_embeddings(model) > 0, f"{name}: no patch convolution found"
    if "gelu" in parts:
        assert rw.fuse_linear_gelu(model) > 0, f"{name}: no MLP GELU found"
    if "fold" in parts:
        rw.fold_timesformer_temporal_dense(model)
    for p in parts:
        if p.startswith("packed"):
            rw.use_packed_temporal_attention(model, pack=int(p.removeprefix("packed")))
    if name in fx.compiled or "compiled" in parts:
        model = fx._compile(model)
    return model


def caller(fx: bb.FeatureExtractor, name: str, x: torch.Tensor, module: torch.nn.Module):
    def fn():
        fx._run[name] = module
        return fx.run(name, x)
    return fn


def bench_model(fx: bb.FeatureExtractor, name: str, x: torch.Tensor, args) -> dict:
    dev, b = fx.device, x.shape[0]
    base_module = fx._run[name]
    base = caller(fx, name, x, base_module)
    t0 = time.perf_counter()
    ref = base()
    sync(dev)
    res: dict = {"first_call_s": round(time.perf_counter() - t0, 1),
                 "compiled": name in fx.compiled}
    # a dispatch mode under dynamo would leave the blocks eager
    with torch.compiler.set_stance("force_eager"):
        flops = flops_per_call(base)
    res["gflop_per_clip"] = {k: round(v / b / 1e9, 1) for k, v in flops.items()}
    s = seconds_per_call(base, dev, args.iters)
    res["base"] = {"ms_per_batch": round(s * 1e3, 2), "clips_per_s": round(b / s, 1),
                   "tflops": round(sum(flops.values()) / s / 1e12, 1)}
    if dev.type == "cuda":
        res["profile"] = summarise(kernel_profile(base, dev), flops, s * 1e3, args.top)
    print(f"[profile] {name} base: {json.dumps(res)}", flush=True)
    for variant in (VARIANTS[name] if args.variants else ()):
        try:
            t0 = time.perf_counter()
            fn = caller(fx, name, x, variant_model(fx, name, variant))
            out = fn()
            sync(dev)
            first = time.perf_counter() - t0
            sv = seconds_per_call(fn, dev, args.iters)
            res[variant] = {"ms_per_batch": round(sv * 1e3, 2), "clips_per_s": round(b / sv, 1),
                            "x_base": round(s / sv, 3), "cos_to_base_mean_min": cosine(out, ref),
                            "first_call_s": round(first, 1)}
            if dev.type == "cuda":
                prof = summarise(kernel_profile(fn, dev), flops, sv * 1e3, 0)
                res[variant]["categories_ms"] = {c: v["ms"] for c, v in prof["categories"].items()}
        # a variant that does not apply is reported, not fatal
        except Exception as e:  # noqa: BLE001
            res[variant] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"[profile] {name} {variant}: {res[variant]}", flush=True)
    fx._run[name] = base_module
    return res


def markdown(results: dict) -> str:
    host = results["host"]
    lines = [f"Profile: {host['gpu']}, torch {host['torch']}, batch {results['batch_size']}", "",
             "| model | clips/s | TFLOP/s | GFLOP/clip | " + " | ".join(c for c, _ in CATEGORIES)
             + " | other |",
             "|---|---:|---:|---:|" + "---:|" * (len(CATEGORIES) + 1)]
    for name, r in results["models"].items():
        cats = r.get("profile", {}).get("categories", {})
        cells = []
        for c in [c for c, _ in CATEGORIES] + ["other"]:
            v = cats.get(c)
            cells.append("" if v is None else f"{v['ms']} ms {100 * v['share']:.0f}%"
                         + (f" {v['tflops']} TF/s" if "tflops" in v else ""))
        lines.append(f"| {name} | {r['base']['clips_per_s']} | {r['base']['tflops']} | "
                     f"{sum(r['gflop_per_clip'].values()):.0f} | " + " | ".join(cells) + " |")
    lines += ["", ("| model | variant | clips/s | x base | cosine to base (mean / min) "
                   "| kernel ms by category |"),
              "|---|---|---:|---:|---|---|"]
    for name, r in results["models"].items():
        for v in VARIANTS[name]:
            if v in r:
                rv = r[v]
                cats = ", ".join(f"{c} {ms}" for c, ms in rv.get("categories_ms", {}).items())
                lines.append(f"| {name} | {v} | {rv.get('clips_per_s', '')} | "
                             f"{rv.get('x_base', '')} | "
                             f"{rv.get('cos_to_base_mean_min', rv.get('error', ''))} | {cats} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--top", type=int, default=12, help="top kernels listed per model")
    p.add_argument("--models", default=",".join(bb.MODEL_NAMES))
    p.add_argument("--no-variants", dest="variants", action="store_false")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (dry run)")
    p.add_argument("--out", type=Path, default=Path("profile-models.json"))
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    # every variant of a block is one more compiled entry of its code
    torch._dynamo.config.cache_size_limit = 64
    # base: the upstream transformers modules (no ``models.rewrites``); the variants apply them one
    # by one
    cfg = ModelsConfig(weights="tiny" if args.tiny else "random",
                       device="cuda" if cuda else "cpu", rewrites=[])
    t0 = time.perf_counter()
    fx = bb.FeatureExtractor(cfg)
    results = {"host": {"gpu": torch.cuda.get_device_name(0) if cuda else "CPU",
                        "torch": torch.__version__},
               "batch_size": args.batch_size, "build_s": round(time.perf_counter() - t0, 1),
               "config": cfg.model_dump(), "models": {}}
    print(f"[profile] models built in {results['build_s']} s; compiled: {fx.compiled}", flush=True)
    # random frames, never zeros (they can run faster than real data)
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (args.batch_size, 32, 256, 256, 3), dtype=torch.uint8,
                           generator=g)
    inputs = derive_inputs(frames.to(fx.device), dtype=fx.dtype)
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        results["models"][name] = bench_model(fx, name, inputs[name], args)
        if cuda:
            torch.cuda.empty_cache()
    per = [r["base"]["ms_per_batch"] for r in results["models"].values()]
    results["four_models_clips_per_s"] = round(args.batch_size / (sum(per) / 1e3), 2)
    if args.variants:  # each model at its fastest variant
        best = {}
        for n, r in results["models"].items():
            timed = [("base", r["base"]["ms_per_batch"])] + [
                (v, r[v]["ms_per_batch"]) for v in VARIANTS[n] if "ms_per_batch" in r.get(v, {})]
            best[n] = min(timed, key=lambda kv: kv[1])
        results["best_variants"] = {n: v for n, (v, _) in best.items()}
        best_ms = sum(ms for _, ms in best.values())
        results["four_models_best_clips_per_s"] = round(args.batch_size / (best_ms / 1e3), 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print("\n" + markdown(results) + f"\n\nfour models in sequence (sum of per-model batches): "
          f"{results['four_models_clips_per_s']} clips/s; each at its fastest variant "
          f"{results.get('best_variants')}: {results.get('four_models_best_clips_per_s')} "
          "clips/s", flush=True)
    return results


if __name__ == "__main__":
    main()
