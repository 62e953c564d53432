"""The round lifecycle on the bucket: publish models, open a round, decide when its wait ends,
freeze and close it; publish its candidate for federated evaluation, wait for the scores, freeze them.

The round pointer moves ``open`` (clients train) -> ``closed`` -> ``evaluating`` (clients score
the candidate; only when the gate uses federated evaluation) -> ``closed``.

These are write paths only the server (the Airflow DAG, the Spark jobs, ``fedbucket init``)
takes. Each is a transaction on the bucket: payload objects first, documents after them, pointers
last, pointers moved by compare-and-swap. Decisions are pure functions of what the bucket holds
(commit times from the store's clock), so every look at the bucket, and every re-run, agrees.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from fedbucket.protocol.documents import (
    FLOAT_DTYPES,
    MAX_EVALUATION_CLOSING_BYTES,
    ClosedEvaluation,
    ClosedUpdate,
    EvaluationClosing,
    EvaluationTask,
    ModelManifest,
    ModelPointer,
    ModelSpec,
    RoundClosing,
    RoundPointer,
    RoundTask,
    SecureAggregationTask,
    TrainingConfig,
    UpdateVerdict,
    read_document,
    read_optional,
    sha256_file,
    write_document,
)
from fedbucket.protocol.errors import (
    ConfigError,
    InvalidManifest,
    ObjectNotFound,
    PreconditionFailed,
    StorageError,
    UpdateRejected,
)
from fedbucket.protocol.layout import LAYOUT, BucketLayout, check_identifier
from fedbucket.protocol.secagg import ring_levels
from fedbucket.protocol.storage import ObjectInfo, ObjectStore
from fedbucket.protocol.tensors import NUMPY_DTYPES, read_header_file, save_tensors
from fedbucket.protocol.validation import (
    check_client_evaluation,
    list_client_evaluations,
    list_update_manifests,
    precheck_update,
    read_client_evaluation,
    read_update_manifest,
    rejection_verdict,
)
from fedbucket.server.config import EvaluationSettings, SecureAggregationSettings, WaitSettings
from fedbucket.server.privacy import distributed_noise

#: Default hard limit on an update's size: the model's own size plus header slack, times 1.
UPDATE_SIZE_SLACK_BYTES = 1024 * 1024
ROUND_ID_FORMAT = "%Y%m%dT%H%M%SZ"
#: Threads a survey of the bucket reads clients' small objects on (I/O bound: round trips).
SURVEY_THREADS = 8


def round_id_for(logical_date: datetime | None, run_after: datetime, requested: str | None = None) -> str:
    """The round id of a DAG run.

    ``requested`` (the ``round_id`` param of a manual trigger) wins. Otherwise scheduled and
    backfill runs use their logical date (deterministic: a backfill or a clear of the same date
    is the same round), and manual runs (no logical date) the run's ``run_after`` time, fixed when
    the run was created, so a clear-and-rerun of a manual run is the same round too.
    """
    if requested:
        return check_identifier(str(requested), "round id")
    moment = logical_date if logical_date is not None else run_after
    return moment.strftime(ROUND_ID_FORMAT)


def publish_model_file(
    store: ObjectStore,
    path: str | os.PathLike[str],
    *,
    version: str,
    model: ModelSpec,
    base_version: str | None = None,
    round_id: str | None = None,
    lineage: Mapping[str, object] | None = None,
    layout: BucketLayout = LAYOUT,
) -> ModelManifest:
    """Upload a safetensors model as ``models/<version>/`` (create-only; re-publishing the same
    bytes is a no-op, different bytes under an existing version is an error)."""
    header = read_header_file(path)
    manifest = ModelManifest(
        version=version,
        sha256=sha256_file(path),
        size_bytes=Path(path).stat().st_size,
        tensors=header.schema(),
        model=model,
        base_version=base_version,
        round_id=round_id,
        lineage=dict(lineage or {}),
    )
    existing, _ = read_optional(store, layout.model_manifest(version), ModelManifest)
    if existing is not None:
        if existing.sha256 != manifest.sha256:
            raise PreconditionFailed(f"model version {version!r} already exists with other bytes ({existing.sha256})")
        return existing
    # No manifest yet means not published: a payload left by a crashed attempt is replaced.
    store.upload_file(layout.model_payload(version), path)
    write_document(store, layout.model_manifest(version), manifest, if_generation_match=0)
    return manifest


def publish_model(
    store: ObjectStore,
    tensors: Mapping[str, np.ndarray],
    *,
    version: str,
    model: ModelSpec,
    layout: BucketLayout = LAYOUT,
    **lineage: object,
) -> ModelManifest:
    """Serialise a numpy state dict and publish it (see :func:`publish_model_file`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_tensors(tensors, path)
        return publish_model_file(store, path, version=version, model=model, layout=layout, lineage=lineage)


def current_model(store: ObjectStore, *, layout: BucketLayout = LAYOUT) -> tuple[ModelPointer, int]:
    """The promoted model's pointer and its generation; :class:`ObjectNotFound` before ``init``."""
    return read_document(store, layout.current_model, ModelPointer)


def set_current_model(
    store: ObjectStore,
    manifest: ModelManifest,
    *,
    expected_generation: int,
    layout: BucketLayout = LAYOUT,
) -> int:
    """Move ``models/current.json`` to ``manifest``'s version by compare-and-swap.

    ``expected_generation`` is the pointer generation the caller based its decision on (``0``:
    no pointer yet). Raises :class:`PreconditionFailed` if anyone moved it meanwhile.
    """
    pointer = ModelPointer(version=manifest.version, sha256=manifest.sha256, round_id=manifest.round_id)
    return write_document(store, layout.current_model, pointer, if_generation_match=expected_generation)


def open_round(
    store: ObjectStore,
    *,
    round_id: str,
    opened_at: datetime,
    deadline_seconds: float,
    training: TrainingConfig,
    min_clients: int = 1,
    max_clients: int | None = None,
    max_update_norm: float | None = None,
    max_examples_per_update: int | None = None,
    federated_evaluation: bool = False,
    secure_aggregation: SecureAggregationSettings | None = None,
    settle_seconds: float = 0.0,
    distributed_dp: tuple[float, int] | None = None,
    layout: BucketLayout = LAYOUT,
) -> RoundTask:
    """Write ``rounds/<round>/task.json`` based on the current model and point ``rounds/current.json``
    at it. Idempotent: if the task exists it is returned unchanged (a re-run never re-opens a
    round with another base); the pointer only ever moves to a round opened later.

    With ``secure_aggregation`` enabled, ``deadline_seconds`` is phase 1's (train, then post keys)
    and each later phase gets ``phase_seconds``; the task's ``deadline`` is phase 3's (masked
    inputs), and the unmasking deadline also leaves ``settle_seconds`` for the close of phase 3.
    ``distributed_dp`` = (noise multiplier z, fewest survivors): each client adds discrete Gaussian
    noise sized so that the sum of that many inputs is one Gaussian mechanism of multiplier z
    (:func:`~fedbucket.server.privacy.distributed_noise`).
    """
    task, _ = read_optional(store, layout.round_task(round_id), RoundTask)
    if task is None:
        if store.exists(layout.model_manifest(round_id)):  # its candidate would be published under that name
            raise ConfigError(f"round id {round_id!r} is already the version of a model; choose another round id")
        pointer, _ = current_model(store, layout=layout)
        base, _ = read_document(store, layout.model_manifest(pointer.version), ModelManifest)
        deadline = opened_at + timedelta(seconds=deadline_seconds)
        max_update_bytes = base.size_bytes + UPDATE_SIZE_SLACK_BYTES
        secure = None
        if secure_aggregation is not None and secure_aggregation.enabled:
            if max_clients is None:
                raise ConfigError("secure aggregation needs max_clients (the ring holds the sum of that many updates)")
            phase = timedelta(seconds=secure_aggregation.phase_seconds)
            ring = max(3, max_clients)
            noise = None
            if distributed_dp is not None:
                dimension = sum(t.numel for t in base.tensors.values() if t.dtype in FLOAT_DTYPES)
                noise = distributed_noise(
                    noise_multiplier=distributed_dp[0],
                    clip_norm=secure_aggregation.clip_norm,
                    dimension=dimension,
                    max_clients=ring,
                    min_survivors=max(3, distributed_dp[1]),
                )
            keys_deadline = deadline
            deadline = keys_deadline + 2 * phase
            secure = SecureAggregationTask(
                clip_norm=secure_aggregation.clip_norm,
                max_clients=ring,
                degree=secure_aggregation.degree,
                levels=noise.levels if noise is not None else ring_levels(ring),
                noise_stddev=noise.client_stddev if noise is not None else 0.0,
                min_survivors=noise.min_survivors if noise is not None else 3,
                noise_multiplier=distributed_dp[0] if distributed_dp is not None else None,
                keys_deadline=keys_deadline,
                shares_deadline=keys_deadline + phase,
                unmask_deadline=deadline + timedelta(seconds=settle_seconds) + phase,
            )
            # a masked input holds 4 bytes per float element: larger than an F16 model's delta
            max_update_bytes += sum(max(0, 4 - NUMPY_DTYPES[t.dtype].itemsize) * t.numel for t in base.tensors.values())
        task = RoundTask(
            round_id=round_id,
            base_model_version=base.version,
            base_model_sha256=base.sha256,
            model=base.model,
            opened_at=opened_at,
            deadline=deadline,
            training=training,
            tensors=base.tensors,
            max_update_bytes=max_update_bytes,
            min_clients=min_clients,
            max_clients=max_clients,
            max_update_norm=max_update_norm,
            max_examples_per_update=max_examples_per_update,
            federated_evaluation=federated_evaluation,
            secure_aggregation=secure,
        )
        try:
            write_document(store, layout.round_task(round_id), task, if_generation_match=0)
        except PreconditionFailed:
            task, _ = read_document(store, layout.round_task(round_id), RoundTask)  # another writer won
    _point_round_forward(store, task, layout=layout)
    return task


def _point_round_forward(store: ObjectStore, task: RoundTask, *, layout: BucketLayout) -> None:
    """Point ``rounds/current.json`` at ``task`` unless it already does or points at a newer round.

    This finishes an ``open_round`` that crashed between task and pointer, and keeps a re-run of
    an old round from pulling clients back to it.
    """
    pointer, generation = read_optional(store, layout.current_round, RoundPointer)
    if pointer is not None:
        if pointer.round_id == task.round_id:
            return
        other, _ = read_optional(store, layout.round_task(pointer.round_id), RoundTask)
        if other is not None and other.opened_at >= task.opened_at:
            return
    write_document(
        store, layout.current_round, RoundPointer(round_id=task.round_id, status="open"), if_generation_match=generation
    )


def close_round(store: ObjectStore, round_id: str, *, layout: BucketLayout = LAYOUT) -> None:
    """Mark ``round_id`` closed in ``rounds/current.json`` if it is still the current round."""
    _move_round_pointer(store, round_id, "closed", layout=layout)


def _move_round_pointer(
    store: ObjectStore, round_id: str, status: str, *, from_status: str | None = None, layout: BucketLayout
) -> None:
    """Set the pointer's status if it still names ``round_id`` (and is in ``from_status``)."""
    pointer, generation = read_optional(store, layout.current_round, RoundPointer)
    if pointer is None or pointer.round_id != round_id or pointer.status == status:
        return
    if from_status is not None and pointer.status != from_status:
        return
    write_document(
        store, layout.current_round, RoundPointer(round_id=round_id, status=status), if_generation_match=generation
    )


ClosedT = TypeVar("ClosedT", ClosedUpdate, ClosedEvaluation)


@dataclass
class Survey(Generic[ClosedT]):
    """What clients have sent for one wait, as it stands: on time and passing the checks that
    can run before the close (they count toward the quorum), rejected, and unattributable names."""

    on_time: list[ClosedT] = field(default_factory=list)
    rejected: list[UpdateVerdict] = field(default_factory=list)
    ignored: int = 0
    #: False while what arrived, although a quorum, cannot finish the step yet (secure
    #: aggregation's unmasking: some survivor's seed still lacks the threshold of shares).
    ready: bool = True

    def quorum_reached_at(self, quorum: int) -> datetime | None:
        """When the ``quorum``-th on-time item was committed (store clock), if it was."""
        times = sorted(u.committed_at for u in self.on_time)
        return times[quorum - 1] if len(times) >= quorum else None


@dataclass
class RoundSurvey(Survey[ClosedUpdate]):
    """A round's updates as they stand (cheap checks only: payload data is validated by aggregation)."""

    def closing(self, round_id: str, *, reason: str, closed_at: datetime) -> RoundClosing:
        """This survey frozen as a round's closing document."""
        return RoundClosing(
            round_id=round_id,
            closed_at=closed_at,
            reason=reason,
            updates=self.on_time,
            late=self.rejected,
            ignored_objects=self.ignored,
        )


PrecheckCache = dict[tuple[str, int], ClosedUpdate]
"""Updates that passed the cheap checks, by (manifest name, manifest generation): a waiting step
re-reads only what changed since its last look."""


def survey_round(
    store: ObjectStore, task: RoundTask, *, cache: PrecheckCache | None = None, layout: BucketLayout = LAYOUT
) -> RoundSurvey:
    """Read the round's manifests (listed by round, not from all history) and run the cheap
    checks of :func:`~fedbucket.protocol.validation.precheck_update` on each; payload data is
    validated by aggregation. Garbage cannot fill a round: it is rejected here, before the quorum."""
    listing = list_update_manifests(store, task.round_id, layout=layout)

    def judge(name: str) -> ClosedUpdate:
        manifest, committed_at = read_update_manifest(store, name, layout=layout)
        return precheck_update(store, task, manifest, committed_at, layout=layout)

    survey = RoundSurvey(ignored=listing.ignored)
    _fill_survey(survey, listing.manifests, layout.parse_update_manifest, judge, cache)
    return survey


def _fill_survey(
    survey: Survey,
    objects: list[ObjectInfo],
    parse_name: Callable[[str], tuple[str, str]],
    judge: Callable[[str], ClosedT],
    cache: dict[tuple[str, int], ClosedT] | None,
) -> None:
    """Judge each listed object (``judge`` reads and checks it, raising :class:`UpdateRejected`)
    into ``survey``: on time, or rejected with its code, in listing order. Judged objects are
    remembered in ``cache`` by (name, generation), so a waiting step re-reads only what changed.

    Judging is a few small reads per object (manifest, payload metadata, header): the objects not
    in the cache are judged on :data:`SURVEY_THREADS` threads, because at 1,000 clients one
    object after the other is thousands of sequential round trips to the bucket. The outcome does
    not depend on the order the reads finish in.
    """
    judged: dict[str, ClosedT | UpdateVerdict | None] = {}
    fresh = [info for info in objects if cache is None or (info.name, info.generation) not in cache]

    def verdict(info: ObjectInfo) -> ClosedT | UpdateVerdict | None:
        client_id, _ = parse_name(info.name)
        try:
            return judge(info.name)
        except UpdateRejected as exc:
            return rejection_verdict(client_id, exc, getattr(exc, "committed_at", None))
        except ObjectNotFound:
            return None  # deleted between list and read
        except StorageError as exc:  # not a regular file, changed under us, unreadable
            return rejection_verdict(client_id, InvalidManifest(f"unreadable: {exc}"))

    if len(fresh) > 1:
        with ThreadPoolExecutor(min(SURVEY_THREADS, len(fresh)), thread_name_prefix="fedbucket-survey") as pool:
            judged = dict(zip((info.name for info in fresh), pool.map(verdict, fresh), strict=True))
    else:
        judged = {info.name: verdict(info) for info in fresh}
    for info in objects:
        if info.name not in judged:  # remembered from an earlier look
            assert cache is not None
            survey.on_time.append(cache[(info.name, info.generation)])
            continue
        outcome = judged[info.name]
        if outcome is None:
            continue
        if isinstance(outcome, UpdateVerdict):
            survey.rejected.append(outcome)
            continue
        survey.on_time.append(outcome)
        if cache is not None:
            cache[(info.name, info.generation)] = outcome


def wait_decision(survey: Survey, *, now: datetime, deadline: datetime, settings: WaitSettings) -> str | None:
    """Why the wait for updates (or evaluations) ends now, or ``None`` to keep waiting.

    ``max_clients``: that many on-time updates passed the cheap checks. ``quorum``: ``min_clients``
    did, and the grace period since the commit of the ``min_clients``-th has passed (derived from
    the store's commit times, so every look at the bucket agrees). ``deadline``: the deadline plus
    ``settle_seconds`` (so updates still in flight are seen and recorded as late) passed with at
    least ``min_clients_at_deadline``. ``below_quorum``: it passed with fewer (the round is abandoned).
    With ``grace_after = "last"`` the grace runs from the latest arrival instead, and a survey that
    is not ``ready`` never ends the wait by quorum.
    """
    on_time = len(survey.on_time)
    if settings.max_clients is not None and on_time >= settings.max_clients:
        return "max_clients"
    reached = survey.quorum_reached_at(settings.min_clients)
    if reached is not None and settings.grace_after == "last":
        reached = max(u.committed_at for u in survey.on_time)
    if reached is not None and survey.ready and now - reached >= timedelta(seconds=settings.grace_seconds):
        return "quorum"
    if now >= deadline + timedelta(seconds=settings.settle_seconds):
        return "deadline" if on_time >= settings.quorum_at_deadline else "below_quorum"
    return None


def freeze_round(
    store: ObjectStore,
    task: RoundTask,
    *,
    reason: str,
    closed_at: datetime,
    layout: BucketLayout = LAYOUT,
) -> RoundClosing:
    """Close the round pointer, then write ``rounds/<round>/closing.json`` once (create-only).

    The pointer goes first so that SDK clients stop submitting before the survey; an upload
    already in flight that commits after the survey is in no closing and never used. A second
    call returns the document written the first time, so a re-run of a round sees exactly the
    updates the first run closed with.
    """
    close_round(store, task.round_id, layout=layout)  # first: SDK clients stop submitting
    existing, _ = read_optional(store, layout.round_closing(task.round_id), RoundClosing)
    if existing is None:
        closing = survey_round(store, task, layout=layout).closing(task.round_id, reason=reason, closed_at=closed_at)
        try:
            write_document(store, layout.round_closing(task.round_id), closing, if_generation_match=0)
            existing = closing
        except PreconditionFailed:
            existing, _ = read_document(store, layout.round_closing(task.round_id), RoundClosing)
    return existing


# ---------------------------------------------------------------------------------------------
# Federated evaluation: the candidate goes to the clients, their scores come back


def request_evaluation(
    store: ObjectStore,
    round_id: str,
    settings: EvaluationSettings,
    *,
    num_classes: int,
    opened_at: datetime,
    layout: BucketLayout = LAYOUT,
) -> EvaluationTask:
    """Publish round ``round_id``'s candidate for clients to score, and point them at it.

    Writes ``rounds/<round>/evaluation-task.json`` once (a re-run returns the first one, so its
    deadline does not move), then sets the round pointer to ``evaluating`` if it still names this
    round. Clients read the candidate from ``rounds/<round>/candidate/``; it is not a model
    anyone trains from until it is promoted.
    """
    task, _ = read_optional(store, layout.evaluation_task(round_id), EvaluationTask)
    if task is None:
        candidate, _ = read_document(store, layout.candidate_manifest(round_id), ModelManifest)
        if candidate.base_version is None:
            raise ConfigError(f"candidate of round {round_id} names no base model")
        base, _ = read_document(store, layout.model_manifest(candidate.base_version), ModelManifest)
        task = EvaluationTask(
            round_id=round_id,
            candidate_sha256=candidate.sha256,
            base_model_version=base.version,
            base_model_sha256=base.sha256,
            model=candidate.model,
            num_classes=num_classes,
            opened_at=opened_at,
            deadline=opened_at + timedelta(seconds=settings.deadline_seconds),
            max_examples_per_report=settings.max_examples_per_report,
            min_reports=settings.quorum_at_deadline,
            trim_fraction=settings.trim_fraction,
        )
        try:
            write_document(store, layout.evaluation_task(round_id), task, if_generation_match=0)
        except PreconditionFailed:
            task, _ = read_document(store, layout.evaluation_task(round_id), EvaluationTask)
    if not store.exists(layout.evaluation_closing(round_id)):
        _move_round_pointer(store, round_id, "evaluating", from_status="closed", layout=layout)
    return task


@dataclass
class EvaluationSurvey(Survey[ClosedEvaluation]):
    """A round's client evaluations as they stand (every check runs here: they are small)."""

    def closing(self, round_id: str, *, reason: str, closed_at: datetime) -> EvaluationClosing:
        return EvaluationClosing(
            round_id=round_id, closed_at=closed_at, reason=reason, reports=self.on_time, rejected=self.rejected
        )


EvaluationCache = dict[tuple[str, int], ClosedEvaluation]


def survey_evaluations(
    store: ObjectStore, task: EvaluationTask, *, cache: EvaluationCache | None = None, layout: BucketLayout = LAYOUT
) -> EvaluationSurvey:
    """Read and check every client evaluation of the round (listed by round)."""
    listing = list_client_evaluations(store, task.round_id, layout=layout)

    def judge(name: str) -> ClosedEvaluation:
        report, committed_at = read_client_evaluation(store, name, layout=layout)
        check_client_evaluation(task, report, committed_at)
        return ClosedEvaluation(report=report, committed_at=committed_at)

    survey = EvaluationSurvey(ignored=listing.ignored)
    _fill_survey(survey, listing.manifests, layout.parse_client_evaluation, judge, cache)
    return survey


def freeze_evaluations(
    store: ObjectStore, task: EvaluationTask, *, reason: str, closed_at: datetime, layout: BucketLayout = LAYOUT
) -> EvaluationClosing:
    """Close the pointer, then write ``rounds/<round>/evaluation-closing.json`` once (as
    :func:`freeze_round`): the scores the gate uses, frozen inline."""
    close_round(store, task.round_id, layout=layout)
    existing, _ = read_optional(
        store, layout.evaluation_closing(task.round_id), EvaluationClosing, max_bytes=MAX_EVALUATION_CLOSING_BYTES
    )
    if existing is None:
        survey = survey_evaluations(store, task, layout=layout)
        closing = survey.closing(task.round_id, reason=reason, closed_at=closed_at)
        size = len(closing.to_json_bytes())
        if size > MAX_EVALUATION_CLOSING_BYTES:  # it could never be read back: say so now, write nothing
            raise ConfigError(
                f"{len(closing.reports)} client evaluations of {task.num_classes} classes make a closing of "
                f"{size} bytes, more than {MAX_EVALUATION_CLOSING_BYTES}; set [evaluation] max_clients lower"
            )
        try:
            write_document(store, layout.evaluation_closing(task.round_id), closing, if_generation_match=0)
            existing = closing
        except PreconditionFailed:
            existing, _ = read_document(
                store,
                layout.evaluation_closing(task.round_id),
                EvaluationClosing,
                max_bytes=MAX_EVALUATION_CLOSING_BYTES,
            )
    return existing
