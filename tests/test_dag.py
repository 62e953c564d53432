"""The round DAG end to end with ``dag.test()``: real Airflow, real Spark, real PyTorch clients,
against the file store and fake-gcs-server. Assertions are on bucket contents and run states.

Clients are threads that are already waiting when the round opens, so a deadline only has to
cover one tiny training step; every other wait is on an event with a generous bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from fedbucket import LAYOUT, Client, ObjectStore, open_store
from fedbucket.protocol.documents import ModelManifest, RoundClosing, RoundReport, read_document, utcnow
from fedbucket.protocol.errors import PrivacyBudgetExceeded
from fedbucket.server.config import FederationConfig
from fedbucket.server.initialise import init_federation
from fedbucket.server.privacy import check_budget
from fedbucket.server.rounds import current_model
from fedbucket.sim.simulation import _forged_evaluation, _hostile_payload, _write_raw_update
from fedbucket.torch.digits import digits
from fedbucket.torch.task import build_model
from fedbucket.torch.training import load_global_weights, train_local

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.airflow, pytest.mark.spark]
# The gs:// path through the DAG is covered by the normal, re-run and hostile rounds; the other
# scenarios exercise DAG logic that does not depend on the store, so they run on file:// only to
# keep `make test` within its time budget.
FILE_STORE_ONLY = pytest.mark.parametrize("store_url", ["file"], indirect=True)


def write_config(tmp_path: Path, bucket: str, **round_overrides) -> Path:
    round_settings = {
        "deadline_seconds": 60,
        "min_clients": 3,
        "max_clients": 10,
        "grace_seconds": 0,
        "settle_seconds": 3,
        "poll_seconds": 0.5,
        "max_update_norm": 1000.0,
    } | round_overrides
    spark_submit = round_settings.pop("spark_submit", None)
    gate_tolerance = round_settings.pop("gate_tolerance", 1.0)
    gate_metric = round_settings.pop("gate_metric", "accuracy")
    gate_source = round_settings.pop("gate_source", "holdout")
    evaluation_min_clients = round_settings.pop("evaluation_min_clients", 3)
    privacy = round_settings.pop("privacy", {})
    secure_aggregation = round_settings.pop("secure_aggregation", {})
    lines = [f'bucket = "{bucket}"', 'model = { name = "mlp", kwargs = { hidden = 32 } }', "retries = 1"]
    lines += ["retry_delay_seconds = 0", "", "[round]"]
    lines += [f"{k} = {v}" for k, v in round_settings.items() if v is not None]
    lines += [
        "",
        "[training]",
        "local_epochs = 2",
        "learning_rate = 0.1",
        "",
        "[gate]",
        f"tolerance = {gate_tolerance}",
        f'metric = "{gate_metric}"',
        f'source = "{gate_source}"',
        "",
        "[evaluation]",
        "deadline_seconds = 600",  # generous: the wait ends when all clients scored, not at the deadline
        f"min_clients = {evaluation_min_clients}",
        "max_clients = 4",
        "settle_seconds = 3",
        "poll_seconds = 0.5",
        "trim_fraction = 0.25",
        "max_examples_per_report = 1000",
    ]
    lines += ["", "[aggregation]", 'spark_master = "local[2]"']
    if privacy:
        lines += ["", "[privacy]"] + [f"{k} = {json.dumps(v)}" for k, v in privacy.items()]
    if secure_aggregation:
        lines += ["", "[secure_aggregation]"] + [f"{k} = {json.dumps(v)}" for k, v in secure_aggregation.items()]
    if spark_submit:
        lines.append(f'spark_submit = "{spark_submit}"')
    path = tmp_path / "federation.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_dag(config_path: Path, run_conf: dict | None = None, logical_date: datetime | None = None):
    """Parse the DAG with ``config_path`` and run it once with ``dag.test()``; returns the DagRun.

    The parsed DAG is written to the metadata DB first, as the dag-processor would: ``dag.test()``
    only does that for a DAG id it has never seen, and each test points the DAG at another bucket
    (another current-model Asset, other Param defaults)."""
    os.environ["FEDBUCKET_CONFIG"] = str(config_path)
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    bag = DagBag(dag_folder=str(REPO / "dags"), bundle_name="dags-folder")
    assert bag.import_errors == {}, bag.import_errors
    DagBundlesManager().sync_bundles_to_db()
    sync_bag_to_db(bag, "dags-folder", None)
    dag = bag.get_dag("fedbucket_round")
    return dag.test(run_conf=run_conf or {}, logical_date=logical_date)


def task_states(dag_run) -> dict[str, str]:
    from airflow.utils.session import create_session

    with create_session() as session:
        return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances(session=session)}


class Clients:
    """Clients in threads: wait for the round, train for real (PyTorch MLP on digits), submit."""

    def __init__(self, store_url: str, cache: Path, behaviours: dict[str, str]) -> None:
        from fedbucket.sim.datasets import partition

        self.store_url, self.cache, self.behaviours = store_url, cache, behaviours
        self.train, validation = digits()
        self.parts = partition(self.train.y, len(behaviours), scheme="iid", seed=1)
        # Each client's own validation data, for federated evaluation (the server holds none of it).
        self.validation = [validation.subset(p) for p in partition(validation.y, len(behaviours), min_examples=5)]
        self.threads = [
            threading.Thread(target=self._run, args=(cid, i), daemon=True) for i, cid in enumerate(behaviours)
        ]
        self.errors: list[str] = []
        self.run_over = threading.Event()  # set when the DAG run returned: stop waiting for a round

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.run_over.set()
        for t in self.threads:
            t.join(timeout=600)
        assert not self.errors, self.errors

    def _run(self, client_id: str, index: int) -> None:
        try:
            with Client(self.store_url, client_id, cache_dir=self.cache / client_id) as client:
                task = client.current_round()
                while task is None:  # until the round opens, or the run is over without one
                    if self.run_over.wait(0.2):
                        self.errors.append(f"{client_id}: the run ended before a round opened")
                        return
                    task = client.current_round()
                behaviour = self.behaviours[client_id]
                if behaviour.startswith("drop-after-"):
                    self._drop_out(client, task, behaviour.removeprefix("drop-after-"), index)
                    return
                if behaviour == "hostile":
                    _write_raw_update(
                        client.store, task, client_id, _hostile_payload("nan", task, np.random.default_rng(0)), 5
                    )
                    return
                model = build_model(task.model)
                load_global_weights(model, client.fetch_model(task))
                idx = self.parts[index]
                train_local(model, self.train.subset(idx), task.training, seed=index)
                if behaviour == "late":
                    time.sleep(max(0.0, (task.deadline - utcnow()).total_seconds()) + 0.5)
                    from fedbucket.client import compute_delta, upload_update
                    from fedbucket.protocol.tensors import save_tensors

                    path = self.cache / f"{client_id}-late.safetensors"
                    save_tensors(compute_delta(model.state_dict(), client.fetch_model(task, as_numpy=True)), path)
                    upload_update(client.store, task, client_id, path, num_examples=len(idx), check_deadline=False)
                    return
                client.submit(task, model.state_dict(), num_examples=len(idx))
                if task.federated_evaluation:
                    self._evaluate(client, task, behaviour, index)
        except Exception as exc:  # surfaced in __exit__
            self.errors.append(f"{client_id}: {type(exc).__name__}: {exc}")

    def _drop_out(self, client: Client, task, phase: str, index: int) -> None:
        """A secure-aggregation client that goes silent after ``phase`` (keys, shares, masked)."""
        from fedbucket.client import compute_delta, upload_update
        from fedbucket.client.secagg import SecureRound

        model = build_model(task.model)
        load_global_weights(model, client.fetch_model(task))
        train_local(model, self.train.subset(self.parts[index]), task.training, seed=index)
        delta = compute_delta(model.state_dict(), client.fetch_model(task, as_numpy=True))
        secure = SecureRound(
            client.store,
            task,
            client.client_id,
            lambda path: upload_update(client.store, task, client.client_id, path, num_examples=10),
        )
        secure.advertise()
        if phase != "keys":
            secure.share()
        if phase == "masked":
            secure.send_masked(delta, tmp_dir=self.cache)

    def _evaluate(self, client: Client, task, behaviour: str, index: int) -> None:
        """Wait for the round's candidate to be published for scoring, then score it (or forge)."""
        evaluation = client.current_evaluation()
        while evaluation is None or evaluation.round_id != task.round_id:
            if self.run_over.wait(0.2):
                self.errors.append(f"{client.client_id}: the run ended before the candidate was published")
                return
            evaluation = client.current_evaluation()
        if behaviour == "forger":  # well-formed, within the bound, absurd: a perfect candidate
            forged = _forged_evaluation("perfect_within_bound", client.client_id, evaluation)
            client.store.put_bytes(LAYOUT.client_evaluation(client.client_id, task.round_id), forged.to_json_bytes())
            return
        from fedbucket.torch.participate import Participant
        from fedbucket.torch.task import load_task

        participant = Participant(client, load_task(None), None, self.train, self.validation[index], echo=print)
        assert participant.evaluate_round(evaluation) == "evaluated", participant.log


