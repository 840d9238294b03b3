"""Export stage: publish the trained converter + head as a versioned model, through fsspec.

``run_export(job, storage)`` (the CLI's entry) unpacks the job into ``export_stage(cfg:
ExportConfig, storage, *, store: FeatureStore, registry: ModelRegistry, run_dir: "runs/<job>",
job_name)``. Layout under the storage root (local path or ``s3://``; ``pipeline.artifacts``)::

    models/<name>/<version>/model.safetensors   converter weights   } tokconv.io files:
    models/<name>/<version>/config.json         converter config    } tokconv.io.load_converter(dir)
    models/<name>/<version>/head.safetensors    head weights (+ head.json: tokconv.io.load_head)
    models/<name>/<version>/standardization.safetensors  "<target>.mean"/"<target>.std" (dim,): the
                                                converter emits standardised teacher features;
                                                teacher features = out * std + mean
    models/<name>/<version>/reference_io.safetensors     evaluated inputs/outputs (bit-exact check)
    models/<name>/<version>/metrics.json        evaluation metrics
    models/<name>/<version>/README.md           model card
    models/<name>/<version>/converter.torchscript.pt     (export.torchscript) forward_all traced
    models/<name>/latest.json                   {"version", "uri", "metric", "value", ...}

``latest.json`` moves only when the new version beats the current one on ``export.metric``
(``higher_is_better``); it is written after every file of the version, so a reader following it
never sees a partial model.
"""
from __future__ import annotations

import json
import os
import posixpath
import tempfile
from typing import Any

import torch

from .artifacts import (
    EVAL_DIR,
    STANDARDIZATION,
    TRAIN_STATE,
    ModelRegistry,
    job_run_dir,
    load_trained,
    save_standardization,
    stats_tensors,
)
from .config import ExportConfig, JobConfig
from .featurestore import FeatureStore
from .lease import check_held
from .storage import Storage


def metric_value(metrics: dict, key: str) -> float:
    """``key`` may be a dotted path into metrics.json, e.g. ``targets.videomae.cosine``."""
    node: Any = metrics
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"export.metric: {key!r} not found in the evaluation metrics "
                           f"(top-level keys: {', '.join(sorted(metrics))})")
        node = node[part]
    if not isinstance(node, (int, float)) or isinstance(node, bool):
        raise TypeError(f"export.metric: {key!r} is {node!r}, not a number")
    return float(node)


def is_better(new: float, old: float | None, higher_is_better: bool) -> bool:
    """Strictly better (a tie keeps the current `latest`)."""
    if old is None:
        return True
    return new > old if higher_is_better else new < old


def _model_card(name: str, version: str, cfg: ExportConfig, metrics: dict, conv_config: dict, *,
                job_name: str, store_name: str, store_meta: dict | None = None,
                report_url: str | None = None) -> str:
    """README.md of a version: what it is, how to use it, and the evaluation's summary figures
    (``pipeline.report.model_card_summary``: the report's summary card) with a link to the
    report."""
    from .report import model_card_summary

    targets = ", ".join(f"{t} ({s['tokens']} tokens x {s['dim']})"
                        for t, s in conv_config["targets"].items())
    st, meta = conv_config["student"], store_meta or {}
    summary = model_card_summary(
        metrics, report_url=report_url, backbone_latency_ms=meta.get("backbone_latency_ms"),
        backbone_device=meta.get("backbone_device"),
        backbone_batch=meta.get("backbone_latency_batch"), metric=cfg.metric,
        higher_is_better=cfg.higher_is_better)
    return f"""# {name} {version}

Token converter `{conv_config['name']}` mapping student tokens ({st['tokens']} x {st['dim']}) to:
{targets}.
Trained by the tokconv pipeline job `{job_name}` on feature store `{store_name}`.

## Use

```python
from tokconv.io import load_converter, load_head
from safetensors.torch import load_file
converter = load_converter(model_dir).eval()        # model.safetensors + config.json
out = converter.forward_all(student_tokens)         # {{target: (B, tokens, dim)}} standardised
stats = load_file(f"{{model_dir}}/standardization.safetensors")
teacher = {{t: o * stats[f"{{t}}.std"] + stats[f"{{t}}.mean"] for t, o in out.items()}}
head = load_head(model_dir).eval()                  # logits = head(student_tokens, out)
```

`reference_io.safetensors` holds inputs (`student`) and the outputs (`out.<target>`, `logits`)
this model produced at evaluation; on the same hardware/software the outputs are reproduced bit
for bit.

{summary}
Fidelity is measured on standardised teacher features ({metrics.get('clips')} clips).
Promotion metric: `{cfg.metric}` ({'higher' if cfg.higher_is_better else 'lower'} is better).
"""


