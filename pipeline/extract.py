"""Extract stage: videos -> decode (CPU) -> four backbones (GPU actors) -> feature store shards.

A streaming Ray Data pipeline that reads top to bottom (cosmos-curate ``splitting_pipeline.py``)::

    from_items(video records)                 one block per decode task (one model batch of clips)
      .map_batches(decode fn, CPU tasks)      videos -> clips uint8 (window, S, S, 3); bad: failed/
      .map_batches(ModelActor, GPU actors)    clips -> raw-bytes Arrow table (+ float64 channel sum)
      .map_batches(ShardWriter, actor pool)   ~shard_clips rows -> one committed Parquet shard
    driver iterates the small commit rows     progress + summary

Each stage's UDF is built by a factory (``decode.make_decode_fn``) or is a callable class
(``model_actor.ModelActor``, ``model_actor.ShardWriter``) and works on a plain dict batch without
a cluster. This module holds the plan (what is left to do), the resource sizing, the dataset and
the run.

Resumable and idempotent: the driver first deletes orphaned shards (``FeatureStore.cleanup``),
then queues only videos whose clips are not all committed (``clip_indices`` = the missing ones).
Videos in the failed manifest are skipped unless ``extract.retry_failed``: a decode failure
(corrupt, truncated, too short, no video stream) is a property of the file, so re-trying every run
wastes decode time; fix the file or set the flag. Invariant, checked and reported at the end:
every listed video is either complete in the store or in the failed manifest.

Processes that die (SIGKILL, the OOM killer, a lost node): Ray Data restarts a dead model actor
or writer and re-runs the batches it held, and re-runs a dead decode task (its defaults:
``max_restarts=-1``, ``max_task_retries=-1``, ``max_retries=-1``; Ray 2.60 deprecates passing
them); a video whose decode worker died ``DECODE_DEATHS`` times while decoding it is recorded as
failed (``DecodeLedger``) instead of being re-run forever. A re-run batch gives the same shard
(content-addressed ids), never a second one.
"""
from __future__ import annotations

import time
from typing import Any

from pipeline.config import ExtractConfig, JobConfig, ModelsConfig
from pipeline.featurestore import FeatureStore
from pipeline.model_actor import ModelActor, ShardWriter
from pipeline.storage import Storage, storage_errors

# a video whose decode worker died this often while decoding it is recorded as failed
DECODE_DEATHS = 3

# ---------------------------------------------------------------------------------------- the plan

def model_specs(cfg: ModelsConfig) -> dict:
    """The token layouts the backbones will emit, from their configs only (no weights loaded)."""
    from pipeline import backbones as bb
    return {n: bb.layout_spec(n, c) for n, c in bb.model_configs(cfg).items()}


def plan(records: list[dict], store: FeatureStore, *, clips_per_video: int, retry_failed: bool,
         commits: list[dict] | None = None) -> dict:
    """Split listed videos into done / failed (skipped) / pending (with the clip indices still
    missing). ``commits``: the store's commit records if already read."""
    done, failed = store.done_clips(commits), store.failed()
    want = set(range(clips_per_video))
    out = {"done": [], "skipped_failed": [], "pending": [], "retried": []}
    for r in records:
        vid = r["video_id"]
        missing = sorted(want - done.get(vid, set()))
        if not missing:
            out["done"].append(vid)
        elif vid in failed and not retry_failed:
            out["skipped_failed"].append(vid)
        else:
            if vid in failed:
                out["retried"].append(vid)
            out["pending"].append({**r, "clip_indices": missing})
    return out


def check_complete(records: list[dict], store: FeatureStore, clips_per_video: int, *,
                   commits: list[dict] | None = None, failed: dict | None = None) -> dict:
    """processed + failed == listed: every listed video complete in the store or in the failed
    manifest. ``commits``/``failed``: the store's records if already read."""
    commits = store.commits() if commits is None else commits
    done, failed = store.done_clips(commits), store.failed() if failed is None else failed
    want = set(range(clips_per_video))
    ids = [r["video_id"] for r in records]
    complete = {v for v in ids if want <= done.get(v, set())}
    bad = {v for v in ids if v in failed and v not in complete}
    missing = sorted(set(ids) - complete - bad)
    dups = store.duplicates(commits)
    return {"listed": len(ids), "processed": len(complete), "failed": len(bad), "missing": missing,
            "duplicates": len(dups), "ok": len(complete) + len(bad) == len(ids) and not dups}


def _check_layout(store: FeatureStore, specs: dict, dtype: str, *, has_commits: bool) -> None:
    """A re-run must not mix layouts in one store (e.g. tiny and full models)."""
    if not store.storage.exists("meta.json"):
        return
    old = store.read_meta()
    want = {k: {"shape": [s.tokens, s.dim], "dtype": dtype} for k, s in specs.items()}
    if old.get("tensors") != want and has_commits:
        raise ValueError(f"feature store {store.storage.url()} holds layout {old.get('tensors')}, "
                         f"this job produces {want}: use another store name")


