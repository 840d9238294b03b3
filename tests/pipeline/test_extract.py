"""Extract stage: stage pieces on plain batches (no cluster), then the pipeline on a real local Ray
cluster with real sample and broken videos (integration): failed manifest, counts, resume, re-runs."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from pipeline.config import JobConfig, ModelsConfig
from pipeline.extract import ModelActor, ShardWriter, check_complete, model_specs, plan
from pipeline.featurestore import FeatureStore
from pipeline.storage import Storage

TINY = ModelsConfig(weights="tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def actor():
    return ModelActor(models=TINY.model_dump(), out_dtype="float16")


def test_model_actor_outputs_match_feature_extractor(actor, tmp_path):
    from pipeline.backbones import FeatureExtractor
    frames = np.random.default_rng(0).integers(0, 256, (2, 32, 64, 80, 3), dtype=np.uint8)
    batch = {"video_id": np.array(["a", "b"]), "clip_index": np.array([0, 1]), "label_index": np.array([2, -1]),
             "split": np.array(["train", "val"]), "frames": frames}
    table = actor(batch)
    assert table.column("video_id").to_pylist() == ["a", "b"] and table.column("clip_index").to_pylist() == [0, 1]

    ref = FeatureExtractor(TINY, device="cpu")(torch.from_numpy(frames))  # same seeds -> same weights
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


def test_plan_and_completeness(tmp_path):
    store = FeatureStore(Storage(str(tmp_path)), "f")
    spec = {"student": model_specs(TINY)["vivit"]}
    store.write_meta(specs=spec, dtype="float16", class_names=[])
    rec = lambda v: {"video_id": v, "path": f"/{v}.mp4", "label": None, "label_index": -1, "split": "train"}  # noqa
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
