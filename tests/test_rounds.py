"""The round lifecycle against both stores, and the server's decision functions (fast, no Airflow).

Listing by round, the cheap checks before the quorum, commit times from the store, freezing what
was present at the close, unsafe names counted, exact integer means, the weight cap, and a report
whose status is what the model pointer says.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_SPEC, tiny_model
from fedbucket import LAYOUT, ObjectStore, RoundTask, UpdateManifest, tensors_to_bytes
from fedbucket.client import upload_update
from fedbucket.protocol.documents import (
    ClassMetrics,
    EvaluationReport,
    ModelMetrics,
    SplitMetrics,
    utcnow,
    write_document,
)
from fedbucket.protocol.errors import ConfigError, LateUpdate, PreconditionFailed, StorageError
from fedbucket.protocol.storage import FileStore, GCSStore, ObjectInfo, open_store
from fedbucket.protocol.validation import precheck_update, read_update_manifest
from fedbucket.server.aggregation import run_aggregation
from fedbucket.server.config import FederationConfig, GateSettings, RoundSettings, RunSettings
from fedbucket.server.promotion import gate_decision, promote_candidate
from fedbucket.server.report import build_round_report
from fedbucket.server.rounds import (
    RoundSurvey,
    current_model,
    freeze_round,
    open_round,
    publish_model,
    round_id_for,
    set_current_model,
    survey_round,
    wait_decision,
)
from fedbucket.server.strategies import build_strategy

GATE = GateSettings(metric="accuracy", tolerance=0.0)


def small_delta(seed: int = 1) -> dict[str, np.ndarray]:
    model = tiny_model(seed)
    return {k: (v * 0.01).astype(v.dtype) if v.dtype.kind == "f" else np.ones_like(v) for k, v in model.items()}


def submit(store: ObjectStore, task: RoundTask, client_id: str, tmp_path: Path, *, examples: int = 10, **kw) -> None:
    path = tmp_path / f"{client_id}-{task.round_id}.safetensors"
    path.write_bytes(tensors_to_bytes(kw.pop("delta", None) or small_delta(len(client_id))))
    upload_update(store, task, client_id, path, num_examples=examples)


def raw_manifest(task: RoundTask, client_id: str, payload: bytes, **overrides) -> bytes:
    fields = {
        "client_id": client_id,
        "round_id": task.round_id,
        "base_model_version": task.base_model_version,
        "num_examples": 10,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "size_bytes": len(payload),
        "created_at": utcnow(),
    } | overrides
    return UpdateManifest(**fields).to_json_bytes()


class CountingStore:
    """Wraps a store and counts the objects its listings return (what a poll costs)."""

    def __init__(self, store: ObjectStore) -> None:
        self._store, self.listed = store, 0

    def list(self, prefix: str = "", *, match_glob: str | None = None):
        for info in self._store.list(prefix, match_glob=match_glob):
            self.listed += 1
            yield info

    def __getattr__(self, name: str):
        return getattr(self._store, name)


# -- listing does not grow with history -----------------------------------------------------------


def test_a_poll_lists_only_the_current_round(store, open_task, tmp_path):
    """50 past rounds of 3 clients each stay in the bucket; a poll of round r1 gets r1's 3 manifests."""
    for number in range(50):
        for client in ("a", "b", "c"):
            store.put_bytes(LAYOUT.update_manifest(client, f"past-{number:02d}"), b"{}")
            store.put_bytes(LAYOUT.update_payload(client, f"past-{number:02d}", "0" * 64), b"x")
    for client in ("a", "b", "c"):
        submit(store, open_task, client, tmp_path)
    history = sum(1 for _ in store.list("updates/"))
    assert history == 50 * 3 * 2 + 3 * 2  # the history is really there
    counting = CountingStore(store)
    survey = survey_round(counting, open_task)  # type: ignore[arg-type]
    assert counting.listed == 3  # the objects the store returned for this poll: this round's manifests
    assert sorted(u.manifest.client_id for u in survey.on_time) == ["a", "b", "c"]
    if isinstance(store, GCSStore):
        # GCS filters on its side when asked; fake-gcs-server (<= 1.54) ignores the parameter and
        # GCSStore filters the answer again, so on the emulator what is proven is that we ask.
        asked = []
        list_blobs = store._client.list_blobs
        store._client.list_blobs = lambda *a, **kw: asked.append(kw["match_glob"]) or list_blobs(*a, **kw)
        survey_round(store, open_task)
        assert asked == [store.prefix + "updates/*/r1/manifest.json"]


