"""Checkpoints never unpickle code, and a store loads only the checkpoint it recorded (issue 23, item 5).

The attacks: a checkpoint whose unpickling runs a command (it creates a marker file), read
through every way open_clip loads weights (a local file, a hub tag, ``local-dir:`` and ``hf-hub:``
models); torch before 2.6 (whose ``weights_only=True`` raised the TypeError that made open_clip
try again without it), played by a ``torch.load`` that raises it; a file that makes today's
weights-only unpickler raise a TypeError, with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` set; and a
store whose recorded checkpoint was swapped for other weights or for the malicious file.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import struct

import pytest

from encoder import BUNDLED_MODELS, MODELS, ModelPool, load_model, weights_sha256
from store import Store
from store.errors import ModelLoadError, ModelMismatchError
from tests.helpers import run

SHAPES = BUNDLED_MODELS["clipdex-shapes"]
ONLY_WEIGHTS = "clipdex loads only weights (a state_dict saved with torch.save, or .safetensors)"


class Payload:
    """Unpickling it runs ``touch MARKER``."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _torch_save(path, marker):
    import torch

    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload(marker)}, path)


def _pickle_dump(path, marker):
    with open(path, "wb") as handle:
        pickle.dump({"w": Payload(marker)}, handle)


def _type_error_first(path, marker):
    """Legacy torch format whose pickle first BUILDs a Tensor with a 3-tuple: the weights-only
    unpickler raises TypeError there (``Tensor.set_(False, None, None)``), the full one accepts it
    (``Tensor.__setstate__``) and goes on to ``os.system``."""
    header = b"".join(pickle.dumps(value, protocol=2) for value in (
        0x1950a86a20f9469cfc6c, 1001,
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}))
    command = f"touch {shlex.quote(str(marker))}".encode()
    body = (b"\x80\x02ctorch\nTensor\n)\x81\x89NN\x87b"
            b"cposix\nsystem\nX" + struct.pack("<I", len(command)) + command + b"\x85R\x86.")
    with open(path, "wb") as handle:
        handle.write(header + body)


MALICIOUS = {"torch.save": _torch_save, "pickle.dump": _pickle_dump}


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "unpickling the checkpoint ran its command"


@pytest.fixture(params=sorted(MALICIOUS))
def evil(request, tmp_path, marker):
    path = tmp_path / "evil.pt"
    MALICIOUS[request.param](path, marker)
    return path


def pretend_old_torch(monkeypatch):
    """torch before 2.6 as open_clip saw it: ``weights_only=True`` raises TypeError, and a load
    without it unpickles anything."""
    import torch

    real = torch.load

    def load(f, *args, weights_only=None, **kwargs):
        if weights_only:
            raise TypeError("load() got an unexpected keyword argument 'weights_only'")
        return real(f, *args, weights_only=False, **kwargs)

    monkeypatch.setattr(torch, "load", load)


@pytest.fixture
def old_torch(monkeypatch):
    pretend_old_torch(monkeypatch)


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message
    return message


def _local_dir(directory, weights) -> str:
    directory.mkdir()
    config = json.loads(SHAPES.config.read_text())
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    shutil.copy(weights, directory / "open_clip_pytorch_model.bin")
    return f"local-dir:{directory}"


def _source(kind, weights, tmp_path, monkeypatch) -> tuple[str, str | None]:
    """(model, pretrained) that makes open_clip read *weights* the way *kind* does."""
    from open_clip import factory, pretrained

    if kind == "file":
        return "clipdex-shapes", str(weights)
    if kind == "tag":  # a hub tag: open_clip downloads (here: finds) the file, then reads it
        monkeypatch.setitem(pretrained._PRETRAINED, "clipdex-shapes", {"hubtag": {"file": str(weights)}})
        return "clipdex-shapes", "hubtag"
    if kind == "local-dir":
        return _local_dir(tmp_path / "model-dir", weights), None
    config = {"model_cfg": json.loads(SHAPES.config.read_text()), "preprocess_cfg": {}}
    monkeypatch.setattr(factory, "_get_hf_config", lambda model_id, cache_dir=None: config)
    monkeypatch.setattr(factory, "download_pretrained_from_hf", lambda model_id, **kwargs: str(weights))
    return "hf-hub:clipdex/shapes", None


