"""The one-application Spark job (``spark_jobs/aggregate_evaluate.py``) against the two jobs it
replaces in the DAG: on copies of the same round it writes the same candidate (byte for byte),
the same evaluation and the same aggregation verdicts; below quorum it evaluates nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedbucket import LAYOUT, open_store
from fedbucket.protocol.documents import AggregationReport, read_document
from fedbucket.server.config import FederationConfig
from fedbucket.server.initialise import init_federation
from fedbucket.torch.digits import digits

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.spark


def spark_submit(job: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    env["SPARK_LOCAL_IP"] = "127.0.0.1"
    command = [
        str(Path(sys.executable).parent / "spark-submit"), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
        str(REPO / "spark_jobs" / job), *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture
def closed_round(tmp_path: Path) -> Path:
    """A file:// federation of the digits MLP with a validation split and round ``r1`` holding
    four clients' updates (one of them NaN), closed."""
    from conftest import submit_deltas
    from fedbucket import tensors_to_bytes
    from fedbucket.protocol.tensors import load_tensors
    from fedbucket.server.rounds import freeze_round
    from fedbucket.sim.simulation import _write_raw_update

    root = tmp_path / "bucket"
    store = open_store(root.as_uri(), create=True)
    init_federation(
        store,
        FederationConfig(bucket=store.url, model={"name": "mlp", "kwargs": {"hidden": 8}}),
        validation=digits()[1],
    )
    store.download_file(LAYOUT.model_payload("init"), tmp_path / "base.safetensors")
    base = load_tensors(tmp_path / "base.safetensors")
    deltas = {f"c{i}": {k: (v * 0.05 * (i + 1)).astype(v.dtype) for k, v in base.items()} for i in range(3)}
    task = submit_deltas(store, tmp_path, "r1", base, deltas, {f"c{i}": 10 + i for i in range(3)})
    nan = tensors_to_bytes({k: np.full_like(v, np.nan) for k, v in base.items()})  # the SDK would refuse it
    _write_raw_update(store, task, "nan", nan, 5)
    freeze_round(store, task, reason="quorum", closed_at=task.opened_at)
    return root


def test_one_application_writes_what_the_two_jobs_write(closed_round: Path, tmp_path: Path) -> None:
    two, one = tmp_path / "two-jobs", tmp_path / "one-job"
    shutil.copytree(closed_round, two)
    shutil.copytree(closed_round, one)
    common = ["--round", "r1", "--strategy", "fedadam", "--strategy-options", '{"server_learning_rate": 0.5}']
    for job, root, args in (
        ("aggregate.py", two, common),
        ("evaluate.py", two, ["--round", "r1", "--metric", "macro_f1"]),
        ("aggregate_evaluate.py", one, [*common, "--metric", "macro_f1"]),
    ):
        run = spark_submit(job, "--bucket", root.as_uri(), *args)
        assert run.returncode == 0, f"{job}: {run.stdout[-3000:]}{run.stderr[-3000:]}"
    stores = {name: open_store(root.as_uri()) for name, root in (("two", two), ("one", one))}
    for name in (
        LAYOUT.candidate_payload("r1"),
        LAYOUT.candidate_manifest("r1"),
        LAYOUT.strategy_state("r1"),
        LAYOUT.evaluation_report("r1"),
    ):
        assert stores["one"].get_bytes(name)[0] == stores["two"].get_bytes(name)[0], name
    reports = {k: read_document(s, LAYOUT.aggregation_report("r1"), AggregationReport)[0] for k, s in stores.items()}
    assert reports["one"].updates == reports["two"].updates  # same verdicts; only timings differ
    assert {u.client_id for u in reports["one"].updates if not u.accepted} == {"nan"}


def test_below_quorum_evaluates_nothing_and_bad_arguments_exit_2(closed_round: Path) -> None:
    url = closed_round.as_uri()
    store = open_store(url)
    run = spark_submit("aggregate_evaluate.py", "--bucket", url, "--round", "r1", "--min-clients", "4")
    assert run.returncode == 3, run.stdout[-3000:] + run.stderr[-3000:]  # 3 valid of the 4 required
    report, _ = read_document(store, LAYOUT.aggregation_report("r1"), AggregationReport)
    assert report.status == "below_quorum"
    assert not store.exists(LAYOUT.candidate_payload("r1")) and not store.exists(LAYOUT.evaluation_report("r1"))
    refused = spark_submit("aggregate_evaluate.py", "--bucket", url, "--round", "r1", "--strategy-options", "[1]")
    assert refused.returncode == 2 and "JSON object" in refused.stdout + refused.stderr
