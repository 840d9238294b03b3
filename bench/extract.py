"""Extraction benchmark (issues 4, 19): ceilings and paths measured in ONE run on the same videos.

1. model-only: the four backbones (``FeatureExtractor``: derive inputs + 4 models + fp16 cast) on
   pre-decoded clips already on the GPU, same batch size and dtype;
1b. the model actor's host path without Ray (``--phases actor``);
2. decode-only: ``pipeline.decode.decode_clips`` on all CPU cores (process pool, results dropped);
3. pipeline: ``run_extract`` end to end on a local Ray cluster, local feature store under
   --workdir; its committed-clip rates come from the store's commit records;
4. plain loop (``bench/plain_loop.py``): a torch DataLoader with decord workers (one decode per
   video), the project's four models in sequence, fp16 features back in pinned host memory, one
   batch in flight (no writes);
4s. the same loop with the stock transformers models (``--phases stock``: what a user loads);
4o. the loop as it was before 2026-12-02 (``--phases loop-old``: one decode per clip, blocking
    ``.cpu()`` copies).

Prints clips/s for each (overall; after the first batch / shard; in the 20-90% window), GPU
utilisation (nvidia-smi every 0.5 s), the ratios (3) / min(1, 2) and (3) / (4), and a markdown
table last; writes everything as JSON to --out.

H200 (full-size architectures, random init; .bench-videos: see bench/make_videos.sh):
    python bench/extract.py --videos .bench-videos --clips 2048 --clips-per-video 4 \\
        --batch-size 32 --out $OUT/extract-h200.json
    ... --phases loop,loop-old,stock,pipeline     (the plain loops against the pipeline)
    ... --compile none --phases models            (all four eager)
    ... --num-gpus 2 --cpus 32 --clips 4096 --phases decode,models,pipeline   (2-GPU scaling)
    ... --clips 16384 --phases pipeline --discard-shards   (longer than the disk holds: sustained)
    ... --rewrites none --phases models   (the upstream transformers modules, no models.rewrites)
CPU dry run (tiny models): python bench/extract.py --tiny --clips 8 --cpus 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import Poller, cosine, sync
from bench.timing import CallTimes, GpuSampler, commit_times, rates
from pipeline.config import DecodeConfig, ExtractConfig, JobConfig, ModelsConfig

LOOPS = {"loop": "plain_loop", "loop-old": "plain_loop_old", "stock": "plain_loop_stock"}

# ------------------------------------------------------------------------------------------ videos

def make_video_set(src: Path, dest: Path, n_videos: int) -> list[Path]:
    """``n_videos`` distinct files (hard links, else copies) cycling over the source videos, in
    label folders, so the pipeline sees distinct video ids."""
    exts = (".mp4", ".webm", ".mkv", ".avi", ".mov")
    sources = sorted(p for p in src.rglob("*") if p.suffix.lower() in exts)
    if not sources:
        raise FileNotFoundError(f"--videos {src}: no video files")
    out = []
    for i in range(n_videos):
        s = sources[i % len(sources)]
        # never a hidden dir (sources skip those)
        label = s.parent.name if s.parent != src else "unlabelled"
        d = dest / label / f"{s.stem}_{i:05d}{s.suffix}"
        d.parent.mkdir(parents=True, exist_ok=True)
        if not d.exists():
            try:
                os.link(s, d)
            except OSError:
                shutil.copyfile(s, d)
        out.append(d)
    return out


def make_variants(src: Path, dest: Path) -> None:
    """Optional longer/720p variants of the samples (ffmpeg): 10 s loops at 720p and at 360p."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        print("[bench] ffmpeg not found: no variants", flush=True)
        return
    for p in sorted(src.rglob("*.mp4")):
        for h in (720, 360):
            out = dest / "variants" / f"{p.stem}_{h}p.mp4"
            out.parent.mkdir(parents=True, exist_ok=True)
            if not out.exists():
                subprocess.run([ffmpeg, "-v", "error", "-y", "-stream_loop", "4", "-i", str(p),
                                "-t", "10", "-vf", f"scale=-2:{h}", "-c:v", "libx264",
                                "-preset", "veryfast", "-an", str(out)], check=True)