@pytest.fixture
def federation(store_url: str, tmp_path: Path, airflow_home: Path) -> tuple[ObjectStore, str]:
    store = open_store(store_url, create=True)
    config = FederationConfig(bucket=store_url, model={"name": "mlp", "kwargs": {"hidden": 32}})
    init_federation(store, config, validation=digits()[1])
    return store, store_url


def asset_events(bucket: str) -> list[dict]:
    """The extras of the events emitted on this federation's current-model Asset."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from fedbucket_airflow.operators import current_model_asset

    name = current_model_asset(bucket).name
    with create_session() as session:
        query = select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id).where(AssetModel.name == name)
        found = [dict(event.extra) for event in session.scalars(query)]
        if not found:  # say what is there, to tell a missing event from a renamed asset
            print("asset events:", [(a.name, a.uri) for a in session.scalars(select(AssetModel))])
        return found


def report_of(store: ObjectStore, round_id: str) -> RoundReport:
    return read_document(store, LAYOUT.round_report(round_id), RoundReport)[0]


def test_dagbag_parses_fast_without_import_errors(airflow_home, tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    os.environ["FEDBUCKET_CONFIG"] = str(write_config(tmp_path, "file:///tmp/unused"))
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    dag = bag.get_dag("fedbucket_round")
    assert [t.task_id for t in dag.tasks] == [
        "publish", "wait_for_updates", "aggregate", "promote", "report",
    ]  # fmt: skip
    # gate.source = "holdout": one Spark application aggregates, then evaluates
    assert dag.task_dict["aggregate"].application.endswith("spark_jobs/aggregate_evaluate.py")
    assert dag.max_active_runs == 1
    # no torch or pyspark at parse time
    parse = subprocess.run(
        [sys.executable, "-c", f"import runpy,sys; sys.path.insert(0,'{REPO / 'plugins'}'); "
         f"runpy.run_path('{REPO / 'dags' / 'fedbucket_round.py'}'); "
         "print('torch' in sys.modules, 'pyspark' in sys.modules)"],
        capture_output=True, text=True, env=os.environ, check=True,
    )  # fmt: skip
    assert parse.stdout.split()[-2:] == ["False", "False"]


def test_normal_round_promotes_and_rerun_reproduces_it(federation, tmp_path):
    store, url = federation
    config = write_config(tmp_path, url)
    with Clients(url, tmp_path / "clients", {f"c{i}": "honest" for i in range(3)}):
        run = run_dag(config, run_conf={"round_id": "round-1"})
    assert str(run.state) == "success", task_states(run)
    assert task_states(run)["promote"] == "success"  # the outcome is visible as the promote step's state
    report = report_of(store, "round-1")
    assert report.status == "promoted" and len([u for u in report.updates if u.accepted]) == 3
    pointer, generation = current_model(store)
    assert pointer.version == "round-1" and pointer.sha256 == report.candidate_sha256
    validation = report.metrics["validation"]
    assert validation["candidate"]["accuracy"] > validation["current"]["accuracy"]
    assert "federated" not in report.metrics  # gate.source = "holdout": clients were not asked to score
    events = asset_events(url)
    assert [e["version"] for e in events] == ["round-1"] and events[0]["metrics"]["accuracy"] > 0

    artifacts = [
        LAYOUT.round_task("round-1"),
        LAYOUT.round_closing("round-1"),
        LAYOUT.candidate_payload("round-1"),
        LAYOUT.candidate_manifest("round-1"),
        LAYOUT.evaluation_report("round-1"),
        LAYOUT.round_report("round-1"),
    ]
    before = {name: store.get_bytes(name)[0] for name in artifacts}
    rerun = run_dag(config, run_conf={"round_id": "round-1"})  # clear-and-rerun of the same round
    assert str(rerun.state) == "success", task_states(rerun)
    assert {name: store.get_bytes(name)[0] for name in artifacts} == before  # byte for byte
    assert current_model(store) == (pointer, generation)  # the pointer did not move


@FILE_STORE_ONLY
def test_abandoned_round_leaves_the_model_untouched(federation, tmp_path):
    store, url = federation
    before = current_model(store)
    config = write_config(tmp_path, url, deadline_seconds=20, min_clients=2, min_clients_at_deadline=2)
    with Clients(url, tmp_path / "clients", {"lonely": "honest"}):
        run = run_dag(config, run_conf={"round_id": "round-abandoned"})
    states = task_states(run)
    assert str(run.state) == "success", states
    assert states["wait_for_updates"] == "skipped" and states["aggregate"] == "skipped"
    assert states["report"] == "success"
    report = report_of(store, "round-abandoned")
    assert report.status == "abandoned" and "quorum not reached" in report.message
    closing, _ = read_document(store, LAYOUT.round_closing("round-abandoned"), RoundClosing)
    assert closing.reason == "below_quorum" and len(closing.updates) == 1
    assert current_model(store) == before
    assert not store.exists(LAYOUT.candidate_payload("round-abandoned"))


def test_hostile_and_late_updates_are_rejected_and_the_round_goes_on(federation, tmp_path):
    store, url = federation
    # settle_seconds: the straggler's upload right after the deadline must be seen (and called late)
    config = write_config(
        tmp_path, url, deadline_seconds=25, min_clients=5, min_clients_at_deadline=2, settle_seconds=15
    )
    behaviours = {"h0": "honest", "h1": "honest", "h2": "honest", "mallory": "hostile", "slowpoke": "late"}
    with Clients(url, tmp_path / "clients", behaviours):
        run = run_dag(config, run_conf={"round_id": "round-hostile"})
    assert str(run.state) == "success", task_states(run)
    report = report_of(store, "round-hostile")
    verdicts = {u.client_id: u for u in report.updates}
    assert report.status == "promoted"
    assert {c for c, u in verdicts.items() if u.accepted} == {"h0", "h1", "h2"}
    assert verdicts["mallory"].code == "non_finite" and "NaN" in verdicts["mallory"].reason
    assert verdicts["slowpoke"].code == "late"
    manifest, _ = read_document(store, LAYOUT.candidate_manifest("round-hostile"), ModelManifest)
    assert {a["client_id"] for a in manifest.lineage["accepted"]} == {"h0", "h1", "h2"}


@FILE_STORE_ONLY
def test_failed_aggregate_is_retried(federation, tmp_path):
    store, url = federation
    marker = tmp_path / "failed-once"
    flaky = tmp_path / "flaky-spark-submit"
    flaky.write_text(
        textwrap.dedent(
            f"""\
            #!/usr/bin/env bash
            # fails the first aggregation attempt, as a preempted cluster would
            if [[ "$*" == *spark_jobs/aggregate* && ! -e {marker} ]]; then
              touch {marker}; echo "simulated crash" >&2; exit 1
            fi
            exec {Path(sys.executable).parent / "spark-submit"} "$@"
            """
        )
    )
    flaky.chmod(0o755)
    config = write_config(tmp_path, url, spark_submit=str(flaky))
    with Clients(url, tmp_path / "clients", {f"c{i}": "honest" for i in range(3)}):
        run = run_dag(config, run_conf={"round_id": "round-retry"})
    assert str(run.state) == "success", task_states(run)
    assert marker.exists()
    from airflow.utils.session import create_session

    with create_session() as session:
        tries = {ti.task_id: ti.try_number for ti in run.get_task_instances(session=session)}
    assert tries["aggregate"] == 2 and tries["promote"] == 1
    assert report_of(store, "round-retry").status == "promoted"


@FILE_STORE_ONLY
def test_scheduled_round_id_comes_from_the_logical_date(federation, tmp_path):
    """A scheduled/backfill run of a date long past: deterministic id; clients missed it: abandoned."""
    store, url = federation
    config = write_config(tmp_path, url, deadline_seconds=1, min_clients=1, settle_seconds=0)
    run = run_dag(config, logical_date=datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    assert str(run.state) == "success", task_states(run)
    report = report_of(store, "20260301T120000Z")
    assert report.status == "abandoned"


@FILE_STORE_ONLY
def test_bad_run_parameters_fail_before_any_client_works(federation, tmp_path):
    """A misspelled key or options the strategy does not take fail the publish step, once."""
    store, url = federation
    config = write_config(tmp_path, url)
    for round_id, conf in (
        ("round-typo", {"min_client": 3}),
        ("round-bogus", {"strategy_options": {"bogus": 1}}),
    ):
        run = run_dag(config, run_conf={"round_id": round_id, **conf})
        states = task_states(run)
        assert str(run.state) == "failed" and states["publish"] == "failed", states
        assert not store.exists(LAYOUT.round_task(round_id))  # no round was opened: no client trained for it
        from airflow.utils.session import create_session

        with create_session() as session:
            tries = {ti.task_id: ti.try_number for ti in run.get_task_instances(session=session)}
        assert tries["publish"] == 1  # a usage error is never retried


@FILE_STORE_ONLY
def test_a_failed_round_still_gets_its_report(federation, tmp_path):
    store, url = federation
    broken = tmp_path / "broken-spark-submit"
    broken.write_text("#!/usr/bin/env bash\necho 'cluster lost' >&2\nexit 1\n")
    broken.chmod(0o755)
    config = write_config(tmp_path, url, spark_submit=str(broken))
    with Clients(url, tmp_path / "clients", {f"c{i}": "honest" for i in range(3)}):
        run = run_dag(config, run_conf={"round_id": "round-broken"})
    states = task_states(run)
    assert str(run.state) == "failed" and states["aggregate"] == "failed", states
    assert states["report"] == "success"  # the teardown ran and did not mask the failure
    report = report_of(store, "round-broken")
    assert report.status == "failed" and "aggregation did not finish" in report.message
    assert {u.code for u in report.updates} == {"not_aggregated"} and len(report.updates) == 3


@FILE_STORE_ONLY
def test_a_refused_candidate_shows_as_a_skipped_promote_and_leaves_the_model(federation, tmp_path):
    """A server learning rate of 1000 wrecks the candidate: the gate refuses it, the run stays green,
    the promote step is skipped (not green), no Asset event, the report says rejected."""
    store, url = federation
    before = current_model(store)
    config = write_config(tmp_path, url, gate_tolerance=0.0, gate_metric="loss")
    conf = {"round_id": "round-refused", "strategy_options": {"server_learning_rate": 1000.0}}
    with Clients(url, tmp_path / "clients", {f"c{i}": "honest" for i in range(3)}):
        run = run_dag(config, run_conf=conf)
    states = task_states(run)
    assert str(run.state) == "success" and states["promote"] == "skipped", states
    report = report_of(store, "round-refused")
    assert report.status == "rejected" and report.message.startswith("gate refused")
    assert current_model(store) == before
    assert asset_events(url) == []


@FILE_STORE_ONLY
def test_a_federation_without_server_data_gates_on_federated_evaluation(store_url, tmp_path, airflow_home):
    """No validation or test split on the server: clients score the candidate on their own data,
    a forged perfect score is trimmed, and the gate promotes on the pooled figures."""
    store = open_store(store_url, create=True)
    config = FederationConfig(
        bucket=store_url, model={"name": "mlp", "kwargs": {"hidden": 32}}, gate={"source": "federated"}
    )
    init_federation(store, config)  # no splits: the server holds no personal data
    assert not store.exists(LAYOUT.validation_split) and not store.exists(LAYOUT.test_split)
    # Every wait needs all four clients (no race between a slow fourth client and an early close).
    config_path = write_config(
        tmp_path, store_url, gate_source="federated", gate_tolerance=0.0, min_clients=4, max_clients=4,
        evaluation_min_clients=4, deadline_seconds=600,
    )  # fmt: skip
    behaviours = {"c0": "honest", "c1": "honest", "c2": "honest", "c3": "forger"}
    with Clients(store_url, tmp_path / "clients", behaviours):
        run = run_dag(config_path, run_conf={"round_id": "fed-1"})
    states = task_states(run)
    assert str(run.state) == "success", states
    assert states["request_evaluation"] == states["wait_for_evaluations"] == "success"
    assert states["promote"] == "success", report_of(store, "fed-1").message
    report = report_of(store, "fed-1")
    assert report.status == "promoted" and current_model(store)[0].version == "fed-1"
    federated = report.metrics["federated"]
    assert federated["reports"] == 4 and "c3" in federated["trimmed"]  # the forged perfect score
    assert "validation" not in report.metrics and "test" not in report.metrics
    assert federated["candidate"]["accuracy"] > federated["current"]["accuracy"]
    assert federated["candidate"]["accuracy"] < 1.0  # the forger's perfect candidate was not pooled
    assert "federated:" in report.message


@FILE_STORE_ONLY
def test_a_private_round_is_charged_and_the_next_one_past_the_budget_is_refused(federation, tmp_path, monkeypatch):
    """DP-FedAvg through the real DAG: the round report carries epsilon, the promoted model's manifest
    the enforced bound; the next round would take every client past the budget, so publish refuses it."""
    store, url = federation
    monkeypatch.setenv("FEDBUCKET_DP_KEY", "5e" * 32)  # a test key; the DAG passes it to spark-submit's env
    # z = 2: one round costs epsilon 1.99 at delta 1e-5, two rounds 2.94; the budget allows one.
    privacy = {"dp": True, "noise_multiplier": 2.0, "clip_norm": 1.0, "expected_clients": 3, "epsilon_budget": 2.5}
    # generous deadline: the wait ends when the three clients have submitted (the quorum), not at the clock
    config = write_config(tmp_path, url, privacy=privacy, deadline_seconds=600)
    with Clients(url, tmp_path / "clients", {f"c{i}": "honest" for i in range(3)}):
        run = run_dag(config, run_conf={"round_id": "dp-1"})
    assert str(run.state) == "success", task_states(run)
    report = report_of(store, "dp-1")
    assert report.privacy is not None and report.privacy.mechanism.charged_clients == 3
    assert report.privacy.spent.epsilon == pytest.approx(1.99, abs=0.01) and report.privacy.spent.budget == 2.5
    assert [u.weight for u in report.updates if u.accepted] == [pytest.approx(1 / 3)] * 3  # uniform, n-bar = 3
    candidate_manifest, _ = read_document(store, LAYOUT.candidate_manifest("dp-1"), ModelManifest)
    assert candidate_manifest.lineage["privacy"]["guarantee"]["epsilon_at_most"] == 2.5  # the public bound
    model_manifest, _ = read_document(store, LAYOUT.model_manifest("dp-1"), ModelManifest)
    assert model_manifest.lineage == candidate_manifest.lineage  # promoted: it travels with the model

    refused = run_dag(config, run_conf={"round_id": "dp-2"})
    states = task_states(refused)
    assert str(refused.state) == "failed" and states["publish"] == "failed", states
    assert not store.exists(LAYOUT.round_task("dp-2"))  # no client was asked to train
    with pytest.raises(PrivacyBudgetExceeded, match=r"over the budget of 2\.5 by 0\.4"):
        check_budget(store, "dp-2", FederationConfig.load(config).privacy)  # what the publish step logged


@pytest.mark.parametrize(("store_url", "distributed_dp"), [("file", False), ("gcs", True)], indirect=["store_url"])
def test_a_secure_round_with_dropouts_after_every_phase_releases_only_the_sum(federation, tmp_path, distributed_dp):
    """Secure aggregation through the real DAG and Spark: four client phases as four waits, one
    client silent after each phase, and the server's bucket never holds an update in the clear.
    On gs:// the clients also add the DP noise (distributed DP), and the ledger charges it."""
    from fedbucket.protocol.documents import AggregationReport, SecAggSetup
    from fedbucket.protocol.tensors import tensors_from_bytes

    store, url = federation
    behaviours = {f"c{i}": "honest" for i in range(4)} | {
        "c4": "drop-after-keys", "c5": "drop-after-shares", "c6": "drop-after-masked",
    }  # fmt: skip
    # Generous deadlines: a phase ends when everyone expected answered, or 20 s after the last answer.
    secure = {"enabled": True, "clip_norm": 5.0, "phase_seconds": 600, "grace_seconds": 20}
    privacy = {"dp": True, "noise_multiplier": 0.5, "adaptive_clipping": False, "epsilon_budget": 100.0}
    # Phase 1 waits for all seven keys (min_clients 7: nobody is left out for being slow to train);
    # the round can still close with 3 (min_clients_at_deadline), which the later phases' quorums use.
    config = write_config(
        tmp_path, url, deadline_seconds=600, min_clients=7, min_clients_at_deadline=3, max_clients=7,
        secure_aggregation=secure, privacy=privacy if distributed_dp else {},
    )  # fmt: skip
    with Clients(url, tmp_path / "clients", behaviours):
        run = run_dag(config, run_conf={"round_id": "secure-1"})
    states = task_states(run)
    assert str(run.state) == "success", states
    for step in ("wait_for_keys", "wait_for_shares", "wait_for_updates", "wait_for_unmask", "aggregate", "promote"):
        assert states[step] == "success", states
    aggregation, _ = read_document(store, LAYOUT.aggregation_report("secure-1"), AggregationReport)
    summary = aggregation.secure_aggregation
    assert summary.advertised == [f"c{i}" for i in range(7)]
    assert summary.shared == ["c0", "c1", "c2", "c3", "c5", "c6"]  # c4 went silent after its keys
    assert summary.masked == ["c0", "c1", "c2", "c3", "c6"] and summary.dropped_after_shares == ["c5"]
    assert summary.responded == ["c0", "c1", "c2", "c3"]  # c6 sent its masked input, then went silent
    assert [u.weight for u in aggregation.updates if u.accepted] == [pytest.approx(1 / 5)] * 5
    report = report_of(store, "secure-1")
    assert report.status == "promoted", report.message
    if distributed_dp:  # the five clients in the sum each added their share of the noise; all five charged
        assert report.privacy.mechanism.kind == "distributed_discrete_gaussian"
        assert report.privacy.mechanism.charged_clients == 5 and report.privacy.spent.epsilon > 0
    else:
        assert report.privacy is None
    setup, _ = read_document(store, LAYOUT.secagg_setup("secure-1"), SecAggSetup)
    assert setup.threshold == 4 and setup.clip_norm == 5.0
    # every update in the bucket is a masked uint32 vector: nothing there is an update in the clear
    for client in summary.masked:
        manifest = Client(url, client, store=store).submitted("secure-1")
        payload = tensors_from_bytes(store.get_bytes(LAYOUT.update_payload(client, "secure-1", manifest.sha256))[0])
        assert {v.dtype for v in payload.values()} == {np.dtype("uint32")}
        words = np.concatenate([v.ravel() for v in payload.values()])
        assert words.min() < 2**28 and words.max() > 2**32 - 2**28  # spread over the whole ring


