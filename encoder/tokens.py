"""open_clip's CLIP tokenizer without torch: the same byte-level BPE (vocabulary and merges taken
from open_clip's own ``SimpleTokenizer`` when a model is exported) run by Hugging Face
``tokenizers``, so a text query can be embedded by an exported text tower in a process that never
imports torch (importing torch costs more than a whole one-shot search is allowed).

The ids equal open_clip's for every text (tests/test_precision.py compares them, generated texts
included): the text is cleaned exactly as open_clip's ``clean='lower'`` (ftfy, HTML entities
twice, whitespace, lower case), split into words by open_clip's own pattern with the same regular
expression library (Rust's splits some rare code points differently), each word's bytes merged by
``tokenizers``, and framed as open_clip frames it (start, tokens, end, truncated to the context
with the end kept, zeros after).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    import tokenizers

# open_clip's split (tokenizer.SimpleTokenizer.pat), after its special tokens.
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
END_OF_WORD = "</w>"


def can_export(tokenizer: Any) -> bool:
    """Whether *tokenizer* (what ``open_clip.get_tokenizer`` gave) is the CLIP BPE this module
    reproduces: open_clip's SimpleTokenizer, lower-case cleaning, truncation."""
    return (type(tokenizer).__name__ == "SimpleTokenizer" and getattr(tokenizer, "reduction_fn", None) is None
            and getattr(getattr(tokenizer, "clean_fn", None), "__name__", "") == "_clean_lower")


def build(tokenizer: Any) -> "tokenizers.Tokenizer":
    """A ``tokenizers.Tokenizer`` with *tokenizer*'s (a SimpleTokenizer's) vocabulary and merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.__getitem__)
    bpe = models.BPE(vocab=dict(tokenizer.encoder), merges=list(merges), end_of_word_suffix=END_OF_WORD,
                     continuing_subword_prefix="", dropout=None, fuse_unk=False)
    result = Tokenizer(bpe)
    result.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # words come split
    return result


def special_tokens(tokenizer: Any) -> dict[str, int]:
    """A SimpleTokenizer's special tokens (they stand for themselves in a text) and their ids."""
    return {token: i for token, i in tokenizer.encoder.items() if i in tokenizer.all_special_ids}


def clean(text: str) -> str:
    """open_clip's ``_clean_lower``: ftfy, HTML entities unescaped twice, whitespace, lower case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


class ClipTokens:
    """Texts → ``[n, context_length]`` int64 ids, as open_clip's tokenizer gives them."""

    def __init__(self, path: str | Path, context_length: int, start: int, end: int,
                 special: dict[str, int]) -> None:
        import regex
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))
        self.context_length, self.start, self.end, self.special = context_length, start, end, special
        alternatives = "|".join([*map(regex.escape, special), PATTERN])
        self.pattern = regex.compile(alternatives, regex.IGNORECASE)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.context_length), np.int64)
        for row, text in enumerate(texts):
            ids = [self.start, *self._encode(clean(text)), self.end][:self.context_length]
            ids[-1] = self.end
            out[row, :len(ids)] = ids
        return out

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = []
        words: list[str] = []
        for word in [*self.pattern.findall(text), None]:
            if word is None or word in self.special:
                if words:
                    ids += self.tokenizer.encode(words, is_pretokenized=True, add_special_tokens=False).ids
                    words = []
                if word is not None:
                    ids.append(self.special[word])
            else:
                words.append(word)
        return ids
