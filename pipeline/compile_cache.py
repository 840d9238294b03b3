"""torch.compile's portable cache ("Mega-Cache") in storage: a fresh worker loads compiled kernels.

A model actor on a new process compiles its blocks cold (the inductor cache under
``TORCHINDUCTOR_CACHE_DIR`` is local to the machine: a new KubeRay pod or the next scheduled run
starts empty). The first actor to compile a configuration saves
``torch.compiler.save_cache_artifacts()`` as one file under ``extract.compile_cache``; later actors
``load_cache_artifacts`` it before their first call, so inductor, AOTAutograd and autotuning hit
instead of compile (dynamo still traces).

torch validates every artifact against its own torch/triton version and GPU, so an entry from
another stack is a miss, never wrong code; the key only keeps configurations apart. The cache is an
optimisation: a missing, unreadable or rejected entry is reported and the actor compiles as usual.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from typing import Any

import torch

from pipeline.storage import Storage

# the ModelsConfig fields that change the compiled graphs (weight values do not: parameters are
# inputs)
GRAPH_FIELDS = ("weights", "student", "videomae", "timesformer", "vivit", "dtype", "compile", "fp8",
                "rewrites", "attention")


def cache_key(models: dict[str, Any], batch_shape: tuple[int, ...], device: torch.device) -> str:
    """16 hex digits naming one (models config, input shape, torch, GPU, thread count) combination:
    inductor keys its own entries on the process's thread count too (an actor's num_cpus), so they
    stay apart."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    parts = {"models": {k: models[k] for k in GRAPH_FIELDS if k in models},
             "batch_shape": list(batch_shape), "torch": torch.__version__, "device": gpu,
             "threads": torch.get_num_threads()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def graphs_compiled() -> int:
    """Graphs inductor compiled in this process so far (FX graph cache misses): a loaded entry that
    still leaves misses did not cover this configuration, so the actor saves a new one."""
    from torch._dynamo.utils import counters
    return counters["inductor"]["fxgraph_cache_miss"]


class CompileCache:
    """One cache entry, ``<storage>/<key>.bin``. ``warm_up(first_call)`` is the whole policy:
    ``load()`` before the first compiled call, ``save()`` after it when nothing was loaded or the
    call still compiled graphs (``graphs_compiled``)."""

    def __init__(self, storage: Storage, key: str):
        self.storage, self.name = storage, f"{key}.bin"

    @property
    def url(self) -> str:
        return self.storage.url(self.name)

    def load(self) -> tuple[bool, str]:
        """Hot-load the entry into torch's caches: (loaded, what happened). No entry, an unreadable
        one or one torch rejects gives (False, why); nothing is raised."""
        try:
            data = self.storage.read_bytes(self.name)
        except FileNotFoundError:
            return False, "no entry yet; compiling cold"
        except Exception as e:  # noqa: BLE001 -- storage errors only cost a cold compile
            return False, f"not read ({type(e).__name__}: {e}); compiling cold"
        try:
            info = torch.compiler.load_cache_artifacts(data)
        # a truncated or foreign entry: compile cold, save() replaces it
        except Exception as e:  # noqa: BLE001
            return False, f"rejected ({type(e).__name__}: {e}); compiling cold"
        if info is None:  # torch logs why (checksum, version) and returns None
            return False, "rejected by torch (corrupt, or written by another torch); compiling cold"
        n = sum(len(v) for v in info.artifacts.values())
        return n > 0, f"loaded {n} artifacts ({len(data) / 1e6:.1f} MB)"

    def save(self) -> int:
        """Write what this process compiled (written under a temporary name, then moved into place,
        so a reader never sees half a file); returns the bytes written (0: nothing was compiled)."""
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            return 0
        data = artifacts[0]
        tmp = f".{self.name}.{uuid.uuid4().hex[:8]}.tmp"
        self.storage.write_bytes(tmp, data)
        self.storage.fs.mv(self.storage.path(tmp), self.storage.path(self.name))
        return len(data)

    def warm_up(self, first_call: Callable[[], Any]) -> str:
        """Load, run ``first_call`` (the call that compiles), save when it was not covered; returns
        what happened, for the start-up log. Storage errors on either side cost a cold compile,
        never the caller."""
        loaded, note = self.load()
        compiled_before = graphs_compiled()
        first_call()
        missed = graphs_compiled() - compiled_before
        if loaded and missed:
            note += f", yet {missed} graph(s) compiled"
        if missed or not loaded:
            try:
                n = self.save()
            except Exception as e:  # noqa: BLE001
                return f"{note}; not saved ({type(e).__name__}: {e})"
            note += f"; saved {n / 1e6:.1f} MB to {self.url}" if n else "; nothing compiled to save"
        return note
