"""Re-encode a feature store in another codec without re-extracting.

``python -m pipeline reencode JOB.yaml --codec fp8 [--to NAME] [--workers N] [key=value ...]``
reads the job's store (``store``) shard by shard and writes every shard, decoded and encoded again
(``pipeline.codecs``), into a NEW store (default ``<store>-<codec>``): readers of the old store are
never affected, and a killed conversion leaves it whole. Point jobs at the new one with
``store=NAME``.

Committed shard by shard like extraction: a shard keeps its content-addressed id (the hash of its
clips), so a re-run first deletes the orphans a killed run left (``FeatureStore.cleanup``), then
skips every shard already committed (resumable), and a finished conversion run again writes
nothing (idempotent). A later run also converts shards extracted into the source since. Commit
records carry the source's channel sums (of the values before any encoding), so stats.json is the
source's; failed-video records are copied. One conversion per target store at a time.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow.parquet as pq
import yaml

from pipeline import codecs
from pipeline.columns import ID_COLUMNS
from pipeline.featurestore import FeatureStore

# meta.json keys write_meta sets itself; the rest (weights, decode...) is carried over as is
_META_KEYS = ("format", "tensors", "codec", "specs", "class_names", "sources", "updated")


def reencode(source: FeatureStore, target: FeatureStore, codec: str | dict[str, str], *,
             workers: int = 1, device: str = "cpu", log=print) -> dict[str, Any]:
    """Convert ``source`` into ``target`` (a store of its own) in ``codec`` (``extract.codec``
    form); returns a summary (shards written/skipped, bytes per clip before and after).
    ``device``: where the values are encoded (the host decodes coded sources)."""
    if target.storage.url() == source.storage.url():
        raise ValueError(f"reencode: the target is the source store {source.storage.url()}; "
                         f"name a new one (--to)")
    meta, specs = source.read_meta(), source.specs()
    held = source.layouts()
    want = codecs.resolve_codecs(codec, {k: tuple(v["shape"]) for k, v in held.items()})
    if want == {k: v["codec"] for k, v in held.items()}:
        raise ValueError(f"reencode: {source.storage.url()} already holds codecs {want}")
    dtypes = {v["dtype"] for v in held.values()}
    if len(dtypes) != 1:
        raise ValueError(f"reencode: the source's columns have several dtypes {sorted(dtypes)}")
    t0 = time.perf_counter()
    orphans = target.cleanup()  # a killed run's shards without commit records
    target.write_meta(specs=specs, dtype=dtypes.pop(), class_names=meta["class_names"],
                      sources=meta.get("sources"), codec=want,
                      extra={k: v for k, v in meta.items() if k not in _META_KEYS})
    commits = source.commits()
    done = {r["shard"] for r in target.commits()}
    todo = [r for r in commits if r["shard"] not in done]
    log(f"[reencode] {source.storage.url()} -> {target.storage.url()} ({want}): {len(commits)} "
        f"shards, {len(commits) - len(todo)} already converted, {len(todo)} to convert"
        + (f", {len(orphans)} orphan(s) of a killed run removed" if orphans else ""))

    def convert(record: dict) -> dict:
        table = pq.read_table(source.storage.path(record["path"]),
                              filesystem=source.storage.pyarrow_filesystem())
        batch = source.to_torch(table)
        tensors = [c for c in table.column_names if c in held]  # the source's column order
        batch.update({k: batch[k].to(device) for k in tensors})
        info = target.write_shard({k: batch[k] for k in (*ID_COLUMNS, *tensors)},
                                  sums=record["sums"])
        if info["shard"] != record["shard"]:
            raise RuntimeError(f"reencode: shard {record['shard']} came out as {info['shard']}: "
                               f"its commit record does not match its rows")
        return info

    written = 0
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for info in pool.map(convert, todo):
            written += 1
            log(f"[reencode] shard {written}/{len(todo)} committed: {info['shard']} "
                f"({info['rows']} clips, {info['bytes'] / 2**20:.1f} MiB)")
    copied = _copy_failures(source, target)
    if written or not target.storage.exists("stats.json"):
        target.compute_stats()
    clips_before = sum(r["rows"] for r in commits)
    after = target.commits()
    return {"source": source.storage.url(), "target": target.storage.url(), "codec": want,
            "shards": len(commits), "shards_written": written,
            "shards_skipped": len(commits) - written, "orphans_removed": len(orphans),
            "failed_copied": copied, "clips": clips_before,
            "bytes_per_clip_before": sum(r["bytes"] for r in commits) / max(clips_before, 1),
            "bytes_per_clip_after": (sum(r["bytes"] for r in after)
                                     / max(sum(r["rows"] for r in after), 1)),
            "seconds": round(time.perf_counter() - t0, 2)}


def _copy_failures(source: FeatureStore, target: FeatureStore) -> int:
    """Copy failed-video records the target lacks or holds differently; returns how many."""
    have, n = target.failed(), 0
    for vid, rec in source.failed().items():
        if have.get(vid) != rec:
            target.storage.write_json(f"failed/{vid}.json", rec)
            n += 1
    return n


# ---------------------------------------------------------------------------- command line

def add_parser(sub) -> None:
    """The ``reencode`` subcommand of ``python -m pipeline``."""
    p = sub.add_parser("reencode", help="convert a job's feature store to another codec")
    p.add_argument("job", help="job YAML whose storage.url and store name the source")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. store=features")
    p.add_argument("--codec", required=True,
                   help=f"codec ({', '.join(codecs.CODECS)}) or a YAML mapping "
                        "'{student: fp8, default: raw}'")
    p.add_argument("--to", help="target store name (default: <store>-<codec>)")
    p.add_argument("--workers", type=int, default=2, help="shards converted at once (threads)")
    p.add_argument("--device", default="cpu", help="where values are encoded: cpu or cuda")


def main(args) -> int:
    """Run ``reencode`` for parsed ``args``; 0 on success, 2 on bad input (said on stderr)."""
    import sys

    from pipeline.config import ConfigError, load_job
    from pipeline.storage import Storage

    try:
        job = load_job(args.job, args.overrides)
        codec = yaml.safe_load(args.codec)
        if not isinstance(codec, str | dict):
            raise ConfigError(f"--codec: expected a codec name or a mapping, got {args.codec!r}")
        if args.to is None and not isinstance(codec, str):
            raise ConfigError("--to: name the target store (a per-column --codec has no default)")
        storage = Storage(job.storage.url, job.storage.options)
        source = FeatureStore(storage, job.store)
        if not source.storage.exists("meta.json"):
            raise ConfigError(f"no feature store at {source.storage.url()} (store={job.store})")
        target = FeatureStore(storage, args.to or f"{job.store}-{codec}")
        summary = reencode(source, target, codec, workers=args.workers, device=args.device)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    print(f"[reencode] done: use it with store={target.name}")
    return 0