def _torchscript(converter, student_shape, path: str) -> None:
    class _All(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.forward_all(x)

    with torch.no_grad():
        traced = torch.jit.trace(_All(converter).eval(), torch.randn(1, *student_shape),
                                 strict=False)
    traced.save(path)


def _previous_value(cfg: ExportConfig, registry: ModelRegistry, current: dict | None,
                    metrics: dict) -> tuple[float | None, str | None]:
    """The current latest's value of ``cfg.metric`` and where it comes from: evaluate's re-score
    of it on this run's split when there is one, else its recorded value (or its metrics.json when
    it was promoted on another metric)."""
    if current is None:
        return None, None
    fresh = metrics.get("latest") or {}
    if fresh.get("version") == current["version"] and "skipped" not in fresh:
        try:  # evaluate re-scored the current latest on this run's split: compare like with like
            return metric_value(fresh, cfg.metric), "this evaluation's split"
        except (KeyError, TypeError):
            pass
    if current.get("metric") == cfg.metric and current.get("value") is not None:
        return float(current["value"]), "its recorded value"
    old = registry.read_json(current["version"], "metrics.json", default={})
    try:  # the current latest was promoted on another metric: compare on this one
        return metric_value(old, cfg.metric), "its recorded value"
    except (KeyError, TypeError):
        return None, "its recorded value"


def run_export(job: JobConfig, storage: Storage) -> dict[str, Any]:
    """The CLI's export stage: ``export_stage`` on the job's store, registry and run directory."""
    return export_stage(job.export, storage, store=FeatureStore(storage, job.store),
                        registry=ModelRegistry(storage, job.model_name),
                        run_dir=job_run_dir(job.name), job_name=job.name)


def export_stage(cfg: ExportConfig, storage: Storage, *, store: FeatureStore,
                 registry: ModelRegistry, run_dir: str, job_name: str) -> dict[str, Any]:
    """Publish the model trained and evaluated under ``run_dir`` as a new version of ``registry``
    (standardised with ``store``'s stats); returns {"uri", "version", "promoted", ...}."""
    eval_base = posixpath.join(run_dir, EVAL_DIR)
    metrics = storage.read_json(f"{eval_base}/metrics.json", default=None)
    if metrics is None:
        raise FileNotFoundError(f"no evaluation metrics at {storage.url(eval_base, 'metrics.json')}"
                                f"; run the evaluate stage first")
    value = metric_value(metrics, cfg.metric)
    name, version = registry.name, registry.new_version(cfg.version)

    with tempfile.TemporaryDirectory() as tmp:
        converter, _, info = load_trained(storage, run_dir, tmp)
        with open(os.path.join(tmp, "config.json")) as f:
            conv_config = json.load(f)
        mean, std = stats_tensors(store.stats(), conv_config["targets"])
        save_standardization(mean, std, os.path.join(tmp, STANDARDIZATION))
        if storage.exists(f"{eval_base}/sample.safetensors"):
            with open(os.path.join(tmp, "reference_io.safetensors"), "wb") as f:
                f.write(storage.read_bytes(f"{eval_base}/sample.safetensors"))
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            report = f"{eval_base}/report.html"
            f.write(_model_card(name, version, cfg, metrics, conv_config, job_name=job_name,
                                store_name=store.name, store_meta=store.read_meta(),
                                report_url=storage.url(report) if storage.exists(report) else None))
        ts_error = None
        if cfg.torchscript:
            st = conv_config["student"]
            ts_path = os.path.join(tmp, "converter.torchscript.pt")
            try:
                _torchscript(converter, (st["tokens"], st["dim"]), ts_path)
            # the safetensors export stands on its own; say why TorchScript failed
            except Exception as e:  # noqa: BLE001
                ts_error = f"{type(e).__name__}: {e}"
                print(f"[export] TorchScript export of {conv_config['name']} failed: {ts_error}",
                      flush=True)
        files = sorted(f for f in os.listdir(tmp) if f != TRAIN_STATE)  # optimiser: runs/ only
        uri = registry.publish(version, tmp, files)

    current = registry.latest()
    previous_value, compared_on = _previous_value(cfg, registry, current, metrics)
    promoted = is_better(value, previous_value, cfg.higher_is_better)
    if promoted:
        check_held(f"moving {name}'s latest")  # a run whose lease was taken over must not promote
        registry.promote(version, metric=cfg.metric, value=value,
                         higher_is_better=cfg.higher_is_better, job=job_name,
                         checkpoint=info["checkpoint"])
    verdict = "promoted to latest" if promoted else f"NOT promoted (latest {current['version']} " \
        f"has {cfg.metric}={previous_value} on {compared_on})"
    print(f"[export] {name}/{version}: {cfg.metric}={value:.4f} {verdict} -> {uri}", flush=True)
    result = {"uri": uri, "name": name, "version": version, "files": files, "metric": cfg.metric,
              "value": value, "promoted": promoted,
              "verdict": f"{cfg.metric}={value:.4f} {verdict}", "previous": current,
              "previous_value": previous_value, "compared_on": compared_on,
              "latest": registry.url("latest.json"), "torchscript_error": ts_error}
    _rerender_report(storage, run_dir, metrics, store, cfg, result)
    return result


def _rerender_report(storage: Storage, run_dir: str, metrics: dict, store: FeatureStore,
                     cfg: ExportConfig, result: dict) -> None:
    """report.html again, now with this export's decision (when evaluate wrote one)."""
    if not storage.exists(posixpath.join(run_dir, EVAL_DIR, "report.html")):
        return
    from .report import write_run_report
    write_run_report(storage, run_dir, metrics, store_meta=store.read_meta(),
                     export_result=result, metric=cfg.metric,
                     higher_is_better=cfg.higher_is_better)
