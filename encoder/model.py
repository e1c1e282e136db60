"""Loading a CLIP model and embedding with it: open_clip registry names with hub tags, local
checkpoint files and the bundled models, all through ``open_clip.create_model_and_transforms``
with the checkpoints read by :mod:`encoder.checkpoints` (weights only, checked against a store's hash).
Embeddings come out L2-normalised, so cosine similarity is a dot product.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import TYPE_CHECKING, Callable, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np

from encoder import exported
from encoder.checkpoints import check_sha256, open_clip_reads_weights_only
from encoder.precision import DEFAULT_PRECISION, PRECISIONS, check_precision
from encoder.registry import DEFAULT_MODEL, architecture_of, open_clip_module, pretrained_label, resolve_pretrained
from encoder.registry import weights_sha256 as registry_sha256
from encoder.user_cache import CacheRefused
from store.errors import ClipdexError, InputError, ModelLoadError, first_line

if TYPE_CHECKING:
    import torch
    from PIL import Image

LOG = logging.getLogger(__name__)


def _weights_host(name: str, tag: str) -> str | None:
    import huggingface_hub.constants as hub

    cfg = open_clip_module().get_pretrained_cfg(name, tag)
    if cfg.get("hf_hub"):
        return urlparse(hub.ENDPOINT).hostname
    return urlparse(cfg.get("url", "")).hostname


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Let cached weights load at once instead of waiting for a minute of hub retries."""
    import huggingface_hub.constants as hub

    saved = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    # open_clip logs on the root logger ("No pretrained weights loaded", download errors) things
    # that ModelLoadError reports better; silence them for the duration of the load only.
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise InputError(f"unknown device '{device}': use auto, cpu or cuda")
    return device


class ClipModel:
    """A loaded open_clip model with its own preprocessing and tokenizer; embeddings come out
    L2-normalised as float32 numpy arrays, so cosine similarity is a dot product."""

    def __init__(self, name: str, pretrained: str, model: "torch.nn.Module",
                 preprocess: Callable[["Image.Image"], "torch.Tensor"], tokenizer: Callable, device: str,
                 precision: str = "fp32") -> None:
        self.name, self.pretrained, self.device = name, pretrained, device
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.precision = precision  # how the vectors are computed: encoder.precision.PRECISIONS
        # Exported towers (encoder.exported.Tower) that replace the torch forward of a precision
        self.towers: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
        self.embed_dim = int(getattr(model.visual, "output_dim", 0)) or int(self.encode_texts(["x"]).shape[-1])

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.visual.image_size
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    @property
    def preprocess_cfg(self) -> dict:
        """Resize/crop/normalisation settings, recorded in the store manifest."""
        return dict(getattr(self.model.visual, "preprocess_cfg", {}) or {})

    @property
    def _dtype(self):
        """The dtype of the model's weights (bfloat16 for --precision bf16): pixels are cast to it."""
        import torch

        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def _autocast(self):
        import torch

        return torch.autocast("cuda", dtype=torch.float16, enabled=self.device.startswith("cuda"))

    def encode_pixels(self, pixels: "torch.Tensor") -> np.ndarray:
        """Embed a preprocessed batch ``[B, 3, H, W]``."""
        return self.encode_pixels_async(pixels)()

    def encode_pixels_async(self, pixels: "torch.Tensor") -> Callable[[], np.ndarray]:
        """Start embedding a batch; the call returned waits for the vectors. On CUDA they are copied
        back into pinned memory asynchronously, so the caller can queue the next batch first."""
        import torch

        if "image" in self.towers:
            vectors = self.towers["image"](pixels.numpy())
            return lambda: vectors
        with torch.inference_mode(), self._autocast():
            features = self.model.encode_image(pixels.to(self.device, self._dtype, non_blocking=True))
            features = torch.nn.functional.normalize(features.float(), dim=-1)
            if not self.device.startswith("cuda"):
                vectors = features.numpy()
                return lambda: vectors
            host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
            host.copy_(features, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()

        def wait() -> np.ndarray:
            copied.synchronize()
            return host.numpy()

        return wait

    def encode_images(self, images: Sequence["Image.Image"], batch_size: int = 64) -> np.ndarray:
        import torch

        batches = [self.encode_pixels(torch.stack([self.preprocess(im) for im in images[i:i + batch_size]]))
                   for i in range(0, len(images), batch_size)]
        return np.concatenate(batches) if batches else np.zeros((0, self.embed_dim), np.float32)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, len(texts), batch_size):
                if "text" in self.towers:
                    out.append(self.towers["text"](self.tokenizer(list(texts[i:i + batch_size])).numpy()))
                    continue
                features = self.model.encode_text(self.tokenizer(list(texts[i:i + batch_size])).to(self.device))
                out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)


