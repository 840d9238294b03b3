"""Extract stage: videos -> decode (CPU) -> four backbones (GPU actors) -> feature store shards.

A streaming Ray Data pipeline that reads top to bottom (cosmos-curate ``splitting_pipeline.py``)::

    from_items(video records)                       one block per decode task (batch_size / clips_per_video videos)
      .map_batches(decode fn, CPU tasks)            videos -> clips uint8 (window, S, S, 3); bad video -> failed/
      .map_batches(ModelActor, GPU actor pool)      clips -> raw-bytes Arrow table (+ float64 channel sums)
      .map_batches(ShardWriter, actor pool)         ~shard_clips rows -> one committed Parquet shard
    driver iterates the small commit rows           progress + summary

Resumable and idempotent: the driver first deletes orphaned shards (``FeatureStore.cleanup``), then
queues only videos whose clips are not all committed (``clip_indices`` = the missing ones).
Videos in the failed manifest are skipped unless ``extract.retry_failed``: a decode failure
(corrupt, truncated, too short, no video stream) is a property of the file, so re-trying every run
wastes decode time; fix the file or set the flag. Invariant, checked and reported at the end:
every listed video is either complete in the store or in the failed manifest.

GPU path (issue 4): each model actor runs ``actor_concurrency`` batches at once on separate CUDA
streams, so the pinned-memory H2D copy and D2H copy-back of one batch overlap the compute of
another; bf16 compute, the SDPA backend and per-model ``torch.compile`` live in ``FeatureExtractor``
(a short last batch is padded to the compiled batch shape); channel sums
for the statistics are computed on the GPU; Parquet encoding/upload runs in separate writer actors
(or, with ``extract.write_in_actor``, in the model actor's call). A decode task takes as many videos as
fill one model batch, so the batch reaches the actor as one zero-copy block of the object store.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.compile_cache import CompileCache, cache_key
from pipeline.config import ExtractConfig, JobConfig, ModelsConfig
from pipeline.dtypes import TORCH_DTYPES
from pipeline.featurestore import SQ_PREFIX, SUM_PREFIX, FeatureStore, id_columns, tensor_to_binary
from pipeline.storage import Storage, is_remote

# --------------------------------------------------------------------------------------- planning

def model_specs(cfg: ModelsConfig) -> dict:
    """The token layouts the backbones will emit, from their configs only (no weights loaded)."""
    from pipeline import backbones as bb
    if cfg.weights in ("tiny", "random"):
        configs = bb.tiny_configs() if cfg.weights == "tiny" else bb.full_configs()
    else:
        configs = {}
        for name in bb.MODEL_NAMES:
            src, cls = getattr(cfg, name), bb.MODEL_CLASSES[name].config_class
            if is_remote(src.source):
                configs[name] = cls.from_dict(Storage(src.source, cfg.storage_options).read_json("config.json"))
            else:
                configs[name] = cls.from_pretrained(src.source.removeprefix("file://"), revision=src.revision)
    return {n: bb.layout_spec(n, configs[n]) for n in bb.MODEL_NAMES}


def plan(records: list[dict], store: FeatureStore, *, clips_per_video: int, retry_failed: bool,
         commits: list[dict] | None = None) -> dict:
    """Split listed videos into done / failed (skipped) / pending (with the clip indices still missing).
    ``commits``: the store's commit records if already read."""
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


def window_rate(commit_times: list[tuple[float, int]], lo: float = 0.2, hi: float = 0.9) -> float | None:
    """Committed clips/s between the commits that pass ``lo`` and ``hi`` of the run's clips: neither
    start-up nor the burst of shards flushed at the end of the stream moves it. ``commit_times``:
    (seconds, cumulative clips) per commit, in order. None when the window spans no time."""
    if not commit_times:
        return None
    total = commit_times[-1][1]
    t_lo, c_lo = next(p for p in commit_times if p[1] >= lo * total)
    t_hi, c_hi = next(p for p in commit_times if p[1] >= hi * total)
    return round((c_hi - c_lo) / (t_hi - t_lo), 3) if t_hi > t_lo else None


