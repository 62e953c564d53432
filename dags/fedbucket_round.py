"""
### fedbucket round

One run of this DAG is one federated round:

1. **publish** the round task (base = current model) and open the round;
2. **wait_for_updates** until the quorum (plus grace) or the deadline — deferrable; below the
   quorum at the deadline the round is *abandoned* and the next three steps are skipped. With
   `[secure_aggregation] enabled` the updates are masked and the wait is phase 3 of four:
   **wait_for_keys** (then the setup is published), **wait_for_shares** (then the shares are
   routed), **wait_for_updates**, **wait_for_unmask** (docs/privacy.md);
3. **aggregate** the frozen updates with Spark and **evaluate** the candidate against its base: on
   the server's validation split if it holds one, the test split (reported only), and the clients'
   pooled scores. With the default `[gate] source = "holdout"` both run in ONE Spark application,
   the `aggregate` step (`spark_jobs/aggregate_evaluate.py`: one JVM start, one Dataproc job);
4. only when the gate uses federated evaluation (`[gate] source = "federated"` or `"both"`) the
   two are separate steps, `aggregate` (`spark_jobs/aggregate.py`), then **request_evaluation**
   publishes the candidate for clients to score on their own data, **wait_for_evaluations** waits
   for their scores (its own quorum and deadline, `[evaluation]`), then `evaluate`
   (`spark_jobs/evaluate.py`);
5. **promote** the candidate if the gate passes (compare-and-swap on `models/current.json`):
   *success* = the pointer moved (and the current-model Asset gets an event), *skipped* = it did not;
6. **report** (a teardown: it runs even when a step failed): `rounds/<round>/report.json` and a
   summary in the task log.

Trigger a round by hand with parameters (unknown keys and invalid values fail the publish step):
`airflow dags trigger fedbucket_round --conf '{"min_clients": 5, "strategy": "fedadam"}'`.
See docs/operations.md.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG, chain

from fedbucket.server.config import FederationConfig
from fedbucket_airflow.dataproc import cluster_name_for
from fedbucket_airflow.operators import (
    LocalSparkSubmitOperator,
    OpenRoundOperator,
    PromoteCandidateOperator,
    RequestEvaluationOperator,
    RoundReportOperator,
    current_model_asset,
)
from fedbucket_airflow.params import run_params
from fedbucket_airflow.sensors import RoundQuorumSensor

CONFIG_PATH = os.environ.get("FEDBUCKET_CONFIG", str(Path(__file__).with_name("federation.toml")))
SPARK_JOBS = Path(os.environ.get("FEDBUCKET_SPARK_JOBS", Path(__file__).resolve().parents[1] / "spark_jobs"))
config = FederationConfig.load(CONFIG_PATH)  # a small local file: cheap at parse time
# The wait step's timeout (it only catches a stuck triggerer): rounds up to twice the configured
# deadline may be triggered by hand; publish refuses longer ones before any client works.
MAX_DEADLINE_SECONDS = 2 * config.round.deadline_seconds + config.round.settle_seconds
SECURE = config.secure_aggregation
if SECURE.enabled:  # the masked inputs' deadline comes two phases after the keys'
    MAX_DEADLINE_SECONDS += 2 * SECURE.phase_seconds
WAIT_TIMEOUT_SECONDS = MAX_DEADLINE_SECONDS + 3600


def run_setting(expression: str) -> str:
    """A template for a value of the run's settings (the publish step's one XCom)."""
    return "{{ ti.xcom_pull(task_ids='publish')" + expression + " }}"


def dataproc_steps(
    config: FederationConfig, aggregate_args: list[str], evaluate_args: list[str], scoring_steps: list
) -> list:
    """create cluster -> aggregate -> [scoring_steps] -> evaluate on ephemeral Dataproc clusters, each
    deleted as a teardown (a failed job still fails the run, and the cluster is still deleted).

    Without ``scoring_steps`` one cluster runs ONE job, ``aggregate_evaluate.py`` (task ``aggregate``):
    one Spark application does both. With them (federated evaluation: clients score the candidate
    for up to ``[evaluation] deadline_seconds``), the aggregation cluster is deleted before the
    wait and a second one (name suffix ``-e``) runs the evaluation: nothing bills, or hits the
    cluster's idle TTL, while clients score.
    """
    from airflow.providers.google.cloud.operators.dataproc import (
        DataprocCreateClusterOperator,
        DataprocDeleteClusterOperator,
        DataprocSubmitJobOperator,
    )

    from fedbucket_airflow.dataproc import cluster_name_template, pyspark_job

    dataproc = config.dataproc
    assert dataproc is not None  # the config validates this
    cluster_config = json.loads((Path(CONFIG_PATH).parent / dataproc.cluster_config).read_text())
    round_label = run_setting("['round_id'] | lower | replace('.', '-')")
    labels = {"app": "fedbucket", "fedbucket-round": round_label, **dataproc.labels}
    where = {"project_id": dataproc.project_id, "region": dataproc.region}

    def cluster(suffix: str, jobs: list[tuple[str, str, list[str], tuple[str, ...]]]) -> list:
        """create -> the jobs in order (task id, job file, args, sibling modules it imports), the
        delete as the create's teardown."""
        name = cluster_name_template(suffix)
        create = DataprocCreateClusterOperator(
            task_id=f"create_cluster{suffix.replace('-', '_')}",
            cluster_name=name,
            cluster_config=cluster_config,
            labels=labels,
            use_if_exists=True,  # a clear-and-rerun of the same run reuses its cluster
            delete_on_error=True,
            deferrable=True,
            **where,
        )
        steps = [
            DataprocSubmitJobOperator(
                task_id=task_id,
                job=pyspark_job(
                    project_id=dataproc.project_id,
                    cluster_name=name,
                    artifacts_root=dataproc.artifacts_root,
                    job_file=job_file,
                    args=args,
                    labels=labels,
                    modules=modules,
                ),
                deferrable=True,
                **where,
            )
            for task_id, job_file, args, modules in jobs
        ]
        delete = DataprocDeleteClusterOperator(
            task_id=f"delete_cluster{suffix.replace('-', '_')}", cluster_name=name, deferrable=True, **where
        ).as_teardown(setups=create)
        chain(create, *steps, delete)
        return [create, *steps]

    # On Dataproc any non-zero exit is a failed job: below quorum exits 0 and the report says so.
    below_quorum_ok = ["--below-quorum-exit-code", "0"]
    if not scoring_steps:
        both = [*aggregate_args, *below_quorum_ok, *evaluate_args[4:]]  # the evaluation's own options
        return cluster("", [("aggregate", "aggregate_evaluate.py", both, ("aggregate.py",))])
    aggregate = ("aggregate", "aggregate.py", [*aggregate_args, *below_quorum_ok], ())
    evaluate = ("evaluate", "evaluate.py", evaluate_args, ())
    return [*cluster("", [aggregate]), *scoring_steps, *cluster("-e", [evaluate])]


