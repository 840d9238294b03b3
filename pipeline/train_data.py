"""Training data path: the feature store's raw bytes to the training device, one shard per rank.

* **Plan** (driver, once, ``train_plan.plan_blocks``): every row group of every committed shard
  is a *block*; its rows of one split are the block's clips. Only footers (and the ``split``
  column of shards that mix splits) are read.
* **Shard per rank** (``train_plan.rank_segments``): blocks are dealt out once per run: a seeded
  permutation, concatenated and cut into ``world`` equal contiguous pieces, so a rank reads only
  its own row groups and every rank takes the same number of steps.
* **Epoch order** (``ClipReader.windows``): per epoch a rank permutes its segments and shuffles
  clips within windows of ``shuffle_window``. The order depends on (seed, epoch, rank) only: the
  same under every cache mode, and batch ``k`` of an epoch is known without reading, so a resume
  starts there.
* **Reader** (``ClipReader.batches``): threads read a window's rows from local shards straight
  into one of a few reused pinned buffers (``pipeline.chunk_reads``: one preadv per run of rows,
  one copy from the page cache); other shards (object stores, chunks not plainly encoded) and the
  ``host`` cache read row groups with pyarrow (each column's stored rows, in any codec, are a
  uint8 view of the Arrow buffer: ``columns.column_rows``) and copy the rows into pinned memory.
  The main thread copies the window to the device on a side stream while the previous window
  computes, and each batch is gathered on the device and decoded there by ``decode``
  (``pipeline.codecs``: any registered codec; a compressed one, e.g. fp8z, is decompressed by
  pyarrow on the read-ahead threads). Caches keep a rank's stored rows (codec-sized) after their
  first read: ``host`` skips the Parquet read, ``device`` (``train.cache: gpu``) the host.
"""
from __future__ import annotations

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
from .chunk_reads import BufferRing, ChunkIndex, read_file_rows
from .featurestore import FeatureStore
from .prefetch import Batches, put_unless_stopped, read_ahead
from .train_plan import LABEL, rank_segments


