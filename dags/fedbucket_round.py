"""
### fedbucket round

One run of this DAG is one federated round:

1. **publish** the round task (base = current model) and open the round;
2. **wait_for_updates** until the quorum (plus grace) or the deadline — deferrable; below the
   quorum at the deadline the round is *abandoned* and the next three steps are skipped;
3. **aggregate** the frozen updates with the Spark job (`spark_jobs/aggregate.py`);
4. **evaluate** candidate and base model on the held-out split (`spark_jobs/evaluate.py`);
5. **promote** the candidate if the gate passes (compare-and-swap on `models/current.json`);
6. **report**: `rounds/<round>/report.json` and a summary in the task log.

Trigger a round by hand with parameters:
`airflow dags trigger fedbucket_round --conf '{"min_clients": 5, "strategy": "fedadam"}'`.
See docs/operations.md.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG, Param, TriggerRule, chain

from fedbucket.config import FederationConfig
from fedbucket.strategies import STRATEGIES
from fedbucket_airflow.operators import (
    LocalSparkSubmitOperator,
    OpenRoundOperator,
    PromoteCandidateOperator,
    RoundReportOperator,
)
from fedbucket_airflow.sensors import RoundQuorumSensor

CONFIG_PATH = os.environ.get("FEDBUCKET_CONFIG", str(Path(__file__).with_name("federation.toml")))
SPARK_JOBS = Path(os.environ.get("FEDBUCKET_SPARK_JOBS", Path(__file__).resolve().parents[1] / "spark_jobs"))
config = FederationConfig.load(CONFIG_PATH)  # a small local file: cheap at parse time

ROUND_ID = "{{ ti.xcom_pull(task_ids='publish', key='round_id') }}"


def dataproc_steps(config: FederationConfig, aggregate_args: list[str], evaluate_args: list[str]) -> list:
    """create cluster -> aggregate -> evaluate on an ephemeral Dataproc cluster, deleted as a teardown
    (a failed job still fails the run, and the cluster is still deleted)."""
    from airflow.providers.google.cloud.operators.dataproc import (
        DataprocCreateClusterOperator,
        DataprocDeleteClusterOperator,
        DataprocSubmitJobOperator,
    )

    from fedbucket_airflow.dataproc import pyspark_job

    dataproc = config.dataproc
    assert dataproc is not None  # the config validates this
    cluster_config = json.loads((Path(CONFIG_PATH).parent / dataproc.cluster_config).read_text())
    cluster_name = "{{ ti.xcom_pull(task_ids='publish', key='cluster_name') }}"
    round_label = "{{ ti.xcom_pull(task_ids='publish', key='round_id') | lower | replace('.', '-') }}"
    labels = {"app": "fedbucket", "fedbucket-round": round_label, **dataproc.labels}
    where = {"project_id": dataproc.project_id, "region": dataproc.region}
    create = DataprocCreateClusterOperator(
        task_id="create_cluster",
        cluster_name=cluster_name,
        cluster_config=cluster_config,
        labels=labels,
        use_if_exists=True,  # a clear-and-rerun of the same run reuses its cluster
        delete_on_error=True,
        deferrable=True,
        **where,
    )

    def job(task_id: str, job_file: str, args: list[str]) -> DataprocSubmitJobOperator:
        spec = pyspark_job(
            project_id=dataproc.project_id,
            cluster_name=cluster_name,
            artifacts_root=dataproc.artifacts_root,
            job_file=job_file,
            args=args,
            labels=labels,
        )
        return DataprocSubmitJobOperator(task_id=task_id, job=spec, deferrable=True, **where)

    # On Dataproc any non-zero exit is a failed job: below quorum exits 0 and the report says so.
    aggregate = job("aggregate", "aggregate.py", [*aggregate_args, "--below-quorum-exit-code", "0"])
    evaluate = job("evaluate", "evaluate.py", evaluate_args)
    delete = DataprocDeleteClusterOperator(
        task_id="delete_cluster", cluster_name=cluster_name, deferrable=True, **where
    ).as_teardown(setups=create)
    evaluate >> delete
    return [create, aggregate, evaluate]


def setting(expression: str) -> str:
    """A template for a value of the round's effective settings, pushed by the publish step."""
    return "{{ ti.xcom_pull(task_ids='publish', key='settings')" + expression + " }}"


