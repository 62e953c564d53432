"""Operators: one step of a federated round each."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowException, AirflowSkipException

from fedbucket.config import FederationConfig
from fedbucket.errors import PreconditionFailed
from fedbucket.federation import open_round, promote_candidate, read_document, read_optional, write_document
from fedbucket.layout import LAYOUT
from fedbucket.schemas import (
    AggregationReport,
    EvaluationReport,
    ModelManifest,
    RoundClosing,
    RoundReport,
    RoundTask,
    TrainingConfig,
    UpdateVerdict,
    utcnow,
)
from fedbucket_airflow.dataproc import cluster_name_for
from fedbucket_airflow.hooks import FederationHook
from fedbucket_airflow.rounds import effective_settings, round_id_for


class OpenRoundOperator(BaseOperator):
    """Publish the round task (base = current model) and point ``rounds/current.json`` at it.

    Idempotent: a re-run finds the task written by the first run and changes nothing; the round
    pointer never moves back to an older round. Returns ``{"round_id", "settings"}`` for the
    downstream steps (settings = the config overridden by the run's params).
    """

    def __init__(self, *, config_path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config_path = config_path

    def execute(self, context: Context) -> dict[str, Any]:
        config = FederationConfig.load(self.config_path)
        dag_run = context["dag_run"]
        params = dict(context["params"])
        round_id = round_id_for(dag_run.logical_date, dag_run.run_after, params.get("round_id"))
        settings = effective_settings(config, params)
        store = FederationHook(settings["bucket"]).store
        task = open_round(
            store,
            round_id=round_id,
            opened_at=utcnow(),
            deadline_seconds=settings["round"]["deadline_seconds"],
            training=TrainingConfig.model_validate(settings["training"]),
            min_clients=settings["round"]["min_clients"],
            max_clients=settings["round"]["max_clients"],
            max_update_norm=settings["round"]["max_update_norm"],
        )
        self.log.info(
            "round %s open: base model %s, deadline %s, quorum %d, training %s",
            round_id, task.base_model_version, task.deadline.isoformat(), task.min_clients, task.training,
        )  # fmt: skip
        context["ti"].xcom_push(key="round_id", value=round_id)
        context["ti"].xcom_push(key="cluster_name", value=cluster_name_for(round_id, dag_run.run_id))
        context["ti"].xcom_push(key="settings", value=settings)
        return {"round_id": round_id, "settings": settings}


class LocalSparkSubmitOperator(BaseOperator):
    """Run a fedbucket Spark job with ``spark-submit`` on this machine (``local[*]`` by default).

    The job's output goes to the task log line by line. Exit codes in ``skip_exit_codes`` skip the
    task (the aggregation job exits 3 when a round is below quorum); any other non-zero exit fails it.

    :param application: path of the PySpark job.
    :param application_args: its arguments (templated).
    :param master: Spark master URL.
    :param driver_memory: the driver's heap (the candidate's slices are collected there).
    :param spark_submit: the spark-submit to run (default: the one next to this Python).
    """

    template_fields: Sequence[str] = ("application_args",)

    def __init__(
        self,
        *,
        application: str,
        application_args: list[str],
        master: str = "local[*]",
        driver_memory: str = "2g",
        spark_submit: str | None = None,
        skip_exit_codes: Sequence[int] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.application = application
        self.application_args = application_args
        self.master = master
        self.driver_memory = driver_memory
        self.spark_submit = spark_submit
        self.skip_exit_codes = tuple(skip_exit_codes)
        self._process: subprocess.Popen[str] | None = None

    def on_kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self.log.info("stopping spark-submit (pid %d)", self._process.pid)
            self._process.terminate()

    def execute(self, context: Context) -> None:
        spark_submit = self.spark_submit or str(Path(sys.executable).parent / "spark-submit")
        command = [
            spark_submit, "--master", self.master, "--driver-memory", self.driver_memory,
            "--conf", "spark.ui.showConsoleProgress=false",
            self.application, *map(str, self.application_args),
        ]  # fmt: skip
        env = {
            **os.environ,
            "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable),
            "PYSPARK_DRIVER_PYTHON": os.environ.get("PYSPARK_DRIVER_PYTHON", sys.executable),
            "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"),
        }
        self.log.info("running %s", " ".join(command))
        with subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as process:
            self._process = process
            assert process.stdout is not None
            for line in process.stdout:
                self.log.info("%s", line.rstrip())
        if process.returncode in self.skip_exit_codes:
            raise AirflowSkipException(f"{Path(self.application).name} exited {process.returncode}: skipping")
        if process.returncode != 0:
            raise AirflowException(f"{Path(self.application).name} failed with exit code {process.returncode}")


def gate_decision(evaluation: EvaluationReport, metric: str, tolerance: float) -> tuple[bool, str]:
    """Whether the candidate may replace the current model, and why (deterministic text)."""
    candidate, current = evaluation.candidate, evaluation.current
    if not candidate.finite or not all(math.isfinite(getattr(candidate, m)) for m in ("accuracy", "macro_f1")):
        return False, "candidate metrics are not finite"
    new, old = getattr(candidate, metric), getattr(current, metric)
    passed = new <= old + tolerance if metric == "loss" else new >= old - tolerance
    relation = "within" if passed else "outside"
    return passed, f"candidate {metric} {new:.4f} vs current {old:.4f}: {relation} the tolerance {tolerance:g}"


class PromoteCandidateOperator(BaseOperator):
    """Apply the gate to the evaluation and, if it passes, promote the candidate (compare-and-swap).

    Returns ``{"promoted": bool, "message": str}``. A candidate built on a model that is no longer
    current (a re-run of an old round) is never promoted over the newer model.
    """

    template_fields: Sequence[str] = ("round_id", "settings")

    def __init__(self, *, bucket: str, round_id: str, settings: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bucket = bucket
        self.round_id = round_id
        self.settings = settings

    def execute(self, context: Context) -> dict[str, Any]:
        store = FederationHook(self.bucket).store
        aggregation, _ = read_optional(store, LAYOUT.aggregation_report(self.round_id), AggregationReport)
        if aggregation is not None and aggregation.status == "below_quorum":
            raise AirflowSkipException(f"round {self.round_id} is below quorum after validation: nothing to promote")
        evaluation, _ = read_document(store, LAYOUT.evaluation_report(self.round_id), EvaluationReport)
        gate = self.settings["gate"]
        passed, message = gate_decision(evaluation, gate["metric"], float(gate["tolerance"]))
        if not passed:
            self.log.info("gate refused the candidate: %s", message)
            return {"promoted": False, "message": f"gate refused: {message}"}
        try:
            manifest = promote_candidate(store, self.round_id)
        except PreconditionFailed as exc:
            self.log.warning("not promoted: %s", exc)
            return {"promoted": False, "message": f"superseded: {exc}"}
        self.log.info("promoted %s (sha256 %s): %s", manifest.version, manifest.sha256[:12], message)
        return {"promoted": True, "message": f"promoted: {message}"}


class RoundReportOperator(BaseOperator):
    """Write ``rounds/<round>/report.json`` from what the round left in the bucket, and log a summary.

    Runs when upstream steps succeeded or were skipped (trigger rule ``none_failed``), so an
    abandoned round gets its report too; a failed step fails the run instead.
    """

    template_fields: Sequence[str] = ("round_id",)

    def __init__(self, *, bucket: str, round_id: str, promotion_task_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bucket = bucket
        self.round_id = round_id
        self.promotion_task_id = promotion_task_id

    def execute(self, context: Context) -> dict[str, Any]:
        store = FederationHook(self.bucket).store
        promotion = context["ti"].xcom_pull(task_ids=self.promotion_task_id) if self.promotion_task_id else None
        report = build_round_report(store, self.round_id, promotion if isinstance(promotion, dict) else None)
        write_document(store, LAYOUT.round_report(self.round_id), report)
        for line in summary_lines(report):
            self.log.info("%s", line)
        return {"status": report.status, "report": f"{store.url}/{LAYOUT.round_report(self.round_id)}"}


def build_round_report(store: Any, round_id: str, promotion: dict[str, Any] | None) -> RoundReport:
    task, _ = read_document(store, LAYOUT.round_task(round_id), RoundTask)
    closing, _ = read_optional(store, LAYOUT.round_closing(round_id), RoundClosing)
    aggregation, _ = read_optional(store, LAYOUT.aggregation_report(round_id), AggregationReport)
    evaluation, _ = read_optional(store, LAYOUT.evaluation_report(round_id), EvaluationReport)
    candidate, _ = read_optional(store, LAYOUT.candidate_manifest(round_id), ModelManifest)
    published, _ = read_optional(store, LAYOUT.model_manifest(round_id), ModelManifest)
    if aggregation is not None:
        updates = list(aggregation.updates)
    elif closing is not None:  # abandoned at the close: the on-time updates were never validated
        updates = [
            UpdateVerdict(
                client_id=u.manifest.client_id,
                accepted=False,
                code="not_aggregated",
                reason="the round closed below its quorum; the update was not validated or used",
                num_examples=u.manifest.num_examples,
                committed_at=u.committed_at,
            )
            for u in closing.updates
        ] + list(closing.late)
    else:
        updates = []
    metrics: dict[str, Any] = {}
    if evaluation is not None:
        metrics = {"candidate": evaluation.candidate.model_dump(), "current": evaluation.current.model_dump()}
    if closing is None:
        status, message = "failed", "the round never closed"
    elif closing.reason == "below_quorum" or (aggregation is not None and aggregation.status == "below_quorum"):
        valid = sum(1 for u in updates if u.accepted)
        status = "abandoned"
        message = f"abandoned: {len(closing.updates)} update(s) by the close, {valid} valid; quorum not reached"
    elif candidate is None or evaluation is None:
        status, message = "failed", "no candidate or no evaluation"
    elif published is not None and published.sha256 == candidate.sha256:
        status = "promoted"
        message = (promotion or {}).get("message", "promoted")
    else:
        status = "rejected"
        message = (promotion or {}).get("message", "not promoted")
    return RoundReport(
        round_id=round_id,
        status=status,
        base_model_version=task.base_model_version,
        candidate_sha256=candidate.sha256 if candidate else None,
        promoted_version=round_id if status == "promoted" else None,
        message=message,
        updates=updates,
        metrics=metrics,
    )


def summary_lines(report: RoundReport) -> list[str]:
    """The human summary of a round for the task log."""
    accepted = [u for u in report.updates if u.accepted]
    rejected = [u for u in report.updates if not u.accepted]
    lines = [
        f"round {report.round_id}: {report.status.upper()} — {report.message}",
        f"  base model {report.base_model_version}; {len(accepted)} update(s) accepted, {len(rejected)} rejected",
    ]
    lines += [f"  ACCEPT {u.client_id:16s} {u.num_examples:6d} examples  weight {u.weight:.3f}" for u in accepted]
    lines += [f"  REJECT {u.client_id:16s} {u.code}: {u.reason}" for u in rejected]
    if report.metrics:
        for label in ("current", "candidate"):
            m = report.metrics[label]
            lines.append(
                f"  {label:9s} {m['version']}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
                f"loss {m['loss']:.4f}"
            )
    return lines


__all__ = [
    "LocalSparkSubmitOperator",
    "OpenRoundOperator",
    "PromoteCandidateOperator",
    "RoundReportOperator",
    "gate_decision",
]
