"""The extract stage's GPU side as Ray Data UDFs: clip batch -> feature table -> committed shard.

* :class:`ModelActor` holds the four backbones (``backbones.FeatureExtractor``) and turns a batch of
  decoded clips into an Arrow table of raw-bytes features plus float64 channel sums (computed on
  the GPU) for the store's statistics. Ray Data runs ``extract.actor_concurrency`` calls at once on
  one actor; each thread gets its own CUDA stream and pinned staging buffer, so the host copies of
  one batch overlap the compute of another. With compiled models a short last batch is padded up
  to the compiled batch shape.
* :class:`ShardWriter` commits ~``extract.shard_clips`` rows of that table as one Parquet shard
  and returns one small commit row.

Both are callable classes (Ray Data needs classes for actor pools) that take a plain dict / table,
so the tests call them without a cluster.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import time

import numpy as np
import pyarrow as pa
import torch

from pipeline.compile_cache import CompileCache, cache_key
from pipeline.config import ModelsConfig
from pipeline.dtypes import TORCH_DTYPES
from pipeline.featurestore import SQ_PREFIX, SUM_PREFIX, FeatureStore, id_columns, tensor_to_binary
from pipeline.storage import Storage, storage_errors


class ModelActor:
    """Holds the four backbones; clip batch -> Arrow table of raw-bytes features + channel sums.

    ``models``: a ``ModelsConfig`` dump; ``out_dtype``: the stored features' dtype.
    ``warmup_shape``: on CUDA, one batch of that shape runs in the constructor (torch.compile traces
    once, never while another thread runs the models; cuDNN/cuBLAS pick their kernels) and fixes the
    shape short batches are padded to. ``compile_cache``: where torch.compile's portable cache lives
    (``pipeline.compile_cache``): loaded before the warm-up batch, saved after it unless the load
    covered it. ``log_startup``: print where the constructor's time went. ``store``: record each
    backbone's latency in its meta.json (``backbone_latency_ms``), timed on one batch of
    ``warmup_shape`` (CUDA: after the warm-up, synchronised around each model; CPU: wall time).
    """

    def __init__(self, *, models: dict, out_dtype: str, storage_options: dict | None = None,
                 warmup_shape: tuple[int, ...] | None = None, log_startup: bool = False,
                 compile_cache: Storage | None = None, store: FeatureStore | None = None):
        t0 = time.perf_counter()
        from pipeline.backbones import FeatureExtractor
        t_imports = time.perf_counter()
        self.fx = FeatureExtractor(ModelsConfig.model_validate(models),
                                   storage_options=storage_options)
        t_models = time.perf_counter()
        self.device = self.fx.device
        self.out_dtype = TORCH_DTYPES[out_dtype]
        self.cuda = self.device.type == "cuda"
        self._local = threading.local()
        # compiled models see one batch shape only: a short last batch is padded up to it, so it
        # does not trigger a recompile (rows are independent in all four models; padding is dropped)
        compiled = self.cuda and warmup_shape and self.fx.compiled
        self.pad_to = warmup_shape[0] if compiled else None
        cache_note = ""
        if self.cuda and warmup_shape:
            warm_up = functools.partial(self.features, np.zeros(warmup_shape, np.uint8))
            if compile_cache is not None and self.fx.compiled:
                key = cache_key(models, warmup_shape, self.device)
                cache_note = CompileCache(compile_cache, key).warm_up(warm_up)
            else:
                warm_up()
        if store is not None and warmup_shape:  # measured here, not invented by the report
            from pipeline.featurestore import device_label
            store.record_backbone_latency(self.backbone_latency_ms(warmup_shape),
                                          device_label(self.device), warmup_shape[0])
        if log_startup or cache_note:  # start-up is what a short run's overall rate pays for
            now = time.perf_counter()
            print(f"[model actor] ready in {now - t0:.1f} s: imports {t_imports - t0:.1f} s, "
                  f"models {t_models - t_imports:.1f} s, warm-up {now - t_models:.1f} s"
                  + (f"; compile cache: {cache_note}" if cache_note else ""), flush=True)

    @torch.inference_mode()
    def backbone_latency_ms(self, shape: tuple[int, ...]) -> dict[str, float]:
        """{model: ms per clip} of each backbone's forward alone on a batch of zero frames
        uint8 ``shape`` (B, window, S, S, 3), inputs derived beforehand."""
        from pipeline.backbones import MODEL_NAMES
        from pipeline.preprocess import derive_inputs
        inputs = derive_inputs(torch.zeros(shape, dtype=torch.uint8, device=self.device),
                               dtype=self.fx.dtype)
        sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        out = {}
        for name in MODEL_NAMES:
            sync()
            t0 = time.perf_counter()
            self.fx.run(name, inputs[name])
            sync()
            out[name] = (time.perf_counter() - t0) * 1e3 / shape[0]
        return out

    def _input_buffer(self, shape: tuple) -> torch.Tensor:
        """This thread's uint8 host buffer for input frames (pinned on CUDA, so the copy to the
        device runs asynchronously), reused across calls and grown when a batch needs more."""
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
    def features(self, frames: np.ndarray) -> dict[str, torch.Tensor]:
        """uint8 (B, window, S, S, 3) -> {name: (B, tokens, dim) out_dtype, ``_sum:``/``_sq:`` name:
        (B, dim) float64 channel sums over tokens}, on the host, owned by the caller.

        The same code runs on CPU (plain buffers, synchronous copies) and CUDA (this thread's
        stream, a reused pinned input buffer, fresh pinned outputs, non-blocking copies, one event
        wait at the end that releases the GIL).
        """
        n_real = frames.shape[0]
        rows = max(n_real, self.pad_to or 0)
        with self._stream():
            host_in = self._input_buffer((rows, *frames.shape[1:]))
            # frames may be a read-only view of Ray's object store; rows past n_real (padding) hold
            # stale frames: computed, then dropped
            np.copyto(host_in[:n_real].numpy(), frames)
            out = self.fx(host_in.to(self.device, non_blocking=True))
            staged = {}
            for n, o in out.items():
                o = o[:n_real].to(self.out_dtype)
                of = o.float()  # channel sums on the device, in float32 over one clip's tokens
                sums = ((n, o), (SUM_PREFIX + n, of.sum(1)), (SQ_PREFIX + n, of.square().sum(1)))
                for key, val in sums:
                    # a fresh buffer per call (pinned ones come from torch's caching host
                    # allocator, so this is cheap): the caller owns it, no copy out of a reused
                    # buffer (~365 MB/batch)
                    buf = torch.empty(val.shape, dtype=val.dtype, pin_memory=self.cuda)
                    buf.copy_(val, non_blocking=True)
                    staged[key] = buf
            # blocking: the waiting thread sleeps instead of spinning (CUDA's default with one
            # context on many cores), so up to actor_concurrency waits leave the cores to decoders
            done = torch.cuda.Event(blocking=True) if self.cuda else None
            if done is not None:
                done.record()
        if done is not None:
            done.synchronize()  # releases the GIL: other threads keep the GPU busy meanwhile
        return {k: (v.double() if k.startswith((SUM_PREFIX, SQ_PREFIX)) else v)
                for k, v in staged.items()}

    @staticmethod
    def table(batch: dict[str, np.ndarray], feats: dict[str, torch.Tensor]) -> pa.Table:
        """The batch's id columns + each feature tensor as a raw-bytes column (the store format)."""
        cols = id_columns(batch)
        cols.update({k: tensor_to_binary(v) for k, v in feats.items()})
        return pa.table(cols)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return self.table(batch, self.features(batch["frames"]))


class ShardWriter:
    """~shard_clips rows (raw-bytes table) -> one committed shard; returns one small commit row."""

    def __init__(self, *, store: FeatureStore):
        self.store = store

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        if table.num_rows == 0:
            return {"shard": np.array([], dtype=object), "rows": np.array([], np.int64),
                    "bytes": np.array([], np.int64), "videos": np.array([], np.int64)}
        with storage_errors("writing a shard to", self.store.storage.url()):
            info = self.store.write_shard(table)
        n_videos = len(set(table.column("video_id").to_pylist()))
        return {"shard": np.array([info["shard"]]), "rows": np.array([info["rows"]]),
                "bytes": np.array([info["bytes"]]), "videos": np.array([n_videos])}
