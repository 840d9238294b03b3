"""Command line: ``python -m pipeline run JOB.yaml [key.path=value ...] [--stages extract,train]``,
``python -m pipeline reencode JOB.yaml --codec fp8 [--to NAME]`` (``pipeline.reencode``) and
``python -m pipeline leaderboard JOB.yaml --presets a,b,c [--metric M]`` (``pipeline.leaderboard``).

Job files are executable (their shebang is ``#!/usr/bin/env -S python -m pipeline run``), so
``jobs/smoke.yaml`` and ``ray job submit -- jobs/full.yaml`` run the same thing.

Before any work the job file is validated (exit 2) and the outside world is checked: storage
writable, sources and model sources present (exit 3); then Ray starts, for the stages that use it
(extract, train, and evaluate when it trains the floor). A failure prints one line, ``error:
stage <s>: <Type>: <why>`` (exit 1); the traceback too with --traceback or TOKCONV_TRACEBACK=1.
Credentials in storage options are masked in --print-config and in runs/<name>/summary.json,
which also records a failed stage.

Runs never overlap: after the checks the job takes its leases in storage (``pipeline.lease``: the
job, its feature store, its model). A run that finds one held by a live run waits up to
``lease.wait_s`` and then skips, exit 0, printing ``skipped: lease ... held by ... until ...``
(also in runs/<name>/skipped.json): right for a scheduled run whose tick was started twice.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import posixpath
import re
import sys
import time
import traceback

from .artifacts import job_run_dir
from .checks import PreflightError, preflight
from .config import STAGES, ConfigError, JobConfig, format_config, load_job
from .lease import Held, JobLease
from .storage import Storage, first_line, mask_secrets, utc_now, wrapped_errors

# stage name -> (module, runner); runners take (job, storage) and return a JSON-able summary
STAGE_RUNNERS = {
    "extract": ("pipeline.extract", "run_extract"),
    "train": ("pipeline.train", "run_train"),
    "evaluate": ("pipeline.evaluate", "run_evaluate"),
    "export": ("pipeline.export", "run_export"),
}
RAY_STAGES = ("extract", "train")  # evaluate (unless it trains the floor) and export: no cluster


def _uses_ray(stage: str, job: JobConfig, storage: Storage) -> bool:
    if stage == "evaluate":
        from .evaluate import floor_to_train
        return floor_to_train(job, storage)
    return stage in RAY_STAGES


def _parse_stages(text: str | None) -> list[str] | None:
    if text is None:
        return None
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {', '.join(unknown)}; "
                          f"known: {', '.join(STAGES)}")
    return [s for s in STAGES if s in stages]


def init_ray(job: JobConfig) -> bool:
    """Connect to ``ray.address`` / ``$RAY_ADDRESS`` or start a local cluster on loopback.
    Returns True when this call started Ray (so the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = job.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs = {"runtime_env": job.ray.runtime_env or None, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # An embedded cluster for one job on this machine: loopback only, no token auth.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=job.ray.num_cpus, num_gpus=job.ray.num_gpus,
                 object_store_memory=job.ray.object_store_memory, include_dashboard=False,
                 _node_ip_address="127.0.0.1", **kwargs)
    return True


def error_line(e: BaseException) -> str:
    """One line for a failed job: the stage (from the note run_job adds), the error's type and the
    first line of its message, with Ray's wrappers (task errors, training worker errors) opened."""
    stage = next((n[7:] for n in getattr(e, "__notes__", ()) if n.startswith("stage: ")), None)
    where = f"stage {stage}: " if stage else ""
    inner, wrappers = e, []
    for _ in range(10):  # RayTaskError.cause, WorkerGroupError.worker_failures, ControllerError
        nxt = next(iter(wrapped_errors(inner)), None)
        if nxt is None and any(c.__name__ == "UserCodeException" for c in type(inner).__mro__):
            # Ray Data's "UDF failed to process a data block", raised from the UDF's error: that
            # error is lost on the way from the worker, its traceback text is kept by the wrapper
            nxt = inner.__cause__
            line = None if nxt is not None else _udf_error(wrappers)
            if line:
                return f"{where}{line}"
        if not isinstance(nxt, BaseException):
            break
        wrappers.append(inner)
        inner = nxt
    return f"{where}{type(inner).__name__}: {first_line(inner)}"


# "pipeline.storage.StorageError: writing a shard ...": an exception line of a traceback
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception)): (.+)$")


def _udf_error(wrappers: list[BaseException]) -> str | None:
    """``Type: message`` of the UDF's error in a Ray task error's remote traceback: the last
    exception line before the UserCodeException raised from it (the last chained part)."""
    for w in wrappers:
        parts = str(w).split("The above exception was the direct cause")
        if len(parts) < 2:
            continue
        found = [m for ln in parts[-2].splitlines() if (m := _EXCEPTION_LINE.match(ln.strip()))]
        if found:
            return f"{found[-1].group(1)}: {found[-1].group(2)}"
    return None


def run_job(job: JobConfig, stages: list[str] | None = None) -> dict:
    """Check the outside world (``checks.preflight``), take the job's leases (``pipeline.lease``),
    then run the job's stages in order; returns {stage: summary}, or {"skipped": why} when another
    run holds a lease. Writes runs/<name>/summary.json (credentials masked), also when a stage
    fails (its ``failed`` entry names the stage and the error), then re-raises."""
    stages = stages or job.stages
    preflight(job, stages)  # before Ray starts or any stage does work: PreflightError names it
    storage = Storage(job.storage.url, job.storage.options)
    lease = JobLease.for_job(job, storage) if job.lease.enabled else None
    held = lease.acquire(wait_s=job.lease.wait_s) if lease else None
    if held is not None:  # another run of this job, store or model is under way: not an error
        return _skipped(job, storage, held)
    try:
        results = _run_stages(job, stages, storage, lease)
    except BaseException:
        if lease is not None:  # the stage's error is the one to report (the storage may be gone)
            try:
                lease.release()
            except Exception as e:  # noqa: BLE001
                print(f"[lease] could not release the job's leases: {error_line(e)}",
                      file=sys.stderr, flush=True)
        raise
    if lease is not None:
        lease.release()
    return results


