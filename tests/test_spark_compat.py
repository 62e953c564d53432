"""The same Spark jobs on Spark 3.5 (Dataproc 2.2/2.3 images): run them with the pyspark 3.5
environment that `make test` builds (.venv-spark35) and compare with the Spark 4 / in-process bytes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_aggregation import setup_round

from fedbucket import LAYOUT, open_store
from fedbucket.protocol.documents import AggregationReport, EvaluationReport, read_document
from fedbucket.server.aggregation import run_aggregation
from fedbucket.server.config import FederationConfig
from fedbucket.server.initialise import init_federation
from fedbucket.server.strategies import build_strategy
from fedbucket.torch.digits import digits

REPO = Path(__file__).resolve().parents[1]
SPARK35 = REPO / ".venv-spark35" / "bin"
pytestmark = pytest.mark.spark


def submit(job: str, *args: str) -> subprocess.CompletedProcess:
    if not (SPARK35 / "spark-submit").exists():
        pytest.fail("the Spark 3.5 environment is missing: run `make test` (it builds .venv-spark35)")
    env = {**os.environ, "PYSPARK_PYTHON": str(SPARK35 / "python"), "PYSPARK_DRIVER_PYTHON": str(SPARK35 / "python")}
    env["SPARK_LOCAL_IP"] = "127.0.0.1"
    command = [str(SPARK35 / "spark-submit"), "--master", "local[2]", str(REPO / "spark_jobs" / job), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_jobs_run_on_spark_35_with_the_same_results(tmp_path):
    version = subprocess.run(
        [str(SPARK35 / "python"), "-c", "import pyspark; print(pyspark.__version__)"], capture_output=True, text=True
    )
    assert version.stdout.startswith("3.5."), version.stdout + version.stderr
    store = open_store((tmp_path / "bucket").as_uri(), create=True)
    init_federation(
        store,
        FederationConfig(bucket=store.url, model={"name": "mlp", "kwargs": {"hidden": 8}}),
        validation=digits()[1],
    )
    # Updates shaped like the federation's MLP, so that evaluate.py can score the candidate.
    from fedbucket.protocol.tensors import load_tensors

    base_path = tmp_path / "base.safetensors"
    store.download_file(LAYOUT.model_payload("init"), base_path)
    base = load_tensors(base_path)
    deltas = {f"c{i}": {k: (v * 0.01 * (i + 1)).astype(v.dtype) for k, v in base.items()} for i in range(3)}
    setup_round(store, tmp_path, deltas, {f"c{i}": 10 + i for i in range(3)})
    run_aggregation(store, "r1", build_strategy("fedyogi"))
    expected = store.get_bytes(LAYOUT.candidate_payload("r1"))[0]

    run = submit("aggregate.py", "--bucket", store.url, "--round", "r1", "--strategy", "fedyogi")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report, _ = read_document(store, LAYOUT.aggregation_report("r1"), AggregationReport)
    assert report.engine["spark_version"].startswith("3.5.")
    assert store.get_bytes(LAYOUT.candidate_payload("r1"))[0] == expected

    run = submit("evaluate.py", "--bucket", store.url, "--round", "r1", "--rows-per-task", "100")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    evaluation, _ = read_document(store, LAYOUT.evaluation_report("r1"), EvaluationReport)
    validation = evaluation.validation
    assert validation is not None and validation.examples == 359 and 0 <= validation.candidate.accuracy <= 1
    assert sum(c.support for c in validation.current.per_class.values()) == 359
    assert evaluation.test is None and evaluation.federated is None  # no test split, no client scores
    assert json.loads(store.get_bytes(LAYOUT.evaluation_report("r1"))[0])["kind"] == "evaluation-report"
