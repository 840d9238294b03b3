"""Feature store: Parquet shards of feature tensors stored as RAW BYTES, plus a commit log.

Layout under ``<storage>/features/<name>/``::

    meta.json                 tensor shapes/dtypes, codec per column, specs, class names, sources;
                              the backbones' measured latency (``record_backbone_latency``)
    stats.json                per-target per-channel mean/std (float64 sums over committed shards)
    shards/<shard_id>.parquet one row per clip (shard_id: hash of its (video_id, clip_index) set):
                              video_id, clip_index, label_index, split, and one large_binary
                              column per tensor (B rows of ``codecs.row_bytes(layout)`` bytes)
    shards/_tmp/<uuid>.parquet a shard being written (never read; cleaned by ``cleanup()``)
    commits/<shard_id>.json   the shard's (video_id, clip_index) pairs, counts, layout, stat sums
    failed/<video_id>.json    a video that could not be decoded: path and reason

Commit protocol (resumable, idempotent): a shard is written under ``shards/_tmp``, moved to
``shards/<id>.parquet``, and only then is ``commits/<id>.json`` written. Readers, ``done_clips()``
and the statistics trust committed shards only; a crash at any point leaves at most an orphan
that ``cleanup()`` deletes. Raw bytes rather than Ray's list-encoded tensor columns: a reader gets
a whole column as ONE numpy view of the Arrow data buffer (``pipeline.columns``).

Codecs (``pipeline.codecs``): ``meta.json["codec"]`` names each column's codec (absent: every
column ``raw``, the format before codecs); one store holds one codec per column (``write_meta``
refuses another once shards are committed; ``pipeline.reencode`` converts a store into a new one).
``encode``/``write_shard`` apply the store's codec to raw input and compute the statistics from
the values BEFORE encoding, so stats.json is the same for every codec of the same clips.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline import codecs, columns
from pipeline.columns import (  # re-exported: these names are still imported from here
    ID_COLUMNS,
    SQ_PREFIX,
    SUM_PREFIX,
    binary_to_numpy,
    channel_sums,
    id_columns,
    numpy_to_torch,
    tensor_to_binary,
)
from pipeline.storage import Storage, utc_now
from tokconv.targets import TargetSpec, specs_from_dict, specs_to_dict

__all__ = ["ID_COLUMNS", "LATENCY_KEYS", "SQ_PREFIX", "SUM_PREFIX", "FeatureStore",
           "binary_to_numpy", "channel_sums", "device_label", "id_columns", "numpy_to_torch",
           "shard_id_of", "tensor_to_binary"]

# meta.json keys of the backbones' measured forward latency (the model actor records them)
LATENCY_KEYS = ("backbone_latency_ms", "backbone_device", "backbone_latency_batch")


def device_label(device: torch.device | str) -> str:
    """"cpu", or "cuda:<GPU name>" (e.g. "cuda:NVIDIA H200"): where a latency was measured."""
    device = torch.device(device)
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


class FeatureStore:
    """A feature store under ``<storage>/features/<name>/`` (the module docstring has the layout).

    Picklable (it carries only a ``Storage``), so Ray tasks and actors write through it.
    """

    def __init__(self, storage: Storage, name: str = "features"):
        if not name or "/" in name:
            raise ValueError(f"feature store name must be a plain name, got {name!r}")
        self.name = name
        self.storage = storage.child("features", name)
        self._meta: dict | None = None

    def __getstate__(self):
        return {"name": self.name, "storage": self.storage, "_meta": self._meta}

    def __repr__(self) -> str:
        return f"FeatureStore({self.storage.root_url!r})"

    # ------------------------------------------------------------------ meta
    def write_meta(self, *, specs: Mapping[str, TargetSpec], dtype: str, class_names: list[str],
                   sources: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                   codec: str | Mapping[str, str] | None = None) -> dict:
        """meta.json: the tensor layout (name -> shape (tokens, dim), dtype), each column's codec
        (``codec``: ``extract.codec``, None = raw), specs, class names, sources. Refuses another
        codec once shards are committed (codecs are never mixed); an unchanged meta stays as is."""
        codec_of = codecs.resolve_codecs(codec, {k: (s.tokens, s.dim) for k, s in specs.items()})
        old = self.read_meta(fresh=True) if self.storage.exists("meta.json") else None
        if old is not None and self._codecs(old) != codec_of and self._ls("commits"):
            raise ValueError(
                f"feature store {self.storage.url()} holds codecs {self._codecs(old)}; this job "
                f"writes {codec_of}: codecs are never mixed in one store. Use another store name, "
                f"or convert it: python -m pipeline reencode JOB.yaml --codec ... --to NEW_NAME")
        meta = json.loads(json.dumps({
            "format": "tokconv-featurestore/1",
            "tensors": {k: {"shape": [s.tokens, s.dim], "dtype": dtype} for k, s in specs.items()},
            "codec": codec_of, "specs": specs_to_dict(dict(specs)),
            "class_names": list(class_names), "sources": sources or {}, "updated": utc_now(),
            **(extra or {})}))
        if old is not None and all(old.get(k) == meta.get(k) for k in ("tensors", "sources",
                                                                        "weights")):
            meta.update({k: old[k] for k in LATENCY_KEYS if k in old and k not in meta})
        if old is not None and {**old, "updated": 0} == {**meta, "updated": 0}:
            return old  # unchanged: not rewritten (a re-run changes nothing)
        self.storage.write_json("meta.json", meta)
        self._meta = meta
        return meta

    def record_backbone_latency(self, ms_per_clip: Mapping[str, float], device: str,
                                batch: int) -> None:
        """meta.json's ``LATENCY_KEYS``: each backbone's forward in ms per clip, measured on one
        batch of ``batch`` clips on ``device`` (``device_label``); kept by ``write_meta`` while
        the models are the same, replaced by the next measurement."""
        meta = {**self.read_meta(fresh=True), "backbone_latency_ms": dict(ms_per_clip),
                "backbone_device": device, "backbone_latency_batch": int(batch)}
        self.storage.write_json("meta.json", meta)
        self._meta = meta

    def read_meta(self, *, fresh: bool = False) -> dict:
        """meta.json (cached); every column's codec must be one this reader knows."""
        if self._meta is None or fresh:
            meta = self.storage.read_json("meta.json")
            for k, c in self._codecs(meta).items():
                codecs.get_codec(c, f"feature store {self.storage.url()}: column {k!r}: ")
            self._meta = meta
        return self._meta

    @staticmethod
    def _codecs(meta: Mapping) -> dict[str, str]:
        return {k: meta.get("codec", {}).get(k, codecs.DEFAULT) for k in meta.get("tensors", {})}

    def layouts(self) -> dict[str, dict]:
        """{column: {"shape": [N, D], "dtype": values' dtype, "codec": name}}: what
        ``codecs.decode_columns`` and ``codecs.row_bytes`` take."""
        meta = self.read_meta()
        return {k: {**v, "codec": self._codecs(meta)[k]} for k, v in meta["tensors"].items()}

    def specs(self) -> dict[str, TargetSpec]:
        return specs_from_dict(self.read_meta()["specs"])

    # ---------------------------------------------------------------- writes
    def encode(self, batch: Mapping[str, Any] | pa.Table, tensors: list[str] | None = None, *,
               with_sums: bool = True) -> pa.Table:
        """Batch dict {ids..., name: (B, tokens, dim) array/tensor, optional ``_sum:``/``_sq:``
        rows}, or a table of raw-bytes columns (the model actor's), -> Arrow table in the store
        format: tensor columns in the store's codecs, per-row (B, dim) float64 channel sums of the
        values BEFORE encoding (unless ``with_sums=False``), layouts as schema metadata."""
        has_meta = self._meta is not None or self.storage.exists("meta.json")
        want = self._codecs(self.read_meta()) if has_meta else {}
        if not isinstance(batch, pa.Table):
            return columns.encode_batch(batch, want, tensors, with_sums=with_sums)
        layout = columns.table_layout(batch)
        if not layout and has_meta:  # Ray may drop schema metadata when it re-batches
            layout = {k: self._arriving_layout(batch.column(k), v)
                      for k, v in self.layouts().items() if k in batch.column_names}
        if not layout:
            raise ValueError(f"encode: no tensor columns (and no meta.json layout) in "
                             f"{batch.column_names}")
        return columns.transcode(batch, layout, want, with_sums=with_sums,
                                 where=f"{self.storage.url()} ")

    @staticmethod
    def _arriving_layout(col, layout: dict) -> dict:
        """A column without layout metadata: already in the store's codec when its rows have that
        width and raw ones would not (rows encoded upstream, e.g. on the GPU), else raw."""
        raw = {**layout, "codec": codecs.DEFAULT}
        width, coded = columns.value_width(col), codecs.row_bytes(layout)
        return layout if width == coded != codecs.row_bytes(raw) else raw

    def write_shard(self, batch: Mapping[str, Any] | pa.Table, *, sums: dict | None = None) -> dict:
        """Write and commit one shard (tmp -> shards/<id>.parquet -> commits/<id>.json); returns
        the commit record's counts. ``batch``: what ``encode`` takes (the store's codec is applied
        there); ``sums``: the per-split channel sums when known (a re-encode carries the source's).
        """
        table = self.encode(batch, with_sums=sums is None)
        layout = columns.table_layout(table)
        splits = table.column("split").to_numpy(zero_copy_only=False).astype(str)
        if sums is None:
            sums = {}
            for name, lay in layout.items():
                shape, dim = tuple(lay["shape"]), lay["shape"][-1]
                s = binary_to_numpy(table.column(SUM_PREFIX + name), (dim,), "float64")
                q = binary_to_numpy(table.column(SQ_PREFIX + name), (dim,), "float64")
                per_tok = int(np.prod(shape[:-1]))
                for sp in np.unique(splits):
                    m = splits == sp
                    sums.setdefault(str(sp), {})[name] = {
                        "n": int(m.sum()) * per_tok, "sum": s[m].sum(0).tolist(),
                        "sumsq": q[m].sum(0).tolist()}
        table = table.drop_columns([c for c in table.column_names
                                    if c.startswith((SUM_PREFIX, SQ_PREFIX))])

        vids = table.column("video_id").to_pylist()
        clips = table.column("clip_index").to_pylist()
        # content-addressed: a retried write of the same rows (a Ray task retry after the commit)
        # replaces its shard instead of adding a duplicate
        shard_id = shard_id_of(vids, clips)
        fs = self.storage.fs
        tmp = self.storage.path("shards", "_tmp", f"{uuid.uuid4().hex}.parquet")
        final = self.storage.path("shards", f"{shard_id}.parquet")
        self.storage.makedirs(posixpath.dirname(tmp))
        # through pyarrow's own filesystem (native for local paths: 3.4-5.7x faster than fsspec's
        # file, measured on a 2-core host); compressed where the codec says; small row groups let
        # readers stream; min/max statistics of tensor bytes took half the writer's CPU: ids only
        ids = [c for c in table.column_names if c not in layout]
        with self.storage.pyarrow_filesystem().open_output_stream(tmp) as f:
            pq.write_table(table, f, compression=codecs.parquet_compression(layout, ids),
                           row_group_size=32, use_dictionary=["video_id", "split"],
                           write_statistics=ids)
        fs.mv(tmp, final)
        nbytes = fs.size(final)
        record = {
            "shard": shard_id, "path": f"shards/{shard_id}.parquet", "rows": table.num_rows,
            "bytes": nbytes, "clips": [[v, c] for v, c in zip(vids, clips)], "tensors": layout,
            "sums": sums, "committed": utc_now(),
        }
        # the record appears whole or not at all (a kill mid-write leaves only a _tmp orphan)
        tmp_record = self.storage.path("shards", "_tmp", f"{uuid.uuid4().hex}.json")
        with fs.open(tmp_record, "wb") as f:
            f.write(json.dumps(record, indent=2, sort_keys=True).encode())
        self.storage.makedirs(self.storage.path("commits"))
        fs.mv(tmp_record, self.storage.path("commits", f"{shard_id}.json"))
        return {k: record[k] for k in ("shard", "path", "rows", "bytes")}

    def record_failure(self, record: Mapping[str, Any], reason: str) -> None:
        """failed/<video_id>.json: the video's path and the reason (one file: concurrent-safe)."""
        vid = record["video_id"]
        self.storage.write_json(f"failed/{vid}.json", {
            "video_id": vid, "path": record.get("path"), "label": record.get("label"),
            "reason": str(reason), "time": utc_now()})

    def clear_failure(self, video_id: str) -> None:
        p = self.storage.path("failed", f"{video_id}.json")
        if self.storage.fs.exists(p):
            self.storage.fs.rm(p)

    # ------------------------------------------------------------ commit log
    def _ls(self, rel: str) -> list[str]:
        """Fresh listing: other processes (Ray workers) write here, and s3fs caches listings."""
        self.storage.fs.invalidate_cache(self.storage.path(rel))
        return self.storage.ls(rel)

    def _read_jsons(self, rel: str) -> list[dict]:
        names = [n for n in self._ls(rel) if n.endswith(".json")]
        if not names:
            return []
        paths = [self.storage.path(rel, n) for n in names]
        blobs = self.storage.fs.cat(paths)  # one concurrent fetch on s3
        return [json.loads(blobs[p] if p in blobs else blobs[self.storage.fs._strip_protocol(p)])
                for p in paths]

    def commits(self) -> list[dict]:
        """Commit records of all committed shards, oldest first."""
        return sorted(self._read_jsons("commits"), key=lambda r: (r["committed"], r["shard"]))

    def duplicates(self, commits: list[dict] | None = None) -> dict[tuple[str, int], list[str]]:
        """(video_id, clip_index) pairs committed in more than one shard -> those shard ids.
        Empty unless something wrote the same clip twice under different groupings.
        ``commits``: records already read (each call otherwise reads them all: large stores)."""
        seen: dict[tuple[str, int], list[str]] = {}
        for r in self.commits() if commits is None else commits:
            for v, c in r["clips"]:
                seen.setdefault((v, int(c)), []).append(r["shard"])
        return {k: v for k, v in seen.items() if len(v) > 1}

    def shard_paths(self) -> list[str]:
        """Filesystem paths (no protocol) of committed shards."""
        return [self.storage.path(r["path"]) for r in self.commits()]

    def done_clips(self, commits: list[dict] | None = None) -> dict[str, set[int]]:
        """video_id -> committed clip indices (from ``commits`` when given, else read)."""
        done: dict[str, set[int]] = {}
        for r in self.commits() if commits is None else commits:
            for v, c in r["clips"]:
                done.setdefault(v, set()).add(int(c))
        return done

    def failed(self) -> dict[str, dict]:
        return {r["video_id"]: r for r in self._read_jsons("failed")}

    def cleanup(self, commits: list[dict] | None = None) -> list[str]:
        """Delete temporary and uncommitted shards (a crash's). Call when no writer is running."""
        committed = {f"{r['shard']}.parquet"
                     for r in (self.commits() if commits is None else commits)}
        fs, removed = self.storage.fs, []
        for n in self._ls("shards/_tmp"):
            removed.append(self.storage.path("shards", "_tmp", n))
        for n in self._ls("shards"):
            if n.endswith(".parquet") and n not in committed:
                removed.append(self.storage.path("shards", n))
        for p in removed:
            fs.rm(p)
        return removed

    # ----------------------------------------------------------------- stats
    def compute_stats(self, commits: list[dict] | None = None) -> dict:
        """Combine the float64 channel sums of committed shards into stats.json and return it.

        Per target: ``mean`` and ``std`` per channel (population std over all tokens of all
        clips), for the train split ("train") and for everything ("all").
        """
        acc: dict[str, dict[str, list]] = {}
        # summed in shard-id order: the same shards give the same bits, whatever the commit order
        for r in sorted(self.commits() if commits is None else commits, key=lambda r: r["shard"]):
            for split, per in r["sums"].items():
                for key in (split, "all"):
                    for name, d in per.items():
                        a = acc.setdefault(key, {}).setdefault(name, [0, 0.0, 0.0])
                        a[0] += d["n"]
                        a[1] = a[1] + np.asarray(d["sum"], np.float64)
                        a[2] = a[2] + np.asarray(d["sumsq"], np.float64)
        out = {}
        for key, per in acc.items():
            out[key] = {}
            for name, (n, s, q) in per.items():
                mean = s / n
                var = np.maximum(q / n - mean * mean, 0.0)
                out[key][name] = {"count": n, "mean": mean.tolist(), "std": np.sqrt(var).tolist()}
        self.storage.write_json("stats.json", out)
        return out

    def stats(self, split: str = "train") -> dict[str, dict[str, np.ndarray]]:
        """{name: {"mean": (dim,), "std": (dim,)}} float64 numpy of ``split`` (else of "all")."""
        data = self.storage.read_json("stats.json")
        per = data.get(split) or data["all"]
        return {k: {"mean": np.asarray(v["mean"]), "std": np.asarray(v["std"])}
                for k, v in per.items()}

    # ----------------------------------------------------------------- reads
    def to_torch(self, batch, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """A batch (pyarrow Table/RecordBatch, or Ray's dict of numpy) -> dict of torch tensors.

        Tensor columns -> (B, tokens, dim): for ``raw`` columns views of the Arrow buffers (no
        per-element work), coded ones decoded ON THE HOST (evaluation and CPU paths; the training
        reader moves the stored rows to the GPU and decodes there). ``dtype``: None = the layout's
        (meta.json's, e.g. float16) for every codec. clip_index/label_index -> int64 tensors;
        video_id/split stay lists of str.
        """
        layouts = self.layouts()
        names = list(batch) if isinstance(batch, Mapping) else batch.column_names
        out: dict[str, Any] = {}
        for k in names:
            col = batch[k] if isinstance(batch, Mapping) else batch.column(k)
            if k in layouts:
                out[k] = columns.column_values(col, layouts[k], dtype)
            elif k in ("clip_index", "label_index"):
                vals = col.to_numpy() if not isinstance(col, np.ndarray) else col
                out[k] = torch.as_tensor(np.asarray(vals, dtype=np.int64))
            else:
                is_np = isinstance(col, np.ndarray)
                out[k] = col.astype(str).tolist() if is_np else col.to_pylist()
        return out

    def stored_rows(self, batch) -> dict[str, torch.Tensor]:
        """A batch's tensor columns as stored: {column: (B, row_bytes) uint8} views of the Arrow
        buffers (no per-element work), for any codec: ``codecs.decode_columns(rows,
        store.layouts(), dtype)`` decodes them where they are (the training reader,
        ``pipeline.train_data``, moves the same rows to the GPU and decodes there)."""
        layouts = self.layouts()
        names = list(batch) if isinstance(batch, Mapping) else batch.column_names
        get = batch.__getitem__ if isinstance(batch, Mapping) else batch.column
        return {k: columns.column_rows(get(k), layouts[k]) for k in names if k in layouts}

    def read_dataset(self, split: str | None = None, columns: list[str] | None = None):
        """Ray Dataset over the committed shards (optionally one split). Convert batches with
        ``to_torch`` (use ``batch_format="pyarrow"`` for zero-copy tensor views)."""
        import ray.data
        paths = self.shard_paths()
        if not paths:
            raise FileNotFoundError(f"{self}: no committed shards")
        ds = ray.data.read_parquet(paths, filesystem=self.storage.pyarrow_filesystem(),
                                   columns=columns)
        if split is not None:
            from ray.data.expressions import col
            ds = ds.filter(expr=col("split") == split)
        return ds

    def iter_torch(self, split: str | None = None, batch_size: int = 8,
                   columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Plain pyarrow reader (no Ray): batches of exactly ``batch_size`` rows (the last may be
        smaller) from the committed shards, in commit order, as ``to_torch`` dicts."""
        fs, pending, n_pending = self.storage.fs, [], 0
        for path in self.shard_paths():
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                for rb in pf.iter_batches(batch_size=batch_size, columns=columns):
                    if split is not None:
                        rb = rb.filter(pc.equal(rb.column("split"), split))
                    if rb.num_rows == 0:
                        continue
                    pending.append(rb)
                    n_pending += rb.num_rows
                    while n_pending >= batch_size:
                        table = pa.Table.from_batches(pending)
                        yield self.to_torch(table.slice(0, batch_size))
                        rest = table.slice(batch_size)
                        pending, n_pending = rest.to_batches(), rest.num_rows
        if n_pending:
            yield self.to_torch(pa.Table.from_batches(pending))

    def num_clips(self, split: str | None = None) -> int:
        n = 0
        for r in self.commits():
            for sp, per in r["sums"].items():
                if split is None or sp == split:
                    first = next(iter(per.values()))
                    n += first["n"] // int(np.prod(r["tensors"][next(iter(per))]["shape"][:-1]))
        return n


def shard_id_of(video_ids: list[str], clip_indices: list[int]) -> str:
    """A shard's id: the hash of its (video_id, clip_index) set (the same rows, the same id)."""
    keys = "\n".join(sorted(f"{v}:{c}" for v, c in zip(video_ids, clip_indices)))
    return hashlib.sha1(keys.encode()).hexdigest()[:24]

