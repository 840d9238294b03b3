"""Pieces every config section uses: stage and split names, the strict base model, name and URL
checks, keys moved or removed; the storage and Ray sections."""
from __future__ import annotations

import re
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from pipeline.storage import url_problem

STAGES = ("extract", "train", "evaluate", "export")
Rewrite = Literal["patch_matmul", "gelu_epilogue", "fold_temporal_dense",
                  "packed_temporal_attention"]
# keys that moved, old dotted path -> new one: a job file still using the old key fails naming both
MOVED_KEYS = {"extract.store": "store", "export.model_name": "model_name"}
# the splits sources assigns (a manifest's train/training/val/valid/validation map onto them)
Split = Literal["train", "val"]
SPLITS: tuple[str, ...] = get_args(Split)
# the usual video containers; any other file under sources.uri is skipped and reported
VIDEO_EXTENSIONS = ("mp4", "m4v", "mov", "qt", "mkv", "webm", "avi", "mpg", "mpeg", "m1v", "m2v",
                    "ts", "mts", "m2ts", "3gp", "3g2", "flv", "f4v", "wmv", "asf", "ogv", "mxf",
                    "vob", "dv")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _plain_name(v: str) -> str:
    if not _PLAIN_NAME.fullmatch(v):
        raise ValueError("must be a plain name: letters, digits, '.', '_', '-' (no '/')")
    return v


def _url(v: str | None) -> str | None:
    problem = url_problem(v) if v is not None else None
    if problem:
        raise ValueError(problem)
    return v
# options removed because they only selected a path measured slower (bench/HISTORY.md): a job file
# still setting one fails naming it and what took its place
REMOVED_KEYS = {
    "models.autocast": "activations always run in models.dtype (autocast was slower)",
    "models.compile_scope": "models.compile always compiles each repeated block in place "
                            "(the old 'layers'; 'model' was slower)",
    "extract.write_in_actor": "writer actors always write the shards (extract.writers; writing in "
                              "the model actor was slower)",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _refuse_removed(section: str, data: Any) -> Any:
    """A mode="before" check: a key of REMOVED_KEYS fails naming itself and its replacement."""
    for key in data if isinstance(data, dict) else ():
        why = REMOVED_KEYS.get(f"{section}.{key}")
        if why:
            raise PydanticCustomError(
                "removed_key", "{key} was removed: {why}; delete it from the job",
                {"key": f"{section}.{key}", "why": why})
    return data


class StorageConfig(_Strict):
    """Where everything is written: an fsspec URL (local path, file://, s3://...)."""
    url: str = Field(
        "runs/default", description="root fsspec URL of every output (path, file://, s3://)")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for storage.url (s3: endpoint_url, key, secret, config_kwargs)")

    _check_url = field_validator("url")(_url)


class RayConfig(_Strict):
    address: str | None = Field(
        None, description="cluster to join; None: $RAY_ADDRESS if set, else a local one")
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of a local cluster; None: all of this machine's")
    num_gpus: int | None = Field(
        None, ge=0, description="GPUs of a local cluster; None: all of this machine's")
    object_store_memory: int | None = Field(
        None, description="object store bytes of a local cluster; None: Ray's")
    runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="Ray runtime_env of the job (env_vars...)")


class LeaseConfig(_Strict):
    """The job's leases in storage (``pipeline.lease``): one run at a time per job, store, model."""
    enabled: bool = Field(
        True, description="take the job's leases before any stage; False: no guard against a "
        "concurrent run")
    ttl_s: float = Field(
        600.0, ge=1, description="seconds a lease outlives its last heartbeat (every ttl_s/3); "
        "default 600")
    wait_s: float = Field(
        0.0, ge=0, description="seconds to wait for a held lease before skipping the run; "
        "default 0")
