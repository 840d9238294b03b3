"""Job configuration: one pydantic model per stage, composed into ``JobConfig``.

Every model forbids unknown keys, so a typo fails before any work starts with a message that
names the key path (torchtune ``_parse.py`` habit: YAML + ``a.b=c`` overrides, validated up
front). Stage builders take only their own sub-config; names several stages share (the feature
store, the model name) are job-level keys. Every field's description is one line: what, unit,
default (measurements live in bench/RESULTS.md). Checks across stages (model and target names,
converter keywords, the promotion metric, URLs of other sections) live in ``pipeline.checks``
and run when a ``JobConfig`` validates. ``mask_secrets`` hides credentials wherever a config
is printed or stored.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pipeline.storage import mask_secrets, url_problem

STAGES = ("extract", "train", "evaluate", "export")
Rewrite = Literal["patch_matmul", "gelu_epilogue", "fold_temporal_dense",
                  "packed_temporal_attention"]
# keys that moved, old dotted path -> new one: a job file still using the old key fails naming both
MOVED_KEYS = {"extract.store": "store", "export.model_name": "model_name"}
# the splits sources assigns (a manifest's train/training/val/valid/validation map onto them)
Split = Literal["train", "val"]
SPLITS: tuple[str, ...] = get_args(Split)
# the usual video containers; any other file under sources.uri is skipped and reported
VIDEO_EXTENSIONS = ("mp4", "m4v", "mov", "qt", "mkv", "webm", "avi", "mpg", "mpeg", "m1v", "m2v",
                    "ts", "mts", "m2ts", "3gp", "3g2", "flv", "f4v", "wmv", "asf", "ogv", "mxf",
                    "vob", "dv")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _plain_name(v: str) -> str:
    if not _PLAIN_NAME.fullmatch(v):
        raise ValueError("must be a plain name: letters, digits, '.', '_', '-' (no '/')")
    return v


def _url(v: str | None) -> str | None:
    problem = url_problem(v) if v is not None else None
    if problem:
        raise ValueError(problem)
    return v
# options removed because they only selected a path measured slower (bench/HISTORY.md): a job file
# still setting one fails naming it and what took its place
REMOVED_KEYS = {
    "models.autocast": "activations always run in models.dtype (autocast was slower)",
    "models.compile_scope": "models.compile always compiles each repeated block in place "
                            "(the old 'layers'; 'model' was slower)",
    "extract.write_in_actor": "writer actors always write the shards (extract.writers; writing in "
                              "the model actor was slower)",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _refuse_removed(section: str, data: Any) -> Any:
    """A mode="before" check: a key of REMOVED_KEYS fails naming itself and its replacement."""
    for key in data if isinstance(data, dict) else ():
        why = REMOVED_KEYS.get(f"{section}.{key}")
        if why:
            raise PydanticCustomError(
                "removed_key", "{key} was removed: {why}; delete it from the job",
                {"key": f"{section}.{key}", "why": why})
    return data


class StorageConfig(_Strict):
    """Where everything is written: an fsspec URL (local path, file://, s3://...)."""
    url: str = Field(
        "runs/default", description="root fsspec URL of every output (path, file://, s3://)")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for storage.url (s3: endpoint_url, key, secret, config_kwargs)")

    _check_url = field_validator("url")(_url)


class RayConfig(_Strict):
    address: str | None = Field(
        None, description="cluster to join; None: $RAY_ADDRESS if set, else a local one")
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of a local cluster; None: all of this machine's")
    num_gpus: int | None = Field(
        None, ge=0, description="GPUs of a local cluster; None: all of this machine's")
    object_store_memory: int | None = Field(
        None, description="object store bytes of a local cluster; None: Ray's")
    runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="Ray runtime_env of the job (env_vars...)")


