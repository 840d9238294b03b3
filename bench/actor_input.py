"""What Ray Data costs a model actor to hand it one batch of decoded clips (issue 4), by block
layout.

The model actor takes batches of ``--batch`` clips (uint8 32x256x256x3, 6.3 MB each: 201 MB for 32).
Decode tasks emit one block per task; when a block holds fewer clips than a batch, Ray's batcher
concatenates several blocks into a new array inside the actor (a copy); when a block is exactly one
batch, the actor gets a read-only view of the object store (no copy). This measures, on a real local
Ray cluster, the gap between the end of one actor call and the start of the next while the input is
already in the object store (materialized first) and the call itself only sleeps (a stand-in for GPU
time that holds no CPU):

* ``per-video``: blocks of ``--clips-per-video`` clips (one video per decode task);
* ``per-batch``: blocks of ``--batch`` clips (``batch / clips_per_video`` videos per decode task),
  with ``DataContext.target_max_block_size`` raised so Ray does not split a 201 MB block.

Prints ms per batch of Ray-side handling for each and the ratio; also whether the actor's array was
a zero-copy (read-only) view. ``--output-mb``: each call also returns a table of that many MB of raw
bytes (the model actor returns ~365 MB of fp16 features per batch of 32), to time the output side.

    python bench/actor_input.py --batches 12            # full-size clips (needs ~6 GB of object
    store) python bench/actor_input.py --side 64 --batches 12  # small dry run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np


def make_blocks(n_clips: int, clips_per_block: int, shape: tuple[int, ...]):
    def produce(batch: dict) -> dict:
        n = len(batch["i"]) * clips_per_block
        return {"clip": np.arange(n), "frames": np.full((n, *shape), 7, np.uint8)}
    return produce


class SleepyActor:
    """Sleeps ``seconds`` per call; records when each call starts and ends and whether its input was
    a view."""

    def __init__(self, seconds: float, output_mb: float = 0.0):
        self.seconds, self.last_end, self.gaps = seconds, None, []
        self.output_bytes = int(output_mb * 2**20)

    def __call__(self, batch: dict) -> dict:
        start = time.perf_counter()
        gap = None if self.last_end is None else start - self.last_end
        view = not batch["frames"].flags.writeable
        time.sleep(self.seconds)
        out = {"gap_s": [np.nan if gap is None else gap], "view": [view],
               "rows": [len(batch["frames"])]}
        # one fresh buffer per call, wrapped without a copy (as tensor_to_binary does)
        if self.output_bytes:
            import pyarrow as pa

            from pipeline.featurestore import tensor_to_binary
            payload = tensor_to_binary(np.ones((1, self.output_bytes), np.uint8))
            out = pa.table({**{k: pa.array(v) for k, v in out.items()}, "features": payload})
        self.last_end = time.perf_counter()
        return out


def run(layout: str, args) -> dict:
    import ray.data
    shape = (args.window, args.side, args.side, 3)
    per_block = args.clips_per_video if layout == "per-video" else args.batch
    n_clips = args.batches * args.batch
    tasks = n_clips // per_block
    ctx = ray.data.DataContext.get_current()
    default_block = ctx.target_max_block_size
    if layout == "per-batch":  # the producing tasks must not split one batch into two blocks
        ctx.target_max_block_size = max(default_block, 2 * per_block * int(np.prod(shape)))
    try:
        ds = ray.data.from_items([{"i": i} for i in range(tasks)], override_num_blocks=tasks)
        ds = ds.map_batches(make_blocks(n_clips, per_block, shape), batch_size=1).materialize()
    finally:
        ctx.target_max_block_size = default_block
    kwargs = {"seconds": args.call_s, "output_mb": args.output_mb}
    out = ds.map_batches(SleepyActor, fn_constructor_kwargs=kwargs, batch_size=args.batch,
                         compute=ray.data.ActorPoolStrategy(size=1,
                                                            max_concurrent_calls_per_actor=1),
                         num_cpus=0.5).select_columns(["gap_s", "view", "rows"]).take_all()
    # the first gap includes start-up
    gaps = [r["gap_s"] for r in out if not np.isnan(r["gap_s"])][1:]
    return {"layout": layout, "clips_per_block": per_block, "batches": len(out),
            "ms_per_batch_median": round(1e3 * float(np.median(gaps)), 1),
            "ms_per_batch_mean": round(1e3 * float(np.mean(gaps)), 1),
            "zero_copy_batches": int(sum(bool(r["view"]) for r in out))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--clips-per-video", type=int, default=4)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--side", type=int, default=256)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--call-s", type=float, default=0.3,
                   help="seconds each actor call sleeps (GPU stand-in)")
    p.add_argument("--output-mb", type=float, default=0.0, help="MB of raw bytes each call returns")
    p.add_argument("--object-store-gb", type=float, default=8.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=int(args.object_store_gb * 2**30))
    try:
        res = {lay: run(lay, args) for lay in ("per-video", "per-batch")}
    finally:
        ray.shutdown()
    per_video, per_batch = (res[k]["ms_per_batch_median"] for k in ("per-video", "per-batch"))
    res["ratio_per_video_over_per_batch"] = round(per_video / max(per_batch, 1e-3), 2)
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
