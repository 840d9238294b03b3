"""Extraction benchmark (issue 4): four ceilings/paths measured in ONE run on the same videos.

1. model-only: the four backbones (``FeatureExtractor``: derive inputs + 4 models + fp16 cast) on
   pre-decoded clips already on the GPU, same batch size and dtype;
2. decode-only: ``pipeline.decode.decode_clips`` on all CPU cores (process pool, results dropped);
3. pipeline: ``run_extract`` end to end on a local Ray cluster, local feature store under --workdir;
4. plain loop: a torch DataLoader with decord workers, then the four models in sequence, outputs
   copied back to the host (no writes).

Prints clips/s for each, GPU utilisation (nvidia-smi sampled every 0.5 s), the ratio
(3) / min(1, 2), and a markdown table last; writes everything as JSON to --out.

H200 (full-size architectures, random init; ~5-8 min; .bench-videos = a copy of the sample tree):
    python bench/extract.py --videos .bench-videos --clips 2048 --clips-per-video 4 --batch-size 32 \
        --out $OUT/extract-h200.json
    ... --compile none --autocast --phases models    (the old eager + autocast settings)
    ... --compile-scope model --phases models,pipeline   (whole-model compile, the earlier default)
    ... --write-in-actor --actor-concurrency 4 --phases models,pipeline   (shards written in the model actors)
    ... --num-gpus 2 --cpus 32 --clips 4096 --phases decode,models,pipeline   (2-GPU scaling)
    ... --clips 16384 --phases pipeline --discard-shards   (a run longer than the disk holds: sustained rate)
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

from bench.common import Poller, sync
from pipeline.config import DecodeConfig, ExtractConfig, JobConfig, ModelsConfig

# ------------------------------------------------------------------------------------------ helpers

class GpuSampler(Poller):
    """Samples ``nvidia-smi`` utilisation (%) of every GPU every ``period`` s in a thread."""

    def __init__(self, period: float = 0.5):
        super().__init__(period, enabled=shutil.which("nvidia-smi") is not None and torch.cuda.is_available())
        self.samples = []

    def tick(self):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5, check=False).stdout
            self.samples.append([float(v) for v in out.split()])
        except (OSError, subprocess.SubprocessError, ValueError):
            self.missed = getattr(self, "missed", 0) + 1  # a missed sample is fine

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        a = np.asarray(self.samples)  # (samples, gpus)
        return {"mean_pct": round(float(a.mean()), 1), "per_gpu_mean_pct": a.mean(0).round(1).tolist(),
                "samples": len(a)}


def make_video_set(src: Path, dest: Path, n_videos: int) -> list[Path]:
    """``n_videos`` distinct files (hard links, else copies) cycling over the source videos, in label
    folders, so the pipeline sees distinct video ids."""
    sources = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".mp4", ".webm", ".mkv", ".avi", ".mov"))
    if not sources:
        raise FileNotFoundError(f"--videos {src}: no video files")
    out = []
    for i in range(n_videos):
        s = sources[i % len(sources)]
        label = s.parent.name if s.parent != src else "unlabelled"  # never a hidden dir (sources skip those)
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
                subprocess.run([ffmpeg, "-v", "error", "-y", "-stream_loop", "4", "-i", str(p), "-t", "10",
                                "-vf", f"scale=-2:{h}", "-c:v", "libx264", "-preset", "veryfast", "-an", str(out)],
                               check=True)


def _decode_task(args) -> int:
    path, cfg_dict = args
    torch.set_num_threads(1)  # one decoder per core, as Ray runs them (OMP_NUM_THREADS=1 per 1-CPU task)
    from pipeline.decode import decode_clips
    return len(decode_clips(path, DecodeConfig.model_validate(cfg_dict)))


# ------------------------------------------------------------------------------------------- phases

def phase_decode(videos: list[Path], dcfg: DecodeConfig, workers: int) -> dict:
    """(2) decode-only ceiling: every clip of every video decoded on ``workers`` processes."""
    import multiprocessing as mp
    tasks = [(str(v), dcfg.model_dump()) for v in videos]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(_decode_task, tasks[:workers]))  # warm up: imports, decord load
        t0 = time.perf_counter()
        clips = sum(pool.map(_decode_task, tasks))
        dt = time.perf_counter() - t0
    return {"clips": clips, "seconds": round(dt, 2), "clips_per_s": round(clips / dt, 2), "workers": workers}


def phase_models(fx, frames: torch.Tensor, batches: int, batch_size: int, warmup: int = 3) -> dict:
    """(1) model-only ceiling: decoded clips already on the device; outputs cast to fp16, kept there."""
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
    res = {"clips": batches * batch_size, "seconds": round(dt, 2), "clips_per_s": round(batches * batch_size / dt, 2),
           "gpu": gpu.summary(), "compiled": fx.compiled, "warmup_s_incl_compile": round(warmup_s, 1)}
    # where the time goes: each model alone on its derived input (and the input derivation)
    from pipeline.backbones import derive_inputs
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


def phase_actor(models: ModelsConfig, frames: torch.Tensor, batches: int, batch_size: int, concurrency: int) -> dict:
    """The model actor's host path without Ray: ``ModelActor.__call__`` (pinned staging, H2D, four models,
    D2H, Arrow table) on numpy batches, ``concurrency`` calls at once as Ray runs them. Against (1) it
    gives the actor's own overhead; against (3) what Ray's transport and the rest of the pipeline add."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.extract import ModelActor
    clips = frames.numpy()
    clips = np.ascontiguousarray(np.concatenate([clips] * math.ceil(batch_size / len(clips)))[:batch_size])
    batch = {"video_id": np.array([f"v{i}" for i in range(batch_size)]), "clip_index": np.zeros(batch_size, np.int64),
             "label_index": np.zeros(batch_size, np.int64), "split": np.array(["train"] * batch_size),
             "frames": clips}
    t0 = time.perf_counter()
    actor = ModelActor(models=models.model_dump(), out_dtype="float16", warmup_shape=clips.shape)
    init_s = time.perf_counter() - t0
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(actor, [batch] * concurrency))
        with GpuSampler() as gpu:
            t0 = time.perf_counter()
            rows = sum(t.num_rows for t in pool.map(actor, [batch] * batches))
            dt = time.perf_counter() - t0
    del actor
    return {"clips": rows, "seconds": round(dt, 2), "clips_per_s": round(rows / dt, 2), "init_s": round(init_s, 1),
            "concurrency": concurrency, "gpu": gpu.summary()}


