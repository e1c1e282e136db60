"""Which models clipdex knows, as data: the bundled models shipped in ``model_data/`` and every
open_clip architecture with its pretrained tags (open_clip's ``_PRETRAINED`` pattern). Nothing here
loads weights; :mod:`encoder.model` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from encoder.checkpoints import file_sha256
from store.errors import ModelLoadError

MODEL_DATA = Path(__file__).resolve().parent / "model_data"
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
BUNDLED_TAG = "bundled"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class BundledModel:
    config: Path
    weights: Path
    description: str


# Registry as data: models whose config and weights ship inside the package.
BUNDLED_MODELS: dict[str, BundledModel] = {
    "clipdex-shapes": BundledModel(
        config=MODEL_DATA / "clipdex-shapes.json",
        weights=MODEL_DATA / "clipdex-shapes.pt",
        description="demo CLIP trained by clipdex on generated coloured shapes (64x64, 64-d, offline)",
    ),
}


@dataclass(frozen=True)
class Preset:
    """A name for an open_clip architecture with its weights, where another model's space is that one's."""
    architecture: str
    pretrained: str
    description: str


# ImageBind-Huge's image encoder is OpenCLIP ViT-H/14 (LAION-2B), initialised from it and frozen;
# its code differs by LayerNorm eps (1e-6) and a Conv3d patch embedding over the image repeated
# into 2 frames, and preprocesses as open_clip does. Measured, same weights: cosine 0.9999993
# (BENCHMARKS.md, "The ImageBind image space from open_clip's ViT-H-14").
PRESETS: dict[str, Preset] = {
    "imagebind-huge-vision": Preset(
        "ViT-H-14", "laion2b_s32b_b79k",
        "ImageBind-Huge's image space: open_clip ViT-H-14 laion2b_s32b_b79k (ImageBind's frozen image "
        "encoder; its embeddings agree to cosine 0.9999993), for ImageBind-LLM's cache"),
}


def architecture_of(name: str) -> str:
    """The open_clip architecture *name* stands for (a preset's, else itself)."""
    preset = PRESETS.get(name)
    return preset.architecture if preset else name


@dataclass(frozen=True)
class ModelInfo:
    name: str
    tags: tuple[str, ...]
    bundled: bool = False
    description: str = ""


def open_clip_module():
    import open_clip

    for name, bundled in BUNDLED_MODELS.items():
        if name not in open_clip.list_models():
            open_clip.add_model_config(bundled.config)
    return open_clip


def list_models() -> list[ModelInfo]:
    """Bundled models first, then every open_clip architecture with its pretrained tags."""
    open_clip = open_clip_module()
    infos = [ModelInfo(name, (BUNDLED_TAG,), True, b.description) for name, b in BUNDLED_MODELS.items()]
    infos += [ModelInfo(name, (preset.pretrained,), False, preset.description) for name, preset in PRESETS.items()]
    for name in open_clip.list_models():
        if name not in BUNDLED_MODELS:
            infos.append(ModelInfo(name, tuple(open_clip.list_pretrained_tags_by_model(name))))
    return infos


def resolve_pretrained(name: str, pretrained: str | None) -> str:
    """The checkpoint file or hub tag to load for *name*, or a ModelLoadError saying what to pass."""
    open_clip = open_clip_module()
    if name in PRESETS:
        name, pretrained = PRESETS[name].architecture, pretrained or PRESETS[name].pretrained
    schema = name.startswith(("hf-hub:", "local-dir:"))
    if not schema and name not in open_clip.list_models():
        raise ModelLoadError(f"unknown model '{name}': run `clipdex models` to list the models clipdex knows")
    if name in BUNDLED_MODELS and pretrained in (None, BUNDLED_TAG):
        weights = BUNDLED_MODELS[name].weights
        if not weights.is_file():
            raise ModelLoadError(f"the bundled weights of '{name}' are missing ({weights}); reinstall clipdex")
        return str(weights)
    if schema:
        return pretrained or ""
    if pretrained is None:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if name == DEFAULT_MODEL:
            return DEFAULT_PRETRAINED
        if not tags:
            raise ModelLoadError(f"model '{name}' has no published weights: pass a checkpoint with --pretrained FILE")
        return tags[0]
    if os.path.isfile(pretrained):
        return pretrained
    looks_like_path = os.sep in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES)
    if looks_like_path:
        raise ModelLoadError(f"checkpoint file not found: {pretrained}")
    if not open_clip.get_pretrained_cfg(name, pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ModelLoadError(
            f"unknown pretrained tag '{pretrained}' for model '{name}' (known tags: {tags}); "
            "or pass a local checkpoint file")
    return pretrained


def pretrained_label(name: str, pretrained: str | None) -> str:
    """How a store records these weights: 'bundled', a hub tag, or a checkpoint's absolute path."""
    checkpoint = resolve_pretrained(name, pretrained)
    if name in BUNDLED_MODELS and checkpoint == str(BUNDLED_MODELS[name].weights):
        return BUNDLED_TAG
    return os.path.abspath(checkpoint) if checkpoint and os.path.isfile(checkpoint) else checkpoint


def can_load(name: str, pretrained: str | None) -> bool:
    """True when clipdex knows how to load *name* with *pretrained* (so a store made from its
    features can take text and image queries)."""
    try:
        resolve_pretrained(name, pretrained)
        return True
    except ModelLoadError:
        return False


def weights_sha256(label: str) -> str:
    """The SHA-256 of a local checkpoint file (what a store records, so the same weights are
    recognised at a new path); empty for hub tags and bundled weights, which are named, not files."""
    if not label or not os.path.isfile(label):
        return ""
    with open(label, "rb") as handle:
        return file_sha256(handle)