with DAG(
    dag_id="fedbucket_round",
    description="One federated round: publish, wait, aggregate, [federated scoring], evaluate, promote, report",
    schedule=config.schedule,
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,  # rounds are sequential: each builds on the model the previous one promoted
    default_args={"retries": config.retries, "retry_delay": timedelta(seconds=config.retry_delay_seconds)},
    params=run_params(config, max_deadline_seconds=MAX_DEADLINE_SECONDS),
    user_defined_macros={"cluster_name_for": cluster_name_for},
    doc_md=__doc__,
    tags=["fedbucket", "federated-learning"],
) as dag:
    publish = OpenRoundOperator(task_id="publish", config_path=CONFIG_PATH, max_deadline_seconds=MAX_DEADLINE_SECONDS)
    settings = publish.output  # the run's RunSettings: the one document every later step parses
    secure_phases = []
    if SECURE.enabled:  # phases 1 and 2 before the update wait (phase 3), phase 4 after it
        secure_phases = [
            RoundQuorumSensor(
                task_id=f"wait_for_{phase}",
                settings=settings,
                phase=phase,
                poke_interval=config.round.poll_seconds,
                timeout=WAIT_TIMEOUT_SECONDS,
            )
            for phase in ("keys", "shares", "unmask")
        ]
    wait_for_updates = RoundQuorumSensor(
        task_id="wait_for_updates",
        settings=settings,
        poke_interval=config.round.poll_seconds,
        timeout=WAIT_TIMEOUT_SECONDS,
    )
    aggregate_args = [
        *("--bucket", config.bucket, "--round", run_setting("['round_id']")),
        *("--strategy", run_setting("['aggregation']['strategy']")),
        *("--strategy-options", run_setting("['aggregation']['options'] | tojson")),
        *("--min-clients", run_setting("['aggregation_quorum']")),
        *("--privacy", run_setting("['privacy'] | tojson")),
    ]
    evaluate_args = [  # the first four (bucket and round) are aggregate_args' too
        *("--bucket", config.bucket, "--round", run_setting("['round_id']")),
        *("--metric", run_setting("['gate']['metric']")),
    ]
    scoring_steps = []
    if config.gate.source != "holdout":  # clients score the candidate between aggregate and evaluate
        scoring_steps = [
            RequestEvaluationOperator(task_id="request_evaluation", settings=settings),
            RoundQuorumSensor(
                task_id="wait_for_evaluations",
                settings=settings,
                phase="evaluations",
                poke_interval=config.evaluation.poll_seconds,
                timeout=config.evaluation.deadline_seconds + config.evaluation.settle_seconds + 3600,
            ),
        ]
    if config.aggregation.engine == "dataproc":
        spark_steps = dataproc_steps(config, aggregate_args, evaluate_args, scoring_steps)
    else:
        spark = {
            "master": config.aggregation.spark_master,
            "driver_memory": config.aggregation.spark_driver_memory,
            "spark_submit": config.aggregation.spark_submit,
            "class_data_cache": config.aggregation.spark_class_data_cache or None,
        }
        if scoring_steps:
            aggregate = LocalSparkSubmitOperator(
                task_id="aggregate",
                application=str(SPARK_JOBS / "aggregate.py"),
                application_args=aggregate_args,
                skip_exit_codes=[3],  # below quorum once invalid updates are rejected: abandon the round
                key_connection=config.privacy.key_connection,
                **spark,
            )
            evaluate = LocalSparkSubmitOperator(
                task_id="evaluate", application=str(SPARK_JOBS / "evaluate.py"), application_args=evaluate_args, **spark
            )
            spark_steps = [aggregate, *scoring_steps, evaluate]
        else:  # nothing between them: one Spark application (one JVM start) aggregates, then evaluates
            spark_steps = [
                LocalSparkSubmitOperator(
                    task_id="aggregate",
                    application=str(SPARK_JOBS / "aggregate_evaluate.py"),
                    application_args=[*aggregate_args, *evaluate_args[4:]],  # the evaluation's own options
                    skip_exit_codes=[3],  # below quorum: abandon the round (nothing to evaluate)
                    key_connection=config.privacy.key_connection,
                    **spark,
                )
            ]
    promote = PromoteCandidateOperator(
        task_id="promote", settings=settings, outlets=[current_model_asset(config.bucket)]
    )
    report = RoundReportOperator(task_id="report", settings=settings).as_teardown(setups=publish)
    if secure_phases:
        wait_for_keys, wait_for_shares, wait_for_unmasking = secure_phases
        waits = [wait_for_keys, wait_for_shares, wait_for_updates, wait_for_unmasking]
    else:
        waits = [wait_for_updates]
    chain(publish, *waits, *spark_steps, promote, report)
