"""Leases in storage: one run at a time per job, per feature store and per model registry.

A scheduled job can start twice at once (KubeRay 1.6's RayCronJob may fire a tick twice; a
RayJob retry runs again on a new cluster) and must be safe to re-run after a crash. Before any
stage, ``run_job`` takes three leases for the whole run, named after what the job writes or
reads::

    <storage>/leases/job-<job name>/        runs/<job>/ (training runs, train.json, eval, summary)
    <storage>/leases/store-<store>/         features/<store>/ (extract writes; every stage reads
                                            its commits and stats.json)
    <storage>/leases/model-<model_name>/    models/<model_name>/ (versions and latest.json)

Two copies of one job, or two jobs sharing a store or a model, never overlap: the second finds
a lease held, waits up to ``lease.wait_s`` (default 0) and then skips the run: exit 0, the line
``skipped: lease ... held by <owner> (job <job>) until <time>``, ``runs/<job>/skipped.json``.

A lease is a directory of epoch records ``00000000.json``, ``00000001.json``...; the highest
epoch decides: held while it is neither released nor past ``expires_unix``::

    {"owner": "<host>:<pid>:<hex>", "job", "host", "pid", "epoch", "acquired", "renewed",
     "expires" (UTC ISO), "expires_unix", "ttl_s", "released": bool}

Taking a lease creates the next epoch with an exclusive create (``storage.create_exclusive``:
``os.link`` on a local path, a conditional PUT ``If-None-Match: *`` on S3): of two runs that
race, exactly one creates it; taking over a crashed holder's expired lease is the same step.
The holder alone rewrites its epoch: a heartbeat thread renews it every ``ttl_s / 3`` (default
ttl 10 min) and marks it released at the end. A holder that stalled past its expiry and was
taken over finds a higher epoch: it raises ``LeaseLost`` at the next stage or before moving
``latest`` (``check_held``), so its results are not promoted.

Expiry compares the holder's clock with the reader's: keep clocks in sync (NTP) to well under
``ttl_s``, and keep ``ttl_s`` above the time a dead driver's Ray workers can outlive it.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .storage import Storage, create_exclusive, replace_atomic

LEASES = "leases"
_EPOCH = re.compile(r"(\d{8})\.json")
_HELD: list[JobLease] = []  # this process's held job leases (check_held)


class LeaseLost(RuntimeError):
    """This run's lease expired and another run took it over."""


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass
class Held:
    """Why a lease could not be taken: who holds it, and until when."""
    url: str
    owner: str
    job: str | None
    expires: str

    def reason(self) -> str:
        return (f"lease {self.url} held by {self.owner} (job {self.job}) until {self.expires}")


class Lease:
    """One lease: ``<storage>/leases/<name>/``. ``acquire()`` -> None when taken, else ``Held``;
    ``renew()``, ``release()``; ``lost()`` -> True when a later epoch took it over."""

    def __init__(self, storage: Storage, name: str, *, owner: str, job: str, ttl_s: float):
        self.storage, self.name, self.owner, self.job, self.ttl_s = storage, name, owner, job, ttl_s
        self.rel = posixpath.join(LEASES, name)
        self.epoch: int | None = None
        self.acquired: str | None = None
        self.took_over: dict | None = None  # the expired record this lease replaced

    def url(self) -> str:
        return self.storage.url(self.rel)

    def _epochs(self) -> list[int]:
        self.storage.fs.invalidate_cache(self.storage.path(self.rel))  # s3fs caches listings
        return sorted(int(m.group(1)) for n in self.storage.ls(self.rel)
                      if (m := _EPOCH.fullmatch(n)))

    def _read(self, epoch: int) -> dict | None:
        return self.storage.read_json(posixpath.join(self.rel, f"{epoch:08d}.json"), default=None)

    def _record(self, epoch: int, *, released: bool = False) -> bytes:
        now = time.time()
        self.acquired = self.acquired or _iso(now)
        return json.dumps({
            "owner": self.owner, "job": self.job, "host": socket.gethostname(),
            "pid": os.getpid(), "epoch": epoch, "acquired": self.acquired, "renewed": _iso(now),
            "expires": _iso(now + self.ttl_s), "expires_unix": now + self.ttl_s,
            "ttl_s": self.ttl_s, "released": released}, indent=2, sort_keys=True).encode()

    def acquire(self) -> Held | None:
        """Take the lease (None) or say who holds it (``Held``); never waits."""
        for _ in range(5):  # a record deleted or created under us: look again
            epochs = self._epochs()
            nxt, last = 0, None
            if epochs:
                last = self._read(epochs[-1])
                if last is None:
                    continue
                if last["owner"] == self.owner and not last["released"]:
                    self.epoch = epochs[-1]  # ours already (a retried create that had succeeded)
                    return None
                if not last["released"] and last["expires_unix"] > time.time():
                    return Held(self.url(), last["owner"], last.get("job"), last["expires"])
                nxt = epochs[-1] + 1
            if create_exclusive(self.storage, posixpath.join(self.rel, f"{nxt:08d}.json"),
                                self._record(nxt)):
                self.epoch = nxt
                self.took_over = last if last is not None and not last["released"] else None
                for old in epochs[:-1]:  # keep the previous record for the history
                    try:
                        self.storage.fs.rm_file(self.storage.path(self.rel, f"{old:08d}.json"))
                    except FileNotFoundError:  # another run's clean-up got there first
                        pass
                return None
        raise RuntimeError(f"lease {self.url()}: its records kept changing; try again")

    def lost(self) -> bool:
        """True when another run holds a later epoch (this one stalled past its expiry)."""
        return self.epoch is not None and max(self._epochs(), default=-1) > self.epoch

    def renew(self) -> None:
        """Push the expiry ``ttl_s`` ahead (the heartbeat); LeaseLost when taken over."""
        if self.lost():
            raise LeaseLost(f"lease {self.url()} was taken over: this run outlived its expiry")
        replace_atomic(self.storage, posixpath.join(self.rel, f"{self.epoch:08d}.json"),
                       self._record(self.epoch))

    def release(self) -> None:
        """Mark the lease released (the next run takes it at once); nothing if it was lost."""
        if self.epoch is not None and not self.lost():
            replace_atomic(self.storage, posixpath.join(self.rel, f"{self.epoch:08d}.json"),
                           self._record(self.epoch, released=True))
        self.epoch, self.acquired = None, None


