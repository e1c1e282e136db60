"""Peer run: LanceDB's own open-clip embedding function ingesting image paths (timed by the caller).

    python bench/peer_lancedb.py MODEL WEIGHTS_FILE IMAGE_LIST DB_DIR
"""

import sys
from pathlib import Path


def main() -> None:
    model, weights, image_list, db_dir = sys.argv[1:5]
    import lancedb
    from lancedb.embeddings import get_registry
    from lancedb.pydantic import LanceModel, Vector

    if model == "clipdex-shapes":  # only registers the config with open_clip; LanceDB does the rest
        from encoder.registry import open_clip_module

        open_clip_module()
    function = get_registry().get("open-clip").create(name=model, pretrained=weights, device="cpu")

    class Images(LanceModel):
        image_uri: str = function.SourceField()
        vector: Vector(function.ndims()) = function.VectorField()

    paths = Path(image_list).read_text().split()
    table = lancedb.connect(db_dir).create_table("images", schema=Images, mode="overwrite")
    table.add([{"image_uri": path} for path in paths])
    print(table.count_rows())


if __name__ == "__main__":
    main()
