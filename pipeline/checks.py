"""Checks of a job before any work, in two steps.

* ``check_job(job)``: what the job file alone decides, run whenever a ``JobConfig`` validates
  (``load_job``, ``--print-config``): model names in ``models.compile``/``models.fp8``, target
  names in ``train.loss.target_weights`` and ``train.best_metric``, ``train.converter_kwargs``
  against the preset (built on the meta device: no memory, no weights), ``export.metric``
  against what the evaluate stage writes, URLs of model sources and the compile cache, botocore
  options. Nothing is contacted.
* ``preflight(job, stages)``: the outside world, first thing in a run, before Ray starts: the
  storage root is writable (bucket exists, credentials, endpoint reachable), the sources and
  remote model sources exist, and a stage run without its predecessor finds their output.

Every message is one line naming the key, the problem and the allowed values (or the URL and
the cause).
"""
from __future__ import annotations

import functools
import inspect
import posixpath
import uuid
from typing import TYPE_CHECKING, Any

from pipeline.storage import error_reason

if TYPE_CHECKING:
    from pipeline.config import JobConfig
    from pipeline.storage import Storage

# converter keywords the train stage sets itself, and where they are configured
_SET_BY_TRAIN = {"rank": "train.deficiency.rank", "mask_ratio": "train.deficiency.mask_ratio"}