def check_complete(records: list[dict], store: FeatureStore, clips_per_video: int, *,
                   commits: list[dict] | None = None, failed: dict | None = None) -> dict:
    """processed + failed == listed: every listed video complete in the store or in the failed manifest.
    ``commits``/``failed``: the store's records if already read."""
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


# -------------------------------------------------------------------------------------- the actors

class CallTimes:
    """Where a model actor's calls spend their time, summed over calls (thread-safe); with ``every`` > 0
    one line is printed every ``every`` calls. ``busy`` = summed call time / (wall time x concurrency):
    near 1, the actor's own calls are the limit; well below, the calls wait on input (Ray's side)."""

    STAGES = ("stage", "gpu", "table", "write")

    def __init__(self, every: int = 0, concurrency: int = 1):
        self.every, self.concurrency, self.lock = every, concurrency, threading.Lock()
        self.calls = self.clips = 0
        self.first: float | None = None
        self.sums = dict.fromkeys((*self.STAGES, "call"), 0.0)

    def add(self, clips: int, start: float, **stages: float) -> None:
        now = time.perf_counter()
        with self.lock:
            self.first = start if self.first is None else self.first
            self.calls, self.clips = self.calls + 1, self.clips + clips
            for k, v in {**stages, "call": now - start}.items():
                self.sums[k] += v
            line = self.summary(now) if self.every and self.calls % self.every == 0 else None
        if line:
            print(f"[model actor] {line}", flush=True)

    def summary(self, now: float | None = None) -> str:
        wall = max((now or time.perf_counter()) - (self.first or 0.0), 1e-9)
        per = ", ".join(f"{k} {1e3 * self.sums[k] / max(self.calls, 1):.0f}" for k in (*self.STAGES, "call"))
        return (f"{self.calls} calls, {self.clips} clips in {wall:.1f} s ({self.clips / wall:.1f} clips/s); "
                f"ms per call: {per}; busy {self.sums['call'] / (wall * self.concurrency):.2f}")


