"""Threads handing work to the training step: bounded queues that a stop event can interrupt,
calls kept in flight on a pool, and an epoch's batch iterator that stops its loader thread."""
from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch


class Batches:
    """An epoch's batches (an iterator) with its loader thread, stopped at the end, at ``close()``
    or when dropped."""

    def __init__(self, gen: Iterator[dict], q: queue.Queue, stop: threading.Event,
                 loader: threading.Thread):
        self.gen, self.q, self.stop, self.loader = gen, q, stop, loader

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        try:
            return next(self.gen)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.gen.close()
        self.stop.set()
        while self.loader.is_alive():
            try:
                self.q.get(timeout=0.1)
            except queue.Empty:
                pass
        self.loader.join()

    __del__ = close


def put_unless_stopped(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Hand ``item`` over unless ``stop`` is set first; whether it was."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def read_ahead(pool: ThreadPoolExecutor, fn, keys: list, depth: int) -> Iterator:
    """fn(key) for each key, in order, with ``depth`` calls in flight on ``pool``."""
    it = iter(keys)
    futures = deque(pool.submit(fn, k) for k in itertools.islice(it, depth))
    while futures:
        result = futures.popleft().result()
        for k in itertools.islice(it, 1):
            futures.append(pool.submit(fn, k))
        yield result
