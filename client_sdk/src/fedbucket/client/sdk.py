"""The client SDK: take part in federated rounds through the bucket.

A client fetches the round's base model, trains on its own data and submits the update::

    from fedbucket import Client

    with Client("gs://acme-federation/prod", "hospital-a") as client:
        task = client.wait_for_round(timeout=3600)
        model.load_state_dict(client.fetch_model(task))          # 1. start from the global model
        train(model, my_data, task.training)                      # 2. your own training loop
        client.submit(task, model.state_dict(), num_examples=len(my_data))   # 3. send the delta

Only the delta (trained minus base) leaves the client, as safetensors, after the very validator the
server runs has accepted it locally.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from pydantic import ValidationError

from fedbucket.protocol.documents import (
    ClientEvaluation,
    EvaluationTask,
    ModelManifest,
    ModelScore,
    RoundPointer,
    RoundTask,
    UpdateManifest,
    describe_validation_error,
    read_document,
    read_optional,
    utcnow,
)
from fedbucket.protocol.errors import (
    ChecksumMismatch,
    InvalidManifest,
    PreconditionFailed,
    RoundNotOpen,
    SchemaMismatch,
    StaleUpdate,
    WaitTimeout,
)
from fedbucket.protocol.layout import LAYOUT, BucketLayout, check_identifier
from fedbucket.protocol.secagg import update_schema
from fedbucket.protocol.storage import ObjectStore, open_store
from fedbucket.protocol.tensors import NUMPY_DTYPES, Header, dtype_name, load_tensors, plan_safetensors
from fedbucket.protocol.validation import PayloadSummary, check_payload

StateDict = Mapping[str, Any]
"""A state dict: names to numpy arrays or torch tensors."""

Progress = Callable[[str, int, int], None]
"""Told how a fetch or a submit advances: ``progress(phase, done, total)`` in bytes of that phase.