def _skipped(job: JobConfig, storage: Storage, held: Held) -> dict:
    """A scheduled run that found its lease held: say so (runs/<job>/skipped.json), do nothing."""
    record = {"skipped": f"skipped: {held.reason()}", "lease": held.url, "holder": held.owner,
              "holder_job": held.job, "until": held.expires, "time": utc_now()}
    print(f"[lease] {record['skipped']}; nothing done (lease.wait_s={job.lease.wait_s:g})",
          flush=True)
    storage.write_json(posixpath.join(job_run_dir(job.name), "skipped.json"), record)
    return {"skipped": record}


def _run_stages(job: JobConfig, stages: list[str], storage: Storage,
                lease: JobLease | None) -> dict:
    started_ray, ray_ready = False, False
    results: dict[str, dict] = {}
    record = {"job": job.name, "stages": results, "config": mask_secrets(job.model_dump()),
              "leases": lease.records() if lease is not None else None}
    where = posixpath.join(job_run_dir(job.name), "summary.json")
    try:
        for i, stage in enumerate(stages, 1):
            if lease is not None:
                lease.check(f"stage {stage}")  # a run that stalled past its expiry stops here
            if not ray_ready and _uses_ray(stage, job, storage):
                started_ray, ray_ready = init_ray(job), True
            module, fn = STAGE_RUNNERS[stage]
            print(f"\n=== [{i}/{len(stages)}] {stage} ===", flush=True)
            t0 = time.perf_counter()
            try:
                summary = getattr(importlib.import_module(module), fn)(job, storage)
            except Exception as e:
                e.add_note(f"stage: {stage}")
                record["failed"] = {"stage": stage, "error": error_line(e)}
                try:
                    storage.write_json(where, mask_secrets(record))
                except Exception as w:  # noqa: BLE001 -- the stage's own error is the one to raise
                    print(f"[job] could not write {storage.url(where)}: {error_line(w)}",
                          file=sys.stderr, flush=True)
                raise
            summary = dict(summary or {}, seconds=round(time.perf_counter() - t0, 2))
            results[stage] = summary
            print(f"=== {stage} done in {summary['seconds']:.1f}s ===", flush=True)
        storage.write_json(where, mask_secrets(record))
    finally:
        if started_ray:
            import ray
            ray.shutdown()
    return results


def _print_outcome(job: JobConfig, results: dict) -> None:
    storage = Storage(job.storage.url, job.storage.options)
    print("\n=== summary ===")
    print(json.dumps(results, indent=2, default=str))
    where = {
        "feature store": results.get("extract", {}).get("store_url"),
        "metrics": results.get("evaluate", {}).get("metrics_url"),
        "exported model": results.get("export", {}).get("uri"),
        "job summary": storage.url(job_run_dir(job.name),
                                   "skipped.json" if "skipped" in results else "summary.json"),
    }
    for what, url in where.items():
        if url:
            print(f"{what:>15}: {url}")
    for stage, s in results.items():  # what failed during a stage and how it recovered
        if isinstance(s, dict) and s.get("recovery"):
            print(f"{'recovered':>15}: {stage}: {s['recovery']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job file's stages in order")
    run.add_argument("job", help="job YAML (e.g. jobs/smoke.yaml)")
    run.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.epochs=3")
    run.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)}")
    run.add_argument("--print-config", action="store_true",
                     help="print the validated config (credentials masked) and exit")
    run.add_argument("--traceback", action="store_true",
                     help="on failure print the traceback, not only the one-line error "
                          "(also: TOKCONV_TRACEBACK=1)")
    # `reencode JOB.yaml --codec fp8 [--to NAME]`: a store in another codec (issue 15)
    from .reencode import add_parser as add_reencode_parser
    add_reencode_parser(sub)
    # `leaderboard JOB.yaml --presets a,b,c`: presets on one store with one budget (issue 14)
    from .leaderboard import add_parser as add_leaderboard_parser
    add_leaderboard_parser(sub)
    # Overrides may come after options too (`job.yaml --print-config a.b=1`, as a shebang runs it).
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + extra
    if args.command == "reencode":
        from .reencode import main as reencode_main
        return reencode_main(args)
    if args.command == "leaderboard":
        from .leaderboard import main as leaderboard_main
        return leaderboard_main(args, init_ray=init_ray)

    try:
        job = load_job(args.job, args.overrides)
        stages = _parse_stages(args.stages)
    except ConfigError as e:
        lines = str(e).splitlines()  # one problem: one line; several: the header, one line each
        print("error: " + (f"{lines[0]} {lines[1].strip()}" if len(lines) == 2 else str(e)),
              file=sys.stderr)
        return 2
    if args.print_config:
        print(format_config(job))
        return 0
    try:
        results = run_job(job, stages)
    except PreflightError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 3
    except Exception as e:  # noqa: BLE001 -- one line (what, where, why) unless asked for more
        if args.traceback or os.environ.get("TOKCONV_TRACEBACK") == "1":
            traceback.print_exc()
        print(f"error: job {job.name}, {error_line(e)}", file=sys.stderr)
        return 1
    _print_outcome(job, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
