"""Extract stage: stage pieces on plain batches (no cluster), then the pipeline on a real local Ray
cluster with real sample and broken videos (integration): failed manifest, counts, resume, re-runs."""
from __future__ import annotations

import re
import shutil
import time

import numpy as np
import pytest
import torch

from pipeline.config import ExtractConfig, JobConfig, ModelsConfig
from pipeline.extract import (
    CallTimes,
    ModelActor,
    ShardWriter,
    check_complete,
    model_specs,
    plan,
    plan_resources,
    window_rate,
)
from pipeline.featurestore import FeatureStore
from pipeline.storage import Storage

TINY = ModelsConfig(weights="tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def actor():
    return ModelActor(models=TINY.model_dump(), out_dtype="float16")


def test_model_actor_outputs_match_feature_extractor(actor, tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (2, 32, 64, 80, 3), dtype=np.uint8)
    batch = {"video_id": np.array(["a", "b"]), "clip_index": np.array([0, 1]), "label_index": np.array([2, -1]),
             "split": np.array(["train", "val"]), "frames": frames}
    table = actor(batch)
    assert table.column("video_id").to_pylist() == ["a", "b"] and table.column("clip_index").to_pylist() == [0, 1]

    ref = actor.fx(torch.from_numpy(frames))  # the backbones called directly
    # two calls at once on two threads (as Ray runs them with actor_concurrency > 1): each thread's
    # staging buffers are its own, and results never alias them (the table above stays intact)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        one, two = pool.map(actor.features, (frames[:1], frames[1:]))
    for i, res in enumerate((one, two)):
        for name in ref:
            torch.testing.assert_close(res[name].float(), ref[name][i:i + 1].to(torch.float16).float(),
                                       atol=2e-2, rtol=1e-2)
    store = FeatureStore(Storage(str(tmp_path)), "f")
    specs = model_specs(TINY)
    store.write_meta(specs=specs, dtype="float16", class_names=["x", "y", "z"])
    got = store.to_torch(table)
    for name, spec in specs.items():
        assert got[name].shape == (2, spec.tokens, spec.dim) and got[name].dtype == torch.float16
        assert torch.equal(got[name], ref[name].to(torch.float16))
    # the upstream channel sums are carried as raw float64 and match the features
    info = ShardWriter(store=store)(table)
    assert info["rows"].tolist() == [2] and info["videos"].tolist() == [1 + 1]
    rec = store.commits()[0]
    s = rec["sums"]["train"]["student"]
    want = ref["student"][0].to(torch.float16).double()
    np.testing.assert_allclose(s["sum"], want.sum(0).numpy(), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(s["sumsq"], want.square().sum(0).numpy(), rtol=1e-5, atol=1e-3)
    assert s["n"] == specs["student"].tokens
    import pyarrow.parquet as pq
    cols = pq.read_schema(store.shard_paths()[0]).names
    assert cols == ["video_id", "clip_index", "label_index", "split", *specs]  # sums live in the commit record
    assert store.done_clips() == {"a": {0}, "b": {1}}


def test_a_short_batch_padded_to_the_compiled_shape_gives_the_same_features(tmp_path):
    """With compiled models a short last batch is padded up to the warm-up batch (one shape, no recompile):
    the padded rows are computed and dropped, the real rows come out as an unpadded call gives them."""
    actor = ModelActor(models=TINY.model_dump(), out_dtype="float16")
    frames = np.random.default_rng(1).integers(0, 256, (3, 32, 64, 80, 3), dtype=np.uint8)
    plain = actor.features(frames[:2])
    actor.pad_to = 3
    actor.features(frames)  # fills the staging buffer: the padding row of the next call holds these stale frames
    padded = actor.features(frames[:2])
    assert actor._input_buffer((3, 32, 64, 80, 3)).shape[0] == 3
    assert plain.keys() == padded.keys()
    for k in plain:
        assert padded[k].shape == plain[k].shape and padded[k].shape[0] == 2, k
        # within one float16 step (rtol 1e-3): the batch size changes the float32 summation order of the
        # matmuls (the patch embedding is one), which can move a value across a float16 rounding boundary
        torch.testing.assert_close(padded[k], plain[k], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("cpus, gpus, max_node_gpus, decoders", [
    (16, 1, 1, 15),   # one H200 on 16 cores: every CPU but the actor's decodes
    (32, 2, 2, 27),   # two actors on one 32-core node: 1.5 CPUs each kept for their host work and Ray's
    (32, 2, 1, 30),   # two one-GPU nodes of 16 cores: nothing kept
    (0, 0, 0, 1),     # never fewer than one decoder
])
def test_decoders_fill_the_cpus_left_after_actors_and_a_spare_per_shared_node(cpus, gpus, max_node_gpus, decoders):
    res = plan_resources(ExtractConfig(), cpus=cpus, gpus=gpus, max_node_gpus=max_node_gpus, use_gpu=gpus > 0)
    assert res["decoders"] == decoders and res["model_actors"] == max(1, gpus) and res["writers"] == 2 * max(1, gpus)
    explicit = ExtractConfig(decoders=5, write_in_actor=True)
    assert plan_resources(explicit, cpus=32, gpus=2, max_node_gpus=2, use_gpu=True) | {"cluster_cpus": 0} == {
        "use_gpu": True, "model_actors": 2, "decoders": 5, "writers": 0, "cluster_cpus": 0, "cluster_gpus": 2}


def test_window_rate_ignores_start_up_and_the_end_burst():
    # 10 s of start-up, then 10 clips/s, then the last 40 clips flushed within 0.1 s
    commits = [(10.0 + i, 10 * (i + 1)) for i in range(16)] + [(25.1, 200)]
    # 20% = 40 clips (t 13), 90% = 180 clips: first reached by the burst commit (200 at t 25.1)
    assert window_rate(commits) == pytest.approx((200 - 40) / (25.1 - 13.0), abs=1e-3)
    assert window_rate(commits, hi=0.8) == pytest.approx(10.0)  # 40 -> 160 clips over 13 -> 25 s
    assert window_rate([(5.0, 64)]) is None and window_rate([]) is None


def test_model_actor_says_where_its_start_up_went_only_when_logging(capsys):
    ModelActor(models=TINY.model_dump(), out_dtype="float16")
    assert "[model actor] ready" not in capsys.readouterr().out
    ModelActor(models=TINY.model_dump(), out_dtype="float16", log_every=16)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    total, imports, models, warmup = (float(x) for x in re.findall(r"(\d+\.\d) s", line))
    assert line.startswith("[model actor] ready in ") and ": imports " in line and ", warm-up " in line
    assert total == pytest.approx(imports + models + warmup, abs=0.16)  # each rounded to 0.1 s


def test_call_times_add_up_and_print_every_n_calls(capsys):
    times = CallTimes(every=2, concurrency=2)
    t0 = time.perf_counter() - 1.0  # each call below started 1 s ago
    for _ in range(3):
        times.add(32, t0, stage=0.1, gpu=0.6, table=0.05)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[model actor]")]
    assert len(lines) == 1 and lines[0].startswith("[model actor] 2 calls, 64 clips in ")
    assert times.calls == 3 and times.clips == 96
    assert times.sums["stage"] == pytest.approx(0.3) and times.sums["gpu"] == pytest.approx(1.8)
    # three ~1-s calls (each started at t0), read 2 s after the first began, on 2 threads:
    # busy = 3 s / (2 s x 2) = 0.75, 96 clips / 2 s = 48 clips/s
    summary = times.summary(now=t0 + 2.0)
    assert summary.startswith("3 calls, 96 clips in 2.0 s (48.0 clips/s); ")
    assert "ms per call: stage 100, gpu 600, table 50, write 0, call 10" in summary
    assert float(summary.rsplit("busy ", 1)[1]) == pytest.approx(0.75, abs=0.01)


def test_model_actor_records_its_call_times(actor):
    frames = np.zeros((2, 32, 64, 80, 3), np.uint8)
    before = actor.times.calls
    actor({"video_id": np.array(["a", "b"]), "clip_index": np.array([0, 1]), "label_index": np.array([0, 0]),
           "split": np.array(["train", "train"]), "frames": frames})
    assert actor.times.calls == before + 1
    assert all(actor.times.sums[k] > 0 for k in ("stage", "gpu", "table", "call"))
    assert actor.times.sums["write"] == 0  # no store: the table goes to the writer actors
    assert actor.times.sums["call"] >= actor.times.sums["gpu"]


def test_plan_and_completeness(tmp_path):
    store = FeatureStore(Storage(str(tmp_path)), "f")
    spec = {"student": model_specs(TINY)["vivit"]}
    store.write_meta(specs=spec, dtype="float16", class_names=[])
    rec = lambda v: {"video_id": v, "path": f"/{v}.mp4", "label": None, "label_index": -1, "split": "train"}
    records = [rec(v) for v in ("done", "half", "bad", "new")]
    store.write_shard({"video_id": ["done", "done", "half"], "clip_index": [0, 1, 1], "label_index": [-1] * 3,
                       "split": ["train"] * 3, "student": np.zeros((3, 1, 48), np.float16)})
    store.record_failure(records[2], "corrupt")
    p = plan(records, store, clips_per_video=2, retry_failed=False)
    assert p["done"] == ["done"] and p["skipped_failed"] == ["bad"]
    assert [(r["video_id"], r["clip_indices"]) for r in p["pending"]] == [("half", [0]), ("new", [0, 1])]
    p = plan(records, store, clips_per_video=2, retry_failed=True)
    assert [r["video_id"] for r in p["pending"]] == ["half", "bad", "new"] and p["retried"] == ["bad"]
    c = check_complete(records, store, 2)
    assert (c["processed"], c["failed"], c["ok"], c["missing"]) == (1, 1, False, ["half", "new"])
    # records read once and handed in (run_extract reads the commit log once before and once after a
    # run) give the same answers; a stale snapshot is what the caller asked for
    commits = store.commits()
    assert plan(records, store, clips_per_video=2, retry_failed=False, commits=commits) == \
        plan(records, store, clips_per_video=2, retry_failed=False)
    assert check_complete(records, store, 2, commits=commits, failed=store.failed()) == c
    assert check_complete(records, store, 2, commits=[], failed={})["missing"] == ["bad", "done", "half", "new"]


# ------------------------------------------------------------------------------ integration (Ray)

BAD = ("truncated", "random_bytes", "empty", "too_short", "audio_only")


def _job(videos, storage_url, **extract) -> JobConfig:
    return JobConfig.model_validate({
        "name": "extract-test", "storage": {"url": storage_url},
        "sources": {"uri": str(videos), "val_fraction": 0.34},
        # short_side 128: cheaper decode; the actor resizes each model's input on the device anyway
        "decode": {"window": 32, "stride": 2, "clips_per_video": 2, "short_side": 128, "short_video": "fail"},
        "models": TINY.model_dump(),
        "extract": {"batch_size": 2, "shard_clips": 2, "model_actors": 1, "cpus_per_actor": 1,
                    "gpus_per_actor": 0, **extract},
    })


def _stored_pairs(store: FeatureStore) -> list[tuple[str, int]]:
    """Every (video_id, clip_index) in every Parquet file under shards/ (committed or not)."""
    import pyarrow.parquet as pq
    pairs = []
    for name in store.storage.ls("shards"):
        if name.endswith(".parquet"):
            t = pq.read_table(store.storage.path("shards", name), columns=["video_id", "clip_index"])
            pairs += zip(t.column("video_id").to_pylist(), t.column("clip_index").to_pylist())
    return pairs


@pytest.mark.integration
def test_extract_failures_resume_and_new_videos(ray_cluster, tmp_path, sample_files, bad_videos):
    """Two runs (pipeline start-up dominates on 2 cores): a full run with broken videos, then a
    crash is simulated and a video added; the re-run redoes exactly what was lost plus the new video."""
    from pipeline.extract import run_extract
    from pipeline.sources import list_videos
    videos = tmp_path / "videos"
    for label, name in (("phone", "carphone_pristine.mp4"), ("outdoor", "bikes.mp4")):
        (videos / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(sample_files[name], videos / label / name)
    (videos / "broken").mkdir()
    for name in BAD:
        shutil.copy(bad_videos[name], videos / "broken" / f"{name}{bad_videos[name].suffix}")
    storage = Storage(str(tmp_path / "store"))
    job = _job(videos, storage.root_url)
    store = FeatureStore(storage, job.store)
    good_ids = {r["video_id"] for r in list_videos(job.sources) if r["label"] != "broken"}

    # 1) every listed video ends up processed or failed (with a reason), each clip stored once
    s1 = run_extract(job, storage)
    assert (s1["listed"], s1["processed"], s1["failed"], s1["invariant_ok"]) == (7, 2, 5, True)
    assert (s1["videos_this_run"], s1["clips"], s1["new_failures"]) == (7, 4, 5)
    failed = store.failed()
    assert {f["path"].rsplit("/", 1)[1].split(".")[0] for f in failed.values()} == set(BAD)
    assert all(f["reason"] for f in failed.values())
    assert "too short" in next(f for f in failed.values() if "too_short" in f["path"])["reason"]
    assert sorted(_stored_pairs(store)) == sorted((v, c) for v in good_ids for c in (0, 1))
    meta, stats = store.read_meta(), store.stats()
    assert meta["tensors"]["student"] == {"shape": [2048, 64], "dtype": "float16"}
    assert meta["class_names"] == ["broken", "outdoor", "phone"]
    assert stats["timesformer"]["std"].shape == (48,) and (stats["timesformer"]["std"] > 0).all()

    # 2) simulate a crash: one shard moved into place but never committed, one half-written tmp
    #    shard; and a new video arrives. The re-run redoes exactly the lost clips and the new video.
    rec = store.commits()[0]
    lost = {tuple(p) for p in rec["clips"]}
    store.storage.fs.rm(store.storage.path("commits", f"{rec['shard']}.json"))
    store.storage.write_bytes("shards/_tmp/crashed.parquet", b"half a shard")
    assert sum(len(c) for c in store.done_clips().values()) == 4 - len(lost)
    shutil.copy(sample_files["carphone_distorted.mp4"], videos / "phone" / "carphone_distorted.mp4")
    s2 = run_extract(job, storage)
    assert s2["orphans_removed"] == 2 and s2["invariant_ok"]
    assert (s2["listed"], s2["processed"], s2["failed"]) == (8, 3, 5)
    assert s2["clips"] == len(lost) + 2 and s2["new_failures"] == 0 and s2["skipped_failed"] == 5
    assert s2["videos_this_run"] == len({v for v, _ in lost}) + 1  # failed videos are not retried
    new_id = (set(store.done_clips()) - good_ids).pop()
    pairs = _stored_pairs(store)
    assert len(pairs) == len(set(pairs)) == 6
    assert set(pairs) == {(v, c) for v in good_ids | {new_id} for c in (0, 1)}

    # readers: plain pyarrow iterator and Ray Data over committed shards, by split
    split_of = {r["video_id"]: r["split"] for r in list_videos(job.sources)}
    want = {sp: 2 * sum(split_of[v] == sp for v in good_ids | {new_id}) for sp in ("train", "val")}
    for sp in ("train", "val"):
        got = list(store.iter_torch(split=sp, batch_size=4))
        assert sum(len(b["video_id"]) for b in got) == want[sp]
        assert all(set(b["split"]) == {sp} for b in got)
    sp = max(want, key=want.get)
    batches = list(store.read_dataset(split=sp).iter_batches(batch_size=8, batch_format="pyarrow"))
    got = [store.to_torch(b) for b in batches]
    assert sum(len(b["video_id"]) for b in got) == want[sp]
    assert got[0]["student"].shape[1:] == (2048, 64) and set(got[0]["split"]) == {sp}
    assert got[0]["student"].dtype == torch.float16 and torch.isfinite(got[0]["student"].float()).all()


def test_extract_with_shards_written_in_the_model_actor(ray_cluster, tmp_path, sample_files, bad_videos):
    """extract.write_in_actor: one committed shard per model batch, no writer actors; failures, counts,
    statistics and a resume after a lost commit behave as with writer actors."""
    from pipeline.extract import build_pipeline, run_extract
    from pipeline.sources import list_videos
    videos = tmp_path / "videos"
    (videos / "ok").mkdir(parents=True)
    for name in ("carphone_pristine.mp4", "bikes.mp4", "carphone_distorted.mp4"):
        shutil.copy(sample_files[name], videos / "ok" / name)
    (videos / "bad").mkdir()
    shutil.copy(bad_videos["truncated"], videos / "bad" / f"truncated{bad_videos['truncated'].suffix}")
    storage = Storage(str(tmp_path / "store"))
    job = _job(videos, storage.root_url, batch_size=4, write_in_actor=True)
    store = FeatureStore(storage, job.store)
    ops = str(build_pipeline(job, store, [{"video_id": "v", "path": "/none", "label_index": 0, "split": "train"}],
                             {"use_gpu": False, "model_actors": 1, "decoders": 1, "writers": 0}))
    assert "ModelActor" in ops and "ShardWriter" not in ops
    s = run_extract(job, storage)
    assert (s["listed"], s["processed"], s["failed"], s["invariant_ok"]) == (4, 3, 1, True)
    assert s["resources_writers"] == 0 and s["clips"] == 6
    assert all(c["rows"] <= 4 for c in store.commits())  # one shard per model batch (shard_clips unused)
    good = {r["video_id"] for r in list_videos(job.sources) if r["label"] == "ok"}
    assert sorted(_stored_pairs(store)) == sorted((v, c) for v in good for c in (0, 1))
    assert store.stats()["student"]["std"].shape == (64,)
    rec = store.commits()[0]  # lose one commit: the re-run redoes exactly those clips
    store.storage.fs.rm(store.storage.path("commits", f"{rec['shard']}.json"))
    s2 = run_extract(job, storage)
    assert s2["invariant_ok"] and s2["clips"] == rec["rows"] and s2["orphans_removed"] == 1
    pairs = _stored_pairs(store)
    assert len(pairs) == len(set(pairs)) == 6


def test_decode_tasks_fill_one_model_batch_and_keep_it_one_block(tmp_path):
    from pipeline.extract import build_pipeline, videos_per_decode_task
    assert videos_per_decode_task(_job(tmp_path, "x", batch_size=32)) == 16  # 2 clips per video
    assert videos_per_decode_task(_job(tmp_path, "x", batch_size=5)) == 1  # 2 does not divide 5
    assert videos_per_decode_task(_job(tmp_path, "x", batch_size=32, videos_per_decode_task=3)) == 3

    import ray.data
    job = _job(tmp_path, str(tmp_path / "store"), batch_size=32)
    store = FeatureStore(Storage(str(tmp_path / "store")), "f")
    before = ray.data.DataContext.get_current().target_max_block_size
    pending = [{"video_id": f"v{i}", "path": "/none", "label_index": 0, "split": "train"} for i in range(40)]
    res = {"use_gpu": False, "model_actors": 1, "decoders": 1, "writers": 1}
    ds = build_pipeline(job, store, pending, res)
    one_batch = 32 * 32 * 128 * 128 * 3  # 32 clips of 32 frames at 128x128
    assert ds.context.target_max_block_size >= one_batch  # a decode block of one batch is not split
    assert ray.data.DataContext.get_current().target_max_block_size == before  # the driver's is restored


def test_model_actor_reads_frames_from_a_read_only_view(actor):
    """Ray hands a whole-block batch as a read-only view of its object store: the actor copies from it."""
    frames = np.random.default_rng(2).integers(0, 256, (2, 32, 64, 80, 3), dtype=np.uint8)
    ref = actor.features(frames.copy())
    frames.setflags(write=False)
    got = actor.features(frames)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_extract_with_several_videos_per_decode_task(ray_cluster, tmp_path, sample_files, bad_videos):
    """Two videos per decode task (batch 4, 2 clips each), bad ones mixed in: every good clip stored
    once, every bad video failed with its reason, counts add up."""
    from pipeline.extract import run_extract, videos_per_decode_task
    from pipeline.sources import list_videos
    videos = tmp_path / "videos"
    (videos / "ok").mkdir(parents=True)
    for name in ("carphone_pristine.mp4", "bikes.mp4", "carphone_distorted.mp4"):
        shutil.copy(sample_files[name], videos / "ok" / name)
    (videos / "bad").mkdir()
    for name in ("truncated", "too_short"):
        shutil.copy(bad_videos[name], videos / "bad" / f"{name}{bad_videos[name].suffix}")
    storage = Storage(str(tmp_path / "store"))
    job = _job(videos, storage.root_url, batch_size=4, shard_clips=4)
    assert videos_per_decode_task(job) == 2
    s = run_extract(job, storage)
    assert (s["listed"], s["processed"], s["failed"], s["invariant_ok"]) == (5, 3, 2, True)
    store = FeatureStore(storage, job.store)
    good = {r["video_id"] for r in list_videos(job.sources) if r["label"] == "ok"}
    pairs = _stored_pairs(store)
    assert len(pairs) == len(set(pairs)) and set(pairs) == {(v, c) for v in good for c in (0, 1)}
    assert all(f["reason"] for f in store.failed().values()) and len(store.failed()) == 2


@pytest.mark.gpu
def test_cuda_actor_saves_its_compile_cache_and_the_next_actor_loads_it(tmp_path, capsys):
    cfg = ModelsConfig(weights="tiny", device="cuda", dtype="bfloat16", compile=["videomae"])
    cache = Storage(str(tmp_path / "compile-cache"))
    kw = {"models": cfg.model_dump(), "out_dtype": "float16", "warmup_shape": (2, 32, 64, 80, 3),
          "compile_cache": cache}
    ModelActor(**kw)
    assert "compile cache: no entry yet; compiling cold; saved " in capsys.readouterr().out
    assert len(cache.ls()) == 1 and cache.ls()[0].endswith(".bin")
    ModelActor(**kw)
    assert "compile cache: loaded " in capsys.readouterr().out
    assert len(cache.ls()) == 1  # loaded, so not written again


@pytest.mark.gpu
def test_cuda_actor_threads_share_the_gpu_and_match_one_call():
    """CUDA path: pinned staging, one stream per thread, a blocking event per call, a read-only input view,
    a short batch padded to the warm-up shape; six calls on three threads give what one call gives."""
    from concurrent.futures import ThreadPoolExecutor
    cfg = ModelsConfig(weights="tiny", device="cuda", dtype="bfloat16", compile=["videomae"])
    actor = ModelActor(models=cfg.model_dump(), out_dtype="float16", warmup_shape=(4, 32, 64, 80, 3), concurrency=3)
    assert actor.pad_to == 4
    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 64, 80, 3), dtype=np.uint8)
    ref = actor.features(frames.copy())
    frames.setflags(write=False)
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(actor.features, [frames] * 6))
    assert all(torch.equal(o[k], ref[k]) for o in outs for k in ref)
    short = actor.features(frames[:3])  # padded to 4 rows on the device, 3 rows back
    assert all(short[k].shape[0] == 3 for k in short)
    torch.testing.assert_close(short["student"].float(), ref["student"][:3].float(), atol=2e-2, rtol=1e-2)