def _decode_task(args) -> int:
    path, cfg_dict = args
    # one decoder per core, as Ray runs them (OMP_NUM_THREADS=1 per 1-CPU task)
    torch.set_num_threads(1)
    from pipeline.decode import decode_clips
    return len(decode_clips(path, DecodeConfig.model_validate(cfg_dict)))


# ------------------------------------------------------------------------------------------ phases

def phase_decode(videos: list[Path], dcfg: DecodeConfig, workers: int) -> dict:
    """(2) decode-only ceiling: every clip of every video decoded on ``workers`` processes."""
    import multiprocessing as mp
    tasks = [(str(v), dcfg.model_dump()) for v in videos]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(_decode_task, tasks[:workers]))  # warm up: imports, decord load
        t0 = time.perf_counter()
        clips = sum(pool.map(_decode_task, tasks))
        dt = time.perf_counter() - t0
    return {"clips": clips, "seconds": round(dt, 2), "clips_per_s": round(clips / dt, 2),
            "workers": workers}


def phase_models(fx, frames: torch.Tensor, batches: int, batch_size: int, warmup: int = 3) -> dict:
    """(1) model-only ceiling: decoded clips already on the device; outputs cast to fp16, kept
    there."""
    dev = fx.device
    x = frames.to(dev)
    reps = math.ceil(batch_size / x.shape[0])
    x = x.repeat(reps, 1, 1, 1, 1)[:batch_size].contiguous()
    t0 = time.perf_counter()
    for _ in range(warmup):  # the first call compiles (models.compile)
        {k: v.to(torch.float16) for k, v in fx(x).items()}
    sync(dev)
    warmup_s = time.perf_counter() - t0
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        for _ in range(batches):
            {k: v.to(torch.float16) for k, v in fx(x).items()}
        sync(dev)
        dt = time.perf_counter() - t0
    clips = batches * batch_size
    res = {"clips": clips, "seconds": round(dt, 2), "clips_per_s": round(clips / dt, 2),
           "gpu": gpu.summary(), "compiled": fx.compiled,
           "warmup_s_incl_compile": round(warmup_s, 1)}
    # where the time goes: each model alone on its derived input (and the input derivation)
    from pipeline.preprocess import derive_inputs
    per = {}
    n = max(2, batches // 4)
    t0 = time.perf_counter()
    for _ in range(n):
        inputs = derive_inputs(x, dtype=fx.dtype)
    sync(dev)
    per["derive_inputs"] = round(n * batch_size / (time.perf_counter() - t0), 2)
    for name in inputs:
        fx.run(name, inputs[name])
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            fx.run(name, inputs[name])
        sync(dev)
        per[name] = round(n * batch_size / (time.perf_counter() - t0), 2)
    res["per_model_clips_per_s"] = per
    return res


def phase_actor(models: ModelsConfig, frames: torch.Tensor, batches: int, batch_size: int,
                concurrency: int) -> dict:
    """(1b) the model actor's host path without Ray: ``ModelActor`` (pinned staging, H2D, four
    models, D2H, Arrow table) on numpy batches, ``concurrency`` calls at once as Ray runs them.
    Against (1) it gives the actor's own overhead; against (3) what Ray's transport and the rest
    of the pipeline add. ``CallTimes`` splits each call into features (host copies + GPU) and
    table."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.model_actor import ModelActor
    clips = frames.numpy()
    clips = np.concatenate([clips] * math.ceil(batch_size / len(clips)))[:batch_size]
    clips = np.ascontiguousarray(clips)
    batch = {"video_id": np.array([f"v{i}" for i in range(batch_size)]),
             "clip_index": np.zeros(batch_size, np.int64),
             "label_index": np.zeros(batch_size, np.int64),
             "split": np.array(["train"] * batch_size), "frames": clips}
    t0 = time.perf_counter()
    actor = ModelActor(models=models.model_dump(), out_dtype="float16", warmup_shape=clips.shape)
    init_s = time.perf_counter() - t0
    times = CallTimes(concurrency=concurrency, stages=("features", "table"))

    def call(b: dict) -> int:
        start = time.perf_counter()
        feats = actor.features(b["frames"])
        t_table = time.perf_counter()
        rows = actor.table(b, feats).num_rows
        times.add(rows, start, features=t_table - start, table=time.perf_counter() - t_table)
        return rows

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(call, [batch] * concurrency))
        times = CallTimes(concurrency=concurrency, stages=("features", "table"))
        with GpuSampler() as gpu:
            t0 = time.perf_counter()
            rows = sum(pool.map(call, [batch] * batches))
            dt = time.perf_counter() - t0
    return {"clips": rows, "seconds": round(dt, 2), "clips_per_s": round(rows / dt, 2),
            "init_s": round(init_s, 1), "concurrency": concurrency, "calls": times.summary(),
            "gpu": gpu.summary()}


def phase_loop(key: str, forward, videos: list[Path], dcfg: DecodeConfig, args,
               device: torch.device) -> dict:
    """(4), (4o) or (4s): ``plain_loop.run_loop`` with that path's models and loader."""
    from bench.plain_loop import run_loop
    if key == "plain_loop_old" and args.loop_old_clips:
        videos = videos[: math.ceil(args.loop_old_clips / dcfg.clips_per_video)]
    old = key == "plain_loop_old"
    return run_loop(forward, videos, dcfg, batch_size=args.batch_size,
                    workers=max(1, args.cpus - 1), device=device, per_clip=old,
                    blocking_copies=old)


def stock_agreement(stock, fx, frames: torch.Tensor) -> dict:
    """Token cosine (mean, min) of the stock models against the project's on one batch: the two
    loops compute the same features."""
    a, b = stock(frames), fx(frames)
    return {n: cosine(a[n], b[n], digits=5) for n in a}


class ShardDiscarder(Poller):
    """With ``enabled``, deletes each shard file once its commit record exists (polling every
    ``period`` s), so a run longer than the disk holds fits (11.4 MB per clip: the single-H200
    host's 64 GB disk takes ~3000 clips). The shards are still written in full; the page cache may
    drop them before they reach the disk. Commit records, failures and statistics stay, so the
    run's summary, invariant and committed-clip rates hold."""

    def __init__(self, store_dir: Path, enabled: bool, period: float = 0.5):
        super().__init__(period, enabled)
        self.store_dir, self.deleted = store_dir, 0

    def tick(self) -> None:
        for commit in (self.store_dir / "commits").glob("*.json"):
            shard = self.store_dir / "shards" / f"{commit.stem}.parquet"
            if shard.exists():
                shard.unlink()
                self.deleted += 1

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if self.enabled:
            self.tick()  # the shards committed since the last poll
            print(f"[bench] --discard-shards: {self.deleted} committed shards deleted", flush=True)


def phase_pipeline(video_dir: Path, workdir: Path, args, models: ModelsConfig,
                   dcfg: DecodeConfig) -> dict:
    """(3) run_extract on a local Ray cluster (fresh store), as the CLI would run it; rates of
    committed clips from the store's commit records (``bench.timing.commit_times``), timed from
    the call of run_extract."""
    import ray

    from pipeline.extract import run_extract
    from pipeline.storage import Storage
    store_dir = workdir / f"store-{int(time.time())}"
    cuda = torch.cuda.is_available()
    extract = {"batch_size": args.batch_size, "shard_clips": args.shard_clips,
               "writers": args.writers, "gpus_per_actor": 1.0 if cuda else 0.0,
               "cpus_per_actor": 1.0, "model_actors": args.num_gpus if cuda else 1,
               "decoders": args.decoders, "out_dtype": "float16", "log_stats": True}
    if args.actor_concurrency is not None:
        extract["actor_concurrency"] = args.actor_concurrency
    if args.compile_cache is not None:
        extract["compile_cache"] = args.compile_cache
    job = JobConfig.model_validate({
        "name": "bench-extract", "storage": {"url": str(store_dir)},
        "sources": {"uri": str(video_dir), "val_fraction": 0.1},
        "decode": dcfg.model_dump(), "models": models.model_dump(), "extract": extract})
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray workers of a local cluster inherit the driver's environment: make the project importable
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    object_store = args.object_store_gb * 2**30 if args.object_store_gb else None
    ray.init(num_cpus=args.cpus, num_gpus=args.num_gpus if cuda else 0, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=True, object_store_memory=object_store)
    features = store_dir / "features" / job.store
    try:
        with GpuSampler() as gpu, ShardDiscarder(features, args.discard_shards):
            t0 = time.time()
            summary = run_extract(job, Storage(str(store_dir)))
    finally:
        ray.shutdown()
    r = rates(commit_times(features, t0))
    if not args.keep_store:
        shutil.rmtree(store_dir, ignore_errors=True)
    resources = {k.removeprefix("resources_"): v for k, v in summary.items()
                 if k.startswith("resources_")}
    return {"clips": summary["clips"], "seconds": summary["elapsed_s"],
            "clips_per_s": summary["clips_per_s"], "steady_clips_per_s": r["steady"],
            "window_clips_per_s": r["window"], "first_shard_s": r["first_s"],
            "bytes": summary["bytes"], "failed": summary["failed"],
            "invariant_ok": summary["invariant_ok"], "resources": resources,
            "gpu": gpu.summary()}


# -------------------------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--videos", type=Path, help="directory of real videos (default: the bundled samples)")
    add("--variants", action="store_true", help="add ffmpeg 10 s 720p/360p loops of the samples")
    add("--clips", type=int, default=1024, help="clips per phase (pipeline/decode/loops)")
    add("--clips-per-video", type=int, default=4)
    add("--batch-size", type=int, default=32)
    add("--model-batches", type=int, default=None,
        help="timed batches in phase 1 (default clips/batch)")
    add("--compile", default=None, help="comma-separated model names to torch.compile "
        "(default: the config's default; 'none': all eager)")
    add("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    add("--fp8", default="", help="comma-separated model names with float8 linears (models.fp8)")
    add("--rewrites", default=None, help="comma-separated models.rewrites (default: the config's; "
        "'none': the upstream modules)")
    add("--attention", default="auto", choices=["auto", "cudnn", "flash", "efficient", "math"])
    add("--tiny", action="store_true", help="tiny models on CPU (dry run)")
    add("--num-gpus", type=int, default=1, help="GPUs for the pipeline (one model actor each)")
    add("--cpus", type=int, default=os.cpu_count(), help="CPUs for decode pool / loader / Ray")
    add("--shard-clips", type=int, default=64)
    add("--writers", type=int, default=None, help="default: 2 per model actor")
    add("--actor-concurrency", type=int, default=None, help="default: the config's")
    add("--decoders", type=int, default=None,
        help="decode tasks at once (default: the CPUs left after the actors)")
    add("--object-store-gb", type=float, default=None)
    add("--phases", default="decode,models,actor,loop,stock,pipeline",
        help="any of decode, models, actor, loop, loop-old, stock, pipeline")
    add("--loop-old-clips", type=int, default=None,
        help="clips of the loop-old phase (default: --clips)")
    add("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tokconv-bench-extract")
    add("--keep-store", action="store_true")
    add("--discard-shards", action="store_true", help="delete each shard once committed (runs "
        "longer than the disk holds; the writes still happen)")
    add("--compile-cache", default=None, help="extract.compile_cache of the pipeline phase "
        "(default: under its fresh store, so empty every run); a fixed directory measures a fresh "
        "worker's warm start")
    add("--out", type=Path, default=None, help="JSON results (default <workdir>/results.json)")
    return p.parse_args(argv)


def listed(text: str) -> list[str]:
    """A comma-separated flag -> its names ('none' alone: an empty list)."""
    return [c for c in text.split(",") if c and c != "none"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    phases = [s.strip() for s in args.phases.split(",") if s.strip()]
    cuda = torch.cuda.is_available() and not args.tiny
    if args.tiny:
        args.batch_size = min(args.batch_size, 2)
        args.shard_clips = min(args.shard_clips, 4)
        args.clips_per_video = min(args.clips_per_video, 2)
        args.writers = 1
        args.compile = "none"
    models = ModelsConfig(
        weights="tiny" if args.tiny else "random", device="cuda" if cuda else "cpu",
        dtype=args.dtype if cuda else "float32", fp8=listed(args.fp8), attention=args.attention,
        **({} if args.compile is None else {"compile": listed(args.compile)}),
        **({} if args.rewrites is None else {"rewrites": listed(args.rewrites)}))
    dcfg = DecodeConfig(window=32, stride=2, clips_per_video=args.clips_per_video,
                        short_side=256, short_video="loop")

    src = args.videos
    if src is None:
        from pipeline.samples import sample_dir
        src = sample_dir()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.variants:
        make_variants(src, args.workdir / "sources")
        for f in (args.workdir / "sources" / "variants").glob("*.mp4"):
            (args.workdir / "src-all" / "variants").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, args.workdir / "src-all" / "variants" / f.name)
        shutil.copytree(src, args.workdir / "src-all", dirs_exist_ok=True)
        src = args.workdir / "src-all"
    n_videos = math.ceil(args.clips / args.clips_per_video)
    video_dir = args.workdir / f"videos-{n_videos}"
    videos = make_video_set(src, video_dir, n_videos)
    print(f"[bench] {n_videos} videos x {args.clips_per_video} clips from {src}; models "
          f"{models.weights} on {models.device} ({models.dtype}), batch {args.batch_size}, "
          f"compile {models.compile or 'none'}, fp8 {models.fp8 or 'none'}", flush=True)

    host = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "gpus_visible": torch.cuda.device_count() if cuda else 0}
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results: dict = {"config": {**config, "models": models.model_dump(),
                                "decode": dcfg.model_dump()}, "host": host, "phases": {}}

    def log(name, res):
        results["phases"][name] = res
        print(f"[bench] {name}: {json.dumps(res)}", flush=True)

    if "decode" in phases:  # first: no CUDA context yet in this process
        log("decode_only", phase_decode(videos, dcfg, args.cpus))
    run_models(phases, args, models, dcfg, videos, log)
    if "pipeline" in phases:
        log("pipeline", phase_pipeline(video_dir, args.workdir, args, models, dcfg))

    results.update(ratios(results["phases"], args.num_gpus if cuda else 1))
    out = args.out or args.workdir / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\n[bench] results: {out}\n")
    print(markdown(results))
    return results


def run_models(phases: list[str], args, models: ModelsConfig, dcfg: DecodeConfig,
               videos: list[Path], log) -> None:
    """The phases in this process that need the models: (1), (1b), the loops."""
    uses_fx = {"models", "actor", "loop", "loop-old"} & set(phases)
    if not uses_fx and "stock" not in phases:
        return
    from pipeline.backbones import FeatureExtractor, resolve_device
    from pipeline.decode import decode_clips
    device = resolve_device(models.device)
    fx = None
    if uses_fx:
        t0 = time.perf_counter()
        fx = FeatureExtractor(models)
        print(f"[bench] models built in {time.perf_counter() - t0:.1f}s", flush=True)
    # one batch of real decoded clips serves (1), (1b) and the stock check
    clips = [c for v in videos[:8] for _, c in decode_clips(str(v), dcfg)]
    frames = torch.from_numpy(np.stack(clips[: args.batch_size]))
    batches = args.model_batches or max(2, args.clips // args.batch_size)
    if "models" in phases:
        log("model_only", phase_models(fx, frames, batches, args.batch_size))
    if "actor" in phases:
        concurrency = args.actor_concurrency or ExtractConfig().actor_concurrency
        log("actor_host_path", phase_actor(models, frames, batches, args.batch_size, concurrency))
    for phase in ("loop", "loop-old"):
        if phase in phases:
            log(LOOPS[phase], phase_loop(LOOPS[phase], fx, videos, dcfg, args, device))
    if "stock" in phases:
        from bench.plain_loop import StockModels
        t0 = time.perf_counter()
        stock = StockModels(models, device)
        built = round(time.perf_counter() - t0, 1)
        res = phase_loop("plain_loop_stock", stock, videos, dcfg, args, device)
        res["build_s"] = built
        if fx is not None:
            res["cosine_to_project_models"] = stock_agreement(stock, fx, frames)
        log("plain_loop_stock", res)
        del stock
    del fx
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ratios(ph: dict, gpus: int) -> dict:
    """(3) over min(1, 2), (3) over each plain loop, (4) over (4o) and (4s), by rate kind."""
    out = {}
    ceilings = [ph["model_only"]["clips_per_s"] * gpus] if "model_only" in ph else []
    ceilings += [ph["decode_only"]["clips_per_s"]] if "decode_only" in ph else []
    kinds = {"": "clips_per_s", "steady_": "steady_clips_per_s", "window_": "window_clips_per_s"}

    def ratio(name, a, b):
        for prefix, key in kinds.items():
            if a.get(key) and b.get(key):
                out[f"ratio_{prefix}{name}"] = round(a[key] / b[key], 3)

    pipe = ph.get("pipeline")
    if pipe and ceilings:
        ratio("pipeline_over_ceiling", pipe, dict.fromkeys(kinds.values(), min(ceilings)))
    for key in LOOPS.values():
        if pipe and key in ph:
            ratio(f"pipeline_over_{key}", pipe, ph[key])
    for key in ("plain_loop_old", "plain_loop_stock"):
        if "plain_loop" in ph and key in ph:
            ratio(f"plain_loop_over_{key}", ph["plain_loop"], ph[key])
    return out


def markdown(results: dict) -> str:
    rows = [("(1) model-only ceiling", "model_only"),
            ("(1b) model actor host path, no Ray", "actor_host_path"),
            ("(2) decode-only ceiling", "decode_only"), ("(3) pipeline end to end", "pipeline"),
            ("(4) plain DataLoader loop, the project's models", "plain_loop"),
            ("(4s) the same loop, stock transformers models", "plain_loop_stock"),
            ("(4o) the loop before 2026-12-02 (per-clip decode, blocking copies)",
             "plain_loop_old")]
    cfg, m = results["config"], results["config"]["models"]
    title = (f"Extraction benchmark: {results['host']['gpu'] or 'CPU'}, models {m['weights']} "
             f"({m['dtype']}), batch {cfg['batch_size']}, compile {m['compile'] or 'none'}, "
             f"fp8 {m.get('fp8') or 'none'}, rewrites {m.get('rewrites') or 'none'}, "
             f"{cfg['clips_per_video']} clips/video, {cfg['cpus']} CPUs, "
             f"{cfg['num_gpus']} GPU(s)")
    header = ("| path | clips | s | clips/s | after the first batch/shard | window | "
              "first batch/shard s | GPU util % |")
    lines = [title, "", header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, key in rows:
        r = results["phases"].get(key)
        if r is None:
            continue
        gpu = (r.get("gpu") or {}).get("mean_pct")
        first = r.get("first_batch_s", r.get("first_shard_s"))
        cells = [r["clips"], r["seconds"], r["clips_per_s"], r.get("steady_clips_per_s"),
                 r.get("window_clips_per_s"), first, gpu]
        lines.append(f"| {label} | " + " | ".join("" if c is None else str(c) for c in cells)
                     + " |")
    if "model_only" in results["phases"]:
        per = results["phases"]["model_only"].get("per_model_clips_per_s", {})
        lines += ["", "per model alone (clips/s): "
                  + ", ".join(f"{k} {v}" for k, v in per.items())]
    lines += [f"{k.replace('_', ' ')}: **{v}**" for k, v in results.items()
              if k.startswith("ratio_")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
