"""The wait step as a real Airflow sensor: poke, the poke loop with its timeout, and deferral
(trigger polling at poke_interval, deferral bounded by the sensor's timeout). No DAG run needed."""

from __future__ import annotations

from datetime import timedelta

import pytest

from conftest import tiny_model
from fedbucket import LAYOUT, tensors_to_bytes
from fedbucket.client import upload_update
from fedbucket.protocol.documents import RoundClosing, read_document
from fedbucket.server.config import FederationConfig, RunSettings

pytestmark = pytest.mark.airflow


@pytest.fixture
def run_settings(store_url, open_task, airflow_home) -> dict:
    config = FederationConfig(bucket=store_url, round={"min_clients": 2, "deadline_seconds": 3600})
    return RunSettings.resolve(config, open_task.round_id, {}).model_dump(mode="json")


def sensor(settings: dict, **kwargs):
    from fedbucket_airflow.sensors import RoundQuorumSensor

    return RoundQuorumSensor(task_id="wait_for_updates", settings=settings, **kwargs)


def submit(store, task, client_id: str, tmp_path) -> None:
    path = tmp_path / f"{client_id}.safetensors"
    model = tiny_model(3)
    path.write_bytes(tensors_to_bytes({k: (v * 0.01).astype(v.dtype) for k, v in model.items()}))
    upload_update(store, task, client_id, path, num_examples=5)


def test_poke_is_false_until_the_quorum_then_freezes_the_round(store, open_task, run_settings, tmp_path):
    wait = sensor(run_settings, poke_interval=0.1, timeout=60, deferrable=False)
    assert wait.poke({}) is False
    submit(store, open_task, "a", tmp_path)
    assert wait.poke({}) is False
    submit(store, open_task, "b", tmp_path)
    done = wait.poke({})
    assert done and done.xcom_value == {"reason": "quorum", "updates": 2, "rejected": 0}
    closing, _ = read_document(store, LAYOUT.round_closing(open_task.round_id), RoundClosing)
    assert [u.manifest.client_id for u in closing.updates] == ["a", "b"]


@pytest.mark.parametrize("store_url", ["file"], indirect=True)
def test_poke_mode_honours_the_timeout(store, open_task, run_settings):
    from airflow.sdk.exceptions import AirflowSensorTimeout

    wait = sensor(run_settings, poke_interval=0.1, timeout=0.5, deferrable=False)
    with pytest.raises(AirflowSensorTimeout):
        wait.execute({})
    assert not store.exists(LAYOUT.round_closing(open_task.round_id))  # a timed-out wait freezes nothing


@pytest.mark.parametrize("store_url", ["file"], indirect=True)
def test_deferrable_mode_defers_with_the_poke_interval_and_the_timeout(store, open_task, run_settings):
    from airflow.sdk.exceptions import TaskDeferred

    wait = sensor(run_settings, poke_interval=7, timeout=123)
    with pytest.raises(TaskDeferred) as deferred:
        wait.execute({})
    trigger = deferred.value.trigger
    assert trigger.poll_seconds == 7 and trigger.round_id == open_task.round_id
    assert deferred.value.timeout == timedelta(seconds=123)
    assert deferred.value.method_name == "execute_complete"
    kind, kwargs = trigger.serialize()
    assert kind.endswith("RoundQuorumTrigger") and kwargs["settings"]["min_clients"] == 2


def test_the_hook_takes_credentials_from_an_airflow_connection(gcs_server, airflow_home, monkeypatch):
    """gcp_conn_id: credentials from an Airflow connection (here an anonymous one for the emulator)."""
    import uuid

    from fedbucket_airflow.hooks import FederationHook

    monkeypatch.setenv(
        "AIRFLOW_CONN_FEDBUCKET_GCS",
        '{"conn_type": "google_cloud_platform", "extra": {"is_anonymous": true, "project": "demo"}}',
    )
    url = f"gs://fedbucket-test/{uuid.uuid4().hex}"
    store = FederationHook(url, gcp_conn_id="fedbucket_gcs").store
    store.put_bytes("hello.json", b"{}")
    assert type(store._client._credentials).__name__ == "AnonymousCredentials"  # the connection's, not ADC
    assert [info.name for info in store.list()] == ["hello.json"]