def job_lease_names(job_name: str, store: str, model_name: str) -> list[str]:
    """The leases a job takes, in the order it takes them."""
    return [f"job-{job_name}", f"store-{store}", f"model-{model_name}"]


class JobLease:
    """A job's leases, taken together (all or none) and renewed by one heartbeat thread."""

    def __init__(self, storage: Storage, *, job_name: str, store: str, model_name: str,
                 ttl_s: float = 600.0):
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ttl_s = ttl_s
        self.leases = [Lease(storage, n, owner=self.owner, job=job_name, ttl_s=ttl_s)
                       for n in job_lease_names(job_name, store, model_name)]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost_reason: str | None = None

    @classmethod
    def for_job(cls, job, storage: Storage) -> JobLease:
        return cls(storage, job_name=job.name, store=job.store, model_name=job.model_name,
                   ttl_s=job.lease.ttl_s)

    def acquire(self, wait_s: float = 0.0) -> Held | None:
        """Take every lease (None) or none of them (the ``Held`` one that stopped it), waiting up
        to ``wait_s`` for held ones; on success the heartbeat starts."""
        deadline = time.monotonic() + wait_s
        while True:
            held = self._try()
            if held is None:
                for lease in self.leases:
                    if lease.took_over:
                        t = lease.took_over
                        print(f"[lease] took over {lease.url()}: {t['owner']} (job {t.get('job')})"
                              f" let it expire at {t['expires']}", flush=True)
                self._thread = threading.Thread(target=self._beat, daemon=True,
                                                name="lease-heartbeat")
                self._thread.start()
                _HELD.append(self)
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return held
            time.sleep(min(left, max(0.2, min(5.0, self.ttl_s / 20))))

    def _try(self) -> Held | None:
        taken = []
        for lease in self.leases:
            try:
                held = lease.acquire()
            except BaseException:
                for t in taken:
                    t.release()
                raise
            if held is not None:
                for t in taken:
                    t.release()
                return held
            taken.append(lease)
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            for lease in self.leases:
                try:
                    lease.renew()
                except LeaseLost as e:
                    self.lost_reason = str(e)
                    print(f"[lease] {e}", flush=True)
                    return
                except Exception as e:  # noqa: BLE001 -- storage hiccup: the next beat retries
                    print(f"[lease] renewing {lease.url()} failed ({type(e).__name__}: {e}); "
                          f"retrying in {self.ttl_s / 3:.0f}s", flush=True)

    def check(self, what: str) -> None:
        """LeaseLost unless every lease is still this run's (before ``what``)."""
        reason = self.lost_reason or next(
            (f"lease {le.url()} was taken over by a later run" for le in self.leases if le.lost()),
            None)
        if reason:
            raise LeaseLost(f"{reason}: not going on with {what} (this run stalled longer than "
                            f"lease.ttl_s={self.ttl_s:g}s)")

    def release(self) -> None:
        """Stop the heartbeat and release every lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self in _HELD:
            _HELD.remove(self)
        for lease in self.leases:
            lease.release()

    def records(self) -> dict[str, Any]:
        """{lease name: epoch} of the held leases (for the job summary)."""
        return {le.name: le.epoch for le in self.leases}


def check_held(what: str) -> None:
    """LeaseLost when a lease this process holds was taken over (no-op without a lease)."""
    for job_lease in _HELD:
        job_lease.check(what)
