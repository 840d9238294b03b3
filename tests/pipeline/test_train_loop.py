"""The per-worker training loop in one process (``LocalSession``, no cluster) on REAL feature
pairs: the sample videos decoded with decord and run through the tiny real backbones (full token
layouts, resampled in 3D to half grids per axis to stay fast on CPU), held out by source footage
(bikes is the validation video; the two carphone files are one footage and both train).

Every design's loss falls; the per-step log and validation records follow the schema the report
reads, and the report draws its curves from that log; a run restored from a mid-epoch checkpoint
ends with the weights of the uninterrupted run; early stopping ends a run on its validation
metric."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from small_presets import HALF, one_preset_per_design, small_kwargs

from pipeline.artifacts import ModelRegistry
from pipeline.config import JobConfig
from pipeline.featurestore import FeatureStore
from pipeline.storage import Storage
from pipeline.train import worker_config
from pipeline.train_loop import LocalSession, MetricsLog, load_state, run_worker
from tokconv.targets import TargetSpec

TARGETS = ("videomae", "timesformer", "vivit")
START_PHASES = ("loop", "reader", "models", "ddp", "ready", "first_batch")
STEP_KEYS = {"kind", "step", "epoch", "time", "loss", *(f"loss.{t}" for t in TARGETS),
             "loss.head", "lr", "grad_norm", "clips_per_s", "data_wait_frac"}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on a shared 2-core host
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Storage:
    """A feature store of the 4 sample videos x 2 clips through the tiny backbones."""
    from pipeline.backbones import FeatureExtractor
    from pipeline.config import DecodeConfig, ModelsConfig
    from pipeline.decode import decode_clips
    from pipeline.samples import SAMPLE_LABELS, sample_files
    from tokconv.layers import resample_tokens

    label_of = {n: label for label, names in SAMPLE_LABELS.items() for n in names}
    classes = sorted(SAMPLE_LABELS)
    cfg = DecodeConfig(window=32, stride=2, clips_per_video=2, short_side=256)
    clips = [(p, i, f) for p in sample_files() for i, f in decode_clips(str(p), cfg)]
    torch.manual_seed(0)
    extractor = FeatureExtractor(ModelsConfig(weights="tiny", device="cpu"))
    with torch.no_grad():
        feats = extractor(np.stack([f for _, _, f in clips]))
    specs, small = {}, {}
    for name, x in feats.items():
        small[name] = resample_tokens(x.float(), extractor.specs[name].grid, HALF[name]).half()
        specs[name] = TargetSpec(name, small[name].shape[1], small[name].shape[2], HALF[name])
    storage = Storage(str(tmp_path_factory.mktemp("real_store")))
    store = FeatureStore(storage, "features")
    store.write_meta(specs=specs, dtype="float16", class_names=classes)
    for lo in range(0, len(clips), 4):
        part = clips[lo:lo + 4]
        store.write_shard({
            "video_id": [p.stem for p, _, _ in part],
            "clip_index": np.array([i for _, i, _ in part], np.int32),
            "label_index": np.array([classes.index(label_of[p.name]) for p, _, _ in part],
                                    np.int32),
            "split": np.array(["val" if p.name == "bikes.mp4" else "train" for p, _, _ in part]),
            **{k: v[lo:lo + 4].numpy() for k, v in small.items()}})
    store.compute_stats()
    return storage


def _job(storage: Storage, **train) -> JobConfig:
    return JobConfig.model_validate({
        "name": "loop", "storage": {"url": storage.root_url},
        "train": {"epochs": 8, "batch_size": 2, "num_workers": 1, "warm_start": False,
                  "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.0},
                  "head": {"hidden": 32}, **train}})


def _run(storage: Storage, tmp_path, run: str, **train) -> tuple[list[dict], str]:
    """run_worker in this process; returns (metrics log records, checkpoint root)."""
    job = _job(storage, **train)
    cfg = worker_config(job.train, storage, store=FeatureStore(storage, job.store),
                        registry=ModelRegistry(storage, job.model_name),
                        run_rel=f"runs/loop/train/{run}")
    root = str(tmp_path / run)
    run_worker(cfg, LocalSession(root, torch.device("cpu"), keep=100))
    with open(storage.path(cfg["metrics_log"])) as f:
        return [json.loads(line) for line in f], root


@pytest.mark.parametrize("converter", one_preset_per_design())
def test_loss_falls_for_every_design(storage, tmp_path, converter):
    records, _ = _run(storage, tmp_path, converter, converter=converter,
                      converter_kwargs=small_kwargs(converter))
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 25))  # 6 train clips / batch 2 x 8 epochs
    first, last = np.mean([r["loss"] for r in steps[:3]]), np.mean([r["loss"] for r in steps[-3:]])
    assert last < 0.8 * first, (converter, first, last)
    for t in TARGETS:  # every target learns, not just the sum
        assert np.mean([r[f"loss.{t}"] for r in steps[-3:]]) < \
            np.mean([r[f"loss.{t}"] for r in steps[:3]])


def test_metrics_log_and_validation_records(storage, tmp_path):
    records, root = _run(storage, tmp_path, "log", epochs=3, val_every_steps=2,
                         checkpoint_every_steps=4, log_every_steps=5,
                         deficiency={"rank": 4, "w_nuclear": 0.01, "warmup_steps": 4})
    steps = [r for r in records if r["kind"] == "step"]
    vals = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in steps] == list(range(1, 10))
    # the first step carries the worker's start-up, phase by phase, in time order up to its end
    start = {k: v for k, v in steps[0].items() if k.startswith("start.")}
    assert list(start) == [f"start.{k}" for k in START_PHASES], sorted(start)
    assert list(start.values()) == sorted(start.values()) and start["start.first_batch"] <= \
        steps[0]["time"]
    for r in steps:
        assert set(r) - set(start) == STEP_KEYS | {"reg.nuclear", "w.nuclear"}, sorted(r)
        assert r is steps[0] or not set(r) & set(start)
        assert r["epoch"] == (r["step"] - 1) // 3 and 0.0 <= r["data_wait_frac"] <= 1.0
        assert r["clips_per_s"] > 0
        assert all(np.isfinite(r[k]) for k in r if k != "kind")
    assert [r["w.nuclear"] for r in steps[:5]] == \
        pytest.approx([0.0, 0.0025, 0.005, 0.0075, 0.01])
    # warm-up, then cosine
    assert steps[0]["lr"] < steps[2]["lr"] and steps[-1]["lr"] < steps[2]["lr"]
    # every 2 steps inside an epoch and at each epoch end (3, 6, 9)
    assert [(r["step"], r["epoch"]) for r in vals] == \
        [(2, 0), (3, 0), (4, 1), (6, 1), (8, 2), (9, 2)]
    for r in vals:
        assert set(r) == {"kind", "step", "epoch", "val.mean_cosine", "val.top1",
                          *(f"val.{t}.{m}" for t in TARGETS for m in ("cosine", "r2"))}
        assert -1 <= r["val.mean_cosine"] <= 1 and 0 <= r["val.top1"] <= 1
        assert r["val.mean_cosine"] == pytest.approx(
            np.mean([r[f"val.{t}.cosine"] for t in TARGETS]))
    best = storage.read_json("runs/loop/train/log/best.json")
    top = max(vals, key=lambda r: r["val.mean_cosine"])
    assert (best["step"], best["value"]) == (top["step"], top["val.mean_cosine"])
    assert storage.ls(best["dir"]) == \
        sorted(["config.json", "head.json", "head.safetensors", "model.safetensors"])
    assert len([d for d in storage.ls("runs/loop/train/log") if d.startswith("best-")]) == 1
    # checkpoints at 4, 8 (every 4 steps) and the epoch ends 3, 6, 9, with the position in the epoch
    states = {d: load_state(os.path.join(root, d))["progress"] for d in sorted(os.listdir(root))}
    assert {d: (s["epoch"], s["pos"]) for d, s in states.items()} == {
        "step-00000003": (1, 0), "step-00000004": (1, 1), "step-00000006": (2, 0),
        "step-00000008": (2, 2), "step-00000009": (3, 0)}
    last = states["step-00000009"]
    assert last["finished"] and len(last["loss_history"]) == 3
    # the rate the stage reports: every clip of 3 epochs (6 train clips each) over the steps' time
    assert last["clips"] == 18 and 0 < last["train_seconds"] < 600
    assert [s["clips"] for s in states.values()] == [6, 8, 12, 16, 18]
    assert [s["train_seconds"] for s in states.values()] == \
        sorted(s["train_seconds"] for s in states.values())

    # the report's curves come from this log, as train.json names it
    from pipeline.report import load_train_log
    from pipeline.report.page import curves_section
    log = load_train_log(storage, {"metrics_log": "runs/loop/train/log/metrics.jsonl"})
    assert log.error is None and log.bad_lines == 0
    assert [r["step"] for r in log.steps] == list(range(1, 10)) and len(log.val) == 6
    assert log.series("loss") == ([float(r["step"]) for r in steps], [r["loss"] for r in steps])
    assert set(log.keys("loss.")) == {*(f"loss.{t}" for t in TARGETS), "loss.head"}
    html = curves_section({}, {"train_log": log})
    assert "9 step records, 6 validation records" in html
    assert 'alt="training curves"' in html and 'alt="validation per epoch"' in html


def test_metrics_log_resume_keeps_records_up_to_the_checkpoint(tmp_path):
    storage = Storage(str(tmp_path))
    storage.write_bytes("m.jsonl", "".join(json.dumps({"kind": k, "step": s}) + "\n"
                                           for k, s in [("step", 1), ("step", 2), ("val", 2),
                                                        ("step", 3)]).encode())
    log = MetricsLog(storage, "m.jsonl", keep_through=2)
    lines = storage.read_bytes("m.jsonl").decode().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 2]
    log.step({"kind": "step", "step": 3}, {"loss": torch.tensor(0.5)})
    log.flush()
    lines = [json.loads(x) for x in storage.read_bytes("m.jsonl").decode().splitlines()]
    assert lines[-1] == {"kind": "step", "step": 3, "loss": 0.5} and len(lines) == 4


@pytest.mark.parametrize("cache", ["none", "host"])
def test_resume_from_a_mid_epoch_checkpoint_ends_with_the_uninterrupted_weights(storage, tmp_path,
                                                                                 cache):
    # masking: RNG per step
    kw = {"converter": "perceiver_small", "converter_kwargs": small_kwargs("perceiver_small"),
          "epochs": 3, "checkpoint_every_steps": 4, "cache": cache,
          "deficiency": {"mask_ratio": 0.25}}
    full, root = _run(storage, tmp_path, "full", **kw)
    resumed_root = tmp_path / "again"
    resumed_root.mkdir()
    # epoch 1, position 1
    shutil.copytree(os.path.join(root, "step-00000004"), resumed_root / "step-00000004")
    shutil.copy(storage.path("runs/loop/train/full/metrics.jsonl"), tmp_path / "m.jsonl")
    storage.fs.makedirs(storage.path("runs/loop/train/again"), exist_ok=True)
    shutil.copy(tmp_path / "m.jsonl", storage.path("runs/loop/train/again/metrics.jsonl"))
    again, _ = _run(storage, tmp_path, "again", **kw)
    a = load_state(os.path.join(root, "step-00000009"))
    b = load_state(str(resumed_root / "step-00000009"))
    assert b["progress"]["resumed_from_step"] == 4 and b["progress"]["step"] == 9
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    # no step twice
    assert [r["step"] for r in again if r["kind"] == "step"] == list(range(1, 10))
    assert [r["loss"] for r in again if r["kind"] == "step"] == \
        [r["loss"] for r in full if r["kind"] == "step"]
    # the resumed run counts the clips of its own steps and of the restored ones, not twice
    assert a["progress"]["clips"] == b["progress"]["clips"] == 18


def test_early_stopping_on_the_validation_metric(storage, tmp_path):
    # no improvement can count: stop at the third validation
    records, root = _run(storage, tmp_path, "early", epochs=8, val_every_steps=2,
                         early_stopping_patience=2, early_stopping_min_delta=10.0)
    vals = [r["step"] for r in records if r["kind"] == "val"]
    assert vals == [2, 3, 4]
    last = load_state(os.path.join(root, max(os.listdir(root))))["progress"]
    assert last["finished"] and last["step"] == 4 and last["best_step"] == 2