@FILE_STORE_ONLY
def test_a_round_with_hundreds_of_clients(federation, tmp_path):
    """300 lightweight SDK clients (the base model plus noise, no training) submit concurrently;
    the wait ends when the last is in, every update is frozen, accepted and in the candidate's
    lineage (the benchmark runs the same with 1,000: docs/benchmarks.md)."""
    from concurrent.futures import ThreadPoolExecutor

    store, url = federation
    n = 300
    config = write_config(tmp_path, url, deadline_seconds=900, min_clients=n, max_clients=n, max_update_norm=None)
    errors: list[str] = []
    done = threading.Event()

    def clients() -> None:
        with Client(url, "watcher", cache_dir=tmp_path / "watcher") as watcher:
            task = watcher.current_round()
            while task is None or task.round_id != "round-many":
                if done.wait(0.2):
                    errors.append("the run ended before the round opened")
                    return
                task = watcher.current_round()

        def submit(i: int) -> None:
            try:
                with Client(url, f"c{i:03d}", cache_dir=tmp_path / "cache" / str(i)) as client:
                    base = client.fetch_model(task, as_numpy=True)
                    noise = np.random.default_rng(i)
                    trained = {k: v + noise.normal(0, 0.01, v.shape).astype(v.dtype) for k, v in base.items()}
                    client.submit(task, trained, num_examples=1 + i % 5)
            except Exception as exc:
                errors.append(f"c{i:03d}: {type(exc).__name__}: {exc}")

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(submit, range(n)))

    thread = threading.Thread(target=clients, daemon=True)
    thread.start()
    run = run_dag(config, run_conf={"round_id": "round-many"})
    done.set()
    thread.join(timeout=600)
    assert not errors, errors[:5]
    assert str(run.state) == "success", task_states(run)
    closing, _ = read_document(store, LAYOUT.round_closing("round-many"), RoundClosing)
    assert closing.reason == "max_clients" and len(closing.updates) == n
    report = report_of(store, "round-many")
    assert report.status == "promoted" and sum(u.accepted for u in report.updates) == n
    manifest, _ = read_document(store, LAYOUT.candidate_manifest("round-many"), ModelManifest)
    assert len(manifest.lineage["accepted"]) == n
