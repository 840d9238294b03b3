"""Command line: ``python -m pipeline run JOB.yaml [key.path=value ...] [--stages extract,train]``
and ``python -m pipeline reencode JOB.yaml --codec fp8 [--to NAME]`` (``pipeline.reencode``).

Job files are executable (their shebang is ``#!/usr/bin/env -S python -m pipeline run``), so
``jobs/smoke.yaml`` and ``ray job submit -- jobs/full.yaml`` run the same thing.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import posixpath
import sys
import time

from .artifacts import job_run_dir
from .config import STAGES, ConfigError, JobConfig, load_job
from .storage import Storage

# stage name -> (module, runner); runners take (job, storage) and return a JSON-able summary
STAGE_RUNNERS = {
    "extract": ("pipeline.extract", "run_extract"),
    "train": ("pipeline.train", "run_train"),
    "evaluate": ("pipeline.evaluate", "run_evaluate"),
    "export": ("pipeline.export", "run_export"),
}


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


def run_job(job: JobConfig, stages: list[str] | None = None) -> dict:
    """Run the job's stages in order; returns {stage: summary}. Writes runs/<name>/summary.json."""
    stages = stages or job.stages
    storage = Storage(job.storage.url, job.storage.options)
    started_ray = init_ray(job)
    results: dict[str, dict] = {}
    try:
        for i, stage in enumerate(stages, 1):
            module, fn = STAGE_RUNNERS[stage]
            print(f"\n=== [{i}/{len(stages)}] {stage} ===", flush=True)
            t0 = time.perf_counter()
            summary = getattr(importlib.import_module(module), fn)(job, storage)
            summary = dict(summary or {}, seconds=round(time.perf_counter() - t0, 2))
            results[stage] = summary
            print(f"=== {stage} done in {summary['seconds']:.1f}s ===", flush=True)
        storage.write_json(posixpath.join(job_run_dir(job.name), "summary.json"),
                           {"job": job.name, "stages": results})
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
        "job summary": storage.url(job_run_dir(job.name), "summary.json"),
    }
    for what, url in where.items():
        if url:
            print(f"{what:>15}: {url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job file's stages in order")
    run.add_argument("job", help="job YAML (e.g. jobs/smoke.yaml)")
    run.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.epochs=3")
    run.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)}")
    run.add_argument("--print-config", action="store_true",
                     help="print the validated config and exit")
    # `reencode JOB.yaml --codec fp8 [--to NAME]`: a store in another codec (issue 15)
    from .reencode import add_parser as add_reencode_parser
    add_reencode_parser(sub)
    # Overrides may come after options too (`job.yaml --print-config a.b=1`, as a shebang runs it).
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + extra
    if args.command == "reencode":
        from .reencode import main as reencode_main
        return reencode_main(args)

    try:
        job = load_job(args.job, args.overrides)
        stages = _parse_stages(args.stages)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(job.model_dump(), indent=2))
        return 0
    results = run_job(job, stages)
    _print_outcome(job, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
