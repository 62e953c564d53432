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
    job = aggregate_job.prepare(args)  # aggregate.py's checks: a bad argument exits 2 before any session
    if job is None:
        return EXIT_USAGE
    from fedbucket.server.evaluation import run_evaluation

    spark = spark_session(f"fedbucket-round-{args.round_id}")
    try:
        report = aggregate_job.aggregate(job, args, spark)
        if report is None:
            return EXIT_USAGE
        if report.status != "aggregated":
            log.info("round %s: no candidate (%s): nothing to evaluate", args.round_id, report.status)
            return args.below_quorum_exit_code
        # the same session: no second JVM, and the aggregation's Python workers take the evaluation's tasks
        run_evaluation(
            job.store,
            args.round_id,
            metric=args.metric,
            engine=spark_engine(spark.sparkContext),
            rows_per_task=args.rows_per_task,
            log=log.info,
        )
    finally:
        spark.stop()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