class _ClipDataset(torch.utils.data.Dataset):
    def __init__(self, items, dcfg):
        self.items, self.dcfg = items, dcfg

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from pipeline.decode import decode_clips
        path, ci = self.items[i]
        return torch.from_numpy(decode_clips(path, self.dcfg, clip_indices=[ci])[0][1])


def phase_plain_loop(fx, videos: list[Path], dcfg: DecodeConfig, batch_size: int, workers: int) -> dict:
    """(4) what a user writes: DataLoader(decord workers) -> four models in sequence -> fp16 to host."""
    items = [(str(v), c) for v in videos for c in range(dcfg.clips_per_video)]
    cuda = fx.device.type == "cuda"
    loader = torch.utils.data.DataLoader(_ClipDataset(items, dcfg), batch_size=batch_size, num_workers=workers,
                                         pin_memory=cuda, prefetch_factor=4 if workers else None)
    clips, t_first, n_first = 0, None, 0
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        for frames in loader:
            out = fx(frames.to(fx.device, non_blocking=True))
            _ = {k: v.to(torch.float16).cpu() for k, v in out.items()}
            clips += frames.shape[0]
            if t_first is None:
                t_first, n_first = time.perf_counter(), clips
        dt = time.perf_counter() - t0
    steady = (clips - n_first) / (time.perf_counter() - t_first) if clips > n_first else None
    return {"clips": clips, "seconds": round(dt, 2), "clips_per_s": round(clips / dt, 2),
            "steady_clips_per_s": round(steady, 2) if steady else None, "first_batch_s": round(t_first - t0, 2),
            "workers": workers, "gpu": gpu.summary()}


