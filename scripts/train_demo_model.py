"""Train the bundled ``clipdex-shapes`` CLIP model on generated shape images (CPU is enough).

Reproduce the shipped weights (about 30 minutes on a 2-core machine):

    python scripts/train_demo_model.py --out encoder/model_data/clipdex-shapes.pt

Training data is library seed 0; the quality check below uses seed 99 and the test-suite uses
seed 7, so neither has seen a training image. The loss is CLIP's symmetric cross-entropy with
one change: a caption counts as a positive for every image in the batch it truly describes
("a photo of a star" matches every star), instead of only for its own image.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from demo.shapes import SHAPES, jpeg_roundtrip, sample
from search.metrics import precision_at_k, zero_shot_accuracy

CONFIG = Path(__file__).resolve().parents[1] / "encoder" / "model_data" / "clipdex-shapes.json"
ATTRIBUTES = ("colour", "shape", "position", "background")
# (template, attributes it names): varied so the model learns each attribute on its own.
TEMPLATES = [
    ("{full}", ATTRIBUTES),
    ("a {colour} {shape}", ("colour", "shape")),
    ("a photo of a {colour} {shape}", ("colour", "shape")),
    ("a photo of a {shape}", ("shape",)),
    ("a {shape}", ("shape",)),
    ("a {colour} shape", ("colour",)),
    ("something {colour}", ("colour",)),
    ("a {shape} {place}", ("shape", "position")),
    ("a {colour} {shape} {place}", ("colour", "shape", "position")),
    ("a {shape} on a {background} background", ("shape", "background")),
]
_preprocess = None


def _render(args: tuple[int, int]) -> tuple[np.ndarray, tuple[str, ...]]:
    seed, index = args
    image, label = sample(seed, index, short_side=(64, 320))
    rng = np.random.default_rng([seed, index, 2])
    if rng.random() < 0.5:
        image = jpeg_roundtrip(image, quality=int(rng.integers(60, 96)))
    tensor = _preprocess(image).numpy().astype(np.float16)
    return tensor, (label.colour, label.shape, label.position, label.background)


def render_set(seed: int, count: int, preprocess, workers: int):
    global _preprocess
    _preprocess = preprocess  # inherited by forked workers
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        results = pool.map(_render, [(seed, i) for i in range(count)], chunksize=64)
    images = torch.from_numpy(np.stack([r[0] for r in results]))
    return images, [r[1] for r in results]


def caption(labels: tuple[str, ...], template: str) -> str:
    colour, shape, position, background = labels
    place = "in the center" if position == "center" else f"in the {position}"
    article = "an" if colour[0] in "aeiou" else "a"
    full = f"{article} {colour} {shape} on a {background} background {place}"
    return template.format(full=full, colour=colour, shape=shape, place=place, background=background)


def positives(codes: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[B, B] float: caption j describes image i (every attribute j names matches image i)."""
    same = codes[:, None, :] == codes[None, :, :]
    return (same | ~masks[None, :, :]).all(dim=-1).float()


@torch.no_grad()
def evaluate(model, tokenizer, images, labels, batch=512) -> dict[str, float]:
    model.eval()
    feats = torch.cat([F.normalize(model.encode_image(images[i:i + batch].float()), dim=-1)
                       for i in range(0, len(images), batch)]).numpy()
    combos = sorted({(c, s) for c, s, _, _ in labels})
    queries = F.normalize(model.encode_text(tokenizer([f"a {c} {s}" for c, s in combos])), dim=-1).numpy()
    shapes = F.normalize(model.encode_text(tokenizer([f"a photo of a {s}" for s in SHAPES])), dim=-1).numpy()
    model.train()
    return {
        "precision_at_5": precision_at_k(feats, [(c, s) for c, s, _, _ in labels], queries, combos, k=5),
        "zero_shot_shape": zero_shot_accuracy(feats, [SHAPES.index(s) for _, s, _, _ in labels], shapes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-count", type=int, default=20000)
    parser.add_argument("--eval-count", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    started = time.time()
    torch.manual_seed(args.seed)
    open_clip.add_model_config(CONFIG)
    model, _, preprocess = open_clip.create_model_and_transforms("clipdex-shapes")
    tokenizer = open_clip.get_tokenizer("clipdex-shapes")
    train_x, train_labels = render_set(args.seed, args.train_count, preprocess, args.workers)
    eval_x, eval_labels = render_set(99, args.eval_count, preprocess, args.workers)
    print(f"rendered {len(train_x)} + {len(eval_x)} images in {time.time() - started:.0f}s", flush=True)

    vocab = {a: sorted({lab[i] for lab in train_labels}) for i, a in enumerate(ATTRIBUTES)}
    codes = torch.tensor([[vocab[a].index(lab[i]) for i, a in enumerate(ATTRIBUTES)] for lab in train_labels])
    token_cache: dict[str, torch.Tensor] = {}

    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.max_lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.max_lr, total_steps=steps_per_epoch * args.epochs, pct_start=0.15)
    rng = np.random.default_rng(args.seed)
    history = []
    model.train()
    for epoch in range(args.epochs):
        order = torch.from_numpy(rng.permutation(len(train_x)))
        losses = []
        for step in range(steps_per_epoch):
            batch = order[step * args.batch_size:(step + 1) * args.batch_size]
            chosen = rng.integers(len(TEMPLATES), size=len(batch))
            texts = [caption(train_labels[i], TEMPLATES[t][0]) for i, t in zip(batch.tolist(), chosen)]
            for text in texts:
                if text not in token_cache:
                    token_cache[text] = tokenizer([text])[0]
            tokens = torch.stack([token_cache[t] for t in texts])
            masks = torch.tensor([[a in TEMPLATES[t][1] for a in ATTRIBUTES] for t in chosen])
            target = positives(codes[batch], masks)

            image_features, text_features, logit_scale = model(train_x[batch].float(), tokens)[:3]
            logits = logit_scale * image_features @ text_features.T
            loss_images = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
            loss_texts = -(target / target.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
            loss = (loss_images + loss_texts) / 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
        metrics = evaluate(model, tokenizer, eval_x, eval_labels)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), **metrics,
                        "seconds": round(time.time() - started)})
        print(json.dumps(history[-1]), flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    # fp16 halves the shipped file; open_clip casts it back to the model's dtype on load.
    torch.save({k: v.half() for k, v in model.state_dict().items()}, args.out)
    report = {
        "command": "python scripts/train_demo_model.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(time.time() - started),
        "torch_threads": torch.get_num_threads(),
        "history": history,
    }
    args.out.with_suffix(".train.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) in {report['train_seconds']}s")


if __name__ == "__main__":
    main()
