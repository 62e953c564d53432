"""The round's Spark jobs as Dataproc job specs (for the provider's DataprocSubmitJobOperator)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any


def cluster_name_for(round_id: str, run_id: str) -> str:
    """A Dataproc cluster name unique to one DAG run of one round (a clear-and-rerun reuses it).

    Dataproc names: lowercase letters, digits and hyphens, starting with a letter, at most 51.
    """
    slug = re.sub(r"[^a-z0-9-]+", "-", round_id.lower()).strip("-")[:28]
    return f"fedbucket-{slug}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


def cluster_name_template(suffix: str = "") -> str:
    """The cluster name as a template: :func:`cluster_name_for` of the run's round id and run id
    (the DAG registers it as a user-defined macro), plus ``suffix`` (at most 4 characters: a run's
    second cluster)."""
    if len(suffix) > 4:
        raise ValueError("a cluster name suffix has at most 4 characters (names are at most 51)")
    return "{{ cluster_name_for(ti.xcom_pull(task_ids='publish')['round_id'], run_id) }}" + suffix


def pyspark_job(
    *,
    project_id: str,
    cluster_name: str,
    artifacts_root: str,
    job_file: str,
    args: list[str],
    labels: dict[str, str],
    modules: Sequence[str] = (),
) -> dict[str, Any]:
    """A Dataproc ``Job`` running one of ``spark_jobs/`` from the versioned artifacts.

    ``_spark.py`` is always shipped with it; ``modules`` are the other ``spark_jobs/`` files the
    job imports (``aggregate_evaluate.py`` takes ``aggregate.py``'s parser).
    """
    return {
        "reference": {"project_id": project_id},
        "placement": {"cluster_name": cluster_name},
        "labels": labels,
        "pyspark_job": {
            "main_python_file_uri": f"{artifacts_root}/spark_jobs/{job_file}",
            "python_file_uris": [f"{artifacts_root}/spark_jobs/{name}" for name in ("_spark.py", *modules)],
            "args": args,
        },
    }
