"""Validation of untrusted model updates — the same code on clients (before upload) and server.

Checks run cheapest first and before any allocation sized by the input: ids against the object
path, the manifest document, base version and commit time, payload size, the safetensors header
(length, offsets, dtypes), names/shapes/dtypes against the round's schema; then one streaming
pass over the payload (``STREAM_CHUNK_BYTES`` at a time) for the sha256, finiteness and the L2
norm. Every failure is an :class:`~fedbucket.protocol.errors.UpdateRejected` subclass whose ``code`` and
``reason`` go into the round report.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO, TypeVar

import numpy as np

from fedbucket.protocol.documents import (
    FLOAT_DTYPES,
    ClientEvaluation,
    ClosedUpdate,
    EvaluationTask,
    ModelScore,
    RoundTask,
    TensorSchema,
    UpdateManifest,
    UpdateVerdict,
    parse_document,
)
from fedbucket.protocol.errors import (
    ChecksumMismatch,
    InvalidEvaluation,
    InvalidIdentifier,
    InvalidManifest,
    LateUpdate,
    MalformedPayload,
    NonFiniteValues,
    NormTooLarge,
    ObjectNotFound,
    ObjectTooLarge,
    PreconditionFailed,
    SchemaError,
    SchemaMismatch,
    StaleUpdate,
    UpdateRejected,
    UpdateTooLarge,
)
from fedbucket.protocol.layout import LAYOUT, BucketLayout
from fedbucket.protocol.secagg import update_schema
from fedbucket.protocol.storage import STREAM_CHUNK_BYTES, ObjectInfo, ObjectStore
from fedbucket.protocol.tensors import Header, header_length, parse_header, read_header

#: An update manifest is a few hundred bytes; anything above this is refused unread.
MAX_MANIFEST_BYTES = 64 * 1024
#: A client evaluation holds six per-class count lists: 256 KiB fits 1,000 classes.
MAX_CLIENT_EVALUATION_BYTES = 256 * 1024


@dataclass(frozen=True)
class PayloadSummary:
    """What one streaming pass over a payload found."""

    sha256: str
    size: int
    header: Header
    l2_norm: float


@dataclass(frozen=True)
class ValidatedUpdate:
    """An update that passed every check, with what aggregation needs to read it."""

    client_id: str
    manifest: UpdateManifest
    payload_name: str
    payload_generation: int
    header: Header
    l2_norm: float
    committed_at: datetime

    def verdict(self, weight: float = 0.0) -> UpdateVerdict:
        return UpdateVerdict(
            client_id=self.client_id,
            accepted=True,
            num_examples=self.manifest.num_examples,
            weight=weight,
            committed_at=self.committed_at,
        )


def rejection_verdict(client_id: str, error: UpdateRejected, committed_at: datetime | None = None) -> UpdateVerdict:
    return UpdateVerdict(
        client_id=client_id, accepted=False, code=error.code, reason=error.reason, committed_at=committed_at
    )


def _read_into(fp: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from ``fp`` (short only at end of file)."""
    filled = 0
    while filled < len(view):
        n = fp.readinto(view[filled:]) if hasattr(fp, "readinto") else None
        if n is None:
            chunk = fp.read(len(view) - filled)
            n = len(chunk)
            view[filled : filled + n] = chunk
        if not n:
            break
        filled += n
    return filled


def _sum_of_squares(values: np.ndarray, tensor: str, *, exact: bool) -> float:
    """Sum of squares of one chunk, raising :class:`NonFiniteValues` on NaN or infinity.

    Fast path (``exact=False``): one BLAS dot in the values' own precision answers both questions:
    NaN or infinity anywhere makes it non-finite. Its rounding may depend on the CPU's kernel, so
    when the norm decides something (a norm limit, clipping) it is summed in float64 instead
    (``exact=True``). Non-finite fast results are re-checked element-wise, which tells a real NaN
    from finite values whose squares overflow float32.
    """
    if not exact and values.dtype != np.float16:
        total = float(np.dot(values, values))
        if math.isfinite(total):
            return total
    if not np.isfinite(values).all():
        raise NonFiniteValues(f"tensor {tensor!r} contains NaN or infinity")
    wide = values.astype(np.float64)
    return float(np.dot(wide, wide))


