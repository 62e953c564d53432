"""Operators: one step of a federated round each. The logic lives in :mod:`fedbucket.server`;
these classes hold arguments, talk to Airflow and sequence the calls."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import Asset, BaseHook, BaseOperator, Context
from airflow.sdk.exceptions import (
    AirflowException,
    AirflowFailException,
    AirflowNotFoundException,
    AirflowSkipException,
)

from fedbucket.protocol.documents import (
    AggregationReport,
    EvaluationReport,
    ModelManifest,
    RoundReport,
    read_document,
    read_optional,
    utcnow,
    write_document,
)
from fedbucket.protocol.errors import ConfigError, FedbucketError, InvalidIdentifier, PreconditionFailed
from fedbucket.protocol.layout import LAYOUT
from fedbucket.protocol.storage import ObjectStore
from fedbucket.server.config import FederationConfig, RunSettings, check_task
from fedbucket.server.privacy import KEY_ENVIRONMENT, check_budget, parse_noise_key
from fedbucket.server.promotion import gate_decision, gate_figures, promote_candidate
from fedbucket.server.report import build_round_report, summary_lines
from fedbucket.server.rounds import current_model, open_round, request_evaluation, round_id_for
from fedbucket_airflow.hooks import FederationHook


def current_model_asset(bucket: str) -> Asset:
    """The Airflow Asset of a federation's current model: promotion emits an event on it, so a
    downstream DAG (export, serving, a canary) can be scheduled on new models."""
    return Asset(name=f"fedbucket-current-model:{bucket}", uri=f"{bucket.rstrip('/')}/{LAYOUT.current_model}")


class OpenRoundOperator(BaseOperator):
    """Resolve the run's settings, publish the round task (base = current model) and point
    ``rounds/current.json`` at it.

    Bad run parameters fail here, before any client works, and are not retried: an unknown
    ``--conf`` key, an invalid value, strategy options the strategy does not take. Idempotent: a
    re-run finds the task written by the first run and changes nothing; the round pointer never
    moves back to an older round. Returns the :class:`~fedbucket.server.config.RunSettings` as
    JSON: the one document every later step parses.

    :param config_path: the federation config (TOML).
    :param max_deadline_seconds: the longest round the DAG's wait step can wait for (its timeout);
        a run asking for a longer ``deadline_seconds`` is refused here rather than timing out later.
    """

    def __init__(
        self,
        *,
        config_path: str,
        max_deadline_seconds: float | None = None,
        gcp_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.config_path = config_path
        self.max_deadline_seconds = max_deadline_seconds
        self.gcp_conn_id = gcp_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        dag_run = context["dag_run"]
        params = dict(context["params"])
        try:
            config = FederationConfig.load(self.config_path)
            round_id = round_id_for(dag_run.logical_date, dag_run.run_after, params.get("round_id"))
            overrides = {**params, **(dag_run.conf or {})}  # conf keys without a Param are caught here
            run = RunSettings.resolve(config, round_id, overrides)
            longest = run.round.deadline_seconds + run.round.settle_seconds
            if self.max_deadline_seconds is not None and longest > self.max_deadline_seconds:
                raise ConfigError(
                    f"deadline_seconds {run.round.deadline_seconds:g} (+ settle {run.round.settle_seconds:g}) is "
                    f"longer than this DAG's wait step can wait ({self.max_deadline_seconds:g} s); raise "
                    "[round] deadline_seconds in the federation config to allow longer rounds"
                )
        except (ConfigError, InvalidIdentifier) as exc:
            raise AirflowFailException(f"invalid run parameters: {exc}") from None
        store = FederationHook(run.bucket, gcp_conn_id=self.gcp_conn_id).store
        self._check_recipe(store, run)
        try:  # before the round opens: no client trains for a round that would spend past the budget
            distributed = run.secure_aggregation.enabled  # dp under secure aggregation: the clients add noise
            spent = check_budget(store, run.round_id, run.privacy, distributed=distributed)
            if run.privacy.dp and not distributed and run.aggregation.engine == "local":  # the aggregate step's key
                parse_noise_key(
                    noise_key_from_connection(run.privacy.key_connection) or os.environ.get(KEY_ENVIRONMENT),
                    source=f"the Airflow connection {run.privacy.key_connection!r} (or {KEY_ENVIRONMENT})",
                )
        except ConfigError as exc:
            raise AirflowFailException(f"differential privacy: {exc}") from None
        if spent is not None:
            self.log.info(
                "differential privacy: epsilon %.3f at delta %g spent over %d round(s), budget %g; this round adds "
                "z=%g for its clients (at most %d rounds each)",
                spent.epsilon, spent.delta, spent.rounds, run.privacy.epsilon_budget,
                run.privacy.noise_multiplier, run.privacy.max_participations,
            )  # fmt: skip
        task = open_round(
            store,
            round_id=run.round_id,
            opened_at=utcnow(),
            deadline_seconds=run.round.deadline_seconds,
            training=run.training,
            min_clients=run.round.min_clients,
            max_clients=run.round.max_clients,
            max_update_norm=run.round.max_update_norm,
            max_examples_per_update=run.round.max_examples_per_update,
            federated_evaluation=run.federated_evaluation,
            secure_aggregation=run.secure_aggregation,
            settle_seconds=run.round.settle_seconds,
            distributed_dp=(run.privacy.noise_multiplier, run.aggregation_quorum)
            if run.privacy.dp and run.secure_aggregation.enabled
            else None,
        )
        self.log.info(
            "round %s open: base model %s, deadline %s, quorum %d, strategy %s %s, training %s",
            run.round_id, task.base_model_version, task.deadline.isoformat(), task.min_clients,
            run.aggregation.strategy, run.aggregation.options, task.training,
        )  # fmt: skip
        if task.secure_aggregation is not None:
            secure = task.secure_aggregation
            self.log.info(
                "secure aggregation: keys by %s, shares by %s, masked inputs by %s, unmasking by %s; updates "
                "clipped to %g, equal weights, at most %d clients, %s%s",
                secure.keys_deadline.isoformat(), secure.shares_deadline.isoformat(), task.deadline.isoformat(),
                secure.unmask_deadline.isoformat(), secure.clip_norm, secure.max_clients,
                f"{secure.degree} neighbours each (SecAgg+)" if secure.degree else "every client a neighbour",
                f"; distributed dp: each client adds discrete Gaussian noise of std {secure.noise_stddev:.4g} ring "
                f"units, sized for {secure.min_survivors} survivors" if secure.noise_stddev else "",
            )  # fmt: skip
        return run.model_dump(mode="json")

    @staticmethod
    def _check_recipe(store: ObjectStore, run: RunSettings) -> None:
        """The task of the model this round will train from (the current model's, which may differ
        from the config's after an edit) must import here and take the run's ``training.extra``:
        checked before the round opens, so no client trains on a recipe its task refuses. A re-run
        finds its round already open and checks nothing (the round stays as it was)."""
        if store.exists(LAYOUT.round_task(run.round_id)):
            return
        pointer, _ = current_model(store)
        manifest, _ = read_document(store, LAYOUT.model_manifest(pointer.version), ModelManifest)
        try:
            check_task(manifest.model, run.training)
        except ConfigError as exc:
            raise AirflowFailException(f"invalid run parameters: {exc}") from None


class RoundStepOperator(BaseOperator):
    """Base of the steps after publish: they take the run's settings (the publish step's XCom,
    templated) and talk to the federation's bucket through :class:`FederationHook`.

    :param settings: the run's settings from the publish step (templated).
    :param gcp_conn_id: see :class:`~fedbucket_airflow.hooks.FederationHook`.
    """

    template_fields: Sequence[str] = ("settings",)

    def __init__(self, *, settings: dict[str, Any] | str, gcp_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.gcp_conn_id = gcp_conn_id

    def run_and_store(self) -> tuple[RunSettings, ObjectStore]:
        """The run's settings (parsed after templating) and a store on its bucket."""
        run = RunSettings.model_validate(self.settings)
        return run, FederationHook(run.bucket, gcp_conn_id=self.gcp_conn_id).store


