"""The command line as a user meets it: output formats, plots, and one-line errors for mistakes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import cli

SHAPES = "circle,square,triangle,star"
DEMO = ["--model", "clipdex-shapes", "--device", "cpu"]


def run(capsys, *args):
    with pytest.raises(SystemExit) as caught:
        cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return caught.value.code, out, err


def clipdex_script() -> str:
    script = Path(sys.executable).parent / "clipdex"
    return str(script) if script.exists() else "clipdex"


def test_compare_table_json_and_plot(capsys, small_library, tmp_path):
    _, rows = small_library
    paths = [rows[0]["path"], rows[1]["path"]]
    texts = [f"a {rows[0]['colour']} {rows[0]['shape']}", "a photo of a star"]
    code, out, _ = run(capsys, "compare", *paths, "--text", texts[0], "--text", texts[1], *DEMO)
    assert code == 0
    lines = out.strip().splitlines()
    assert Path(paths[0]).name in lines[0] and lines[1].startswith(texts[0]) and lines[2].startswith(texts[1])

    plot = tmp_path / "sim.png"
    code, out, _ = run(capsys, "compare", *paths, "-t", texts[0], "-t", texts[1], "--json", "--plot", plot, *DEMO)
    payload = json.loads(out)
    assert code == 0 and payload["texts"] == texts and payload["images"] == paths
    assert len(payload["similarity"]) == 2 and len(payload["similarity"][0]) == 2
    assert all(-1 <= v <= 1 for row in payload["similarity"] for v in row)
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_classify_json_schema_and_plot(capsys, small_library, tmp_path):
    _, rows = small_library
    paths = [r["path"] for r in rows[:3]]
    plot = tmp_path / "cls.png"
    code, out, _ = run(capsys, "classify", *paths, "--labels", SHAPES, "-k", 2, "--json", "--plot", plot, *DEMO)
    assert code == 0
    payload = json.loads(out)
    assert [item["path"] for item in payload] == paths
    for item, row in zip(payload, rows):
        assert len(item["top"]) == 2 and set(item["top"][0]) == {"label", "prob"}
        assert item["top"][0]["label"] == row["shape"]
        assert item["top"][0]["prob"] >= item["top"][1]["prob"]
    assert plot.stat().st_size > 1000


def test_classify_labels_file_and_builtin_set(capsys, small_library, tmp_path):
    _, rows = small_library
    labels = tmp_path / "labels.txt"
    labels.write_text("circle\nsquare\n\ntriangle\nstar\n")
    code, out, _ = run(capsys, "classify", rows[0]["path"], "--labels-file", labels, *DEMO)
    assert code == 0 and out.splitlines()[1].endswith(rows[0]["shape"])
    code, out, _ = run(capsys, "classify", rows[0]["path"], "--labels", "cifar100", "-k", 5, *DEMO)
    assert code == 0 and len(out.strip().splitlines()) == 6


@pytest.mark.parametrize("args, message", [
    (["compare", "missing.jpg", "--text", "x"], "missing.jpg: missing"),
    (["compare", "{notimage}", "--text", "x"], "not an image"),
    (["classify", "{image}", "--labels", " , ,"], "label list is empty"),
    (["classify", "{image}", "--labels-file", "{empty}"], "label list is empty"),
    (["classify", "{image}", "--labels", "a,b", "--template", "a photo of a"], "must contain '{}'"),
    (["classify", "{image}", "--labels", "a", "-k", "0"], "at least 1"),
    (["classify", "{image}"], "exactly one of --labels"),
    (["compare", "{image}", "--text", "x", "--model", "nope"], "unknown model 'nope'"),
    (["compare", "{image}", "--text", "x", "--model", "RN50", "--pretrained", "/no/such.pt"], "checkpoint file not found"),
    (["compare", "{image}"], "Missing option '--text'"),
])
def test_bad_input_is_one_line_and_nonzero(capsys, small_library, tmp_path, args, message):
    (tmp_path / "fake.jpg").write_text("not really a jpeg")
    (tmp_path / "empty.txt").write_text("\n\n")
    fill = {"notimage": tmp_path / "fake.jpg", "image": small_library[1][0]["path"], "empty": tmp_path / "empty.txt"}
    argv = [a.format(**fill) if a.startswith("{") else a for a in args]
    code, out, err = run(capsys, *argv, *([] if "--model" in argv else DEMO))
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err
    assert "Traceback" not in err + out


def test_real_console_script_errors_without_traceback(tmp_path):
    (tmp_path / "fake.png").write_bytes(b"\x00" * 10)
    result = subprocess.run([clipdex_script(), "classify", str(tmp_path / "fake.png"), "--labels", "a,b", *DEMO],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'fake.png'}: not an image (unrecognised content)"]


def test_models_command(capsys):
    code, out, _ = run(capsys, "models", "--json")
    names = {m["name"]: m for m in json.loads(out)}
    assert code == 0 and names["clipdex-shapes"]["bundled"] and "laion2b_s34b_b79k" in names["ViT-B-32"]["pretrained"]
    code, out, _ = run(capsys, "models")
    assert out.splitlines()[0].startswith("clipdex-shapes")


def test_demo_data_refuses_to_overwrite(capsys, tmp_path):
    code, out, _ = run(capsys, "demo-data", tmp_path / "lib", "--count", 5, "--seed", 1)
    assert code == 0 and len(list((tmp_path / "lib").rglob("shape_*"))) == 5
    code, _, err = run(capsys, "demo-data", tmp_path / "lib", "--count", 5)
    assert code == 1 and "not empty" in err


def test_demo_runs_offline_end_to_end(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --dir, as the README's command uses
    code, out, _ = run(capsys, "demo", "--dir", "demo", "--count", 60)
    assert code == 0
    assert "generated 60 images" in out and "60 embedded" in out and "precision@5" in out
    assert 'clipdex search "a red circle"' in out and "clipdex info" in out and "60 images, 0 failures" in out
    assert out.count("✓") >= 6  # the hits are checked against the generated truth, and mostly right
    assert (tmp_path / "demo" / "compare.png").exists() and (tmp_path / "demo" / "classify.png").exists()
    code, out, _ = run(capsys, "demo", "--dir", tmp_path / "demo")
    assert code == 0 and "reusing the demo library" in out and "60 unchanged" in out
