"""How file bytes become embeddings, split where the work runs: ``prepare`` on host threads,
``embed`` on the thread that owns the model's device.

Two feeds, one interface:

- :class:`PillowFeed`: the host decodes (Pillow, JPEGs reduced as ``encoder.reduction`` allows)
  and applies the model's own preprocessing; the device only runs the model. The CPU path.
- :class:`TorchvisionFeed`: the host only reads the header (size and colour space from
  libjpeg-turbo's header reader, EXIF orientation, the pixel limit); JPEGs are decoded by
  ``torchvision.io.decode_jpeg`` on the model's device (nvJPEG on CUDA), in one batched call,
  turned upright, then resized, cropped and normalised there with the parameters of the model's
  own transform. Other formats, and JPEGs the device decoder refuses, are decoded by Pillow. The
  GPU path: the host hands the device bytes, not pixels.

``embed`` returns at once on CUDA: the vectors are copied back asynchronously into pinned memory
and :meth:`Embedded.vectors` waits for them, so the writer, not the model, pays for the copy.
"""

from __future__ import annotations

import io
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from PIL import Image

from encoder.exif import photo_columns
from encoder.images import DEFAULT_MAX_PIXELS, ORIENTATION_TAG, decode_file, jpeg_orientation, to_rgb
from encoder.reduction import Reduction, reduction_for
from store.errors import ImageError, InputError

if TYPE_CHECKING:
    import torch

    from encoder.model import ClipModel

DECODERS = ("auto", "pillow", "torchvision")
# What nvJPEG decodes to RGB faithfully, as libjpeg-turbo names the colour spaces and Pillow the
# modes; CMYK and YCCK JPEGs go to Pillow.
DEVICE_COLORSPACES = ("YCbCr", "Gray", "RGB")
DEVICE_JPEG_MODES = ("RGB", "L")
JPEG_START = b"\xff\xd8"  # anything else is no JPEG to Pillow either: decoded on the host, with no header probe
Timing = Callable[[str], AbstractContextManager]


def no_timing(stage: str) -> AbstractContextManager:
    return nullcontext()


@dataclass
class Prepared:
    """One image after the host's part: exactly one of pixels, jpeg, image is set."""

    size: tuple[int, int]  # upright (width, height) of the full image
    pixels: "torch.Tensor | None" = None  # the model's input, preprocessed on the host
    jpeg: "torch.Tensor | None" = None  # the file's bytes, to decode on the device
    orientation: int = 1  # of jpeg: the EXIF orientation the device applies after decoding
    image: "torch.Tensor | None" = None  # upright RGB uint8 [3, H, W], decoded on the host
    photo: dict | None = None  # capture time, camera, lens, place: encoder.exif.PHOTO_FIELDS


@dataclass
class Embedded:
    """The device's answer for a batch: vectors for ``kept`` (indexes into the batch), in order."""

    kept: list[int]
    failures: list[tuple[int, ImageError]] = field(default_factory=list)
    _vectors: Any = None  # np.ndarray, or ClipModel.encode_pixels_async's wait while the copy is in flight

    def vectors(self) -> np.ndarray:
        if callable(self._vectors):
            self._vectors = self._vectors()
        return self._vectors


class PillowFeed:
    def __init__(self, model: "ClipModel", reduction: Reduction | None, max_pixels: int) -> None:
        self.model, self.reduction, self.max_pixels = model, reduction, max_pixels

    def prepare(self, data: bytes | bytearray, name: str) -> Prepared:
        reduction = self.reduction
        image, size = decode_file(io.BytesIO(data), name, self.max_pixels, reduction and reduction.draft)
        if reduction is not None:
            image = reduction.finish(image, size)
        return Prepared(size, pixels=self.model.preprocess(image), photo=photo_columns(data, name))

    def embed(self, items: Sequence[Prepared], names: Sequence[str], timing: Timing = no_timing) -> Embedded:
        import torch

        with timing("embed"):
            vectors = self.model.encode_pixels_async(torch.stack([item.pixels for item in items]))
        return Embedded(list(range(len(items))), _vectors=vectors)


