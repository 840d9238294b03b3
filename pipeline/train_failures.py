"""What happened to a training run's worker group, for the job's story (issue 20).

``FailureLog`` is a Ray Train ``UserCallback``: it runs on the controller, which sees every
failure of the worker group (a worker raised, or its health check failed: the process was killed,
ran out of memory, lost its node). Each failure is appended to ``<run>/failures.json``::

    [{"time": ISO 8601, "ranks": {"1": "<Type>: <first line> (<cause type>: <first line>)"},
      "after_checkpoint_step": step of the last checkpoint persisted before it | null}]

``FailureConfig`` then restarts the group from that checkpoint (or the run ends failed). The driver
reads the file when ``fit`` returns (``read_failures``) and says in one line what happened and
from which step training resumed (``recovery_line``).
"""
from __future__ import annotations

import logging
import posixpath
from typing import Any

import ray.train

from .storage import Storage, first_line, utc_now

FAILURES = "failures.json"
_log = logging.getLogger(__name__)


def describe(e: BaseException) -> str:
    """``Type: first line``, and the health check's own failure (the dead actor) when there is
    one."""
    def first(x: BaseException) -> str:
        return f"{type(x).__name__}: {first_line(x)}"
    cause = getattr(e, "health_check_failure", None)
    return f"{first(e)} ({first(cause)})" if isinstance(cause, BaseException) else first(e)


class FailureLog(ray.train.UserCallback):
    """Appends each failure of the worker group to ``<run_rel>/failures.json`` (module docstring).
    Pickled to the controller with its ``Storage``; a re-submitted run keeps the earlier
    records."""

    def __init__(self, storage: Storage, run_rel: str):
        self.storage, self.rel = storage, posixpath.join(run_rel, FAILURES)
        self.last_step: int | None = None
        self.records: list[dict] | None = None  # read on the first failure

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if checkpoint is not None and metrics:
            self.last_step = metrics[0].get("step", self.last_step)

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        record = {"time": utc_now(), "after_checkpoint_step": self.last_step,
                  "ranks": {str(r): describe(e) for r, e in sorted(worker_exceptions.items())}}
        try:  # the story must never be what stops training (the storage may be the failure)
            if self.records is None:
                self.records = self.storage.read_json(self.rel, default=[])
            self.records.append(record)
            self.storage.write_json(self.rel, self.records)
        except Exception as e:  # noqa: BLE001
            _log.warning("could not record the failure %s in %s: %s", record,
                         self.storage.url(self.rel), describe(e))


def read_failures(storage: Storage, run_rel: str) -> list[dict]:
    return storage.read_json(posixpath.join(run_rel, FAILURES), default=[])


def recovery_line(failures: list[dict], metrics: dict[str, Any]) -> str | None:
    """One line for the job's log and summary: each failure (when, which ranks, why) and the step
    training resumed from; None when the group never failed."""
    if not failures:
        return None
    what = "; ".join(f"{f['time']} " + ", ".join(f"rank {r}: {why}" for r, why in
                                                 f["ranks"].items()) for f in failures)
    step = metrics.get("resumed_from_step")
    resumed = (f"training resumed from step {step} (its last checkpoint)" if step is not None
               else "training restarted from step 0 (no checkpoint yet)")
    n = len(failures)
    return f"the worker group failed {n} time{'s' if n > 1 else ''} ({what}); {resumed}"