class RequestEvaluationOperator(RoundStepOperator):
    """Publish the round's candidate for federated evaluation: ``rounds/<round>/evaluation-task.json``
    (deadline, quorum, bounds from the run's ``[evaluation]`` settings) and the round pointer set
    to ``evaluating``, so clients score it on their own validation data. Idempotent.
    """

    def execute(self, context: Context) -> dict[str, Any]:
        from fedbucket.torch.task import task_for

        run, store = self.run_and_store()
        aggregation, _ = read_optional(store, LAYOUT.aggregation_report(run.round_id), AggregationReport)
        if aggregation is None or aggregation.status != "aggregated":
            raise AirflowSkipException(f"round {run.round_id} has no candidate: nothing to evaluate")
        candidate, _ = read_document(store, LAYOUT.candidate_manifest(run.round_id), ModelManifest)
        task = request_evaluation(
            store,
            run.round_id,
            run.evaluation,
            num_classes=task_for(candidate.model).num_classes,
            opened_at=utcnow(),
        )
        self.log.info(
            "round %s: candidate %s published for federated evaluation until %s (quorum %d, trim %g)",
            run.round_id, task.candidate_sha256[:12], task.deadline.isoformat(), task.min_reports, task.trim_fraction,
        )  # fmt: skip
        return {"deadline": task.deadline.isoformat(), "min_reports": task.min_reports}