@dataclass(frozen=True)
class DeviceTransform:
    """The model's Resize → CenterCrop → to RGB → ToTensor → Normalize, on uint8 tensors."""

    resize: Reduction  # its ``target`` gives the size the model's Resize makes of a full image
    crop: tuple[int, int]  # (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: Sequence["torch.Tensor"], sizes: Sequence[tuple[int, int]]) -> "torch.Tensor":
        """A batch [B, 3, crop] of normalised float pixels from upright uint8 [3, H, W] images."""
        import torch
        from torchvision.transforms.v2 import functional

        out = []
        for image, size in zip(images, sizes):
            width, height = self.resize.target(size)
            # float before resizing: antialiased bicubic on uint8 exists only on the CPU, and the
            # model's own transform resizes before it rounds nothing away either (Pillow rounds once).
            resized = functional.resize(image.float(), [height, width], self.resize.interpolation, antialias=True)
            out.append(functional.center_crop(resized, list(self.crop)))
        batch = torch.stack(out).clamp_(0, 255).round_().div_(255)
        return functional.normalize(batch, list(self.mean), list(self.std), inplace=True)


def device_transform(preprocess: Callable) -> DeviceTransform | None:
    """The model's transform as tensor operations, or None when it is not the plain open_clip one."""
    steps = list(getattr(preprocess, "transforms", None) or ())
    names = [type(step).__name__ for step in steps]
    resize = reduction_for(preprocess, factor=1)
    if resize is None or names[1:] not in (["CenterCrop", "MaybeConvertMode", "MaybeToTensor", "Normalize"],
                                           ["CenterCrop", "ToTensor", "Normalize"]):
        return None
    crop = steps[1].size
    crop = (crop, crop) if isinstance(crop, int) else tuple(crop) if len(crop) == 2 else (crop[0], crop[0])
    return DeviceTransform(resize, crop, tuple(steps[-1].mean), tuple(steps[-1].std))


class TorchvisionFeed:
    def __init__(self, model: "ClipModel", transform: DeviceTransform, max_pixels: int) -> None:
        self.model, self.transform, self.max_pixels = model, transform, max_pixels

    def prepare(self, data: bytes | bytearray, name: str) -> Prepared:
        import torch

        header = (_jpeg_header(data) or _pillow_header(data)) if data.startswith(JPEG_START) else None
        if header is None:  # not a JPEG the device decodes, or not even a header: Pillow decodes it, or names why not
            return self._on_host(data, name)
        width, height, orientation = header
        if width * height > self.max_pixels:
            raise ImageError(name, "too large", f"{width}x{height} pixels, limit {self.max_pixels:,}")
        size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        return Prepared(size, jpeg=torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data),
                                                    dtype=torch.uint8), orientation=orientation,
                        photo=photo_columns(data, name))

    def _on_host(self, data: bytes | bytearray, name: str) -> Prepared:
        from torchvision.transforms.v2.functional import pil_to_tensor

        image, size = decode_file(io.BytesIO(data), name, self.max_pixels)
        return Prepared(size, image=pil_to_tensor(to_rgb(image)), photo=photo_columns(data, name))

    def embed(self, items: Sequence[Prepared], names: Sequence[str], timing: Timing = no_timing) -> Embedded:
        device = self.model.device
        images: list = [None] * len(items)
        failures: list[tuple[int, ImageError]] = []
        with timing("device decode"):
            for i, item in enumerate(items):
                if item.image is not None:
                    images[i] = item.image.to(device, non_blocking=True)
            jpegs = [i for i, item in enumerate(items) if item.jpeg is not None]
            for i, decoded in zip(jpegs, self._decode([items[i].jpeg for i in jpegs])):
                if decoded is None:  # refused by the device decoder: Pillow decides, and names the fault
                    try:
                        decoded = self._on_host(items[i].jpeg.numpy().tobytes(), names[i]).image.to(device)
                    except ImageError as error:
                        failures.append((i, error))
                        continue
                else:
                    decoded = upright(decoded, items[i].orientation)
                images[i] = decoded
            kept = [i for i, image in enumerate(images) if image is not None]
            pixels = self.transform([images[i] for i in kept], [items[i].size for i in kept]) if kept else None
        if pixels is None:
            return Embedded([], failures, np.zeros((0, self.model.embed_dim), np.float32))
        with timing("embed"):
            return Embedded(kept, failures, self.model.encode_pixels_async(pixels))

    def _decode(self, jpegs: list["torch.Tensor"]) -> list["torch.Tensor | None"]:
        """Decoded upright RGB images on the device, None where the decoder refuses a file."""
        from torchvision.io import ImageReadMode, decode_jpeg

        def one_call(batch):
            # nvJPEG ignores apply_exif_orientation (torchvision 0.29): upright() turns every device the same way
            return decode_jpeg(batch, mode=ImageReadMode.RGB, device=self.model.device, apply_exif_orientation=False)

        if not jpegs:
            return []
        try:
            return list(one_call(jpegs))
        except RuntimeError:  # one bad file fails the batched call: find it, keep the rest
            out = []
            for data in jpegs:
                try:
                    out.append(one_call([data])[0])
                except RuntimeError:
                    out.append(None)
            return out