class ShardDiscarder(Poller):
    """With ``enabled``, deletes each shard file once its commit record exists (polling every ``period`` s),
    so a run longer than the disk holds fits (11.4 MB per clip: the single-H200 host's 64 GB disk takes
    ~3000 clips). The shards are still written in full; the page cache may drop them before they reach
    the disk. Commit records, failures and statistics stay, so the run's summary and invariant hold."""

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


def phase_pipeline(video_dir: Path, workdir: Path, args, models: ModelsConfig, dcfg: DecodeConfig) -> dict:
    """(3) run_extract on a local Ray cluster (fresh store), as the CLI would run it."""
    import ray

    from pipeline.extract import run_extract
    from pipeline.storage import Storage
    store_dir = workdir / f"store-{int(time.time())}"
    job = JobConfig.model_validate({
        "name": "bench-extract", "storage": {"url": str(store_dir)},
        "sources": {"uri": str(video_dir), "val_fraction": 0.1},
        "decode": dcfg.model_dump(), "models": models.model_dump(),
        "extract": {"batch_size": args.batch_size, "shard_clips": args.shard_clips, "writers": args.writers,
                    "gpus_per_actor": 1.0 if torch.cuda.is_available() else 0.0, "cpus_per_actor": 1.0,
                    "model_actors": args.num_gpus if torch.cuda.is_available() else 1,
                    **({} if args.actor_concurrency is None else {"actor_concurrency": args.actor_concurrency}),
                    "write_in_actor": args.write_in_actor, "decoders": args.decoders,
                    "out_dtype": "float16", "log_stats": True,
                    **({} if args.compile_cache is None else {"compile_cache": args.compile_cache})},
    })
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray workers of a local cluster inherit the driver's environment: make the project importable
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(num_cpus=args.cpus, num_gpus=args.num_gpus if torch.cuda.is_available() else 0,
             include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True,
             object_store_memory=args.object_store_gb * 2**30 if args.object_store_gb else None)
    try:
        with GpuSampler() as gpu, ShardDiscarder(store_dir / "features" / job.extract.store, args.discard_shards):
            summary = run_extract(job, Storage(str(store_dir)))
    finally:
        ray.shutdown()
    if not args.keep_store:
        shutil.rmtree(store_dir, ignore_errors=True)
    return {"clips": summary["clips"], "seconds": summary["elapsed_s"], "clips_per_s": summary["clips_per_s"],
            "steady_clips_per_s": summary["steady_clips_per_s"], "window_clips_per_s": summary["window_clips_per_s"],
            "first_shard_s": summary["first_shard_s"], "bytes": summary["bytes"], "failed": summary["failed"],
            "invariant_ok": summary["invariant_ok"],
            "resources": {k.removeprefix("resources_"): v for k, v in summary.items() if k.startswith("resources_")},
            "gpu": gpu.summary()}


