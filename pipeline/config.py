"""Job configuration: one pydantic model per stage, composed into ``JobConfig``.

Every model forbids unknown keys, so a typo fails before any work starts with a message that
names the key path (torchtune ``_parse.py`` habit: YAML + ``a.b=c`` overrides, validated up front).
Stage builders take only their own sub-config.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

STAGES = ("extract", "train", "evaluate", "export")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Strict):
    """Where everything is written: an fsspec URL (local path, file://, s3://...)."""
    url: str = "runs/default"
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="fsspec storage options, e.g. endpoint_url/key/secret for s3")


class RayConfig(_Strict):
    address: str | None = Field(None, description="None: $RAY_ADDRESS if set, else start a local cluster")
    num_cpus: int | None = None
    num_gpus: int | None = None
    object_store_memory: int | None = Field(None, description="bytes; only for a local cluster")
    runtime_env: dict[str, Any] = Field(default_factory=dict)


class SourcesConfig(_Strict):
    """Which videos: a directory/prefix listed through fsspec, or a manifest file."""
    uri: str = Field("samples", description="directory or fsspec prefix; 'samples' = bundled sample videos")
    manifest: str | None = Field(None, description="CSV/JSONL/Parquet with path,label[,split]")
    extensions: list[str] = Field(default_factory=lambda: ["mp4", "webm", "mkv", "avi", "mov"])
    labels: Literal["parent", "none", "manifest"] = "parent"
    val_fraction: float = Field(0.25, ge=0.0, lt=1.0)
    seed: int = 0
    limit: int | None = Field(None, ge=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)


class DecodeConfig(_Strict):
    """One decode per clip serves all four models: a window of ``window`` frames taken every
    ``stride`` source frames, resized so the short side is ``short_side``."""
    window: int = Field(32, ge=1)
    stride: int = Field(2, ge=1)
    clips_per_video: int = Field(2, ge=1)
    short_side: int = Field(256, ge=16)
    short_video: Literal["fail", "pad", "loop"] = Field(
        "fail", description="a video shorter than one window: fail it (recorded), pad with the last frame, or loop")
    num_threads: int = Field(1, ge=1, description="decord threads per reader; parallelism comes from Ray")
    decoder_resize_ratio: float = Field(2.0, ge=1.0, description="sources whose short side is at least this "
                                        "multiple of short_side are downscaled inside decord, smaller ones with torch "
                                        "after a source-size decode (faster below ~2x, measured)")
    decode_chunk: int = Field(32, ge=1, description="frames decoded at source size before each crop/resize "
                              "(bounds a decoder's memory on large sources: 32 frames of 4K are 0.8 GB)")


class ModelSpec(_Strict):
    """One backbone. ``source``: a hub id, a local or s3 directory from save_pretrained."""
    source: str
    revision: str | None = None