with DAG(
    dag_id="fedbucket_round",
    description="One federated round: publish, wait, aggregate (Spark), evaluate (Spark), promote, report",
    schedule=config.schedule,
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,  # rounds are sequential: each builds on the model the previous one promoted
    default_args={"retries": config.retries, "retry_delay": timedelta(seconds=config.retry_delay_seconds)},
    params={
        "round_id": Param(None, type=["null", "string"], description="round id (default: from the run's date)"),
        "deadline_seconds": Param(config.round.deadline_seconds, type="number", exclusiveMinimum=0),
        "min_clients": Param(config.round.min_clients, type="integer", minimum=1),
        "max_clients": Param(config.round.max_clients, type=["null", "integer"], minimum=1),
        "min_clients_at_deadline": Param(config.round.min_clients_at_deadline, type=["null", "integer"], minimum=1),
        "grace_seconds": Param(config.round.grace_seconds, type="number", minimum=0),
        "strategy": Param(config.aggregation.strategy, type="string", enum=sorted(STRATEGIES)),
        "strategy_options": Param(config.aggregation.options, type="object"),
        "local_epochs": Param(config.training.local_epochs, type="integer", minimum=1),
        "batch_size": Param(config.training.batch_size, type="integer", minimum=1),
        "learning_rate": Param(config.training.learning_rate, type="number", exclusiveMinimum=0),
        "proximal_mu": Param(config.training.proximal_mu, type="number", minimum=0),
        "gate_tolerance": Param(config.gate.tolerance, type="number", minimum=0),
    },
    doc_md=__doc__,
    tags=["fedbucket", "federated-learning"],
) as dag:
    publish = OpenRoundOperator(task_id="publish", config_path=CONFIG_PATH)
    wait = RoundQuorumSensor(
        task_id="wait_for_updates",
        bucket=config.bucket,
        round_id=publish.output["round_id"],
        settings=publish.output["settings"],
        timeout=config.round.deadline_seconds + 3600,
    )
    aggregate_args = [
        *("--bucket", config.bucket, "--round", ROUND_ID),
        *("--strategy", setting("['strategy']")),
        *("--strategy-options", setting("['strategy_options'] | tojson")),
        *("--min-clients", setting("['aggregation_quorum']")),
    ]
    evaluate_args = ["--bucket", config.bucket, "--round", ROUND_ID]
    if config.aggregation.engine == "dataproc":
        spark_steps = dataproc_steps(config, aggregate_args, evaluate_args)
    else:
        spark = {
            "master": config.aggregation.spark_master,
            "driver_memory": config.aggregation.spark_driver_memory,
            "spark_submit": config.aggregation.spark_submit,
        }
        spark_steps = [
            LocalSparkSubmitOperator(
                task_id="aggregate",
                application=str(SPARK_JOBS / "aggregate.py"),
                application_args=aggregate_args,
                skip_exit_codes=[3],  # below quorum once invalid updates are rejected: abandon the round
                **spark,
            ),
            LocalSparkSubmitOperator(
                task_id="evaluate", application=str(SPARK_JOBS / "evaluate.py"), application_args=evaluate_args, **spark
            ),
        ]
    promote = PromoteCandidateOperator(
        task_id="promote", bucket=config.bucket, round_id=ROUND_ID, settings=publish.output["settings"]
    )
    report = RoundReportOperator(
        task_id="report",
        bucket=config.bucket,
        round_id=ROUND_ID,
        promotion_task_id="promote",
        trigger_rule=TriggerRule.NONE_FAILED,
    )
    chain(publish, wait, *spark_steps, promote, report)
