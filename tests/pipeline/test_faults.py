"""Processes killed mid-extraction, from outside (issue 20 item 3), on a real local Ray cluster with
tiny models and real videos: the model actor (its PID from Ray's actor table), a decode worker
once, and every decode worker that opens one video (PIDs of this cluster's workers holding the
video file open, from /proc). The job completes: every (video_id, clip_index) stored once, the
repeatedly killed video recorded as failed with the reason, processed + failed == listed.
Storage faults (S3 through a fault proxy) are in test_faults_storage.py."""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig
from pipeline.extract import DECODE_DEATHS, DecodeLedger, guard_decode
from pipeline.featurestore import FeatureStore
from pipeline.storage import Storage

TINY = {"weights": "tiny", "device": "cpu", "dtype": "float32"}


def extract_job(videos, storage_url: str, options: dict | None = None, **extract) -> JobConfig:
    """Two clips per video at short side 128, two videos per decode task (batch 4), one model
    actor and one decoder on the 2-CPU cluster, shards of 4 clips."""
    return JobConfig.model_validate({
        "name": "faults", "storage": {"url": storage_url, "options": options or {}},
        "sources": {"uri": str(videos), "val_fraction": 0.34},
        "decode": {"window": 32, "stride": 2, "clips_per_video": 2, "short_side": 128,
                   "short_video": "fail"},
        "models": TINY,
        "extract": {"batch_size": 4, "shard_clips": 4, "model_actors": 1, "cpus_per_actor": 1,
                    "gpus_per_actor": 0, **extract},
    })


def copy_videos(sample_files: dict[str, Path], dest: Path, copies: int = 2) -> dict[str, Path]:
    """``copies`` copies of each sample under ``dest/<label>/<stem>-<i>.mp4`` (different paths:
    different video ids); returns name -> path."""
    labels = {"bigbuckbunny.mp4": "animation", "bikes.mp4": "outdoor"}
    out = {}
    for name, src in sorted(sample_files.items()):
        for i in range(copies):
            p = dest / labels.get(name, "phone") / f"{Path(name).stem}-{i}.mp4"
            p.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, p)
            out[p.name] = p
    return out


def committed_pairs(store: FeatureStore) -> list[tuple[str, int]]:
    """Every (video_id, clip_index) in the shards that commit records name, read from the Parquet
    files themselves (each must exist and hold exactly its record's clips)."""
    pairs = []
    for rec in store.commits():
        with store.storage.fs.open(store.storage.path(rec["path"]), "rb") as f:
            t = pq.read_table(f, columns=["video_id", "clip_index"])
        got = list(zip(t.column("video_id").to_pylist(), t.column("clip_index").to_pylist()))
        assert sorted(got) == sorted(tuple(c) for c in rec["clips"]), rec["shard"]
        pairs += got
    return pairs


# ---------------------------------------------------------------- finding this cluster's processes

def _raylet_pid() -> int:
    import ray
    return ray._private.worker._global_node.all_processes["raylet"][0].process.pid


def _children(ppid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == ppid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def workers_with_open(path: Path) -> list[int]:
    """PIDs of this cluster's worker processes (children of its raylet) that hold ``path`` open:
    decord keeps a video open while it decodes it."""
    target, out = str(path.resolve()), []
    for pid in _children(_raylet_pid()):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target
                   for fd in os.listdir(f"/proc/{pid}/fd")):
                out.append(pid)
        except OSError:
            pass
    return out


def actors_of(class_part: str) -> list[dict]:
    """Live entries of Ray's actor table whose class name contains ``class_part`` (Ray Data names
    pool actors ``MapWorker(MapBatches(<UDF>))``); the state API would need the dashboard."""
    import ray
    return [a for a in ray._private.state.actors().values()
            if class_part in a["ActorClassName"] and a["State"] == "ALIVE"]


