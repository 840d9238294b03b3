"""The Ray Train worker's entry: ``train_loop_per_worker`` and the session ``pipeline.train_loop``
sees (rank, device, last checkpoint, report).

Kept free of module-level imports beyond the standard library: Ray pickles the train function by
reference, so unpickling it imports this module, and the heavy ones (torch, tokconv and timm,
the loop) load inside the function, on the worker's training thread, after it has noted when it
started (``pipeline.train_loop.run_worker``'s ``started``).
"""
from __future__ import annotations

import os
import time


def process_start_time() -> float | None:
    """This process's start as unix seconds (Linux /proc), else None."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(ln.split()[1]) for ln in f if ln.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


class RaySession:
    """``pipeline.train_loop``'s view of Ray Train: rank, device, last checkpoint, report."""

    def __init__(self):
        import ray.train
        import ray.train.torch
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.local_world_size = ctx.get_local_world_size()
        self.device = ray.train.torch.get_device()

    def restore(self) -> dict | None:
        import ray.train

        from .train_loop import load_state
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return load_state(d)

    def report(self, metrics: dict, directory: str | None, name: str) -> None:
        import ray.train
        ckpt = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker; ``config``: plain data (``pipeline.train.worker_config``)."""
    started = {"process": process_start_time(), "entry": time.time()}
    from .train_loop import run_worker
    started["imports"] = time.time()
    run_worker(config, RaySession(), started=started)
