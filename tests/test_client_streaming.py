"""The SDK at wire speed (issue 14), on both stores: the delta computed, hashed and validated in one
streamed pass is bit for bit the old ``save_tensors(compute_delta(...))``; refusals keep their codes;
a model is hashed as it downloads and a corrupted one is still refused; progress names its phases,
in order, and moves monotonically in many steps. Nothing here depends on the machine's speed."""

from __future__ import annotations

import hashlib
import io
import itertools
from datetime import timedelta

import numpy as np
import pytest
import torch

from fedbucket import (
    LAYOUT,
    ChecksumMismatch,
    Client,
    FileStore,
    NonFiniteValues,
    NormTooLarge,
    ObjectStore,
    PreconditionFailed,
    RoundTask,
    TrainingConfig,
    UpdateRejected,
    UpdateTooLarge,
    compute_delta,
    tensors_to_bytes,
)
from fedbucket.client import upload_update
from fedbucket.protocol.documents import ModelSpec, utcnow
from fedbucket.protocol.storage import STREAM_CHUNK_BYTES
from fedbucket.protocol.tensors import dtype_name, plan_safetensors, read_header
from fedbucket.server.rounds import open_round, publish_model, set_current_model

MiB = 1024 * 1024


def mixed_model(float_mib: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    """Every dtype a payload may hold, a scalar, an empty tensor and (optionally) ``float_mib`` MiB
    of float32 in two tensors, so that the payload spans several stream chunks."""
    rng = np.random.default_rng(seed)
    model = {
        "a.f64": rng.standard_normal((3, 4)),
        "b.f16": rng.standard_normal(9).astype(np.float16),
        "c.i32": rng.integers(-5, 5, 6, dtype=np.int32),
        "d.u32": rng.integers(0, 9, 5, dtype=np.uint32),
        "e.i64": np.array(7, dtype=np.int64),
        "f.scalar": np.float32(rng.standard_normal()).reshape(()),
        "g.empty": np.zeros((0, 3), np.float32),
        'é.unicode "name"': rng.standard_normal((2, 2)).astype(np.float32),
    }
    if float_mib:
        n = float_mib * MiB // 4
        model["big.weight"] = rng.standard_normal((n // 512 - 3, 512)).astype(np.float32)
        model["big.bias"] = rng.standard_normal(3 * 512 + 1).astype(np.float32)
    return model


def trained_from(base: dict[str, np.ndarray], seed: int = 1) -> dict[str, object]:
    """A trained state dict as users hand it over: float64 values for float32 tensors (cast by the
    SDK), non-contiguous arrays, torch tensors, integer buffers that moved."""
    rng = np.random.default_rng(seed)
    trained: dict[str, object] = {}
    for name, value in base.items():
        if value.dtype.kind == "f":
            moved = value.astype(np.float64) + 0.01 * rng.standard_normal(value.shape)
            trained[name] = moved if value.dtype == np.float32 else moved.astype(value.dtype)
        else:
            trained[name] = value + 2
    trained["a.f64"] = np.asfortranarray(trained["a.f64"])  # non-contiguous in C order
    trained["b.f16"] = torch.from_numpy(np.asarray(trained["b.f16"]))
    return trained


def federation(store: ObjectStore, model: dict[str, np.ndarray], **round_options: object) -> RoundTask:
    manifest = publish_model(store, model, version="init", model=ModelSpec(name="tests.mixed"))
    set_current_model(store, manifest, expected_generation=0)
    return open_round(
        store,
        round_id="r1",
        opened_at=utcnow() - timedelta(seconds=1),
        deadline_seconds=3600,
        training=TrainingConfig(),
        **round_options,
    )


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def __call__(self, phase: str, done: int, total: int) -> None:
        self.calls.append((phase, done, total))

    def phases(self) -> list[str]:
        order: list[str] = []
        for phase, _, _ in self.calls:
            if not order or order[-1] != phase:
                order.append(phase)
        return order

    def check(self, phase: str, total: int, min_steps: int) -> None:
        done = [d for p, d, t in self.calls if p == phase]
        assert {t for p, _, t in self.calls if p == phase} == {total}
        assert done[0] == 0 and done[-1] == total, (phase, done[:3], done[-3:])
        assert all(a < b for a, b in itertools.pairwise(done)), f"{phase} not strictly increasing"
        assert len(done) - 1 >= min_steps, f"{phase}: {len(done) - 1} steps"


def test_plan_safetensors_is_what_safetensors_writes():
    for model in (mixed_model(), {"x": np.zeros(3, np.float32)}, {"b": np.zeros(1, np.int64), "a": np.ones(2)}):
        data = tensors_to_bytes(model)
        planned = plan_safetensors({n: (dtype_name(v), v.shape) for n, v in model.items()})
        header = read_header(io.BytesIO(data), len(data))
        assert planned.header_bytes == data[: header.data_start]
        assert planned == header


def test_streamed_delta_is_the_old_payload_bit_for_bit(store, tmp_path):
    base = mixed_model(float_mib=20)  # > 8 MiB: the resumable upload on GCS, several validator chunks
    task = federation(store, base)
    with Client(store.url, "c1", cache_dir=tmp_path / "cache") as client:
        trained = trained_from(client.fetch_model(task, as_numpy=True))
        manifest = client.submit(task, trained, num_examples=3)
    expected = tensors_to_bytes(compute_delta(trained, client.fetch_model(task, as_numpy=True)))
    stored, _ = store.get_bytes(LAYOUT.update_payload("c1", "r1", manifest.sha256))
    assert stored == expected
    assert manifest.sha256 == hashlib.sha256(expected).hexdigest() and manifest.size_bytes == len(expected)


def test_progress_names_phases_in_order_and_moves_in_many_steps(store, tmp_path):
    base = mixed_model(float_mib=40)
    task = federation(store, base)
    model_size = store.stat(LAYOUT.model_payload("init")).size
    fetched, submitted = Recorder(), Recorder()
    with Client(store.url, "c1", cache_dir=tmp_path / "cache") as client:
        arrays = client.fetch_model(task, as_numpy=True, progress=fetched)
        manifest = client.submit(task, trained_from(arrays), num_examples=3, progress=submitted)
        again = Recorder()
        client.fetch_model(task, progress=again)  # cached: nothing to download, nothing to report
    assert fetched.phases() == ["download"] and again.calls == []
    assert submitted.phases() == ["delta", "upload"]
    steps = 40 * MiB // STREAM_CHUNK_BYTES  # the coarsest piece either store moves in
    fetched.check("download", model_size, steps)
    submitted.check("delta", manifest.size_bytes, steps)
    submitted.check("upload", manifest.size_bytes, steps)

    path = tmp_path / "delta.safetensors"
    path.write_bytes(store.get_bytes(LAYOUT.update_payload("c1", "r1", manifest.sha256))[0])
    with Client(store.url, "c2", cache_dir=tmp_path / "cache") as client:
        from_file = Recorder()
        client.submit_file(task, path, num_examples=3, progress=from_file)
    assert from_file.phases() == ["validate", "upload"]
    from_file.check("validate", manifest.size_bytes, steps)
    from_file.check("upload", manifest.size_bytes, steps)


def test_a_corrupted_download_is_refused_and_never_cached(store, tmp_path):
    task = federation(store, mixed_model())
    name = LAYOUT.model_payload("init")
    data = bytearray(store.get_bytes(name)[0])
    data[-1] ^= 0x01  # same size, one bit off
    store.put_bytes(name, bytes(data))
    with Client(store.url, "c1", cache_dir=tmp_path / "cache") as client:
        with pytest.raises(ChecksumMismatch, match="tampered"):
            client.fetch_model(task)
        with pytest.raises(ChecksumMismatch):
            client.submit(task, mixed_model(), num_examples=1)
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    assert list(store.list("updates/")) == []


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ("nan", NonFiniteValues),
        ("norm", NormTooLarge),
        ("size", UpdateTooLarge),
    ],
)
def test_streamed_refusals_are_the_validators(store, tmp_path, change, error):
    """The same error (class, code, reason) as the validator gives the old file, nothing uploaded."""
    base = mixed_model()
    task = federation(store, base, max_update_norm=1e3)
    trained = trained_from(base)
    if change == "nan":
        trained["f.scalar"] = np.float32(np.nan).reshape(())
    elif change == "norm":
        trained['é.unicode "name"'] = np.full((2, 2), 1e4, np.float32)
    else:
        task = task.model_copy(update={"max_update_bytes": 100})
    path = tmp_path / "old.safetensors"
    path.write_bytes(tensors_to_bytes(compute_delta(trained, base)))
    with pytest.raises(error) as old:
        upload_update(store, task, "c1", path, num_examples=1)
    with Client(store.url, "c1", cache_dir=tmp_path / "cache") as client, pytest.raises(error) as new:
        client.submit(task, trained, num_examples=1)
    assert isinstance(new.value, UpdateRejected)
    assert (new.value.code, new.value.reason) == (old.value.code, old.value.reason)
    assert list(store.list("updates/")) == []


def test_upload_buffer_and_hashing_download_round_trip(store, tmp_path):
    data = bytearray(np.random.default_rng(0).bytes(20 * MiB + 5))
    sent: list[int] = []
    info = store.upload_buffer("models/buf/model.bin", memoryview(data), if_generation_match=0, progress=sent.append)
    assert info.size == len(data) and sum(sent) == len(data) and len(sent) >= 2 and min(sent) > 0
    received: list[int] = []
    hasher = hashlib.sha256()
    store.download_file("models/buf/model.bin", tmp_path / "back.bin", progress=received.append, hasher=hasher)
    assert sum(received) == len(data) and len(received) >= 2
    assert (
        hasher.hexdigest()
        == hashlib.sha256(data).hexdigest()
        == hashlib.sha256((tmp_path / "back.bin").read_bytes()).hexdigest()
    )
    if isinstance(store, FileStore):  # fake-gcs-server ignores preconditions on resumable uploads
        with pytest.raises(PreconditionFailed):
            store.upload_buffer("models/buf/model.bin", memoryview(data), if_generation_match=0)
    small = store.upload_buffer("models/buf/small.bin", b"tiny", progress=sent.append)
    assert small.size == 4 and store.get_bytes("models/buf/small.bin")[0] == b"tiny"
