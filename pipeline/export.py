"""Export stage: publish the trained converter + head as a versioned model, through fsspec.

Layout under the storage root (local path or ``s3://``)::

    models/<name>/<version>/model.safetensors   converter weights   } tokconv.io files:
    models/<name>/<version>/config.json         converter config    } tokconv.io.load_converter(dir)
    models/<name>/<version>/head.safetensors    head weights (+ head.json; tokconv.io.load_head(dir))
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

import datetime as _dt
import json
import os
import posixpath
import tempfile
from typing import Any

import torch

from .config import JobConfig
from .featurestore import FeatureStore
from .storage import Storage
from .train import load_trained

MODEL_FILES = ("model.safetensors", "config.json", "head.safetensors", "head.json")


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


def _model_card(name: str, version: str, job: JobConfig, metrics: dict, conv_config: dict) -> str:
    rows = "\n".join(f"| {t} | {m['cosine']:.4f} | {m['mse']:.4f} | {m['r2']:.4f} |"
                     for t, m in metrics.get("targets", {}).items())
    c = metrics.get("converter", {})
    targets = ", ".join(f"{t} ({s['tokens']} tokens x {s['dim']})" for t, s in conv_config["targets"].items())
    st = conv_config["student"]
    return f"""# {name} {version}

Token converter `{conv_config['name']}` mapping student tokens ({st['tokens']} x {st['dim']}) to: {targets}.
Trained by the tokconv pipeline job `{job.name}` on feature store `{job.extract.store}`.

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
this model produced at evaluation; on the same hardware/software the outputs are reproduced bit for bit.

## Evaluation ({metrics.get('split')} split, {metrics.get('clips')} clips)

| target | cosine | MSE | R^2 |
|---|---|---|---|
{rows}

