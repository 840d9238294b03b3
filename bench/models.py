"""Model-side variants of the four backbones (issue 4): where does the model-only ceiling come from?

Each model alone on its derived input (batch of real decoded clips, bf16 weights, full-size random
architectures), timed under variants measured in this one run:

* ``autocast``: torch.autocast(bf16) over bf16 weights, upstream V-JEPA 2 RoPE (the old default);
* ``bf16``: no autocast (norms/softmax in bf16 too), upstream RoPE;
* ``bf16+rope``: plus the cached V-JEPA 2 RoPE tables (``rewrites.use_cached_rope_vjepa2``; student
  only);
* ``+cudnn`` / ``+flash`` / ``+efficient``: that SDPA backend first;
* ``compile``: ``torch.compile`` of the model with the fastest eager settings (first call timed
  apart).

With ``--fp8``, instead: per model, bf16 (eager and compiled per block, as the pipeline
compiles) vs float8 linears (``rewrites.use_float8_linears``, per-row and per-tensor
scales, compiled per block), cosine against the bf16 eager output.

Prints clips/s per model and variant, the ratio to ``autocast``, and the agreement (token cosine) of
each variant's output with the ``autocast`` output; writes JSON to --out.

    python bench/models.py --videos .bench-videos --batch-size 32 --iters 10 --out $OUT/models.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import cosine, seconds_per_call
from pipeline import backbones as bb
from pipeline import rewrites as rw
from pipeline.config import DecodeConfig, ModelsConfig
from pipeline.preprocess import derive_inputs

DEVICE = torch.device("cuda")  # this benchmark runs on CUDA only
SDPA_BACKENDS = ("cudnn", "flash", "efficient")  # models.attention values timed (math: far slower)


def _caller(fx: bb.FeatureExtractor, name: str, x: torch.Tensor, *, autocast: bool = False,
            attention: str = "auto", module=None):
    """A no-arg function running ``fx.run(name, x)`` with this variant's SDPA preference and module
    (default: the eager model), set at each call since variants share one FeatureExtractor;
    ``autocast``: under torch.autocast (the product dropped it: models.autocast was slower)."""
    def fn():
        fx.attention = attention
        fx._run[name] = fx.models[name] if module is None else module
        with torch.autocast("cuda", dtype=fx.dtype, enabled=autocast):
            return fx.run(name, x)
    return fn


def bench_model(fx: bb.FeatureExtractor, name: str, x: torch.Tensor, args) -> dict:
    """Every variant of one model; returns {variant: {clips_per_s, ms_per_batch, x_autocast,
    cos...}}."""
    model = fx.models[name]
    res, outs = {}, {}

    def measure(label, fn):
        try:
            s = seconds_per_call(fn, DEVICE, args.iters)
            outs[label] = fn()
            res[label] = {"clips_per_s": round(args.batch_size / s, 2),
                          "ms_per_batch": round(s * 1e3, 2)}
        # a backend that does not apply is reported, not fatal
        except Exception as e:  # noqa: BLE001
            res[label] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(f"[models] {name} {label}: {res[label]}", flush=True)

    if name == "student":  # upstream RoPE for the first two variants
        for m in model.modules():
            m.__dict__.pop("apply_rotary_embeddings", None)
    measure("autocast", _caller(fx, name, x, autocast=True))
    measure("bf16", _caller(fx, name, x))
    base = "bf16"
    if name == "student":
        rw.use_cached_rope_vjepa2(model)
        base = "bf16+rope"
        measure(base, _caller(fx, name, x))
    for k in SDPA_BACKENDS:
        measure(f"{base}+{k}", _caller(fx, name, x, attention=k))
    eager = {k: v for k, v in res.items() if "clips_per_s" in v and k != "autocast"}
    best = max(eager, key=lambda k: eager[k]["clips_per_s"])
    attention = next((k for k in SDPA_BACKENDS if best.endswith("+" + k)), "auto")
    if not args.no_compile:
        torch._dynamo.reset()
        fn = _caller(fx, name, x, attention=attention, module=torch.compile(model))
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        res["compile_first_call_s"] = round(time.perf_counter() - t0, 1)
        measure(f"compile({best})", fn)
    ref = outs["autocast"]
    for k, o in outs.items():
        res[k]["cos_vs_autocast_mean_min"] = cosine(o, ref, digits=5)
        res[k]["x_autocast"] = round(res[k]["clips_per_s"] / res["autocast"]["clips_per_s"], 3)
    res["best_eager"] = best
    return res


def bench_fp8(fx: bb.FeatureExtractor, name: str, x: torch.Tensor, args) -> dict:
    """bf16 / fp8 x eager / compiled blocks for one model: {variant: {clips_per_s, ms_per_batch,
    cos...}}."""
    res, outs = {}, {}
    for variant in ("bf16", "bf16+compile", "fp8+compile", "fp8-tensor+compile"):
        model = copy.deepcopy(fx.models[name])
        if variant.startswith("fp8"):
            per_tensor = variant.startswith("fp8-tensor")
            rw.use_float8_linears(model, granularity="tensor" if per_tensor else "row")
        if variant.endswith("+compile"):
            torch._dynamo.reset()
            model = fx._compile(model)
        fn = _caller(fx, name, x, module=model)
        t0 = time.perf_counter()
        outs[variant] = fn()
        torch.cuda.synchronize()
        first_s = round(time.perf_counter() - t0, 1)
        s = seconds_per_call(fn, DEVICE, args.iters)
        res[variant] = {"clips_per_s": round(args.batch_size / s, 2),
                        "ms_per_batch": round(s * 1e3, 2), "first_call_s": first_s,
                        "cos_vs_bf16_mean_min": cosine(outs[variant], outs["bf16"], digits=5)}
        res[variant]["x_bf16"] = round(res[variant]["clips_per_s"] / res["bf16"]["clips_per_s"], 3)
        print(f"[models] {name} {variant}: {res[variant]}", flush=True)
        del model
        torch.cuda.empty_cache()
    return res


def four_models(results: dict, args) -> dict:
    """The four in sequence (sum of per-model batch times): old default, best eager, best of
    eager/compiled."""
    def ms(r, key):
        return r.get(key, {}).get("ms_per_batch", float("inf")) if key else float("inf")
    models = results["models"]
    compiled = {n: next((k for k in r if k.startswith("compile(")), None)
                for n, r in models.items()}
    per = {"autocast": {n: ms(r, "autocast") for n, r in models.items()},
           "best_eager": {n: ms(r, r["best_eager"]) for n, r in models.items()},
           "best": {n: min(ms(r, r["best_eager"]), ms(r, compiled[n])) for n, r in models.items()}}
    total = {k: round(args.batch_size / (sum(v.values()) / 1e3), 2) for k, v in per.items()}
    total["compile_helps"] = [n for n, r in models.items()
                              if ms(r, compiled[n]) < ms(r, r["best_eager"])]
    return total


def four_models_fp8(results: dict, args) -> dict:
    """The four in sequence per precision (--fp8), each model at the faster of eager / compiled."""
    total = {}
    for prec in ("bf16", "fp8", "fp8-tensor"):
        per = [min(r[k]["ms_per_batch"] for k in (prec, prec + "+compile") if k in r)
               for r in results["models"].values()]
        total[prec] = round(args.batch_size / (sum(per) / 1e3), 2)
    return total


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=Path, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--models", default=",".join(bb.MODEL_NAMES))
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--fp8", action="store_true",
                   help="bf16 vs float8 linears, eager and compiled, per model")
    p.add_argument("--out", type=Path, default=Path("models-bench.json"))
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    names = [n.strip() for n in args.models.split(",") if n.strip()]

    # real decoded clips, repeated to the batch size
    from pipeline.decode import decode_clips
    src = args.videos
    if src is None:
        from pipeline.samples import sample_dir
        src = sample_dir()
    dcfg = DecodeConfig(window=32, stride=2, clips_per_video=4, short_side=256, short_video="loop")
    clips = [c for v in sorted(src.rglob("*.mp4"))[:8] for _, c in decode_clips(str(v), dcfg)]
    frames = torch.from_numpy(np.stack(clips))
    reps = -(-args.batch_size // len(frames))
    frames = frames.repeat(reps, 1, 1, 1, 1)[: args.batch_size].to(dev)
    inputs = derive_inputs(frames, dtype=torch.bfloat16)

    # variants compile
    cfg = ModelsConfig(weights="random", device="cuda", dtype="bfloat16", compile=[])
    t0 = time.perf_counter()
    fx = bb.FeatureExtractor(cfg)
    results = {"host": {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__},
               "batch_size": args.batch_size, "build_s": round(time.perf_counter() - t0, 2),
               "models": {}}
    print(f"[models] built in {results['build_s']} s", flush=True)
    for name in names:
        bench = bench_fp8 if args.fp8 else bench_model
        results["models"][name] = bench(fx, name, inputs[name], args)
        torch.cuda.empty_cache()
    total = (four_models_fp8 if args.fp8 else four_models)(results, args)
    results["four_models_clips_per_s"] = total
    print(f"[models] four models, clips/s: {total}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
