"""Training data path: the feature store's raw bytes to the training device, one shard per rank.

* **Plan** (driver, once, ``plan_blocks``): every row group of every committed shard is a *block*;
  its rows of one split are the block's clips. Only footers (and the ``split`` column of shards
  that mix splits) are read.
* **Shard per rank** (``rank_segments``): blocks are dealt out once per run: a seeded permutation,
  concatenated and cut into ``world`` equal contiguous pieces, so a rank reads only its own row
  groups and every rank takes the same number of steps.
* **Epoch order** (``ClipReader.windows``): per epoch a rank permutes its segments and shuffles
  clips within windows of ``shuffle_window``. The order depends on (seed, epoch, rank) only: the
  same under every cache mode, and batch ``k`` of an epoch is known without reading, so a resume
  starts there.
* **Reader** (``ClipReader.batches``): threads read row groups with pyarrow (each column's stored
  rows, in any codec, are a uint8 view of the Arrow buffer: ``columns.column_rows``, no
  per-element work), copy a window's rows into pinned memory (one memcpy), the main thread copies
  the window to the device on a side stream while the previous window computes, and each batch
  is gathered on the device and decoded there by ``decode`` (``pipeline.codecs``: raw, fp8,
  int8). Caches keep a rank's stored rows (codec-sized) after their first read: ``host`` skips
  the Parquet read, ``device`` (``train.cache: gpu``) the host.
"""
from __future__ import annotations

import itertools
import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from . import codecs, columns
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


def decode(raw: torch.Tensor, layout: dict) -> torch.Tensor:
    """Stored rows (B, row_bytes) uint8, already on the device -> float32 (B, N, D) there.

    The one step from stored bytes to training values: the column's codec (``layout["codec"]``;
    fp8/int8 rows carry their per-(clip, channel) scales)."""
    return codecs.decode(raw, layout, torch.float32)


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


# ---------------------------------------------------------------- reader (worker)

@dataclass
class _Window:
    """A window of clips: ``canon`` (n,) cache rows in read order, ``parts`` [(segment, a, z)] runs
    of those clips within segments, ``perm`` (n,) read positions in training order."""
    canon: np.ndarray
    parts: list[tuple[int, int, int]]
    perm: np.ndarray