class ModelActor:
    """Holds the four backbones; clip batch -> Arrow table of raw-bytes features + channel sums.

    Thread-safe: with ``actor_concurrency`` > 1 Ray runs several calls at once; each thread gets
    its own CUDA stream and pinned staging buffers, so copies and compute of different batches overlap.
    ``log_every`` > 0 prints where the calls spend their time (``CallTimes``) every that many calls.
    ``store``: write each batch as one committed shard here and return its commit row (``ShardWriter``'s
    output) instead of the features table. ``compile_cache``: where torch.compile's portable cache lives
    (``pipeline.compile_cache``): loaded before the warm-up batch, saved after it unless the load covered it
    (``CompileCache.warm_up``).
    """

    def __init__(self, *, models: dict, out_dtype: str, storage_options: dict | None = None,
                 warmup_shape: tuple[int, ...] | None = None, log_every: int = 0, concurrency: int = 1,
                 store: FeatureStore | None = None, compile_cache: Storage | None = None):
        t0 = time.perf_counter()
        from pipeline.backbones import FeatureExtractor
        t_imports = time.perf_counter()
        cfg = ModelsConfig.model_validate(models)
        self.fx = FeatureExtractor(cfg, storage_options=storage_options)
        t_models = time.perf_counter()
        self.device = self.fx.device
        self.out_dtype = TORCH_DTYPES[out_dtype]
        self.cuda = self.device.type == "cuda"
        self._local = threading.local()
        # compiled models see one batch shape only: a short last batch is padded up to it, so it does
        # not trigger a recompile (rows are independent in all four models; the padding is dropped)
        self.pad_to = warmup_shape[0] if self.cuda and warmup_shape and self.fx.compiled else None
        self.times = CallTimes(log_every, concurrency)
        self.writer = ShardWriter(store=store) if store is not None else None
        cache_note = ""
        if self.cuda and warmup_shape:
            # one batch before the concurrent calls start: torch.compile traces once (never while another
            # thread runs the models), cuDNN/cuBLAS pick their kernels
            warm_up = functools.partial(self.features, np.zeros(warmup_shape, np.uint8))
            if compile_cache is not None and self.fx.compiled:
                cache_note = CompileCache(compile_cache, cache_key(models, warmup_shape, self.device)).warm_up(warm_up)
            else:
                warm_up()
        if log_every or cache_note:  # start-up is what a short run's overall rate pays for: say where it goes
            now = time.perf_counter()
            print(f"[model actor] ready in {now - t0:.1f} s: imports {t_imports - t0:.1f} s, models "
                  f"{t_models - t_imports:.1f} s, warm-up {now - t_models:.1f} s"
                  + (f"; compile cache: {cache_note}" if cache_note else ""), flush=True)

    def _input_buffer(self, shape: tuple) -> torch.Tensor:
        """This thread's uint8 host buffer for input frames (pinned on CUDA, so the copy to the device
        runs asynchronously), reused across calls and grown when a batch needs more."""
        n, buf = int(np.prod(shape)), getattr(self._local, "frames", None)
        if buf is None or buf.numel() < n:
            buf = self._local.frames = torch.empty(n, dtype=torch.uint8, pin_memory=self.cuda)
        return buf[:n].view(shape)

    def _stream(self):
        """This thread's CUDA stream (a no-op context on CPU)."""
        if not self.cuda:
            return contextlib.nullcontext()
        if not hasattr(self._local, "stream"):
            self._local.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self._local.stream)

    @torch.inference_mode()
    def features(self, frames: np.ndarray, times: dict | None = None) -> dict[str, torch.Tensor]:
        """uint8 (B, window, S, S, 3) -> {name: (B, tokens, dim) out_dtype, ``_sum:``/``_sq:`` name:
        (B, dim) float64 channel sums over tokens}, on the host, owned by the caller.

        The same code runs on CPU (plain buffers, synchronous copies) and CUDA (this thread's stream,
        a reused pinned input buffer, fresh pinned outputs, non-blocking copies, one event wait at the
        end that releases the GIL). ``times``: filled with the seconds of the host copy ("stage") and of
        the GPU part from its launch to the outputs on the host ("gpu").
        """
        t0 = time.perf_counter()
        n_real = frames.shape[0]
        rows = max(n_real, self.pad_to or 0)
        with self._stream():
            host_in = self._input_buffer((rows, *frames.shape[1:]))
            # frames may be a read-only view of Ray's object store; rows past n_real (padding) hold stale
            # frames: computed, then dropped
            np.copyto(host_in[:n_real].numpy(), frames)
            t1 = time.perf_counter()
            out = self.fx(host_in.to(self.device, non_blocking=True))
            staged = {}
            for n, o in out.items():
                o = o[:n_real].to(self.out_dtype)
                of = o.float()  # channel sums on the device, in float32 over one clip's tokens
                for key, val in ((n, o), (SUM_PREFIX + n, of.sum(1)), (SQ_PREFIX + n, of.square().sum(1))):
                    # a fresh buffer per call (pinned ones come from torch's caching host allocator, so
                    # this is cheap): the caller owns it, no copy out of a reused buffer (~365 MB/batch)
                    buf = torch.empty(val.shape, dtype=val.dtype, pin_memory=self.cuda)
                    buf.copy_(val, non_blocking=True)
                    staged[key] = buf
            # blocking: the waiting thread sleeps instead of spinning (CUDA's default with one context on
            # many cores), so up to actor_concurrency waits leave the host's cores to the decoders
            done = torch.cuda.Event(blocking=True) if self.cuda else None
            if done is not None:
                done.record()
        if done is not None:
            done.synchronize()  # releases the GIL: other threads keep the GPU busy meanwhile
        if times is not None:
            times.update(stage=t1 - t0, gpu=time.perf_counter() - t1)
        return {k: (v.double() if k.startswith((SUM_PREFIX, SQ_PREFIX)) else v) for k, v in staged.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table | dict[str, np.ndarray]:
        start, stages = time.perf_counter(), {}
        feats = self.features(batch["frames"], stages)
        t_table = time.perf_counter()
        cols = id_columns(batch)
        cols.update({k: tensor_to_binary(v) for k, v in feats.items()})
        table = pa.table(cols)
        stages["table"] = time.perf_counter() - t_table
        if self.writer is None:
            self.times.add(table.num_rows, start, **stages)
            return table
        t_write = time.perf_counter()
        commit = self.writer(table)
        self.times.add(table.num_rows, start, write=time.perf_counter() - t_write, **stages)
        return commit


class ShardWriter:
    """~shard_clips rows (raw-bytes table) -> one committed shard; returns one small commit row."""

    def __init__(self, *, store: FeatureStore):
        self.store = store

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        if table.num_rows == 0:
            return {"shard": np.array([], dtype=object), "rows": np.array([], np.int64),
                    "bytes": np.array([], np.int64), "videos": np.array([], np.int64)}
        info = self.store.write_shard(table)
        n_videos = len(set(table.column("video_id").to_pylist()))
        return {"shard": np.array([info["shard"]]), "rows": np.array([info["rows"]]),
                "bytes": np.array([info["bytes"]]), "videos": np.array([n_videos])}


# ------------------------------------------------------------------------------------- the stage

def plan_resources(ec: ExtractConfig, *, cpus: int, gpus: float, max_node_gpus: float,
                   use_gpu: bool) -> dict[str, Any]:
    """Actor/decoder counts: one model actor per GPU, decoders on the CPUs left after the actors, the
    writers and, where one node holds several model actors, ``spare_cpus_per_actor`` per actor."""
    actors = ec.model_actors or (max(1, int(gpus // ec.gpus_per_actor)) if use_gpu else 1)
    writers = 0 if ec.write_in_actor else ec.writers or 2 * actors
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
    return plan_resources(job.extract, cpus=cpus, gpus=gpus, max_node_gpus=max(node_gpus, default=0),
                          use_gpu=use_gpu)


def videos_per_decode_task(job: JobConfig) -> int:
    """Videos per decode task: by default as many as fill one model batch exactly (see ExtractConfig)."""
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
    """``extract.compile_cache`` resolved: under the job's storage, or a URL / absolute path of its own."""
    where = job.extract.compile_cache
    if not where:
        return None
    if "://" in where or where.startswith("/"):
        return Storage(where, job.storage.options)
    return storage.child(where)


def build_pipeline(job: JobConfig, store: FeatureStore, pending: list[dict], res: dict, *,
                   compile_cache: Storage | None = None):
    """The Ray Data pipeline, top to bottom; returns a Dataset of commit rows."""
    import ray.data

    from pipeline.decode import make_decode_fn

    ec = job.extract
    decode = make_decode_fn(job.decode, record_failure=store.record_failure,
                            storage_options=job.sources.storage_options or None)
    concurrency = ec.actor_concurrency if res["use_gpu"] else 1
    per_task = videos_per_decode_task(job)
    in_actor = {"store": store} if ec.write_in_actor else {}
    # a decode block of one whole model batch must stay one block (Ray splits blocks above
    # target_max_block_size, 128 MiB by default; 32 clips are 201 MB): the dataset keeps a copy of the
    # context taken at from_items, so the driver's own context is restored right after
    ctx = ray.data.DataContext.get_current()
    default_block = ctx.target_max_block_size
    ctx.target_max_block_size = max(default_block or 0, 2 * per_task * job.decode.clips_per_video * _clip_bytes(job))
    try:
        source = ray.data.from_items(pending, override_num_blocks=max(1, -(-len(pending) // per_task)))
    finally:
        ctx.target_max_block_size = default_block
    ds = (
        source
        .map_batches(decode, batch_size=per_task, num_cpus=ec.cpus_per_decoder,
                     compute=ray.data.TaskPoolStrategy(size=res["decoders"]),
                     # the memory request also keeps Ray Data from fusing decode INTO the model actors
                     # (it fuses when sizes and resources match, e.g. 1 decoder + 1 CPU actor): fused,
                     # CPU decode would run serially with the model forward in one process
                     memory=_decode_memory(job))
        .map_batches(ModelActor, batch_size=ec.batch_size, batch_format="numpy",
                     fn_constructor_kwargs={"models": job.models.model_dump(), "out_dtype": ec.out_dtype,
                                            "log_every": 16 if ec.log_stats else 0, "concurrency": concurrency,
                                            "compile_cache": compile_cache, **in_actor,
                                            "warmup_shape": (ec.batch_size, job.decode.window,
                                                             job.decode.short_side, job.decode.short_side, 3)},
                     compute=ray.data.ActorPoolStrategy(size=res["model_actors"],
                                                        max_concurrent_calls_per_actor=concurrency,
                                                        enable_true_multi_threading=concurrency > 1),
                     num_gpus=ec.gpus_per_actor if res["use_gpu"] else 0, num_cpus=ec.cpus_per_actor)
    )
    if ec.write_in_actor:  # the model actors already returned commit rows
        return ds
    return ds.map_batches(ShardWriter, batch_size=ec.shard_clips, batch_format="pyarrow",
                          fn_constructor_kwargs={"store": store},
                          compute=ray.data.ActorPoolStrategy(size=res["writers"]), num_cpus=ec.cpus_per_writer)


def run_extract(job: JobConfig, storage: Storage) -> dict:
    """List videos, extract the missing clips into the feature store, write meta.json + stats.json."""
    import ray.data

    from pipeline.sources import class_names, list_sources

    t0 = time.perf_counter()
    ec, cpv = job.extract, job.decode.clips_per_video
    store = FeatureStore(storage, job.store)
    listing = list_sources(job.sources, storage_options=job.sources.storage_options or None)
    records = listing.records
    for line in listing.report():  # every other file under the prefix, by reason
        print(f"[extract] {line}", flush=True)
    commits = store.commits()  # read once before the run (large stores hold many records) and once after
    orphans = store.cleanup(commits)  # shards from a crashed run that never got their commit record
    specs = model_specs(job.models)
    _check_layout(store, specs, ec.out_dtype, has_commits=bool(commits))
    store.write_meta(specs=specs, dtype=ec.out_dtype, codec=ec.codec, class_names=class_names(records),
                     sources={n: getattr(job.models, n).source for n in specs},
                     extra={"weights": job.models.weights, "decode": job.decode.model_dump()})

    todo = plan(records, store, clips_per_video=cpv, retry_failed=ec.retry_failed, commits=commits)
    pending = todo["pending"][: ec.limit_videos] if ec.limit_videos else todo["pending"]
    for r in pending:
        if r["video_id"] in todo["retried"]:
            store.clear_failure(r["video_id"])
    print(f"[extract] {len(records)} videos listed: {len(todo['done'])} done, "
          f"{len(todo['skipped_failed'])} failed earlier (skipped), {len(pending)} to process"
          + (f", {len(orphans)} orphaned shard(s) removed" if orphans else ""), flush=True)

    clips = nbytes = shards = 0
    commit_times: list[tuple[float, int]] = []  # (seconds since the pipeline started, clips committed)
    res: dict = {}
    failed_before = set(store.failed())
    for r in (r for r in pending if r.get("error")):  # unreadable (broken symlink...): not decoded
        store.record_failure(r, r["error"])
    pending = [r for r in pending if not r.get("error")]
    if pending:
        ray.data.DataContext.get_current().enable_progress_bars = True
        res = _resources(job)
        print(f"[extract] {res['decoders']} decoders, {res['model_actors']} model actor(s) "
              f"({'GPU' if res['use_gpu'] else 'CPU'}), "
              + ("shards written by the model actors" if ec.write_in_actor else f"{res['writers']} writer(s)"),
              flush=True)
        t_start = time.perf_counter()
        ds = build_pipeline(job, store, pending, res, compile_cache=compile_cache_storage(job, storage))
        for row in ds.iter_rows():
            clips, nbytes, shards = clips + int(row["rows"]), nbytes + int(row["bytes"]), shards + 1
            dt = time.perf_counter() - t_start
            commit_times.append((dt, clips))
            print(f"[extract] shard {shards} committed: {clips} clips, {clips / dt:.2f} clips/s, "
                  f"{nbytes / 2**20:.1f} MiB", flush=True)
        if ec.log_stats:  # Ray Data's per-operator breakdown: where the time went
            print(f"[extract] Ray Data stats:\n{ds.stats()}", flush=True)

    commits, failed_after = store.commits(), store.failed()
    stats = store.compute_stats(commits) if commits else {}
    check = check_complete(records, store, cpv, commits=commits, failed=failed_after)
    first, last = (commit_times[0], commit_times[-1]) if commit_times else (None, None)
    elapsed = time.perf_counter() - t0
    new_failed = sorted(set(failed_after) - failed_before)
    summary = {
        "store_url": store.storage.url(),
        "listed": check["listed"], "processed": check["processed"], "failed": check["failed"],
        "invariant_ok": check["ok"], "missing": check["missing"][:20], "n_missing": len(check["missing"]),
        "duplicate_clips": check["duplicates"],
        "videos_this_run": len(pending), "skipped_done": len(todo["done"]),
        "skipped_failed": len(todo["skipped_failed"]), "new_failures": len(new_failed),
        "clips": clips, "shards": shards, "bytes": nbytes, "elapsed_s": round(elapsed, 2),
        "clips_per_s": round(clips / elapsed, 3) if clips else 0.0, "orphans_removed": len(orphans),
        # first shard: actor start-up, model load/compile, pipeline fill. Steady state: clips committed
        # after the first shard over the time since it (needs a few shards to mean anything: the
        # stream's tail flushes shards in a burst; window_clips_per_s leaves both ends out)
        "first_shard_s": round(first[0], 2) if commit_times else None,
        "steady_clips_per_s": round((last[1] - first[1]) / (last[0] - first[0]), 3) if shards >= 4 else None,
        "window_clips_per_s": window_rate(commit_times),
        "store_clips": sum(len(v) for v in store.done_clips(commits).values()),
        "stats_targets": sorted(stats.get("all", {})), **{f"resources_{k}": v for k, v in res.items()},
        "skipped_files": listing.summary(),
    }
    print(f"[extract] {clips} clips in {elapsed:.1f}s ({summary['clips_per_s']} clips/s), "
          f"{nbytes / 2**20:.1f} MiB; videos: {check['processed']} processed + {check['failed']} failed "
          f"{'==' if check['ok'] else '!='} {check['listed']} listed", flush=True)
    if not check["ok"] and not ec.limit_videos:
        raise RuntimeError(f"extract: {len(check['missing'])} listed video(s) neither stored nor failed "
                           f"(e.g. {check['missing'][:5]}), {check['duplicates']} clip(s) stored twice; "
                           f"re-run to resume. Summary: {summary}")
    return summary


def _check_layout(store: FeatureStore, specs: dict, dtype: str, *, has_commits: bool) -> None:
    """A re-run must not mix layouts in one store (e.g. tiny and full models)."""
    if not store.storage.exists("meta.json"):
        return
    old = store.read_meta()
    want = {k: {"shape": [s.tokens, s.dim], "dtype": dtype} for k, s in specs.items()}
    if old.get("tensors") != want and has_commits:
        raise ValueError(f"feature store {store.storage.url()} holds layout {old.get('tensors')}, "
                         f"this job produces {want}: use another store name")
