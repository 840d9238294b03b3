"""Training data plan (driver side): which row groups hold a split's clips, each rank's piece of
them, and whether a rank's clips fit a cache. The reader that streams them: ``pipeline.train_data``.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import torch

from . import codecs
from .featurestore import FeatureStore

LABEL = "label_index"


# ---------------------------------------------------------------- plan (driver)

def plan_blocks(store: FeatureStore, split: str) -> list[dict]:
    """Blocks of ``split``: [{"path": shard path in the store, "rg": row group, "rows": [row in
    it]}], by path and row group."""
    fs = store.storage.pyarrow_filesystem()

    def blocks_of(rec: dict) -> list[dict]:
        if split not in rec["sums"]:
            return []
        pf = pq.ParquetFile(store.storage.path(rec["path"]), filesystem=fs)
        mixed = set(rec["sums"]) != {split}
        col = (pf.read(columns=["split"]).column("split").to_numpy(zero_copy_only=False)
               if mixed else None)
        out, start = [], 0
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            rows = np.arange(n) if col is None else np.flatnonzero(col[start:start + n] == split)
            if len(rows):
                out.append({"path": rec["path"], "rg": rg, "rows": rows.tolist()})
            start += n
        return out

    with ThreadPoolExecutor(8) as pool:  # sorted: the plan must not depend on commit times
        return sorted((b for blocks in pool.map(blocks_of, store.commits()) for b in blocks),
                      key=lambda b: (b["path"], b["rg"]))


def rank_segments(sizes: list[int], world: int, rank: int, seed: int,
                  shuffle: bool = True) -> list[tuple]:
    """This rank's piece of the blocks: [(block, lo, hi)] (clips lo:hi of the block's rows). Pieces
    are contiguous in a seeded block order and hold ``sum(sizes) // world`` clips each."""
    n = len(sizes)
    order = np.random.default_rng([seed, 1]).permutation(n) if shuffle else range(n)
    per = sum(sizes) // world
    lo, hi, pos, segs = rank * per, (rank + 1) * per, 0, []
    for b in order:
        a, z = max(pos, lo), min(pos + sizes[b], hi)
        if a < z:
            segs.append((int(b), a - pos, z - pos))
        pos += sizes[b]
    return segs


def clip_bytes(layouts: dict[str, dict]) -> int:
    """Stored bytes of one clip over ``layouts`` (``FeatureStore.layouts()``), + its int32 label."""
    return sum(codecs.row_bytes(v) for v in layouts.values()) + 4


def resolve_cache(mode: str, n_clips: int, layouts: dict[str, dict], device: torch.device,
                  local_world: int = 1) -> str:
    """``train.cache`` -> "none" | "host" | "device" for ``n_clips`` of ``layouts`` on ``device``.
    auto: the device when the clips fit in 70% of its free memory, else host when they fit in half
    the available host memory (shared by the node's workers), else none."""
    need = n_clips * clip_bytes(layouts)
    if mode == "gpu":
        return "device"
    if mode in ("none", "host"):
        return mode
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need <= 0.7 * free:
            return "device"
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return "host" if need <= 0.5 * avail / max(local_world, 1) else "none"