class ModelsConfig(_Strict):
    weights: Literal["pretrained", "random", "tiny"] = Field(
        "pretrained", description="pretrained: from_pretrained(source); random: full-size config, random init; "
        "tiny: tiny configs of the same classes (tests, smoke)")
    student: ModelSpec = ModelSpec(source="facebook/vjepa2-vitl-fpc64-256")
    videomae: ModelSpec = ModelSpec(source="MCG-NJU/videomae-base")
    timesformer: ModelSpec = ModelSpec(source="facebook/timesformer-base-finetuned-k400")
    vivit: ModelSpec = ModelSpec(source="google/vivit-b-16x2-kinetics400")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    compile: list[str] = Field(default_factory=lambda: ["student", "videomae", "timesformer"],
                               description="model names to torch.compile on CUDA (it regresses ViViT; measured "
                               "in bench/RESULTS.md); ignored on CPU")
    compile_scope: Literal["model", "layers"] = Field(
        "layers", description="layers: compile each repeated transformer block in place (PyTorch's regional "
        "compilation: one block compiled, reused by every layer); model: torch.compile the whole model. Measured "
        "on an H200: same speed within 1% (101.4 vs 102.5 clips/s for the four), cold warm-up 42 s vs 60 s and "
        "the pipeline's first shard 52 s vs 78 s (bench/RESULTS.md)")
    autocast: bool = Field(False, description="CUDA: torch.autocast on top of dtype weights (norms and softmax "
                           "in float32); False runs activations in dtype too (faster; bench/RESULTS.md)")
    fp8: list[str] = Field(default_factory=list, description="model names whose nn.Linear layers run as float8 "
                           "matmuls on CUDA (torchao dynamic float8: e4m3 weights and activations, per-row scales; "
                           "needs compute capability >= 8.9 and the `cuda` extra); ignored on CPU. Measured on "
                           "an H200: the ViT-L student 1.11x compiled bf16, token cosine to bf16 0.996 mean / 0.993 "
                           "min; the ViT-B teachers gain nothing (bench/RESULTS.md), so [student] is the useful "
                           "setting and [] (bf16 everywhere) the default. Measured before models.rewrites; a "
                           "named model skips the gelu_epilogue rewrite (float8 covers every linear layer)")
    rewrites: list[Literal["patch_matmul", "gelu_epilogue", "fold_temporal_dense", "packed_temporal_attention"]] = \
        Field(default_factory=lambda: ["patch_matmul", "gelu_epilogue", "fold_temporal_dense",
                                       "packed_temporal_attention"],
              description="speed rewrites of the transformers modules (pipeline.rewrites). Measured on an "
              "H200 (bench/RESULTS.md): the four models' ceiling 101.8 -> 121.5 clips/s, tokens at the bf16 "
              "noise floor (cosine 0.99993 to the upstream modules). patch_matmul: patch-embedding convolutions "
              "as one matmul (exact; cuDNN ran them at ~25 TFLOP/s); gelu_epilogue (CUDA only): MLP linear + GELU "
              "as one cuBLASLt matmul with a tanh-GELU epilogue (within half a bf16 step of the exact GELU); "
              "fold_temporal_dense: TimeSformer's two temporal linear maps as one; packed_temporal_attention: "
              "TimeSformer's 16-token temporal attention 8 groups per call with a block-diagonal mask (exact). "
              "[] keeps the upstream modules")
    attention: Literal["auto", "cudnn", "flash", "efficient", "math"] = Field(
        "auto", description="preferred SDPA backend (others stay as fallbacks); auto: PyTorch's order")
    seed: int = 0


