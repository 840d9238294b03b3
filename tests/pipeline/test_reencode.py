"""Re-encoding a feature store into another codec: values within the codec's bound, statistics and
failed records carried over, idempotent (a second run changes no file), resumable after the
command's process is SIGKILLed from outside, and bad requests refused before any work."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from tiny_features import make_tiny_store

from pipeline import codecs
from pipeline.featurestore import FeatureStore
from pipeline.reencode import reencode
from pipeline.storage import Storage

REPO = Path(__file__).parents[2]


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def values(store: FeatureStore) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
    out = {}
    for b in store.iter_torch(batch_size=16):
        for i, (v, c) in enumerate(zip(b["video_id"], b["clip_index"].tolist())):
            out[(v, c)] = {k: b[k][i] for k in store.layouts()}
    return out


def cli(tmp_path: Path, *args: str) -> list[str]:
    job = tmp_path / "job.yaml"
    job.write_text(f"storage:\n  url: {tmp_path}\nstore: features\n")
    return [sys.executable, "-m", "pipeline", "reencode", str(job), *args]


ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize("codec", ["fp8", "fp8z"])
def test_reencode_converts_within_the_bound_and_a_second_run_changes_nothing(tmp_path, codec):
    """fp8, and fp8z (the same rows, zstd-compressed by the writer: fewer file bytes)."""
    storage = Storage(str(tmp_path))
    src = make_tiny_store(storage, n_train=12, n_val=4, shard_clips=4)
    src.record_failure({"video_id": "bad", "path": "/v/bad.mp4"}, "truncated")
    tgt = FeatureStore(storage, f"features-{codec}")
    first = reencode(src, tgt, codec, log=lambda _: None)
    assert (first["shards"], first["shards_written"], first["clips"]) == (4, 4, 16)
    # rows of 4*D scale bytes + N*D codes (vivit raw): 1344 instead of 2344 bytes per clip
    widths = sum(map(codecs.row_bytes, tgt.layouts().values()))
    assert widths == (64 + 512) + (48 + 216) + (48 + 432) + 24
    assert first["bytes_per_clip_after"] < 0.7 * first["bytes_per_clip_before"]
    assert tgt.read_meta()["codec"] == {"student": codec, "videomae": codec, "timesformer": codec,
                                        "vivit": "raw"}
    assert tgt.storage.read_json("stats.json") == src.storage.read_json("stats.json")
    assert tgt.done_clips() == src.done_clips() and set(tgt.failed()) == {"bad"}
    assert {r["shard"] for r in tgt.commits()} == {r["shard"] for r in src.commits()}
    assert tgt.specs() == src.specs()
    assert tgt.read_meta()["class_names"] == src.read_meta()["class_names"]
    want, got = values(src), values(tgt)
    assert got.keys() == want.keys()
    for key in want:
        for k, x in want[key].items():
            x, x_hat = x.double(), got[key][k].double()
            if k == "vivit":
                assert torch.equal(x_hat, x)
                continue
            b = 2**-4 * x.abs() + 2**-10 * x.abs().amax(0) / 448 + 2**-11 * x_hat.abs() + 2**-25
            assert bool(((x_hat - x).abs() <= b).all()), (key, k)

    before = snapshot(tmp_path / "features" / f"features-{codec}")
    second = reencode(src, tgt, codec, log=lambda _: None)
    assert (second["shards_written"], second["shards_skipped"]) == (0, 4)
    assert snapshot(tmp_path / "features" / f"features-{codec}") == before

    # shards extracted into the source since are converted by the next run
    make_tiny_store(storage, "more", n_train=2, n_val=0, seed=3)  # rows in the source's layout
    extra = next(FeatureStore(storage, "more").iter_torch(batch_size=2))
    src.write_shard({**extra, "video_id": ["new0", "new1"]})
    src.compute_stats()
    third = reencode(src, tgt, codec, log=lambda _: None)
    assert third["shards_written"] == 1 and tgt.num_clips() == 18
    assert tgt.storage.read_json("stats.json") == src.storage.read_json("stats.json")

    # and back to raw: exactly the fp8 values (decoded to the layout's float16)
    back = FeatureStore(storage, "features-back")
    reencode(tgt, back, "raw", log=lambda _: None)
    assert back.read_meta()["codec"]["student"] == "raw"
    again = values(back)
    for key, cols in values(tgt).items():
        for k, x in cols.items():
            assert torch.equal(again[key][k], x), (key, k)


@pytest.mark.parametrize("codec", ["int8", "fp8z"])
def test_reencode_resumes_after_a_kill_and_ends_as_an_uninterrupted_run(tmp_path, codec):
    storage = Storage(str(tmp_path))
    src = make_tiny_store(storage, n_train=90, n_val=30, shard_clips=1)
    commits = tmp_path / "features" / f"features-{codec}" / "commits"
    proc = subprocess.Popen(cli(tmp_path, "--codec", codec, "--workers", "1"), cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if commits.is_dir() and len(list(commits.glob("*.json"))) >= 8:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the conversion ended before the kill"
    killed_at = len(list(commits.glob("*.json")))
    assert 8 <= killed_at < 120

    rerun = subprocess.run(cli(tmp_path, "--codec", codec, "--workers", "2"), cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    out = rerun.stdout
    summary = json.loads(out[out.index("\n{") + 1:out.rindex("}") + 1])  # after the progress lines
    assert summary["shards_skipped"] >= killed_at
    assert summary["shards_written"] == 120 - summary["shards_skipped"]
    tgt = FeatureStore(storage, f"features-{codec}")
    assert len(tgt.commits()) == 120 and tgt.duplicates() == {} and tgt.cleanup() == []
    assert tgt.done_clips() == src.done_clips()
    assert tgt.storage.read_json("stats.json") == src.storage.read_json("stats.json")
    # the same shards, byte for byte in their tensor columns, as an uninterrupted conversion
    clean = FeatureStore(storage, "clean")
    reencode(src, clean, codec, log=lambda _: None)
    for rec in clean.commits():
        a = pq.read_table(clean.storage.path(rec["path"]))
        b = pq.read_table(tgt.storage.path(rec["path"]))
        assert a.equals(b), rec["shard"]
    assert codec in summary["target"] and summary["codec"]["vivit"] == "raw"


def test_reencode_refuses_bad_requests_before_any_work(tmp_path):
    storage = Storage(str(tmp_path))
    src = make_tiny_store(storage, n_train=4, n_val=0, shard_clips=4)
    with pytest.raises(ValueError, match="already holds codecs"):
        reencode(src, FeatureStore(storage, "same"), "raw", log=lambda _: None)
    with pytest.raises(ValueError, match="the target is the source store"):
        reencode(src, FeatureStore(storage, "features"), "fp8", log=lambda _: None)
    # a target already holding shards in another codec: never mixed
    raw = FeatureStore(storage, "other")
    reencode(src, FeatureStore(storage, "as-fp8"), "fp8", log=lambda _: None)
    reencode(FeatureStore(storage, "as-fp8"), raw, "raw", log=lambda _: None)
    with pytest.raises(ValueError, match="never mixed"):
        reencode(src, raw, "int8", log=lambda _: None)

    for args, msg in [
            (("--codec", "fp4"), "unknown feature codec 'fp4'; known codecs: raw, fp8, int8"),
            (("--codec", "{student: int8, default: fp8}"), "--to: name the target store"),
            (("--codec", "{vivit: fp8}", "--to", "x"), "'vivit': fp8 needs more than one token"),
            (("--codec", "fp8", "store=nothing"), "no feature store at")]:
        res = subprocess.run(cli(tmp_path, *args), cwd=REPO, env=ENV, capture_output=True,
                             text=True, timeout=300, check=False)
        assert res.returncode == 2 and msg in res.stderr, (args, res.stderr[-2000:])
    assert not (tmp_path / "features" / "features-fp4").exists()
    stores = sorted(p.name for p in (tmp_path / "features").iterdir())
    assert stores == ["as-fp8", "features", "other"]
    assert codecs.get_codec("int8").scaled
