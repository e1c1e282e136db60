"""Stage 3: decode and preprocess images in parallel, into full model batches, in path order.

Two executors with one signature: threads (Pillow and torch release the GIL while decoding,
resizing and normalising; nothing to start, nothing re-imported) serve CPU runs, where the
model needs the cores anyway; worker processes serve GPU runs, which need more decoding than
one interpreter can drive. Workers receive paths and return tensors, sizes and failures as data
(never exceptions), so one bad file costs one row in the failures table and nothing else.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from encoder.images import decode_image
from encoder.reduction import Reduction
from store.errors import ImageError

if TYPE_CHECKING:
    import torch


@dataclass
class DecodedBatch:
    positions: list[int]  # indexes into the job list
    pixels: "torch.Tensor | None"  # [len(positions), 3, H, W]
    sizes: list[tuple[int, int]]
    failures: list[tuple[int, ImageError]]


class _Files:
    """Map-style dataset: item i is (i, tensor | None, size, error | None)."""

    def __init__(self, paths: Sequence[str], preprocess: Callable, reduction: Reduction | None,
                 max_pixels: int) -> None:
        self.paths, self.preprocess, self.reduction, self.max_pixels = paths, preprocess, reduction, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        try:
            reduction = self.reduction
            image, size = decode_image(self.paths[position], self.max_pixels, reduction and reduction.draft)
            if reduction is not None:
                image = reduction.finish(image, size)
            return position, self.preprocess(image), size, None
        except ImageError as error:
            return position, None, (0, 0), error
        except Exception as error:  # a decoder bug on one file must not end the run
            return position, None, (0, 0), ImageError(self.paths[position], "corrupt", repr(error)[:200])


def _collate(items) -> DecodedBatch:
    import torch

    good = [item for item in items if item[3] is None]
    return DecodedBatch(
        positions=[item[0] for item in good],
        pixels=torch.stack([item[1] for item in good]) if good else None,
        sizes=[item[2] for item in good],
        failures=[(item[0], item[3]) for item in items if item[3] is not None],
    )


def decoded_batches(paths: Sequence[str], preprocess: Callable, reduction: Reduction | None, batch_size: int,
                    workers: int, max_pixels: int, executor: str = "threads",
                    pin_memory: bool = False) -> Iterator[DecodedBatch]:
    """Yield batches in path order, decoded by *workers* threads or processes running ahead; JPEGs
    reduced while decoding as *reduction* allows (None: decoded at full size)."""
    if not paths:
        return
    dataset = _Files(paths, preprocess, reduction, max_pixels)
    if len(paths) <= batch_size or workers == 0:
        for start in range(0, len(paths), batch_size):
            yield _collate([dataset[i] for i in range(start, min(start + batch_size, len(paths)))])
    elif executor == "threads":
        yield from _threaded(dataset, batch_size, workers)
    else:
        yield from _processes(dataset, batch_size, workers, pin_memory)


def _threaded(dataset: _Files, batch_size: int, workers: int) -> Iterator[DecodedBatch]:
    def batch(start: int) -> DecodedBatch:
        return _collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipdex-decode") as pool:
        ahead: deque = deque()
        for start in range(0, len(dataset), batch_size):
            ahead.append(pool.submit(batch, start))
            if len(ahead) > 2 * workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _processes(dataset: _Files, batch_size: int, workers: int, pin_memory: bool) -> Iterator[DecodedBatch]:
    import multiprocessing

    from torch.utils.data import DataLoader

    # Not fork: the parent holds LanceDB's async runtime, which a forked child may deadlock on.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "PIL.Image", "indexer.decode"])
    yield from DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                          pin_memory=pin_memory, prefetch_factor=4, multiprocessing_context=context)