# -- the cheap checks before the quorum ---------------------------------------------------------


def test_garbage_manifests_do_not_count_toward_the_quorum(store, open_task, tmp_path):
    submit(store, open_task, "honest-1", tmp_path)
    submit(store, open_task, "honest-2", tmp_path)
    garbage = b"\x00" * 64
    wrong_schema = tensors_to_bytes({"other": np.zeros(3, np.float32)})
    for i in range(10):
        client = f"spam-{i}"
        kind = i % 4
        if kind == 0:  # a manifest naming a payload that does not exist
            manifest = raw_manifest(open_task, client, b"never uploaded")
        elif kind == 1:  # garbage bytes
            store.put_bytes(LAYOUT.update_payload(client, "r1", hashlib.sha256(garbage).hexdigest()), garbage)
            manifest = raw_manifest(open_task, client, garbage)
        elif kind == 2:  # a well-formed file of another model
            store.put_bytes(LAYOUT.update_payload(client, "r1", hashlib.sha256(wrong_schema).hexdigest()), wrong_schema)
            manifest = raw_manifest(open_task, client, wrong_schema)
        else:  # the declared size is a lie
            store.put_bytes(LAYOUT.update_payload(client, "r1", hashlib.sha256(garbage).hexdigest()), garbage)
            manifest = raw_manifest(open_task, client, garbage, size_bytes=65)
        store.put_bytes(LAYOUT.update_manifest(client, "r1"), manifest)
    survey = survey_round(store, open_task)
    assert sorted(u.manifest.client_id for u in survey.on_time) == ["honest-1", "honest-2"]
    assert {v.code for v in survey.rejected} == {"malformed_payload", "schema_mismatch"}
    assert len(survey.rejected) == 10
    settings = RoundSettings(min_clients=3, max_clients=10)
    assert wait_decision(survey, now=utcnow(), deadline=open_task.deadline, settings=settings) is None


# -- commit times and the close -----------------------------------------------------------------


def test_a_payload_committed_after_the_deadline_is_late(store, open_task, tmp_path):
    """A hostile client writes its manifest on time and its payload after the deadline."""
    payload = tensors_to_bytes(small_delta())
    store.put_bytes(LAYOUT.update_manifest("sly", "r1"), raw_manifest(open_task, "sly", payload))
    manifest, manifest_time = read_update_manifest(store, LAYOUT.update_manifest("sly", "r1"))
    deadline = manifest_time + timedelta(microseconds=1)
    while utcnow() <= deadline + timedelta(milliseconds=5):
        time.sleep(0.005)
    store.put_bytes(LAYOUT.update_payload("sly", "r1", manifest.sha256), payload)
    task = open_task.model_copy(update={"deadline": deadline})
    with pytest.raises(LateUpdate):
        precheck_update(store, task, manifest, manifest_time)


def test_what_arrives_after_the_close_is_never_used(store, open_task, tmp_path):
    """A manifest whose payload was missing at the close stays rejected after the payload arrives,
    and a re-run of the aggregation gives the same bytes."""
    submit(store, open_task, "a", tmp_path)
    submit(store, open_task, "b", tmp_path)
    payload = tensors_to_bytes(small_delta(9))
    store.put_bytes(LAYOUT.update_manifest("c", "r1"), raw_manifest(open_task, "c", payload))
    closing = freeze_round(store, open_task, reason="quorum", closed_at=utcnow())
    assert [u.manifest.client_id for u in closing.updates] == ["a", "b"]
    assert {v.client_id: v.code for v in closing.late} == {"c": "malformed_payload"}
    store.put_bytes(LAYOUT.update_payload("c", "r1", hashlib.sha256(payload).hexdigest()), payload)
    first = run_aggregation(store, "r1", build_strategy("fedavg"), min_clients=1)
    candidate = store.get_bytes(LAYOUT.candidate_payload("r1"))[0]
    assert [v.client_id for v in first.updates if v.accepted] == ["a", "b"]
    run_aggregation(store, "r1", build_strategy("fedavg"), min_clients=1)
    assert store.get_bytes(LAYOUT.candidate_payload("r1"))[0] == candidate


