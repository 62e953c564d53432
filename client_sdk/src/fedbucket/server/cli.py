"""The server commands of the ``fedbucket`` CLI: ``init`` (create a federation in a bucket) and
``report`` (what its rounds did, as markdown or one HTML file)."""

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


def cmd_report(args: argparse.Namespace) -> int:
    """Markdown on stdout, or a self-contained HTML file (``--html``), of the chosen rounds."""
    from pathlib import Path

    from fedbucket.protocol.errors import ConfigError
    from fedbucket.server.federation import FederationView
    from fedbucket.server.report_html import report_file, report_markdown

    if not args.bucket:
        raise ConfigError("--bucket is required (or set FEDBUCKET_BUCKET)")
    view = FederationView(open_store(args.bucket))
    rounds = [r.round_id for r in view.rounds()]
    if args.round_id is not None:
        if args.round_id not in rounds:
            raise ConfigError(f"round {args.round_id!r} has no report in {args.bucket} ({len(rounds)} rounds do)")
        rounds = [args.round_id]
    elif args.last is not None:
        if args.last < 1:
            raise ConfigError("--last must be at least 1")
        rounds = rounds[-args.last :]
    if args.html:
        Path(args.html).write_text(report_file(view, rounds), encoding="utf-8")
        print(f"wrote {Path(args.html).resolve()} ({len(rounds)} round(s))")
    else:
        print(report_markdown(view, rounds), end="")
    return 0
