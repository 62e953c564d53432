"""Promotion: the gate a candidate must pass, and the compare-and-swap that makes it current.

A promotion is what ``models/current.json`` says, nothing else. The candidate is published as
``models/<round>/`` first (so the pointer never names a missing model) and the pointer is then
moved by compare-and-swap, only from the candidate's own base. So the models the pointer has
named form a chain through ``base_version``, and "round R was promoted" means exactly "R is on
the chain from the current model back" (:func:`was_promoted`) — a published copy that lost the
swap is not on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedbucket.protocol.documents import (
    EvaluationReport,
    FederatedMetrics,
    ModelManifest,
    ModelMetrics,
    read_document,
    read_optional,
    write_document,
)
from fedbucket.protocol.errors import PreconditionFailed
from fedbucket.protocol.layout import LAYOUT, BucketLayout
from fedbucket.protocol.storage import ObjectStore
from fedbucket.server.config import GateSettings
from fedbucket.server.evaluation import gate_difference
from fedbucket.server.rounds import current_model, set_current_model

#: A bound on the walk back through the model chain (a chain that long is a corrupted bucket).
MAX_CHAIN = 100_000


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    message: str


def gate_decision(evaluation: EvaluationReport, gate: GateSettings) -> GateDecision:
    """Whether the candidate may replace the round's base model, and why (deterministic text).

    ``gate.source`` names the figures it compares: the server's validation split (``holdout``),
    the clients' scores (``federated``: the trimmed, example-weighted mean of their paired
    differences, see :func:`~fedbucket.server.evaluation.federated_metrics`) or both, each of
    which must pass. A source the gate needs but the evaluation lacks (no validation split, fewer
    accepted client reports than the quorum) fails the gate: no figure, no promotion.
    """
    checks: list[tuple[bool, str]] = []
    if gate.source in ("holdout", "both"):
        if evaluation.validation is None:
            checks.append(
                (False, f"no validation split on the server ({LAYOUT.validation_split}; gate.source needs it)")
            )
        else:
            validation = evaluation.validation
            checks.append(_compare("validation", validation.candidate, validation.current, gate))
    if gate.source in ("federated", "both"):
        checks.append(_federated_check(evaluation.federated, gate))
    return GateDecision(all(passed for passed, _ in checks), "; ".join(message for _, message in checks))


def _federated_check(federated: FederatedMetrics | None, gate: GateSettings) -> tuple[bool, str]:
    if federated is None:
        return False, "federated: the candidate was never published to clients for scoring"
    if federated.reports < federated.quorum or federated.candidate is None or federated.current is None:
        return False, (
            f"federated evaluation below quorum: {federated.reports} accepted report(s) of {federated.quorum} "
            f"needed ({len(federated.rejected)} rejected)"
        )
    if not federated.candidate.finite:
        return False, "federated: the candidate's losses are not finite on some clients' data (it diverged)"
    new, old = getattr(federated.candidate, gate.metric), getattr(federated.current, gate.metric)
    pooled = f"pooled {gate.metric} {new:.4f} vs {old:.4f}"
    if federated.difference is None:  # the base diverged and the candidate did not
        return True, f"federated: the base model's losses are not finite, the candidate's are ({pooled})"
    passed = federated.difference >= -gate.tolerance
    relation = "within" if passed else "outside"
    return passed, (
        f"federated: candidate {gate.metric} {federated.difference:+.4f} vs current (trimmed mean over "
        f"{len(federated.used)} client(s), {len(federated.trimmed)} trimmed; {pooled}): {relation} the tolerance "
        f"{gate.tolerance:g}"
    )


def gate_figures(evaluation: EvaluationReport, gate: GateSettings) -> ModelMetrics | None:
    """The candidate's figures from the gate's first source (what an Asset event quotes)."""
    if gate.source != "federated" and evaluation.validation is not None:
        return evaluation.validation.candidate
    return evaluation.federated.candidate if evaluation.federated is not None else None


def _compare(source: str, candidate: ModelMetrics, current: ModelMetrics, gate: GateSettings) -> tuple[bool, str]:
    if not candidate.finite or not all(math.isfinite(getattr(candidate, m)) for m in ("accuracy", "macro_f1")):
        return False, f"{source}: candidate metrics are not finite"
    passed = gate_difference(gate.metric, candidate, current) >= -gate.tolerance
    new, old = getattr(candidate, gate.metric), getattr(current, gate.metric)
    relation = "within" if passed else "outside"
    return passed, (
        f"{source}: candidate {gate.metric} {new:.4f} vs current {old:.4f}: {relation} the tolerance {gate.tolerance:g}"
    )


def was_promoted(store: ObjectStore, candidate: ModelManifest, *, layout: BucketLayout = LAYOUT) -> bool:
    """Whether ``candidate`` (these very bytes: version and sha256) is, or once was, the current
    model: it lies on the chain from the current model back through ``base_version``, walked no
    further than the candidate's own base."""
    pointer, _ = current_model(store, layout=layout)
    if pointer.version == candidate.version:
        return pointer.sha256 == candidate.sha256
    version: str | None = pointer.version
    for _ in range(MAX_CHAIN):
        if version is None or version == candidate.base_version:
            return False
        manifest, _ = read_optional(store, layout.model_manifest(version), ModelManifest)
        if manifest is None:
            return False
        if manifest.base_version == candidate.version:  # the chain passes through this version
            published, _ = read_optional(store, layout.model_manifest(candidate.version), ModelManifest)
            return published is not None and published.sha256 == candidate.sha256
        version = manifest.base_version
    return False


@dataclass(frozen=True)
class Promotion:
    manifest: ModelManifest
    moved: bool  # False: this candidate was already promoted by an earlier run; nothing changed


def promote_candidate(store: ObjectStore, round_id: str, *, layout: BucketLayout = LAYOUT) -> Promotion:
    """Make round ``round_id``'s candidate the current model.

    Publishes it as ``models/<round_id>/`` (create-only; a retry finds the same bytes there), then
    moves ``models/current.json`` by compare-and-swap from the candidate's base. If it was promoted
    before, nothing changes (``moved=False``). Raises :class:`PreconditionFailed` when the pointer
    has moved past the base (another promotion won, or this is a re-run of an old round): the
    pointer never goes backwards.
    """
    candidate, _ = read_document(store, layout.candidate_manifest(round_id), ModelManifest)
    if was_promoted(store, candidate, layout=layout):
        return Promotion(candidate, moved=False)
    pointer, generation = current_model(store, layout=layout)
    if pointer.version != candidate.base_version:
        raise PreconditionFailed(
            f"candidate of round {round_id} was built on model {candidate.base_version!r}, but the current "
            f"model is {pointer.version!r}: not promoted"
        )
    published, _ = read_optional(store, layout.model_manifest(candidate.version), ModelManifest)
    if published is not None and published.sha256 != candidate.sha256:
        raise PreconditionFailed(f"model version {candidate.version!r} already exists with other bytes")
    if published is None:  # publish first, then move the pointer: a crash in between is finished on retry
        store.copy(layout.candidate_payload(round_id), layout.model_payload(candidate.version))
        try:
            write_document(store, layout.model_manifest(candidate.version), candidate, if_generation_match=0)
        except PreconditionFailed:  # a concurrent promoter got there first
            published, _ = read_document(store, layout.model_manifest(candidate.version), ModelManifest)
            if published.sha256 != candidate.sha256:
                raise
    set_current_model(store, candidate, expected_generation=generation)
    return Promotion(candidate, moved=True)
