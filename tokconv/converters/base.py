"""Converter base class: one shared trunk, one output layout per target.

A converter maps student tokens (B, student.tokens, student.dim) to any of its targets
(B, spec.tokens, spec.dim). Subclasses implement two methods:

* ``encode(x) -> state``: the shared trunk, run once per forward (x already masked);
* ``decode(state, name) -> (B, spec.tokens, spec.dim)``: the layout of target ``name``.

The designs, one file each (presets ``<design>_base`` / ``<design>_small``):

* ``baseline_interp_linear`` (baseline.py): grid resampling + one linear map per target, the
  floor every design must beat;
* A ``perceiver_*`` (perceiver.py): latents cross-attend to the student tokens, latent
  self-attention, query decode;
* B ``convmix_*`` (convmix.py): gMLP blocks on the student grid whose spatial gating mixes tokens
  with a (T x T) and a (HW x HW) matrix, separable token mixing as matmuls
  (tokconv/layers/mixing.py, no convolution), then resampling to each target and a GLU MLP;
* C ``ssm_*`` (ssm.py): bidirectional selective-scan blocks over the tokens in raster order, the
  Mamba-2 SSD mixer by default (tokconv/ops/ssd.py), ``mixer="s6"`` for the Mamba-1 scan
  (tokconv/ops/selective_scan.py); resampling decode, attention pooling for a global target;
* D ``tokenlearner_*`` (tokenlearner.py): K softmax-weighted summaries of the tokens, summary
  self-attention, query decode.

A and D decode with ``QueryDecodeMixin`` (query_decode.py): coordinate queries + the student's
local features cross-attend to the trunk's memory (latents, summaries), + an output skip.
``self.resample[name]`` (``GridResample``) maps the student grid to target ``name``'s: separable
interpolation matrices held as non-persistent buffers (they follow ``.to()``, TorchScript sees
constants), a mean over the tokens for a global target.

``forward(x, target)`` returns one target, ``forward(x)`` / ``forward_all(x)`` a dict of all of
them from a single trunk pass (call the module itself under DDP so its hooks run).
``regularisers()`` gives the deficiency terms of the last forward (``add_regulariser``) and the
nuclear norm of the low-rank projections; ``last_mask`` is the last training mask. That
per-forward state is left out of copies and pickles (``__getstate__``).

Presets are plain functions registered with ``@register_converter`` that call ``build_preset``;
it records ``model.config = {"name", "student", "targets", "kwargs"}`` so ``tokconv.io`` can
rebuild the model through the registry. ``@param_budget(lo, hi)`` documents the preset's
parameter budget (counted for the three mission targets together); tests check it.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..deficiency import LowRankLinear, mask_tokens, nuclear_norm
from ..layers import GridResample
from ..targets import STUDENT, TEACHERS, TargetSpec, specs_to_dict


class Converter(nn.Module):
    def __init__(self, *, student: TargetSpec, targets: dict[str, TargetSpec],
                 rank: int | None = None, mask_ratio: float = 0.0):
        super().__init__()
        if student.grid is None:
            raise ValueError(f"student spec {student.name!r} needs a (T, H, W) grid")
        if not targets:
            raise ValueError("a converter needs at least one target")
        for name, spec in targets.items():
            if not isinstance(spec, TargetSpec):
                raise TypeError(f"target {name!r}: expected a TargetSpec, "
                                f"got {type(spec).__name__}")
            if not name.isidentifier():
                raise ValueError(f"target name {name!r} must be an identifier "
                                 "(used as a module key)")
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1 or None, got {rank}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.student = student
        self.targets = dict(targets)
        # student grid -> each target's layout (matrices as buffers: .to() moves, TorchScript)
        self.resample = nn.ModuleDict({n: GridResample(student.grid, s.grid)
                                       for n, s in self.targets.items()})
        self.rank = rank
        self.mask_ratio = float(mask_ratio)
        self.config: dict[str, Any] = {}
        self._reg: dict[str, torch.Tensor] = {}
        self.last_mask: torch.Tensor | None = None

    # -- subclass API -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Any:
        """(B, student.tokens, student.dim) -> trunk state shared by all targets."""
        raise NotImplementedError

    def decode(self, state: Any, name: str) -> torch.Tensor:
        """Trunk state -> (B, spec.tokens, spec.dim) for target ``name``."""
        raise NotImplementedError

    def add_regulariser(self, key: str, value: torch.Tensor) -> None:
        """Record a deficiency term of the current forward (summed if recorded twice)."""
        self._reg[key] = self._reg[key] + value if key in self._reg else value

    # -- public API ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, target: str | None = None):
        """x: (B, student.tokens, student.dim) -> (B, spec.tokens, spec.dim) for ``target``, or a
        dict {name: tensor} for every target when ``target`` is None."""
        s = self.student
        if x.dim() != 3 or x.shape[1] != s.tokens or x.shape[2] != s.dim:
            raise ValueError(f"converter input must be (B, {s.tokens}, {s.dim}), "
                             f"got {tuple(x.shape)}")
        if target is not None and target not in self.targets:
            raise KeyError(f"unknown target {target!r}; this converter has {sorted(self.targets)}")
        self._reg = {}
        self.last_mask = None
        if self.training and self.mask_ratio > 0:
            x, self.last_mask = mask_tokens(x, self.mask_ratio)
        state = self.encode(x)
        if target is not None:
            return self.decode(state, target)
        return {name: self.decode(state, name) for name in self.targets}

    def forward_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self(x)

    def __getstate__(self) -> dict:
        # copies and pickles leave out the last forward's state: its regulariser terms belong to
        # that forward's autograd graph (deepcopy refuses non-leaf tensors; evaluate copies models)
        state = self.__dict__.copy()
        state["_reg"], state["last_mask"] = {}, None
        return state

    def regularisers(self) -> dict[str, torch.Tensor]:
        """Deficiency terms: "selection" from the last forward (designs with selection or
        attention weights), "nuclear" from the low-rank projections (when ``rank`` is set)."""
        reg = dict(self._reg)
        low_rank = [m for m in self.modules() if isinstance(m, LowRankLinear) and m.deficiency]
        if low_rank:
            reg["nuclear"] = torch.stack([nuclear_norm(m) for m in low_rank]).sum()
        return reg


class TargetOutput(nn.Module):
    """Per-target output affine: LayerNorm then Linear to the target width,
    (B, N, in_dim) -> (B, N, spec.dim)."""

    def __init__(self, *, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


def target_outputs(in_dim: int, targets: dict[str, TargetSpec]) -> nn.ModuleDict:
    return nn.ModuleDict({n: TargetOutput(in_dim=in_dim, out_dim=s.dim)
                          for n, s in targets.items()})


def target_embeddings(dim: int, targets: dict[str, TargetSpec]) -> nn.ParameterDict:
    """One learned (dim,) vector per target, added to its coordinate queries (target identity)."""
    return nn.ParameterDict({n: nn.Parameter(torch.randn(dim) * 0.02) for n in targets})


def build_preset(cls: type[Converter], name: str, *, student: TargetSpec = STUDENT,
                 targets: dict[str, TargetSpec] | None = None, defaults: dict[str, Any],
                 overrides: dict[str, Any]) -> Converter:
    """Construct ``cls`` with ``defaults`` updated by ``overrides`` and record its config."""
    targets = dict(targets or TEACHERS)
    kwargs = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
    model = cls(student=student, targets=targets, **kwargs)
    # every constructor argument, defaults included: a saved model rebuilds the same module after
    # a preset's defaults change (tokconv.io passes them all back as overrides)
    full = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if k not in ("self", "student", "targets") and p.default is not inspect.Parameter.empty}
    model.config = {"name": name, "student": student.to_dict(), "targets": specs_to_dict(targets),
                    "kwargs": {**full, **kwargs}}
    return model


def param_budget(lo: float, hi: float):
    """Decorator documenting a preset's parameter budget [lo, hi] (mission targets together)."""
    def deco(fn):
        fn.param_budget = (int(lo), int(hi))
        return fn
    return deco


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
