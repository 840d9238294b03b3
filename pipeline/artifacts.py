"""Model artifacts in one place: model directories, the registry of exported versions and its
`latest` pointer, and the pointer to a training run's final checkpoint. The train, evaluate and
export stages go through this module; none of them imports another.

A model directory (local; ``tokconv.io`` files, loadable without Ray)::

    model.safetensors + config.json     converter          (tokconv.io.load_converter)
    head.safetensors + head.json        head, optional     (tokconv.io.load_head)
    standardization.safetensors         "<target>.mean" / "<target>.std" (dim,) float32: the
                                        converter emits standardised teacher features;
                                        teacher features = out * std + mean
    train_state.pt                      checkpoints only: optimiser state (never published)

Under the storage root::

    models/<name>/<version>/    a published model directory (+ metrics.json, README.md, ...)
                                and _published.json, uploaded last: a version is complete only
                                with it (a publish that failed part-way leaves none)
    models/<name>/latest.json   {"version", "uri", "metric", "value", ..., "promoted_at"}
    runs/<job>/train.json       the training run's summary: "checkpoint_rel" names its final
                                checkpoint (a model directory) relative to the root
    runs/<job>/eval/            the evaluate stage's metrics.json, sample.safetensors, report.html

Versions are immutable; ``latest.json`` is read only through :meth:`ModelRegistry.latest` and
written after every file of its version, so a reader following it never sees a partial model; a
reader naming a version gets it only once its ``_published.json`` is there (object stores have no
atomic directory rename: the marker is the commit).
"""
from __future__ import annotations

import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .storage import Storage, utc_now

STANDARDIZATION = "standardization.safetensors"
TRAIN_STATE = "train_state.pt"
TRAIN_POINTER = "train.json"
PUBLISHED = "_published.json"
EVAL_DIR = "eval"


def job_run_dir(job_name: str) -> str:
    """``runs/<job>``: a job's checkpoints, training pointer, evaluation and summary."""
    return posixpath.join("runs", job_name)


# ------------------------------------------------------------------ model directories (local)

def save_model_dir(converter: nn.Module, head: nn.Module | None, path: str) -> None:
    """model.safetensors + config.json (+ head.safetensors + head.json) under ``path``."""
    from tokconv.io import save_converter, save_head
    save_converter(converter, path)
    if head is not None:
        save_head(head, path)


def load_model_dir(path: str) -> tuple[nn.Module, nn.Module | None]:
    """(converter, head or None when the directory has no head.json), in eval mode."""
    from tokconv.io import HEAD_CONFIG, load_converter, load_head
    head = load_head(path) if os.path.exists(os.path.join(path, HEAD_CONFIG)) else None
    return load_converter(path), head


def load_weights(converter: nn.Module, head: nn.Module | None, path: str) -> None:
    """Copy the weights of the model directory ``path`` into existing modules (a warm start);
    ``head`` keeps its own weights when the directory has none."""
    saved_converter, saved_head = load_model_dir(path)
    converter.load_state_dict(saved_converter.state_dict())
    if head is not None and saved_head is not None:
        head.load_state_dict(saved_head.state_dict())


def stats_tensors(stats: dict, names, device=None) -> tuple[dict[str, torch.Tensor],
                                                           dict[str, torch.Tensor]]:
    """Feature-store stats ({name: {"mean", "std"}} lists or arrays) -> (mean, std): dicts of
    float32 tensors (dim,) for ``names``."""
    def as_tensor(v):
        return torch.as_tensor(v, dtype=torch.float32, device=device).contiguous()
    return ({k: as_tensor(stats[k]["mean"]) for k in names},
            {k: as_tensor(stats[k]["std"]) for k in names})


def save_standardization(mean: dict[str, torch.Tensor], std: dict[str, torch.Tensor],
                         path: str) -> None:
    """standardization.safetensors: "<target>.mean" / "<target>.std" (dim,) float32."""
    from safetensors.torch import save_file
    tensors = {f"{t}.mean": m.detach().float().cpu().contiguous() for t, m in mean.items()}
    tensors.update({f"{t}.std": s.detach().float().cpu().contiguous() for t, s in std.items()})
    save_file(tensors, path)


def load_standardization(path: str, device=None) -> tuple[dict[str, torch.Tensor],
                                                         dict[str, torch.Tensor]]:
    """The (mean, std) dicts {target: (dim,)} of a standardization.safetensors file."""
    from safetensors.torch import load_file
    flat = load_file(path)
    targets = sorted({k.rsplit(".", 1)[0] for k in flat})
    return ({t: flat[f"{t}.mean"].to(device) for t in targets},
            {t: flat[f"{t}.std"].to(device) for t in targets})


# ------------------------------------------------------------------------------- the registry

@dataclass
class LoadedModel:
    """A published model, loaded: converter, head (None without head.json) and the standardisation
    its outputs live in ({target: (dim,)} float32)."""
    version: str
    converter: nn.Module
    head: nn.Module | None
    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]


