"""Which videos: a directory / bucket prefix listed through fsspec, or a manifest file.

Every video becomes one record::

    {"video_id": str,          # 16 hex: sha1 of the normalised path (stable key downstream)
     "path": str,              # local absolute path, or a full fsspec URL (s3://bucket/key)
     "label": str | None,      # parent folder name (labels="parent") or the manifest's label
     "label_index": int,       # index into class_names(records); -1 without a label
     "split": "train" | "val",
     "error": str}             # only on a file that cannot be read (a broken symlink, not a
                               # regular file, no read permission): a failed video, not decoded

Every file under a listed prefix is accounted for (``list_sources``): a record (a candidate
video, or a failed one with its ``error``), or skipped with a reason: "hidden" (a name starting
with '.' anywhere in its path: partial copies, .DS_Store), "not a video extension" (not in
``sources.extensions``; ``all`` makes every file a candidate and lets decode decide), "symlink to
a directory (not followed)", "beyond sources.limit".

Splits are deterministic: a manifest's ``split`` column wins; otherwise a video is in val
when ``hash(seed, video_id)`` falls below ``val_fraction``, so adding videos never moves old
ones between splits. With >= 2 videos and ``val_fraction > 0`` at least one lands in each.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import stat
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import SPLITS, SourcesConfig
from pipeline.storage import Storage

_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val"}
MANIFEST_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
                    ".pq": "parquet"}


def video_id(path: str) -> str:
    """16 hex digits of sha1 over the normalised path (``list_videos`` normalises first)."""
    return hashlib.sha1(path.encode()).hexdigest()[:16]


def _unit_hash(seed: int, vid: str) -> float:
    """A number in [0, 1) fixed by (seed, video_id)."""
    return int(hashlib.sha1(f"{seed}:{vid}".encode()).hexdigest()[:15], 16) / 16 ** 15


def _url(storage: Storage, path: str) -> str:
    """Full URL for a filesystem path of ``storage`` (plain path for local files)."""
    return path if storage.protocol == "file" else f"{storage.protocol}://{path}"


HIDDEN, NOT_VIDEO, DIR_LINK, BEYOND_LIMIT = ("hidden", "not a video extension",
                                              "symlink to a directory (not followed)",
                                              "beyond sources.limit")


@dataclass
class Listing:
    """What ``list_sources`` found: the records, and every other file by skip reason (paths
    relative to the listed root, sorted; full paths for ``BEYOND_LIMIT``)."""
    records: list[dict]
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def summary(self, first: int = 5) -> dict[str, dict]:
        """{reason: {"count": n, "first": [up to ``first`` names]}} (the job summary's form)."""
        return {r: {"count": len(v), "first": v[:first]} for r, v in self.skipped.items() if v}

    def report(self, first: int = 5) -> list[str]:
        """One line per skip reason: ``K files skipped: not a video extension (a.txt, ...)``."""
        lines = []
        for reason, info in self.summary(first).items():
            more = ", ..." if info["count"] > len(info["first"]) else ""
            noun = "file" if info["count"] == 1 else "files"
            lines.append(f"{info['count']} {noun} skipped: {reason} "
                         f"({', '.join(info['first'])}{more})")
        return lines


def _local_problem(path: str, info: dict) -> str | None:
    """Why a local file that was listed cannot be read (None: it can)."""
    if info.get("islink") and not os.path.exists(path):
        return f"broken symlink (-> {info.get('destination') or os.readlink(path)})"
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kinds = {stat.S_ISFIFO: "named pipe", stat.S_ISSOCK: "socket", stat.S_ISCHR: "device",
                 stat.S_ISBLK: "device"}
        kind = next((k for test, k in kinds.items() if test(mode)), "special file")
        return f"not a regular file ({kind})"
    if not os.access(path, os.R_OK):
        return "unreadable: permission denied"
    return None


def _list_prefix(uri: str, cfg: SourcesConfig,
                 options: dict[str, Any]) -> tuple[list[dict], dict[str, list[str]]]:
    storage = Storage(uri, options)
    fs, root = storage.fs, storage.root.rstrip("/")
    fs.invalidate_cache(root)  # a long-lived process (scheduled re-runs) must see new objects
    if not fs.exists(root):
        raise FileNotFoundError(f"sources.uri: {uri!r} does not exist")
    if not fs.isdir(root):
        raise NotADirectoryError(f"sources.uri: {uri!r} is a file, not a directory or prefix "
                                 f"(use sources.manifest for a list of videos)")
    exts = None if cfg.extensions == "all" else {"." + e for e in cfg.extensions}
    local = storage.protocol == "file"
    entries, skipped = [], {HIDDEN: [], NOT_VIDEO: [], DIR_LINK: []}
    for path, info in sorted(fs.find(root, detail=True).items()):
        rel = posixpath.relpath(path, root)
        if any(part.startswith(".") for part in rel.split("/")):
            skipped[HIDDEN].append(rel)  # partial copies, .DS_Store, .git ...
        elif local and info.get("islink") and os.path.isdir(path):
            skipped[DIR_LINK].append(rel)  # fsspec does not descend into it; nor do we
        elif exts is not None and posixpath.splitext(path)[1].lower() not in exts:
            skipped[NOT_VIDEO].append(rel)
        else:
            parent = posixpath.dirname(rel)
            label = posixpath.basename(parent) if parent and cfg.labels == "parent" else None
            entry = {"path": _url(storage, path), "label": label, "split": None}
            error = _local_problem(path, info) if local else None
            entries.append({**entry, "error": error} if error else entry)
    if not entries:
        found = "; ".join(Listing([], skipped).report()) or "no files"
        wanted = "files" if exts is None else f"videos with extensions {sorted(exts)}"
        raise ValueError(f"sources.uri: no {wanted} under {uri!r} ({found})")
    return entries, skipped


def _read_manifest_rows(manifest: str, options: dict[str, Any]) -> tuple[list[dict], Storage, str]:
    storage = Storage(manifest, options)
    fs, path = storage.fs, storage.root
    fmt = MANIFEST_FORMATS.get(posixpath.splitext(path)[1].lower())
    if fmt is None:
        raise ValueError(f"sources.manifest: {manifest!r} has an unknown format; "
                         f"expected one of {sorted(MANIFEST_FORMATS)}")
    if not fs.exists(path):
        raise FileNotFoundError(f"sources.manifest: {manifest!r} does not exist")
    with fs.open(path, "rb") as f:
        data = f.read()
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    elif fmt == "jsonl":
        rows = []
        for n, line in enumerate(data.decode().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"sources.manifest: {manifest!r} line {n} is not JSON: "
                                     f"{e}") from None
    else:
        import pyarrow.parquet as pq
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
    return rows, storage, posixpath.dirname(path)


def _read_manifest(manifest: str, cfg: SourcesConfig, options: dict[str, Any]) -> list[dict]:
    rows, storage, base = _read_manifest_rows(manifest, options)
    if not rows:
        raise ValueError(f"sources.manifest: {manifest!r} has no rows")
    columns = set().union(*(r.keys() for r in rows))
    if "path" not in columns:
        raise ValueError(f"sources.manifest: {manifest!r} has no 'path' column "
                         f"(columns: {sorted(columns)})")
    if cfg.labels == "manifest" and "label" not in columns:
        raise ValueError(f"sources.manifest: {manifest!r} has no 'label' column, "
                         f"but sources.labels=manifest")
    entries = []
    for n, row in enumerate(rows, 1):
        raw = str(row.get("path") or "").strip()
        if not raw:
            raise ValueError(f"sources.manifest: {manifest!r} row {n} has an empty path")
        if "://" in raw:
            path = raw  # already a URL
        elif posixpath.isabs(raw):
            path = _url(storage, raw)
        else:
            path = _url(storage, posixpath.normpath(posixpath.join(base, raw)))
        if cfg.labels == "none":
            label = None
        elif "label" in columns:  # labels=parent|manifest: the manifest's own labels win
            label = str(row["label"]).strip() if row.get("label") not in (None, "") else None
        else:
            parent = posixpath.dirname(raw)
            label = posixpath.basename(parent) if parent else None
        split = row.get("split")
        if split not in (None, ""):
            split_norm = _SPLIT_ALIASES.get(str(split).strip().lower())
            if split_norm is None:
                raise ValueError(f"sources.manifest: {manifest!r} row {n} ({raw}): "
                                 f"unknown split {split!r}; "
                                 f"expected one of {sorted(_SPLIT_ALIASES)} (splits: "
                                 f"{', '.join(SPLITS)})")
            split = split_norm
        else:
            split = None
        entries.append({"path": path, "label": label, "split": split})
    return entries


def _assign_splits(records: list[dict], seed: int, val_fraction: float) -> None:
    """Hash split for records without one; guarantee one train and one val when possible."""
    free = [r for r in records if r["split"] is None]
    score = {r["video_id"]: _unit_hash(seed, r["video_id"]) for r in free}
    for r in free:
        r["split"] = "val" if score[r["video_id"]] < val_fraction else "train"
    if len(records) < 2 or val_fraction <= 0 or len(free) == 0:
        return
    splits = {r["split"] for r in records}
    if "val" not in splits:
        min(free, key=lambda r: score[r["video_id"]])["split"] = "val"
    elif "train" not in splits:
        max(free, key=lambda r: score[r["video_id"]])["split"] = "train"


def class_names(records: list[dict]) -> list[str]:
    """Sorted unique labels (records without a label are ignored)."""
    return sorted({r["label"] for r in records if r.get("label") is not None})


def list_sources(cfg: SourcesConfig, *,
                 storage_options: dict[str, Any] | None = None) -> Listing:
    """Records for every video of ``cfg`` (sorted by path; ``cfg.limit`` keeps the first N) and
    every other file under the prefix by skip reason.

    ``storage_options`` are merged over ``cfg.storage_options`` (s3: endpoint_url/key/secret).
    """
    options = {**cfg.storage_options, **(storage_options or {})}
    skipped: dict[str, list[str]] = {}
    if cfg.manifest:
        entries = _read_manifest(cfg.manifest, cfg, options)
    else:
        uri = cfg.uri
        if uri == "samples":
            from pipeline.samples import sample_dir
            uri = str(sample_dir())
        entries, skipped = _list_prefix(uri, cfg, options)

    seen: dict[str, dict] = {}
    for e in sorted(entries, key=lambda e: e["path"]):
        vid = video_id(e["path"])
        if vid in seen:
            raise ValueError(f"sources: video {e['path']!r} is listed twice")
        seen[vid] = {"video_id": vid, **e}
    records = list(seen.values())
    if cfg.limit is not None:
        skipped[BEYOND_LIMIT] = [r["path"] for r in records[cfg.limit:]]
        records = records[: cfg.limit]
    _assign_splits(records, cfg.seed, cfg.val_fraction)
    index = {name: i for i, name in enumerate(class_names(records))}
    out = []
    for r in records:
        rec = {"video_id": r["video_id"], "path": r["path"], "label": r["label"],
               "label_index": index.get(r["label"], -1), "split": r["split"]}
        out.append({**rec, "error": r["error"]} if r.get("error") else rec)
    return Listing(out, skipped)


def list_videos(cfg: SourcesConfig, *, storage_options: dict[str, Any] | None = None) -> list[dict]:
    """``list_sources(...).records``: the videos only."""
    return list_sources(cfg, storage_options=storage_options).records