class PreflightError(RuntimeError):
    """Something the job needs outside its file is missing or unreachable; one line per problem,
    each naming the key, the URL and the cause."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _names(values) -> str:
    return ", ".join(str(v) for v in values)


# ------------------------------------------------------------------------------- at load time

def _model_names(job: JobConfig) -> list[str]:
    from tokconv.targets import ALL_SPECS
    out = []
    for key in ("compile", "fp8"):
        unknown = [n for n in getattr(job.models, key) if n not in ALL_SPECS]
        if unknown:
            out.append(f"models.{key}: unknown model name(s) {_names(unknown)}; "
                       f"allowed: {_names(ALL_SPECS)}")
    return out


def _target_weights(job: JobConfig) -> list[str]:
    from tokconv.targets import TEACHERS
    unknown = [t for t in job.train.loss.target_weights if t not in TEACHERS]
    if not unknown:
        return []
    return [(f"train.loss.target_weights: unknown target(s) {_names(unknown)}; "
             f"allowed: {_names(TEACHERS)}")]


def _best_metric(job: JobConfig) -> list[str]:
    from pipeline.train_step import validation_metrics
    from tokconv.targets import TEACHERS
    allowed = validation_metrics(TEACHERS)
    if job.train.best_metric in allowed:
        return []
    return [(f"train.best_metric: {job.train.best_metric!r} is not a validation metric; "
             f"allowed: {_names(allowed)}")]


def _build_on_meta(name: str, **kwargs):
    """The preset ``name`` built for the mission layouts on the meta device (shapes only)."""
    import torch

    from tokconv.registry import create_converter
    with torch.no_grad():
        return create_converter(name, **kwargs)


@functools.cache
def converter_keywords(name: str) -> tuple[str, ...] | None:
    """Keyword arguments ``train.converter_kwargs`` may give preset ``name``: the keyword-only
    parameters of the class it builds, less those the train stage sets. None when the preset
    cannot be built here (then nothing is checked)."""
    try:
        cls = type(_build_on_meta(name))
    except Exception:  # noqa: BLE001 -- a preset this check cannot build is left to the train stage
        return None
    params = inspect.signature(cls.__init__).parameters.values()
    skip = {"student", "targets", *_SET_BY_TRAIN}
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in skip)


def _converter_kwargs(job: JobConfig) -> list[str]:
    tc = job.train
    allowed = converter_keywords(tc.converter)
    if allowed is None:
        return []
    kwargs = tc.converter_kwargs
    out = [f"train.converter_kwargs.{k}: set {where} instead" for k, where in _SET_BY_TRAIN.items()
           if k in kwargs]
    unknown = [k for k in kwargs if k not in allowed and k not in _SET_BY_TRAIN]
    if unknown:
        out.append(f"train.converter_kwargs: unknown key(s) {_names(unknown)} for converter "
                   f"{tc.converter}; allowed: {_names(allowed) or 'none'}")
    if out:
        return out
    try:  # the values too: the constructor's own checks (head counts, ranks, types)
        _build_on_meta(tc.converter, rank=tc.deficiency.rank, mask_ratio=tc.deficiency.mask_ratio,
                       **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        return [f"train.converter_kwargs: converter {tc.converter} refuses {kwargs}: {e}"]
    return []


def _export_metric(job: JobConfig) -> list[str]:
    from pipeline.evaluate import HEAD_METRICS, promotion_metrics
    from tokconv.targets import TEACHERS
    metrics, ex = promotion_metrics(TEACHERS), job.export
    if ex.metric not in metrics:
        problem = f"{ex.metric!r} is not a metric the evaluate stage writes; allowed: " \
                  f"{_names(metrics)}"
    elif ex.higher_is_better != metrics[ex.metric]:
        up = metrics[ex.metric]
        problem = f"{ex.metric} is better when {'higher' if up else 'lower'}; set " \
                  f"export.higher_is_better={str(up).lower()}"
    elif ex.metric in HEAD_METRICS and (not job.train.head.enabled or job.sources.labels == "none"):
        problem = f"{ex.metric} needs the head and labels (train.head.enabled=true, " \
                  f"sources.labels parent or manifest)"
    else:
        return []
    return [f"export.metric: {problem}"]


def _other_urls(job: JobConfig) -> list[str]:
    """URLs of sections whose own classes do not check them (model sources, the compile cache)."""
    from pipeline.storage import url_problem
    from tokconv.targets import ALL_SPECS
    urls = {f"models.{n}.source": getattr(job.models, n).source for n in ALL_SPECS}
    urls["extract.compile_cache"] = job.extract.compile_cache or ""
    return [f"{key}: {problem}" for key, url in urls.items()
            if "://" in url and (problem := url_problem(url))]


def option_sets(job: JobConfig) -> dict[str, dict[str, Any]]:
    """Every set of fsspec options of the job, by key."""
    return {"storage.options": job.storage.options,
            "sources.storage_options": job.sources.storage_options,
            "models.storage_options": job.models.storage_options}


def _botocore_options(job: JobConfig) -> list[str]:
    """``config_kwargs`` go to ``botocore.config.Config`` (retries, timeouts): it validates them."""
    out = []
    for key, opts in option_sets(job).items():
        conf = opts.get("config_kwargs")
        if conf is None:
            continue
        if not isinstance(conf, dict):
            out.append(f"{key}.config_kwargs: a mapping of botocore Config options, e.g. "
                       f"{{retries: {{max_attempts: 10, mode: adaptive}}}}")
            continue
        from botocore.config import Config
        try:
            Config(**conf)
        except Exception as e:  # noqa: BLE001 -- TypeError and botocore's own errors name the option
            out.append(f"{key}.config_kwargs: {e}")
    return out


def check_job(job: JobConfig) -> list[str]:
    """Problems of ``job`` that its file alone shows, one line each (empty: none)."""
    return [*_model_names(job), *_target_weights(job), *_best_metric(job), *_converter_kwargs(job),
            *_export_metric(job), *_other_urls(job), *_botocore_options(job)]


# ---------------------------------------------------------------------- the outside world

def _at(storage: Storage) -> str:
    endpoint = storage.options.get("endpoint_url") or \
        storage.options.get("client_kwargs", {}).get("endpoint_url")
    return f" (endpoint {endpoint})" if endpoint else ""


def _bucket_missing(storage: Storage) -> str | None:
    """For s3: the bucket's name when it does not exist (s3fs would create it on makedirs, and its
    ``exists`` hides connection errors, so the bucket is listed directly)."""
    if storage.protocol not in ("s3", "s3a"):
        return None
    bucket = storage.root.split("/", 1)[0]
    try:
        storage.fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)
    except FileNotFoundError:
        return bucket
    return None


def _writable(key: str, storage: Storage) -> str | None:
    """Write and delete one empty object at the root: bucket, credentials, endpoint, permission."""
    url = storage.url()
    try:
        bucket = _bucket_missing(storage)
        if bucket:
            return f"{key} {url}: bucket {bucket!r} does not exist{_at(storage)}"
        probe = f"_preflight-{uuid.uuid4().hex}.tmp"
        storage.write_bytes(probe, b"")
        storage.fs.rm_file(storage.path(probe))
    except Exception as e:  # noqa: BLE001 -- every cause becomes the message
        return f"{key} {url}: {error_reason(e)}{_at(storage)}"
    return None


def _exists(key: str, storage: Storage, *, directory: bool) -> str | None:
    url = storage.url()
    try:
        bucket = _bucket_missing(storage)
        if bucket:
            return f"{key} {url}: bucket {bucket!r} does not exist{_at(storage)}"
        fs, path = storage.fs, storage.root
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return f"{key} {url}: does not exist{_at(storage)}"
        if directory and not fs.isdir(path):
            return f"{key} {url}: is a file, not a directory or prefix"
    except Exception as e:  # noqa: BLE001
        return f"{key} {url}: {error_reason(e)}{_at(storage)}"
    return None


def _sources(job: JobConfig) -> list[str]:
    from pipeline.storage import Storage
    src, opts = job.sources, job.sources.storage_options
    if src.manifest:
        problem = _exists("sources.manifest", Storage(src.manifest, opts), directory=False)
    elif src.uri != "samples":
        problem = _exists("sources.uri", Storage(src.uri, opts), directory=True)
    else:
        problem = None
    return [problem] if problem else []


def _model_sources(job: JobConfig) -> list[str]:
    """Model sources in object storage hold a config.json; explicit local paths exist (hub ids
    are left to from_pretrained: its cache may hold them offline)."""
    from pipeline.storage import Storage, is_remote
    from tokconv.targets import ALL_SPECS
    if job.models.weights != "pretrained":
        return []
    out = []
    for name in ALL_SPECS:
        src, key = getattr(job.models, name).source, f"models.{name}.source"
        if is_remote(src):
            st = Storage(src, job.models.storage_options)
            problem = _exists(key, st.child("config.json"), directory=False)
            out += [f"{problem} (a save_pretrained directory holds config.json)"] if problem else []
        elif src.startswith(("/", "./", "../", "~", "file://")):
            problem = _exists(key, Storage(src.removeprefix("file://")), directory=True)
            out += [problem] if problem else []
    return out


def _stage_inputs(job: JobConfig, storage: Storage, stages: list[str]) -> list[str]:
    """A stage run without the stage before it reads that stage's output: it must be there."""
    from pipeline.artifacts import EVAL_DIR, TRAIN_POINTER, job_run_dir
    from pipeline.featurestore import FeatureStore
    run_dir, store = job_run_dir(job.name), FeatureStore(storage, job.store).storage
    needs = [("train", "extract", store, "meta.json"), ("evaluate", "extract", store, "meta.json"),
             ("evaluate", "train", storage, posixpath.join(run_dir, TRAIN_POINTER)),
             ("export", "evaluate", storage, posixpath.join(run_dir, EVAL_DIR, "metrics.json"))]
    out, seen = [], set()
    for stage, before, st, rel in needs:
        if stage not in stages or before in stages or st.url(rel) in seen:
            continue
        seen.add(st.url(rel))
        try:
            if not st.exists(rel):
                out.append(f"{stage}: {st.url(rel)} does not exist; run the {before} stage first "
                           f"(or add it to the stages)")
        except Exception as e:  # noqa: BLE001
            out.append(f"{stage}: cannot read {st.url(rel)}: {error_reason(e)}")
    return out


def preflight(job: JobConfig, stages: list[str]) -> None:
    """Raise PreflightError naming every outside-world problem of running ``stages`` of ``job``;
    contacts storage only (a probe object is written and deleted at the storage root)."""
    from pipeline.storage import Storage
    storage = Storage(job.storage.url, job.storage.options)
    problems = [p for p in [_writable("storage.url", storage)] if p]
    if "extract" in stages:
        problems += _sources(job) + _model_sources(job)
    if not problems:  # the root is reachable: look for the inputs of the first stage
        problems += _stage_inputs(job, storage, stages)
    if problems:
        raise PreflightError(problems)
