"""The gcp-mode DAG, rendered: exactly what would be sent to Dataproc (nothing is sent)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import hcl2
import pytest
from test_terraform import TERRAFORM, _clean

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CLUSTER = REPO / "dags" / "dataproc_cluster.example.json"
pytestmark = pytest.mark.airflow


@pytest.fixture
def gcp_dag(airflow_home, tmp_path):
    return load_gcp_dag(tmp_path)


def load_gcp_dag(tmp_path, *extra: str):
    shutil.copyfile(EXAMPLE_CLUSTER, tmp_path / "dataproc_cluster.json")
    config = tmp_path / "federation.toml"
    config.write_text(
        "\n".join(
            [
                'bucket = "gs://my-org-fedbucket/prod"',
                'schedule = "@hourly"',
                "[aggregation]",
                'engine = "dataproc"',
                'strategy = "fedadam"',
                "[dataproc]",
                'project_id = "my-fl-project"',
                'region = "europe-west4"',
                'artifacts_root = "gs://my-org-fedbucket-artifacts/fedbucket/0.1.0"',
                'labels = { team = "ml" }',
                *extra,
            ]
        )
        + "\n"
    )
    os.environ["FEDBUCKET_CONFIG"] = str(config)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}, bag.import_errors
    return bag.get_dag("fedbucket_round")


def test_wiring_and_teardown(gcp_dag):
    tasks = gcp_dag.task_dict
    assert set(tasks) == {
        "publish", "wait_for_updates", "create_cluster", "aggregate", "delete_cluster", "promote", "report",
    }  # fmt: skip
    assert tasks["wait_for_updates"].downstream_task_ids == {"create_cluster"}
    assert tasks["create_cluster"].downstream_task_ids >= {"aggregate"}
    assert tasks["aggregate"].downstream_task_ids == {"promote", "delete_cluster"}  # one job: aggregate, evaluate
    delete = tasks["delete_cluster"]
    assert delete.is_teardown and not tasks["create_cluster"].is_teardown and tasks["create_cluster"].is_setup
    assert "create_cluster" in delete.upstream_task_ids  # teardown bound to its setup
    assert not delete.downstream_task_ids  # a teardown leaf: a failed job still fails the run
    for task_id in ("create_cluster", "aggregate", "delete_cluster"):
        assert tasks[task_id].deferrable is True, task_id


def test_federated_evaluation_runs_between_two_clusters(airflow_home, tmp_path):
    """Clients score the candidate with no cluster up: the aggregation cluster is deleted before the
    wait, and a second cluster (``-e``) runs the evaluation."""
    tasks = load_gcp_dag(tmp_path, "[gate]", 'source = "federated"').task_dict
    assert tasks["aggregate"].downstream_task_ids == {"request_evaluation", "delete_cluster"}
    assert tasks["request_evaluation"].downstream_task_ids == {"wait_for_evaluations"}
    assert tasks["wait_for_evaluations"].downstream_task_ids == {"create_cluster_e"}
    assert tasks["evaluate"].downstream_task_ids == {"promote", "delete_cluster_e"}
    for teardown, setup in (("delete_cluster", "create_cluster"), ("delete_cluster_e", "create_cluster_e")):
        assert tasks[teardown].is_teardown and setup in tasks[teardown].upstream_task_ids
    assert tasks["create_cluster_e"].cluster_name.endswith("}}-e")
    assert tasks["evaluate"].job["placement"]["cluster_name"] == tasks["create_cluster_e"].cluster_name


def test_cluster_is_exactly_terraforms(gcp_dag):
    create = gcp_dag.task_dict["create_cluster"]
    assert create.cluster_config == json.loads(EXAMPLE_CLUSTER.read_text())
    assert create.project_id == "my-fl-project" and create.region == "europe-west4"
    assert create.use_if_exists is True and create.delete_on_error is True
    assert create.labels["app"] == "fedbucket" and create.labels["team"] == "ml"
    assert "round_id" in create.labels["fedbucket-round"] and "| lower" in create.labels["fedbucket-round"]
    assert gcp_dag.task_dict["delete_cluster"].cluster_name == create.cluster_name
    assert "cluster_name" in create.cluster_name
    # the example cluster config has the shape Terraform's dataproc_cluster_config output has
    text = (TERRAFORM / "dataproc.tf").read_text()
    block = text[text.index("dataproc_cluster_config = merge(") :]
    for key in json.loads(EXAMPLE_CLUSTER.read_text()):
        assert re.search(rf"\b{key}\s*=", block), key
    assert _clean(hcl2.loads(text))  # and the file parses


def test_job_specs(gcp_dag, airflow_home, tmp_path):
    root = "gs://my-org-fedbucket-artifacts/fedbucket/0.1.0"
    aggregate = gcp_dag.task_dict["aggregate"]  # holdout gate: ONE job aggregates, then evaluates
    spec = aggregate.job["pyspark_job"]
    assert spec["main_python_file_uri"] == f"{root}/spark_jobs/aggregate_evaluate.py"
    assert spec["python_file_uris"] == [f"{root}/spark_jobs/_spark.py", f"{root}/spark_jobs/aggregate.py"]
    assert "--metric" in spec["args"] and spec["args"].count("--bucket") == 1
    federated = load_gcp_dag(tmp_path, "[gate]", 'source = "federated"')  # clients score in between: two jobs
    for task, job_file in (
        (federated.task_dict["aggregate"], "aggregate.py"),
        (federated.task_dict["evaluate"], "evaluate.py"),
    ):
        spec = task.job["pyspark_job"]
        assert spec["main_python_file_uri"] == f"{root}/spark_jobs/{job_file}"
        assert spec["python_file_uris"] == [f"{root}/spark_jobs/_spark.py"]
    assert aggregate.job["placement"]["cluster_name"] == gcp_dag.task_dict["create_cluster"].cluster_name
    for task in (aggregate, federated.task_dict["evaluate"]):
        assert task.job["reference"]["project_id"] == "my-fl-project"
        assert task.job["labels"]["app"] == "fedbucket"
    args = aggregate.job["pyspark_job"]["args"]
    assert args[:2] == ["--bucket", "gs://my-org-fedbucket/prod"]
    assert args[args.index("--below-quorum-exit-code") + 1] == "0"
    assert "strategy" in args[args.index("--strategy") + 1]
    assert federated.task_dict["evaluate"].job["pyspark_job"]["args"][:2] == ["--bucket", "gs://my-org-fedbucket/prod"]


def test_cluster_names_are_valid_and_unique_per_run():
    import sys

    sys.path.insert(0, str(REPO / "plugins"))
    from fedbucket_airflow.dataproc import cluster_name_for

    a = cluster_name_for("20261125T120000Z", "scheduled__2026-11-25T12:00:00+00:00")
    b = cluster_name_for("20261125T120000Z", "manual__2026-11-25T13:00:00+00:00")
    assert a != b and a == cluster_name_for("20261125T120000Z", "scheduled__2026-11-25T12:00:00+00:00")
    for name in (a, b, cluster_name_for("A.Very.Long.Round.Name.That.Goes.On.And.On.x", "r")):
        assert re.fullmatch(r"[a-z][a-z0-9-]{0,49}[a-z0-9]", name), name