def test_file_store_commit_time_comes_from_the_store_not_the_writer(tmp_path, monkeypatch):
    """A client whose clock is 15 minutes slow cannot make a late update look on time."""
    store = open_store((tmp_path / "bucket").as_uri(), create=True)
    manifest = publish_model(store, tiny_model(), version="init", model=TINY_SPEC)
    set_current_model(store, manifest, expected_generation=0)
    opened = utcnow() - timedelta(minutes=20)
    task = open_round(store, round_id="r1", opened_at=opened, deadline_seconds=600, training=TINY_TRAINING)
    real_time_ns = time.time_ns
    monkeypatch.setattr("fedbucket.protocol.storage.time.time_ns", lambda: real_time_ns() - 15 * 60 * 10**9)
    upload_update(store, task, "slow-clock", write_delta(tmp_path), num_examples=5, check_deadline=False)
    monkeypatch.undo()
    info = store.stat(LAYOUT.update_manifest("slow-clock", "r1"))
    assert info.generation < (task.deadline.timestamp() * 1e9)  # the writer's stamp says "on time"...
    assert abs((info.updated - utcnow()).total_seconds()) < 600  # ...the store's clock says now
    survey = survey_round(store, task)
    assert [v.code for v in survey.rejected] == ["late"] and not survey.on_time


TINY_TRAINING = FederationConfig(bucket="file:///unused").training


def write_delta(tmp_path: Path) -> Path:
    path = tmp_path / "delta.safetensors"
    path.write_bytes(tensors_to_bytes(small_delta()))
    return path


def test_unsafe_path_ids_are_counted_in_the_report(store, open_task, tmp_path):
    submit(store, open_task, "a", tmp_path)
    store.put_bytes("updates/bad id!/r1/manifest.json", b"{}")
    closing = freeze_round(store, open_task, reason="quorum", closed_at=utcnow())
    assert closing.ignored_objects == 1 and len(closing.updates) == 1
    run_aggregation(store, "r1", build_strategy("fedavg"), min_clients=1)
    write_evaluation(store, "r1", candidate=0.9, current=0.5)
    report = build_round_report(store, "r1", GATE)
    assert report.ignored_objects == 1


# -- the file store refuses what could block or exhaust it --------------------------------------


def test_file_store_never_blocks_on_a_fifo_nor_follows_a_symlink(tmp_path, open_task_file):
    store, task = open_task_file
    root = Path(store.root)
    submit(store, task, "honest", tmp_path)
    (root / "updates" / "fifo" / "r1").mkdir(parents=True)
    os.mkfifo(root / "updates" / "fifo" / "r1" / "manifest.json")
    (root / "updates" / "zero" / "r1").mkdir(parents=True)
    (root / "updates" / "zero" / "r1" / "manifest.json").symlink_to("/dev/zero")
    (root / "updates" / "alias").symlink_to(root / "updates" / "honest")
    big = root / "updates" / "big" / "r1"
    big.mkdir(parents=True)
    (big / "manifest.json").write_bytes(b" " * (10 * 1024 * 1024))

    result: dict[str, RoundSurvey] = {}
    worker = threading.Thread(target=lambda: result.setdefault("survey", survey_round(store, task)), daemon=True)
    worker.start()
    worker.join(timeout=120)  # a FIFO would block an open() forever; this must simply finish
    assert not worker.is_alive(), "the survey blocked"
    survey = result["survey"]
    assert [u.manifest.client_id for u in survey.on_time] == ["honest"]
    assert {v.client_id: v.code for v in survey.rejected} == {"big": "invalid_manifest"}
    for name in ("updates/fifo/r1/manifest.json", "updates/zero/r1/manifest.json", "updates/alias/r1/manifest.json"):
        with pytest.raises(StorageError):
            store.get_bytes(name, max_bytes=1024)


@pytest.fixture
def open_task_file(tmp_path) -> tuple[FileStore, RoundTask]:
    store = open_store((tmp_path / "bucket").as_uri(), create=True)
    manifest = publish_model(store, tiny_model(), version="init", model=TINY_SPEC)
    set_current_model(store, manifest, expected_generation=0)
    task = open_round(store, round_id="r1", opened_at=utcnow(), deadline_seconds=3600, training=TINY_TRAINING)
    return store, task  # type: ignore[return-value]


