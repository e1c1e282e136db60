"""Dynamic batching: concurrent requests that each need one item computed share one batched call.

A text encoder forward costs ~3.5 ms for one text and ~22 ms for 32 on 2 CPU cores, so under load
batching multiplies throughput, and when idle a lone request goes through at once (no waiting
window: a batch is whatever queued up while the previous one ran).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable, Generic, Sequence, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class MicroBatcher(Generic[In, Out]):
    """``batcher(item)`` blocks until ``compute([... item ...])`` has run in the worker thread."""

    def __init__(self, compute: Callable[[list[In]], Sequence[Out]], max_batch: int = 64, name: str = "batcher") -> None:
        self.compute, self.max_batch, self.name = compute, max_batch, name
        self._queue: queue.SimpleQueue[tuple[In, Future]] = queue.SimpleQueue()
        self._start_lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def __call__(self, item: In) -> Out:
        future: Future = Future()
        self._queue.put((item, future))
        self._ensure_worker()
        return future.result()

    def _ensure_worker(self) -> None:
        if self._worker is None:
            with self._start_lock:
                if self._worker is None:
                    self._worker = threading.Thread(target=self._run, name=self.name, daemon=True)
                    self._worker.start()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                results = self.compute([item for item, _ in batch])
            except BaseException as error:  # every waiter gets the error; the worker lives on
                for _, future in batch:
                    future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results):
                future.set_result(result)
