"""Scheduled incremental retraining end to end: the smoke job (`python -m pipeline run
jobs/smoke.yaml ...`) run again and again on one local store, with a real local Ray cluster, on
real sample videos listed in a manifest (its split column fixes the splits; adding rows is "new
videos arrived").

1. Two copies of the first run (CLI processes) start together: one does the work, the other
   exits 0 saying which lease is held by whom; the store has every clip once, the registry one
   version and a valid latest.json.
2. A video is added: the next run (``run_job``, what the CLI calls, in this process: one Ray
   cluster for runs 2-4) decodes only it, warm-starts from `latest`, evaluates the new model
   beside `latest` re-scored on the same split, and moves `latest` (the first run trained at lr
   1e-6, so the second one, trained normally, beats it by its whole training gain).
3. No new video, extract + train: warm-started from the new latest, the first step (before any
   update) has the loss of latest's weights: well below the first loss of a cold start on the
   same store, batch and seed (run 4's; run 2's, from run 1's practically untrained weights, is
   the same).
4. A cold start at lr 1e-6 (the seeded init again: a worse model) is published, not promoted,
   latest.json byte for byte unchanged, and the log line and summary give both values.
5. On a real S3 endpoint (moto): two copies of `--stages evaluate,export` start together on a
   tiny real store: one version, one latest; a lease left by a crashed run (expiry in the past)
   does not block the next run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_features import make_tiny_store, publish_checkpoint

from pipeline.__main__ import run_job
from pipeline.artifacts import ModelRegistry
from pipeline.config import load_job
from pipeline.featurestore import FeatureStore
from pipeline.storage import Storage

ROOT = Path(__file__).resolve().parents[2]
SMOKE = "jobs/smoke.yaml"
MODEL_FILES = {"model.safetensors", "config.json", "head.safetensors", "head.json", "metrics.json",
               "standardization.safetensors", "reference_io.safetensors", "README.md"}
pytestmark = pytest.mark.integration


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
           # Ray Train's controller polls its workers every 0.2 s instead of 2 s (conftest's habit)
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    out = open(log, "w")  # noqa: SIM115 -- the child writes it; closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", SMOKE, *args], cwd=ROOT,
                            env=env, stdout=out, stderr=subprocess.STDOUT)
    proc.log, proc.out = log, out
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.out.close()
    text = proc.log.read_text()
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}:\n{text[-6000:]}"
    return text


def _run(args: list[str], log: Path) -> str:
    return _finish(_start(args, log))


def _first_loss(storage: Storage, run_rel: str) -> float:
    lines = storage.read_bytes(f"{run_rel}/metrics.jsonl").decode().splitlines()
    steps = [json.loads(ln) for ln in lines if '"step"' in ln]
    first = min((r for r in steps if r["kind"] == "step"), key=lambda r: r["step"])
    assert first["step"] == 1
    return first["loss"]


def _same(a: dict, b: dict) -> bool:
    """Equal as JSON (one val clip makes mean_r2 NaN, and NaN != NaN as Python floats)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True)


def _versions(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir() if p.is_dir())


