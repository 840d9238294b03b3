"""Tensor rows read from a local Parquet shard straight into a preallocated (pinned) buffer.

The store writes its tensor columns uncompressed, PLAIN-encoded and without dictionary
(``FeatureStore.write_shard``), so in a column chunk each clip's row is its 4-byte length and then
its bytes, at a fixed stride inside a data page. ``chunk_pages`` finds those pages from the footer
and the page headers (Thrift compact protocol); ``read_rows`` then reads a run of rows with ONE
``preadv`` that scatters the lengths into a small array and the rows into the destination: one
copy from the page cache, where pyarrow makes its own buffers and the reader copied out of them.
A chunk that is compressed, dictionary- or otherwise encoded, has nulls or pages of another kind
gets None from ``chunk_pages``, and the reader uses pyarrow for it.

``BufferRing``: the reader's window buffers, allocated once (pinned for CUDA: cold pinned
allocations cost seconds) and reused; a buffer comes back with the CUDA event after which its
copy to the device is done.
"""
from __future__ import annotations

import os
import queue
import threading

import numpy as np
import pyarrow.parquet as pq
import torch

_IOV = 512  # rows per preadv (2 iovecs each; Linux IOV_MAX is 1024)


def _varint(b: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        x = b[i]
        i += 1
        out |= (x & 0x7F) << shift
        if x < 0x80:
            return out, i
        shift += 7


def _struct(b: bytes, i: int) -> tuple[dict, int]:
    """A Thrift compact-protocol struct at b[i:] -> ({field id: int | bool | dict}, end); strings
    and doubles are skipped; lists and maps (not in a data page header) raise ValueError."""
    fields, fid = {}, 0
    while True:
        h = b[i]
        i += 1
        if h == 0:
            return fields, i
        kind, delta = h & 0x0F, h >> 4
        if delta:
            fid += delta
        else:
            z, i = _varint(b, i)
            fid = (z >> 1) ^ -(z & 1)
        if kind in (1, 2):
            fields[fid] = kind == 1
        elif kind == 3:
            fields[fid], i = b[i], i + 1
        elif kind in (4, 5, 6):
            z, i = _varint(b, i)
            fields[fid] = (z >> 1) ^ -(z & 1)
        elif kind == 7:
            i += 8
        elif kind == 8:
            n, i = _varint(b, i)
            i += n
        elif kind == 12:
            fields[fid], i = _struct(b, i)
        else:
            raise ValueError(f"thrift field type {kind} in a page header")


def chunk_pages(path: str, meta, rg: int, col: int, width: int) -> list[tuple] | None:
    """Pages of column ``col`` in row group ``rg`` (``meta``: the file's FileMetaData) as
    [(first row, rows, file offset of the first row's length)], each row ``width`` bytes; None
    unless every page is a v1 data page of PLAIN, uncompressed values without nulls."""
    c = meta.row_group(rg).column(col)
    schema = meta.schema.column(col)
    if (c.compression != "UNCOMPRESSED" or c.physical_type != "BYTE_ARRAY"
            or c.dictionary_page_offset is not None or schema.max_repetition_level != 0):
        return None
    pos, end, row, pages = c.data_page_offset, c.data_page_offset + c.total_compressed_size, 0, []
    with open(path, "rb") as f:
        while pos < end:
            f.seek(pos)
            head = f.read(256)
            try:
                h, n = _struct(head, 0)
            except (IndexError, ValueError):
                return None  # a header longer than 256 bytes: not one this writer makes
            dp, size = h.get(5), h.get(3)
            if h.get(1) != 0 or dp is None or dp.get(2) != 0 or size != h.get(2):
                return None
            start = pos + n
            if schema.max_definition_level:  # v1 page: 4-byte length of the RLE levels first
                f.seek(start)
                start += 4 + int.from_bytes(f.read(4), "little")
            rows = dp[1]
            if pos + n + size - start != rows * (width + 4):  # fewer values: nulls
                return None
            pages.append((row, rows, start))
            row, pos = row + rows, pos + n + size
    return pages if row == meta.row_group(rg).num_rows else None


def read_rows(fd: int, pages: list[tuple], rows: np.ndarray, out: np.ndarray) -> None:
    """Rows ``rows`` (ascending indices in the row group) of a chunk with ``pages`` into ``out``
    (len(rows), width) uint8, one preadv per run of consecutive rows in one page; every row's
    stored length is checked."""
    width = out.shape[1]
    i = 0
    while i < len(rows):
        p = next(k for k, (r0, n, _) in enumerate(pages) if r0 <= rows[i] < r0 + n)
        r0, n, off = pages[p]
        j = i + 1
        while j < len(rows) and j - i < _IOV and rows[j] == rows[j - 1] + 1 and rows[j] < r0 + n:
            j += 1
        lengths = np.empty(j - i, np.int32)
        iov = []
        for k in range(i, j):
            iov += [memoryview(lengths[k - i:k - i + 1]).cast("B"), memoryview(out[k])]
        start = off + (int(rows[i]) - r0) * (width + 4)
        got = os.preadv(fd, iov, start)
        if got != (j - i) * (width + 4) or not (lengths == width).all():
            raise ValueError(f"column chunk at byte {start}: rows are not {width}-byte values")
        i = j


class ChunkIndex:
    """Per (shard path, row group): {column: pages} when every one of ``widths``' columns can be
    read directly, else None; and each shard's int32 labels. Built on first use, thread-safe."""

    def __init__(self, widths: dict[str, int], label: str):
        self.widths, self.label = widths, label
        self._pages: dict = {}
        self._labels: dict = {}
        self._meta: dict = {}
        self._lock = threading.Lock()

    def _file(self, path: str):
        with self._lock:
            if path not in self._meta:
                pf = pq.ParquetFile(path)
                names = pf.schema_arrow.names
                starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows
                                          for g in range(pf.metadata.num_row_groups)])
                self._meta[path] = (pf.metadata, names, starts)
                self._labels[path] = pf.read(columns=[self.label]).column(0).to_numpy()
            return self._meta[path]

    def pages(self, path: str, rg: int) -> dict | None:
        key = (path, rg)
        if key not in self._pages:
            meta, names, _ = self._file(path)
            out = {n: chunk_pages(path, meta, rg, names.index(n), w)
                   for n, w in self.widths.items()}
            self._pages[key] = None if any(v is None for v in out.values()) else out
        return self._pages[key]

    def labels(self, path: str, rg: int, rows: np.ndarray) -> np.ndarray:
        _, _, starts = self._file(path)
        return self._labels[path][starts[rg] + rows].astype(np.int32)


