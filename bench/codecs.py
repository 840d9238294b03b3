"""Feature-store codecs against raw fp16, in ONE run (issue 15).

For the job's store (``store``, extracted raw: fp16) and each ``--codecs`` store made from it by
``pipeline.reencode`` (``<store>-<codec>``; a finished conversion is skipped), measured in the same
run, raw first as the reference:

* **bytes per clip** (shard file bytes / clips, from the commit records) and the ratio to raw;
* **raw read clips/s**: every committed shard read with pyarrow into memory (``--read-passes``
  passes, the first warms the page cache; the best pass counts), no decode, and GiB/s;
* **the training reader's clips/s**: ``bench/train.py``'s ``reader_alone`` (``ClipReader`` over
  the train split, cache none, batches decoded on ``--device``, no compute: the stream a codec
  changes; the second of two epochs);
* **device decode clips/s**: stored rows -> ``--device`` -> ``codecs.decode_columns`` to bf16 (the
  training reader's per-batch work, without the model); **encode clips/s** on the host (one
  thread, as a shard-writer actor) and on ``--device`` (what extraction would pay per clip);
* **feature error** per column on the held-out split: mean |x^ - x| / mean |x|, max |x^ - x|,
  token cosine against the raw values; and the **scale granularity** the codecs chose (one scale
  per clip and channel) against one per token and one per clip, in standardised units;
* **the train stage's streamed clips/s** and **converter fidelity on held-out sources**: the job's
  train stage on the codec's store, then the evaluate stage's scoring (``score_run``, in this
  process: no floor) on the RAW store's held-out split (the same targets for every codec), with
  the same job, preset and budget for every codec (one function, ``train_and_evaluate``;
  ``train.cache=none`` unless overridden, so every epoch streams from the store).

Results are written to ``--out`` after each codec (a run cut short keeps what it measured).

Goals (issue 15), checked in the last table: bytes <= 0.5x raw, mean cosine within 0.5% of raw
(relative), train clips/s (the stage's, its steps', the reader's) >= 0.8 x the byte ratio's
inverse. The store's held-out split must be
held out by source footage (e.g. a manifest from bench/footage.py), not copies of one video.

H200 (a store extracted with full-size random-weight models from held-out-by-source footage,
``python bench/footage.py --out build/footage`` first): ``bash bench/h200.sh codecs``, i.e.
    python bench/codecs.py jobs/full.yaml storage.url=/tmp/codecs models.weights=random \\
        sources.manifest=build/footage/manifest.csv sources.labels=manifest \\
        decode.clips_per_video=1 models.compile=[] --extract --codecs fp8z,fp8,int8 \\
        --device cuda --reencode-device cuda --train-overrides train.num_workers=1 --out OUT.json
CPU dry run (the smoke job's tiny models; extracts first):
    python bench/codecs.py jobs/smoke.yaml storage.url=/tmp/codecs-dry --extract \\
        --train-overrides train.epochs=1
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
import yaml

from bench.common import sync
from bench.train import reader_alone
from pipeline import codecs
from pipeline.artifacts import job_run_dir
from pipeline.config import load_job
from pipeline.evaluate import score_run
from pipeline.featurestore import FeatureStore
from pipeline.reencode import reencode
from pipeline.storage import Storage
from pipeline.train_plan import plan_blocks


def pipeline_cli(job: str, overrides: list[str], stages: str) -> None:
    cmd = [sys.executable, "-m", "pipeline", "run", job, *overrides, "--stages", stages]
    print(f"[codecs] $ {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def train_and_evaluate(job: str, overrides: list[str], *, store: str, eval_store: FeatureStore,
                       run_name: str, storage: Storage, device: torch.device) -> dict:
    """The train stage on ``store``, then the evaluate stage's scoring on ``eval_store``'s
    held-out split (``evaluate.split``).

    ``python -m pipeline run JOB store=S name=N --stages train`` trains on store S and leaves
    runs/N/summary.json with the stage's ``clips_per_s`` (clips trained over rank 0's time from
    its first step to its last checkpoint: start-up excluded) and ``seconds`` (the whole stage);
    ``score_run`` reads runs/N/train.json's checkpoint and scores it as ``--stages evaluate``
    does (here without the floor and the registry's latest: the codecs compare among
    themselves)."""
    pipeline_cli(job, [*overrides, f"store={store}", f"name={run_name}"], "train")
    summary = storage.read_json(f"runs/{run_name}/summary.json")["stages"]["train"]
    rate = summary["clips_per_s"]
    steps = step_rates(storage, run_name)
    cfg = load_job(job, overrides).evaluate
    metrics, *_ = score_run(cfg, storage, store=eval_store, run_dir=job_run_dir(run_name),
                            device=device.type)
    return {"train_clips_per_s": rate, "train_seconds": summary["seconds"], **steps,
            "mean_cosine": metrics["mean_cosine"], "mean_r2": metrics["mean_r2"],
            "targets": {t: {"cosine": m["cosine"], "r2": m["r2"]}
                        for t, m in metrics["targets"].items()}}


def step_rates(storage: Storage, run_name: str) -> dict:
    """From the run's metrics log: the median of its steps' own clips/s (each step's batch over
    its wall time, data wait included), each epoch's first step (the epoch's first window read)
    apart; and the median data-wait fraction. The stage's clips_per_s also counts checkpoints and
    validations at every epoch end, which dominate on a small store."""
    log = storage.read_json(f"runs/{run_name}/train.json")["metrics_log"]
    recs = [json.loads(line) for line in storage.read_bytes(log).decode().splitlines() if line]
    steps = [r for r in recs if r.get("kind") == "step"]
    first = {min(r["step"] for r in steps if r["epoch"] == e) for e in {r["epoch"] for r in steps}}
    inner = [r for r in steps if r["step"] not in first] or steps
    return {"step_clips_per_s": statistics.median(r["clips_per_s"] for r in inner),
            "epoch_first_step_clips_per_s": statistics.median(
                r["clips_per_s"] for r in steps if r["step"] in first),
            "data_wait_frac": statistics.median(r["data_wait_frac"] for r in inner)}


def read_rate(store: FeatureStore, passes: int) -> dict:
    """Best of ``passes`` full reads of the committed shards (pyarrow, into memory, no decode)."""
    fs, paths = store.storage.pyarrow_filesystem(), store.shard_paths()
    clips = sum(r["rows"] for r in store.commits())
    best = float("inf")
    for _ in range(passes):
        t0, nbytes = time.perf_counter(), 0
        for p in paths:
            nbytes += pq.read_table(p, filesystem=fs).nbytes
        best = min(best, time.perf_counter() - t0)
    return {"read_clips_per_s": clips / best, "read_gib_per_s": nbytes / best / 2**30}


def decode_rate(store: FeatureStore, device: torch.device, max_clips: int) -> float:
    """Clips/s of stored rows -> device -> decode_columns (bf16), over up to ``max_clips`` clips."""
    layouts, tables, n = store.layouts(), [], 0
    for p in store.shard_paths():
        tables.append(pq.read_table(p, filesystem=store.storage.pyarrow_filesystem(),
                                    columns=list(layouts)))
        n += tables[-1].num_rows
        if n >= max_clips:
            break
    rows = [store.stored_rows(t) for t in tables]
    codecs.decode_columns({k: v.to(device) for k, v in rows[0].items()}, layouts, torch.bfloat16)
    sync(device)  # after one warm-up batch
    t0 = time.perf_counter()
    for r in rows:
        codecs.decode_columns({k: v.to(device, non_blocking=True) for k, v in r.items()}, layouts,
                              torch.bfloat16)
    sync(device)
    return n / (time.perf_counter() - t0)


def encode_rate(raw: FeatureStore, codec: str, device: torch.device, max_clips: int) -> float:
    """Clips/s of ``codecs.encode`` on ``device`` for up to ``max_clips`` raw clips (the writer's
    work per clip when extraction encodes; on the host with one thread, as a writer actor runs)."""
    layouts = raw.layouts()
    batch = next(raw.iter_torch(batch_size=max_clips, columns=list(layouts)))
    xs = {k: v.to(device) for k, v in batch.items() if layouts[k]["shape"][0] > 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if device.type == "cpu" else threads)
    try:
        for x in xs.values():
            codecs.encode(x[:1], codec)
        sync(device)
        t0 = time.perf_counter()
        for x in xs.values():
            codecs.encode(x, codec)
        sync(device)
    finally:
        torch.set_num_threads(threads)
    return len(batch["student"]) / (time.perf_counter() - t0)


def decoded_clips(store: FeatureStore, split: str, device: torch.device
                  ) -> Iterator[tuple[tuple[str, int], dict[str, torch.Tensor]]]:
    """((video_id, clip_index), {column: (N, D) in the layout's dtype on ``device``}) for every
    clip of ``split``: stored rows decoded on the device, as the training reader does."""
    layouts, fs = store.layouts(), store.storage.pyarrow_filesystem()
    for p in store.shard_paths():
        t = pq.read_table(p, filesystem=fs)
        t = t.filter(pc.equal(t.column("split"), split))
        for i in range(0, t.num_rows, 8):
            b = t.slice(i, 8)
            rows = {k: v.to(device) for k, v in store.stored_rows(b).items()}
            vals = {k: codecs.decode(v, layouts[k]) for k, v in rows.items()}
            keys = zip(b.column("video_id").to_pylist(), b.column("clip_index").to_pylist())
            for j, key in enumerate(keys):
                yield key, {k: v[j] for k, v in vals.items()}


def feature_error(raw: FeatureStore, coded: FeatureStore, split: str, device: torch.device
                  ) -> dict:
    """Per column: mean |x^ - x| / mean |x|, max |x^ - x| and mean token cosine on ``split``."""
    ref = dict(decoded_clips(raw, split, device))
    acc: dict[str, list[float]] = {}
    for key, cols in decoded_clips(coded, split, device):
        for k, x in ref[key].items():
            x, y = x.double(), cols[k].double()
            a = acc.setdefault(k, [0.0, 0.0, 0.0, 0.0, 0])
            a[0] += float((y - x).abs().sum())
            a[1] += float(x.abs().sum())
            a[2] = max(a[2], float((y - x).abs().max()))
            a[3] += float(F.cosine_similarity(y, x, dim=-1).mean())
            a[4] += 1
    return {k: {"rel_mean_err": e / max(m, 1e-30), "max_err": mx, "token_cosine": cs / n}
            for k, (e, m, mx, cs, n) in acc.items()}


def _quantise(x: torch.Tensor, kind: str, axis: str) -> torch.Tensor:
    """x (B, N, D) through 8-bit codes with one absmax scale per (clip, channel), per (clip, token)
    or per clip: the codecs' per-channel choice against the two alternatives."""
    qmax = 448.0 if kind == "fp8" else 127.0
    dims = {"channel": (1,), "token": (2,), "clip": (1, 2)}[axis]
    s = (x.abs().amax(dims, keepdim=True) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
    y = x / s
    return (y.to(torch.float8_e4m3fn).float() if kind == "fp8" else y.round()) * s


def scale_granularity(raw: FeatureStore, split: str, device: torch.device, max_clips: int = 64
                      ) -> dict:
    """Per column (more than one token) and 8-bit kind: the error of each scale granularity in
    standardised units (error / the channel's std over the split: what the converter learns),
    mean and worst channel, on up to ``max_clips`` clips of ``split``."""
    parts: dict[str, list[torch.Tensor]] = {}
    for b in raw.iter_torch(split=split, batch_size=8):
        for k, lay in raw.layouts().items():
            if lay["shape"][0] > 1:
                parts.setdefault(k, []).append(b[k].float())
        if sum(len(v) for v in parts.values()) * 8 >= max_clips * len(parts):
            break
    out = {}
    for k, xs in parts.items():
        x = torch.cat(xs)[:max_clips].to(device)
        std = x.reshape(-1, x.shape[-1]).std(0).clamp_min(1e-12)
        for kind in ("fp8", "int8"):
            for axis in ("channel", "token", "clip"):
                e = ((_quantise(x, kind, axis) - x) / std).reshape(-1, x.shape[-1])
                per_c = e.pow(2).mean(0).sqrt()
                out.setdefault(k, {})[f"{kind}/{axis}"] = {"mean": float(per_c.mean()),
                                                           "worst": float(per_c.max())}
    return out


def table(results: dict[str, dict], device: torch.device, *, skip_train: bool) -> list[str]:
    """The markdown table (dated, with the device), each codec against raw, goals checked."""
    ref = results["raw"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    lines = [f"## {dt.date.today()} · {name or 'CPU'}", "",
             ("| codec | bytes/clip | x raw | read clips/s | x raw | reader clips/s | x raw "
              "| decode clips/s "
              "| train clips/s | x raw | step clips/s | x raw | mean cos | rel. loss | mean R^2 "
              "| goals |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for label, r in results.items():
        ratio = r["bytes_per_clip"] / ref["bytes_per_clip"]
        row = [label, f"{r['bytes_per_clip'] / 2**20:.3f} MiB", f"{ratio:.4f}",
               f"{r['read_clips_per_s']:.1f}",
               f"{r['read_clips_per_s'] / ref['read_clips_per_s']:.2f}",
               f"{r['reader_clips_per_s']:.1f}",
               f"{r['reader_clips_per_s'] / ref['reader_clips_per_s']:.2f}",
               f"{r['decode_clips_per_s']:.1f}"]
        need = 0.8 / ratio
        reader = "ok" if r["reader_clips_per_s"] / ref["reader_clips_per_s"] >= need else "NOT MET"
        goals = [f"bytes {'ok' if ratio <= 0.5 else 'NOT MET'}", f"reader {reader}"]
        if skip_train or "train_clips_per_s" not in r or "train_clips_per_s" not in ref:
            row += ["-"] * 7
        else:
            speed = r["train_clips_per_s"] / ref["train_clips_per_s"]
            step = r["step_clips_per_s"] / ref["step_clips_per_s"]
            loss = 1 - r["mean_cosine"] / ref["mean_cosine"]
            met = {k: "ok" if v >= need else "NOT MET" for k, v in (("stage", speed),
                                                                   ("step", step))}
            goals += [f"cos {'ok' if loss <= 0.005 else 'NOT MET'}",
                      f"speed {met['stage']} (>= {need:.2f}x; steps {met['step']})"]
            row += [f"{r['train_clips_per_s']:.1f}", f"{speed:.2f}",
                    f"{r['step_clips_per_s']:.1f}", f"{step:.2f}", f"{r['mean_cosine']:.4f}",
                    f"{100 * loss:+.2f}%", f"{r['mean_r2']:.4f}"]
        lines.append("| " + " | ".join([*row, "reference" if label == "raw" else ", ".join(goals)])
                     + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", help="job YAML: its storage.url and store name the raw (fp16) store")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of the job (every run)")
    p.add_argument("--codecs", default="fp8z,fp8,int8",
                   help="comma list of codecs, or ';'-separated extract.codec specs (YAML)")
    p.add_argument("--extract", action="store_true", help="run the job's extract stage first (raw)")
    p.add_argument("--train-overrides", nargs="*", default=[],
                   help="overrides of the train/evaluate runs only (+ train.warm_start=false)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reencode-device", default="cpu", help="where re-encoding runs (cpu/cuda)")
    p.add_argument("--workers", type=int, default=4, help="re-encode threads")
    p.add_argument("--read-passes", type=int, default=2)
    p.add_argument("--decode-clips", type=int, default=256)
    p.add_argument("--split", default="val", help="held-out split (feature error, evaluate)")
    p.add_argument("--train-codecs", default=None,
                   help="comma list of the labels trained (default: all; raw is the reference)")
    p.add_argument("--skip-train", action="store_true",
                   help="bytes, reads, decode and feature error only")
    p.add_argument("--out", help="write all results as JSON here")
    args = p.parse_args()

    job = load_job(args.job, args.overrides)
    storage = Storage(job.storage.url, job.storage.options)
    if args.extract:
        pipeline_cli(args.job, [*args.overrides, "extract.codec=raw"], "extract")
    raw = FeatureStore(storage, job.store)
    if set(raw.read_meta().get("codec", {}).values()) - {"raw"}:
        raise SystemExit(f"{raw}: the reference must be a raw store, holds "
                         f"{raw.read_meta()['codec']}")
    specs = [s.strip() for s in args.codecs.split(";" if ";" in args.codecs else ",") if s.strip()]
    stores, converted = {"raw": raw}, {}
    for spec in specs:
        codec = yaml.safe_load(spec)
        label = spec if isinstance(codec, str) else "+".join(f"{k}={v}" for k, v in codec.items())
        name = f"{job.store}-{label.replace('=', '_').replace('+', '_')}"
        stores[label] = FeatureStore(storage, name)
        s = reencode(raw, stores[label], codec, workers=args.workers, device=args.reencode_device)
        converted[label] = {k: s[k] for k in ("shards_written", "seconds")}
        print(f"[codecs] {label}: {s['shards_written']} shards converted in {s['seconds']} s",
              flush=True)

    device = torch.device(args.device)
    granularity = scale_granularity(raw, args.split, device)
    for k, per in granularity.items():
        print(f"[codecs] scale granularity, {k} (standardised rms error, mean / worst channel): "
              + ", ".join(f"{g} {v['mean']:.4f}/{v['worst']:.4f}" for g, v in per.items()),
              flush=True)
    train_overrides = [*args.overrides, "train.warm_start=false", "train.cache=none",
                       *args.train_overrides]
    results: dict[str, dict] = {}

    def save(label: str) -> list[str]:
        print(f"[codecs] {label}: {json.dumps(results[label])}", flush=True)
        lines = table(results, device, skip_train=args.skip_train)
        if args.out:  # after every measure: a run cut short keeps what it measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(
                {"argv": sys.argv, "results": results, "scale_granularity": granularity,
                 "table": lines}, indent=2))
        return lines

    # the cheap measures of every codec first, then the train stages (the costly part)
    for label, store in stores.items():
        commits = store.commits()
        clips = sum(r["rows"] for r in commits)
        res = results[label] = {
            "store": store.name, "clips": clips,
            "bytes_per_clip": sum(r["bytes"] for r in commits) / clips,
            "reader_clips_per_s": reader_alone(store, plan_blocks(store, "train"),
                                               list(store.layouts()), job.train,
                                               device)["clips_per_s"],
            **read_rate(store, args.read_passes),
            "decode_clips_per_s": decode_rate(store, device, args.decode_clips)}
        if label != "raw":
            res["reencode"] = converted[label]
            res["feature_error"] = feature_error(raw, store, args.split, device)
            if isinstance(yaml.safe_load(label), str):
                res["encode_clips_per_s"] = {
                    d: encode_rate(raw, label, torch.device(d), args.decode_clips // 8)
                    for d in dict.fromkeys(["cpu", args.device])}
        lines = save(label)
    for label, store in stores.items():
        trained = args.train_codecs is None or label in args.train_codecs.split(",")
        if not args.skip_train and trained:
            results[label].update(train_and_evaluate(
                args.job, train_overrides, store=store.name, eval_store=raw,
                run_name=f"codecs-{store.name}", storage=storage, device=device))
            lines = save(label)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