SOURCES = ["file", "tag", "local-dir", "hf-hub"]


# Weights load through every source, with open_clip's conversions


@pytest.mark.parametrize("kind", SOURCES)
def test_the_bundled_weights_load_through_every_source(kind, tmp_path, monkeypatch, demo_model):
    model = load_model(*_source(kind, SHAPES.weights, tmp_path, monkeypatch), device="cpu")
    texts = ["a red circle", "a blue star"]
    assert model.encode_texts(texts) == pytest.approx(demo_model.encode_texts(texts), abs=1e-5)


def test_a_training_checkpoint_and_safetensors_load_as_open_clip_would(tmp_path, demo_model):
    import torch
    from safetensors.torch import save_file

    state = torch.load(SHAPES.weights, map_location="cpu", weights_only=True)
    wrapped = tmp_path / "epoch_3.pt"  # what open_clip's training writes: a 'state_dict' with 'module.' keys
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    safetensors = tmp_path / "shapes.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, safetensors)
    expected = demo_model.encode_texts(["a green square"])
    for path in (wrapped, safetensors):
        for sha256 in ("", weights_sha256(str(path))):
            model = load_model("clipdex-shapes", str(path), device="cpu", weights_sha256=sha256)
            assert model.encode_texts(["a green square"]) == pytest.approx(expected, abs=1e-5)


# Checkpoints that hold code are refused


def test_a_checkpoint_holding_code_is_refused_in_one_line(evil):
    with pytest.raises(ModelLoadError) as caught:
        load_model("clipdex-shapes", str(evil), device="cpu")
    message = _one_line(caught.value)
    assert str(evil) in message and ONLY_WEIGHTS in message


def test_clipdex_index_refuses_a_checkpoint_holding_code(capsys, tmp_path, small_library, evil):
    code, _, err = run(capsys, "index", small_library[0], "--store", tmp_path / "s", "--model", "clipdex-shapes",
                       "--pretrained", evil, "--device", "cpu", "--workers", "0")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert str(evil) in err and ONLY_WEIGHTS in err


def test_a_torchscript_archive_is_refused(tmp_path):
    import torch

    archive = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(archive))
    with pytest.raises(ModelLoadError) as caught:
        load_model("clipdex-shapes", str(archive), device="cpu")
    message = _one_line(caught.value)
    assert str(archive) in message and "TorchScript" in message and ONLY_WEIGHTS in message


@pytest.mark.parametrize("kind", SOURCES)
def test_torch_without_weights_only_never_gets_to_unpickle(kind, tmp_path, monkeypatch, evil, old_torch):
    # open_clip caught the TypeError and called torch.load again without weights_only
    with pytest.raises(ModelLoadError) as caught:
        load_model(*_source(kind, evil, tmp_path, monkeypatch), device="cpu")
    _one_line(caught.value)


def test_a_type_error_in_the_weights_only_unpickler_is_not_a_second_try(tmp_path, monkeypatch, marker):
    # With TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD set, a torch.load that does not pass weights_only
    # (open_clip's second try) unpickles anything, on any torch.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    crafted = tmp_path / "crafted.pt"
    _type_error_first(crafted, marker)
    with pytest.raises(ModelLoadError) as caught:
        load_model("clipdex-shapes", str(crafted), device="cpu")
    assert str(crafted) in _one_line(caught.value)


def test_open_clip_loading_weights_behind_the_reader_is_an_error(tmp_path, monkeypatch):
    from open_clip import factory

    monkeypatch.setattr(factory, "load_checkpoint", lambda model, path, **kwargs: {})  # a future open_clip
    with pytest.raises(ModelLoadError, match="without clipdex's checkpoint reader"):
        load_model("clipdex-shapes", str(SHAPES.weights), device="cpu")


# A store loads only the checkpoint it recorded


def test_the_hash_is_checked_before_anything_is_unpickled(tmp_path, monkeypatch):
    import torch

    from encoder import read_state_dict

    copy = tmp_path / "shapes.pt"
    shutil.copy(SHAPES.weights, copy)
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("torch.load ran before the hash check"))
    with pytest.raises(ModelMismatchError) as caught:
        read_state_dict(str(copy), sha256="0" * 64)
    message = _one_line(caught.value)
    assert f"sha256 {'0' * 16}… recorded, {weights_sha256(str(copy))[:16]}… found" in message