class ExtractConfig(_Strict):
    store: str = Field("features", description="feature store name under <storage>/features/")
    batch_size: int = Field(32, ge=1)
    model_actors: int | None = Field(None, ge=1, description="None: one per GPU (one on CPU)")
    gpus_per_actor: float = Field(1.0, ge=0.0)
    cpus_per_actor: float = Field(1.0, ge=0.0, description="kept out of the decode pool for the actor's host "
                                  "work (input copies, output tables): on a decode-bound source, 16 decoders beside "
                                  "the actor on 16 cores gave 0.89x the 15 of this default (H200, bench/RESULTS.md)")
    cpus_per_decoder: float = Field(1.0, gt=0.0)
    decoders: int | None = Field(None, ge=1, description="None: sized to the cluster's CPUs")
    videos_per_decode_task: int | None = Field(
        None, ge=1, description="None: batch_size / clips_per_video when that divides evenly, else 1. A decode "
        "block of exactly one model batch reaches the model actor as a zero-copy view; smaller blocks are "
        "concatenated there first (a copy of ~201 MB per batch of 32; bench/actor_input.py)")
    shard_clips: int = Field(256, ge=1, description="clips per Parquet shard")
    out_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    writers: int | None = Field(None, ge=1, description="shard-writer actors (Parquet encode + upload); "
                                "None: 2 per model actor (one writes ~0.5-1 GB/s, a GPU makes ~1 GB/s)")
    cpus_per_writer: float = Field(0.0, ge=0.0, description="I/O bound; 0 keeps it off the CPU budget")
    spare_cpus_per_actor: float = Field(
        1.5, ge=0.0, description="on a node holding more than one model actor, CPUs per actor kept out of the "
        "decode pool for the actors' host work (input copies, output tables) and Ray's per-node processes. "
        "Measured on a 2-GPU, 32-core H200 host: 30 decoders gave 1.71-1.77x one GPU's committed clips/s, 27 "
        "(this default) 1.89-2.01x; one actor on 16 cores gained ~2% from 16 idle cores, so none is kept there")
    actor_concurrency: int = Field(3, ge=1, description="batches in flight per model actor on CUDA (one CUDA "
                                   "stream each: copies of one batch overlap compute of another; with 2, Ray's "
                                   "per-batch input/output handling left the actor's calls busy 73% of the time, "
                                   "with 3 82%, and 93-96% once a decode block is one whole batch; H200)")
    write_in_actor: bool = Field(False, description="model actors write each batch as one committed shard "
                                 "themselves (shard_clips = batch_size, no writer actors): the ~365 MB of features "
                                 "per batch of 32 skip the object store (storing it costs the actor ~54 ms per "
                                 "batch, bench/actor_input.py); the write then runs in the actor's call, so raise "
                                 "actor_concurrency to keep the GPU fed. Measured on two H200s with 3 calls: the "
                                 "write took ~420 ms of each ~1.1 s call, 173.7 committed clips/s against 178.9 "
                                 "with writer actors, so it stays off by default")
    compile_cache: str | None = Field(
        "cache/compile", description="where model actors keep torch.compile's portable cache (pipeline."
        "compile_cache): a path under storage.url, or a URL / absolute path of its own (one cache for many jobs). "
        "A fresh worker loads the entry instead of compiling cold (new pods, scheduled runs): on an H200 the actor's "
        "warm-up 23.1 -> 4.2 s, the first shard 67.0 -> 35.9 s (bench/RESULTS.md); None: off")
    retry_failed: bool = Field(False, description="re-try videos in the failed manifest (default: skip them)")
    limit_videos: int | None = Field(None, ge=1, description="process at most this many pending videos per run")
    log_stats: bool = Field(False, description="print Ray Data's per-operator stats (time, throughput) at the "
                            "end, and the model actors' call times (host copy, GPU, table) every 16 batches")


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float | None = 1.0


class LossConfig(_Strict):
    w_cos: float = Field(1.0, ge=0)
    w_sl1: float = Field(1.0, ge=0)
    target_weights: dict[str, float] = Field(default_factory=dict, description="default 1.0 per target")
    w_head: float = Field(1.0, ge=0)


class DeficiencyConfig(_Strict):
    """Representation-deficiency regularisers; each weight warms up from 0 over warmup_steps."""
    rank: int | None = Field(None, ge=1, description="low-rank bottleneck rank of the input projection")
    w_nuclear: float = Field(0.0, ge=0)
    mask_ratio: float = Field(0.0, ge=0, lt=1)
    w_selection: float = Field(0.0, ge=0)
    w_jacobian: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)