class ClipReader:
    """Batches of one rank's clips of a split, on ``device``.

    ``batches(epoch, start)`` -> iterator of {name: float32 (B, tokens, dim), "label_index":
    int64 (B,)}; ``steps_per_epoch`` batches per epoch (the last may be smaller), the same on
    every rank.
    ``cache``: "none" | "host" | "device" (``resolve_cache``).
    """

    def __init__(self, store: FeatureStore, blocks: list[dict], names: list[str], *, rank: int,
                 world: int, batch_size: int, device: torch.device, seed: int = 0,
                 shuffle: bool = True, window: int = 128, cache: str = "none",
                 read_ahead: int = 8):
        layouts = store.layouts()
        self.store, self.blocks, self.names, self.device = store, blocks, list(names), device
        self.layouts = {n: layouts[n] for n in self.names}
        self.batch_size, self.seed, self.shuffle, self.rank = batch_size, seed, shuffle, rank
        self.window = -(-window // batch_size) * batch_size
        self.cache, self.read_ahead = cache, read_ahead
        self.segs = rank_segments([len(b["rows"]) for b in blocks], world, rank, seed, shuffle)
        self.seg_len = np.array([z - a for _, a, z in self.segs], dtype=np.int64)
        self.seg_start = np.concatenate([[0], np.cumsum(self.seg_len)])
        self.num_clips = int(self.seg_start[-1])
        if self.num_clips == 0:
            raise ValueError(f"rank {rank}: no clips (the split has fewer clips than the {world} "
                             f"workers)")
        self.steps_per_epoch = -(-self.num_clips // batch_size)
        self._cuda = device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(device) if self._cuda else None
        self._host: dict[str, torch.Tensor] | None = None     # cache == "host": pageable memory
        self._dev: dict[str, torch.Tensor] | None = None      # cache == "device"
        self._host_has = np.zeros(self.num_clips, bool)
        self._host_lock = threading.Lock()
        self._dev_has = np.zeros(self.num_clips, bool)

    # ------------------------------------------------------------ order
    def windows(self, epoch: int) -> list[_Window]:
        """This epoch's windows (see the module docstring); depends on (seed, epoch, rank) only."""
        rng = np.random.default_rng([self.seed, epoch, self.rank, 2])
        order = rng.permutation(len(self.segs)) if self.shuffle else np.arange(len(self.segs))
        out, parts, canon, n = [], [], [], 0
        for s in order:
            a = 0
            while a < self.seg_len[s]:
                z = min(int(self.seg_len[s]), a + self.window - n)
                parts.append((int(s), a, z))
                canon.append(np.arange(self.seg_start[s] + a, self.seg_start[s] + z))
                n, a = n + z - a, z
                if n == self.window:
                    out.append((parts, np.concatenate(canon)))
                    parts, canon, n = [], [], 0
        if parts:
            out.append((parts, np.concatenate(canon)))
        return [_Window(c, p, rng.permutation(len(c)) if self.shuffle else np.arange(len(c)))
                for p, c in out]

    # ------------------------------------------------------------ batches
    def batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``start``.. of ``epoch`` (a resume passes the position it stopped at)."""
        per_window = self.window // self.batch_size
        wins = self.windows(epoch)[start // per_window:]
        skip = start % per_window
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        loader = threading.Thread(target=self._load, args=(wins, q, stop), daemon=True,
                                  name="clip-loader")
        loader.start()
        try:
            nxt = self._upload(self._get(q)) if wins else None
            for i, win in enumerate(wins):
                cur, nxt = self._ready(nxt), None
                n_b = -(-len(win.perm) // self.batch_size)
                for j in range(skip if i == 0 else 0, n_b):
                    if nxt is None and i + 1 < len(wins) and not q.empty():
                        # the next window's copy overlaps this one's steps
                        nxt = self._upload(self._get(q))
                    yield self._batch(cur, j)
                if nxt is None and i + 1 < len(wins):
                    nxt = self._upload(self._get(q))
        finally:
            stop.set()
            while loader.is_alive():
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass
            loader.join()

    @staticmethod
    def _get(q: queue.Queue):
        item = q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def _batch(self, win: dict, j: int) -> dict[str, torch.Tensor]:
        idx = win["order"][j * self.batch_size:(j + 1) * self.batch_size]
        out = {n: decode(win["t"][n].index_select(0, idx), self.layouts[n]) for n in self.names}
        out[LABEL] = win["t"][LABEL].index_select(0, idx).long()
        return out

    # ------------------------------------------------------------ main thread: device side
    def _upload(self, item) -> dict:
        """Host window -> device window {"t": tensors, "order": rows in training order, "event"}."""
        kind, win, tensors = item
        if kind == "cached":  # every clip already on the device: gather from the cache itself
            order = self._to_device(torch.as_tensor(win.canon[win.perm]))
            return {"t": self._dev, "order": order, "event": None, "fill": None}
        perm = torch.as_tensor(win.perm)
        if not self._cuda:
            return {"t": tensors, "order": perm, "event": None, "fill": win.canon}
        with torch.cuda.stream(self._copy_stream):
            t = {k: v.to(self.device, non_blocking=True) for k, v in tensors.items()}
            order = self._to_device(perm)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return {"t": t, "order": order, "event": event, "fill": win.canon}

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory().to(self.device, non_blocking=True) if self._cuda else t

    def _ready(self, win: dict) -> dict:
        """Make the compute stream wait for ``win``'s copy; fill the device cache from it."""
        if win["event"] is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(win["event"])
            for v in [*win["t"].values(), win["order"]]:
                v.record_stream(stream)
        if self.cache == "device" and win["fill"] is not None:
            if self._dev is None:
                self._dev = {k: torch.empty((self.num_clips, *v.shape[1:]), dtype=v.dtype,
                                            device=self.device) for k, v in win["t"].items()}
            rows = self._to_device(torch.as_tensor(win["fill"]))
            for k, v in win["t"].items():
                self._dev[k].index_copy_(0, rows, v)
            self._dev_has[win["fill"]] = True
        return win

    # ------------------------------------------------------------ loader thread: host side
    def _load(self, wins: list[_Window], q: queue.Queue, stop: threading.Event) -> None:
        """Reads run ``read_ahead`` row groups ahead; each window's row copies run in parallel on a
        second pool while the next window's reads go on; windows are handed over in order."""
        try:
            plans, reads = self._plan_reads(wins)
            with ThreadPoolExecutor(self.read_ahead, thread_name_prefix="clip-read") as readers, \
                    ThreadPoolExecutor(self.read_ahead, thread_name_prefix="clip-copy") as copiers:
                blocks = _read_ahead(readers, self._read_segment, reads, self.read_ahead)
                last, stored, pending = None, {}, deque()
                for win, plan in zip(wins, plans):
                    if plan is None:
                        pending.append((("cached", win, None), []))
                    else:
                        item, copies, last = self._assemble(win, plan, blocks, last, copiers,
                                                            stored)
                        pending.append((item, copies))
                    while len(pending) > 1 or (pending and win is wins[-1]):
                        item, copies = pending.popleft()
                        for f in copies:
                            f.result()
                        while not stop.is_set():
                            try:
                                q.put(item, timeout=0.1)
                                break
                            except queue.Full:
                                pass
                        if stop.is_set():
                            return
        except BaseException as e:  # noqa: BLE001  (re-raised in the consumer)
            q.put(e)

    def _plan_reads(self, wins: list[_Window]) -> tuple[list, list[int]]:
        """Per window None (all on the device) or, per part, "host" (in the host cache), "read" (a
        new segment read) or "last" (the segment read last); plus the segments to read, in
        order."""
        host_has = self._host_has.copy()
        plans, reads, last = [], [], None
        for win in wins:
            if self.cache == "device" and self._dev_has[win.canon].all():
                plans.append(None)
                continue
            plan = []
            for s, a, z in win.parts:
                lo = self.seg_start[s]
                if self.cache == "host" and host_has[lo + a:lo + z].all():
                    plan.append("host")
                elif s == last:
                    plan.append("last")
                else:
                    plan.append("read")
                    reads.append(s)
                    last = s
                    if self.cache == "host":
                        host_has[lo:lo + self.seg_len[s]] = True
            plans.append(plan)
        return plans, reads

    def _read_segment(self, s: int) -> dict[str, torch.Tensor]:
        """Segment ``s``'s row group as stored rows viewing the Arrow buffers, and its clips' rows
        in it."""
        b, lo, hi = self.segs[s]
        block = self.blocks[b]
        pf = pq.ParquetFile(self.store.storage.path(block["path"]), filesystem=self._fs())
        table = pf.read_row_group(block["rg"], columns=[*self.names, LABEL])
        out = {n: columns.column_rows(table.column(n), lay) for n, lay in self.layouts.items()}
        out[LABEL] = torch.from_numpy(table.column(LABEL).to_numpy().astype(np.int32))
        out["_rows"] = torch.as_tensor(block["rows"][lo:hi], dtype=torch.int64)
        return out

    def _fs(self):
        if not hasattr(self, "_pafs"):
            self._pafs = self.store.storage.pyarrow_filesystem()
        return self._pafs

    def _assemble(self, win: _Window, plan: list[str], blocks: Iterator[dict], last, copiers,
                  stored):
        """The window's clips in read order into pinned host memory: one copy of each row, the
        copies submitted to ``copiers``. Returns (item, copy futures, last segment read)."""
        n = len(win.canon)
        shapes = {k: ((codecs.row_bytes(v),), torch.uint8) for k, v in self.layouts.items()}
        shapes[LABEL] = ((), torch.int32)
        out = {k: torch.empty((n, *s), dtype=d, pin_memory=self._cuda)
               for k, (s, d) in shapes.items()}
        copies, off = [], 0
        for (s, a, z), how in zip(win.parts, plan):
            lo, k = int(self.seg_start[s]), z - a
            if how == "host":  # stored by this epoch's earlier window, or by an earlier epoch
                copies.append(copiers.submit(self._copy_host, out, off, lo + a, lo + z,
                                             stored.get(s)))
            else:
                if how == "read":
                    last = (s, next(blocks))
                    if self.cache == "host":
                        stored[s] = copiers.submit(self._store_host, s, last[1], shapes)
                data = last[1]
                copies.append(copiers.submit(self._copy_rows, out, off, data, data["_rows"][a:z]))
            off += k
        return ("host", win, out), copies, last

    @staticmethod
    def _copy_rows(out: dict, off: int, data: dict, rows: torch.Tensor) -> None:
        for name, t in out.items():
            torch.index_select(data[name], 0, rows, out=t[off:off + len(rows)])

    def _copy_host(self, out: dict, off: int, lo: int, hi: int, stored) -> None:
        if stored is not None:
            stored.result()  # submitted earlier to the same FIFO pool: running or done
        for name, t in out.items():
            t[off:off + hi - lo].copy_(self._host[name][lo:hi])

    def _store_host(self, s: int, data: dict, shapes: dict) -> None:
        with self._host_lock:
            if self._host is None:
                self._host = {k: torch.empty((self.num_clips, *sh), dtype=d)
                              for k, (sh, d) in shapes.items()}
        lo, hi = int(self.seg_start[s]), int(self.seg_start[s + 1])
        for name, t in self._host.items():
            torch.index_select(data[name], 0, data["_rows"], out=t[lo:hi])
        self._host_has[lo:hi] = True


def _read_ahead(pool: ThreadPoolExecutor, fn, keys: list, depth: int) -> Iterator:
    """fn(key) for each key, in order, with ``depth`` calls in flight on ``pool``."""
    it = iter(keys)
    futures = deque(pool.submit(fn, k) for k in itertools.islice(it, depth))
    while futures:
        result = futures.popleft().result()
        for k in itertools.islice(it, 1):
            futures.append(pool.submit(fn, k))
        yield result