def test_a_stand_in_loader_gets_the_file_checked_by_the_pool(tmp_path):
    copy = tmp_path / "shapes.pt"
    shutil.copy(SHAPES.weights, copy)
    pool = ModelPool(lambda name, pretrained, device: pytest.fail("loaded a file with another hash"))
    with pytest.raises(ModelMismatchError):
        pool.get("clipdex-shapes", str(copy), "cpu", weights_sha256="0" * 64)


@pytest.fixture
def local_store(capsys, tmp_path, small_library):
    """A store indexed with a copy of the bundled checkpoint: (store dir, checkpoint, its original bytes)."""
    weights = tmp_path / "weights" / "shapes.pt"
    weights.parent.mkdir()
    shutil.copy(SHAPES.weights, weights)
    code, _, err = run(capsys, "index", small_library[0], "--store", tmp_path / "s", "--model", "clipdex-shapes",
                       "--pretrained", weights, "--device", "cpu", "--workers", "0")
    assert code == 0, err
    assert Store.open(tmp_path / "s").manifest.weights_sha256 == weights_sha256(str(weights))
    return tmp_path / "s", weights, weights.read_bytes()


def _other_weights(path, into):
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    state["logit_scale"] = state["logit_scale"] + 1
    torch.save(state, into)


@pytest.mark.parametrize("swap", ["other weights", "malicious"])
def test_every_reader_refuses_a_swapped_checkpoint_and_takes_the_original_back(
        swap, capsys, monkeypatch, tmp_path, small_library, local_store, marker):
    from server.app import create_app
    from server.config import ServeConfig

    store, weights, original = local_store
    monkeypatch.setenv("CLIPDEX_CACHE_DIR", str(tmp_path / "cache"))  # no text tower exported yet
    recorded = weights_sha256(str(weights))
    if swap == "malicious":
        _torch_save(weights, marker)
    else:
        _other_weights(weights, weights)
    found = weights_sha256(str(weights))
    expected = (f"the checkpoint at {weights} is not the one this store was built with "
                f"(sha256 {recorded[:16]}… recorded, {found[:16]}… found); put the original back or reindex")
    monkeypatch.setattr(MODELS, "_models", {})  # nothing this process loaded before
    monkeypatch.setattr(MODELS, "_texts", {})
    with monkeypatch.context() as patch:
        if swap == "malicious":
            pretend_old_torch(patch)  # where open_clip's second try unpickled anything
        with pytest.raises(ModelMismatchError) as caught:
            ModelPool().for_manifest(Store.open(store).manifest, "cpu")
        assert _one_line(caught.value) == expected
        code, _, err = run(capsys, "search", "a red circle", "--store", store, "-k", "1")
        assert (code, err) == (1, f"error: {expected}\n")
        with pytest.raises(ModelMismatchError, match="put the original back"):
            create_app(ServeConfig(store=store, device="cpu"))
        code, _, err = run(capsys, "index", small_library[0], "--store", store, "--device", "cpu", "--workers", "0")
        assert (code, err) == (1, f"error: {expected}\n")  # same path, other content: not the same weights
        assert Store.open(store).manifest.weights_sha256 == recorded

    weights.write_bytes(original)
    assert ModelPool().for_manifest(Store.open(store).manifest, "cpu").embed_dim == 64
    code, out, err = run(capsys, "search", "a red circle", "--store", store, "-k", "1")
    assert code == 0 and out, err

    # The text tower exported from the checked weights answers text queries without reading the
    # file again; whatever needs the file itself still refuses another one.
    _other_weights(weights, weights)
    monkeypatch.setattr(MODELS, "_models", {})
    monkeypatch.setattr(MODELS, "_texts", {})
    assert run(capsys, "search", "a red circle", "--store", store, "-k", "1")[:2] == (0, out)
    picture = small_library[1][0]["path"]
    code, _, err = run(capsys, "search", "--image", picture, "--store", store, "-k", "1")
    assert code == 1 and "put the original back" in err