def noise_key_from_connection(conn_id: str) -> str | None:
    """The differential-privacy noise key held as the password of an Airflow connection, if that
    connection exists and has one. Airflow masks a connection's password in task logs."""
    with contextlib.suppress(AirflowNotFoundException):
        return BaseHook.get_connection(conn_id).password or None
    return None


class LocalSparkSubmitOperator(BaseOperator):
    """Run a fedbucket Spark job with ``spark-submit`` on this machine (``local[*]`` by default).

    The job's output goes to the task log line by line. Exit codes in ``skip_exit_codes`` skip the
    task (the aggregation job exits 3 when a round is below quorum); those in ``fail_exit_codes``
    fail it without retries (2: a usage error, which no retry can fix); any other non-zero exit
    fails it with the DAG's retries.

    :param application: path of the PySpark job.
    :param application_args: its arguments (templated).
    :param master: Spark master URL.
    :param driver_memory: the driver's heap (the candidate's slices are collected there).
    :param spark_submit: the spark-submit to run (default: the one next to this Python).
    :param key_connection: an Airflow connection whose password is the differential-privacy noise key;
        passed to the job in its environment (``FEDBUCKET_DP_KEY``), never on its command line. If
        the connection does not exist the job inherits this process's ``FEDBUCKET_DP_KEY``, if any.
    :param class_data_cache: a directory for a class-data-sharing archive of the spark-submit JVM
        (the driver; in local mode the executors too). The first successful job writes it
        (``-XX:ArchiveClassesAtExit``, a slower run), later jobs map Spark's classes from it instead
        of loading them (about 3 s less per job here, out of ~11 s for a small round). The archive
        is named after the spark-submit and java it was made with; a stale one is ignored by the JVM.
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
        fail_exit_codes: Sequence[int] = (2,),
        key_connection: str | None = None,
        class_data_cache: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.key_connection = key_connection
        self.class_data_cache = class_data_cache
        self.application = application
        self.application_args = application_args
        self.master = master
        self.driver_memory = driver_memory
        self.spark_submit = spark_submit
        self.skip_exit_codes = tuple(skip_exit_codes)
        self.fail_exit_codes = tuple(fail_exit_codes)
        self._process: subprocess.Popen[str] | None = None

    def on_kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self.log.info("stopping spark-submit (pid %d)", self._process.pid)
            self._process.terminate()

    def _class_data(self, spark_submit: str) -> tuple[list[str], Path | None, Path | None]:
        """spark-submit options for the class-data-sharing archive, the file this run writes (if it
        makes the archive) and the archive's path."""
        if not self.class_data_cache:
            return [], None, None
        java_home = os.environ.get("JAVA_HOME")  # spark-submit runs $JAVA_HOME/bin/java if set, else java on PATH
        java = shutil.which("java", path=str(Path(java_home) / "bin")) if java_home else shutil.which("java")
        identity = [Path(p).resolve() for p in (spark_submit, java or "java")]
        key = hashlib.sha256(repr([(str(p), p.stat().st_mtime_ns if p.exists() else 0) for p in identity]).encode())
        directory = Path(self.class_data_cache).expanduser()
        archive = directory / f"spark-{key.hexdigest()[:16]}.jsa"
        if archive.is_file():
            return ["--driver-java-options", f"-XX:SharedArchiveFile={archive}"], None, archive
        directory.mkdir(parents=True, exist_ok=True)
        # written under a name of its own, renamed once complete: a concurrent job never maps a half-written one
        partial = directory / f".{archive.stem}.{uuid.uuid4().hex}.jsa"
        return ["--driver-java-options", f"-XX:ArchiveClassesAtExit={partial}"], partial, archive

    def execute(self, context: Context) -> None:
        spark_submit = self.spark_submit or str(Path(sys.executable).parent / "spark-submit")
        class_data, partial, archive = self._class_data(spark_submit)
        command = [
            spark_submit, "--master", self.master, "--driver-memory", self.driver_memory, *class_data,
            "--conf", "spark.ui.showConsoleProgress=false",
            self.application, *map(str, self.application_args),
        ]  # fmt: skip
        env = {
            **os.environ,
            "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable),
            "PYSPARK_DRIVER_PYTHON": os.environ.get("PYSPARK_DRIVER_PYTHON", sys.executable),
            "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"),
        }
        if self.key_connection and (key := noise_key_from_connection(self.key_connection)):
            env[KEY_ENVIRONMENT] = key  # else the job uses FEDBUCKET_DP_KEY from here, or says it is missing
        self.log.info("running %s", " ".join(command))
        with subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as process:
            self._process = process
            assert process.stdout is not None
            for line in process.stdout:
                self.log.info("%s", line.rstrip())
        if partial is not None and archive is not None:
            if process.returncode == 0 and partial.is_file():
                partial.replace(archive)
                self.log.info("class-data-sharing archive written: %s (later jobs start faster)", archive)
            partial.unlink(missing_ok=True)
        name = Path(self.application).name
        if process.returncode in self.skip_exit_codes:
            raise AirflowSkipException(f"{name} exited {process.returncode}: skipping")
        if process.returncode in self.fail_exit_codes:
            raise AirflowFailException(f"{name} refused its arguments (exit {process.returncode}); not retrying")
        if process.returncode != 0:
            raise AirflowException(f"{name} failed with exit code {process.returncode}")


