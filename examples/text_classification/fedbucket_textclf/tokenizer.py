"""Hashed n-gram tokenizer: text -> a fixed-width row of int64 feature ids.

Invariants (a trained model and every split file depend on them):

- Deterministic across processes, machines and Python versions: features are hashed with
  ``hashlib.blake2b`` (keyed by a fixed ``person`` string), never with Python's per-process
  salted ``hash()``. Changing the feature scheme, the hash or its ``person`` string changes every
  id, so it invalidates every trained model and every published split: it needs a new version of
  the task package *and* a new federation.
- Ids are in ``1 .. buckets - 1``; ``0`` is padding (and the model ignores it).
- :meth:`HashingTokenizer.encode` returns an ``(n, max_tokens)`` int64 matrix. Features are
  emitted in text order (each word, then the bigram ending at it, then its character trigrams),
  so truncation keeps the beginning of a long message rather than dropping all its bigrams.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

#: Padding id: rows shorter than ``max_tokens`` are filled with it; never produced by a feature.
PADDING_ID = 0

# Word characters plus inner apostrophes ("don't", "you're" stay one word). Lower-casing first
# makes "IDIOT" and "idiot" the same feature.
_WORD = re.compile(r"\w+(?:'\w+)*")

# Part of the hash key: a different person string is a different (independent) hash family.
# Bump the version suffix together with any change to the feature scheme.
_PERSON = b"fbtextclf-v1"


@functools.lru_cache(maxsize=1 << 16)
def _hash_id(feature: str, buckets: int) -> int:
    # Chat vocabularies are Zipfian: caching the frequent features saves most of the hashing.
    digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8, person=_PERSON).digest()
    return 1 + int.from_bytes(digest, "little") % (buckets - 1)


@dataclass(frozen=True)
class HashingTokenizer:
    """Lower-cased words, word bigrams and (optionally) character trigrams, hashed into
    ``1 .. buckets - 1`` and cut or padded to ``max_tokens`` ids per text."""

    buckets: int = 16384
    max_tokens: int = 64
    bigrams: bool = True
    char_trigrams: bool = False

    def __post_init__(self) -> None:
        if self.buckets < 2:
            raise ValueError(f"buckets must be at least 2 (id 0 is padding); got {self.buckets}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1; got {self.max_tokens}")

    def words(self, text: str) -> list[str]:
        """The lower-cased words of ``text``."""
        return _WORD.findall(text.lower())

    def features(self, text: str) -> list[str]:
        """The feature strings of ``text`` in text order, before hashing and truncation.

        Each kind has its own prefix so that a word and a trigram with the same letters are
        different features.
        """
        out: list[str] = []
        previous: str | None = None
        for word in self.words(text):
            out.append(f"w:{word}")
            if self.bigrams and previous is not None:
                out.append(f"b:{previous} {word}")
            if self.char_trigrams:
                padded = f"<{word}>"  # marks word boundaries, so "<id" (a prefix) differs from "id"
                out.extend(f"c:{padded[i : i + 3]}" for i in range(len(padded) - 2))
            previous = word
        return out

    def ids(self, text: str) -> list[int]:
        """The hashed ids of ``text``'s first ``max_tokens`` features (no padding)."""
        return [_hash_id(feature, self.buckets) for feature in self.features(text)[: self.max_tokens]]

    def encode(self, texts: Iterable[str]) -> np.ndarray:
        """An ``(n, max_tokens)`` int64 matrix of ids, each row padded with :data:`PADDING_ID`."""
        rows = [self.ids(text) for text in texts]
        matrix = np.full((len(rows), self.max_tokens), PADDING_ID, dtype=np.int64)
        for i, row in enumerate(rows):
            matrix[i, : len(row)] = row
        return matrix