def decode(raw: torch.Tensor, layout: dict) -> torch.Tensor:
    """Stored rows (B, row_bytes) uint8, already on the device -> float32 (B, N, D) there.

    The one step from stored bytes to training values: the column's codec (``layout["codec"]``;
    fp8/int8 rows carry their per-(clip, channel) scales)."""
    return codecs.decode(raw, layout, torch.float32)


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
    ``cache``: "none" | "host" | "device" (``resolve_cache``). ``direct``: read local shards
    straight into ``ring_slots`` reused window buffers (None: when the store is local and the cache
    is not ``host``); the same batches either way.
    """

    def __init__(self, store: FeatureStore, blocks: list[dict], names: list[str], *, rank: int,
                 world: int, batch_size: int, device: torch.device, seed: int = 0,
                 shuffle: bool = True, window: int = 128, cache: str = "none",
                 read_ahead: int = 8, direct: bool | None = None, ring_slots: int = 3):
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
        local = store.storage.protocol == "file"
        self.direct = (local and cache != "host") if direct is None else direct
        if self.direct and (not local or cache == "host"):
            raise ValueError("ClipReader(direct=True) reads local shards, without the host cache")
        self.ring_slots = ring_slots
        self._index = ChunkIndex({n: codecs.row_bytes(v) for n, v in self.layouts.items()}, LABEL)

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
    def batches(self, epoch: int, start: int = 0) -> Batches:
        """Batches ``start``.. of ``epoch`` (a resume passes the position it stopped at). Reading
        starts at the call, not at the first ``next``: a worker asks before building its model."""
        per_window = self.window // self.batch_size
        wins = self.windows(epoch)[start // per_window:]
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        loader = threading.Thread(target=self._load, args=(wins, q, stop), daemon=True,
                                  name="clip-loader")
        loader.start()
        return Batches(self._yield(wins, start % per_window, q), q, stop, loader)

    def _yield(self, wins: list[_Window], skip: int, q: queue.Queue) -> Iterator[dict]:
        nxt = self._upload(self._get(q)) if wins else None
        for i, win in enumerate(wins):
            cur, nxt = self._ready(nxt), None
            n_b = -(-len(win.perm) // self.batch_size)
            for j in range(skip if i == 0 else 0, n_b):
                if nxt is None and i + 1 < len(wins) and not q.empty():
                    # the next window's copy overlaps this one's steps
                    nxt = self._upload(self._get(q))
                yield self._batch(cur, j)
            if cur.get("ring") is not None:  # CPU: the window's host buffer is free again
                cur["ring"].give(cur.pop("buf"))
            if nxt is None and i + 1 < len(wins):
                nxt = self._upload(self._get(q))

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
        kind, win, tensors, ring, buf = item
        if kind == "cached":  # every clip already on the device: gather from the cache itself
            order = self._to_device(torch.as_tensor(win.canon[win.perm]))
            return {"t": self._dev, "order": order, "event": None, "fill": None}
        perm = torch.as_tensor(win.perm)
        if not self._cuda:
            return {"t": tensors, "order": perm, "event": None, "fill": win.canon, "ring": ring,
                    "buf": buf}
        with torch.cuda.stream(self._copy_stream):
            t = {k: v.to(self.device, non_blocking=True) for k, v in tensors.items()}
            order = self._to_device(perm)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        if ring is not None:  # the buffer is free once the copy is done
            ring.give(buf, event)
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
            if self.direct:
                return self._load_direct(wins, q, stop)
            plans, reads = self._plan_reads(wins)
            with ThreadPoolExecutor(self.read_ahead, thread_name_prefix="clip-read") as readers, \
                    ThreadPoolExecutor(self.read_ahead, thread_name_prefix="clip-copy") as copiers:
                blocks = read_ahead(readers, self._read_segment, reads, self.read_ahead)
                last, stored, pending = None, {}, deque()
                for win, plan in zip(wins, plans):
                    if plan is None:
                        pending.append((("cached", win, None, None, None), []))
                    else:
                        item, copies, last = self._assemble(win, plan, blocks, last, copiers,
                                                            stored)
                        pending.append((item, copies))
                    while len(pending) > 1 or (pending and win is wins[-1]):
                        item, copies = pending.popleft()
                        for f in copies:
                            f.result()
                        if not put_unless_stopped(q, item, stop):
                            return
        except BaseException as e:  # noqa: BLE001  (re-raised in the consumer)
            q.put(e)

    def _load_direct(self, wins: list[_Window], q: queue.Queue, stop: threading.Event) -> None:
        """Each window's rows read in parallel straight into a ring buffer, in order."""
        ring = BufferRing(self.window, self._shapes(), self.ring_slots, self._cuda)
        with ThreadPoolExecutor(self.read_ahead, thread_name_prefix="clip-read") as pool:
            for win in wins:
                if self.cache == "device" and self._dev_has[win.canon].all():
                    item = ("cached", win, None, None, None)
                else:
                    buf = ring.take(stop)
                    if buf is None:
                        return
                    out = {k: v[:len(win.canon)] for k, v in buf.items()}
                    for f in [pool.submit(*task) for task in self._direct_tasks(win, out)]:
                        f.result()
                    item = ("host", win, out, ring, buf)
                if not put_unless_stopped(q, item, stop):
                    return

    def _direct_tasks(self, win: _Window, out: dict) -> Iterator[tuple]:
        """(fn, *args) reading each part of ``win`` into ``out`` at its offset: direct reads of
        up to 8 rows of one column each, or pyarrow for a row group that cannot be read so."""
        off = 0
        for s, a, z in win.parts:
            b, lo, _ = self.segs[s]
            block = self.blocks[b]
            path = self.store.storage.path(block["path"])
            rows = np.asarray(block["rows"][lo + a:lo + z])
            pages = self._index.pages(path, block["rg"])
            if pages is None:
                yield self._arrow_part, out, off, s, a, z
            else:
                out[LABEL][off:off + len(rows)] = torch.from_numpy(
                    self._index.labels(path, block["rg"], rows))
                for n in self.layouts:
                    for c in range(0, len(rows), 8):
                        dst = out[n][off + c:off + min(c + 8, len(rows))].numpy()
                        yield read_file_rows, path, pages[n], rows[c:c + 8], dst
            off += len(rows)

    def _arrow_part(self, out: dict, off: int, s: int, a: int, z: int) -> None:
        data = self._read_segment(s)
        self._copy_rows(out, off, data, data["_rows"][a:z])

    def _shapes(self) -> dict:
        shapes = {k: ((codecs.row_bytes(v),), torch.uint8) for k, v in self.layouts.items()}
        shapes[LABEL] = ((), torch.int32)
        return shapes

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
        shapes = self._shapes()
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
        return ("host", win, out, None, None), copies, last

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
