"""What both fedbucket Spark jobs share: the session and the engine that maps work over executors.

Uses only SparkContext ``parallelize``/``map``/``collect``, which behave the same on Spark 3.5
(Dataproc 2.2/2.3 images) and Spark 4.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

T = TypeVar("T")
R = TypeVar("R")


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)


def spark_session(app_name: str) -> SparkSession:
    from pyspark.sql import SparkSession

    return (
        SparkSession.builder.appName(app_name)
        .config("spark.sql.ansi.enabled", "false")  # explicit: the default differs between Spark 3.5 and 4
        .config("spark.driver.maxResultSize", "4g")
        .config("spark.python.worker.reuse", "true")
        .getOrCreate()
    )


#: Spark tasks per core. PySpark's fixed cost per task (~85 ms measured on local[2]) makes one
#: task per shard slower than a few tasks that each work through several shards.
TASKS_PER_CORE = 2


def spark_engine(spark_context) -> Callable[[Callable[[T], R], Sequence[T]], list[R]]:  # noqa: ANN001
    """An engine for fedbucket's ``run_aggregation``/``run_evaluation``: maps ``func`` over the items
    in ``TASKS_PER_CORE`` tasks per core (each task takes a contiguous run of items) and returns
    the results in item order."""

    def run(func: Callable[[T], R], items: Sequence[T]) -> list[R]:
        items = list(items)
        if not items:
            return []
        slices = min(len(items), max(1, spark_context.defaultParallelism * TASKS_PER_CORE))
        return spark_context.parallelize(items, numSlices=slices).map(func).collect()

    return run
