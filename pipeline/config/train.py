"""Config sections of the train, evaluate and export stages."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from .common import Split, _plain_name, _Strict


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
    floor: Literal["auto", "off"] = Field(
        "auto", description="auto: the floor (baseline_interp_linear, same budget) trained once "
        "and scored beside; off: none; default auto")
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
