"""PySpark job: aggregate one federated round, then evaluate its candidate, in ONE Spark application.

    spark-submit --master 'local[*]' spark_jobs/aggregate_evaluate.py \\
        --bucket file:///srv/federation --round 20261125T120000Z --strategy fedavg --metric accuracy

The same work as ``aggregate.py`` followed by ``evaluate.py`` (the same library calls,
:func:`~fedbucket.server.aggregation.run_aggregation` then
:func:`~fedbucket.server.evaluation.run_evaluation`, on the same engine), in one session: one JVM
start, one SparkContext, Python workers reused from the aggregation by the evaluation. For a small
model those fixed costs are most of a round (docs/benchmarks.md, "Round overhead"), and on
Dataproc it is one job instead of two. The DAG runs it when nothing happens between aggregation
and evaluation (``[gate] source = "holdout"``); with federated evaluation the clients score the
candidate in between, so the two jobs stay apart.

Arguments: every argument of ``aggregate.py`` (its own parser, so they cannot drift apart), plus
``evaluate.py``'s ``--metric`` and ``--rows-per-task``.

Exit status: 0 candidate written and evaluated; 3 below quorum (aggregation report written, no
candidate, nothing evaluated; ``--below-quorum-exit-code`` changes it); 2 bad arguments; 1 any
other failure (an evaluation failure after a written candidate included: a re-run recomputes the
same candidate bit for bit and evaluates it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

# spark-submit runs this file as a script: make its sibling modules importable on the driver.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import aggregate as aggregate_job

from _spark import configure_logging, spark_engine, spark_session

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BELOW_QUORUM = 0, 1, 2, 3

log = logging.getLogger("fedbucket.aggregate_evaluate")


def build_parser() -> argparse.ArgumentParser:
    """``aggregate.py``'s parser plus the evaluation's two options."""
    parser = aggregate_job.build_parser()
    parser.prog = "aggregate_evaluate.py"
    parser.description = "Aggregate one fedbucket round, then evaluate its candidate, in one Spark application."
    parser.epilog = (
        "exit status: 0 candidate written and evaluated, 3 below quorum (report written, no candidate), "
        "2 bad arguments, 1 failure"
    )
    parser.add_argument(
        "--metric",
        choices=["accuracy", "macro_f1", "loss"],
        default="accuracy",
        help="the gate metric (as evaluate.py's --metric)",
    )
    parser.add_argument("--rows-per-task", type=int, default=4096, help="split rows per Spark task (evaluation)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError

    from fedbucket.protocol.documents import RoundTask, describe_validation_error, read_document
    from fedbucket.protocol.errors import ConfigError
    from fedbucket.protocol.layout import LAYOUT
    from fedbucket.protocol.storage import open_store
    from fedbucket.server.aggregation import run_aggregation
    from fedbucket.server.config import AggregationSettings, PrivacySettings, check_aggregation
    from fedbucket.server.evaluation import run_evaluation
    from fedbucket.server.privacy import load_noise_key
    from fedbucket.server.strategies import build_strategy

    # The argument checks of aggregate.py's main, in the same order and with the same exits: a bad
    # argument exits 2 before any session starts. (Kept in step with aggregate.py by
    # tests/test_round_job.py, which runs both jobs on the same round.)
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
        return EXIT_USAGE
    except ValueError as exc:  # ConfigError is a ValueError
        log.error("%s", exc)
        return EXIT_USAGE

    spark = spark_session(f"fedbucket-round-{args.round_id}")
    spark_context = spark.sparkContext
    engine = spark_engine(spark_context)
    try:
        try:
            report = run_aggregation(
                store,
                args.round_id,
                strategy,
                engine=engine,
                min_clients=args.min_clients,
                shard_elements=args.shard_elements,
                engine_info={"spark_version": spark.version, "master": spark_context.master},
                privacy=privacy,
                noise_key=noise_key,
                log=log.info,
            )
        except ConfigError as exc:  # e.g. a trimmed mean whose beta leaves nothing for this many clients
            log.error("%s", exc)
            return EXIT_USAGE
        if report.status != "aggregated":
            log.info("round %s: no candidate (%s): nothing to evaluate", args.round_id, report.status)
            return args.below_quorum_exit_code
        # the same session: no second JVM, and the aggregation's Python workers take the evaluation's tasks
        run_evaluation(
            store, args.round_id, metric=args.metric, engine=engine, rows_per_task=args.rows_per_task, log=log.info
        )
    finally:
        spark.stop()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