def check_schema(header: Header, schema: TensorSchema) -> None:
    """Raise :class:`SchemaMismatch` unless names, dtypes and shapes equal ``schema`` exactly."""
    got, want = set(header.tensors), set(schema)
    problems: list[str] = []
    if missing := sorted(want - got):
        problems.append(f"missing tensors {missing[:5]}{' …' if len(missing) > 5 else ''}")
    if extra := sorted(got - want):
        problems.append(f"unexpected tensors {extra[:5]}{' …' if len(extra) > 5 else ''}")
    for name in sorted(got & want):
        info, spec = header.tensors[name], schema[name]
        if info.dtype != spec.dtype or list(info.shape) != spec.shape:
            problems.append(f"{name}: got {info.dtype}{list(info.shape)}, expected {spec.dtype}{spec.shape}")
    if problems:
        raise SchemaMismatch("; ".join(problems[:8]))


def check_payload(
    fp: BinaryIO,
    size: int,
    *,
    schema: TensorSchema,
    max_bytes: int,
    expected_sha256: str | None = None,
    max_norm: float | None = None,
    exact_norm: bool = False,
) -> PayloadSummary:
    """Validate one safetensors payload read sequentially from ``fp`` (``size`` bytes long).

    ``exact_norm`` sums squares in float64 (deterministic on every CPU); it is implied by
    ``max_norm``. Otherwise the reported norm is a float32-accumulated estimate.
    """
    exact_norm = exact_norm or max_norm is not None
    if size > max_bytes:
        raise UpdateTooLarge(f"payload is {size} bytes; this round accepts at most {max_bytes}")
    header = read_header(fp, size)
    check_schema(header, schema)
    hasher = hashlib.sha256(header.header_bytes)
    sum_squares = 0.0
    # One reusable buffer: fresh 16 MiB objects per read cost page faults at every chunk.
    buffer = memoryview(bytearray(min(STREAM_CHUNK_BYTES, max(8, size))))
    for info in header.in_file_order():
        itemsize = info.np_dtype.itemsize
        step = max(itemsize, len(buffer) // itemsize * itemsize)
        remaining = info.end - info.start
        while remaining:
            want = min(step, remaining)
            got = _read_into(fp, buffer[:want])
            if got < want:
                raise MalformedPayload(f"payload ends inside tensor {info.name!r}")
            remaining -= got
            data = buffer[:got]
            hasher.update(data)
            if info.dtype in FLOAT_DTYPES:
                values = np.frombuffer(data, dtype=info.np_dtype)
                sum_squares += _sum_of_squares(values, info.name, exact=exact_norm)
    if fp.read(1):
        raise MalformedPayload("payload is longer than its header says")
    digest = hasher.hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise ChecksumMismatch(f"payload sha256 is {digest}, the manifest says {expected_sha256}")
    norm = math.sqrt(sum_squares)
    if not math.isfinite(norm):
        raise NonFiniteValues("the update's L2 norm overflows float64")
    if max_norm is not None and norm > max_norm:
        raise NormTooLarge(f"update L2 norm {norm:.4g} exceeds this round's limit {max_norm:.4g}")
    return PayloadSummary(digest, size, header, norm)


def read_update_manifest(
    store: ObjectStore, manifest_name: str, *, layout: BucketLayout = LAYOUT
) -> tuple[UpdateManifest, datetime]:
    """Parse an update manifest and check its ids against its path; returns it and its commit time."""
    return _read_client_document(store, manifest_name, UpdateManifest, layout.parse_update_manifest, MAX_MANIFEST_BYTES)


def read_client_evaluation(
    store: ObjectStore, name: str, *, layout: BucketLayout = LAYOUT
) -> tuple[ClientEvaluation, datetime]:
    """Parse a client evaluation and check its ids against its path; returns it and its commit time."""
    return _read_client_document(
        store, name, ClientEvaluation, layout.parse_client_evaluation, MAX_CLIENT_EVALUATION_BYTES
    )


ClientDocumentT = TypeVar("ClientDocumentT", UpdateManifest, ClientEvaluation)


def _read_client_document(
    store: ObjectStore,
    name: str,
    cls: type[ClientDocumentT],
    parse_name: Callable[[str], tuple[str, str]],
    max_bytes: int,
) -> tuple[ClientDocumentT, datetime]:
    client_id, round_id = parse_name(name)
    try:
        raw, generation = store.get_bytes(name, max_bytes=max_bytes)
    except ObjectTooLarge:
        raise InvalidManifest(f"{cls.kind} is larger than the {max_bytes} bytes allowed") from None
    info = store.stat(name)
    if info.generation != generation:  # replaced between read and stat: the commit time must be of what we read
        raise InvalidManifest(f"{cls.kind} kept changing while being read; the client is rewriting it")
    try:
        document = parse_document(cls, raw, source=name)
    except SchemaError as exc:
        raise InvalidManifest(str(exc)) from None
    if document.client_id != client_id or document.round_id != round_id:
        raise InvalidIdentifier(
            f"{cls.kind} names client {document.client_id!r} round {document.round_id!r} "
            f"but is stored under client {client_id!r} round {round_id!r}"
        )
    return document, info.updated


def check_client_evaluation(task: EvaluationTask, report: ClientEvaluation, committed_at: datetime) -> None:
    """Every check on one client's evaluation of a round's candidate (all in the document: no I/O).

    It must score this round's candidate (by sha256) against this round's base, be committed by
    the evaluation deadline, and hold consistent counts: ``num_classes`` entries per list, the same
    examples for both models, every example counted once as a true positive or a false negative
    (and once as a true or a false positive), at most ``max_examples_per_report`` examples.
    """
    if report.round_id != task.round_id:
        raise InvalidIdentifier(f"evaluation is for round {report.round_id!r}, not {task.round_id!r}")
    if report.candidate_sha256 != task.candidate_sha256 or report.base_model_version != task.base_model_version:
        raise StaleUpdate(
            f"evaluation scores candidate {report.candidate_sha256[:12]} on base {report.base_model_version!r}; "
            f"round {task.round_id} published candidate {task.candidate_sha256[:12]} "
            f"on base {task.base_model_version!r}"
        )
    if committed_at > task.deadline:
        raise late_error(task, committed_at)
    examples = report.candidate.examples
    if examples == 0 or report.current.examples != examples:
        raise InvalidEvaluation("both models must be scored on the same, non-empty set of examples")
    if task.max_examples_per_report is not None and examples > task.max_examples_per_report:
        raise InvalidEvaluation(f"{examples} examples; this round accepts at most {task.max_examples_per_report}")
    for label, score in (("candidate", report.candidate), ("current", report.current)):
        lists = (score.true_positive, score.false_positive, score.false_negative)
        if any(len(counts) != task.num_classes for counts in lists):
            raise InvalidEvaluation(f"{label}: per-class counts must have {task.num_classes} entries")
        tp = sum(score.true_positive)
        if tp + sum(score.false_negative) != examples or tp + sum(score.false_positive) != examples:
            raise InvalidEvaluation(f"{label}: per-class counts do not add up to {examples} examples")
        if score.non_finite > examples:
            raise InvalidEvaluation(f"{label}: {score.non_finite} non-finite losses among {examples} examples")
        if score.loss_sum > examples * MAX_MEAN_LOSS:
            raise InvalidEvaluation(f"{label}: mean loss above {MAX_MEAN_LOSS:g} is not a cross-entropy we accept")
        if score.confusion is not None:
            _check_confusion(label, score, task.num_classes)


def _check_confusion(label: str, score: ModelScore, classes: int) -> None:
    """A confusion matrix must be ``classes`` x ``classes`` and agree with the per-class counts:
    its diagonal the true positives, its rows (true class) and columns (predicted) their totals."""
    matrix = score.confusion or []
    if len(matrix) != classes or any(len(row) != classes for row in matrix):
        raise InvalidEvaluation(f"{label}: the confusion matrix must be {classes} x {classes}")
    array = np.asarray(matrix, dtype=np.int64)
    tp = np.asarray(score.true_positive, dtype=np.int64)
    if (
        not np.array_equal(np.diag(array), tp)
        or not np.array_equal(array.sum(axis=1), tp + np.asarray(score.false_negative, dtype=np.int64))
        or not np.array_equal(array.sum(axis=0), tp + np.asarray(score.false_positive, dtype=np.int64))
    ):
        raise InvalidEvaluation(f"{label}: the confusion matrix disagrees with the per-class counts")


#: A bound on a reported mean cross-entropy (a uniform guess over 1000 classes is ~6.9).
MAX_MEAN_LOSS = 1000.0


def check_base(task: RoundTask, manifest: UpdateManifest) -> None:
    """Raise :class:`StaleUpdate` unless the update was trained from the round's base model."""
    if manifest.base_model_version != task.base_model_version:
        raise StaleUpdate(
            f"update was trained from model {manifest.base_model_version!r}; "
            f"round {task.round_id!r} is based on {task.base_model_version!r}"
        )


def precheck_update(
    store: ObjectStore,
    task: RoundTask,
    manifest: UpdateManifest,
    manifest_committed_at: datetime,
    *,
    layout: BucketLayout = LAYOUT,
) -> ClosedUpdate:
    """The cheap checks an update must pass to count toward a round's quorum.

    Reads the payload's metadata and its safetensors header only (two small range reads, never
    the data): it exists, its size is the manifest's, it is within the round's limit, its header
    matches the round's schema, and neither the manifest nor the payload was committed after the
    deadline (commit times from the store's clock). Returns the update as it stands, with the
    payload generation pinned; the full check (sha256, values, norm) runs in aggregation.
    """
    check_base(task, manifest)
    payload_name = layout.update_payload(manifest.client_id, manifest.round_id, manifest.sha256)
    try:
        payload = store.stat(payload_name)
    except ObjectNotFound:
        raise MalformedPayload(f"payload {payload_name} named by the manifest does not exist") from None
    committed_at = max(manifest_committed_at, payload.updated)
    if committed_at > task.deadline:
        raise late_error(task, committed_at)
    if payload.size != manifest.size_bytes:
        raise MalformedPayload(f"payload is {payload.size} bytes; the manifest says {manifest.size_bytes}")
    if payload.size > task.max_update_bytes:
        raise UpdateTooLarge(f"payload is {payload.size} bytes; this round accepts at most {task.max_update_bytes}")
    header = read_payload_header(store, payload_name, payload.generation, payload.size)
    check_schema(header, update_schema(task))
    return ClosedUpdate(manifest=manifest, committed_at=committed_at, payload_generation=payload.generation)


def read_payload_header(store: ObjectStore, name: str, generation: int, size: int) -> Header:
    """The safetensors header of one generation of a ``size``-byte payload: two small range reads,
    never the data (:class:`~fedbucket.protocol.errors.MalformedPayload` if it is not one)."""
    first8 = store.read_range(name, 0, 8, generation=generation)
    length = header_length(first8, size)
    return parse_header(first8 + store.read_range(name, 8, 8 + length, generation=generation), size)


def validate_update(
    store: ObjectStore, task: RoundTask, manifest_name: str, *, layout: BucketLayout = LAYOUT
) -> ValidatedUpdate:
    """Run every check on the update whose manifest is ``manifest_name``; raise or return it."""
    manifest, committed_at = read_update_manifest(store, manifest_name, layout=layout)
    return validate_closed(store, task, precheck_update(store, task, manifest, committed_at, layout=layout))


def validate_closed(
    store: ObjectStore,
    task: RoundTask,
    closed: ClosedUpdate,
    *,
    exact_norm: bool = False,
    layout: BucketLayout = LAYOUT,
) -> ValidatedUpdate:
    """Every check on an update a round closed with, reading exactly the payload generation that
    was present at the close (a payload replaced or re-created since is refused).

    ``exact_norm``: compute the L2 norm in float64 (needed when it scales the update: clipping).
    """
    manifest = closed.manifest
    if manifest.round_id != task.round_id:
        raise InvalidIdentifier(f"update is for round {manifest.round_id!r}, not {task.round_id!r}")
    check_base(task, manifest)
    if closed.committed_at > task.deadline:
        raise late_error(task, closed.committed_at)
    payload_name = layout.update_payload(manifest.client_id, manifest.round_id, manifest.sha256)
    if manifest.size_bytes > task.max_update_bytes:
        raise UpdateTooLarge(
            f"payload is {manifest.size_bytes} bytes; this round accepts at most {task.max_update_bytes}"
        )
    try:
        reader = store.open_reader(payload_name, generation=closed.payload_generation)
    except (ObjectNotFound, PreconditionFailed):
        raise MalformedPayload(f"payload {payload_name} is no longer the one present when the round closed") from None
    with reader as fp:
        summary = check_payload(
            fp,
            manifest.size_bytes,
            schema=update_schema(task),
            max_bytes=task.max_update_bytes,
            expected_sha256=manifest.sha256,
            max_norm=None if task.secure_aggregation is not None else task.max_update_norm,
            exact_norm=exact_norm,
        )
    return ValidatedUpdate(
        client_id=manifest.client_id,
        manifest=manifest,
        payload_name=payload_name,
        payload_generation=closed.payload_generation,
        header=summary.header,
        l2_norm=summary.l2_norm,
        committed_at=closed.committed_at,
    )


def late_error(task: RoundTask | EvaluationTask, committed_at: datetime) -> LateUpdate:
    late_by = (committed_at - task.deadline).total_seconds()
    error = LateUpdate(f"committed {late_by:.1f}s after the deadline {task.deadline.isoformat()}")
    error.committed_at = committed_at  # the verdict records when, not only that
    return error


@dataclass(frozen=True)
class RoundListing:
    """The update manifests of one round, and the objects that matched but cannot be attributed."""

    manifests: list[ObjectInfo]
    ignored: int

    @property
    def names(self) -> list[str]:
        return [info.name for info in self.manifests]


def list_update_manifests(store: ObjectStore, round_id: str, *, layout: BucketLayout = LAYOUT) -> RoundListing:
    """Names of every update manifest committed for ``round_id``, sorted by client id.

    Lists only this round's manifests (a glob the store filters on), so the cost does not grow
    with past rounds. Names whose client id is unsafe are never read; they are counted in
    ``ignored`` so the round report can show that something tried.
    """
    return _list_round(store, round_id, layout.update_manifest_glob(round_id), layout.parse_update_manifest)


def list_client_evaluations(store: ObjectStore, round_id: str, *, layout: BucketLayout = LAYOUT) -> RoundListing:
    """Every client evaluation committed for ``round_id`` (as :func:`list_update_manifests`)."""
    return _list_round(store, round_id, layout.client_evaluation_glob(round_id), layout.parse_client_evaluation)


def list_secagg_documents(
    store: ObjectStore, round_id: str, step: str, *, layout: BucketLayout = LAYOUT
) -> RoundListing:
    """Every client's secure-aggregation ``step`` document of ``round_id`` (``keys``, ``shares``,
    ``unmask``), as :func:`list_update_manifests`."""
    return _list_round(
        store,
        round_id,
        layout.secagg_client_glob(round_id, step),
        lambda name: layout.parse_secagg_client(name, step),
    )


def _list_round(
    store: ObjectStore, round_id: str, glob: str, parse_name: Callable[[str], tuple[str, str]]
) -> RoundListing:
    found, ignored = [], 0
    for info in store.list(match_glob=glob):
        try:
            _, rid = parse_name(info.name)
        except InvalidIdentifier:
            ignored += 1
            continue
        if rid == round_id:
            found.append(info)
    return RoundListing(sorted(found, key=lambda info: info.name), ignored)