class BufferRing:
    """Up to ``slots`` window buffers {name: (rows, *shape) dtype} for ``shapes`` {name: (shape,
    dtype)}, each one allocation (pinned when ``pin``) made on first need and then reused.
    ``take(stop)`` -> a buffer (None once ``stop`` is set); ``give(buffer, event)`` returns one
    that is free once ``event`` (a CUDA event, or None) has completed."""

    def __init__(self, rows: int, shapes: dict, slots: int, pin: bool):
        self.rows, self.shapes, self.slots, self.pin = rows, shapes, slots, pin
        self._free: queue.Queue = queue.Queue()
        self._made = 0
        self._lock = threading.Lock()

    def _allocate(self) -> dict[str, torch.Tensor]:
        sizes = {k: self.rows * int(np.prod(s, dtype=np.int64)) * d.itemsize
                 for k, (s, d) in self.shapes.items()}
        offs, total = {}, 0
        for k, n in sizes.items():
            offs[k], total = total, total + -(-n // 64) * 64  # 64-byte aligned views
        flat = torch.empty(total, dtype=torch.uint8, pin_memory=self.pin)
        return {k: flat[offs[k]:offs[k] + n].view(d).view(self.rows, *s)
                for (k, (s, d)), n in zip(self.shapes.items(), sizes.values())}

    def take(self, stop: threading.Event):
        with self._lock:
            if self._free.empty() and self._made < self.slots:
                self._made += 1
                return self._allocate()
        while not stop.is_set():
            try:
                buf, event = self._free.get(timeout=0.1)
            except queue.Empty:
                continue
            if event is not None:
                event.synchronize()
            return buf
        return None

    def give(self, buf: dict, event=None) -> None:
        self._free.put((buf, event))


def read_file_rows(path: str, pages: list, rows: np.ndarray, out: np.ndarray) -> None:
    """``read_rows`` on the file at ``path`` (opened and closed here)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        read_rows(fd, pages, rows, out)
    finally:
        os.close(fd)
