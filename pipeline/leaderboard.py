"""Leaderboard: converter presets trained on ONE feature store with ONE budget (the job's train
settings), each evaluated on the same split, ranked by one metric, cost beside fidelity.

    python -m pipeline leaderboard JOB.yaml --presets a,b,c [--metric mean_cosine]
        [--preset-kwargs '{a: {dim: 64}}'] [key.path=value ...]

Per preset (``--presets``; each preset's keywords from ``--preset-kwargs``, the job's
``train.converter_kwargs`` for the job's own converter): ``pipeline.budget.train_once`` under
``runs/<job>/leaderboard/<preset>/`` (the train stage: Ray Train, an unfinished run resumes, a
finished one with the same settings and store is reused), then ``evaluate.evaluate_stage`` there
(skipped when its metrics.json already scores that checkpoint on that split). Then, under
``runs/<job>/leaderboard/``::

    leaderboard.json   {"metric", "higher_is_better", "split", "store", "budget", backbone
                        latencies, "rows": [one per preset, best first (``row``)]}
    leaderboard.csv    the rows flattened, raw numbers (one column per figure)
    leaderboard.html   the table (numbers through pipeline.fmt) and Pareto plots of cost against
                       fidelity (inline PNG; without matplotlib the page says so)

A row's figures are copied from that preset's own metrics.json; its cost against the teachers
comes from the store's measured backbone latencies (``report.summary.latency_saving``).
"""
from __future__ import annotations

import csv
import io
import json
import posixpath
import sys
from typing import Any

import yaml

from .artifacts import EVAL_DIR, ModelRegistry, job_run_dir
from .config import ConfigError, JobConfig, validate
from .featurestore import FeatureStore
from .storage import Storage, utc_now

BOARD_DIR = "leaderboard"
FIDELITY = ("cosine", "r2", "mse")


# ------------------------------------------------------------------------------ rows and ranking

def row(preset: str, kwargs: dict, metrics: dict, meta: dict, *, metric: str) -> dict[str, Any]:
    """One preset's figures, from its metrics.json and the store's meta (backbone latencies)."""
    from .export import metric_value
    from .report.summary import converter_timing, latency_saving

    conv = metrics.get("converter") or {}
    try:
        value = metric_value(metrics, metric)
    except (KeyError, TypeError):
        value = None
    saving, why = latency_saving(metrics, meta.get("backbone_latency_ms"),
                                 meta.get("backbone_device"))
    timed, timed_on, timed_batch = converter_timing(metrics, meta.get("backbone_device"))
    return {
        "preset": preset, "converter_kwargs": kwargs, "value": value,
        **{k: metrics.get(k) for k in ("mean_cosine", "mean_r2", "mean_mse", "top1", "top5",
                                       "clips")},
        "targets": {t: {k: m.get(k) for k in FIDELITY}
                    for t, m in (metrics.get("targets") or {}).items()},
        **{k: conv.get(k) for k in ("params", "head_params", "gflops_per_clip",
                                    "latency_ms_per_clip", "latency_device",
                                    "latency_ms_per_clip_cpu")},
        "cost_ms_per_clip": timed, "cost_device": timed_on, "cost_batch": timed_batch,
        "cost": saving, "cost_note": why,
    }


def rank(rows: list[dict], higher_is_better: bool) -> list[dict]:
    """Best first by "value" (missing values last); sets "rank" and "pareto" (no other row is at
    least as good on both fidelity and cost, and better on one; cost: ``cost_ms_per_clip``)."""
    def key(r):
        v = r["value"]
        return (v is None, -(v or 0.0) if higher_is_better else (v or 0.0))
    out = sorted(rows, key=key)
    sign = 1.0 if higher_is_better else -1.0
    for i, r in enumerate(out, 1):
        r["rank"] = i
        v, c = r["value"], r["cost_ms_per_clip"]
        if v is None or c is None:
            r["pareto"] = False
            continue
        r["pareto"] = not any(
            o is not r and o["value"] is not None and o["cost_ms_per_clip"] is not None
            and sign * o["value"] >= sign * v and o["cost_ms_per_clip"] <= c
            and (sign * o["value"] > sign * v or o["cost_ms_per_clip"] < c) for o in out)
    return out


