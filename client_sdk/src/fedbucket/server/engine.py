"""The engine: how the server maps work over many workers.

:func:`~fedbucket.server.aggregation.run_aggregation` and
:func:`~fedbucket.server.evaluation.run_evaluation` are written against this one type, so the same
code runs in-process (:func:`serial_engine`, tests and benchmarks) and on Spark (``spark_jobs/_spark.py``
passes an engine that maps over executors).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
Engine = Callable[[Callable[[T], R], Sequence[T]], list[R]]
"""Runs ``func`` over ``items`` and returns the results in item order. The Spark jobs pass a Spark
engine (a few tasks per core, each working through a run of items); :func:`serial_engine` runs
in-process."""


def serial_engine(func: Callable[[T], R], items: Sequence[T]) -> list[R]:
    return [func(item) for item in items]
