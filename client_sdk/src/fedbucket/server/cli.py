"""The server command of the ``fedbucket`` CLI: ``init`` (create a federation in a bucket)."""

from __future__ import annotations

import argparse

from fedbucket.protocol.errors import ConfigError
from fedbucket.protocol.storage import open_store
from fedbucket.protocol.tensors import load_tensors
from fedbucket.server.config import FederationConfig
from fedbucket.server.initialise import init_federation


def cmd_init(args: argparse.Namespace) -> int:
    """Initialise a federation: initial model, hold-out split, empty round state (idempotent)."""
    config = FederationConfig.load(args.config)
    bucket = args.bucket or config.bucket
    if args.holdout:
        holdout = load_tensors(args.holdout)
        if set(holdout) != {"x", "y"}:
            raise ConfigError(f"--holdout {args.holdout} must hold exactly two tensors, x and y")
    else:
        from fedbucket.sim.datasets import digits_holdout  # the demo's default; needs scikit-learn

        holdout = digits_holdout(config.seed, config.holdout_fraction)
    store = open_store(bucket, create=True, retry_timeout=args.timeout)
    manifest, created = init_federation(store, config, holdout=holdout)
    if created:
        print(f"initialised {bucket}: model {manifest.version} ({config.model.name}, {manifest.size_bytes} bytes)")
        print("wrote the hold-out split; no round is open yet")
    else:
        print(f"{bucket} is already initialised (current model {manifest.version}); nothing changed")
    return 0
