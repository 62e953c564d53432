"""The server commands of the ``fedbucket`` CLI: ``init`` (create a federation in a bucket)."""

from __future__ import annotations

import argparse

from fedbucket.protocol.storage import open_store
from fedbucket.protocol.tensors import load_tensors
from fedbucket.server.config import FederationConfig, check_task
from fedbucket.server.initialise import init_federation


def cmd_init(args: argparse.Namespace) -> int:
    """Initialise a federation: initial model, the server's splits (if any), empty round state."""
    from fedbucket.torch.task import example_split, examples_from, load_task

    config = FederationConfig.load(args.config)
    bucket = args.bucket or config.bucket
    check_task(
        config.model, config.training
    )  # before anything is read or written: a task that cannot import is one line
    task = load_task(config.model.task)
    validation = examples_from(load_tensors(args.validation)) if args.validation else None
    test = examples_from(load_tensors(args.test)) if args.test else None
    source = "given files"
    if validation is None and test is None and not args.no_splits and config.gate.source != "federated":
        if task.example_data is None:
            source = "none"
        else:  # the task's own example data (the demo's digits), split as `fedbucket simulate` splits it
            _, validation, test = example_split(task, seed=config.seed, holdout_fraction=config.holdout_fraction)
            source = f"task {task.name!r} example data (seed {config.seed}, held out {config.holdout_fraction:g})"
    store = open_store(bucket, create=True, retry_timeout=args.timeout)
    manifest, created = init_federation(store, config, validation=validation, test=test)
    if created:
        print(
            f"initialised {bucket}: model {manifest.version} "
            f"({task.name}/{config.model.name}, {manifest.size_bytes} bytes)"
        )
        splits = [
            f"{label} {len(split)} examples" for label, split in (("validation", validation), ("test", test)) if split
        ]
        held = f"server splits from {source}: {', '.join(splits)}" if splits else "the server holds no evaluation data"
        print(f"{held}; the gate uses {config.gate.source} figures; no round is open yet")
    else:
        print(f"{bucket} is already initialised (current model {manifest.version}); nothing changed")
    return 0