def gone(pid: int, timeout: float = 30.0) -> bool:
    """The process has exited (reaped, or a zombie) within ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------- unit: the decode guard

@pytest.mark.integration
def test_decode_guard_charges_deaths_to_the_video_being_decoded(ray_cluster):
    """The guard called in this process with a real ledger actor; a decode that raises SystemExit
    stands for the SIGKILL (nothing after it runs in the task). A clean batch is decoded in one
    call; after a death every video of the batch is charged once, the re-runs go video by video,
    and a video charged DECODE_DEATHS times is recorded failed and yields no rows while its
    neighbour is decoded."""
    calls, failed = [], {}

    def decode(batch):
        vids = [str(v) for v in batch["video_id"]]
        calls.append(vids)
        if any(v.startswith("poison") for v in vids):
            raise SystemExit("worker died")
        return {"video_id": np.repeat(np.array(vids), 2),
                "clip_index": np.tile([0, 1], len(vids)),
                "frames": np.zeros((2 * len(vids), 1), np.uint8)}

    ledger = ray_cluster.remote(num_cpus=0)(DecodeLedger).remote()
    guarded = guard_decode(decode, ledger, lambda r, why: failed.update({r["video_id"]: why}))
    batch = {"video_id": np.array(["ok", "poison"]), "path": np.array(["a", "b"])}
    for _ in range(DECODE_DEATHS):
        with pytest.raises(SystemExit):
            guarded(batch)
    out = guarded(batch)
    # first attempt: one call for the batch; then one video at a time
    assert calls == [["ok", "poison"]] + [["ok"], ["poison"]] * (DECODE_DEATHS - 1) + [["ok"]]
    assert list(out["video_id"]) == ["ok", "ok"] and list(out["clip_index"]) == [0, 1]
    assert list(failed) == ["poison"] and f"died {DECODE_DEATHS} times" in failed["poison"]
    # a batch whose only video fails: decode's own typed 0-row output
    alone = {"video_id": np.array(["poison2"]), "path": np.array(["e"])}
    for _ in range(DECODE_DEATHS):
        with pytest.raises(SystemExit):
            guarded(alone)
    calls.clear()
    empty = guarded(alone)
    assert calls == [[]] and len(empty["frames"]) == 0 and "poison2" in failed
    clean = guarded({"video_id": np.array(["x", "y"]), "path": np.array(["c", "d"])})
    assert calls[-1] == ["x", "y"] and list(clean["video_id"]) == ["x", "x", "y", "y"]
    # every attempt that finished was cleared: a fresh batch with "ok" is clean again
    assert ray_cluster.get(ledger.begin.remote(["ok", "x"], True)) == [0, 0]


# ---------------------------------------------------------------- integration: kills mid-run

class Chaos(threading.Thread):
    """Polls every 20 ms until stopped: SIGKILLs the model actor once, after the first shard is
    committed; the first decode worker seen holding ``once`` open, once; every decode worker seen
    holding ``poison`` open (DECODE_DEATHS + 1 times at most). ``kills`` lists (what, pid)."""

    def __init__(self, store: FeatureStore, *, once: Path, poison: Path):
        super().__init__(daemon=True)
        self.store, self.once, self.poison = store, once, poison
        self.kills: list[tuple[str, int]] = []
        self.actor_restarts = 0  # NumRestarts of the killed model actor, as last seen
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def _kill(self, what: str, pid: int) -> None:
        if pid not in {p for _, p in self.kills}:
            os.kill(pid, signal.SIGKILL)
            self.kills.append((what, pid))

    def run(self) -> None:
        import ray
        commits = self.store.storage.path("commits")
        try:
            while not self.stop.is_set():
                done = {w for w, _ in self.kills}
                if "model actor" not in done and os.path.isdir(commits) and os.listdir(commits):
                    for a in actors_of("ModelActor")[:1]:
                        self._kill("model actor", a["Pid"])
                        self.actor_id = a["ActorID"]
                elif "model actor" in done:
                    entry = ray._private.state.actors(self.actor_id)
                    self.actor_restarts = max(self.actor_restarts, entry.get("NumRestarts", 0))
                if "decode once" not in done:
                    for pid in workers_with_open(self.once)[:1]:
                        self._kill("decode once", pid)
                # one more than the product allows: a product that re-runs it forever fails here
                # (the video gets stored) instead of at the timeout
                if [w for w, _ in self.kills].count("decode poison") <= DECODE_DEATHS:
                    for pid in workers_with_open(self.poison)[:1]:
                        self._kill("decode poison", pid)
                time.sleep(0.02)
        except BaseException as e:  # noqa: BLE001  (handed to the test)
            self.error = e


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_model_actor_and_decode_workers_killed_mid_extraction(ray_cluster, tmp_path,
                                                              sample_files):
    """8 videos (2 copies of each sample), one run: the model actor is SIGKILLed after the first
    commit (Ray restarts it and re-runs its batch), one decode worker is killed while decoding
    bikes-1 (its task re-runs), and every worker that opens bigbuckbunny-0 is killed. The job
    completes: 7 videos stored with each clip exactly once, bigbuckbunny-0 failed after exactly
    DECODE_DEATHS deaths with that reason (its batch neighbour stored), 7 + 1 == 8 listed."""
    from pipeline.extract import run_extract
    from pipeline.sources import list_videos
    videos = copy_videos(sample_files, tmp_path / "videos")
    storage = Storage(str(tmp_path / "store"))
    job = extract_job(tmp_path / "videos", storage.root_url)
    store = FeatureStore(storage, job.store)
    records = list_videos(job.sources)
    ids = {Path(r["path"]).name: r["video_id"] for r in records}
    poison, once = videos["bigbuckbunny-0.mp4"], videos["bikes-1.mp4"]
    order = [Path(r["path"]).name for r in records]  # two videos per decode task, in this order
    i = order.index(poison.name)
    neighbour = order[i + 1 if i % 2 == 0 else i - 1]

    chaos = Chaos(store, once=once, poison=poison)
    chaos.start()
    try:
        s = run_extract(job, storage)
    finally:
        chaos.stop.set()
        chaos.join()
    assert chaos.error is None, chaos.error
    kinds = [w for w, _ in chaos.kills]
    # every fault happened, each killed process is gone
    assert kinds.count("model actor") == 1 and kinds.count("decode once") == 1, chaos.kills
    assert kinds.count("decode poison") == DECODE_DEATHS, chaos.kills
    assert all(gone(pid) for _, pid in chaos.kills)
    assert chaos.actor_restarts >= 1  # Ray restarted the killed actor (same actor id)

    assert (s["listed"], s["processed"], s["failed"], s["invariant_ok"]) == (8, 7, 1, True), s
    assert s["duplicate_clips"] == 0 and store.duplicates() == {}
    failed = store.failed()
    assert list(failed) == [ids[poison.name]]
    assert failed[ids[poison.name]]["reason"].startswith(
        f"decode worker died {DECODE_DEATHS} times while decoding this video")
    pairs = committed_pairs(store)
    good = {ids[n] for n in videos if n != poison.name}
    assert len(pairs) == len(set(pairs)) == 14 and set(pairs) == {(v, c) for v in good
                                                                   for c in (0, 1)}
    assert {ids[neighbour], ids[once.name]} <= good
    # nothing else in shards/ but committed shards (a killed writer's _tmp files aside)
    names = {n for n in storage.ls("features/features/shards") if n.endswith(".parquet")}
    assert names == {f"{r['shard']}.parquet" for r in store.commits()}
