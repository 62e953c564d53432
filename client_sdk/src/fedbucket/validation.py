"""Validation of untrusted model updates — the same code on clients (before upload) and server.

Checks run cheapest first and before any allocation sized by the input: ids against the object
path, the manifest document, base version and commit time, payload size, the safetensors header
(length, offsets, dtypes), names/shapes/dtypes against the round's schema; then one streaming
pass over the payload (``STREAM_CHUNK_BYTES`` at a time) for the sha256, finiteness and the L2
norm. Every failure is an :class:`~fedbucket.errors.UpdateRejected` subclass whose ``code`` and
``reason`` go into the round report.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

import numpy as np

from fedbucket.errors import (
    ChecksumMismatch,
    InvalidIdentifier,
    InvalidManifest,
    LateUpdate,
    MalformedPayload,
    NonFiniteValues,
    NormTooLarge,
    ObjectNotFound,
    SchemaError,
    SchemaMismatch,
    StaleUpdate,
    UpdateRejected,
    UpdateTooLarge,
)
from fedbucket.layout import LAYOUT, BucketLayout
from fedbucket.schemas import FLOAT_DTYPES, RoundTask, TensorSchema, UpdateManifest, UpdateVerdict, parse_document
from fedbucket.storage import STREAM_CHUNK_BYTES, ObjectStore
from fedbucket.tensors import Header, read_header

#: An update manifest is a few hundred bytes; anything above this is refused unread.
MAX_MANIFEST_BYTES = 64 * 1024


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
    client_id, round_id = layout.parse_update_manifest(manifest_name)
    info = store.stat(manifest_name)
    if info.size > MAX_MANIFEST_BYTES:
        raise InvalidManifest(f"manifest is {info.size} bytes; at most {MAX_MANIFEST_BYTES} allowed")
    raw, generation = store.get_bytes(manifest_name)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise InvalidManifest(f"manifest is {len(raw)} bytes; at most {MAX_MANIFEST_BYTES} allowed")
    if generation != info.generation:  # replaced between stat and read: take the commit time of what we read
        info = store.stat(manifest_name)
        if info.generation != generation:
            raise InvalidManifest("manifest kept changing while being read; the client is rewriting it")
    try:
        manifest = parse_document(UpdateManifest, raw, source=manifest_name)
    except SchemaError as exc:
        raise InvalidManifest(str(exc)) from None
    if manifest.client_id != client_id or manifest.round_id != round_id:
        raise InvalidIdentifier(
            f"manifest names client {manifest.client_id!r} round {manifest.round_id!r} "
            f"but is stored under client {client_id!r} round {round_id!r}"
        )
    return manifest, info.updated


def validate_update(
    store: ObjectStore, task: RoundTask, manifest_name: str, *, layout: BucketLayout = LAYOUT
) -> ValidatedUpdate:
    """Run every check on the update whose manifest is ``manifest_name``; raise or return it."""
    manifest, committed_at = read_update_manifest(store, manifest_name, layout=layout)
    return validate_manifest(store, task, manifest, committed_at, layout=layout)


def validate_manifest(
    store: ObjectStore,
    task: RoundTask,
    manifest: UpdateManifest,
    committed_at: datetime,
    *,
    exact_norm: bool = False,
    layout: BucketLayout = LAYOUT,
) -> ValidatedUpdate:
    """Every check after the manifest was read (and its ids matched its path).

    ``exact_norm``: compute the L2 norm in float64 (needed when it scales the update: clipping).
    """
    if manifest.round_id != task.round_id:
        raise InvalidIdentifier(f"update is for round {manifest.round_id!r}, not {task.round_id!r}")
    if manifest.base_model_version != task.base_model_version:
        raise StaleUpdate(
            f"update was trained from model {manifest.base_model_version!r}; "
            f"round {task.round_id!r} is based on {task.base_model_version!r}"
        )
    if committed_at > task.deadline:
        raise late_error(task, committed_at)
    payload_name = layout.update_payload(manifest.client_id, manifest.round_id, manifest.sha256)
    try:
        payload = store.stat(payload_name)
    except ObjectNotFound:
        raise MalformedPayload(f"payload {payload_name} named by the manifest does not exist") from None
    if payload.size != manifest.size_bytes:
        raise MalformedPayload(f"payload is {payload.size} bytes; the manifest says {manifest.size_bytes}")
    if payload.size > task.max_update_bytes:
        raise UpdateTooLarge(f"payload is {payload.size} bytes; this round accepts at most {task.max_update_bytes}")
    with store.open_reader(payload_name, generation=payload.generation) as fp:
        summary = check_payload(
            fp,
            payload.size,
            schema=task.tensors,
            max_bytes=task.max_update_bytes,
            expected_sha256=manifest.sha256,
            max_norm=task.max_update_norm,
            exact_norm=exact_norm,
        )
    return ValidatedUpdate(
        client_id=manifest.client_id,
        manifest=manifest,
        payload_name=payload_name,
        payload_generation=payload.generation,
        header=summary.header,
        l2_norm=summary.l2_norm,
        committed_at=committed_at,
    )


def late_error(task: RoundTask, committed_at: datetime) -> LateUpdate:
    late_by = (committed_at - task.deadline).total_seconds()
    return LateUpdate(f"committed {late_by:.1f}s after the deadline {task.deadline.isoformat()}")


def list_update_manifests(store: ObjectStore, round_id: str, *, layout: BucketLayout = LAYOUT) -> list[str]:
    """Names of every update manifest committed for ``round_id``, sorted by client id.

    Objects under ``updates/`` that are not well-formed manifest paths are skipped here; they
    cannot be attributed to a client and are never read.
    """
    names = []
    for info in store.list("updates/"):
        try:
            _, rid = layout.parse_update_manifest(info.name)
        except InvalidIdentifier:
            continue
        if rid == round_id:
            names.append(info.name)
    return sorted(names)
