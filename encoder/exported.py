"""A model's towers exported to ONNX and run by ONNX Runtime: fp32 (the text tower of a one-shot
query, which then needs neither torch nor open_clip) and int8 (``--precision int8``: weights and
activations of every MatMul and Gemm quantised, attention projections included, by ONNX Runtime's
dynamic quantisation; VNNI kernels on CPUs that have them).

Each is built once per model on this machine from the loaded torch model and kept in the user's
cache (:mod:`encoder.user_cache`), one folder per tower and precision, published whole. Fidelity
to fp32 is measured in tests/test_precision.py and BENCHMARKS.md ("CPU precision").
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from encoder import tokens, user_cache
from encoder.checkpoints import file_sha256
from encoder.registry import BUNDLED_MODELS, BUNDLED_TAG
from store.errors import ClipdexError, first_line


class Exportable(Protocol):
    """What an export reads of :class:`encoder.model.ClipModel` (which uses this module)."""

    name: str
    model: Any
    tokenizer: Any
    embed_dim: int
    image_size: tuple[int, int]


LOG = logging.getLogger(__name__)
KIND = "onnx"
# Bumped when what is exported changes, so older exports are not used.
EXPORT_VERSION = 1
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
TOWERS = ("text", "image")
PRECISIONS = ("fp32", "int8")  # what an export is made at (bf16 stays in torch: no faster in ONNX Runtime here)
# What int8 quantises in each tower, and whether per output channel (bench/bench_precision.py):
# every matrix product with a weight, the patch embedding's Conv left in fp32 (its int8 kernel cost
# a quarter of the image tower's speed, measured).
QUANTISE: dict[str, tuple[tuple[str, ...], bool]] = {"image": (("MatMul", "Gemm"), False),
                                                     "text": (("MatMul", "Gemm"), True)}


class ExportError(ClipdexError):
    """A tower could not be exported or loaded (the caller falls back to torch, or says why)."""


@dataclass(frozen=True)
class ModelKey:
    """Which weights an export was made from: the model, its label, and the weights themselves
    (a checkpoint's SHA-256 where it has one; hub tags are names), with the versions of the code
    that built the graph."""

    name: str
    pretrained: str
    weights: str

    def folder_name(self) -> str:
        versions = [f"{package}={_version(package)}" for package in ("open_clip_torch", "torch")]
        return user_cache.safe_key(self.name, self.pretrained, self.weights, str(EXPORT_VERSION), *versions)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def model_folder(key: ModelKey, create: bool) -> Path | None:
    kinds = user_cache.kind_folder(KIND, create)
    if kinds is None:
        return None
    folder = kinds / key.folder_name()
    if create:
        folder.mkdir(mode=0o700, exist_ok=True)
    return user_cache.entry(folder)


def tower_folder(key: ModelKey, tower: str, precision: str) -> Path | None:
    """The published folder of one tower at one precision, None where it was never built."""
    models = model_folder(key, create=False)
    return user_cache.entry(models / f"{tower}-{precision}") if models is not None else None


def session(path: Path, threads: int = 0):
    """An ONNX Runtime session on the CPU over *path* (*threads*: 0 for one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # its warnings about unused initialisers are not the user's business
    # Idle threads that spin take the cores from the decoding threads beside them (measured: ViT-B-32's
    # text tower 19-21 ms spinning, 12 ms not, while torch worked next to it).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _normalised(features: np.ndarray) -> np.ndarray:
    features = features.astype(np.float32, copy=False)
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


class Tower:
    """One exported tower: inputs (token ids or pixels) → L2-normalised float32 vectors."""

    def __init__(self, folder: Path, threads: int = 0) -> None:
        self.folder = folder
        try:
            self.session = session(folder / MODEL_FILE, threads)
        except Exception as error:  # ONNX Runtime raises its own Fail/InvalidProtobuf types
            raise ExportError(f"the exported encoder in {folder} cannot be loaded ({first_line(error, 160)})") from error
        self.input = self.session.get_inputs()[0].name

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        return _normalised(self.session.run(None, {self.input: inputs})[0])


class ExportedText:
    """A text encoder without torch: :mod:`encoder.tokens` and the exported text tower. It answers
    ``encode_texts`` only (an image query needs the model)."""

    def __init__(self, folder: Path, threads: int = 0) -> None:
        meta = json.loads((folder / META_FILE).read_text())
        self.tower = Tower(folder, threads)
        self.tokens = tokens.ClipTokens(folder / TOKENIZER_FILE, meta["context_length"], meta["start"], meta["end"],
                                        meta["special"])
        self.embed_dim, self.precision = int(meta["dim"]), meta["precision"]

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        out = [self.tower(self.tokens(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)


def build(model: Exportable, key: ModelKey, tower: str, precision: str) -> Path:
    """Export *model*'s *tower* at *precision* into the cache (once; a folder another process
    published first is kept) and return its folder. :class:`ExportError` when it cannot be."""
    if precision not in PRECISIONS:
        raise ExportError(f"no {precision} export: clipdex exports at {' and '.join(PRECISIONS)}")
    if tower == "text" and not tokens.can_export(getattr(model, "tokenizer", None)):
        raise ExportError(f"{model.name}'s tokenizer is not open_clip's CLIP BPE; its text tower stays in torch")
    folder = model_folder(key, create=True) / f"{tower}-{precision}"
    if user_cache.entry(folder) is not None:
        return folder
    LOG.info("exporting the %s tower of %s at %s to %s (once per model)", tower, model.name, precision, folder)
    try:
        with user_cache.publishing(folder) as work:
            _export(model, tower, work / MODEL_FILE)
            if precision == "int8":
                _quantise(work / MODEL_FILE, tower)
            if tower == "text":
                tokens.build(model.tokenizer).save(str(work / TOKENIZER_FILE))
            tokenizer = model.tokenizer
            meta = {"model": key.name, "pretrained": key.pretrained, "tower": tower, "precision": precision,
                    "dim": model.embed_dim, "context_length": getattr(tokenizer, "context_length", 0),
                    "start": getattr(tokenizer, "sot_token_id", 0), "end": getattr(tokenizer, "eot_token_id", 0),
                    "special": tokens.special_tokens(tokenizer) if tower == "text" else {}}
            (work / META_FILE).write_text(json.dumps(meta))
    except ClipdexError:
        raise
    except Exception as error:  # the exporter and the quantiser raise anything
        raise ExportError(f"could not export the {tower} tower of {model.name} ({first_line(error, 200)})") from error
    return folder


def _export(model: Exportable, tower: str, path: Path) -> None:
    import torch

    module = _tower_module(model.model, tower).eval()
    if tower == "text":
        example = model.tokenizer(["a photo of a cat", "a dog"]).cpu()
    else:
        height, width = model.image_size
        example = torch.zeros(2, 3, height, width)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(module.cpu(), (example,), dynamo=True, input_names=["inputs"],
                                    output_names=["features"], dynamic_shapes=({0: batch},), verbose=False,
                                    external_data=False, optimize=True)
        program.save(str(path), external_data=_large(model))


def _large(model: Exportable) -> bool:
    """Past 2 GB a protobuf cannot hold the weights: they go to a file beside the graph."""
    return sum(p.numel() * p.element_size() for p in model.model.parameters()) > (1 << 31) - (64 << 20)


def _quantise(path: Path, tower: str) -> None:
    """*path* (and its weights file, past 2 GB) replaced by its int8 quantisation. The fp32 files
    keep their names while they are read: the graph names its weights file."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = path.with_name("int8.onnx")
    logging.disable(logging.WARNING)  # it advises on the root logger to pre-process first: measured, no gain
    try:
        quantize_dynamic(str(path), str(target), weight_type=QuantType.QInt8, per_channel=QUANTISE[tower][1],
                         op_types_to_quantize=list(QUANTISE[tower][0]), use_external_data_format=False)
    finally:
        logging.disable(logging.NOTSET)
    for fp32 in path.parent.glob(f"{path.name}*"):
        fp32.unlink()
    os.replace(target, path)


def _tower_module(model: Any, tower: str):
    import torch

    class TowerModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, inputs):
            return self.model.encode_text(inputs) if tower == "text" else self.model.encode_image(inputs)

    return TowerModule()


def remove(folder: Path) -> None:
    """Drop a damaged export (the next use builds it again)."""
    shutil.rmtree(folder, ignore_errors=True)


def text_encoder(key: ModelKey, precision: str, model: Callable[[], Exportable]) -> ExportedText:
    """The exported text encoder of *key* at *precision*, built from *model()* where it was never
    built or its files no longer load (built again, once)."""
    folder = tower_folder(key, "text", precision)
    if folder is not None:
        try:
            return ExportedText(folder)
        except (ExportError, OSError, ValueError, KeyError) as error:
            LOG.warning("the exported text encoder in %s is damaged (%s): building it again", folder,
                        first_line(error, 120))
            remove(folder)
    return ExportedText(build(model(), key, "text", precision))


def tower(key: ModelKey, name: str, precision: str, model: Exportable) -> Tower:
    """*model*'s exported *name* tower at *precision* (built where needed, as :func:`text_encoder`)."""
    folder = tower_folder(key, name, precision)
    if folder is not None:
        try:
            return Tower(folder)
        except ExportError as error:
            LOG.warning("%s: building it again", error)
            remove(folder)
    return Tower(build(model, key, name, precision))


def key_for(name: str, label: str, weights_sha256: str = "") -> ModelKey:
    """The key of *name* with weights *label* (what a store records): a checkpoint file is known by
    its content (the bundled ones are hashed here: 11 MB, milliseconds)."""
    if not weights_sha256:
        path = BUNDLED_MODELS[name].weights if label == BUNDLED_TAG and name in BUNDLED_MODELS else Path(label)
        if label and path.is_file():
            with open(path, "rb") as handle:
                weights_sha256 = file_sha256(handle)
    return ModelKey(name, "" if weights_sha256 else label, weights_sha256)


def keep_text_tower(model: Exportable, key: ModelKey) -> None:
    """Export *model*'s text tower at fp32 now, if it is not yet (a writer's courtesy, on a CPU: the
    model is loaded anyway, so the store's first one-shot search costs what every later one does).
    A model that cannot be exported is left to the search to use as it is."""
    if getattr(model, "device", "cpu") != "cpu" or getattr(model, "precision", "fp32") == "bf16":
        return  # a bf16 model's weights are not fp32's; a GPU machine's searches use the model
    try:
        if tower_folder(key, "text", "fp32") is None:
            build(model, key, "text", "fp32")
    except (ExportError, user_cache.CacheRefused, OSError) as error:
        LOG.info("the text tower is not exported (%s): searches will load the model", first_line(error, 160))
