"""The ``fedbucket simulate`` command: a federation of simulated client processes."""

from __future__ import annotations

import argparse

from fedbucket.protocol.errors import ConfigError
from fedbucket.sim.simulation import SimulationConfig, simulate


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run the simulated clients; exit 1 if any of them hit an error."""
    if args.clients < 1 or args.rounds < 1 or args.alpha <= 0 or not 0 <= args.dropout <= 1:
        raise ConfigError("need --clients >= 1, --rounds >= 1, --alpha > 0 and 0 <= --dropout <= 1")
    if not 0 < args.holdout_fraction < 1:
        raise ConfigError("need 0 < --holdout-fraction < 1")
    if not args.bucket:
        raise ConfigError("--bucket is required (or set FEDBUCKET_BUCKET)")
    config = SimulationConfig(
        bucket_url=args.bucket,
        clients=args.clients,
        rounds=args.rounds,
        partition=args.partition,
        alpha=args.alpha,
        seed=args.seed,
        dropout=args.dropout,
        stragglers=args.stragglers,
        hostile=args.hostile,
        poll_interval=args.poll_interval,
        round_timeout=args.round_timeout,
        cache_dir=args.cache_dir,
        task=args.task,
        data=args.data,
        holdout_fraction=args.holdout_fraction,
    )
    summary = simulate(config)  # impossible roles or partitions raise ConfigError (exit 2)
    return 0 if summary.counts().get("error", 0) == 0 else 1
