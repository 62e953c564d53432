"""The round report: how a round ended, built only from what the round left in the bucket.

The status follows the bucket, never a task's say-so: ``promoted`` means the model pointer moved
to this round's candidate (:func:`~fedbucket.server.promotion.was_promoted`). Building the report
twice from the same bucket gives the same bytes, so a re-run of a round reproduces its report.
"""

from __future__ import annotations

from fedbucket.protocol.documents import (
    AggregationReport,
    EvaluationReport,
    ModelManifest,
    RoundClosing,
    RoundPrivacy,
    RoundReport,
    RoundTask,
    UpdateVerdict,
    read_document,
    read_optional,
)
from fedbucket.protocol.layout import LAYOUT, BucketLayout
from fedbucket.protocol.storage import ObjectStore
from fedbucket.server.config import GateSettings
from fedbucket.server.promotion import gate_decision, was_promoted
from fedbucket.server.rounds import current_model


def build_round_report(
    store: ObjectStore,
    round_id: str,
    gate: GateSettings,
    *,
    promote_error: str | None = None,
    epsilon_budget: float | None = None,
    layout: BucketLayout = LAYOUT,
) -> RoundReport:
    """The report of round ``round_id``: promoted, rejected (by the gate), superseded (the gate
    passed but another model became current first), abandoned (below quorum) or failed (a step
    did not finish; the message names it, with ``promote_error`` when the promote step failed)."""
    task, _ = read_document(store, layout.round_task(round_id), RoundTask)
    closing, _ = read_optional(store, layout.round_closing(round_id), RoundClosing)
    aggregation, _ = read_optional(store, layout.aggregation_report(round_id), AggregationReport)
    evaluation, _ = read_optional(store, layout.evaluation_report(round_id), EvaluationReport)
    candidate, _ = read_optional(store, layout.candidate_manifest(round_id), ModelManifest)
    if aggregation is not None:
        updates = list(aggregation.updates)
    elif closing is not None:  # the on-time updates were never validated
        updates = [
            UpdateVerdict(
                client_id=u.manifest.client_id,
                accepted=False,
                code="not_aggregated",
                reason="the round ended before aggregation; the update was not validated or used",
                num_examples=u.manifest.num_examples,
                committed_at=u.committed_at,
            )
            for u in closing.updates
        ] + list(closing.late)
    else:
        updates = []
    metrics = {}
    if evaluation is not None:  # every source the evaluation had, gating or not (test is reported only)
        metrics = evaluation.model_dump(mode="json", exclude={"schema_version", "round_id"}, exclude_none=True)

    decision = gate_decision(evaluation, gate) if evaluation is not None else None
    if candidate is not None and decision is not None and was_promoted(store, candidate, layout=layout):
        status, message = "promoted", f"promoted: {decision.message}"  # the pointer says so, whatever else
    elif closing is None:
        status, message = "failed", "the round never closed: the wait step did not finish (see its task log)"
    elif closing.reason == "below_quorum" or (aggregation is not None and aggregation.status == "below_quorum"):
        valid = sum(1 for u in updates if u.accepted)
        status = "abandoned"
        message = f"abandoned: {len(closing.updates)} update(s) by the close, {valid} valid; quorum not reached"
        if aggregation is not None and aggregation.status == "below_quorum" and aggregation.message:
            message = f"abandoned: {aggregation.message}"  # the aggregation's own reason
    elif aggregation is None or candidate is None:
        status, message = "failed", "aggregation did not finish (see the aggregate task log)"
    elif evaluation is None or decision is None:
        status, message = "failed", _unfinished_evaluation(store, round_id, gate, layout)
    elif not decision.passed:
        status, message = "rejected", f"gate refused: {decision.message}"
    elif over_budget := _over_budget(aggregation, epsilon_budget):
        status, message = "rejected", over_budget
    elif current_model(store, layout=layout)[0].version != candidate.base_version:
        status = "superseded"  # the message names no later model: a re-run must write the same bytes
        message = (
            f"the gate passed ({decision.message}), but the current model had moved on from "
            f"{candidate.base_version} before this candidate could replace it: not promoted"
        )
    else:
        status = "failed"
        reason = f": {promote_error}" if promote_error else " (see the promote task log)"
        message = f"the gate passed ({decision.message}) but the promote step did not move the pointer{reason}"
    return RoundReport(
        round_id=round_id,
        status=status,
        base_model_version=task.base_model_version,
        candidate_sha256=candidate.sha256 if candidate else None,
        promoted_version=candidate.version if status == "promoted" and candidate else None,
        message=message,
        updates=updates,
        ignored_objects=closing.ignored_objects if closing else 0,
        metrics=metrics,
        privacy=aggregation.privacy if aggregation is not None else None,
    )


