"""What bench/converters.py's commands share: feature pairs on the device (a real store, or
random pairs for a smoke test of the script only), preset names with overrides, the JSON writer.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.artifacts import stats_tensors
from pipeline.storage import utc_now
from pipeline.train_plan import LABEL
from tokconv import STUDENT, TEACHERS, TargetSpec, create_converter, list_converters

BASELINE = "baseline_interp_linear"


@dataclass
class Pairs:
    """Feature pairs on the device: split -> {"student", <target>...: (N, tokens, dim) fp16,
    "label_index": (N,)}."""
    train: dict
    val: dict
    specs: dict[str, TargetSpec]
    stats: dict = field(default_factory=dict)           # target -> {"mean", "std"} (train split)
    classes: list[str] = field(default_factory=list)
    desc: str = ""

    @property
    def targets(self) -> list[str]:
        return [k for k in self.specs if k != "student"]


def load_store(url: str, name: str, device: torch.device) -> Pairs:
    from pipeline.featurestore import FeatureStore
    from pipeline.storage import Storage
    store = FeatureStore(Storage(url), name)
    specs = store.specs()
    if "student" not in specs or len(specs) < 2:
        raise SystemExit(f"--store {url}: needs 'student' and teacher tensors, has {sorted(specs)}")
    keys = [*specs, LABEL]

    def take(split):
        batches = store.iter_torch(split=split, batch_size=32, columns=[*keys, "split"])
        parts = [{k: b[k].to(device) for k in keys} for b in batches]
        if not parts:
            raise SystemExit(f"--store {url}: no {split!r} clips "
                             "(the footage manifest holds sources out as 'val')")
        return {k: torch.cat([p[k] for p in parts]) for k in keys}

    train, val = take("train"), take("val")
    targets = [t for t in specs if t != "student"]
    mean, std = stats_tensors(store.stats("train"), targets, device)
    stats = {t: {"mean": mean[t], "std": std[t]} for t in targets}
    classes = store.read_meta().get("class_names", [])
    desc = (f"store {url} ({name}): {train['student'].shape[0]} train / "
            f"{val['student'].shape[0]} held-out clips, {len(classes)} classes")
    return Pairs(train, val, specs, stats, classes, desc)


def synthetic_pairs(args, device: torch.device) -> Pairs:
    """SMOKE TEST ONLY: random student tokens, each teacher a fixed random function of them."""
    g = torch.Generator().manual_seed(1234)
    student = TargetSpec("student", STUDENT.tokens, args.student_dim, STUDENT.grid)
    specs = {"student": student, **{n: TargetSpec(n, t.tokens, args.teacher_dim, t.grid)
                                    for n, t in TEACHERS.items()}}
    n = args.train_clips + args.eval_clips
    x = torch.randn(n, student.tokens, student.dim, generator=g)
    data = {"student": x.half(), LABEL: torch.randint(0, 3, (n,), generator=g)}
    from tokconv.layers import resample_tokens
    for name, spec in specs.items():
        if name != "student":
            w = torch.randn(student.dim, spec.dim, generator=g) / student.dim ** 0.5
            y = resample_tokens(x, student.grid, spec.grid) @ w
            data[name] = (torch.tanh(y) * 2 + 0.5).half()
    split = lambda sl: {k: v[sl].to(device) for k, v in data.items()}
    train = split(slice(0, args.train_clips))
    stats = {t: {"mean": train[t].float().mean((0, 1)), "std": train[t].float().std((0, 1))}
             for t in specs if t != "student"}
    return Pairs(train, split(slice(args.train_clips, n)), specs, stats, ["a", "b", "c"],
                 f"SYNTHETIC pairs (smoke test, not a result): {args.train_clips} train / "
                 f"{args.eval_clips} held-out")


def load_pairs(args, device: torch.device) -> Pairs:
    if args.synthetic:
        return synthetic_pairs(args, device)
    return load_store(args.store, args.store_name, device)


def presets(pattern: str, extra=()) -> list[str]:
    """The floor, the presets matching ``pattern`` (comma list of globs), then ``extra`` variants
    written ``preset[key=value;key=value]``; ``pattern`` "" gives the floor and ``extra`` only."""
    globs = [p for p in pattern.split(",") if p]
    return [BASELINE] + [n for n in list_converters() if n != BASELINE and any(
        fnmatch.fnmatch(n, p) for p in globs)] + list(extra)


def split_variant(name: str) -> tuple[str, dict]:
    """``preset[key=value;...]`` -> (preset, {key: value parsed as YAML})."""
    import yaml
    base, _, rest = name.partition("[")
    items = (i.split("=", 1) for i in rest.rstrip("]").split(";") if i)
    return base, {k: yaml.safe_load(v) for k, v in items}


def make(name: str):
    base, kw = split_variant(name)
    return create_converter(base, **kw)


def write(path, res: dict) -> None:
    """``res`` as JSON at ``path`` (when given), stamped by pipeline.storage.utc_now."""
    if path:
        res["date"] = utc_now()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(res, indent=1, default=str))