class SourcesConfig(_Strict):
    """Which videos: a directory/prefix listed through fsspec, or a manifest file."""
    uri: str = Field(
        "samples",
        description="directory or fsspec prefix of the videos; 'samples': the bundled ones")
    manifest: str | None = Field(
        None, description="CSV/JSONL/Parquet file of path,label[,split]; used instead of uri")
    extensions: list[str] | Literal["all"] = Field(
        default_factory=lambda: list(VIDEO_EXTENSIONS),
        description="file extensions listed under uri (any case); all: every file, decode decides")
    labels: Literal["parent", "none", "manifest"] = Field(
        "parent", description="labels from the parent folder's name, none, or the manifest's label")
    val_fraction: float = Field(
        0.25, ge=0.0, lt=1.0,
        description="fraction of videos hashed into val (a manifest's split column wins)")
    seed: int = Field(0, description="seed of the split hash")
    limit: int | None = Field(None, ge=1, description="keep the first N videos by path; None: all")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the videos and the manifest")

    _check_urls = field_validator("uri", "manifest")(_url)

    @field_validator("extensions", mode="before")
    @classmethod
    def _normalise_extensions(cls, v: Any) -> Any:
        if v == "all":
            return v
        exts = [str(e).strip().lower().lstrip(".") for e in v] if isinstance(v, list) else []
        if not exts or not all(exts):
            raise ValueError("a list of extensions such as [mp4, webm], or all")
        return list(dict.fromkeys(exts))

    @model_validator(mode="after")
    def _labels_need_a_manifest(self) -> SourcesConfig:
        if self.labels == "manifest" and not self.manifest:
            raise ValueError("sources.labels=manifest needs sources.manifest (a CSV/JSONL/Parquet "
                             "file of path,label[,split]); allowed without one: parent, none")
        return self


class DecodeConfig(_Strict):
    """One decode per clip serves all four models: a window of ``window`` frames taken every
    ``stride`` source frames, resized so the short side is ``short_side``."""
    window: int = Field(32, ge=1, description="frames per clip window")
    stride: int = Field(2, ge=1, description="source frames between two frames of a window")
    clips_per_video: int = Field(2, ge=1, description="clip windows per video")
    short_side: int = Field(256, ge=16, description="short side of the decoded frames, pixels")
    short_video: Literal["fail", "pad", "loop"] = Field(
        "fail", description="a video shorter than one window: fail it (recorded), pad or loop it")
    num_threads: int = Field(
        1, ge=1, description="decord threads per reader (parallelism comes from Ray tasks)")
    decoder_resize_ratio: float = Field(
        2.0, ge=1.0,
        description="sources >= this x short_side are downscaled in decord, smaller in torch")
    decode_chunk: int = Field(
        32, ge=1, description="frames decoded at source size per crop/resize (bounds memory)")


class ModelSpec(_Strict):
    """One backbone. ``source``: a hub id, a local or s3 directory from save_pretrained."""
    source: str = Field(
        description="hub id, local directory or fsspec URL of a save_pretrained directory")
    revision: str | None = Field(
        None, description="hub revision (branch, tag, commit); None: the default")


class ModelsConfig(_Strict):
    weights: Literal["pretrained", "random", "tiny"] = Field(
        "pretrained",
        description="pretrained: from_pretrained(source); random: full size, seeded; tiny configs")
    student: ModelSpec = Field(ModelSpec(source="facebook/vjepa2-vitl-fpc64-256"),
                               description="the student (V-JEPA 2 ViT-L)")
    videomae: ModelSpec = Field(
        ModelSpec(source="MCG-NJU/videomae-base"), description="teacher VideoMAE-B")
    timesformer: ModelSpec = Field(ModelSpec(source="facebook/timesformer-base-finetuned-k400"),
                                   description="teacher TimeSformer-B")
    vivit: ModelSpec = Field(
        ModelSpec(source="google/vivit-b-16x2-kinetics400"), description="teacher ViViT-B")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for model sources in object storage (s3: endpoint_url...)")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="weights and activations on CUDA (CPU runs float32)")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="where the backbones run; auto: CUDA if any")
    compile: list[str] = Field(
        default_factory=lambda: ["student", "videomae", "timesformer"],
        description="models whose repeated blocks torch.compile compiles on CUDA (ignored on CPU)")
    fp8: list[str] = Field(
        default_factory=list,
        description="models whose linears run float8 on CUDA (torchao, sm>=8.9; no gelu_epilogue)")
    rewrites: list[Rewrite] = Field(
        default_factory=lambda: list(get_args(Rewrite)),
        description="optional speed rewrites (pipeline.rewrites); []: the always-on ones only")
    attention: Literal["auto", "cudnn", "flash", "efficient", "math"] = Field(
        "auto", description="preferred SDPA backend on CUDA (others as fallbacks); auto: PyTorch's")
    seed: int = Field(0, description="seed of random/tiny weights (model i: seed + i)")

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        return _refuse_removed("models", data)


