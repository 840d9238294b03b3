"""Storage faults during extraction (issue 20 item 3): the feature store on the real moto S3
endpoint behind the tests' fault proxy (tests/fault_proxy.py, 127.0.0.1), a real local Ray
cluster, tiny models, the four sample videos (two clips each, shards of two clips: four shards).

* the bucket removed, then the endpoint down, each right after a shard reached its final name:
  the stage fails in one line naming the store's s3:// URL and the cause; readers see committed
  shards only (the uncommitted one is ignored);
* then transient faults (500/503, connections reset after moto did the work, answers slower than
  the read timeout) on the store's writes and reads during the re-run: it completes through
  botocore's retries (``storage.options.config_kwargs``), every clip stored exactly once, the
  orphan removed.
One test, three runs of the stage (each run costs a model actor's start-up: CI time)."""
from __future__ import annotations

import contextlib
import gc
import os
import signal
import time

import pytest
from fault_proxy import FaultProxy, Rule
from test_faults import actors_of, committed_pairs, copy_videos, extract_job

from pipeline.__main__ import error_line
from pipeline.extract import run_extract
from pipeline.featurestore import FeatureStore
from pipeline.storage import Storage

pytestmark = pytest.mark.integration

# retries for a flaky store (botocore standard mode: 5xx, throttling, connection errors, with
# backoff); a read timeout below the proxy's delay, so a slow answer is retried too
RETRIES = {"retries": {"max_attempts": 8, "mode": "standard"}, "connect_timeout": 2,
           "read_timeout": 3}
# a store that is gone stays gone: few attempts, so the stage fails soon
FEW = {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 1,
       "read_timeout": 20}
# the move of a written shard to its final name (a CopyObject PUT), before its commit record
SHARD_IN_PLACE = r"^PUT [^?]*/features/features/shards/[0-9a-f]{24}\.parquet"


def _through(proxy: FaultProxy, s3_server, config_kwargs: dict) -> dict:
    return {**s3_server.storage_options, "endpoint_url": proxy.endpoint_url,
            "config_kwargs": config_kwargs}


def _direct(s3_server, bucket: str) -> FeatureStore:
    """The store as a reader sees it, straight from moto."""
    return FeatureStore(Storage(f"s3://{bucket}/p", s3_server.storage_options), "features")


def _parquets(store: FeatureStore) -> set[str]:
    store.storage.fs.invalidate_cache()
    return {n for n in store.storage.ls("shards") if n.endswith(".parquet")}


def _pipeline_actors_gone(timeout: float = 90.0) -> None:
    """No actor of the failed stage is left when the next run starts (a straggling writer must not
    write into the re-run). Ray Data drops a failed dataset's actors without killing them; a CLI
    job's driver exits on the failure, which ends them. This test's driver lives on, so it ends
    the ones still there after ``timeout`` the same way (SIGKILL, as the driver's exit does)."""
    deadline = time.time() + timeout
    while actors_of("MapBatches(") and time.time() < deadline:
        time.sleep(0.2)
    for a in actors_of("MapBatches("):
        with contextlib.suppress(ProcessLookupError):
            os.kill(a["Pid"], signal.SIGKILL)
    deadline = time.time() + 60
    while actors_of("MapBatches(") and time.time() < deadline:
        time.sleep(0.2)
    assert not actors_of("MapBatches("), actors_of("MapBatches(")


@pytest.fixture(scope="module")
def videos(tmp_path_factory, sample_files):
    root = tmp_path_factory.mktemp("fault_videos")
    copy_videos(sample_files, root, copies=1)
    return root


def _check_complete(s: dict, store: FeatureStore) -> None:
    """4 videos, each clip committed exactly once, nothing in shards/ but committed shards."""
    store.storage.fs.invalidate_cache()  # s3fs answers from its listings: read them anew
    assert (s["listed"], s["processed"], s["failed"], s["invariant_ok"]) == (4, 4, 0, True), s
    assert s["duplicate_clips"] == 0 and store.duplicates() == {}
    pairs = committed_pairs(store)
    assert len(pairs) == len(set(pairs)) == 8
    assert {c for _, c in pairs} == {0, 1} and len({v for v, _ in pairs}) == 4
    assert _parquets(store) == {f"{r['shard']}.parquet" for r in store.commits()}
    assert sum(len(b["video_id"]) for b in store.iter_torch(batch_size=3)) == 8