class HeadConfig(_Strict):
    enabled: bool = True
    hidden: int = Field(256, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class TrainConfig(_Strict):
    converter: str = "baseline_interp_linear"
    converter_kwargs: dict[str, Any] = Field(default_factory=dict)
    head: HeadConfig = HeadConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    deficiency: DeficiencyConfig = DeficiencyConfig()
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(8, ge=1, description="clips per worker per step")
    num_workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        2, description="Ray Train workers (DDP ranks); auto: one per GPU with use_gpu, else one per node; default 2")
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)
    wait_for_workers: bool = Field(False, description="let Ray wait for workers the cluster cannot hold now (an "
                                   "autoscaler that publishes no limits); default False: fail at once")
    max_failures: int = Field(1, ge=0, description="worker-group restarts from the last checkpoint; default 1")
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="bf16: CUDA autocast over fp32 master weights; auto: bf16 on CUDA, fp32 on CPU")
    cache: Literal["none", "host", "gpu", "auto"] = Field(
        "auto", description="where a worker keeps its shard of the train split once read: none (read every "
        "epoch), host memory, the training device, auto (device if it fits, else host, else none); default auto")
    shuffle_window: int = Field(128, ge=1, description="clips shuffled together on the device (rounded up to a "
                                "multiple of batch_size); row groups are permuted per epoch too; default 128")
    read_ahead: int = Field(8, ge=1, description="Parquet row groups a worker reads (and copies) ahead in "
                            "threads; default 8")
    checkpoint_every_steps: int | None = Field(None, ge=1, description="also checkpoint every this many steps "
                                               "(epoch ends always); default None")
    keep_checkpoints: int = Field(2, ge=1, description="latest checkpoints kept (the best is kept apart); default 2")
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: a re-submitted job continues its unfinished run; never: always a new run")
    val_split: str = Field("val", description="store split validated on during training (skipped when empty)")
    val_every_steps: int | None = Field(None, ge=1, description="also validate every this many steps (epoch ends "
                                        "always); default None")
    best_metric: str = Field("val.mean_cosine", description="validation metric that picks the best checkpoint "
                             "(val.mean_cosine, val.top1, val.<target>.cosine or .r2)")
    best_mode: Literal["max", "min"] = Field("max", description="whether best_metric is better high or low")
    early_stopping_patience: int | None = Field(None, ge=1, description="stop after this many validations "
                                                "without best_metric improving by min_delta; None: off")
    early_stopping_min_delta: float = Field(0.0, ge=0, description="smallest improvement that counts; default 0")
    result: Literal["last", "best"] = Field("last", description="checkpoint runs/<job>/train.json hands to "
                                            "evaluate/export: the last one or the best validated one")
    log_every_steps: int = Field(20, ge=1, description="steps between writes of the per-step metrics log (one "
                                 "device sync each; every step still gets a record); default 20")
    warm_start: bool = Field(True, description="start from the current `latest` export when one exists")

    @field_validator("best_metric")
    @classmethod
    def _val_metric(cls, v: str) -> str:
        if not v.startswith("val."):
            raise ValueError(f"must be a validation metric (val.mean_cosine, val.top1, val.<target>.cosine "
                             f"or .r2), got {v!r}")
        return v

    @field_validator("converter")
    @classmethod
    def _known_converter(cls, v: str) -> str:
        from tokconv.registry import is_converter, list_converters
        if not is_converter(v):
            raise ValueError(f"unknown converter {v!r}; known: {', '.join(list_converters())}")
        return v


class EvaluateConfig(_Strict):
    split: str = "val"
    batch_size: int = Field(8, ge=1)
    report_html: bool = True
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the metrics pass runs (auto: cuda when available); the reference "
        "I/O sample is always computed on CPU so any consumer can reproduce it bit for bit")


class ExportConfig(_Strict):
    model_name: str = "tokconv"
    version: str | None = Field(None, description="None: a UTC timestamp")
    metric: str = Field("mean_cosine", description="evaluation metric that decides promotion to `latest`")
    higher_is_better: bool = True
    torchscript: bool = False


class JobConfig(_Strict):
    name: str = "job"
    stages: list[Literal["extract", "train", "evaluate", "export"]] = Field(default_factory=lambda: list(STAGES))
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    sources: SourcesConfig = SourcesConfig()
    decode: DecodeConfig = DecodeConfig()
    models: ModelsConfig = ModelsConfig()
    extract: ExtractConfig = ExtractConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()

    @field_validator("stages")
    @classmethod
    def _stages_in_order(cls, v: list[str]) -> list[str]:
        return [s for s in STAGES if s in v]



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
    lines = [f"invalid job config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden"
                                          and not isinstance(e.get("input"), dict) else ""))
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
            raise ConfigError(f"job file {path}: top level must be a mapping, got {type(data).__name__}")
    apply_overrides(data, list(overrides))
    return validate(data, source)
