"""How close open_clip's ViT-H-14 comes to ImageBind-Huge's image embeddings (issue 31).

ImageBind-Huge's image encoder is OpenCLIP ViT-H/14 (LAION-2B), initialised from it and frozen
(paper, model card); its code differs in details. This loads one set of ViT-H-14 weights (random:
the hub is unreachable here, and the mapping is what is tested) into open_clip's model and into
ImageBind's vision encoder (the ``imagebind-unofficial`` package's model code), then embeds the
same images with both and reports the cosine of each pair:

- on the same pixels (the models alone), with ImageBind's LayerNorm eps as it is (1e-6) and set
  to open_clip's (1e-5), so the share of each difference is known;
- on each model's own preprocessing of the same files (ImageBind's: 224 bicubic resize, centre
  crop, CLIP mean/std, as its ``data.load_and_transform_vision_data``).

Weight mapping: the patch Conv2d becomes ImageBind's Conv3d over the image repeated into 2 frames
(each time slice half the 2-D kernel), class token and positional embedding as they are, the 32
blocks' norms, attention and MLP one for one, ln_post and the projection (transposed) as the head.

Needs the package's model code on the path (its ``__init__`` imports video and audio readers that
are not needed here)::

    pip install --no-deps --target /tmp/ibpkgs imagebind-unofficial einops iopath portalocker
    python bench/bench_imagebind_mapping.py --imagebind /tmp/ibpkgs --out bench/results/imagebind-mapping.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def imagebind_model_module(where: Path):
    """imagebind.models.imagebind_model, without the package's __init__ (it imports data loaders)."""
    package = types.ModuleType("imagebind")
    package.__path__ = [str(where / "imagebind")]
    sys.modules["imagebind"] = package
    sys.path.append(str(where))  # einops and iopath, installed beside it
    return importlib.import_module("imagebind.models.imagebind_model")


def vision_only(module):
    """ImageBind-Huge's vision encoder as imagebind_huge builds it; the other modalities at a
    token size (the vision path never touches them)."""
    small = dict(text_embed_dim=64, text_num_blocks=1, text_num_heads=1, audio_embed_dim=64, audio_num_blocks=1,
                 audio_num_heads=1, depth_embed_dim=64, depth_num_blocks=1, depth_num_heads=1, thermal_embed_dim=64,
                 thermal_num_blocks=1, thermal_num_heads=1, imu_embed_dim=64, imu_num_blocks=1, imu_num_heads=1)
    return module.ImageBindModel(vision_embed_dim=1280, vision_num_blocks=32, vision_num_heads=16, out_embed_dim=1024,
                                 **small).eval()


def load_clip_weights(visual, model) -> None:
    """open_clip ViT-H-14's visual tower's weights into ImageBind's vision encoder."""
    import torch

    pre = model.modality_preprocessors["vision"]
    trunk = model.modality_trunks["vision"]
    head = model.modality_heads["vision"]
    with torch.no_grad():
        conv = pre.rgbt_stem.proj[1]
        conv.weight.copy_(visual.conv1.weight[:, :, None].repeat(1, 1, 2, 1, 1) / 2)  # two equal frames: W/2 each
        pre.cls_token.copy_(visual.class_embedding.reshape(1, 1, -1))
        pre.pos_embedding_helper.pos_embed.copy_(visual.positional_embedding[None])
        _copy_norm(trunk.pre_transformer_layer[0], visual.ln_pre)
        for block, clip_block in zip(trunk.blocks, visual.transformer.resblocks, strict=True):
            _copy_norm(block.norm_1, clip_block.ln_1)
            _copy_norm(block.norm_2, clip_block.ln_2)
            block.attn.in_proj_weight.copy_(clip_block.attn.in_proj_weight)
            block.attn.in_proj_bias.copy_(clip_block.attn.in_proj_bias)
            block.attn.out_proj.weight.copy_(clip_block.attn.out_proj.weight)
            block.attn.out_proj.bias.copy_(clip_block.attn.out_proj.bias)
            block.mlp.fc1.weight.copy_(clip_block.mlp.c_fc.weight)
            block.mlp.fc1.bias.copy_(clip_block.mlp.c_fc.bias)
            block.mlp.fc2.weight.copy_(clip_block.mlp.c_proj.weight)
            block.mlp.fc2.bias.copy_(clip_block.mlp.c_proj.bias)
        _copy_norm(head[0], visual.ln_post)
        head[2].weight.copy_(visual.proj.T)


def _copy_norm(target, source) -> None:
    target.weight.copy_(source.weight)
    target.bias.copy_(source.bias)


def imagebind_pixels(paths: list[Path]):
    """ImageBind's own preprocessing (its data.load_and_transform_vision_data, transcribed)."""
    import torch
    from PIL import Image
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)),
    ])
    return torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])


def cosines(a, b) -> dict:
    import torch.nn.functional as F

    values = F.cosine_similarity(a.double(), b.double(), dim=-1).numpy()
    return {"min": round(float(values.min()), 7), "mean": round(float(values.mean()), 7)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imagebind", type=Path, default=Path("/tmp/ibpkgs"), help="where imagebind-unofficial lies")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import open_clip
    import torch
    import torch.nn.functional as F

    from demo.shapes import write_library

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    clip, _, preprocess = open_clip.create_model_and_transforms("ViT-H-14", pretrained=None)
    visual = clip.visual.eval()
    del clip.transformer, clip.token_embedding  # the text tower: not needed
    model = vision_only(imagebind_model_module(args.imagebind))
    load_clip_weights(visual, model)
    with tempfile.TemporaryDirectory() as folder:
        write_library(Path(folder), args.images, 3)
        paths = sorted(p for p in Path(folder).rglob("*") if p.suffix in (".png", ".jpg"))[:args.images]
        from PIL import Image

        clip_pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
        ib_pixels = imagebind_pixels(paths)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(sys.argv), "images": len(paths), "weights": "random (open_clip's init, seed 0)",
              "pixels_max_abs_difference": round(float((clip_pixels - ib_pixels).abs().max()), 6)}
    with torch.no_grad():
        ours = F.normalize(visual(clip_pixels), dim=-1)
        theirs_same = model({"vision": clip_pixels})["vision"]
        theirs_own = model({"vision": ib_pixels})["vision"]
        report["same_pixels"] = cosines(ours, theirs_same)
        report["own_preprocessing"] = cosines(ours, theirs_own)
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = 1e-5
        report["same_pixels_eps_1e-5"] = cosines(ours, model({"vision": clip_pixels})["vision"])
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