def test_a_missing_file_root_is_an_error_and_creates_nothing(tmp_path):
    typo = tmp_path / "no-such-federation"
    with pytest.raises(StorageError, match="does not exist"):
        open_store(typo.as_uri())
    assert not typo.exists()


# -- numbers ---------------------------------------------------------------------------------------


def integer_model(count: int) -> dict[str, np.ndarray]:
    return {"w": np.zeros(3, np.float32), "count": np.array(count, dtype=np.int64)}


def integer_round(tmp_path: Path, base: int, deltas: dict[str, int], examples: dict[str, int], **task_kw) -> bytes:
    store = open_store((tmp_path / "bucket").as_uri(), create=True)
    manifest = publish_model(store, integer_model(base), version="init", model=TINY_SPEC)
    set_current_model(store, manifest, expected_generation=0)
    task = open_round(
        store, round_id="r1", opened_at=utcnow(), deadline_seconds=3600, training=TINY_TRAINING, **task_kw
    )
    for client, value in deltas.items():
        submit(store, task, client, tmp_path, examples=examples[client], delta=integer_model(value))
    run_aggregation(store, "r1", build_strategy("fedavg"), min_clients=1)
    return store


def test_integer_buffers_round_half_to_even_exactly(tmp_path):
    """Counts 1, 1, 8 and deltas -2, 3, 3: the mean is exactly 2.5, which rounds to 2 (even)."""
    store = integer_round(tmp_path, 10, {"a": -2, "b": 3, "c": 3}, {"a": 1, "b": 1, "c": 8})
    path = tmp_path / "candidate.safetensors"
    store.download_file(LAYOUT.candidate_payload("r1"), path)
    from fedbucket import load_tensors

    assert int(load_tensors(path)["count"]) == 12


def test_integer_buffers_beyond_2_53_survive(tmp_path):
    base = 2**60 + 1  # not representable in float64
    store = integer_round(tmp_path, base, {"a": 0, "b": 1}, {"a": 3, "b": 1})  # mean 0.25 -> 0
    path = tmp_path / "candidate.safetensors"
    store.download_file(LAYOUT.candidate_payload("r1"), path)
    from fedbucket import load_tensors

    assert int(load_tensors(path)["count"]) == base


def test_a_claim_of_a_trillion_examples_is_clamped_to_the_cap(store, tmp_path):
    manifest = publish_model(store, tiny_model(), version="init", model=TINY_SPEC)
    set_current_model(store, manifest, expected_generation=0)
    task = open_round(
        store, round_id="r1", opened_at=utcnow(), deadline_seconds=3600, training=TINY_TRAINING,
        max_examples_per_update=1000,
    )  # fmt: skip
    submit(store, task, "honest-1", tmp_path, examples=1000)
    submit(store, task, "honest-2", tmp_path, examples=1000)
    submit(store, task, "greedy", tmp_path, examples=10**12)
    report = run_aggregation(store, "r1", build_strategy("fedavg"), min_clients=1)
    verdicts = {v.client_id: v for v in report.updates}
    assert verdicts["greedy"].accepted and verdicts["greedy"].num_examples == 10**12
    assert verdicts["greedy"].weight == pytest.approx(1 / 3)
    assert "clamped to the round's cap of 1000" in verdicts["greedy"].reason


# -- a promotion is what the pointer says -------------------------------------------------------


def write_evaluation(store: ObjectStore, round_id: str, *, candidate: float, current: float) -> None:
    def metrics(version: str, accuracy: float) -> ModelMetrics:
        per_class = {"0": ClassMetrics(precision=accuracy, recall=accuracy, f1=accuracy, support=10)}
        return ModelMetrics(
            version=version, loss=1 - accuracy, accuracy=accuracy, macro_f1=accuracy, finite=True, per_class=per_class
        )

    validation = SplitMetrics(examples=10, candidate=metrics(round_id, candidate), current=metrics("init", current))
    report = EvaluationReport(round_id=round_id, validation=validation)
    write_document(store, LAYOUT.evaluation_report(round_id), report)


