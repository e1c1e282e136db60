"""The text queries every store's index is tuned on, made by the store's own text encoder.

An index tuned only on stored image vectors can fail text queries: CLIP's text embeddings lie in
another cone of the space (the modality gap), so the IVF lists nearest to a text query are often
not the ones holding its nearest images. Each build therefore also measures recall@10 on these
prompts, a fixed and documented set: CIFAR-100's labels (the bundled label set) in four templates,
256 of them, the same for every store of a model.
"""

from __future__ import annotations

import numpy as np

CIFAR100 = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)

TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a close-up photo of a {}.")
PROMPT_COUNT = 256


def tuning_prompts() -> list[str]:
    """PROMPT_COUNT prompts, every label in turn with the templates in rotation (always the same)."""
    labels = [name.replace("_", " ") for name in CIFAR100]
    prompts = [template.format(label) for template in TEMPLATES for label in labels]
    step = len(prompts) / PROMPT_COUNT
    return [prompts[int(i * step)] for i in range(PROMPT_COUNT)]


def text_queries(model) -> np.ndarray:
    """The tuning prompts embedded by *model*'s text tower (unit float32 rows)."""
    return model.encode_texts(tuning_prompts())