def to_csv(rows: list[dict], metric: str) -> str:
    """The rows flattened: one column per figure, raw numbers, kwargs as JSON."""
    targets = list(dict.fromkeys(t for r in rows for t in r["targets"]))
    cost_keys = ("full", "mine", "saving", "share", "vs_teachers")
    head = (["rank", "preset", metric, "mean_cosine", "mean_r2", "mean_mse", "top1", "top5"]
            + [f"{t}.{k}" for t in targets for k in FIDELITY]
            + ["params", "head_params", "gflops_per_clip", "latency_ms_per_clip", "latency_device",
               "latency_ms_per_clip_cpu", "cost_ms_per_clip", "cost_device", "cost_batch"]
            + [f"cost.{k}" for k in cost_keys] + ["pareto", "converter_kwargs"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    for r in rows:
        cost = r["cost"] or {}
        w.writerow([r["rank"], r["preset"], r["value"], r["mean_cosine"], r["mean_r2"],
                    r["mean_mse"], r["top1"], r["top5"],
                    *(r["targets"].get(t, {}).get(k) for t in targets for k in FIDELITY),
                    r["params"], r["head_params"], r["gflops_per_clip"],
                    r["latency_ms_per_clip"], r["latency_device"], r["latency_ms_per_clip_cpu"],
                    r["cost_ms_per_clip"], r["cost_device"], r["cost_batch"],
                    *(cost.get(k) for k in cost_keys), r["pareto"],
                    json.dumps(r["converter_kwargs"], sort_keys=True)])
    return buf.getvalue()


# ------------------------------------------------------------------------------------- the run

def run_leaderboard(job: JobConfig, storage: Storage, presets: dict[str, dict], *, metric: str,
                    higher_is_better: bool) -> dict[str, Any]:
    """Train (or reuse) and evaluate every preset of ``presets`` ({name: converter kwargs}) on the
    job's store with the job's budget; write leaderboard.json/.csv/.html; returns the board."""
    from .budget import budget_config, train_once
    from .evaluate import evaluate_stage
    from .report.leaderboard import leaderboard_page

    store = FeatureStore(storage, job.store)
    registry = ModelRegistry(storage, job.model_name)
    base = posixpath.join(job_run_dir(job.name), BOARD_DIR)
    ecfg = job.evaluate.model_copy(update={"floor": "off"})  # the floor is a row if listed
    rows = []
    for i, (preset, kwargs) in enumerate(presets.items(), 1):
        print(f"\n=== [{i}/{len(presets)}] {preset} ===", flush=True)
        run_dir = posixpath.join(base, preset)
        tc = budget_config(job.train, preset, kwargs)
        info, trained = train_once(tc, storage, store=store, registry=registry, run_dir=run_dir)
        rel = posixpath.join(run_dir, EVAL_DIR, "metrics.json")
        m = storage.read_json(rel, default=None)
        fresh = (not trained and m is not None and m.get("checkpoint") == info["checkpoint"]
                 and m.get("split") == ecfg.split)
        if not fresh:
            evaluate_stage(ecfg, storage, store=store, registry=registry, run_dir=run_dir,
                           metric=metric, higher_is_better=higher_is_better, compare_latest=False)
            m = storage.read_json(rel)
        r = row(preset, kwargs, m, store.read_meta(), metric=metric)
        report = posixpath.join(run_dir, EVAL_DIR, "report.html")
        r.update(metrics_url=storage.url(rel), run=info.get("run"), trained_now=trained,
                 evaluated_now=not fresh,
                 report_url=storage.url(report) if storage.exists(report) else None)
        rows.append(r)
    meta = store.read_meta()
    budget = job.train.model_dump(mode="json", exclude={"converter", "converter_kwargs"})
    board = {"job": job.name, "store": store.name, "split": ecfg.split, "metric": metric,
             "higher_is_better": higher_is_better, "generated": utc_now(),
             "budget": {**budget, "warm_start": False},
             **{k: meta.get(k) for k in ("backbone_latency_ms", "backbone_device",
                                         "backbone_latency_batch")},
             "rows": rank(rows, higher_is_better)}
    storage.write_json(posixpath.join(base, "leaderboard.json"), board)
    storage.write_bytes(posixpath.join(base, "leaderboard.csv"),
                        to_csv(board["rows"], metric).encode())
    storage.write_bytes(posixpath.join(base, "leaderboard.html"),
                        leaderboard_page(board).encode())
    board["urls"] = {k: storage.url(base, f"leaderboard.{k}") for k in ("json", "csv", "html")}
    return board


# ------------------------------------------------------------------------------------- the CLI

def add_parser(sub) -> None:
    """The ``leaderboard`` subcommand of ``python -m pipeline``."""
    p = sub.add_parser("leaderboard", help="train presets on one store with one budget, rank them")
    p.add_argument("job", help="job YAML: its storage, store and train settings (the budget)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.epochs=3")
    p.add_argument("--presets", required=True, help="comma-separated converter presets")
    p.add_argument("--metric", help="metrics.json key ranking the rows (default: export.metric)")
    p.add_argument("--preset-kwargs", default="{}",
                   help="YAML mapping preset -> converter kwargs, "
                        "e.g. '{convmix_small: {dim: 64}}'")


def parse_presets(job: JobConfig, text: str, kwargs_text: str) -> dict[str, dict]:
    """``--presets`` / ``--preset-kwargs`` -> {preset: kwargs}, each checked as the job's
    train.converter would be (names, keywords, values); ConfigError naming the preset."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"--presets: give distinct preset names, got {text!r}")
    try:
        given = yaml.safe_load(kwargs_text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--preset-kwargs is not YAML: {e}") from None
    if not isinstance(given, dict) or not all(isinstance(v, dict) for v in given.values()):
        raise ConfigError(f"--preset-kwargs: expected {{preset: {{key: value}}}}, got {given!r}")
    extra = sorted(set(given) - set(names))
    if extra:
        raise ConfigError(f"--preset-kwargs: {', '.join(extra)} not in --presets")
    out = {}
    for n in names:
        kw = given.get(n, job.train.converter_kwargs if n == job.train.converter else {})
        data = job.model_dump()
        data["train"] = {**data["train"], "converter": n, "converter_kwargs": kw}
        try:
            validate(data, f"--presets {n}")
        except ConfigError as e:
            raise ConfigError(str(e)) from None
        out[n] = dict(kw)
    return out


def main(args, *, init_ray) -> int:
    """Run ``leaderboard`` for parsed ``args``; 0 on success, 2 on bad input, 3 when the store or
    storage is not there (said on stderr)."""
    from tokconv.targets import TEACHERS

    from .checks import PreflightError, preflight
    from .config import load_job
    from .evaluate import promotion_metrics

    try:
        job = load_job(args.job, args.overrides)
        presets = parse_presets(job, args.presets, args.preset_kwargs)
        metric = args.metric or job.export.metric
        known = promotion_metrics(TEACHERS)
        if metric not in known:
            raise ConfigError(f"--metric: {metric!r} is not a metric the evaluate stage writes; "
                              f"allowed: {', '.join(known)}")
        preflight(job, ["train"])  # storage writable, the feature store there
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PreflightError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 3
    storage = Storage(job.storage.url, job.storage.options)
    started = init_ray(job)
    try:
        board = run_leaderboard(job, storage, presets, metric=metric,
                                higher_is_better=known[metric])
    except Exception as e:  # noqa: BLE001 -- one line; a re-run resumes where this stopped
        text = next((ln for ln in str(e).splitlines() if ln.strip()), "")
        print(f"error: leaderboard {job.name}: {type(e).__name__}: {text}", file=sys.stderr)
        return 1
    finally:
        if started:
            import ray
            ray.shutdown()
    print(f"\n=== leaderboard by {metric} ===")
    for r in board["rows"]:
        print(f"{r['rank']:>3}. {r['preset']:<28} {metric} {r['value']}")
    for k, url in board["urls"].items():
        print(f"{k:>5}: {url}")
    return 0
