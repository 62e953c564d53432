"""Server-side operations on a federation bucket: publish models, open rounds, promote.

These are the write paths of the protocol that only the server (the Airflow DAG, the Spark jobs,
``fedbucket init``) takes. Each is a transaction on the bucket: payload objects first, documents
after them, pointers last, pointers moved by compare-and-swap.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from fedbucket.config import FederationConfig
from fedbucket.errors import ObjectNotFound, PreconditionFailed, UpdateRejected
from fedbucket.layout import LAYOUT, BucketLayout
from fedbucket.schemas import (
    ClosedUpdate,
    Document,
    DocumentT,
    ModelManifest,
    ModelPointer,
    ModelSpec,
    RoundClosing,
    RoundPointer,
    RoundTask,
    TrainingConfig,
    UpdateVerdict,
    parse_document,
)
from fedbucket.storage import ObjectStore
from fedbucket.tensors import read_header_file, save_tensors
from fedbucket.validation import late_error, list_update_manifests, read_update_manifest, rejection_verdict

#: Default hard limit on an update's size: the model's own size plus header slack, times 1.
UPDATE_SIZE_SLACK_BYTES = 1024 * 1024


def read_document(store: ObjectStore, name: str, cls: type[DocumentT]) -> tuple[DocumentT, int]:
    """Read and parse one protocol document; returns it and its generation."""
    raw, generation = store.get_bytes(name)
    return parse_document(cls, raw, source=f"{store.url}/{name}"), generation


def read_optional(store: ObjectStore, name: str, cls: type[DocumentT]) -> tuple[DocumentT | None, int]:
    """Like :func:`read_document`, but ``(None, 0)`` when the object does not exist."""
    try:
        return read_document(store, name, cls)
    except ObjectNotFound:
        return None, 0


def write_document(store: ObjectStore, name: str, doc: Document, *, if_generation_match: int | None = None) -> int:
    """Write a document in its canonical bytes; returns the new generation."""
    return store.put_bytes(name, doc.to_json_bytes(), if_generation_match=if_generation_match).generation


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


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
    layout: BucketLayout = LAYOUT,
) -> RoundTask:
    """Write ``rounds/<round>/task.json`` based on the current model and point ``rounds/current.json``
    at it. Idempotent: if the task exists it is returned unchanged (a re-run never re-opens a
    round with another base); the pointer only ever moves to a round opened later.
    """
    task, _ = read_optional(store, layout.round_task(round_id), RoundTask)
    if task is None:
        pointer, _ = current_model(store, layout=layout)
        base, _ = read_document(store, layout.model_manifest(pointer.version), ModelManifest)
        task = RoundTask(
            round_id=round_id,
            base_model_version=base.version,
            base_model_sha256=base.sha256,
            model=base.model,
            opened_at=opened_at,
            deadline=opened_at + timedelta(seconds=deadline_seconds),
            training=training,
            tensors=base.tensors,
            max_update_bytes=base.size_bytes + UPDATE_SIZE_SLACK_BYTES,
            min_clients=min_clients,
            max_clients=max_clients,
            max_update_norm=max_update_norm,
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
    pointer, generation = read_optional(store, layout.current_round, RoundPointer)
    if pointer is None or pointer.round_id != round_id or pointer.status == "closed":
        return
    write_document(
        store, layout.current_round, RoundPointer(round_id=round_id, status="closed"), if_generation_match=generation
    )


def collect_round_updates(
    store: ObjectStore, task: RoundTask, *, layout: BucketLayout = LAYOUT
) -> tuple[list[ClosedUpdate], list[UpdateVerdict]]:
    """The round's committed updates as they stand now: ``(on_time, late_or_unreadable)``.

    Only manifests are read here (cheap); payloads are validated by aggregation. A manifest that
    cannot be parsed or whose ids differ from its path is reported with the late ones.
    """
    on_time: list[ClosedUpdate] = []
    rejected: list[UpdateVerdict] = []
    for name in list_update_manifests(store, task.round_id, layout=layout):
        client_id, _ = layout.parse_update_manifest(name)
        try:
            manifest, committed_at = read_update_manifest(store, name, layout=layout)
        except UpdateRejected as exc:
            rejected.append(rejection_verdict(client_id, exc))
            continue
        except ObjectNotFound:
            continue  # deleted between list and read
        if committed_at > task.deadline:
            rejected.append(rejection_verdict(client_id, late_error(task, committed_at), committed_at))
        else:
            on_time.append(ClosedUpdate(manifest=manifest, committed_at=committed_at))
    return on_time, rejected


def freeze_round(
    store: ObjectStore,
    task: RoundTask,
    *,
    reason: str,
    closed_at: datetime,
    layout: BucketLayout = LAYOUT,
) -> RoundClosing:
    """Write ``rounds/<round>/closing.json`` once (create-only) and close the round pointer.

    A second call returns the document written the first time, so a re-run of a round sees
    exactly the updates the first run closed with.
    """
    existing, _ = read_optional(store, layout.round_closing(task.round_id), RoundClosing)
    if existing is None:
        on_time, late = collect_round_updates(store, task, layout=layout)
        closing = RoundClosing(round_id=task.round_id, closed_at=closed_at, reason=reason, updates=on_time, late=late)
        try:
            write_document(store, layout.round_closing(task.round_id), closing, if_generation_match=0)
            existing = closing
        except PreconditionFailed:
            existing, _ = read_document(store, layout.round_closing(task.round_id), RoundClosing)
    close_round(store, task.round_id, layout=layout)
    return existing


def promote_candidate(store: ObjectStore, round_id: str, *, layout: BucketLayout = LAYOUT) -> ModelManifest:
    """Make round ``round_id``'s candidate the current model.

    The candidate is published as ``models/<round_id>/`` (create-only; a re-run finds the same
    bytes there) and ``models/current.json`` is moved by compare-and-swap, only if it still points
    at the candidate's base: a candidate built on an older model never replaces a newer one, so
    re-running an old round cannot move the pointer backwards. Raises :class:`PreconditionFailed`
    when the base has moved on.
    """
    candidate, _ = read_document(store, layout.candidate_manifest(round_id), ModelManifest)
    pointer, generation = current_model(store, layout=layout)
    published, _ = read_optional(store, layout.model_manifest(candidate.version), ModelManifest)
    if published is not None and published.sha256 != candidate.sha256:
        raise PreconditionFailed(f"model version {candidate.version!r} already exists with other bytes")
    if pointer.version == candidate.version:
        return candidate  # promoted by an earlier run
    if pointer.version != candidate.base_version:
        if published is not None:
            return candidate  # promoted by an earlier run, and newer models followed: leave the pointer
        raise PreconditionFailed(
            f"candidate of round {round_id} was built on model {candidate.base_version!r}, but the current "
            f"model is {pointer.version!r}: not promoted"
        )
    if published is None:  # publish first, then move the pointer: a crash in between is finished on retry
        store.copy(layout.candidate_payload(round_id), layout.model_payload(candidate.version))
        try:
            write_document(store, layout.model_manifest(candidate.version), candidate, if_generation_match=0)
        except PreconditionFailed:  # a concurrent promoter got there first
            published, _ = read_document(store, layout.model_manifest(candidate.version), ModelManifest)
            if published.sha256 != candidate.sha256:
                raise
    set_current_model(store, candidate, expected_generation=generation)
    return candidate


def init_federation(
    store: ObjectStore,
    config: FederationConfig,
    *,
    holdout: Mapping[str, np.ndarray] | None = None,
    layout: BucketLayout = LAYOUT,
) -> tuple[ModelManifest, bool]:
    """Initialise a federation: the initial model (version ``init``, from the config's model and
    seed), the held-out evaluation split, and an empty round state.

    ``holdout`` is a state dict with ``x`` (float32 features) and ``y`` (int64 labels); by default
    the digits hold-out split. Idempotent: returns ``(manifest, False)`` when already initialised.
    """
    existing, _ = read_optional(store, layout.current_model, ModelPointer)
    if existing is not None:
        manifest, _ = read_document(store, layout.model_manifest(existing.version), ModelManifest)
        return manifest, False
    from fedbucket.pytorch import state_dict_to_numpy
    from fedbucket.zoo import build_model

    if holdout is None:
        from fedbucket.datasets import digits

        _, split = digits(holdout_fraction=config.holdout_fraction, seed=config.seed)
        holdout = {"x": split.x, "y": split.y}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "holdout.safetensors"
        save_tensors(holdout, path)
        store.upload_file(layout.holdout, path)
    model = build_model(config.model, seed=config.seed)
    manifest = publish_model(store, state_dict_to_numpy(model), version="init", model=config.model, layout=layout)
    set_current_model(store, manifest, expected_generation=0)
    return manifest, True