def _remove_bucket(s3_server, bucket: str) -> None:
    """Delete every object and the bucket, straight at moto (writers may add objects meanwhile:
    repeated until the bucket is gone)."""
    fs = s3_server.fs()
    for _ in range(20):
        try:
            fs.rm(bucket, recursive=True)
        except (FileNotFoundError, OSError):
            pass
        fs.invalidate_cache()
        if not fs.exists(bucket):
            return
    raise AssertionError(f"bucket {bucket} could not be removed")


def _failing_run(job, storage: Storage) -> str:
    """Run the stage, which must fail; its one-line error (``error_line``, as the CLI prints it),
    once the failed dataset's actors are gone."""
    try:
        run_extract(job, storage)
    except Exception as e:  # noqa: BLE001 -- any error: its line is checked
        line = error_line(e)
    else:
        raise AssertionError("the stage did not fail")
    gc.collect()  # the failed dataset's actors go with the last reference to it (a traceback)
    _pipeline_actors_gone()
    return line


@pytest.mark.timeout(480)
def test_storage_lost_mid_extraction_then_transient_faults_on_the_rerun(ray_cluster, s3_server,
                                                                        videos):
    """Run 1: the bucket is removed right after the first shard reached its final name; run 2
    (the bucket back, empty): the endpoint goes down right after the second shard did. Each fails
    in one line naming the store's s3:// URL and the cause; after run 2 readers see only committed
    shards (one is in place without its commit record: ignored). Run 3, the endpoint back but
    flaky (500, 503, resets after moto did the work, slow answers on the store's PUTs/copies and
    GETs/HEADs/DELETEs): the same job completes through retries, each of the 8 clips in exactly one
    committed shard, the orphan removed."""
    bucket = s3_server.make_bucket("fxd")
    url = f"s3://{bucket}/p/features/features"
    with FaultProxy(s3_server.endpoint_url, seed=10) as proxy:
        def job(config_kwargs: dict):
            storage = Storage(f"s3://{bucket}/p", _through(proxy, s3_server, config_kwargs))
            return extract_job(videos, storage.root_url, storage.options, shard_clips=2), storage

        proxy.on_answer(SHARD_IN_PLACE, 1, lambda: _remove_bucket(s3_server, bucket))
        line = _failing_run(*job(FEW))
        assert "\n" not in line and line.startswith(
            f"StorageNotFoundError: writing a shard to {url}: does not exist"), line
        assert not s3_server.fs().exists(bucket)

        s3_server.fs().mkdir(bucket)  # the bucket is back, empty
        proxy.down_after(SHARD_IN_PLACE, 2)
        line = _failing_run(*job(FEW))
        assert "\n" not in line and line.startswith(
            f"StorageError: writing a shard to {url}: endpoint unreachable"), line
        assert proxy.endpoint_url in line, line  # botocore's cause: the endpoint it could not reach
        store = _direct(s3_server, bucket)
        committed = {f"{r['shard']}.parquet" for r in store.commits()}
        orphans = _parquets(store) - committed
        assert orphans, "the second shard is in place without its commit record"
        seen = committed_pairs(store)  # each committed shard whole, with its record's clips
        assert {p.rsplit("/", 1)[1] for p in store.shard_paths()} == committed
        assert sum(len(b["video_id"]) for b in store.iter_torch(batch_size=3)) == len(seen)

        proxy.start()  # the endpoint is back, flaky
        proxy.add(Rule(r"^PUT [^?]*/features/", share=0.5, count=8, within_s=180, delay_s=4.0))
        proxy.add(Rule(r"^(GET|HEAD|DELETE|POST) [^?]*/features/", share=0.3, count=4,
                       within_s=180, kinds=("503", "reset", "500", "delay"), delay_s=4.0))
        s = run_extract(*job(RETRIES))
        faults = proxy.injected()
    assert {k for _, k, _, _ in faults} == {"500", "503", "reset", "delay"}, faults
    assert any("/shards/" in p for *_, p in faults), faults
    assert s["orphans_removed"] >= len(orphans), s
    whole = {v for v, _ in seen if {(v, 0), (v, 1)} <= set(seen)}
    assert s["skipped_done"] == len(whole) and s["clips"] == 8 - 2 * len(whole), s
    _check_complete(s, store)
