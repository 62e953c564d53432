"""Validation of untrusted updates: every failure is typed, coded and explained."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from datetime import timedelta

import numpy as np
import pytest

from conftest import tiny_model
from fedbucket import (
    LAYOUT,
    ChecksumMismatch,
    InvalidIdentifier,
    InvalidManifest,
    LateUpdate,
    MalformedPayload,
    NonFiniteValues,
    NormTooLarge,
    ObjectStore,
    RoundTask,
    SchemaMismatch,
    StaleUpdate,
    UpdateManifest,
    UpdateRejected,
    UpdateTooLarge,
    tensors_to_bytes,
    validate_update,
)
from fedbucket.client import upload_update
from fedbucket.protocol.documents import utcnow
from fedbucket.protocol.tensors import MAX_HEADER_BYTES
from fedbucket.protocol.validation import list_update_manifests


def delta(seed: int = 1, scale: float = 0.01) -> dict[str, np.ndarray]:
    model = tiny_model(seed)
    return {k: (v * scale).astype(v.dtype) if v.dtype.kind == "f" else np.zeros_like(v) for k, v in model.items()}


def commit_raw(store: ObjectStore, task: RoundTask, path_client: str, payload: bytes, **overrides) -> str:
    """Write payload + manifest exactly as a (possibly hostile) client could, bypassing client checks."""
    sha = hashlib.sha256(payload).hexdigest()
    store.put_bytes(LAYOUT.update_payload(path_client, task.round_id, sha), payload)
    fields = {
        "client_id": path_client,
        "round_id": task.round_id,
        "base_model_version": task.base_model_version,
        "num_examples": 10,
        "sha256": sha,
        "size_bytes": len(payload),
        "created_at": utcnow(),
    } | overrides
    name = LAYOUT.update_manifest(path_client, task.round_id)
    store.put_bytes(name, UpdateManifest(**fields).to_json_bytes())
    return name


def test_valid_update_is_accepted_with_its_norm(store, open_task, tmp_path):
    path = tmp_path / "delta.safetensors"
    tensors = delta()
    path.write_bytes(tensors_to_bytes(tensors))
    manifest = upload_update(store, open_task, "hospital-a", path, num_examples=42, metrics={"loss": 0.5})
    names = list_update_manifests(store, open_task.round_id).names
    assert names == ["updates/hospital-a/r1/manifest.json"]
    update = validate_update(store, open_task, names[0])
    assert update.client_id == "hospital-a" and update.manifest.num_examples == 42
    assert update.manifest.sha256 == manifest.sha256
    expected = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in tensors.values() if v.dtype.kind == "f"))
    assert update.l2_norm == pytest.approx(expected, rel=1e-6)  # float32 BLAS dot per chunk


def test_resubmission_replaces_the_earlier_update(store, open_task, tmp_path):
    path = tmp_path / "d.safetensors"
    path.write_bytes(tensors_to_bytes(delta(1)))
    upload_update(store, open_task, "c1", path, num_examples=5)
    path.write_bytes(tensors_to_bytes(delta(2)))
    second = upload_update(store, open_task, "c1", path, num_examples=7)
    update = validate_update(store, open_task, LAYOUT.update_manifest("c1", "r1"))
    assert update.manifest.sha256 == second.sha256 and update.manifest.num_examples == 7


def _pickle_payload() -> bytes:
    return pickle.dumps({"layer.weight": [1.0] * 35})


def _header_only(header: dict) -> bytes:
    return _header_only_raw(json.dumps(header).encode())


def _header_only_raw(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


HOSTILE_PAYLOADS = {
    "pickle renamed": (_pickle_payload, MalformedPayload),
    "truncated": (lambda: tensors_to_bytes(delta())[:-9], MalformedPayload),
    "huge header length": (lambda: struct.pack("<Q", MAX_HEADER_BYTES * 1000) + b"{}", MalformedPayload),
    "offsets past the end": (
        lambda: _header_only({"layer.weight": {"dtype": "F32", "shape": [7, 5], "data_offsets": [0, 140]}}),
        MalformedPayload,
    ),
    "disallowed dtype": (
        lambda: _header_only({"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}) + b"\0",
        MalformedPayload,
    ),
    "dtype not a string": (
        lambda: _header_only({"x": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}) + b"\0" * 4,
        MalformedPayload,
    ),
    "deeply nested header": (lambda: _header_only_raw(b"[" * 100000 + b"]" * 100000), MalformedPayload),
    "wrong shape": (
        lambda: tensors_to_bytes(delta() | {"layer.weight": np.zeros((5, 7), np.float32)}),
        SchemaMismatch,
    ),
    "missing tensor": (
        lambda: tensors_to_bytes({k: v for k, v in delta().items() if k != "layer.bias"}),
        SchemaMismatch,
    ),
    "wrong dtype": (lambda: tensors_to_bytes(delta() | {"layer.bias": np.zeros(7, np.float64)}), SchemaMismatch),
    "nan": (lambda: tensors_to_bytes(delta() | {"layer.bias": np.full(7, np.nan, np.float32)}), NonFiniteValues),
    "inf": (lambda: tensors_to_bytes(delta() | {"norm.scale": np.float32(np.inf).reshape(())}), NonFiniteValues),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_PAYLOADS))
def test_hostile_payloads_are_rejected_with_a_reason(store, open_task, case):
    make, error = HOSTILE_PAYLOADS[case]
    name = commit_raw(store, open_task, "mallory", make())
    with pytest.raises(error) as info:
        validate_update(store, open_task, name)
    assert info.value.code == error.code and info.value.reason


def test_checksum_mismatch(store, open_task):
    payload = tensors_to_bytes(delta())
    name = commit_raw(store, open_task, "c1", payload)
    sha = hashlib.sha256(payload).hexdigest()
    tampered = bytearray(payload)
    tampered[-1] ^= 0x01  # still finite, still the right shape
    store.put_bytes(LAYOUT.update_payload("c1", "r1", sha), bytes(tampered))
    with pytest.raises(ChecksumMismatch):
        validate_update(store, open_task, name)


def test_too_large_is_refused_before_reading(store, open_task):
    payload = tensors_to_bytes(delta()) + b"\0" * open_task.max_update_bytes
    name = commit_raw(store, open_task, "c1", payload)
    with pytest.raises(UpdateTooLarge):
        validate_update(store, open_task, name)


def test_stale_base_and_late_and_foreign_ids(store, open_task):
    payload = tensors_to_bytes(delta())
    with pytest.raises(StaleUpdate):
        validate_update(store, open_task, commit_raw(store, open_task, "c1", payload, base_model_version="old"))
    late_task = open_task.model_copy(update={"deadline": utcnow() - timedelta(seconds=5)})
    with pytest.raises(LateUpdate, match="after the deadline"):
        validate_update(store, late_task, commit_raw(store, open_task, "c2", payload))
    # a manifest under c3's prefix that claims to be c4's
    with pytest.raises(InvalidIdentifier):
        validate_update(store, open_task, commit_raw(store, open_task, "c3", payload, client_id="c4"))


def test_norm_limit(store, open_task):
    capped = open_task.model_copy(update={"max_update_norm": 1e-6})
    with pytest.raises(NormTooLarge):
        validate_update(store, capped, commit_raw(store, open_task, "c1", tensors_to_bytes(delta())))


def test_invalid_manifest_documents(store, open_task):
    name = LAYOUT.update_manifest("c1", "r1")
    store.put_bytes(name, b'{"kind": "update-manifest", "schema_version": 99}')
    with pytest.raises(InvalidManifest, match="schema_version 99 is not supported"):
        validate_update(store, open_task, name)
    store.put_bytes(name, b"\x80\x04not json")
    with pytest.raises(InvalidManifest, match="not valid JSON"):
        validate_update(store, open_task, name)
    store.put_bytes(name, b"[" * 30000 + b"]" * 30000)  # would overflow the JSON parser's recursion
    with pytest.raises(InvalidManifest, match="not valid JSON"):
        validate_update(store, open_task, name)


@pytest.mark.parametrize("bad", ["", "..", "a/b", "x" * 64, "-lead", "a..b"])
def test_unsafe_identifiers_are_rejected(bad):
    with pytest.raises(InvalidIdentifier):
        LAYOUT.update_manifest(bad, "r1")
    with pytest.raises(InvalidIdentifier):
        LAYOUT.parse_update_manifest(f"updates/{bad}/r1/manifest.json")


def test_every_rejection_is_an_update_rejected():
    for _, error in HOSTILE_PAYLOADS.values():
        assert issubclass(error, UpdateRejected)


def test_client_refuses_an_invalid_update_before_uploading(store, open_task, tmp_path):
    path = tmp_path / "nan.safetensors"
    path.write_bytes(tensors_to_bytes(delta() | {"layer.bias": np.full(7, np.nan, np.float32)}))
    with pytest.raises(NonFiniteValues):
        upload_update(store, open_task, "c1", path, num_examples=3)
    assert list(store.list("updates/")) == []
