"""--precision: int8 towers within the measured fidelity of fp32 on the trained demo model, the
store's record of its precisions, and the torch-free text encoder of a one-shot search (the same
ids as open_clip's tokenizer, the same results, rebuilt when damaged, refused from an unsafe cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli import cli
from demo.quality import shapes_library_quality
from demo.shapes import write_library
from encoder import exported, load_image, load_model, tokens
from encoder.pool import ModelPool
from search.query import Query
from store import Store
from store.manifest import migrate
from tests.helpers import run

ROOT = Path(__file__).resolve().parents[1]


LOWER = ("int8", "bf16")


@pytest.fixture(scope="module")
def int8_model():
    return load_model("clipdex-shapes", device="cpu", precision="int8")


@pytest.fixture(scope="module")
def lower_models(int8_model):
    return {"int8": int8_model, "bf16": load_model("clipdex-shapes", device="cpu", precision="bf16")}


@pytest.fixture(scope="module")
def heldout_pictures(heldout_library):
    return [load_image(row["path"]) for row in heldout_library[1]]


@pytest.mark.parametrize("precision", LOWER)
def test_image_vectors_within_fidelity_of_fp32(precision, demo_model, lower_models, heldout_pictures):
    fp32, lower = demo_model.encode_images(heldout_pictures), lower_models[precision].encode_images(heldout_pictures)
    cosines = np.sum(fp32 * lower, axis=1)
    print(f"{precision} vs fp32, {len(cosines)} held-out images: min {cosines.min():.5f} "
          f"median {np.median(cosines):.5f}")
    assert len(cosines) >= 300
    assert cosines.min() >= 0.99
    assert np.median(cosines) >= 0.995


@pytest.mark.parametrize("precision", LOWER)
def test_text_vectors_within_fidelity_of_fp32(precision, demo_model, lower_models):
    texts = [f"a {c} {s}" for c in ("red", "green", "blue", "pink") for s in ("circle", "square", "star")]
    cosines = np.sum(demo_model.encode_texts(texts) * lower_models[precision].encode_texts(texts), axis=1)
    assert cosines.min() >= 0.99 and np.median(cosines) >= 0.995


@pytest.mark.parametrize("precision", LOWER)
def test_retrieval_and_zero_shot_within_001_of_fp32(precision, demo_model, lower_models, heldout_library):
    rows = heldout_library[1]
    fp32, lower = shapes_library_quality(demo_model, rows), shapes_library_quality(lower_models[precision], rows)
    print("fp32", fp32, precision, lower)
    assert abs(fp32["precision_at_5"] - lower["precision_at_5"]) <= 0.01
    assert abs(fp32["zero_shot_shape"] - lower["zero_shot_shape"]) <= 0.01


def test_int8_runs_every_matrix_product_in_int8(int8_model):
    import onnx

    for tower in int8_model.towers.values():
        graph = onnx.load(str(tower.folder / exported.MODEL_FILE)).graph
        kinds = [node.op_type for node in graph.node]
        assert "MatMulInteger" in kinds
        # attention projections included: no float MatMul/Gemm left against a weight
        weights = {init.name for init in graph.initializer}
        assert not [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and set(n.input) & weights]


TEXTS = ["a red circle", "A Photo of a DOG!!", "naïve café — 東京タワー 123,456", "it's I'M we'll", "&amp;lt;b&gt; x",
         "<start_of_text> hi <end_of_text>", "word " * 100, "   ", "", "emoji 😀👍🏽", "ﬁ ligature Ⅻ ²",
         "don't 'quote' \"x\"", "tab\tnew\nline", "ÀÉÎ õ ß ẞ", "x'sy", "ＦＵＬＬ width", "\u200bzero width"]


@pytest.fixture(scope="module")
def token_pair(demo_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokenizer.json"
    tokens.build(demo_model.tokenizer).save(str(path))
    t = demo_model.tokenizer
    return t, tokens.ClipTokens(path, t.context_length, t.sot_token_id, t.eot_token_id, tokens.special_tokens(t))


def test_tokens_equal_open_clips(token_pair):
    theirs, ours = token_pair
    assert tokens.can_export(theirs)
    assert (theirs(TEXTS).numpy() == ours(TEXTS)).all()


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_tokens_equal_open_clips_on_any_text(token_pair, text):
    theirs, ours = token_pair
    assert (theirs([text]).numpy() == ours([text])).all()


def _search(store: Path, text: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    """`clipdex search` in a process of its own, printing after the results which modules it imported."""
    code = ("import sys, cli\n"
            "try:\n    cli.main(sys.argv[1:])\n"
            "except SystemExit as end:\n    code = end.code\n"
            "print('IMPORTED', ' '.join(sorted(m for m in ('torch', 'open_clip', 'lancedb') if m in sys.modules)))\n")
    return subprocess.run([sys.executable, "-c", code, "search", text, "--store", str(store), *args], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def shapes_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    write_library(root / "library", 48, 5)
    result = CliRunner().invoke(cli, ["index", str(root / "library"), "--store", str(root / "store"),
                                      "--model", "clipdex-shapes", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return root / "store"


def test_one_shot_text_search_imports_no_torch_and_answers_as_torch(shapes_store, tmp_path):
    cache = {"CLIPDEX_CACHE_DIR": str(tmp_path / "cache")}
    first = _search(shapes_store, "a pink star", cache)  # exports the text tower: torch, once
    again = _search(shapes_store, "a pink star", cache)
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert again.stdout.splitlines()[-1].strip() == "IMPORTED"  # neither torch, open_clip nor LanceDB
    results = again.stdout.splitlines()[:-1]
    assert first.stdout.splitlines()[:-1] == results and len(results) == 10

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could swap an encoder there: refused, and the model answers instead
    torch_run = _search(shapes_store, "a pink star", {"CLIPDEX_CACHE_DIR": str(shared)})
    assert torch_run.returncode == 0
    assert "others may write to the cache" in torch_run.stderr and "Traceback" not in torch_run.stderr
    assert torch_run.stdout.splitlines()[-1] == "IMPORTED open_clip torch"
    assert torch_run.stdout.splitlines()[:-1] == results  # byte for byte
    assert not list(shared.iterdir())


def test_exported_text_scores_equal_torch_scores(shapes_store, demo_model):
    store = Store.open(shapes_store)
    for text in ("a pink star", "a blue square", "a photo of a triangle"):
        torch_rows = Query.create(store, text, encoder=demo_model).limit(10).to_list()
        onnx_rows = Query.create(store, text, device="cpu").limit(10).to_list()
        assert [r["id"] for r in onnx_rows] == [r["id"] for r in torch_rows]
        assert np.allclose([r["score"] for r in onnx_rows], [r["score"] for r in torch_rows], atol=1e-5)


def test_a_damaged_export_is_built_again(demo_model, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPDEX_CACHE_DIR", str(tmp_path / "cache"))
    pool = ModelPool(loader=lambda *a, **k: demo_model)
    store_manifest = type("M", (), {"model": "clipdex-shapes", "pretrained": "bundled", "weights_sha256": "",
                                    "has_text_encoder": True, "space": "clipdex-shapes"})()
    first = pool.text_encoder(store_manifest, "cpu")
    expected = first.encode_texts(["a red circle"])
    model_file = first.tower.folder / exported.MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[:1000])  # a disk that filled up, a killed copy
    again = ModelPool(loader=lambda *a, **k: demo_model).text_encoder(store_manifest, "cpu")
    assert isinstance(again, exported.ExportedText)
    assert np.allclose(again.encode_texts(["a red circle"]), expected, atol=1e-6)


def test_store_records_each_precision_and_info_shows_them(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPDEX_CACHE_DIR", str(tmp_path / "cache"))
    first, second = tmp_path / "a", tmp_path / "b"
    write_library(first, 20, 1)
    write_library(second, 20, 2)
    store = tmp_path / "store"
    runner = CliRunner()
    result = runner.invoke(cli, ["index", str(first), "--store", str(store), "--model", "clipdex-shapes",
                                 "--device", "cpu", "--precision", "int8"])
    assert result.exit_code == 0, result.output
    assert Store.open(store).manifest.precisions == ("int8",)
    exports = {p.name for p in (tmp_path / "cache" / exported.KIND).glob("*/*")}
    assert exports == {"image-int8", "text-int8", "text-fp32"}  # the writer's export of the query tower too
    assert "64-d, int8 vectors" in runner.invoke(cli, ["info", "--store", str(store)]).output
    result = runner.invoke(cli, ["index", str(second), "--store", str(store), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert Store.open(store).manifest.precisions == ("int8", "fp32")
    assert "64-d, int8 and fp32 vectors" in runner.invoke(cli, ["info", "--store", str(store)]).output
    assert json.loads(runner.invoke(cli, ["info", "--store", str(store), "--json"]).output)["precisions"] == \
        ["int8", "fp32"]
    hits = runner.invoke(cli, ["search", "a red circle", "--store", str(store), "--precision", "int8", "--json"])
    assert hits.exit_code == 0 and len(json.loads(hits.output)) == 10


@pytest.mark.parametrize("precision", LOWER)
def test_the_pool_gives_each_precision_its_own_arithmetic(precision, tmp_path, monkeypatch):
    """What every command gets (index, compare, classify, search): int8 runs the exported towers,
    bf16 the torch model with bfloat16 weights; neither is the fp32 model under another name."""
    import torch

    monkeypatch.setenv("CLIPDEX_CACHE_DIR", str(tmp_path / "cache"))
    model = ModelPool().get("clipdex-shapes", device="cpu", precision=precision)
    assert model.precision == precision
    weights = {p.dtype for p in model.model.parameters()}
    if precision == "int8":
        assert set(model.towers) == {"text", "image"} and weights == {torch.float32}
    else:
        assert not model.towers and weights == {torch.bfloat16}
        assert not (tmp_path / "cache").exists()  # nothing exported for it


def test_int8_off_the_cpu_is_one_line(capsys, small_library):
    picture = small_library[1][0]["path"]
    for device in ("cuda", "mps"):
        code, out, err = run(capsys, "compare", picture, "--text", "x", "--model", "clipdex-shapes", "--device",
                             device, "--precision", "int8")
        assert code != 0 and err.count("\n") == 1 and err.startswith("error: ") and not out


def test_stores_before_precisions_were_fp32():
    assert migrate({"version": 7, "model": "m", "space": "m", "count": 3})["precisions"] == ["fp32"]
    assert migrate({"version": 7, "model": "m", "space": "imagebind", "count": 3})["precisions"] == []


@pytest.mark.parametrize("precision", exported.PRECISIONS)
def test_a_model_past_2gb_exports_its_weights_beside_the_graph(precision, demo_model, tmp_path, monkeypatch):
    """ViT-H's image tower is 2.5 GB, more than one protobuf holds: the weights go to a file beside
    the graph, which the quantiser reads through the name the graph gives it."""
    import torch

    monkeypatch.setenv("CLIPDEX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(exported, "_large", lambda model: True)
    key = exported.key_for(demo_model.name, demo_model.pretrained)
    tower = exported.tower(key, "image", precision, demo_model)
    files = {p.name for p in tower.folder.iterdir()}
    assert files == ({"model.onnx", "model.onnx.data", "meta.json"} if precision == "fp32" else
                     {"model.onnx", "meta.json"})
    pixels = torch.rand(8, 3, *demo_model.image_size)
    assert np.sum(tower(pixels.numpy()) * demo_model.encode_pixels(pixels), axis=1).min() >= 0.99
