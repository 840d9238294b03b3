"""Training at store speed (issue 13), on one feature store, in one run:

  (a)  raw pyarrow read of the store's train shards (page cache): clips/s, GB/s
  (a') the training reader alone (pipeline.train_data.ClipReader, cache none, no compute)
  (b)  one training step (converter + head fwd+bwd, AdamW) on a batch already on the device:
       the compute ceiling
  (c)  the train stage (Ray Train, pipeline.train.run_train), streamed (train.cache=none)
  (d)  the same, cached on the device (train.cache=gpu)
  (e)  the same loop (pipeline.train_loop.run_worker) under plain torchrun, one process, cached
Ratios: (c)/(a), (d)/(b), (d)/(e); and each run's time from its start to the first step.

A stage's rate per epoch comes from its metrics log: the epoch's clips over the time from the start
of its first step (the wait for its first window included) to the end of its last (epoch-end
validation and checkpoint excluded), with the log written every step (one device sync each, so
the host cannot run ahead of the GPU); the figure is the mean over epochs >= 1 (epoch 0 of a
cached run reads the store). --make-store writes a store of
random fp16 features at the real shapes (student 2048x1024, videomae 1568x768, timesformer
3136x768, vivit 1x768; ~11 MB per clip) through FeatureStore.write_shard: no video decoding.

    python bench/train.py --make-store --clips 1024 --out bench/results/train-h200.json   # H200
    python bench/train.py --tiny --make-store --clips 48 --batch-size 4      # CPU dry run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import JobConfig
from pipeline.featurestore import FeatureStore
from pipeline.storage import Storage
from tokconv.targets import TargetSpec

FULL = {"student": TargetSpec("student", 2048, 1024, (8, 16, 16)),
        "videomae": TargetSpec("videomae", 1568, 768, (8, 14, 14)),
        "timesformer": TargetSpec("timesformer", 3136, 768, (16, 14, 14)),
        "vivit": TargetSpec("vivit", 1, 768, None)}
TINY = {"student": TargetSpec("student", 32, 16, (2, 4, 4)),
        "videomae": TargetSpec("videomae", 18, 12, (2, 3, 3)),
        "timesformer": TargetSpec("timesformer", 36, 12, (4, 3, 3)),
        "vivit": TargetSpec("vivit", 1, 12, None)}
CLASSES = [f"c{i}" for i in range(10)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_store(storage: Storage, specs: dict, clips: int, val: int, shard: int,
               device: torch.device) -> None:
    """Random fp16 features (drawn on ``device``, channel sums there too) written shard by shard."""
    store = FeatureStore(storage, "features")
    store.write_meta(specs=specs, dtype="float16", class_names=CLASSES)
    g = torch.Generator(device).manual_seed(0)
    t0, done = time.perf_counter(), 0
    for split, n_split in (("val", val), ("train", clips - val)):
        for lo in range(0, n_split, shard):
            n = min(shard, n_split - lo)
            batch = {"video_id": [f"{split}{lo + i:06d}" for i in range(n)],
                     "clip_index": np.zeros(n, np.int32),
                     "label_index": np.arange(lo, lo + n, dtype=np.int32) % len(CLASSES),
                     "split": np.array([split] * n)}
            for name, s in specs.items():
                x = torch.randn(n, s.tokens, s.dim, generator=g, device=device).half()
                d = x.double()
                batch[f"_sum:{name}"] = d.sum(1).cpu().numpy()
                batch[f"_sq:{name}"] = d.square().sum(1).cpu().numpy()
                batch[name] = x.cpu().numpy()
                del d
            store.write_shard(batch)
            done += n
    store.compute_stats()
    print(f"[store] {clips} clips ({val} val) written in {time.perf_counter() - t0:.1f} s",
          flush=True)


def raw_read(store: FeatureStore, names: list[str]) -> dict:
    """(a): pyarrow reads every train-only shard whole, twice (the second one is reported)."""
    import pyarrow.parquet as pq
    paths = [store.storage.path(r["path"]) for r in store.commits() if set(r["sums"]) == {"train"}]
    for _ in range(2):
        t0, nbytes, rows = time.perf_counter(), 0, 0
        for p in paths:
            t = pq.read_table(p, columns=names)
            nbytes, rows = nbytes + t.nbytes, rows + t.num_rows
            del t
        dt = time.perf_counter() - t0
    return {"clips_per_s": rows / dt, "GB_per_s": nbytes / dt / 1e9, "clips": rows, "seconds": dt}


def reader_alone(store, blocks, names, tc, device, direct=None) -> dict:
    """(a'): two epochs of the training reader (the second reported: the first allocates its pinned
    buffers), batches decoded on the device, no compute; ``direct=False``: the pyarrow path."""
    from pipeline.train_data import ClipReader
    r = ClipReader(store, blocks, names, rank=0, world=1, batch_size=tc.batch_size, device=device,
                   window=tc.shuffle_window, read_ahead=tc.read_ahead, direct=direct)
    rates = []
    for epoch in range(2):
        t0, n = time.perf_counter(), 0
        for b in r.batches(epoch):
            n += b["student"].shape[0]
        sync(device)
        rates.append(n / (time.perf_counter() - t0))
    return {"clips_per_s": rates[-1], "first_epoch_clips_per_s": rates[0], "clips": n}


def compute_ceiling(store, blocks, specs, tc, device, iters: int) -> dict:
    """(b): step_once on one batch already on the device, ``iters`` times after a warm-up."""
    from pipeline.artifacts import stats_tensors
    from pipeline.train import _TrainModule, build_models
    from pipeline.train_data import ClipReader
    from pipeline.train_step import Objective, make_optimizer, step_once
    r = ClipReader(store, blocks, list(specs), rank=0, world=1, batch_size=tc.batch_size,
                   device=device)
    batch = next(r.batches(0))
    targets = [k for k in specs if k != "student"]
    mean, std = stats_tensors(store.stats(), targets, device)
    torch.manual_seed(0)
    converter, head = build_models(tc, specs, len(CLASSES))
    module = _TrainModule(converter=converter, head=head).to(device)
    params = list(module.parameters())
    opt = make_optimizer(params, tc.optim, device)
    objective = Objective(tc, mean, std, bf16=device.type == "cuda")
    for i in range(5):
        step_once(module, objective, opt, params, batch, i, tc.optim.grad_clip)
    sync(device)
    t0 = time.perf_counter()
    for i in range(iters):
        step_once(module, objective, opt, params, batch, i, tc.optim.grad_clip)
    sync(device)
    dt = time.perf_counter() - t0
    n_params = sum(p.numel() for p in module.converter.parameters())
    return {"clips_per_s": iters * tc.batch_size / dt, "ms_per_step": dt / iters * 1e3,
            "converter_params": n_params}


def log_rates(storage: Storage, metrics_log: str, started: float, epoch_clips: int,
              batch: int) -> dict:
    """Per-epoch training clips/s from a metrics log, the mean over epochs >= 1, time to first
    step."""
    recs = [json.loads(x) for x in storage.read_bytes(metrics_log).decode().splitlines()]
    steps = [r for r in recs if r["kind"] == "step"]
    per_epoch = {}
    for e in sorted({r["epoch"] for r in steps}):
        s = [r for r in steps if r["epoch"] == e]
        # from the start of the epoch's first step (its wait for the first window included)
        if len(s) > 2:
            first_step_s = batch / s[0]["clips_per_s"]
            per_epoch[e] = epoch_clips / (s[-1]["time"] - s[0]["time"] + first_step_s)
    later = [v for e, v in per_epoch.items() if e >= 1] or list(per_epoch.values())
    return {"clips_per_s": statistics.fmean(later), "per_epoch": per_epoch,
            "first_step_s": steps[0]["time"] - started, "steps": len(steps),
            "data_wait_frac":
                statistics.fmean(r["data_wait_frac"] for r in steps if r["epoch"] >= 1)
            if any(r["epoch"] >= 1 for r in steps) else None}


def job_for(args, storage: Storage, name: str, cache: str, epochs: int) -> JobConfig:
    return JobConfig.model_validate({
        "name": name, "storage": {"url": storage.root_url},
        "train": {"converter": args.converter,
                  "converter_kwargs": json.loads(args.converter_kwargs),
                  "batch_size": args.batch_size, "num_workers": 1, "use_gpu": args.device == "cuda",
                  "cpus_per_worker": args.cpus_per_worker, "epochs": epochs, "cache": cache,
                  "warm_start": False,
                  # a log write every step: one device sync per step, so step times are GPU times
                  # (the host cannot run ahead of the GPU between records; costs a launch gap per
                  # step)
                  "optim": {"lr": 5e-4, "warmup_steps": 10}, "log_every_steps": 1,
                  "head": {"hidden": 64 if args.tiny else 256}}})


def stage(args, storage, name, cache, epochs) -> dict:
    """(c)/(d): the train stage under Ray Train; with the stage summary's own rate (first step to
    last checkpoint) and where its time to the first step went (``startup``)."""
    from pipeline.train import run_train
    s = run_train(job_for(args, storage, name, cache, epochs), storage)
    rates = log_rates(storage, s["metrics_log"], s["started"], args.train_clips, args.batch_size)
    events, lines = startup_events(storage, s)
    return {**rates, "cache": cache, "summary_clips_per_s": s["clips_per_s"],
            "startup": events, "ray_train_startup": lines}


# the controller's lines that mark a phase of the worker group's start (Ray Train's DEBUG log)
RAY_EVENTS = {"Attempting to start training worker group": "worker group start asked",
              "worker actors created": "worker actors created",
              "Train context initialized": "train context initialized",
              "after_worker_group_start callbacks": "process group set up (callbacks)",
              "Train function launched": "train function launched"}
WORKER_EVENTS = {"process": "worker process started (Ray may hand over an idle one)",
                 "entry": "train function entered",
                 "imports": "training modules imported", "reader": "first window read started",
                 "models": "models built, on the device", "ddp": "DDP ready",
                 "ready": "optimiser, log, validation reader ready",
                 "first_batch": "first batch in"}


def startup_events(storage: Storage, s: dict) -> tuple[list, list[str]]:
    """[(what, seconds after the stage started)] in time order, from the driver's summary, the
    controller's log (first record: the controller is up) and rank 0's first step record, up to
    that step's end; and the controller's "[Worker Group Initialization] ... in N s" lines."""
    import glob

    import ray
    t0 = s["started"]
    ev = {"stage started (driver)": t0, "trainer.fit called": s["fit_called"]}
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "train")
    lines = []
    for path in glob.glob(os.path.join(logs, "ray-train-sys-controller-*.log")):
        with open(path) as f:
            recs = [r for r in map(json.loads, f) if r.get("run_name") == s["run_name"]]
        for r in recs:
            t = r["timestamp_ns"] / 1e9
            ev.setdefault("controller up (first log record)", t)
            for key, what in RAY_EVENTS.items():
                if key in r["message"]:
                    ev.setdefault(what, t)
            if "Initialization]" in r["message"]:
                lines.append(r["message"].split("\n")[0])
    recs = [json.loads(x) for x in storage.read_bytes(s["metrics_log"]).decode().splitlines()]
    first = next(r for r in recs if r["kind"] == "step")
    for key, what in WORKER_EVENTS.items():
        if f"start.{key}" in first:
            ev[what] = first[f"start.{key}"]
    ev["first step done"] = first["time"]
    return sorted(((k, round(v - t0, 3)) for k, v in ev.items()), key=lambda kv: kv[1]), lines


def print_startup(name: str, events: list) -> None:
    print(f"{name}: time to the first step, phase by phase (s after the stage started, +since the "
          f"previous)")
    last = 0.0
    for what, t in events:
        print(f"  {t:7.2f}  +{t - last:6.2f}  {what}")
        last = t


def torchrun(args, storage, name, cache, epochs) -> dict:
    """(e): the same loop under ``torchrun --nproc_per_node 1`` (DDP process group, one process)."""
    from pipeline.artifacts import ModelRegistry
    from pipeline.train import worker_config
    job = job_for(args, storage, name, cache, epochs)
    cfg = worker_config(job.train, storage, store=FeatureStore(storage, job.store),
                        registry=ModelRegistry(storage, job.model_name),
                        run_rel=f"runs/{name}/train/{name}-000")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cfg.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        # as Ray sets it
        env = {**os.environ, "OMP_NUM_THREADS": str(max(int(args.cpus_per_worker), 1))}
        started = time.time()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "1", __file__, "--worker", path,
                        "--ckpt", os.path.join(tmp, "ckpt")], check=True, env=env)
    rates = log_rates(storage, cfg["metrics_log"], started, args.train_clips, args.batch_size)
    return {**rates, "cache": cache}


def worker(cfg_path: str, ckpt: str) -> None:
    import torch.distributed as dist

    from pipeline.train_loop import LocalSession, run_worker
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    with open(cfg_path) as f:
        cfg = json.load(f)
    run_worker(cfg, LocalSession(ckpt))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", default="/tmp/tokconv-bench-train")
    p.add_argument("--make-store", action="store_true")
    p.add_argument("--clips", type=int, default=1024)
    p.add_argument("--val-clips", type=int, default=16)
    p.add_argument("--shard-clips", type=int, default=256)
    p.add_argument("--converter", default="perceiver_base")
    p.add_argument("--converter-kwargs", default="{}", help="JSON")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpus-per-worker", type=float, default=8)
    p.add_argument("--epochs-stream", type=int, default=3)
    p.add_argument("--epochs-cache", type=int, default=8)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (dry run)")
    p.add_argument("--skip", default="", help="comma list of a,a2,b,c,d,e to leave out")
    p.add_argument("--out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.ckpt)
    args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    device = torch.device(args.device)
    specs = TINY if args.tiny else FULL
    storage = Storage(args.storage)
    if args.make_store:
        if storage.exists("features"):
            storage.fs.rm(storage.path("features"), recursive=True)
        make_store(storage, specs, args.clips, args.val_clips, args.shard_clips, device)
    if storage.exists("runs"):
        storage.fs.rm(storage.path("runs"), recursive=True)
    store = FeatureStore(storage, "features")
    from pipeline.train_plan import clip_bytes, plan_blocks
    blocks = plan_blocks(store, "train")
    names = list(specs)
    tc = job_for(args, storage, "x", "none", 1).train
    args.train_clips = sum(len(b["rows"]) for b in blocks)
    skip = set(args.skip.split(","))
    res: dict = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                 "torch": torch.__version__, "converter": args.converter,
                 "batch_size": args.batch_size,
                 "train_clips": args.train_clips,
                 "bytes_per_clip": clip_bytes({n: store.layouts()[n] for n in names})}
    if "a" not in skip:
        res["a_raw_read"] = raw_read(store, names)
        print("(a)", res["a_raw_read"], flush=True)
    if "a2" not in skip:
        res["a2_reader"] = reader_alone(store, blocks, names, tc, device)
        print("(a')", res["a2_reader"], flush=True)
        res["a2_reader_pyarrow"] = reader_alone(store, blocks, names, tc, device, direct=False)
        print("(a') pyarrow path", res["a2_reader_pyarrow"], flush=True)
    if "b" not in skip:
        res["b_compute"] = compute_ceiling(store, blocks, specs, tc, device, args.iters)
        print("(b)", res["b_compute"], flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if {"c", "d"} - skip:
        import ray
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count(),
                 include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
        if "c" not in skip:
            res["c_stage_streamed"] = stage(args, storage, "streamed", "none", args.epochs_stream)
            print("(c)", res["c_stage_streamed"], flush=True)
        if "d" not in skip:
            res["d_stage_cached"] = stage(args, storage, "cached", "gpu", args.epochs_cache)
            print("(d)", res["d_stage_cached"], flush=True)
        ray.shutdown()
    if "e" not in skip:
        res["e_torchrun_cached"] = torchrun(args, storage, "torchrun", "gpu", args.epochs_cache)
        print("(e)", res["e_torchrun_cached"], flush=True)

    def ratio(a, b):
        return res[a]["clips_per_s"] / res[b]["clips_per_s"] if a in res and b in res else None
    res["ratios"] = {"c/a (goal >= 0.8)": ratio("c_stage_streamed", "a_raw_read"),
                     "a'/a": ratio("a2_reader", "a_raw_read"),
                     "a'(pyarrow)/a": ratio("a2_reader_pyarrow", "a_raw_read"),
                     "d/b (goal >= 0.8)": ratio("d_stage_cached", "b_compute"),
                     "d/e (goal >= 0.9)": ratio("d_stage_cached", "e_torchrun_cached")}
    print(json.dumps(res["ratios"], indent=1))
    for k in ("c_stage_streamed", "d_stage_cached", "e_torchrun_cached"):
        if k in res:
            print(f"{k}: first step after {res[k]['first_step_s']:.1f} s (goal <= 20 s)")
            if "startup" in res[k]:
                print_startup(k, res[k]["startup"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