class PromoteCandidateOperator(RoundStepOperator):
    """Apply the gate to the evaluation and, if it passes, promote the candidate.

    The task's state is the round's outcome where an operator looks: *success* means this task
    moved the model pointer to the round's candidate (and an event is emitted on the federation's
    current-model Asset, with the version and metrics as extra); *skipped* means it did not (the
    gate refused, the round was below quorum, another model became current first, or an earlier
    run already promoted it — the log and the round report say which). A storage failure fails
    the task (and is retried); its message goes to the round report.
    """

    def execute(self, context: Context) -> dict[str, Any]:
        run, store = self.run_and_store()
        aggregation, _ = read_optional(store, LAYOUT.aggregation_report(run.round_id), AggregationReport)
        if aggregation is not None and aggregation.status == "below_quorum":
            raise AirflowSkipException(f"round {run.round_id} is below quorum after validation: nothing to promote")
        if aggregation is not None and aggregation.privacy is not None:
            spent, budget = aggregation.privacy.spent.epsilon, run.privacy.epsilon_budget
            if spent > budget:  # the publish step refuses such rounds; this holds if its settings were bypassed
                raise AirflowSkipException(f"not promoted: epsilon {spent:.3f} is past the budget of {budget:g}")
        evaluation, _ = read_document(store, LAYOUT.evaluation_report(run.round_id), EvaluationReport)
        decision = gate_decision(evaluation, run.gate)
        if not decision.passed:
            raise AirflowSkipException(f"not promoted: the gate refused the candidate: {decision.message}")
        try:
            promotion = promote_candidate(store, run.round_id)
        except PreconditionFailed as exc:
            raise AirflowSkipException(f"not promoted: {exc}") from None
        except FedbucketError as exc:  # e.g. the pointer write failed: the report (teardown) quotes it
            context["ti"].xcom_push(key="error", value=str(exc))
            raise
        manifest: ModelManifest = promotion.manifest
        if not promotion.moved:  # a re-run: no new model, so no new Asset event either
            raise AirflowSkipException(f"{manifest.version} was promoted by an earlier run; nothing to do")
        self.log.info("promoted %s (sha256 %s): %s", manifest.version, manifest.sha256[:12], decision.message)
        figures = gate_figures(evaluation, run.gate)
        for asset in self.outlets:
            context["outlet_events"][asset].extra = {
                "version": manifest.version,
                "sha256": manifest.sha256,
                "round_id": run.round_id,
                "metrics": figures.model_dump(include={"accuracy", "macro_f1", "loss"}) if figures else {},
            }
        return {"promoted": manifest.version}


class RoundReportOperator(RoundStepOperator):
    """Write ``rounds/<round>/report.json`` from what the round left in the bucket, and log a summary.

    Meant as the DAG's teardown: it runs whatever happened upstream (a failed step gets a report
    with status ``failed`` naming the step), while the run's own state still follows the steps.
    The status follows the bucket (``promoted`` only if the pointer moved), never a task's say-so.
    """

    def execute(self, context: Context) -> dict[str, Any]:
        run, store = self.run_and_store()
        promote_error = context["ti"].xcom_pull(task_ids="promote", key="error")
        report = build_round_report(
            store,
            run.round_id,
            run.gate,
            promote_error=promote_error if isinstance(promote_error, str) else None,
            epsilon_budget=run.privacy.epsilon_budget if run.privacy.dp else None,
        )
        earlier, _ = read_optional(store, LAYOUT.round_report(run.round_id), RoundReport)
        # links from the Federation page: the run that first reported the round (a re-run of the
        # round writes the same bytes, so its report keeps the first run's id)
        report.airflow = (earlier.airflow if earlier is not None and earlier.airflow else
                          {"dag_id": context["dag"].dag_id, "run_id": context["run_id"]})  # fmt: skip
        write_document(store, LAYOUT.round_report(run.round_id), report)
        for line in summary_lines(report):
            self.log.info("%s", line)
        return {"status": report.status, "report": f"{store.url}/{LAYOUT.round_report(run.round_id)}"}


__all__ = [
    "LocalSparkSubmitOperator",
    "OpenRoundOperator",
    "PromoteCandidateOperator",
    "RequestEvaluationOperator",
    "RoundReportOperator",
    "RoundStepOperator",
    "current_model_asset",
]