# ------------------------------------------------------------------------------------ the resources

def plan_resources(ec: ExtractConfig, *, cpus: int, gpus: float, max_node_gpus: float,
                   use_gpu: bool) -> dict[str, Any]:
    """Actor/decoder counts: one model actor per GPU, decoders on the CPUs left after the actors,
    the writers and, where one node holds several model actors, ``spare_cpus_per_actor`` each."""
    actors = ec.model_actors or (max(1, int(gpus // ec.gpus_per_actor)) if use_gpu else 1)
    writers = ec.writers or 2 * actors
    actors_per_node = min(actors, int(max_node_gpus // ec.gpus_per_actor)) if use_gpu else 1
    spare = ec.spare_cpus_per_actor * actors if actors_per_node > 1 else 0.0
    free = cpus - actors * ec.cpus_per_actor - writers * ec.cpus_per_writer - spare
    decoders = ec.decoders or max(1, int(free // ec.cpus_per_decoder))
    return {"use_gpu": use_gpu, "model_actors": actors, "decoders": decoders, "writers": writers,
            "cluster_cpus": cpus, "cluster_gpus": gpus}


def _resources(job: JobConfig) -> dict[str, Any]:
    """plan_resources for the running Ray cluster."""
    import ray
    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 1)), res.get("GPU", 0)
    node_gpus = [n["Resources"].get("GPU", 0) for n in ray.nodes() if n.get("Alive")]
    use_gpu = gpus > 0 and job.models.device != "cpu" and job.extract.gpus_per_actor > 0
    return plan_resources(job.extract, cpus=cpus, gpus=gpus,
                          max_node_gpus=max(node_gpus, default=0), use_gpu=use_gpu)


def videos_per_decode_task(job: JobConfig) -> int:
    """Videos per decode task: by default as many as fill one model batch exactly (see
    ExtractConfig)."""
    ec, cpv = job.extract, job.decode.clips_per_video
    if ec.videos_per_decode_task:
        return ec.videos_per_decode_task
    return ec.batch_size // cpv if ec.batch_size % cpv == 0 else 1


def _clip_bytes(job: JobConfig) -> int:
    d = job.decode
    return d.window * d.short_side * d.short_side * 3


def _decode_memory(job: JobConfig) -> int:
    """Bytes one decode task holds: a worker process (~650 MiB RSS measured with decord + numpy +
    torch loaded), the clips of its videos (uint8, stacked once), and one video's clips twice more
    in flight (decoded, cropped)."""
    cpv = job.decode.clips_per_video
    return 640 * 2**20 + (videos_per_decode_task(job) + 2) * cpv * _clip_bytes(job)


def compile_cache_storage(job: JobConfig, storage: Storage) -> Storage | None:
    """``extract.compile_cache`` resolved: under the job's storage, or a URL / absolute path."""
    where = job.extract.compile_cache
    if not where:
        return None
    if "://" in where or where.startswith("/"):
        return Storage(where, job.storage.options)
    return storage.child(where)


# ---------------------------------------------------------------------------- decode worker deaths

class DecodeLedger:
    """A Ray actor (``num_cpus=0``, one per run): per video, decode attempts that never finished,
    i.e. whose worker died while decoding it. ``begin`` returns each video's count and counts this
    attempt (``only_if_clean``: only when none has one); ``end`` clears them."""

    def __init__(self):
        self.open: dict[str, int] = {}

    def begin(self, videos: list[str], only_if_clean: bool) -> list[int]:
        prior = [self.open.get(v, 0) for v in videos]
        if not (only_if_clean and any(prior)):
            for v in videos:
                self.open[v] = self.open.get(v, 0) + 1
        return prior

    def end(self, videos: list[str]) -> None:
        for v in videos:
            self.open.pop(v, None)


def guard_decode(decode, ledger, record_failure, *, max_deaths: int = DECODE_DEATHS):
    """``decode`` (``decode.make_decode_fn``'s batch fn) with its worker deaths counted per video in
    ``ledger`` (a ``DecodeLedger`` handle). A clean batch is decoded at once (one ledger call); a
    re-run one (a death while it ran) video by video, so the next death is charged to the video
    being decoded, and a video charged ``max_deaths`` times is recorded as failed, not decoded."""
    import numpy as np
    import ray

    def decode_batch(batch: dict) -> dict:
        videos = [str(v) for v in batch["video_id"]]
        if not any(ray.get(ledger.begin.remote(videos, True))):
            out = decode(batch)
            ledger.end.remote(videos)
            return out
        parts = []
        for i, vid in enumerate(videos):
            one = {k: v[i:i + 1] for k, v in batch.items()}
            [deaths] = ray.get(ledger.begin.remote([vid], False))
            if deaths >= max_deaths:
                record_failure({k: v[0].item() if isinstance(v[0], np.generic) else v[0]
                                for k, v in one.items()},
                               f"decode worker died {deaths} times while decoding this video "
                               f"(killed, out of memory or a crash in the decoder)")
            else:
                parts.append(decode(one))
            ledger.end.remote([vid])
        parts = [p for p in parts if len(p["frames"])]
        if len(parts) < 2:  # none (typed 0-row arrays, as decode gives them) or one
            return parts[0] if parts else decode({k: v[:0] for k, v in batch.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    return decode_batch


# -------------------------------------------------------------------------------------- the dataset

def build_pipeline(job: JobConfig, store: FeatureStore, pending: list[dict], res: dict, *,
                   compile_cache: Storage | None = None, ledger=None):
    """The Ray Data pipeline, top to bottom; returns a Dataset of commit rows. ``ledger``: a
    ``DecodeLedger`` handle (``run_extract`` makes one): decode worker deaths counted per video."""
    import ray.data

    from pipeline.decode import make_decode_fn

    ec, dc = job.extract, job.decode
    per_task = videos_per_decode_task(job)
    concurrency = ec.actor_concurrency if res["use_gpu"] else 1

    # source: the pending videos, one block per decode task. A block of one whole model batch must
    # stay one block (Ray splits blocks above target_max_block_size, 128 MiB by default; 32 clips
    # are 201 MB): the dataset keeps a copy of the context taken here, so the driver's own context
    # is restored right after
    ctx = ray.data.DataContext.get_current()
    default_block = ctx.target_max_block_size
    one_block = 2 * per_task * dc.clips_per_video * _clip_bytes(job)
    ctx.target_max_block_size = max(default_block or 0, one_block)
    try:
        ds = ray.data.from_items(pending, override_num_blocks=max(1, -(-len(pending) // per_task)))
    finally:
        ctx.target_max_block_size = default_block

    # 1. decode: CPU tasks, videos -> clips; a video that fails is recorded in failed/, no rows.
    # The memory request also keeps Ray Data from fusing decode INTO the model actors (it fuses
    # when sizes and resources match, e.g. 1 decoder + 1 CPU actor): fused, CPU decode would run
    # serially with the model forward in one process
    # A dead decode worker's task is re-run; guard_decode fails a video after DECODE_DEATHS
    def record_failure(record: dict, reason: str) -> None:  # a storage error names the store
        with storage_errors("recording a failed video in", store.storage.url()):
            store.record_failure(record, reason)
    decode = make_decode_fn(dc, record_failure=record_failure,
                            storage_options=job.sources.storage_options or None)
    if ledger is not None:
        decode = guard_decode(decode, ledger, record_failure)
    ds = ds.map_batches(decode, batch_size=per_task, num_cpus=ec.cpus_per_decoder,
                        compute=ray.data.TaskPoolStrategy(size=res["decoders"]),
                        memory=_decode_memory(job))

    # 2. models: one actor per GPU, each loads the four backbones once and runs `concurrency`
    # batches at once (a CUDA stream each). A dead actor is restarted and its batches re-run
    warmup_shape = (ec.batch_size, dc.window, dc.short_side, dc.short_side, 3)
    ds = ds.map_batches(
        ModelActor, batch_size=ec.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"models": job.models.model_dump(), "out_dtype": ec.out_dtype,
                               "log_startup": ec.log_stats, "compile_cache": compile_cache,
                               "warmup_shape": warmup_shape, "store": store},
        compute=ray.data.ActorPoolStrategy(size=res["model_actors"],
                                           max_concurrent_calls_per_actor=concurrency,
                                           enable_true_multi_threading=concurrency > 1),
        num_gpus=ec.gpus_per_actor if res["use_gpu"] else 0, num_cpus=ec.cpus_per_actor)

    # 3. write: ~shard_clips rows -> one committed shard, a small commit row back to the driver
    return ds.map_batches(ShardWriter, batch_size=ec.shard_clips, batch_format="pyarrow",
                          fn_constructor_kwargs={"store": store},
                          compute=ray.data.ActorPoolStrategy(size=res["writers"]),
                          num_cpus=ec.cpus_per_writer)


# -------------------------------------------------------------------------------------- the stage

def run_extract(job: JobConfig, storage: Storage) -> dict:
    """List videos, extract the missing clips into the feature store, write meta.json + stats."""
    import ray
    import ray.data

    from pipeline.sources import class_names, list_sources

    t0 = time.perf_counter()
    ec, cpv = job.extract, job.decode.clips_per_video
    store = FeatureStore(storage, job.store)

    # what is left to do: the listing (every other file under the prefix reported by reason)
    # against the store's commit records (read once before the run, large stores hold many, and
    # once after), after removing a crashed run's orphans
    listing = list_sources(job.sources, storage_options=job.sources.storage_options or None)
    records = listing.records
    for line in listing.report():
        print(f"[extract] {line}", flush=True)
    # a failed storage call names the store's URL and the cause (not botocore's http URL)
    specs = model_specs(job.models)
    with storage_errors("feature store", store.storage.url()):
        commits = store.commits()
        orphans = store.cleanup(commits)
        _check_layout(store, specs, ec.out_dtype, has_commits=bool(commits))
        store.write_meta(specs=specs, dtype=ec.out_dtype, codec=ec.codec,
                         class_names=class_names(records),
                         sources={n: getattr(job.models, n).source for n in specs},
                         extra={"weights": job.models.weights, "decode": job.decode.model_dump()})
        todo = plan(records, store, clips_per_video=cpv, retry_failed=ec.retry_failed,
                    commits=commits)
        pending = todo["pending"][: ec.limit_videos] if ec.limit_videos else todo["pending"]
        for r in pending:
            if r["video_id"] in todo["retried"]:
                store.clear_failure(r["video_id"])
    print(f"[extract] {len(records)} videos listed: {len(todo['done'])} done, "
          f"{len(todo['skipped_failed'])} failed earlier (skipped), {len(pending)} to process"
          + (f", {len(orphans)} orphaned shard(s) removed" if orphans else ""), flush=True)

    # the pipeline, driven by its commit rows
    clips = nbytes = shards = 0
    res: dict = {}
    with storage_errors("feature store", store.storage.url()):
        failed_before = set(store.failed())
        for r in (r for r in pending if r.get("error")):  # unreadable (broken symlink...)
            store.record_failure(r, r["error"])
    pending = [r for r in pending if not r.get("error")]
    if pending:
        ray.data.DataContext.get_current().enable_progress_bars = True
        res = _resources(job)
        print(f"[extract] {res['decoders']} decoders, {res['model_actors']} model actor(s) "
              f"({'GPU' if res['use_gpu'] else 'CPU'}), {res['writers']} writer(s)", flush=True)
        t_start = time.perf_counter()
        ledger = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(
            DecodeLedger).remote()
        ds = build_pipeline(job, store, pending, res,
                            compile_cache=compile_cache_storage(job, storage), ledger=ledger)
        for row in ds.iter_rows():
            clips, nbytes, shards = clips + int(row["rows"]), nbytes + int(row["bytes"]), shards + 1
            dt = time.perf_counter() - t_start
            print(f"[extract] shard {shards} committed: {clips} clips, {clips / dt:.2f} clips/s, "
                  f"{nbytes / 2**20:.1f} MiB", flush=True)
        if ec.log_stats:  # Ray Data's per-operator breakdown: where the time went
            print(f"[extract] Ray Data stats:\n{ds.stats()}", flush=True)

    # the summary, and the invariant: every listed video stored or failed, no clip twice
    with storage_errors("feature store", store.storage.url()):
        commits, failed_after = store.commits(), store.failed()
        stats = store.compute_stats(commits) if commits else {}
        check = check_complete(records, store, cpv, commits=commits, failed=failed_after)
    elapsed = time.perf_counter() - t0
    summary = {
        "store_url": store.storage.url(),
        "listed": check["listed"], "processed": check["processed"], "failed": check["failed"],
        "invariant_ok": check["ok"], "missing": check["missing"][:20],
        "n_missing": len(check["missing"]), "duplicate_clips": check["duplicates"],
        "videos_this_run": len(pending), "skipped_done": len(todo["done"]),
        "skipped_failed": len(todo["skipped_failed"]),
        "new_failures": len(set(failed_after) - failed_before),
        "clips": clips, "shards": shards, "bytes": nbytes, "elapsed_s": round(elapsed, 2),
        "clips_per_s": round(clips / elapsed, 3) if clips else 0.0,
        "orphans_removed": len(orphans),
        "store_clips": sum(len(v) for v in store.done_clips(commits).values()),
        "stats_targets": sorted(stats.get("all", {})),
        **{f"resources_{k}": v for k, v in res.items()},
        "skipped_files": listing.summary(),
    }
    print(f"[extract] {clips} clips in {elapsed:.1f}s ({summary['clips_per_s']} clips/s), "
          f"{nbytes / 2**20:.1f} MiB; videos: {check['processed']} processed + {check['failed']} "
          f"failed {'==' if check['ok'] else '!='} {check['listed']} listed", flush=True)
    if not check["ok"] and not ec.limit_videos:
        raise RuntimeError(f"extract: {len(check['missing'])} listed video(s) neither stored nor "
                           f"failed (e.g. {check['missing'][:5]}), {check['duplicates']} clip(s) "
                           f"stored twice; re-run to resume. Summary: {summary}")
    return summary
