"""``fedbucket init``: create a federation in an empty bucket (or prefix).

Writes the initial model (version ``init``, built from the config's model spec and seed), the
held-out evaluation split and the model pointer, in that order: the pointer is the commit, so an
interrupted init is finished by running it again.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedbucket.protocol.documents import ModelManifest, ModelPointer, read_document, read_optional
from fedbucket.protocol.layout import LAYOUT, BucketLayout
from fedbucket.protocol.storage import ObjectStore
from fedbucket.protocol.tensors import save_tensors
from fedbucket.server.config import FederationConfig
from fedbucket.server.rounds import publish_model, set_current_model


def init_federation(
    store: ObjectStore,
    config: FederationConfig,
    *,
    holdout: Mapping[str, np.ndarray],
    layout: BucketLayout = LAYOUT,
) -> tuple[ModelManifest, bool]:
    """Initialise a federation: the initial model, the held-out evaluation split, the model pointer.

    ``holdout`` is a state dict with ``x`` (features) and ``y`` (int64 labels), e.g.
    :func:`fedbucket.sim.datasets.digits_holdout` for the demo. Idempotent: returns
    ``(manifest, False)`` when the federation is already initialised.
    """
    existing, _ = read_optional(store, layout.current_model, ModelPointer)
    if existing is not None:
        manifest, _ = read_document(store, layout.model_manifest(existing.version), ModelManifest)
        return manifest, False
    from fedbucket.torch.training import state_dict_to_numpy
    from fedbucket.torch.zoo import build_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "holdout.safetensors"
        save_tensors(holdout, path)
        store.upload_file(layout.holdout, path)
    model = build_model(config.model, seed=config.seed)
    manifest = publish_model(store, state_dict_to_numpy(model), version="init", model=config.model, layout=layout)
    set_current_model(store, manifest, expected_generation=0)
    return manifest, True
