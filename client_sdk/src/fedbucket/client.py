"""What a client writes: an update payload, then its manifest (the commit marker)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

from fedbucket.errors import PreconditionFailed, RoundNotOpen
from fedbucket.layout import LAYOUT, BucketLayout, check_identifier
from fedbucket.schemas import RoundTask, UpdateManifest, utcnow
from fedbucket.storage import ObjectStore, ProgressCallback
from fedbucket.validation import check_payload


def upload_update(
    store: ObjectStore,
    task: RoundTask,
    client_id: str,
    payload_path: str | os.PathLike[str],
    *,
    num_examples: int,
    metrics: Mapping[str, float] | None = None,
    layout: BucketLayout = LAYOUT,
    progress: ProgressCallback | None = None,
    check_deadline: bool = True,
) -> UpdateManifest:
    """Validate a local safetensors delta exactly as the server will, then commit it.

    The payload goes to a content-addressed name (``<sha256>.safetensors``, create-only), the
    manifest after it; a reader that sees the manifest therefore always finds its payload, and
    a resubmission within the round atomically replaces the earlier one by overwriting the
    manifest. Raises :class:`~fedbucket.errors.UpdateRejected` subclasses for invalid payloads
    and :class:`RoundNotOpen` past the deadline.
    """
    check_identifier(client_id, "client id")
    if check_deadline and utcnow() > task.deadline:
        raise RoundNotOpen(f"round {task.round_id} closed for updates at {task.deadline.isoformat()}")
    size = Path(payload_path).stat().st_size
    with open(payload_path, "rb") as fp:
        summary = check_payload(
            fp, size, schema=task.tensors, max_bytes=task.max_update_bytes, max_norm=task.max_update_norm
        )
    payload_name = layout.update_payload(client_id, task.round_id, summary.sha256)
    # A content-addressed name that already exists holds these very bytes: nothing to upload.
    with contextlib.suppress(PreconditionFailed):
        store.upload_file(payload_name, payload_path, if_generation_match=0, progress=progress)
    manifest = UpdateManifest(
        client_id=client_id,
        round_id=task.round_id,
        base_model_version=task.base_model_version,
        num_examples=num_examples,
        metrics=dict(metrics or {}),
        sha256=summary.sha256,
        size_bytes=size,
        created_at=utcnow(),
    )
    store.put_bytes(layout.update_manifest(client_id, task.round_id), manifest.to_json_bytes())
    return manifest
