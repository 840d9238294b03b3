"""Config sections of the extract side: sources, clip windows, the four backbones, the stage."""
from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from .common import VIDEO_EXTENSIONS, Rewrite, _refuse_removed, _Strict, _url


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
        "raw", description="stored codec: raw, fp8, fp8z, int8, or {column: codec, default: codec}")

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
