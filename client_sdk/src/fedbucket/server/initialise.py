"""``fedbucket init``: create a federation in an empty bucket (or prefix).

Everything that can fail without writing is checked first — the config, the task package (it
must import), the model (it must build), the splits against the task, and that the gate has the
figures it needs — and only then is anything written: the validation and test splits (if the
server holds any), the initial model (version ``init``, built from the config's model spec and
seed), and the model pointer last. The pointer is the commit, so an interrupted init is finished
by running it again.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from fedbucket.protocol.documents import ModelManifest, ModelPointer, read_document, read_optional
from fedbucket.protocol.errors import ConfigError
from fedbucket.protocol.layout import LAYOUT, BucketLayout
from fedbucket.protocol.storage import ObjectStore
from fedbucket.protocol.tensors import save_tensors
from fedbucket.server.config import FederationConfig, check_task
from fedbucket.server.rounds import publish_model, set_current_model

if TYPE_CHECKING:  # the torch layer is imported when init runs, not when this module loads
    from fedbucket.torch.task import Examples


def init_federation(
    store: ObjectStore,
    config: FederationConfig,
    *,
    validation: Examples | None = None,
    test: Examples | None = None,
    layout: BucketLayout = LAYOUT,
) -> tuple[ModelManifest, bool]:
    """Initialise a federation: the server's splits (optional), the initial model, the pointer.

    ``validation`` gates promotion when ``gate.source`` is ``holdout`` or ``both`` (then it is
    required); ``test`` is only ever reported. A federation gated on federated evaluation needs
    neither: the server then holds no personal data at all. Idempotent: returns
    ``(manifest, False)`` when the federation is already initialised.
    """
    existing, _ = read_optional(store, layout.current_model, ModelPointer)
    if existing is not None:
        manifest, _ = read_document(store, layout.model_manifest(existing.version), ModelManifest)
        return manifest, False
    from fedbucket.torch.task import load_task
    from fedbucket.torch.training import state_dict_to_numpy

    check_task(config.model, config.training)
    task = load_task(config.model.task)
    if config.gate.source in ("holdout", "both") and validation is None:
        raise ConfigError(
            f'gate.source = "{config.gate.source}" compares models on the server\'s validation split, but none was '
            'given; give one, or gate on the clients\' scores with gate.source = "federated"'
        )
    model = task.build_model(config.model, seed=config.seed)
    for label, split in (("validation", validation), ("test", test)):
        if split is None:
            continue
        if not len(split):
            raise ConfigError(f"the {label} split is empty")
        if split.y.min() < 0 or split.y.max() >= task.num_classes:
            raise ConfigError(f"the {label} split has labels outside 0..{task.num_classes - 1} (task {task.name!r})")
        task.score(model, split.subset(slice(0, 8)))  # a few rows: a split the task cannot read fails here
    tensors = state_dict_to_numpy(model)
    with tempfile.TemporaryDirectory() as tmp:
        for name, split in ((layout.validation_split, validation), (layout.test_split, test)):
            if split is not None:
                path = Path(tmp) / Path(name).name
                save_tensors(split.as_tensors(), path)
                store.upload_file(name, path)
    manifest = publish_model(store, tensors, version="init", model=config.model, layout=layout)
    set_current_model(store, manifest, expected_generation=0)
    return manifest, True