class ModelRegistry:
    """``models/<name>/`` under a storage root: immutable versions and the ``latest`` pointer.
    Picklable (it carries a ``Storage``)."""

    def __init__(self, storage: Storage, name: str):
        if not name or "/" in name:
            raise ValueError(f"model name must be a plain name, got {name!r}")
        self.storage, self.name = storage, name

    def __repr__(self) -> str:
        return f"ModelRegistry({self.url()!r})"

    def rel(self, *parts: str) -> str:
        return posixpath.join("models", self.name, *parts)

    def url(self, *parts: str) -> str:
        return self.storage.url(self.rel(*parts))

    def latest(self) -> dict[str, Any] | None:
        """latest.json ({"version", "uri", "metric", "value", ...}), or None when nothing was
        promoted yet."""
        return self.storage.read_json(self.rel("latest.json"), default=None) or None

    def resolve(self, version: str = "latest") -> str:
        """``version`` itself, or the version ``latest`` points at."""
        if version != "latest":
            return version
        latest = self.latest()
        if latest is None:
            raise FileNotFoundError(f"model {self.name!r} has no latest version at "
                                    f"{self.url('latest.json')}")
        return latest["version"]

    def exists(self, version: str) -> bool:
        return self.storage.exists(self.rel(version))

    def new_version(self, requested: str | None = None) -> str:
        """``requested`` (FileExistsError if published: versions are immutable; an unfinished
        upload of it is redone), else a UTC timestamp (``20261202T100000Z``, ``-1``, ``-2``...
        appended when taken)."""
        if requested:
            if self.is_published(requested):
                raise FileExistsError(f"export.version: {self.name}/{requested} already exists at "
                                      f"{self.url(requested)}; versions are immutable")
            return requested
        stamp = utc_now(basic=True)
        version, i = stamp, 1
        while self.exists(version):
            version, i = f"{stamp}-{i}", i + 1
        return version

    def read_json(self, version: str, file: str, default: Any = None) -> Any:
        """A JSON file of a published version (config.json, head.json, metrics.json...)."""
        return self.storage.read_json(self.rel(version, file), default=default)

    def is_published(self, version: str) -> bool:
        """Every file of ``version`` was uploaded: its ``_published.json`` exists, or latest.json
        names it (written only after its files: versions published before the marker existed)."""
        if self.storage.exists(self.rel(version, PUBLISHED)):
            return True
        latest = self.latest()
        return latest is not None and latest.get("version") == version

    def publish(self, version: str, local_dir: str, files: list[str]) -> str:
        """Upload ``files`` of ``local_dir`` as ``version``, then ``_published.json`` (the files
        and their sizes) last; returns its URL (not promoted). An unfinished earlier upload of the
        same version is overwritten; a published one is immutable (FileExistsError)."""
        if self.is_published(version):
            raise FileExistsError(f"{self.name}/{version} is already published at "
                                  f"{self.url(version)}; versions are immutable")
        dest = self.storage.path(self.rel(version))
        self.storage.makedirs(dest)
        for f in files:
            self.storage.fs.put_file(os.path.join(local_dir, f), posixpath.join(dest, f))
        sizes = {f: os.path.getsize(os.path.join(local_dir, f)) for f in files}
        self.storage.write_json(self.rel(version, PUBLISHED),
                                {"version": version, "files": sizes, "published": utc_now()})
        return self.url(version)

    def promote(self, version: str, **record: Any) -> dict[str, Any]:
        """Point ``latest`` at ``version`` (call after its files are published); ``record`` is kept
        in latest.json beside version, uri and promoted_at. Returns what was written."""
        latest = {"version": version, "uri": self.url(version), **record, "promoted_at": utc_now()}
        self.storage.write_json(self.rel("latest.json"), latest)
        return latest

    def download(self, version: str = "latest", dest: str | None = None) -> str:
        """Copy ``models/<name>/<version>/`` (``latest`` follows latest.json) into the local
        directory ``dest`` (a new temporary one when None); returns it."""
        version = self.resolve(version)
        if not self.exists(version):
            raise FileNotFoundError(f"model {self.name}/{version} not found at {self.url(version)}")
        if not self.is_published(version):
            raise FileNotFoundError(f"model {self.name}/{version} at {self.url(version)} is "
                                    f"incomplete: its upload did not finish (no {PUBLISHED})")
        dest = dest or tempfile.mkdtemp(prefix=f"{self.name}-{version}-")
        return self.storage.download(self.rel(version), dest)

    def load(self, version: str = "latest") -> LoadedModel:
        """Converter, head and standardisation of a published version (CPU, eval mode)."""
        version = self.resolve(version)
        with tempfile.TemporaryDirectory() as d:
            self.download(version, d)
            converter, head = load_model_dir(d)
            mean, std = load_standardization(os.path.join(d, STANDARDIZATION))
        return LoadedModel(version, converter, head, mean, std)


# ------------------------------------------------------------- the trained-checkpoint pointer

def write_trained(storage: Storage, run_dir: str, info: dict[str, Any]) -> str:
    """Write ``<run_dir>/train.json`` (``info["checkpoint_rel"]``: the final checkpoint relative
    to the storage root); returns its URL."""
    rel = posixpath.join(run_dir, TRAIN_POINTER)
    storage.write_json(rel, info)
    return storage.url(rel)


def read_trained(storage: Storage, run_dir: str) -> dict[str, Any]:
    """``<run_dir>/train.json``; FileNotFoundError naming it when the train stage has not run."""
    info = storage.read_json(posixpath.join(run_dir, TRAIN_POINTER), default=None)
    if info is None:
        raise FileNotFoundError(f"no training result at {storage.url(run_dir, TRAIN_POINTER)}; "
                                f"run the train stage first")
    return info


def load_trained(storage: Storage, run_dir: str,
                 dest: str) -> tuple[nn.Module, nn.Module | None, dict[str, Any]]:
    """Download the checkpoint named by ``<run_dir>/train.json`` into ``dest``; returns
    (converter, head or None, the pointer's contents)."""
    info = read_trained(storage, run_dir)
    storage.download(info["checkpoint_rel"], dest)
    converter, head = load_model_dir(dest)
    return converter, head, info