# --------------------------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=Path, help="directory of real videos (default: the bundled samples)")
    p.add_argument("--variants", action="store_true", help="add ffmpeg 10 s 720p/360p loops of the samples")
    p.add_argument("--clips", type=int, default=1024, help="clips per phase (pipeline/decode/loop)")
    p.add_argument("--clips-per-video", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model-batches", type=int, default=None, help="timed batches in phase 1 (default clips/batch)")
    p.add_argument("--compile", default=None, help="comma-separated model names to torch.compile "
                   "(default: the config's default; 'none': all eager)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--compile-scope", default=None, choices=["model", "layers"],
                   help="layers: regional compilation (each repeated block); default: the config's")
    p.add_argument("--fp8", default="", help="comma-separated model names with float8 linears (models.fp8)")
    p.add_argument("--autocast", action="store_true", help="torch.autocast over dtype weights (old default)")
    p.add_argument("--rewrites", default=None, help="comma-separated models.rewrites (default: the config's; "
                   "'none': the upstream modules)")
    p.add_argument("--attention", default="auto", choices=["auto", "cudnn", "flash", "efficient", "math"])
    p.add_argument("--tiny", action="store_true", help="tiny models on CPU (dry run)")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs for the pipeline (one model actor each)")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs for decode pool / loader / Ray")
    p.add_argument("--shard-clips", type=int, default=64)
    p.add_argument("--writers", type=int, default=None, help="default: 2 per model actor")
    p.add_argument("--actor-concurrency", type=int, default=None, help="default: the config's")
    p.add_argument("--decoders", type=int, default=None,
                   help="decode tasks at once (default: the CPUs left after the actors)")
    p.add_argument("--write-in-actor", action="store_true", help="extract.write_in_actor: shards written by the "
                   "model actors (one per batch), no writer actors")
    p.add_argument("--object-store-gb", type=float, default=None)
    p.add_argument("--phases", default="decode,models,actor,loop,pipeline")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tokconv-bench-extract")
    p.add_argument("--keep-store", action="store_true")
    p.add_argument("--discard-shards", action="store_true", help="delete each shard once committed (runs "
                   "longer than the disk holds; the writes still happen)")
    p.add_argument("--compile-cache", default=None, help="extract.compile_cache of the pipeline phase (default: "
                   "under its fresh store, so empty every run); a fixed directory measures a fresh worker's warm start")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default <workdir>/results.json)")
    args = p.parse_args(argv)
    phases = [s.strip() for s in args.phases.split(",") if s.strip()]
    cuda = torch.cuda.is_available() and not args.tiny
    if args.tiny:
        args.batch_size = min(args.batch_size, 2)
        args.shard_clips = min(args.shard_clips, 4)
        args.clips_per_video = min(args.clips_per_video, 2)
        args.writers = 1
        args.compile = "none"
    models = ModelsConfig(weights="tiny" if args.tiny else "random", device="cuda" if cuda else "cpu",
                          dtype=args.dtype if cuda else "float32",
                          **({} if args.compile is None else
                             {"compile": [c for c in args.compile.split(",") if c and c != "none"]}),
                          **({} if args.compile_scope is None else {"compile_scope": args.compile_scope}),
                          fp8=[c for c in args.fp8.split(",") if c],
                          **({} if args.rewrites is None else
                             {"rewrites": [r for r in args.rewrites.split(",") if r and r != "none"]}),
                          autocast=args.autocast,
                          attention=args.attention)
    dcfg = DecodeConfig(window=32, stride=2, clips_per_video=args.clips_per_video, short_side=256, short_video="loop")

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
    print(f"[bench] {n_videos} videos x {args.clips_per_video} clips from {src}; models {models.weights} on "
          f"{models.device} ({models.dtype}), batch {args.batch_size}, compile {models.compile or 'none'}, "
          f"fp8 {models.fp8 or 'none'}", flush=True)

    results: dict = {"config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                "models": models.model_dump(), "decode": dcfg.model_dump()},
                     "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name(0) if cuda else None,
                              "gpus_visible": torch.cuda.device_count() if cuda else 0},
                     "phases": {}}

    def log(name, res):
        results["phases"][name] = res
        print(f"[bench] {name}: {json.dumps(res)}", flush=True)

    if "decode" in phases:  # first: no CUDA context yet in this process
        log("decode_only", phase_decode(videos, dcfg, args.cpus))
    if "models" in phases or "loop" in phases or "actor" in phases:
        from pipeline.backbones import FeatureExtractor
        from pipeline.decode import decode_clips
        t0 = time.perf_counter()
        fx = FeatureExtractor(models)
        print(f"[bench] models built in {time.perf_counter() - t0:.1f}s", flush=True)
        if "models" in phases or "actor" in phases:  # one batch of real decoded clips serves both
            frames = torch.from_numpy(np.stack([c for v in videos[:8] for _, c in decode_clips(str(v), dcfg)]
                                               [: args.batch_size]))
        batches = args.model_batches or max(2, args.clips // args.batch_size)
        if "models" in phases:
            log("model_only", phase_models(fx, frames, batches, args.batch_size))
        if "actor" in phases:
            concurrency = args.actor_concurrency or ExtractConfig().actor_concurrency
            log("actor_host_path", phase_actor(models, frames, batches, args.batch_size, concurrency))
        if "loop" in phases:
            log("plain_loop", phase_plain_loop(fx, videos, dcfg, args.batch_size, max(1, args.cpus - 1)))
        del fx
        if cuda:
            torch.cuda.empty_cache()
    if "pipeline" in phases:
        log("pipeline", phase_pipeline(video_dir, args.workdir, args, models, dcfg))

    ph = results["phases"]
    ceilings = []
    if "model_only" in ph:
        ceilings.append(ph["model_only"]["clips_per_s"] * (args.num_gpus if cuda else 1))
    if "decode_only" in ph:
        ceilings.append(ph["decode_only"]["clips_per_s"])
    if "pipeline" in ph and ceilings:
        pipe = ph["pipeline"]
        results["ratio_pipeline_over_ceiling"] = round(pipe["clips_per_s"] / min(ceilings), 3)
        if pipe.get("steady_clips_per_s"):
            results["ratio_steady_pipeline_over_ceiling"] = round(pipe["steady_clips_per_s"] / min(ceilings), 3)
        if pipe.get("window_clips_per_s"):
            results["ratio_window_pipeline_over_ceiling"] = round(pipe["window_clips_per_s"] / min(ceilings), 3)
    if "pipeline" in ph and "plain_loop" in ph:
        results["ratio_pipeline_over_plain_loop"] = round(ph["pipeline"]["clips_per_s"] / ph["plain_loop"]["clips_per_s"], 3)

    out = args.out or args.workdir / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\n[bench] results: {out}\n")
    print(markdown(results))
    return results


def markdown(results: dict) -> str:
    rows = [("(1) model-only ceiling", "model_only"), ("(1b) model actor host path, no Ray", "actor_host_path"),
            ("(2) decode-only ceiling", "decode_only"),
            ("(3) pipeline end to end", "pipeline"), ("(4) plain DataLoader loop", "plain_loop")]
    cfg = results["config"]
    title = (f"Extraction benchmark: {results['host']['gpu'] or 'CPU'}, models {cfg['models']['weights']} "
             f"({cfg['models']['dtype']}), batch {cfg['batch_size']}, compile {cfg['models']['compile'] or 'none'}, "
             f"fp8 {cfg['models'].get('fp8') or 'none'}, rewrites {cfg['models'].get('rewrites') or 'none'}, "
             f"{cfg['clips_per_video']} clips/video, {cfg['cpus']} CPUs, {cfg['num_gpus']} GPU(s)")
    lines = [title, "",
             "| path | clips | s | clips/s | steady clips/s | GPU util % |", "|---|---:|---:|---:|---:|---:|"]
    for label, key in rows:
        r = results["phases"].get(key)
        if r is None:
            continue
        gpu = (r.get("gpu") or {}).get("mean_pct")
        lines.append(f"| {label} | {r['clips']} | {r['seconds']} | {r['clips_per_s']} | "
                     f"{r.get('steady_clips_per_s') or ''} | {'' if gpu is None else gpu} |")
    if "model_only" in results["phases"]:
        per = results["phases"]["model_only"].get("per_model_clips_per_s", {})
        lines += ["", "per model alone (clips/s): " + ", ".join(f"{k} {v}" for k, v in per.items())]
    for k in ("ratio_pipeline_over_ceiling", "ratio_steady_pipeline_over_ceiling", "ratio_window_pipeline_over_ceiling",
              "ratio_pipeline_over_plain_loop"):
        if k in results:
            lines.append(f"{k.replace('_', ' ')}: **{results[k]}**")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
