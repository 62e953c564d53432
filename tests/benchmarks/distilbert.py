"""The state-dict shapes of DistilBERT-base for sequence classification (2 labels).

Written from the architecture (Sanh et al. 2019, arXiv:1910.01108; transformers'
``DistilBertForSequenceClassification`` with dim=768, hidden_dim=3072, n_layers=6, vocab 30522,
512 positions), so that no weights are downloaded. 66,955,010 float32 parameters, as in the
prototype's report.
"""

from __future__ import annotations

import math

import numpy as np

DIM, HIDDEN, LAYERS, VOCAB, POSITIONS, LABELS = 768, 3072, 6, 30522, 512, 2


def distilbert_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "distilbert.embeddings.word_embeddings.weight": (VOCAB, DIM),
        "distilbert.embeddings.position_embeddings.weight": (POSITIONS, DIM),
        "distilbert.embeddings.LayerNorm.weight": (DIM,),
        "distilbert.embeddings.LayerNorm.bias": (DIM,),
    }
    for i in range(LAYERS):
        prefix = f"distilbert.transformer.layer.{i}"
        for lin in ("q_lin", "k_lin", "v_lin", "out_lin"):
            shapes[f"{prefix}.attention.{lin}.weight"] = (DIM, DIM)
            shapes[f"{prefix}.attention.{lin}.bias"] = (DIM,)
        for norm in ("sa_layer_norm", "output_layer_norm"):
            shapes[f"{prefix}.{norm}.weight"] = (DIM,)
            shapes[f"{prefix}.{norm}.bias"] = (DIM,)
        shapes[f"{prefix}.ffn.lin1.weight"] = (HIDDEN, DIM)
        shapes[f"{prefix}.ffn.lin1.bias"] = (HIDDEN,)
        shapes[f"{prefix}.ffn.lin2.weight"] = (DIM, HIDDEN)
        shapes[f"{prefix}.ffn.lin2.bias"] = (DIM,)
    shapes["pre_classifier.weight"] = (DIM, DIM)
    shapes["pre_classifier.bias"] = (DIM,)
    shapes["classifier.weight"] = (LABELS, DIM)
    shapes["classifier.bias"] = (LABELS,)
    return shapes


NUM_PARAMETERS = sum(math.prod(s) for s in distilbert_shapes().values())
assert NUM_PARAMETERS == 66_955_010, NUM_PARAMETERS


def random_state(seed: int, scale: float = 0.02) -> dict[str, np.ndarray]:
    """A DistilBERT-shaped float32 state dict with N(0, scale^2) values."""
    rng = np.random.default_rng(seed)
    return {
        name: rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
        for name, shape in distilbert_shapes().items()
    }