def _over_budget(aggregation: AggregationReport, budget: float | None) -> str:
    privacy = aggregation.privacy
    if privacy is None or budget is None or privacy.spent.epsilon <= budget:
        return ""
    return f"not promoted: epsilon {privacy.spent.epsilon:.3f} is past the privacy budget of {budget:g}"


def _unfinished_evaluation(store: ObjectStore, round_id: str, gate: GateSettings, layout: BucketLayout) -> str:
    """Which evaluation step did not finish, from what it left in the bucket."""
    if gate.source != "holdout":
        if not store.exists(layout.evaluation_task(round_id)):
            return "the candidate was not published for scoring (see the request_evaluation task log)"
        if not store.exists(layout.evaluation_closing(round_id)):
            return "the wait for the clients' scores did not finish (see the wait_for_evaluations task log)"
    return "evaluation did not finish (see the evaluate task log)"


def summary_lines(report: RoundReport) -> list[str]:
    """The human summary of a round for the task log."""
    accepted = [u for u in report.updates if u.accepted]
    rejected = [u for u in report.updates if not u.accepted]
    lines = [
        f"round {report.round_id}: {report.status.upper()} — {report.message}",
        f"  base model {report.base_model_version}; {len(accepted)} update(s) accepted, {len(rejected)} rejected",
    ]
    lines += [f"  ACCEPT {u.client_id:16s} {u.num_examples:6d} examples  weight {u.weight:.3f}" for u in accepted]
    lines += [f"  REJECT {u.client_id:16s} {u.code}: {u.reason}" for u in rejected]
    if report.ignored_objects:
        lines.append(f"  IGNORED {report.ignored_objects} object(s) under updates/ with unsafe path ids")
    validation, federated, test = (report.metrics.get(k) for k in ("validation", "federated", "test"))
    for source, figures in (("validation", validation), ("federated", federated)):
        if figures and figures.get("candidate"):
            for label in ("current", "candidate"):
                lines.append(f"  {source:10s} {label:9s} {_figures(figures[label])}")
    if federated:
        lines.append(
            f"  federated: {federated['reports']} report(s), {len(federated['used'])} pooled "
            f"({federated['examples']} examples), trimmed {', '.join(federated['trimmed']) or 'none'}"
        )
        lines += [f"  REJECT EVALUATION {u['client_id']:16s} {u['code']}: {u['reason']}" for u in federated["rejected"]]
    if test:
        lines.append(f"  test (reported only) candidate {_figures(test)}")
    if report.privacy is not None:
        lines.append(privacy_line(report.privacy))
    return lines


def privacy_line(privacy: RoundPrivacy) -> str:
    """One line on what a differentially private round spent (task logs, ``fedbucket status``)."""
    m, spent = privacy.mechanism, privacy.spent
    budget = f" of a budget of {spent.budget:g}" if spent.budget is not None else ""
    sampled = f", Poisson-sampled q={m.sampling_rate:g}" if m.sampling_rate is not None else ", no amplification"
    return (
        f"  privacy: epsilon {spent.epsilon:.3f}{budget} at delta {spent.delta:g} after {spent.rounds} DP round(s) "
        f"(worst client: {spent.most_rounds_per_client} of at most {spent.max_participations}); this round z="
        f"{m.noise_multiplier:g}, clip norm {m.clip_norm:.4g} -> {m.next_clip_norm:.4g}, n-bar {m.denominator:g}, "
        f"noise std {m.noise_stddev:.3g}{sampled}"
    )


def _figures(m: dict) -> str:
    return f"{m['version']}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  loss {m['loss']:.4f}"
