import json

import pytest

from store.errors import StoreError
from store.manifest import MANIFEST_VERSION, IndexInfo, Manifest, migrate, read_manifest, write_manifest


def test_round_trip_is_atomic_and_lossless(tmp_path):
    manifest = Manifest(model="m", pretrained="p", dim=8, space="m", index=IndexInfo(type="flat", recall_at_10=1.0))
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left behind


def test_old_manifest_is_migrated_step_by_step(tmp_path):
    v1 = {"version": 1, "model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k", "dim": 512, "count": 3,
          "index": {"type": "flat", "recall_at_10": 1.0}}
    (tmp_path / "manifest.json").write_text(json.dumps(v1))
    manifest = read_manifest(tmp_path)
    assert manifest.version == MANIFEST_VERSION and manifest.space == "ViT-B-32" and manifest.has_text_encoder
    assert manifest.count == 3 and manifest.index.type == "flat"
    assert manifest.content_hash == "blake2b-128"  # what every store before v5 hashed files with
    assert Manifest(model="m", pretrained="p", dim=8, space="m").content_hash == "blake3-128"


def test_newer_or_damaged_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="newer clipdex"):
        migrate({"version": MANIFEST_VERSION + 1})
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="damaged"):
        read_manifest(tmp_path)
    with pytest.raises(StoreError, match="not a clipdex store"):
        read_manifest(tmp_path / "elsewhere")