def two_candidates_on_init(store: ObjectStore, tmp_path: Path) -> None:
    manifest = publish_model(store, tiny_model(), version="init", model=TINY_SPEC)
    set_current_model(store, manifest, expected_generation=0)
    for round_id in ("ra", "rb"):
        task = open_round(store, round_id=round_id, opened_at=utcnow(), deadline_seconds=3600, training=TINY_TRAINING)
        submit(store, task, f"client-{round_id}", tmp_path)
        freeze_round(store, task, reason="quorum", closed_at=utcnow())
        run_aggregation(store, round_id, build_strategy("fedavg"), min_clients=1)
        write_evaluation(store, round_id, candidate=0.9, current=0.5)


def test_two_promoters_race_and_each_report_tells_the_truth(store, tmp_path):
    two_candidates_on_init(store, tmp_path)
    barrier = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def promote(round_id: str) -> None:
        barrier.wait()
        try:
            promote_candidate(store, round_id)
            outcomes[round_id] = "promoted"
        except PreconditionFailed:
            outcomes[round_id] = "lost"

    threads = [threading.Thread(target=promote, args=(r,)) for r in ("ra", "rb")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    pointer, _ = current_model(store)
    statuses = {r: build_round_report(store, r, GATE).status for r in ("ra", "rb")}
    assert sorted(outcomes.values()) == ["lost", "promoted"]  # exactly one compare-and-swap won
    assert sorted(statuses.values()) == ["promoted", "superseded"]
    winner = next(r for r, s in statuses.items() if s == "promoted")
    assert pointer.version == winner  # promoted means the pointer moved there
    # a retry of the loser neither "succeeds" nor moves the pointer
    loser = "rb" if winner == "ra" else "ra"
    with pytest.raises(PreconditionFailed):
        promote_candidate(store, loser)
    assert build_round_report(store, loser, GATE).status == "superseded"


def test_a_published_copy_that_lost_the_swap_is_not_a_promotion(store, tmp_path):
    """rb published models/rb/ and then lost the compare-and-swap to ra (the race's bad interleaving)."""
    two_candidates_on_init(store, tmp_path)
    promote_candidate(store, "ra")
    store.copy(LAYOUT.candidate_payload("rb"), LAYOUT.model_payload("rb"))
    store.copy(LAYOUT.candidate_manifest("rb"), LAYOUT.model_manifest("rb"))
    report = build_round_report(store, "rb", GATE)
    assert report.status == "superseded" and report.promoted_version is None
    assert "had moved on from init" in report.message  # names no later model: a re-run writes the same bytes


def test_a_failed_pointer_write_is_reported_as_failed(store, tmp_path, monkeypatch):
    two_candidates_on_init(store, tmp_path)
    original = type(store).put_bytes

    def disk_full(self, name, data, **kw):
        if name == LAYOUT.current_model:
            raise StorageError(f"{self.url}/{name}: No space left on device")
        return original(self, name, data, **kw)

    monkeypatch.setattr(type(store), "put_bytes", disk_full)
    with pytest.raises(StorageError) as failure:
        promote_candidate(store, "ra")
    monkeypatch.undo()
    assert store.exists(LAYOUT.model_manifest("ra"))  # published, but not current
    report = build_round_report(store, "ra", GATE, promote_error=str(failure.value))
    assert report.status == "failed" and "did not move the pointer" in report.message
    assert report.message.endswith("No space left on device")  # the reason, as the promote step saw it
    assert build_round_report(store, "ra", GATE).message.endswith("(see the promote task log)")


# -- decision functions ---------------------------------------------------------------------------


def survey_at(*times: datetime) -> RoundSurvey:
    from fedbucket.protocol.documents import ClosedUpdate

    updates = []
    for i, at in enumerate(times):
        manifest = UpdateManifest(
            client_id=f"c{i}", round_id="r", base_model_version="init", num_examples=1,
            sha256="0" * 64, size_bytes=1, created_at=at,
        )  # fmt: skip
        updates.append(ClosedUpdate(manifest=manifest, committed_at=at, payload_generation=1))
    return RoundSurvey(on_time=updates)


def test_wait_decision():
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    deadline = t0 + timedelta(seconds=600)
    settings = RoundSettings(
        min_clients=2, max_clients=4, grace_seconds=30, settle_seconds=5, min_clients_at_deadline=1
    )
    at = [t0 + timedelta(seconds=s) for s in (10, 20, 25, 26)]
    assert (
        wait_decision(survey_at(at[0]), now=t0 + timedelta(seconds=100), deadline=deadline, settings=settings) is None
    )
    # quorum reached at the 2nd commit (t0+20s); the grace period counts from that commit
    two = survey_at(*at[:2])
    assert wait_decision(two, now=t0 + timedelta(seconds=49), deadline=deadline, settings=settings) is None
    assert wait_decision(two, now=t0 + timedelta(seconds=50), deadline=deadline, settings=settings) == "quorum"
    assert wait_decision(survey_at(*at), now=t0 + timedelta(seconds=27), deadline=deadline, settings=settings) == (
        "max_clients"
    )
    late = deadline + timedelta(seconds=5)
    assert wait_decision(survey_at(at[0]), now=late, deadline=deadline, settings=settings) == "deadline"
    assert wait_decision(survey_at(), now=late, deadline=deadline, settings=settings) == "below_quorum"
    assert wait_decision(survey_at(), now=late - timedelta(seconds=1), deadline=deadline, settings=settings) is None


def test_gate_decision():
    def evaluation(candidate: float, current: float, loss: float = 0.5) -> EvaluationReport:
        def m(version: str, accuracy: float, loss: float) -> ModelMetrics:
            return ModelMetrics(
                version=version, loss=loss, accuracy=accuracy, macro_f1=accuracy, finite=np.isfinite(loss)
            )

        validation = SplitMetrics(examples=1, candidate=m("r", candidate, loss), current=m("i", current, 0.5))
        return EvaluationReport(round_id="r", validation=validation)

    assert gate_decision(evaluation(0.80, 0.81), GateSettings(tolerance=0.02)).passed
    assert not gate_decision(evaluation(0.78, 0.81), GateSettings(tolerance=0.02)).passed
    assert gate_decision(evaluation(0.5, 0.5, loss=0.4), GateSettings(metric="loss")).passed
    assert not gate_decision(evaluation(0.5, 0.5, loss=0.6), GateSettings(metric="loss")).passed
    refused = gate_decision(evaluation(0.9, 0.5, loss=float("nan")), GateSettings())
    assert not refused.passed and "not finite" in refused.message


def test_round_id_for():
    run_after = datetime(2026, 11, 25, 12, 0, 1, tzinfo=UTC)
    assert round_id_for(None, run_after) == "20261125T120001Z"
    assert round_id_for(datetime(2026, 3, 1, tzinfo=UTC), run_after) == "20260301T000000Z"
    assert round_id_for(None, run_after, "my-round") == "my-round"
    with pytest.raises(Exception, match="not a valid identifier"):
        round_id_for(None, run_after, "../escape")


def test_run_settings_resolve_and_refuse():
    config = FederationConfig(bucket="file:///f", round={"min_clients": 3, "min_clients_at_deadline": 2})
    run = RunSettings.resolve(config, "r1", {"min_clients": 4, "strategy": "fedavgm", "max_clients": None})
    assert run.round.min_clients == 4 and run.aggregation.strategy == "fedavgm" and run.aggregation_quorum == 2
    assert RunSettings.model_validate_json(run.model_dump_json()) == run  # one document, parsed by every step
    with pytest.raises(ConfigError, match="unknown run parameter"):
        RunSettings.resolve(config, "r1", {"min_client": 4})
    with pytest.raises(ConfigError, match="takes no option"):
        RunSettings.resolve(config, "r1", {"strategy_options": {"bogus": 1}})
    with pytest.raises(ConfigError, match="max_clients must be at least min_clients"):
        RunSettings.resolve(config, "r1", {"max_clients": 2})


def test_config_file_with_bad_strategy_options_is_refused(tmp_path):
    path = tmp_path / "federation.toml"
    path.write_text('bucket = "file:///f"\n[aggregation]\nstrategy = "fedavg"\noptions = { momentum = 0.9 }\n')
    with pytest.raises(ConfigError, match="takes no option"):
        FederationConfig.load(path)


def test_object_info_commit_time_is_timezone_aware(store, open_task, tmp_path):
    submit(store, open_task, "a", tmp_path)
    info: ObjectInfo = store.stat(LAYOUT.update_manifest("a", "r1"))
    assert info.updated.tzinfo is not None and abs((info.updated - utcnow()).total_seconds()) < 3600
