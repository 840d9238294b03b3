"""Token layouts of the student and the teachers.

A ``TargetSpec`` says how many tokens a model emits, on which (T, H, W) grid, and of which
width. ``grid=None`` marks a single global token (ViViT's CLS), which has no position.
Grid tokens are row-major in (T, H, W): token ``t*H*W + h*W + w`` (pipeline.backbones
reorders TimeSformer's (H, W, T) output to match).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from math import prod


@dataclass(frozen=True)
class TargetSpec:
    name: str
    tokens: int
    dim: int
    grid: tuple[int, int, int] | None = None

    def __post_init__(self):
        if self.grid is not None:
            object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
            if len(self.grid) != 3 or prod(self.grid) != self.tokens:
                raise ValueError(f"target {self.name!r}: grid {self.grid} does not hold "
                                 f"{self.tokens} tokens")
        elif self.tokens != 1:
            raise ValueError(f"target {self.name!r}: only a single global token may have grid=None")
        if self.dim <= 0:
            raise ValueError(f"target {self.name!r}: dim must be positive, got {self.dim}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TargetSpec:
        grid = d.get("grid")
        return cls(name=d["name"], tokens=int(d["tokens"]), dim=int(d["dim"]),
                   grid=tuple(grid) if grid is not None else None)


STUDENT = TargetSpec("student", 2048, 1024, (8, 16, 16))        # V-JEPA 2 ViT-L, 16 f @256
VIDEOMAE = TargetSpec("videomae", 1568, 768, (8, 14, 14))       # VideoMAE-B, 16 f @224
TIMESFORMER = TargetSpec("timesformer", 3136, 768, (16, 14, 14))  # TimeSformer-B, 16 f @224, no CLS
VIVIT = TargetSpec("vivit", 1, 768, None)                       # ViViT-B CLS token, 32 f @224

TEACHERS: dict[str, TargetSpec] = {t.name: t for t in (VIDEOMAE, TIMESFORMER, VIVIT)}
ALL_SPECS: dict[str, TargetSpec] = {"student": STUDENT, **TEACHERS}


def specs_to_dict(specs: dict[str, TargetSpec]) -> dict[str, dict]:
    return {k: v.to_dict() for k, v in specs.items()}


def specs_from_dict(d: dict[str, dict]) -> dict[str, TargetSpec]:
    return {k: TargetSpec.from_dict(v) for k, v in d.items()}
