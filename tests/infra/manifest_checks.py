"""Checks for the deployment files under infra/, used by test_manifests.py (each returns a list
of error strings; an empty list passes).

The KubeRay field table is crd_table.CRD_FIELDS (generated from the v1.6.2 CRDs); the operator-side
rules are those of ray-operator/controllers/ray/utils/validation.go at v1.6.2 that our specs could
break; cron expressions follow robfig/cron's ParseStandard (what Kubernetes' CronJob and KubeRay's
RayCronJob both use), restricted to plain 5-field expressions.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import re
import shlex
from pathlib import Path

import yaml
from crd_table import CHILDREN, FIELDS, KINDS, QUANTITY

from pipeline.config import load_job

ROOT = Path(__file__).resolve().parents[2]
SHEBANG = "#!/usr/bin/env -S python -m pipeline run"
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}  # rayjob_types.go
MAX_RAYCLUSTER_NAME = 53  # constant.go v1.6.2: MaxRayClusterNameLength
MAX_RAYJOB_NAME = 47  # MaxRayClusterNameLength - 6
# 1.6 names child RayJobs <name>-<5 chars>; 1.7 (kuberay PR 4888) <name>-<minute> and checks 36
MAX_RAYCRONJOB_NAME = 36
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
CREDENTIAL_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
ACCESS_KEY_LITERAL = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


# ------------------------------------------------------------------ loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last one silently)."""


def _no_duplicates(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    dups = sorted({str(k) for k in keys if keys.count(k) > 1})
    if dups:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicate key(s) {dups}", node.start_mark
        )
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_docs(text: str) -> list:
    return [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]


# ------------------------------------------------------------------ the checks


def check_fields(node, type_name: str, where: str) -> list[str]:
    """Errors of ``node`` against CRD_FIELDS[type_name], recursing along CHILDREN."""
    if not isinstance(node, dict):
        return [f"{where}: expected a mapping, got {type(node).__name__}"]
    fields, errors = FIELDS[type_name], []
    errors += [
        f"{where}.{k}: not a field of {type_name} in the KubeRay v1.6.2 CRDs"
        for k in node
        if k not in fields
    ]
    errors += [
        f"{where}.{k}: required by {type_name}"
        for k, (_, req) in fields.items()
        if req and k not in node
    ]
    for key, value in node.items():
        if key not in fields:
            continue
        code, path = fields[key][0], f"{where}.{key}"
        if not _type_ok(code, value):
            errors.append(f"{path}: {value!r} is not of CRD type {code}")
        elif key in CHILDREN.get(type_name, {}):
            child = CHILDREN[type_name][key]
            items = value if code == "a" else [value]
            for i, item in enumerate(items):
                errors += check_fields(item, child, f"{path}[{i}]" if code == "a" else path)
    return errors


def _type_ok(code: str, v) -> bool:
    quantity = (isinstance(v, int) and not isinstance(v, bool)) or (
        isinstance(v, str) and QUANTITY.match(v)
    )
    if code.startswith("e("):
        return v in code[2:-1].split("|")
    return {
        "s": isinstance(v, str),
        "i": isinstance(v, int) and not isinstance(v, bool),
        "b": isinstance(v, bool),
        "n": isinstance(v, int | float) and not isinstance(v, bool),
        "o": isinstance(v, dict),
        "a": isinstance(v, list),
        "q": bool(quantity),
        "m": isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
        "Q": isinstance(v, dict) and all(_type_ok("q", x) for x in v.values()),
    }[code]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


RAY_START_RESOURCES = ("num-cpus", "num-gpus", "memory", "resources")


def check_cluster_rules(spec: dict, where: str) -> list[str]:
    """validation.go v1.6.2 ValidateRayClusterSpec: the rules our specs could break."""
    errors = []
    token = (spec.get("authOptions") or {}).get("mode") == "token"
    if token and _version(spec.get("rayVersion", "0")) < (2, 52, 0):
        errors.append(f"{where}: authOptions.mode token needs rayVersion >= 2.52.0")
    head = [("head", spec.get("headGroupSpec", {}))]
    for name, g in head + [(g.get("groupName"), g) for g in spec.get("workerGroupSpecs", [])]:
        start = g.get("rayStartParams", {})
        if g.get("resources") and any(start.get(k) for k in RAY_START_RESOURCES):
            errors.append(f"{where} group {name}: resources in both rayStartParams and resources")
        if name == "head":
            continue
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if lo is None or hi is None:
            if not spec.get("enableInTreeAutoscaling"):
                errors.append(f"{where} group {name}: minReplicas and maxReplicas are needed")
        elif not 0 <= lo <= g.get("replicas", lo) <= hi:
            errors.append(
                f"{where} group {name}: needs 0 <= minReplicas <= replicas <= maxReplicas"
            )
    return errors