class ExtractConfig(_Strict):
    batch_size: int = Field(32, ge=1, description="clips per model-actor call")
    model_actors: int | None = Field(
        None, ge=1, description="model actors; None: one per GPU (one on CPU)")
    gpus_per_actor: float = Field(1.0, ge=0.0, description="GPUs per model actor")
    cpus_per_actor: float = Field(
        1.0, ge=0.0, description="CPUs per model actor, kept out of the decode pool")
    cpus_per_decoder: float = Field(1.0, gt=0.0, description="CPUs per decode task")
    decoders: int | None = Field(
        None, ge=1, description="concurrent decode tasks; None: sized to the free CPUs")
    videos_per_decode_task: int | None = Field(
        None, ge=1, description="None: batch_size / clips_per_video when that divides, else 1")
    shard_clips: int = Field(256, ge=1, description="clips per Parquet shard")
    out_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="dtype of stored features")
    writers: int | None = Field(
        None, ge=1, description="shard-writer actors (encode + upload); None: 2 per model actor")
    cpus_per_writer: float = Field(
        0.0, ge=0.0, description="CPUs per writer (I/O bound: 0 keeps it off the budget)")
    spare_cpus_per_actor: float = Field(
        1.5, ge=0.0,
        description="CPUs per model actor kept from decoding on nodes holding several actors")
    actor_concurrency: int = Field(
        3, ge=1, description="batches in flight per model actor on CUDA, a stream each")
    compile_cache: str | None = Field(
        "cache/compile",
        description="torch.compile cache: a path under storage.url, or a URL / absolute path")
    retry_failed: bool = Field(
        False, description="re-try videos in the failed manifest (default: skip them)")
    limit_videos: int | None = Field(
        None, ge=1, description="process at most this many pending videos per run")
    log_stats: bool = Field(
        False, description="print Ray Data's per-operator stats and the model actors' start-up")
    codec: str | dict[str, str] = Field(
        "raw", description="stored codec: raw, fp8, int8, or {column: codec, default: codec}")

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, v: str | dict[str, str]) -> str | dict[str, str]:
        from pipeline.codecs import get_codec
        from tokconv.targets import ALL_SPECS
        unknown = sorted(set(v) - {*ALL_SPECS, "default"}) if isinstance(v, dict) else []
        if unknown:
            raise ValueError(f"unknown column(s) {', '.join(unknown)}; known: "
                             f"{', '.join(ALL_SPECS)}, default")
        for name in [v] if isinstance(v, str) else v.values():
            get_codec(name)
        return v

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        return _refuse_removed("extract", data)


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate (cosine decay to 1% of it)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(10, ge=0, description="steps of linear warm-up from 1% of lr")
    grad_clip: float | None = Field(1.0, description="max gradient norm; None: no clipping")


class LossConfig(_Strict):
    w_cos: float = Field(1.0, ge=0, description="weight of (1 - cosine) per target")
    w_sl1: float = Field(1.0, ge=0, description="weight of smooth-L1 per target")
    target_weights: dict[str, float] = Field(
        default_factory=dict, description="loss weight per target; default 1.0")
    w_head: float = Field(1.0, ge=0, description="weight of the head's cross-entropy")


class DeficiencyConfig(_Strict):
    """Representation-deficiency regularisers; each weight warms up from 0 over warmup_steps."""
    rank: int | None = Field(
        None, ge=1, description="low-rank bottleneck rank of the input projection")
    w_nuclear: float = Field(
        0.0, ge=0, description="weight of the nuclear-norm penalty on the low-rank factors")
    mask_ratio: float = Field(
        0.0, ge=0, lt=1, description="fraction of student tokens masked in training")
    w_selection: float = Field(
        0.0, ge=0, description="weight of the L1/entropy penalty on selection weights")
    w_jacobian: float = Field(0.0, ge=0, description="weight of the Jacobian contraction penalty")
    warmup_steps: int = Field(0, ge=0, description="steps over which each weight rises from 0")


