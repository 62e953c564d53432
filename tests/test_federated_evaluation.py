"""Federated evaluation without Airflow: pooling and trimming of client scores, the gate on
federated figures, the round pointer through the evaluation phase, and the client's view of it."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from conftest import TINY_SPEC, tiny_model
from fedbucket import Client
from fedbucket.protocol.documents import (
    ClientEvaluation,
    ClosedEvaluation,
    EvaluationClosing,
    EvaluationReport,
    EvaluationTask,
    ModelManifest,
    ModelScore,
    RoundPointer,
    read_document,
    sha256_file,
    utcnow,
    write_document,
)
from fedbucket.protocol.layout import LAYOUT
from fedbucket.protocol.storage import ObjectStore
from fedbucket.protocol.tensors import read_header_file, save_tensors
from fedbucket.server.config import EvaluationSettings, GateSettings
from fedbucket.server.evaluation import federated_metrics
from fedbucket.server.promotion import gate_decision
from fedbucket.server.rounds import (
    close_round,
    freeze_evaluations,
    publish_model,
    request_evaluation,
    set_current_model,
)

NOW = utcnow()


def scoring_task(trim: float = 0.1, min_reports: int = 3) -> EvaluationTask:
    return EvaluationTask(
        round_id="r", candidate_sha256="a" * 64, base_model_version="init", base_model_sha256="b" * 64,
        model={"name": "mlp"}, num_classes=2, opened_at=NOW, deadline=NOW + timedelta(minutes=5),
        min_reports=min_reports, trim_fraction=trim,
    )  # fmt: skip


def score(examples: int, correct: int, loss_sum: float = 1.0, non_finite: int = 0) -> ModelScore:
    """A 2-class score: ``correct`` of ``examples`` right, all of class 0 (errors predicted as 1)."""
    return ModelScore(
        examples=examples, loss_sum=loss_sum, non_finite=non_finite, true_positive=[correct, 0],
        false_positive=[0, examples - correct], false_negative=[examples - correct, 0],
    )  # fmt: skip


def closing(*reports: tuple[str, ModelScore, ModelScore]) -> EvaluationClosing:
    closed = [
        ClosedEvaluation(
            report=ClientEvaluation(
                client_id=client, round_id="r", candidate_sha256="a" * 64, base_model_version="init",
                candidate=candidate, current=current, created_at=NOW,
            ),
            committed_at=NOW,
        )
        for client, candidate, current in reports
    ]  # fmt: skip
    return EvaluationClosing(round_id="r", closed_at=NOW, reason="quorum", reports=closed)


def test_a_forged_perfect_score_is_trimmed_and_the_gate_compares_the_honest_ones():
    honest = [(f"c{i}", score(100, 80 + i), score(100, 78)) for i in range(4)]  # +2 .. +5 points
    forged = ("mallory", score(100_000, 100_000), score(100_000, 0))  # a perfect candidate, 1000x the examples
    metrics = federated_metrics(closing(*honest, forged), scoring_task(), metric="accuracy", candidate_version="r")
    assert metrics.trimmed == ["c0", "mallory"]  # ceil(0.1 * 5) = 1 from each end
    assert metrics.used == ["c1", "c2", "c3"]
    assert metrics.difference == pytest.approx((0.03 + 0.04 + 0.05) / 3)  # equal weights: 100 examples each
    assert metrics.examples == 300 and metrics.candidate.accuracy == pytest.approx(0.82)
    assert gate_decision(EvaluationReport(round_id="r", federated=metrics), GateSettings(source="federated")).passed


def test_trimming_bounds_a_kept_liar_by_the_honest_range_even_for_macro_f1():
    """A report that is not extreme is kept, and the weighted mean of differences lies within the
    kept reports' range: with huge weight it can pull the figure towards its own difference, which
    lies between honest ones, and no further (pooled counts would not have that property for F1)."""
    honest = [(f"c{i}", score(50, 30 + 3 * i), score(50, 35)) for i in range(5)]
    liar = ("liar", score(100_000, 60_000), score(100_000, 61_000))
    metrics = federated_metrics(closing(*honest, liar), scoring_task(), metric="macro_f1", candidate_version="r")
    assert "liar" in metrics.used
    kept = [
        federated_metrics(closing(report), scoring_task(trim=0.0, min_reports=1), metric="macro_f1",
                          candidate_version="r").difference
        for report in [*honest, liar] if report[0] in metrics.used
    ]  # fmt: skip
    assert min(kept) <= metrics.difference <= max(kept)


@pytest.mark.parametrize(("n", "trim", "k"), [(1, 0.1, 0), (2, 0.1, 0), (3, 0.1, 1), (100, 0.07, 7), (50, 0.14, 7)])
def test_how_many_reports_are_trimmed(n, trim, k):
    reports = [(f"c{i:03d}", score(10, i % 10), score(10, 5)) for i in range(n)]
    metrics = federated_metrics(closing(*reports), scoring_task(trim=trim), metric="accuracy", candidate_version="r")
    assert len(metrics.trimmed) == 2 * k and len(metrics.used) == n - 2 * k


def test_a_diverged_candidate_is_refused_and_below_quorum_is_refused():
    diverged = [(f"c{i}", score(10, 9, non_finite=10, loss_sum=0.0), score(10, 5)) for i in range(3)]
    metrics = federated_metrics(closing(*diverged), scoring_task(), metric="accuracy", candidate_version="r")
    decision = gate_decision(EvaluationReport(round_id="r", federated=metrics), GateSettings(source="federated"))
    assert not decision.passed and "not finite" in decision.message
    few = federated_metrics(closing(("c0", score(10, 9), score(10, 5))), scoring_task(), metric="accuracy",
                            candidate_version="r")  # fmt: skip
    decision = gate_decision(EvaluationReport(round_id="r", federated=few), GateSettings(source="federated"))
    assert not decision.passed and "below quorum: 1 accepted report(s) of 3 needed" in decision.message
    both = gate_decision(EvaluationReport(round_id="r", federated=metrics), GateSettings(source="both"))
    assert not both.passed and "no validation split" in both.message


def test_evaluation_settings_refuse_a_quorum_too_small_to_trim():
    with pytest.raises(ValueError, match="at least 3 reports"):
        EvaluationSettings(min_clients=2)
    with pytest.raises(ValueError, match="at least 3 reports"):
        EvaluationSettings(min_clients=5, min_clients_at_deadline=2)
    assert EvaluationSettings(min_clients=1, trim_fraction=0.0).quorum_at_deadline == 1


def publish_candidate(store: ObjectStore, tmp_path) -> dict[str, np.ndarray]:
    """A federation with model ``init`` and round ``r``'s candidate (the same tensors, halved)."""
    manifest = publish_model(store, tiny_model(), version="init", model=TINY_SPEC)
    set_current_model(store, manifest, expected_generation=0)
    candidate = {k: (v // 2 if v.dtype.kind == "i" else v / 2).astype(v.dtype) for k, v in tiny_model().items()}
    path = tmp_path / "candidate.safetensors"
    save_tensors(candidate, path)
    store.upload_file(LAYOUT.candidate_payload("r"), path)
    header = read_header_file(path)
    write_document(
        store,
        LAYOUT.candidate_manifest("r"),
        ModelManifest(
            version="r", sha256=sha256_file(path), size_bytes=path.stat().st_size, tensors=header.schema(),
            model=TINY_SPEC, base_version="init", round_id="r",
        ),
    )  # fmt: skip
    return candidate


@pytest.mark.parametrize("store_url", ["file"], indirect=True)
def test_the_pointer_goes_to_evaluating_and_never_back(store, store_url, tmp_path):
    expected = publish_candidate(store, tmp_path)
    store.put_bytes(LAYOUT.current_round, RoundPointer(round_id="r", status="open").to_json_bytes())
    close_round(store, "r")
    settings = EvaluationSettings(deadline_seconds=60, min_clients=1, trim_fraction=0.0)
    task = request_evaluation(store, "r", settings, num_classes=4, opened_at=utcnow())
    assert read_document(store, LAYOUT.current_round, RoundPointer)[0].status == "evaluating"
    with Client(store_url, "site-a", cache_dir=tmp_path / "cache") as client:
        seen = client.current_evaluation()
        assert seen == task
        candidate = client.fetch_candidate(seen)
        assert all(np.array_equal(candidate[name], value) for name, value in expected.items())
    freeze_evaluations(store, task, reason="quorum", closed_at=utcnow())
    assert read_document(store, LAYOUT.current_round, RoundPointer)[0].status == "closed"
    again = request_evaluation(store, "r", settings, num_classes=4, opened_at=utcnow() + timedelta(hours=1))
    assert again == task  # a re-run: the same task, the same deadline ...
    assert read_document(store, LAYOUT.current_round, RoundPointer)[0].status == "closed"  # ... no reopening


@pytest.mark.parametrize("store_url", ["file"], indirect=True)
def test_a_client_sees_no_evaluation_past_its_deadline(store, store_url, tmp_path):
    publish_candidate(store, tmp_path)
    store.put_bytes(LAYOUT.current_round, RoundPointer(round_id="r", status="closed").to_json_bytes())
    settings = EvaluationSettings(deadline_seconds=1, min_clients=1, trim_fraction=0.0)
    request_evaluation(store, "r", settings, num_classes=4, opened_at=utcnow() - timedelta(seconds=5))
    with Client(store_url, "site-a", cache_dir=tmp_path / "cache") as client:
        assert client.current_evaluation() is None


@pytest.mark.parametrize("store_url", ["file"], indirect=True)
def test_a_closing_larger_than_a_client_document_reads_back(store):
    """Many 1,000-class reports make a closing over the 4 MiB a client document may have: the
    server reads its own closing with the larger bound (a re-run finds it instead of failing)."""
    classes = [999_999] * 1000
    big = ModelScore(
        examples=10**9, loss_sum=1.0, true_positive=classes, false_positive=classes, false_negative=classes
    )
    frozen = closing(*[(f"c{i:02d}", big, big) for i in range(40)])
    write_document(store, LAYOUT.evaluation_closing("r"), frozen)
    assert store.stat(LAYOUT.evaluation_closing("r")).size > 4 * 1024 * 1024
    task = scoring_task(trim=0.0, min_reports=1)
    assert freeze_evaluations(store, task, reason="quorum", closed_at=utcnow()) == frozen
