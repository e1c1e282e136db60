"""How far a JPEG may be reduced while it is decoded and still embed like the full-size file.

libjpeg can decode at 1/2, 1/4 or 1/8 scale for a fraction of the work, but what the model then
sees must match its own preprocessing of the full image (PIL open, upright, RGB, the model's
transform). Two things break that unless handled:

- geometry: the model's ``Resize`` rounds the long side from the size it is given, so a reduced
  image comes out a pixel shorter or longer, is scaled differently and cropped elsewhere (a 64 px
  model: cosine 0.975 on a photograph even at 1/2 scale). :meth:`Reduction.finish` therefore
  resizes the reduced image straight to the size the model would have made of the full one, with
  the model's own filter, and the model's ``Resize`` has nothing left to do.
- detail: a reduction close to the model's input aliases fine texture. Keeping at least
  ``FACTOR`` times the input side met cosine >= 0.99 on every image measured (BENCHMARKS.md,
  "Decode fidelity"); 2x did not.

Models whose transform does not start with a plain ``Resize`` (open_clip's ``longest`` mode,
custom transforms) get no reduction: exact decoding is always the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

FACTOR = 3  # the reduced image keeps at least this many times the model's input side


@dataclass(frozen=True)
class Reduction:
    short_side: int | None  # the model resizes the shorter side to this, keeping the aspect
    fixed: tuple[int, int] | None  # or to exactly this (width, height)
    interpolation: Any  # the model's torchvision InterpolationMode
    min_side: int  # decode JPEGs at the largest reduction that keeps both sides at least this

    @property
    def draft(self) -> tuple[int, int]:
        return self.min_side, self.min_side

    def target(self, full_size: tuple[int, int]) -> tuple[int, int]:
        """The (width, height) the model's ``Resize`` makes of an image of *full_size*, rounded as
        torchvision rounds it."""
        if self.fixed is not None:
            return self.fixed
        width, height = full_size
        short, long = min(width, height), max(width, height)
        new_long = int(self.short_side * long / short)
        return (self.short_side, new_long) if width <= height else (new_long, self.short_side)

    def finish(self, image, full_size: tuple[int, int]):
        """*image* as the model's resize would have made it from the full-size file; unchanged when
        no reduction happened."""
        if image.size == tuple(full_size):
            return image
        from torchvision.transforms import functional

        width, height = self.target(full_size)
        return functional.resize(image, [height, width], self.interpolation, antialias=True)


def reduction_for(preprocess: Callable, factor: int = FACTOR) -> Reduction | None:
    """The reduction that keeps *preprocess* faithful, or None when its first step is not a
    ``Resize`` whose output size clipdex can reproduce."""
    from torchvision.transforms import Resize

    steps = getattr(preprocess, "transforms", None)
    if not steps or type(steps[0]) is not Resize or steps[0].max_size is not None:
        return None
    resize = steps[0]
    size = [resize.size] if isinstance(resize.size, int) else list(resize.size)
    if len(size) == 1:
        return Reduction(size[0], None, resize.interpolation, factor * size[0])
    height, width = size
    return Reduction(None, (width, height), resize.interpolation, factor * max(height, width))
