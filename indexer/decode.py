"""Stage 3: decode and preprocess images in parallel worker processes, into full model batches.

Workers receive paths and return tensors, sizes and failures as data (never exceptions), so one
bad file costs one row in the failures table and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from indexer.images import decode_image
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

    def __init__(self, paths: Sequence[str], preprocess: Callable, draft: tuple[int, int], max_pixels: int) -> None:
        self.paths, self.preprocess, self.draft, self.max_pixels = paths, preprocess, draft, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        try:
            image, size = decode_image(self.paths[position], self.max_pixels, self.draft)
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


def decoded_batches(paths: Sequence[str], preprocess: Callable, image_size: tuple[int, int], batch_size: int,
                    workers: int, max_pixels: int, pin_memory: bool = False) -> Iterator[DecodedBatch]:
    """Yield batches in path order; decoding runs *workers* processes ahead of the consumer."""
    import multiprocessing

    from torch.utils.data import DataLoader

    if not paths:
        return
    if len(paths) <= batch_size:
        workers = 0  # starting worker processes costs more than decoding one batch
    context = None
    if workers:
        # Not fork: the parent holds LanceDB's async runtime, which a forked child may deadlock on.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "PIL.Image", "indexer.decode"])
    dataset = _Files(paths, preprocess, image_size, max_pixels)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                        pin_memory=pin_memory, prefetch_factor=4 if workers else None,
                        multiprocessing_context=context)
    yield from loader