def check_job_rules(spec: dict, where: str) -> list[str]:
    """validation.go v1.6.2 ValidateRayJobSpec: the rules our specs could break."""
    errors, mode = [], spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        errors.append(f"{where}.submissionMode: {mode!r} is not one of {sorted(SUBMISSION_MODES)}")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        errors.append(f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    if (spec.get("deletionStrategy") or {}).get("deletionRules") and spec.get(
        "shutdownAfterJobFinishes"
    ):
        errors.append(f"{where}: deletionRules and shutdownAfterJobFinishes are mutually exclusive")
    if spec.get("activeDeadlineSeconds", 1) <= 0 or spec.get("backoffLimit", 0) < 0:
        errors.append(f"{where}: activeDeadlineSeconds must be > 0 and backoffLimit >= 0")
    if mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
        errors.append(f"{where}: backoffLimit is incompatible with InteractiveMode")
    if "rayClusterSpec" not in spec and not spec.get("clusterSelector"):
        errors.append(f"{where}: one of rayClusterSpec or clusterSelector must be set")
    return errors + check_cluster_rules(spec.get("rayClusterSpec", {}), f"{where}.rayClusterSpec")


def check_kuberay(doc: dict) -> list[str]:
    """All errors of one RayCluster / RayJob / RayCronJob document."""
    kind, meta = doc.get("kind"), doc.get("metadata") or {}
    errors = [
        f"{kind}: top-level {k!r} is not a field"
        for k in doc
        if k not in ("apiVersion", "kind", "metadata", "spec")
    ]
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"{kind}: apiVersion must be ray.io/v1, got {doc.get('apiVersion')!r}")
    name = meta.get("name", "")
    limit = {
        "RayCluster": MAX_RAYCLUSTER_NAME,
        "RayJob": MAX_RAYJOB_NAME,
        "RayCronJob": MAX_RAYCRONJOB_NAME,
    }[kind]
    if not DNS1035.match(name) or len(name) > limit:
        errors.append(
            f"{kind} {name!r}: name must be a DNS-1035 label of at most {limit} characters"
        )
    spec, where = doc.get("spec"), f"{kind} {name}: spec"
    errors += check_fields(spec, KINDS[kind][1], where)
    if errors:
        return errors
    if kind == "RayCluster":
        return check_cluster_rules(spec, where)
    if kind == "RayJob":
        return check_job_rules(spec, where)
    return check_job_rules(spec["jobTemplate"], f"{where}.jobTemplate")


def check_entrypoint(entrypoint: str) -> list[str]:
    """The entrypoint runs an executable job file of jobs/ whose overrides validate."""
    job, *overrides = shlex.split(entrypoint)
    path = ROOT / job
    if not (job.startswith("jobs/") and path.is_file()):
        return [f"entrypoint {entrypoint!r}: {job} is not a job file in jobs/"]
    errors = [] if os.access(path, os.X_OK) else [f"{job} is not executable"]
    if path.read_text().splitlines()[0] != SHEBANG:
        errors.append(f"{job}: first line is not {SHEBANG!r}")
    try:
        load_job(path, overrides)
    except ValueError as e:
        errors.append(f"entrypoint {entrypoint!r}: {e}")
    return errors