head top-1 {metrics.get('top1')}, top-5 {metrics.get('top5')};
converter {c.get('params')} parameters, {c.get('gflops_per_clip')} GFLOP per clip.
Fidelity is measured on standardised teacher features.
Promotion metric: `{job.export.metric}` = {metric_value(metrics, job.export.metric):.4f}
({'higher' if job.export.higher_is_better else 'lower'} is better).
"""


def _torchscript(converter, student_shape, path: str) -> None:
    class _All(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.forward_all(x)

    with torch.no_grad():
        traced = torch.jit.trace(_All(converter).eval(), torch.randn(1, *student_shape), strict=False)
    traced.save(path)


def _new_version(storage: Storage, name: str, requested: str | None) -> str:
    if requested:
        if storage.exists(f"models/{name}/{requested}"):
            raise FileExistsError(f"export.version: {name}/{requested} already exists at "
                                  f"{storage.url('models', name, requested)}; versions are immutable")
        return requested
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    version, i = stamp, 1
    while storage.exists(f"models/{name}/{version}"):
        version, i = f"{stamp}-{i}", i + 1
    return version


def run_export(job: JobConfig, storage: Storage) -> dict[str, Any]:
    """Publish the evaluated model; returns {"uri", "version", "promoted", "previous", ...}."""
    from safetensors.torch import save

    cfg = job.export
    name = cfg.model_name
    eval_base = posixpath.join("runs", job.name, "eval")
    metrics = storage.read_json(f"{eval_base}/metrics.json", default=None)
    if metrics is None:
        raise FileNotFoundError(f"no evaluation metrics at {storage.url(eval_base, 'metrics.json')}; "
                                f"run the evaluate stage first")
    value = metric_value(metrics, cfg.metric)
    version = _new_version(storage, name, cfg.version)
    dest = f"models/{name}/{version}"

    with tempfile.TemporaryDirectory() as tmp:
        converter, _, info = load_trained(job, storage, tmp)
        with open(os.path.join(tmp, "config.json")) as f:
            conv_config = json.load(f)
        stats = FeatureStore(storage, job.extract.store).stats()
        std_tensors = {}
        for t in conv_config["targets"]:
            std_tensors[f"{t}.mean"] = torch.as_tensor(stats[t]["mean"], dtype=torch.float32).contiguous()
            std_tensors[f"{t}.std"] = torch.as_tensor(stats[t]["std"], dtype=torch.float32).contiguous()
        with open(os.path.join(tmp, "standardization.safetensors"), "wb") as f:
            f.write(save(std_tensors))
        if storage.exists(f"{eval_base}/sample.safetensors"):
            with open(os.path.join(tmp, "reference_io.safetensors"), "wb") as f:
                f.write(storage.read_bytes(f"{eval_base}/sample.safetensors"))
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(_model_card(name, version, job, metrics, conv_config))
        ts_error = None
        if cfg.torchscript:
            st = conv_config["student"]
            try:
                _torchscript(converter, (st["tokens"], st["dim"]), os.path.join(tmp, "converter.torchscript.pt"))
            except Exception as e:  # noqa: BLE001  (the safetensors export stands on its own; say why TorchScript failed)
                ts_error = f"{type(e).__name__}: {e}"
                print(f"[export] TorchScript export of {conv_config['name']} failed: {ts_error}", flush=True)
        files = sorted(f for f in os.listdir(tmp) if f != "train_state.pt")  # optimizer state stays in runs/
        storage.fs.makedirs(storage.path(dest), exist_ok=True)
        for fname in files:
            storage.fs.put_file(os.path.join(tmp, fname), storage.path(dest, fname))

    uri = storage.url(dest)
    latest_rel = f"models/{name}/latest.json"
    current = storage.read_json(latest_rel, default=None)
    previous_value, compared_on = None, None
    fresh = metrics.get("latest") or {}
    if current is not None and fresh.get("version") == current["version"] and "skipped" not in fresh:
        try:  # evaluate re-scored the current latest on this run's split: compare like with like
            previous_value, compared_on = metric_value(fresh, cfg.metric), "this evaluation's split"
        except (KeyError, TypeError):
            previous_value = None
    if current is not None and previous_value is None:
        compared_on = "its recorded value"
        if current.get("metric") == cfg.metric and current.get("value") is not None:
            previous_value = float(current["value"])
        else:  # the current latest was promoted on another metric: compare on this one
            old = storage.read_json(f"models/{name}/{current['version']}/metrics.json", default={})
            try:
                previous_value = metric_value(old, cfg.metric)
            except (KeyError, TypeError):
                previous_value = None
    promoted = is_better(value, previous_value, cfg.higher_is_better)
    if promoted:
        storage.write_json(latest_rel, {
            "version": version, "uri": uri, "metric": cfg.metric, "value": value,
            "higher_is_better": cfg.higher_is_better, "job": job.name, "checkpoint": info["checkpoint"],
            "promoted_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")})
    verdict = "promoted to latest" if promoted else f"NOT promoted (latest {current['version']} has " \
        f"{cfg.metric}={previous_value} on {compared_on})"
    print(f"[export] {name}/{version}: {cfg.metric}={value:.4f} {verdict} -> {uri}", flush=True)
    return {"uri": uri, "name": name, "version": version, "files": files, "metric": cfg.metric, "value": value,
            "promoted": promoted, "previous": current, "previous_value": previous_value,
            "compared_on": compared_on, "latest": storage.url(latest_rel),
            "torchscript_error": ts_error}


def resolve_version(storage: Storage, name: str, version: str = "latest") -> str:
    if version != "latest":
        return version
    latest = storage.read_json(f"models/{name}/latest.json", default=None)
    if latest is None:
        raise FileNotFoundError(f"model {name!r} has no latest version at "
                                f"{storage.url('models', name, 'latest.json')}")
    return latest["version"]


def download_model(storage: Storage, name: str, version: str = "latest", dest: str | None = None) -> str:
    """Copy models/<name>/<version>/ (``latest`` follows latest.json) into local ``dest``
    (a new temp dir when None); returns it. ``tokconv.io.load_converter(dest)`` loads the model."""
    version = resolve_version(storage, name, version)
    if not storage.exists("models", name, version):
        raise FileNotFoundError(f"model {name}/{version} not found at {storage.url('models', name, version)}")
    return storage.download(f"models/{name}/{version}", dest or tempfile.mkdtemp(prefix=f"{name}-{version}-"))
