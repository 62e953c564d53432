"""The model: the mean of hashed n-gram embeddings, then one linear layer (fastText-style).

Invariants:

- Input is an int64 ``(batch, max_tokens)`` matrix of ids from
  :class:`~fedbucket_textclf.tokenizer.HashingTokenizer`; ids ``<= 0`` are padding and do not
  count towards the mean. A row of padding only (an empty message) embeds to zeros, so its
  logits are the linear layer's bias.
- Ids at or above ``buckets`` are folded into ``1 .. buckets - 1`` rather than rejected, so a
  model with fewer buckets than the tokenizer (``model.kwargs = {buckets = 4096}``) still works on
  the same data and split files, at the price of more hash collisions.
- The state dict is ``embedding.weight`` (buckets, dim) and ``classifier.weight`` /
  ``classifier.bias``: every client of a federation must use the same kwargs, or the round's
  tensor schema refuses its update.
"""

from __future__ import annotations

import torch
from torch import nn

from fedbucket_textclf.tokenizer import PADDING_ID


class NgramClassifier(nn.Module):
    """``EmbeddingBag(buckets, dim, mode="mean")`` + ``Linear(dim, num_classes)``.

    Defaults: 16,384 x 32 embeddings + a 32 x 2 classifier = 524,354 float32 parameters (2.1 MB).
    """

    def __init__(self, buckets: int = 16384, dim: int = 32, num_classes: int = 2) -> None:
        super().__init__()
        if buckets < 2 or dim < 1 or num_classes < 2:
            raise ValueError(f"need buckets >= 2, dim >= 1, num_classes >= 2; got {buckets}, {dim}, {num_classes}")
        self.buckets = buckets
        self.embedding = nn.EmbeddingBag(buckets, dim, mode="mean", padding_idx=PADDING_ID)
        self.classifier = nn.Linear(dim, num_classes)
        # fastText's initialisation: small uniform embeddings, so that the mean of a bag starts
        # near zero and the first updates are not dominated by the random start (N(0, 1), the
        # EmbeddingBag default, gives every message a large random direction).
        # The classifier starts at zero: all logits are equal, so an untrained model predicts
        # class 0 ("not offensive", the majority) with loss ln(num_classes) rather than a random
        # guess; the embeddings still learn from the first step on, through the classifier's
        # first update.
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / dim, 1.0 / dim)
            self.embedding.weight[PADDING_ID].zero_()
            self.classifier.weight.zero_()
            self.classifier.bias.zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_classes)`` of an int ``(batch, max_tokens)`` id matrix."""
        if ids.ndim != 2:
            raise ValueError(f"expected (batch, max_tokens) token ids, got shape {tuple(ids.shape)}")
        ids = ids.long()
        # Fold out-of-range ids into 1..buckets-1 and map ids <= 0 to padding (see module doc).
        ids = torch.where(ids > 0, (ids - 1) % (self.buckets - 1) + 1, PADDING_ID)
        return self.classifier(self.embedding(ids))