class HeadConfig(_Strict):
    enabled: bool = Field(True, description="train the residual classification head (needs labels)")
    hidden: int = Field(256, ge=1, description="hidden width of the head's MLPs")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout in the head's MLPs")


class TrainConfig(_Strict):
    converter: str = Field(
        "baseline_interp_linear", description="converter preset (tokconv.list_converters())")
    converter_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for the preset")
    head: HeadConfig = Field(HeadConfig(), description="residual classification head")
    loss: LossConfig = Field(LossConfig(), description="loss weights")
    optim: OptimConfig = Field(OptimConfig(), description="optimiser and schedule")
    deficiency: DeficiencyConfig = Field(
        DeficiencyConfig(), description="representation-deficiency regularisers")
    epochs: int = Field(2, ge=1, description="passes over the train split")
    batch_size: int = Field(8, ge=1, description="clips per step, per worker")
    num_workers: int | Literal["auto"] = Field(
        2, description="Ray Train workers (DDP ranks); auto: one per GPU with use_gpu, else one "
        "per node; default 2")
    use_gpu: bool = Field(False, description="one GPU per worker (NCCL); False: CPU workers (gloo)")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs per worker")
    wait_for_workers: bool = Field(
        False, description="let Ray wait for workers the cluster cannot hold now (an autoscaler "
        "without published limits); default False")
    max_failures: int = Field(
        1, ge=0, description="worker-group restarts from the last checkpoint; default 1")
    seed: int = Field(0, description="seed of the init, the data order and per-step randomness")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="bf16: CUDA autocast over fp32 master weights; auto: bf16 on CUDA, "
        "fp32 on CPU")
    cache: Literal["none", "host", "gpu", "auto"] = Field(
        "auto", description="where a worker keeps its train shard once read: none, host, gpu, "
        "auto (gpu if it fits, else host, else none)")
    shuffle_window: int = Field(
        128, ge=1, description="clips shuffled together (rounded up to a multiple of batch_size); "
        "default 128")
    read_ahead: int = Field(
        8, ge=1, description="Parquet row groups a worker reads (and copies) ahead; default 8")
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="also checkpoint every this many steps (epoch ends always); "
        "default None")
    keep_checkpoints: int = Field(
        2, ge=1, description="latest checkpoints kept (the best is kept apart); default 2")
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: a re-submitted job continues its unfinished run; never: a new "
        "run")
    val_split: str = Field(
        "val", description="store split validated on during training (skipped when empty)")
    val_every_steps: int | None = Field(
        None, ge=1, description="also validate every this many steps (epoch ends always); "
        "default None")
    best_metric: str = Field(
        "val.mean_cosine", description="validation metric picking the best checkpoint "
        "(val.mean_cosine, val.top1, val.<target>.cosine/.r2)")
    best_mode: Literal["max", "min"] = Field(
        "max", description="whether best_metric is better high or low")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many validations without best_metric improving; "
        "None: off")
    early_stopping_min_delta: float = Field(
        0.0, ge=0, description="smallest best_metric improvement that counts; default 0")
    result: Literal["last", "best"] = Field(
        "last", description="checkpoint runs/<job>/train.json hands on: the last or the best "
        "validated one")
    log_every_steps: int = Field(
        20, ge=1, description="steps between writes of the per-step metrics log (one device sync "
        "each); default 20")
    warm_start: bool = Field(
        True, description="start from the `latest` export when its configs match")

    @field_validator("num_workers", mode="before")
    @classmethod
    def _worker_count(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError("a worker count >= 1, or auto: one per GPU")

    @field_validator("converter")
    @classmethod
    def _known_converter(cls, v: str) -> str:
        from tokconv.registry import is_converter, list_converters
        if not is_converter(v):
            raise ValueError(f"unknown converter {v!r}; known: {', '.join(list_converters())}")
        return v


class EvaluateConfig(_Strict):
    split: Split = Field("val", description="held-out split to evaluate (as sources assigns them)")
    batch_size: int = Field(8, ge=1, description="clips per evaluation batch")
    report_html: bool = Field(True, description="write report.html beside metrics.json")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="where the metrics pass runs (auto: CUDA if any); the I/O sample runs on CPU")


