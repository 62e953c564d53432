"""PySpark job: evaluate a round's candidate against its base model, from every source present.

    spark-submit --master 'local[*]' spark_jobs/evaluate.py --bucket file:///srv/federation --round R

The server's validation split (both models) and test split (the candidate, reported only), if
the federation has them, are cut into row ranges, one Spark task each; every task reads its rows
and the models from the bucket and returns per-class counts and loss sums that the driver adds up.
The clients' scores frozen by the evaluation wait, if any, are pooled after trimming. Writes
``rounds/<round>/evaluation.json``. The task package named by the candidate's ``model.task`` must
be importable on the driver and the executors. Exit status: 0 written, 2 bad arguments, 1 failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _spark import configure_logging, spark_engine, spark_session

log = logging.getLogger("fedbucket.evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bucket", required=True, help="federation URL: gs://bucket/prefix or file:///dir")
    parser.add_argument("--round", required=True, dest="round_id", help="round id")
    parser.add_argument("--rows-per-task", type=int, default=4096, help="split rows per Spark task")
    parser.add_argument(
        "--metric",
        choices=["accuracy", "macro_f1", "loss"],
        default="accuracy",
        help="the gate metric: federated trimming ranks client reports by it (default: accuracy)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    from fedbucket.protocol.documents import AggregationReport, read_optional
    from fedbucket.protocol.layout import LAYOUT
    from fedbucket.protocol.storage import open_store
    from fedbucket.server.evaluation import run_evaluation

    store = open_store(args.bucket)
    aggregation, _ = read_optional(store, LAYOUT.aggregation_report(args.round_id), AggregationReport)
    if aggregation is not None and aggregation.status == "below_quorum":
        log.info("round %s is below quorum (no candidate): nothing to evaluate", args.round_id)
        return 0

    if not (store.exists(LAYOUT.validation_split) or store.exists(LAYOUT.test_split)):
        log.info("no validation or test split on the server: pooling the clients' scores only (no Spark)")
        run_evaluation(store, args.round_id, metric=args.metric, log=log.info)
        return 0
    spark = spark_session(f"fedbucket-evaluate-{args.round_id}")
    try:
        run_evaluation(
            store,
            args.round_id,
            metric=args.metric,
            engine=spark_engine(spark.sparkContext),
            rows_per_task=args.rows_per_task,
            log=log.info,
        )
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