Phases, in the order they run: ``"download"`` (the model, sha256 computed as it arrives; skipped
when the version is cached), ``"delta"`` (``submit``: trained minus base, computed, hashed and
validated in one pass), ``"validate"`` (``submit_file``: the delta file checked), ``"upload"``.
Each phase starts with ``done == 0``; ``done`` never decreases (a retried transfer does not move it
twice) and ends at ``total``.
"""


class _PhaseProgress:
    """A storage progress callback (byte increments, negative on a rewind) for one phase, turned
    into monotonic ``(phase, done, total)`` reports."""

    def __init__(self, progress: Progress, phase: str, total: int) -> None:
        self._progress, self._phase, self._total = progress, phase, total
        self._position = self._done = 0
        progress(phase, 0, total)

    def __call__(self, n: int) -> None:
        self._position += n
        done = min(self._total, self._position)
        if done > self._done:
            self._done = done
            self._progress(self._phase, done, self._total)

    def finish(self) -> None:
        """Report the phase complete (a transfer skipped because the bytes are already there)."""
        self(self._total - self._position)


def _phase(progress: Progress | None, phase: str, total: int) -> _PhaseProgress | None:
    return _PhaseProgress(progress, phase, total) if progress is not None else None


class _ProgressReader(io.RawIOBase):
    """A reader that reports what is read from it (the validator's pass over a file)."""

    def __init__(self, raw: io.BufferedIOBase, progress: _PhaseProgress) -> None:
        super().__init__()
        self._raw, self._progress = raw, progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = self._raw.readinto(buffer)
        self._progress(n)
        return n


def upload_update(
    store: ObjectStore,
    task: RoundTask,
    client_id: str,
    payload_path: str | os.PathLike[str],
    *,
    num_examples: int,
    metrics: Mapping[str, float] | None = None,
    layout: BucketLayout = LAYOUT,
    progress: Progress | None = None,
    check_deadline: bool = True,
) -> UpdateManifest:
    """Validate a local safetensors delta exactly as the server will, then commit it.

    The payload goes to a content-addressed name (``<sha256>.safetensors``, create-only), the
    manifest after it; a reader that sees the manifest therefore always finds its payload, and
    a resubmission within the round atomically replaces the earlier one by overwriting the
    manifest. Raises :class:`~fedbucket.protocol.errors.UpdateRejected` subclasses for invalid payloads
    and :class:`RoundNotOpen` past the deadline (unless ``check_deadline=False``, which only the
    straggler simulation uses: the server judges lateness on its own clock anyway).
    """
    _check_can_upload(task, client_id, check_deadline=check_deadline)
    size = Path(payload_path).stat().st_size
    with open(payload_path, "rb") as fp:
        validating = _phase(progress, "validate", size)
        summary = _check_stream(task, fp, size, validating)
    uploading = _phase(progress, "upload", size)
    return _commit_update(
        store,
        task,
        client_id,
        summary,
        lambda name: store.upload_file(name, payload_path, if_generation_match=0, progress=uploading),
        uploading,
        num_examples=num_examples,
        metrics=metrics,
        layout=layout,
    )


def upload_delta(
    store: ObjectStore,
    task: RoundTask,
    client_id: str,
    trained: StateDict,
    base: Mapping[str, np.ndarray],
    *,
    num_examples: int,
    metrics: Mapping[str, float] | None = None,
    layout: BucketLayout = LAYOUT,
    progress: Progress | None = None,
) -> UpdateManifest:
    """:func:`upload_update` of ``trained - base`` without a file: the delta is computed, hashed and
    validated (by the server's validator, :func:`~fedbucket.protocol.validation.check_payload`) in
    one streaming pass into one buffer, which is then uploaded as it is. The same bytes, checks and
    errors as ``save_tensors(compute_delta(trained, base), path)`` then :func:`upload_update`.
    """
    arrays = _trained_arrays(trained, base)
    _check_can_upload(task, client_id, check_deadline=True)
    reader = _DeltaReader(arrays, base)
    computing = _phase(progress, "delta", reader.size)
    summary = _check_stream(task, reader, reader.size, computing)
    payload = reader.payload
    uploading = _phase(progress, "upload", reader.size)
    return _commit_update(
        store,
        task,
        client_id,
        summary,
        lambda name: store.upload_buffer(name, payload, if_generation_match=0, progress=uploading),
        uploading,
        num_examples=num_examples,
        metrics=metrics,
        layout=layout,
    )


def _check_stream(task: RoundTask, fp: io.BufferedIOBase, size: int, progress: _PhaseProgress | None) -> PayloadSummary:
    """The server's own payload checks for ``task``, over a stream read once (progress as it goes)."""
    return check_payload(
        _ProgressReader(fp, progress) if progress else fp,
        size,
        schema=update_schema(task),
        max_bytes=task.max_update_bytes,
        max_norm=None if task.secure_aggregation is not None else task.max_update_norm,
    )


def _check_can_upload(task: RoundTask, client_id: str, *, check_deadline: bool) -> None:
    check_identifier(client_id, "client id")
    if check_deadline and utcnow() > task.deadline:
        raise RoundNotOpen(
            f"round {task.round_id} stopped taking updates at {task.deadline.isoformat()}; "
            "wait for the next round (fedbucket status)"
        )


def _commit_update(
    store: ObjectStore,
    task: RoundTask,
    client_id: str,
    summary: PayloadSummary,
    upload: Callable[[str], object],
    uploading: _PhaseProgress | None,
    *,
    num_examples: int,
    metrics: Mapping[str, float] | None,
    layout: BucketLayout,
) -> UpdateManifest:
    """Upload a validated payload under its content-addressed name, then its manifest."""
    size = summary.size
    try:  # built (and so checked) before anything is uploaded
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
    except ValidationError as exc:
        raise InvalidManifest(f"cannot describe this update: {describe_validation_error(exc)}") from None
    payload_name = layout.update_payload(client_id, task.round_id, summary.sha256)
    # A content-addressed name that already exists holds these very bytes: nothing to upload.
    with contextlib.suppress(PreconditionFailed):
        upload(payload_name)
    if uploading is not None:
        uploading.finish()
    store.put_bytes(layout.update_manifest(client_id, task.round_id), manifest.to_json_bytes())
    return manifest


def to_numpy(value: Any) -> np.ndarray:
    """A numpy view of a numpy array, a torch tensor or a Python scalar."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        return value.detach().cpu().numpy()
    return np.asarray(value)


def compute_delta(trained: StateDict, base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``trained - base`` per tensor, in the base's dtype.

    Float differences are taken in the tensor's own dtype, so ``base + delta`` gives back
    ``trained`` bit for bit whenever that difference is exactly representable — which holds for
    the small steps of local training (tests/test_client.py checks it on real training).
    """
    delta = {}
    for name, value in _trained_arrays(trained, base).items():
        base_value = base[name]
        delta[name] = np.subtract(value.astype(base_value.dtype, copy=False), base_value, dtype=base_value.dtype)
    return delta


def _trained_arrays(trained: StateDict, base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``trained`` as numpy arrays, checked to have the base's names and shapes (:class:`SchemaMismatch`)."""
    missing, extra = sorted(set(base) - set(trained)), sorted(set(trained) - set(base))
    if missing or extra:
        raise SchemaMismatch(f"trained state dict differs from the base model: missing {missing}, unexpected {extra}")
    arrays = {}
    for name, base_value in base.items():
        value = to_numpy(trained[name])
        if value.shape != base_value.shape:
            raise SchemaMismatch(f"{name}: trained shape {list(value.shape)} != base shape {list(base_value.shape)}")
        arrays[name] = value
    return arrays


class _DeltaReader(io.RawIOBase):
    """The safetensors payload of ``trained - base``, computed as it is read.

    Read sequentially (by the validator), it computes each piece of the delta into one buffer of
    the payload's size — the bytes that will be uploaded — and hands the validator a copy of the
    piece: the delta is computed, hashed and checked in one pass, in pieces of the validator's
    size, and never serialised again. Every delta element is ``trained`` cast to the base's dtype
    minus ``base`` in that dtype, exactly as :func:`compute_delta`, laid out as
    :func:`~fedbucket.protocol.tensors.tensors_to_bytes` would: the payload is bit for bit the one
    ``save_tensors(compute_delta(trained, base))`` writes (tests/test_client.py).
    """

    def __init__(self, trained: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.header: Header = plan_safetensors({name: (dtype_name(b), b.shape) for name, b in base.items()})
        self._tensors = self.header.in_file_order()
        self.size = self._tensors[-1].end if self._tensors else self.header.data_start
        self._trained = {name: np.ravel(value) for name, value in trained.items()}  # views when contiguous
        self._base = {name: value.reshape(-1) for name, value in base.items()}
        self._payload: bytearray | None = None  # allocated on the first read: after the size check
        self._position = self._filled = self._index = 0

    @property
    def payload(self) -> memoryview:
        """The whole payload; complete once it has been read to the end."""
        if self._payload is None or self._filled < self.size:
            raise RuntimeError("the delta payload has not been read to its end yet")
        return memoryview(self._payload)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.size - self._position)
        if n <= 0:
            return 0
        end = self._position + n
        self._compute_upto(end)
        assert self._payload is not None
        memoryview(buffer)[:n] = memoryview(self._payload)[self._position : end]
        self._position = end
        return n

    def _compute_upto(self, end: int) -> None:
        if self._payload is None:
            self._payload = bytearray(self.size)
            self._payload[: self.header.data_start] = self.header.header_bytes
            self._filled = self.header.data_start
        while self._filled < end:
            info = self._tensors[self._index]
            if self._filled >= info.end:  # done with it (or empty)
                self._index += 1
                continue
            itemsize = info.np_dtype.itemsize
            first = (self._filled - info.start) // itemsize
            stop = -(-(min(end, info.end) - info.start) // itemsize)  # whole elements covering `end`
            out = np.frombuffer(
                self._payload, dtype=info.np_dtype, count=stop - first, offset=info.start + first * itemsize
            )
            trained, base = self._trained[info.name][first:stop], self._base[info.name][first:stop]
            np.subtract(trained.astype(base.dtype, copy=False), base, out=out)
            self._filled = info.start + stop * itemsize


def apply_delta(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``base + delta`` per tensor, in the base's dtype (the inverse of :func:`compute_delta`)."""
    return {name: np.add(value, delta[name], dtype=value.dtype) for name, value in base.items()}


class Client:
    """One organisation's handle on a federation.

    Args:
        bucket_url: the federation root, ``gs://bucket/prefix`` or ``file:///dir``.
        client_id: this organisation's id, as registered with the federation operator (it names
            the only prefix the client may write: ``updates/<client_id>/``).
        credentials: for ``gs://`` only — a path to a service-account key file, or a
            ``google.auth`` credentials object; ``None`` uses Application Default Credentials.
        cache_dir: where fetched models are cached by version (default
            ``~/.cache/fedbucket``); a version is never downloaded twice.
        store: an already opened :class:`~fedbucket.protocol.storage.ObjectStore` (a seam for tests).

    Use it as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        bucket_url: str,
        client_id: str,
        *,
        credentials: str | os.PathLike[str] | object | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        store: ObjectStore | None = None,
        retry_timeout: float | None = None,
        layout: BucketLayout = LAYOUT,
    ) -> None:
        self.client_id = check_identifier(client_id, "client id")
        self.layout = layout
        self.store = store or open_store(bucket_url, credentials=credentials, retry_timeout=retry_timeout)
        root = Path(cache_dir or os.environ.get("FEDBUCKET_CACHE", Path.home() / ".cache" / "fedbucket"))
        self.cache_dir = root / hashlib.sha256(self.store.url.encode()).hexdigest()[:16]

    # -- what to do ---------------------------------------------------------------------------

    def current_round(self) -> RoundTask | None:
        """The open round's task, or ``None`` when no round is open."""
        pointer, _ = read_optional(self.store, self.layout.current_round, RoundPointer)
        if pointer is None or pointer.status != "open":
            return None
        task, _ = read_document(self.store, self.layout.round_task(pointer.round_id), RoundTask)
        return task

    def wait_for_round(
        self, *, timeout: float = 3600.0, poll_interval: float = 5.0, after: str | None = None
    ) -> RoundTask:
        """Block until a round is open (and, with ``after``, is not that round id); return its task.

        Raises :class:`~fedbucket.protocol.errors.WaitTimeout` after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            task = self.current_round()
            if task is not None and task.round_id != after and utcnow() < task.deadline:
                return task
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"no new round opened within {timeout:.0f}s")
            time.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))

    def current_evaluation(self) -> EvaluationTask | None:
        """The candidate the server asks clients to score now, or ``None`` (see docs/aggregation.md,
        "Federated evaluation")."""
        pointer, _ = read_optional(self.store, self.layout.current_round, RoundPointer)
        if pointer is None or pointer.status != "evaluating":
            return None
        task, _ = read_optional(self.store, self.layout.evaluation_task(pointer.round_id), EvaluationTask)
        return task if task is not None and utcnow() < task.deadline else None

    def evaluated(self, round_id: str) -> ClientEvaluation | None:
        """This client's committed evaluation of ``round_id``'s candidate, if any."""
        report, _ = read_optional(self.store, self.layout.client_evaluation(self.client_id, round_id), ClientEvaluation)
        return report

    def submitted(self, round_id: str) -> UpdateManifest | None:
        """This client's committed update for ``round_id``, if any."""
        manifest, _ = read_optional(self.store, self.layout.update_manifest(self.client_id, round_id), UpdateManifest)
        return manifest

    # -- the global model -----------------------------------------------------------------------

    def fetch_model_file(self, version: str, *, progress: Progress | None = None) -> Path:
        """Path of model ``version`` in the local cache, downloaded and sha256-verified if needed
        (the sha256 is computed as the bytes arrive; a file that fails it never enters the cache)."""
        manifest, _ = read_document(self.store, self.layout.model_manifest(version), ModelManifest)
        path = self.cache_dir / "models" / f"{version}-{manifest.sha256}.safetensors"
        if path.exists():
            return path  # written only after its sha256 matched the manifest
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            part = Path(tmp) / "model.safetensors"
            hasher = hashlib.sha256()
            self.store.download_file(
                self.layout.model_payload(version),
                part,
                progress=_phase(progress, "download", manifest.size_bytes),
                hasher=hasher,
            )
            digest = hasher.hexdigest()
            if digest != manifest.sha256:
                raise ChecksumMismatch(
                    f"model {version} downloaded with sha256 {digest}, its manifest says {manifest.sha256}; "
                    "the bucket may be corrupted or tampered with — tell the federation operator"
                )
            part.replace(path)
        return path

    def fetch_model(
        self, task: RoundTask, *, as_numpy: bool = False, progress: Progress | None = None
    ) -> dict[str, Any]:
        """The round's base model as a state dict (torch tensors if torch is installed)."""
        path = self.fetch_model_file(task.base_model_version, progress=progress)
        if task.base_model_sha256 not in path.name:
            raise ChecksumMismatch(f"round {task.round_id} names base sha256 {task.base_model_sha256}, not {path.name}")
        arrays = load_tensors(path)
        if as_numpy:
            return arrays
        try:
            import torch
        except ImportError:
            return arrays
        return {name: torch.from_numpy(np.array(value)) for name, value in arrays.items()}

    def fetch_candidate(self, task: EvaluationTask) -> dict[str, np.ndarray]:
        """The candidate an evaluation task asks to score, sha256-verified (numpy arrays)."""
        with tempfile.TemporaryDirectory() as tmp:
            part = Path(tmp) / "candidate.safetensors"
            hasher = hashlib.sha256()
            self.store.download_file(self.layout.candidate_payload(task.round_id), part, hasher=hasher)
            digest = hasher.hexdigest()
            if digest != task.candidate_sha256:
                raise ChecksumMismatch(
                    f"candidate of round {task.round_id} downloaded with sha256 {digest}, the evaluation task "
                    f"says {task.candidate_sha256}; tell the federation operator"
                )
            return load_tensors(part)

    def submit_evaluation(
        self, task: EvaluationTask, *, candidate: ModelScore, current: ModelScore
    ) -> ClientEvaluation:
        """Send this client's scores of the candidate and of the round's base model (both on the
        same local validation examples). Checked locally exactly as the server will check it;
        resubmitting before the deadline replaces the earlier report."""
        from fedbucket.protocol.validation import check_client_evaluation

        if utcnow() > task.deadline:
            raise RoundNotOpen(f"the evaluation of round {task.round_id} closed at {task.deadline.isoformat()}")
        try:
            report = ClientEvaluation(
                client_id=self.client_id,
                round_id=task.round_id,
                candidate_sha256=task.candidate_sha256,
                base_model_version=task.base_model_version,
                candidate=candidate,
                current=current,
                created_at=utcnow(),
            )
        except ValidationError as exc:
            raise InvalidManifest(f"cannot describe this evaluation: {describe_validation_error(exc)}") from None
        check_client_evaluation(task, report, report.created_at)
        self.store.put_bytes(self.layout.client_evaluation(self.client_id, task.round_id), report.to_json_bytes())
        return report

    # -- submitting ----------------------------------------------------------------------------

    def check_round_open(self, task: RoundTask) -> None:
        """Raise :class:`RoundNotOpen` or :class:`StaleUpdate` unless ``task`` still takes updates."""
        pointer, _ = read_optional(self.store, self.layout.current_round, RoundPointer)
        if pointer is None or pointer.round_id != task.round_id:
            now = pointer.round_id if pointer else "none"
            raise StaleUpdate(f"round {task.round_id} is over (current round: {now}); fetch the new task and retrain")
        if pointer.status != "open":
            raise RoundNotOpen(f"round {task.round_id} is closed; wait for the next round")
        if utcnow() > task.deadline:
            raise RoundNotOpen(f"round {task.round_id} stopped taking updates at {task.deadline.isoformat()}")

    def submit(
        self,
        task: RoundTask,
        trained: StateDict,
        *,
        num_examples: int,
        metrics: Mapping[str, float] | None = None,
        progress: Progress | None = None,
    ) -> UpdateManifest:
        """Send ``trained - base`` as this client's update for ``task``.

        Resubmitting within a round replaces the earlier update (the last manifest written wins).
        Raises :class:`RoundNotOpen` (closed or past the deadline), :class:`StaleUpdate` (a newer
        round is open), :class:`SchemaMismatch` and the other validation errors before uploading.
        ``progress`` is told of the phases ``"delta"`` and ``"upload"`` (see :data:`Progress`).
        """
        self.check_round_open(task)
        base = self.fetch_model(task, as_numpy=True)
        for name, spec in task.tensors.items():
            if name in base and base[name].dtype != NUMPY_DTYPES[spec.dtype]:
                raise SchemaMismatch(f"{name}: base model dtype differs from the round's schema")
        if task.secure_aggregation is not None:
            delta = compute_delta(trained, base)
            return self._submit_securely(task, delta, num_examples=num_examples, metrics=metrics, progress=progress)
        return upload_delta(
            self.store,
            task,
            self.client_id,
            trained,
            base,
            num_examples=num_examples,
            metrics=metrics,
            layout=self.layout,
            progress=progress,
        )

    def submit_file(
        self,
        task: RoundTask,
        delta_path: str | os.PathLike[str],
        *,
        num_examples: int,
        metrics: Mapping[str, float] | None = None,
        progress: Progress | None = None,
    ) -> UpdateManifest:
        """Send an already computed delta (a safetensors file) as this client's update
        (``progress``: phases ``"validate"`` and ``"upload"``)."""
        self.check_round_open(task)
        if task.secure_aggregation is not None:
            delta = load_tensors(delta_path)
            return self._submit_securely(task, delta, num_examples=num_examples, metrics=metrics, progress=progress)
        return upload_update(
            self.store,
            task,
            self.client_id,
            delta_path,
            num_examples=num_examples,
            metrics=metrics,
            layout=self.layout,
            progress=progress,
        )

    def _submit_securely(
        self,
        task: RoundTask,
        delta: Mapping[str, np.ndarray],
        *,
        num_examples: int,
        metrics: Mapping[str, float] | None,
        progress: Progress | None,
    ) -> UpdateManifest:
        """A secure-aggregation round's four client phases (docs/protocol.md, "Secure aggregation"):
        blocks until this client has answered the unmasking, or raises if it dropped out."""
        from fedbucket.client.secagg import submit_securely  # it builds on this module

        def upload(path: Path) -> UpdateManifest:
            return upload_update(
                self.store,
                task,
                self.client_id,
                path,
                num_examples=num_examples,
                metrics=metrics,
                layout=self.layout,
                progress=progress,
            )

        return submit_securely(self.store, task, self.client_id, delta, upload=upload, layout=self.layout)

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Release the storage client's connections."""
        close = getattr(getattr(self.store, "_client", None), "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = ["Client", "Progress", "apply_delta", "compute_delta", "to_numpy", "upload_delta", "upload_update"]