@pytest.mark.timeout(1200)
def test_scheduled_runs_are_incremental_warm_started_and_promote_only_when_better(
        sample_files, tmp_path, request, capsys):
    videos, root = tmp_path / "videos", tmp_path / "store"
    videos.mkdir()
    for new, src in [("v1.mp4", "carphone_pristine.mp4"), ("v2.mp4", "bikes.mp4"),
                     ("v3.mp4", "carphone_distorted.mp4"), ("v4.mp4", "bigbuckbunny.mp4")]:
        shutil.copy(sample_files[src], videos / new)
    manifest = videos / "videos.csv"
    manifest.write_text("path,label,split\nv1.mp4,a,train\nv2.mp4,b,train\nv3.mp4,a,val\n")
    common = [f"storage.url={root}", f"sources.manifest={manifest}", "decode.clips_per_video=1",
              "train.num_workers=1", "evaluate.report_html=false"]
    storage = Storage(str(root))
    store = FeatureStore(storage, "features")
    registry = ModelRegistry(storage, "tokconv-smoke")
    models = root / "models" / "tokconv-smoke"

    # 1. two copies of the same tick at once; the first model trained at lr 1e-6 (a weak latest)
    first = [*common, "train.epochs=1", "train.optim.lr=1e-6"]
    copies = [_start(first, tmp_path / f"run1-{i}.log") for i in range(2)]
    logs = [_finish(p) for p in copies]
    worked = [i for i, text in enumerate(logs) if "=== [1/4] extract ===" in text]
    assert len(worked) == 1, [text[-3000:] for text in logs]
    winner, loser = copies[worked[0]], copies[1 - worked[0]]
    skipped = storage.read_json("runs/smoke/skipped.json")
    assert f":{winner.pid}:" in skipped["holder"]  # the other copy held it: owner host:pid:id
    assert skipped["lease"] == storage.url("leases/job-smoke")
    assert f"[lease] {skipped['skipped']}" in logs[1 - worked[0]] and loser.returncode == 0
    assert "=== [1/" not in logs[1 - worked[0]]
    s1 = storage.read_json("runs/smoke/summary.json")["stages"]
    assert s1["extract"]["videos_this_run"] == 3 and s1["extract"]["clips"] == 3
    assert store.duplicates() == {} and s1["extract"]["store_clips"] == 3
    v1 = s1["export"]["version"]
    assert s1["export"]["promoted"] and _versions(models) == [v1]
    assert MODEL_FILES <= {p.name for p in (models / v1).iterdir()}  # a whole version
    assert registry.latest()["version"] == v1 and registry.load("latest").version == v1

    # 2. a new video: only it is decoded; warm start from v1; compared with v1 on the same split.
    # Runs 2 and 3 go through run_job (what the CLI calls) in this process, on one Ray cluster
    # started now: two cluster start-ups fewer
    request.getfixturevalue("ray_cluster")
    with manifest.open("a") as f:
        f.write("v4.mp4,b,train\n")
    capsys.readouterr()
    s2 = run_job(load_job(SMOKE, [*common, "train.epochs=3"]))
    out2 = capsys.readouterr().out
    assert _same(s2, storage.read_json("runs/smoke/summary.json")["stages"])
    ext = s2["extract"]
    assert (ext["videos_this_run"], ext["skipped_done"], ext["clips"]) == (1, 3, 1), ext
    assert (ext["processed"], ext["store_clips"], ext["duplicate_clips"]) == (4, 4, 0), ext
    assert store.duplicates() == {}
    assert s2["train"]["warm_start"] == v1 and s2["train"]["run_name"] == "smoke-001"
    run2 = storage.read_json("runs/smoke/train/smoke-001/run.json")
    assert run2["warm_start"] == v1
    m2 = storage.read_json("runs/smoke/eval/metrics.json")
    assert m2["latest"]["version"] == v1 and m2["latest"]["clips"] == m2["clips"] == 1
    ex2 = s2["export"]
    assert ex2["compared_on"] == "this evaluation's split"
    assert ex2["previous_value"] == pytest.approx(m2["latest"]["mean_cosine"])
    assert ex2["value"] > ex2["previous_value"] and ex2["promoted"], ex2
    v2 = ex2["version"]
    assert f"[export] tokconv-smoke/{v2}: mean_cosine={ex2['value']:.4f} promoted" in out2
    assert registry.latest()["version"] == v2 and _versions(models) == sorted([v1, v2])
    latest_bytes = (models / "latest.json").read_bytes()

    # 3. no new video, extract + train only: warm-started from v2 (lr 1e-6: its weights, barely
    # moved). Its first loss (v2's weights, before any update) is below run 2's first loss (v1's
    # weights: practically the seeded init) on the same store, batch and seed
    s3 = run_job(load_job(SMOKE, [*common, "train.epochs=1", "train.optim.lr=1e-6"]),
                 ["extract", "train"])
    capsys.readouterr()
    assert (s3["extract"]["videos_this_run"], s3["extract"]["clips"]) == (0, 0), s3["extract"]
    assert s3["extract"]["store_clips"] == 4 and store.duplicates() == {}
    assert s3["train"]["warm_start"] == v2 and s3["train"]["run_name"] == "smoke-002"
    loss2 = _first_loss(storage, "runs/smoke/train/smoke-001")
    loss3 = _first_loss(storage, "runs/smoke/train/smoke-002")
    assert loss3 < loss2 - 0.3, (loss2, loss3)

    # 4. a worse model: a cold start (train.warm_start=false) at lr 1e-6, i.e. the seeded init
    # (v1's weights, standardised with this store's stats, so not v1's score): published, NOT
    # promoted, latest.json byte for byte unchanged; the log line and summary give both values
    s4 = run_job(load_job(SMOKE, [*common, "train.epochs=1", "train.optim.lr=1e-6",
                                  "train.warm_start=false"]))
    out4 = capsys.readouterr().out
    assert s4["train"]["warm_start"] is None and s4["extract"]["videos_this_run"] == 0
    m4 = storage.read_json("runs/smoke/eval/metrics.json")
    assert m4["latest"]["version"] == v2 and m4["latest"]["clips"] == m4["clips"] == 1
    ex4 = s4["export"]
    assert ex4["previous"]["version"] == v2 and ex4["compared_on"] == "this evaluation's split"
    assert ex4["previous_value"] == pytest.approx(m4["latest"]["mean_cosine"])
    assert ex4["previous_value"] == pytest.approx(ex2["value"], abs=1e-4)  # v2, re-scored
    assert not ex4["promoted"] and ex4["value"] < ex4["previous_value"], ex4
    reason = (f"mean_cosine={ex4['value']:.4f} NOT promoted (latest {v2} has "
              f"mean_cosine={ex4['previous_value']} on this evaluation's split)")
    assert ex4["verdict"] == reason and f"[export] tokconv-smoke/{ex4['version']}: {reason}" in out4
    assert (models / "latest.json").read_bytes() == latest_bytes
    assert _versions(models) == sorted([v1, v2, ex4["version"]])
    assert MODEL_FILES <= {p.name for p in (models / ex4["version"]).iterdir()}
    assert registry.latest()["version"] == v2
    # run 4 is the cold start on run 3's store, batch and seed: its first loss is the init's
    cold4 = _first_loss(storage, "runs/smoke/train/smoke-003")
    assert cold4 == pytest.approx(loss2, abs=0.02) and loss3 < cold4 - 0.3, (cold4, loss2, loss3)
    # every lease was released at the end of each run
    for name in ("job-smoke", "store-features", "model-tokconv-smoke"):
        recs = sorted((root / "leases" / name).glob("*.json"))
        assert json.loads(recs[-1].read_text())["released"], name


