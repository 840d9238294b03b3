"""Model-side variants of the four backbones (issue 4): where does the model-only ceiling come from?

Each model alone on its derived input (batch of real decoded clips, bf16 weights, full-size random
architectures), timed under variants measured in this one run:

* ``autocast``: torch.autocast(bf16) over bf16 weights, upstream V-JEPA 2 RoPE (the old default);
* ``bf16``: no autocast (norms/softmax in bf16 too), upstream RoPE;
* ``bf16+rope``: plus the cached V-JEPA 2 RoPE tables (``backbones.use_cached_rope_vjepa2``; student only);
* ``+cudnn`` / ``+flash`` / ``+efficient``: that SDPA backend first;
* ``compile``: ``torch.compile`` of the model with the fastest eager settings (first call timed apart).

Prints clips/s per model and variant, the ratio to ``autocast``, and the agreement (token cosine) of
each variant's output with the ``autocast`` output; writes JSON to --out.

    python bench/models.py --videos .bench-videos --batch-size 32 --iters 10 --out $OUT/models.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from pipeline import backbones as bb
from pipeline.config import DecodeConfig, ModelsConfig

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def timed(fn, iters: int, warmup: int = 2) -> float:
    """clips/s-free: seconds per call (median of ``iters``, CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def cosine(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    c = F.cosine_similarity(a.float(), b.float(), dim=-1)
    return round(float(c.mean()), 5), round(float(c.min()), 5)


def _caller(name: str, model, x: torch.Tensor, spec, autocast: bool = False, backend: str | None = None):
    """A no-arg function running ``model`` on ``x`` under the given autocast / SDPA backend preference."""
    from torch.nn.attention import sdpa_kernel
    order = [BACKENDS[backend], *[b for k, b in BACKENDS.items() if k != backend]] if backend else None

    def fn():
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=autocast), \
                (sdpa_kernel(order, set_priority=True) if order else contextlib.nullcontext()):
            out = model(pixel_values_videos=x, skip_predictor=True) if name == "student" else model(pixel_values=x)
        return bb._tokens(name, out.last_hidden_state, spec)
    return fn


def bench_model(name: str, model, x: torch.Tensor, args) -> dict:
    """Every variant of one model; returns {variant: {clips_per_s, ms_per_batch, x_autocast, cos...}}."""
    spec = bb.layout_spec(name, model.config)
    res, outs = {}, {}

    def measure(label, fn):
        try:
            s = timed(fn, args.iters)
            outs[label] = fn()
            res[label] = {"clips_per_s": round(args.batch_size / s, 2), "ms_per_batch": round(s * 1e3, 2)}
        except Exception as e:  # noqa: BLE001 -- a backend that does not apply is reported, not fatal
            res[label] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(f"[models] {name} {label}: {res[label]}", flush=True)

    if name == "student":  # upstream RoPE for the first two variants
        for m in model.modules():
            m.__dict__.pop("apply_rotary_embeddings", None)
    measure("autocast", _caller(name, model, x, spec, autocast=True))
    measure("bf16", _caller(name, model, x, spec))
    base = "bf16"
    if name == "student":
        bb.use_cached_rope_vjepa2(model)
        base = "bf16+rope"
        measure(base, _caller(name, model, x, spec))
    for k in BACKENDS:
        if k != "math":
            measure(f"{base}+{k}", _caller(name, model, x, spec, backend=k))
    eager = {k: v for k, v in res.items() if "clips_per_s" in v and k != "autocast"}
    best = max(eager, key=lambda k: eager[k]["clips_per_s"])
    backend = next((k for k in BACKENDS if best.endswith("+" + k)), None)
    if not args.no_compile:
        torch._dynamo.reset()
        fn = _caller(name, torch.compile(model), x, spec, backend=backend)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        res["compile_first_call_s"] = round(time.perf_counter() - t0, 1)
        measure(f"compile({best})", fn)
    ref = outs["autocast"]
    for k, o in outs.items():
        res[k]["cos_vs_autocast_mean_min"] = cosine(o, ref)
        res[k]["x_autocast"] = round(res[k]["clips_per_s"] / res["autocast"]["clips_per_s"], 3)
    res["best_eager"] = best
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=Path, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--models", default=",".join(bb.MODEL_NAMES))
    p.add_argument("--no-compile", action="store_true")
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
    frames = frames.repeat(-(-args.batch_size // len(frames)), 1, 1, 1, 1)[: args.batch_size].to(dev)
    inputs = bb.derive_inputs(frames, dtype=torch.bfloat16)

    cfg = ModelsConfig(weights="random", device="cuda", dtype="bfloat16")
    t0 = time.perf_counter()
    models = bb.build_models(cfg)
    results = {"host": {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__},
               "batch_size": args.batch_size, "build_s": round(time.perf_counter() - t0, 2), "models": {}}
    print(f"[models] built in {results['build_s']} s", flush=True)
    for name in names:
        results["models"][name] = bench_model(name, models[name], inputs[name], args)
        torch.cuda.empty_cache()

    # the four in sequence (sum of per-model batch times): old default, best eager, best of eager/compiled
    def ms(r, key):
        return r.get(key, {}).get("ms_per_batch", float("inf")) if key else float("inf")
    compiled = {n: next((k for k in r if k.startswith("compile(")), None) for n, r in results["models"].items()}
    per = {"autocast": {n: ms(r, "autocast") for n, r in results["models"].items()},
           "best_eager": {n: ms(r, r["best_eager"]) for n, r in results["models"].items()},
           "best": {n: min(ms(r, r["best_eager"]), ms(r, compiled[n])) for n, r in results["models"].items()}}
    total = {k: round(args.batch_size / (sum(v.values()) / 1e3), 2) for k, v in per.items()}
    total["compile_helps"] = [n for n, r in results["models"].items() if ms(r, compiled[n]) < ms(r, r["best_eager"])]
    results["four_models_clips_per_s"] = total
    print(f"[models] four models, clips/s: {total}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