class ExportConfig(_Strict):
    version: str | None = Field(None, description="version name; None: a UTC timestamp")
    metric: str = Field(
        "mean_cosine", description="metrics.json key (dotted path) deciding promotion to `latest`")
    higher_is_better: bool = Field(True, description="direction of export.metric")
    torchscript: bool = Field(False, description="also save forward_all traced with TorchScript")

    @field_validator("version")
    @classmethod
    def _plain_version(cls, v: str | None) -> str | None:
        return None if v is None else _plain_name(v)


class LeaseConfig(_Strict):
    """The job's leases in storage (``pipeline.lease``): one run at a time per job, store, model."""
    enabled: bool = Field(
        True, description="take the job's leases before any stage; False: no guard against a "
        "concurrent run")
    ttl_s: float = Field(
        600.0, ge=1, description="seconds a lease outlives its last heartbeat (every ttl_s/3); "
        "default 600")
    wait_s: float = Field(
        0.0, ge=0, description="seconds to wait for a held lease before skipping the run; "
        "default 0")


class JobConfig(_Strict):
    name: str = Field(
        "job", description="job name: runs/<name>/ holds its checkpoints, metrics and reports")
    store: str = Field(
        "features", description="feature store name under <storage>/features/ (every stage)")
    model_name: str = Field(
        "tokconv", description="model name under <storage>/models/ (train, evaluate, export)")
    stages: list[Literal["extract", "train", "evaluate", "export"]] = Field(
        default_factory=lambda: list(STAGES), description="stages to run, in pipeline order")
    storage: StorageConfig = Field(StorageConfig(), description="where outputs go")
    ray: RayConfig = Field(RayConfig(), description="the Ray cluster")
    sources: SourcesConfig = Field(SourcesConfig(), description="which videos")
    decode: DecodeConfig = Field(DecodeConfig(), description="clip windows")
    models: ModelsConfig = Field(ModelsConfig(), description="the four backbones")
    extract: ExtractConfig = Field(ExtractConfig(), description="extract stage")
    train: TrainConfig = Field(TrainConfig(), description="train stage")
    evaluate: EvaluateConfig = Field(EvaluateConfig(), description="evaluate stage")
    export: ExportConfig = Field(ExportConfig(), description="export stage")
    lease: LeaseConfig = Field(LeaseConfig(), description="leases that keep runs from overlapping")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        for old, new in MOVED_KEYS.items():
            section, key = old.split(".")
            sub = data.get(section) if isinstance(data, dict) else None
            if isinstance(sub, dict) and key in sub:
                raise ValueError(f"{old}: moved to {new} (a job-level key)")
        return data

    @field_validator("stages")
    @classmethod
    def _stages_in_order(cls, v: list[str]) -> list[str]:
        return [s for s in STAGES if s in v]

    _plain_names = field_validator("name", "store", "model_name")(_plain_name)

    @model_validator(mode="after")
    def _cross_checks(self) -> JobConfig:
        from pipeline.checks import check_job
        problems = check_job(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


def format_config(job: JobConfig) -> str:
    """The job as indented JSON with credentials masked (``--print-config``, logs)."""
    return json.dumps(mask_secrets(job.model_dump()), indent=2)


class ConfigError(ValueError):
    """A job file or override that does not validate; the message names the key path."""


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment")
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key}: {p!r} is not a mapping")
            node = nxt
        node[parts[-1]] = _parse_scalar(raw)
    return data


def _format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, each naming its key path: ``  key.path: why (got value)``."""
    lines = [f"invalid job config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "value_error":
            text = str(e["ctx"]["error"])
            if not loc or text.startswith(loc + "."):  # a check whose messages name their keys
                lines += [f"  {t}" for t in text.splitlines()]
                continue
            msg = text
        else:
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        shown = e["type"] != "extra_forbidden" and not isinstance(e.get("input"), dict)
        got = f" (got {mask_secrets(e['input'])!r})" if shown else ""
        lines.append(f"  {loc or '<root>'}: {msg}{got}")
    return "\n".join(lines)


def validate(data: dict, source: str = "<dict>") -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_job(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    """Read a job YAML (its shebang line is a YAML comment), apply overrides, validate."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"job file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"job file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"job file {path}: top level must be a mapping, "
                              f"got {type(data).__name__}")
    apply_overrides(data, list(overrides))
    return validate(data, source)