def _cause(error: BaseException) -> str:
    """The first sentence of a library's error (torch's run on for paragraphs of advice)."""
    text = first_line(error)
    sentence = text.split(". ")[0].rstrip(".")
    return f"{type(error).__name__}: {sentence}" if sentence else type(error).__name__


def load_model(name: str = DEFAULT_MODEL, pretrained: str | None = None, device: str = "auto",
               weights_sha256: str = "", precision: str = DEFAULT_PRECISION) -> ClipModel:
    """Load *name* with *pretrained* (hub tag, checkpoint file, or None for the model's default).

    Every checkpoint is read by :mod:`encoder.checkpoints`: weights only, never pickled code.
    *weights_sha256* is what a store recorded for a local checkpoint file: the file is checked
    against it as it is read, and another file is a :class:`ModelMismatchError`.
    Raises :class:`ModelLoadError` with an actionable message when the weights cannot be had.
    """
    device = resolve_device(device)
    exported = check_precision(precision, device).exported
    checkpoint = resolve_pretrained(name, pretrained)
    open_clip = open_clip_module()
    schema = name.startswith(("hf-hub:", "local-dir:"))  # open_clip finds these weights itself
    is_file = bool(checkpoint) and not schema and os.path.isfile(checkpoint)
    is_tag = bool(checkpoint) and not os.path.isfile(checkpoint)
    sha256 = weights_sha256 if is_file else ""  # hub tags and schema models are named, not hashed
    numpy_weights = is_file and checkpoint.endswith((".npz", ".npy"))
    if numpy_weights and sha256:  # open_clip reads these with np.load, which unpickles nothing
        check_sha256(checkpoint, sha256, registry_sha256(checkpoint))
    host = _weights_host(architecture_of(name), checkpoint) if is_tag else None
    offline = bool(host) and not _reachable(host)
    try:
        with _hub_offline(offline), _quiet_open_clip(), open_clip_reads_weights_only(name, sha256) as read:
            model, _, preprocess = open_clip.create_model_and_transforms(
                architecture_of(name), pretrained=checkpoint or None, device=device,
                precision=PRECISIONS[precision].open_clip)
            tokenizer = open_clip.get_tokenizer(architecture_of(name))
    except ClipdexError:
        raise  # refused by encoder.checkpoints, already one line naming the file
    except Exception as error:  # open_clip raises bare RuntimeError/FileNotFoundError/pickle errors
        if is_tag:
            where = f"{host} is unreachable and they are not in the local cache" if offline else str(error)[:300]
            raise ModelLoadError(
                f"could not get pretrained weights '{checkpoint}' for '{name}': {where}. "
                "Pass a local checkpoint with --pretrained /path/to/weights.pt, "
                "or use the bundled demo model with --model clipdex-shapes") from error
        if checkpoint and os.path.isfile(checkpoint):
            raise ModelLoadError(f"could not load '{name}' from {checkpoint}: it is not a checkpoint of this model "
                                 f"that open_clip can read ({_cause(error)}); pass a .pt/.bin/.safetensors state_dict "
                                 "saved from this architecture") from error
        raise ModelLoadError(f"could not load '{name}' from {checkpoint or 'its config'}: {_cause(error)}") from error
    if is_file and not numpy_weights and not read:
        raise ModelLoadError(f"open_clip {open_clip.__version__} loaded {checkpoint} without clipdex's checkpoint "
                             "reader (open_clip.factory.load_state_dict); clipdex supports open_clip_torch>=3,<4")
    model.eval()
    label = pretrained_label(name, pretrained)
    LOG.info("loaded %s (%s) on %s", name, label, device)
    loaded = ClipModel(name, label, model, preprocess, tokenizer, device, precision=precision)
    return with_exported_towers(loaded, precision, sha256) if exported else loaded


def with_exported_towers(model: ClipModel, precision: str, weights_sha256: str = "") -> ClipModel:
    """*model* with both towers run from their export at *precision* (built once per model and
    kept in the user's cache); one line naming the cause when they cannot be had."""
    key = exported.key_for(model.name, model.pretrained, weights_sha256)
    try:
        towers = {name: exported.tower(key, name, precision, model) for name in exported.TOWERS}
    except (exported.ExportError, CacheRefused) as error:
        raise ModelLoadError(f"--precision {precision} is not available for {model.name}: {error}") from error
    model.towers, model.precision = towers, precision
    return model
