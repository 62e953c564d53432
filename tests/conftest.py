"""Shared fixtures: both object stores (file:// and gs:// over a real fake-gcs-server)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from fedbucket import LAYOUT, ModelSpec, ObjectStore, TrainingConfig, open_store
from fedbucket.protocol.documents import RoundTask, utcnow
from fedbucket.server.rounds import open_round, publish_model, set_current_model
from fedbucket.sim.emulator import FakeGCSServer

TEST_BUCKET = "fedbucket-test"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGCSServer]:
    """One fake-gcs-server for the session; STORAGE_EMULATOR_HOST points at it."""
    log = tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"
    with FakeGCSServer(buckets=[TEST_BUCKET], log_path=str(log)) as server:
        previous = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = server.endpoint
        yield server
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous


@pytest.fixture(params=["file", "gcs"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A fresh, empty federation root in each kind of store."""
    if request.param == "file":
        return (tmp_path / "bucket").as_uri()
    request.getfixturevalue("gcs_server")
    return f"gs://{TEST_BUCKET}/{uuid.uuid4().hex}"


@pytest.fixture
def store(store_url: str) -> ObjectStore:
    return open_store(store_url, create=True)


def tiny_model(seed: int = 0) -> dict[str, np.ndarray]:
    """A small state dict with odd shapes, a scalar and an integer buffer."""
    rng = np.random.default_rng(seed)
    return {
        "layer.weight": rng.standard_normal((7, 5)).astype(np.float32),
        "layer.bias": rng.standard_normal(7).astype(np.float32),
        "norm.scale": np.float32(rng.standard_normal()).reshape(()),
        "norm.num_batches_tracked": np.array(3, dtype=np.int64),
    }


TINY_SPEC = ModelSpec(name="tests.tiny")


def submit_deltas(
    store: ObjectStore,
    tmp_path: Path,
    round_id: str,
    base: dict[str, np.ndarray],
    deltas: dict[str, dict],
    examples: dict[str, int] | None = None,
) -> RoundTask:
    """Publish ``base`` as the current model if there is none, open ``round_id`` (quorum 2) and
    upload each client's delta through the SDK (``examples``: claimed counts, default 10)."""
    from fedbucket import tensors_to_bytes
    from fedbucket.client import upload_update

    if not store.exists(LAYOUT.current_model):
        manifest = publish_model(store, base, version="init", model=TINY_SPEC)
        set_current_model(store, manifest, expected_generation=0)
    task = open_round(
        store, round_id=round_id, opened_at=utcnow(), deadline_seconds=3600, training=TrainingConfig(), min_clients=2
    )
    for client_id, delta in deltas.items():
        path = tmp_path / f"{round_id}-{client_id}.safetensors"
        path.write_bytes(tensors_to_bytes(delta))
        upload_update(store, task, client_id, path, num_examples=(examples or {}).get(client_id, 10))
    return task


@pytest.fixture
def open_task(store: ObjectStore) -> RoundTask:
    """A federation with ``tiny_model()`` as version ``init`` and round ``r1`` open for an hour."""
    manifest = publish_model(store, tiny_model(), version="init", model=TINY_SPEC)
    set_current_model(store, manifest, expected_generation=0)
    return open_round(
        store,
        round_id="r1",
        opened_at=utcnow() - timedelta(seconds=1),
        deadline_seconds=3600,
        training=TrainingConfig(),
    )


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Airflow home with a migrated SQLite DB; the env is set before airflow is imported."""
    home = tmp_path_factory.mktemp("airflow-home")
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
    }
    os.environ.update(env)
    if str(REPO / "plugins") not in sys.path:
        sys.path.insert(0, str(REPO / "plugins"))
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, env=os.environ)
    return home