def _s3_versions(storage: Storage) -> list[str]:
    storage.fs.invalidate_cache(storage.path("models/tokconv-smoke"))  # s3fs caches listings
    return [v for v in storage.ls("models/tokconv-smoke") if v != "latest.json"]


@pytest.mark.timeout(600)
def test_two_copies_on_s3_publish_one_version_and_a_crashed_runs_lease_lapses(s3_server,
                                                                              tmp_path):
    bucket = s3_server.make_bucket("sched")
    url = f"s3://{bucket}/root"
    opts = s3_server.storage_options
    flow = "{" + ", ".join(f"{k}: '{v}'" for k, v in opts.items()) + "}"
    args = ["--stages", "evaluate,export", f"storage.url={url}", f"storage.options={flow}",
            "evaluate.report_html=false"]
    storage = Storage(url, opts)
    make_tiny_store(storage)
    publish_checkpoint(storage, load_job(SMOKE, args[2:]))
    registry = ModelRegistry(storage, "tokconv-smoke")
    copies = [_start(args, tmp_path / f"copy{i}.log") for i in range(2)]
    logs = [_finish(p) for p in copies]
    worked = [i for i, text in enumerate(logs) if "=== [2/2] export ===" in text]
    assert len(worked) == 1, [text[-3000:] for text in logs]
    assert "[lease] skipped: lease " in logs[1 - worked[0]]
    skipped = storage.read_json("runs/smoke/skipped.json")
    assert f":{copies[worked[0]].pid}:" in skipped["holder"]
    versions = _s3_versions(storage)
    assert len(versions) == 1
    latest = registry.latest()
    assert latest["version"] == versions[0] and latest["uri"] == registry.url(versions[0])
    assert MODEL_FILES - {"head.safetensors", "head.json"} <= set(
        storage.ls(f"models/tokconv-smoke/{versions[0]}"))
    assert registry.load("latest").version == versions[0]

    # a crashed run's lease: the next epoch, never released, expired a minute ago
    rel = "leases/job-smoke"
    storage.fs.invalidate_cache(storage.path(rel))
    epoch = max(int(n[:8]) for n in storage.ls(rel) if n.endswith(".json")) + 1
    storage.write_json(f"{rel}/{epoch:08d}.json", {
        "owner": "crashed-pod:7:deadbeef", "job": "smoke", "epoch": epoch, "released": False,
        "expires": "2026-12-02T00:00:00Z", "expires_unix": time.time() - 60})
    out = _run(args, tmp_path / "after-crash.log")
    assert (f"[lease] took over {storage.url(rel)}: crashed-pod:7:deadbeef (job smoke) let "
            f"it expire at 2026-12-02T00:00:00Z") in out
    assert "=== [2/2] export ===" in out
    storage.fs.invalidate_cache(storage.path(rel))
    last = storage.read_json(f"{rel}/{epoch + 1:08d}.json")
    assert last["released"] and last["owner"] != "crashed-pod:7:deadbeef"
    assert len(_s3_versions(storage)) == 2 and versions[0] in _s3_versions(storage)
    assert registry.latest() == latest  # the same model again: a tie keeps latest