def containers(node) -> list[dict]:
    """Every container / initContainer anywhere below ``node``."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("containers", "initContainers") and isinstance(v, list):
                out += [c for c in v if isinstance(c, dict)]
            out += containers(v)
    elif isinstance(node, list):
        for v in node:
            out += containers(v)
    return out


def _walk_dicts(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk_dicts(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_dicts(v)


def secret_problems(doc: dict) -> list[str]:
    """Inlined secrets in one document: Secret objects, credential-like env values."""
    if doc.get("kind") == "Secret":
        return [
            f"Secret {doc.get('metadata', {}).get('name')!r} is inlined: create it with kubectl"
        ]
    return [
        f"{doc.get('kind')}: env {e['name']} has a literal value"
        for c in containers(doc)
        for e in c.get("env", [])
        if "value" in e and CREDENTIAL_NAME.search(e["name"])
    ]


def secret_refs(doc: dict) -> set[str]:
    refs = set()
    for d in _walk_dicts(doc):
        for key in ("secretRef", "secretKeyRef"):
            if isinstance(d.get(key), dict):
                refs.add(d[key].get("name"))
    return refs


def image_problems(image: str) -> list[str]:
    """An image must carry an explicit tag other than ``latest`` (or a digest)."""
    name = image.rsplit("/", 1)[-1]
    if "@sha256:" in image:
        return []
    if ":" not in name or name.endswith(":latest"):
        return [f"image {image!r} is not pinned to a tag"]
    return []


# ------------------------------------------------------------------ cron

_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_CRON_FIELDS = (  # name, low, high, names (robfig/cron ParseStandard bounds)
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 6, _DAYS),
)


def _cron_value(text: str, low: int, names: tuple[str, ...], what: str) -> int:
    if text.upper() in names:
        return names.index(text.upper()) + low
    if not text.isdigit():
        raise ValueError(
            f"{what}: {text!r} is not a number" + (f" or one of {names}" if names else "")
        )
    return int(text)


def parse_cron(expr: str) -> tuple[tuple[set[int], bool], ...]:
    """A 5-field cron expression -> per field (allowed values, is a bare ``*``/``?``); ValueError
    names what is wrong. Descriptors (@daily) and CRON_TZ= prefixes are refused."""
    parts = expr.split()
    if len(parts) != 5:
        raise ValueError(
            f"cron {expr!r}: expected 5 fields (minute hour day-of-month month "
            f"day-of-week), got {len(parts)}"
        )
    out = []
    for part, (what, low, high, names) in zip(parts, _CRON_FIELDS):
        values: set[int] = set()
        star = False
        for item in part.split(","):
            rng, _, step_text = item.partition("/")
            step = int(step_text) if step_text.isdigit() else None
            if step_text and not step:
                raise ValueError(
                    f"cron {expr!r}: {what} step {step_text!r} must be a positive number"
                )
            if rng in ("*", "?"):
                lo, hi, star = low, high, star or (step or 1) == 1
            else:
                a, dash, b = rng.partition("-")
                lo = _cron_value(a, low, names, what)
                hi = _cron_value(b, low, names, what) if dash else (high if step else lo)
            if not low <= lo <= hi <= high:
                raise ValueError(
                    f"cron {expr!r}: {what} {rng!r} is outside {low}-{high} or reversed"
                )
            values.update(range(lo, hi + 1, step or 1))
        out.append((values, star))
    return tuple(out)


def cron_fires(expr: str, start: dt.date, days: int) -> list[dt.datetime]:
    """The times ``expr`` fires on ``days`` days from ``start``. Day of month and day of week are
    AND-ed when either is a bare ``*``, OR-ed otherwise (robfig/cron's dayMatches)."""
    (minute, _), (hour, _), (dom, dom_star), (month, _), (dow, dow_star) = parse_cron(expr)
    fires = []
    for i in range(days):
        day = start + dt.timedelta(days=i)
        d, w = day.day in dom, (day.isoweekday() % 7) in dow
        if day.month in month and ((d and w) if dom_star or dow_star else (d or w)):
            fires += [
                dt.datetime(day.year, day.month, day.day, h, m)
                for h in sorted(hour)
                for m in sorted(minute)
            ]
    return fires


def min_period(expr: str, days: int = 400) -> dt.timedelta:
    """Shortest gap between two consecutive firings over ``days`` days from 2027-01-01."""
    fires = cron_fires(expr, dt.date(2027, 1, 1), days)
    if len(fires) < 2:
        raise ValueError(f"cron {expr!r} fires fewer than twice in {days} days")
    return min(b - a for a, b in itertools.pairwise(fires))
