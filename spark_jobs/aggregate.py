"""PySpark job: aggregate one federated round into a candidate model.

    spark-submit --master 'local[*]' spark_jobs/aggregate.py \\
        --bucket file:///srv/federation --round 20261125T120000Z --strategy fedavg

Runs unchanged on Spark 3.5 (Dataproc 2.2/2.3 images) and Spark 4: it uses only SparkContext
``parallelize``/``map``/``collect``. Objects are read with fedbucket's own store inside the
executors (the Python GCS client for gs://), so no Hadoop GCS connector is needed.

Two Spark stages (a few tasks per core, each working through a run of items):
1. validate every update the round closed with (streaming, in the executors);
2. aggregate shard by shard ((tensor, element range) shards: every accepted update's slice is read
   and combined on the executor; only the finished slice goes to the driver).

Exit status: 0 candidate written; 3 below quorum (report written, no candidate); 2 bad arguments;
1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# spark-submit runs this file as a script: make its sibling module importable on the driver.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _spark import configure_logging, spark_engine, spark_session

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from fedbucket.protocol.documents import AggregationReport
    from fedbucket.protocol.storage import ObjectStore
    from fedbucket.server.config import PrivacySettings
    from fedbucket.server.strategies import Strategy

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BELOW_QUORUM = 0, 1, 2, 3

log = logging.getLogger("fedbucket.aggregate")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aggregate.py",
        description="Aggregate one fedbucket round into rounds/<round>/candidate/ (see docs/aggregation.md).",
        epilog="exit status: 0 candidate written, 3 below quorum (report written, no candidate), "
        "2 bad arguments, 1 failure",
    )
    parser.add_argument("--bucket", required=True, help="federation URL: gs://bucket/prefix or file:///dir")
    parser.add_argument("--round", required=True, dest="round_id", help="round id")
    parser.add_argument("--strategy", default="fedavg", help="fedavg, fedavgm, fedadagrad, fedadam, fedyogi, ...")
    parser.add_argument(
        "--strategy-options", default="{}", help="JSON object of strategy options, e.g. '{\"clip_norm\": 5.0}'"
    )
    parser.add_argument(
        "--privacy",
        default=None,
        help="JSON object of [privacy] settings (docs/privacy.md); with dp on, the secret noise key is read from "
        "the FEDBUCKET_DP_KEY environment variable, else from the Secret Manager version in key_secret (never an "
        "argument: job arguments are visible)",
    )
    parser.add_argument("--min-clients", type=positive, default=None, help="quorum (default: the round task's)")
    parser.add_argument("--shard-elements", type=positive, default=None, help="elements per shard (default: auto)")
    parser.add_argument(
        "--below-quorum-exit-code",
        type=int,
        default=EXIT_BELOW_QUORUM,
        help="exit status when below quorum (Dataproc reports any non-zero exit as a failed job, so the DAG "
        "passes 0 there and reads the report instead)",
    )
    return parser


@dataclass(frozen=True)
class AggregationJob:
    """What the arguments resolved to, before any Spark session starts."""

    store: ObjectStore
    strategy: Strategy
    privacy: PrivacySettings | None
    noise_key: bytes | None


def prepare(args: argparse.Namespace) -> AggregationJob | None:
    """Check the arguments (strategy and its options, privacy settings, the DP noise key); None
    after logging the reason when one is bad (exit 2, before any session starts)."""
    from pydantic import ValidationError

    from fedbucket.protocol.documents import RoundTask, describe_validation_error, read_document
    from fedbucket.protocol.layout import LAYOUT
    from fedbucket.protocol.storage import open_store
    from fedbucket.server.config import AggregationSettings, PrivacySettings, check_aggregation
    from fedbucket.server.privacy import load_noise_key
    from fedbucket.server.strategies import build_strategy

    try:
        store = open_store(args.bucket)
        options = json.loads(args.strategy_options)
        if not isinstance(options, dict):
            raise ValueError("--strategy-options must be a JSON object")
        strategy = build_strategy(args.strategy, options)
        privacy = PrivacySettings.model_validate_json(args.privacy) if args.privacy else None
        noise_key = None
        if privacy is not None and privacy.dp:
            check_aggregation(AggregationSettings(strategy=args.strategy, options=options), privacy)
            task, _ = read_document(store, LAYOUT.round_task(args.round_id), RoundTask)
            if task.secure_aggregation is None:  # central DP: the server adds the noise (distributed: clients did)
                noise_key = load_noise_key(secret=privacy.key_secret)
    except ValidationError as exc:
        log.error("--privacy: %s", describe_validation_error(exc))
        return None
    except ValueError as exc:  # ConfigError is a ValueError
        log.error("%s", exc)
        return None
    return AggregationJob(store, strategy, privacy, noise_key)


def aggregate(job: AggregationJob, args: argparse.Namespace, spark: SparkSession) -> AggregationReport | None:
    """Run the round's aggregation on ``spark``; None after logging a configuration the round
    refuses (e.g. a trimmed mean whose beta leaves nothing for this many clients: exit 2)."""
    from fedbucket.protocol.errors import ConfigError
    from fedbucket.server.aggregation import run_aggregation

    try:
        return run_aggregation(
            job.store,
            args.round_id,
            job.strategy,
            engine=spark_engine(spark.sparkContext),
            min_clients=args.min_clients,
            shard_elements=args.shard_elements,
            engine_info={"spark_version": spark.version, "master": spark.sparkContext.master},
            privacy=job.privacy,
            noise_key=job.noise_key,
            log=log.info,
        )
    except ConfigError as exc:
        log.error("%s", exc)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    job = prepare(args)
    if job is None:
        return EXIT_USAGE
    spark = spark_session(f"fedbucket-aggregate-{args.round_id}")
    try:
        report = aggregate(job, args, spark)
    finally:
        spark.stop()
    if report is None:
        return EXIT_USAGE
    return EXIT_OK if report.status == "aggregated" else args.below_quorum_exit_code


if __name__ == "__main__":
    sys.exit(main())
