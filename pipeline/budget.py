"""Another preset trained with a job's budget on the same store, in a run directory of its own: the
evaluate stage's floor (``FLOOR`` under ``runs/<job>/floor/``) and the leaderboard's rows
(``runs/<job>/leaderboard/<preset>/``).

``budget_config(tc, converter, kwargs)`` is the job's TrainConfig with another preset (and no warm
start: every preset starts from scratch, so all get the same budget). ``train_once(tc, storage,
store=, registry=, run_dir=)`` runs the train stage there (Ray Train; an unfinished run resumes)
unless ``<run_dir>/budget.json`` records that the finished run there was trained with these
settings on these shards; it returns (the run's train.json, whether it trained now).
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any

from .artifacts import TRAIN_POINTER, ModelRegistry, read_trained
from .config import TrainConfig
from .featurestore import FeatureStore
from .storage import Storage

FLOOR = "baseline_interp_linear"
BUDGET_FILE = "budget.json"
# how a run executes, not what it learns: a finished run trained with other values is reused
_EXECUTION = {"resume", "max_failures", "wait_for_workers", "cache", "read_ahead",
              "log_every_steps", "keep_checkpoints", "checkpoint_every_steps", "cpus_per_worker"}


def budget_config(tc: TrainConfig, converter: str,
                  converter_kwargs: dict[str, Any] | None = None) -> TrainConfig:
    """``tc`` with ``converter`` (+ its kwargs) and ``warm_start`` off, validated."""
    return TrainConfig.model_validate({**tc.model_dump(), "converter": converter,
                                       "converter_kwargs": dict(converter_kwargs or {}),
                                       "warm_start": False})


def budget_key(tc: TrainConfig, store: FeatureStore) -> dict[str, Any]:
    """What a finished run must have been trained with to be reused: the settings that change the
    model, the store, and its committed shards (a store that grew retrains)."""
    shards = sorted(r["shard"] for r in store.commits())
    digest = hashlib.sha1("\n".join(shards).encode()).hexdigest()
    key = {"train": tc.model_dump(mode="json", exclude=_EXECUTION), "store": store.name,
           "shards": len(shards), "shards_sha1": digest}
    return json.loads(json.dumps(key))


def finished_run(storage: Storage, run_dir: str, key: dict) -> dict[str, Any] | None:
    """``<run_dir>/train.json`` when ``<run_dir>/budget.json`` records ``key``; else None."""
    if storage.read_json(posixpath.join(run_dir, BUDGET_FILE), default=None) != key:
        return None
    return storage.read_json(posixpath.join(run_dir, TRAIN_POINTER), default=None)


def train_once(tc: TrainConfig, storage: Storage, *, store: FeatureStore, registry: ModelRegistry,
               run_dir: str) -> tuple[dict[str, Any], bool]:
    """Train ``tc`` under ``run_dir`` unless a finished run there matches (``budget_key``); returns
    (train.json of the run, True when it trained now)."""
    key = budget_key(tc, store)
    info = finished_run(storage, run_dir, key)
    if info is not None:
        print(f"[{tc.converter}] reusing finished run {info.get('run')}: same settings and store",
              flush=True)
        return info, False
    from .train import train_stage
    train_stage(tc, storage, store=store, registry=registry, run_dir=run_dir)
    storage.write_json(posixpath.join(run_dir, BUDGET_FILE), key)
    return read_trained(storage, run_dir), True