def _jpeg_header(data: bytes | bytearray) -> tuple[int, int, int] | None:
    """(width, height, EXIF orientation) of a JPEG the device decodes, from libjpeg-turbo's header
    reader (a few µs); None when Pillow must look (another format, CMYK, XMP, anything odd)."""
    import simplejpeg

    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    orientation = jpeg_orientation(data) if colorspace in DEVICE_COLORSPACES else None
    return None if orientation is None else (width, height, orientation)


def _pillow_header(data: bytes | bytearray) -> tuple[int, int, int] | None:
    """:func:`_jpeg_header` by Pillow's reading of the header, for the files that one leaves to it."""
    try:
        with Image.open(io.BytesIO(data)) as probe:  # the header only: no pixel is decoded here
            width, height = probe.size
            kind, mode, orientation = probe.format, probe.mode, probe.getexif().get(ORIENTATION_TAG, 1)
    except Exception:
        return None
    return (width, height, orientation) if kind == "JPEG" and mode in DEVICE_JPEG_MODES else None


# EXIF orientation -> how a decoded [..., H, W] image is turned upright, as ImageOps.exif_transpose turns it.
_TURNS: dict[int, Callable[["torch.Tensor"], "torch.Tensor"]] = {
    2: lambda image: image.flip(-1),
    3: lambda image: image.flip((-2, -1)),
    4: lambda image: image.flip(-2),
    5: lambda image: image.transpose(-2, -1),
    6: lambda image: image.rot90(-1, (-2, -1)),
    7: lambda image: image.transpose(-2, -1).flip((-2, -1)),
    8: lambda image: image.rot90(1, (-2, -1)),
}


def upright(image: "torch.Tensor", orientation: int) -> "torch.Tensor":
    """A decoded [C, H, W] image turned as its EXIF *orientation* says (1 and unknown values: as it is)."""
    turn = _TURNS.get(orientation)
    return turn(image) if turn else image


def make_feed(model: "ClipModel", decoder: str = "auto", exact_decode: bool = False,
              max_pixels: int | None = None):
    """The feed for *decoder*: ``auto`` decodes on the device when it is CUDA and the model's
    transform can run there, on the host otherwise."""
    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    if decoder not in DECODERS:
        raise InputError(f"unknown decoder '{decoder}' (one of {', '.join(DECODERS)})")
    transform = device_transform(model.preprocess) if decoder != "pillow" else None
    if decoder == "torchvision" and transform is None:
        raise InputError(f"--decoder torchvision cannot reproduce the preprocessing of '{model.name}' "
                         "(its transform is not Resize, CenterCrop, ToTensor, Normalize); use --decoder pillow")
    if transform is not None and (decoder == "torchvision" or model.device.startswith("cuda")):
        return TorchvisionFeed(model, transform, max_pixels)
    return PillowFeed(model, None if exact_decode else reduction_for(model.preprocess), max_pixels)


__all__ = ["DECODERS", "DeviceTransform", "Embedded", "PillowFeed", "Prepared", "TorchvisionFeed",
           "device_transform", "make_feed", "upright"]
