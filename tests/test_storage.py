"""One conformance suite for every ObjectStore: file:// and gs:// (fake-gcs-server over HTTP)."""

from __future__ import annotations

import hashlib
import os
import threading
import tracemalloc

import pytest

from fedbucket import ObjectNotFound, ObjectStore, PreconditionFailed, StorageError, open_store
from fedbucket.protocol.storage import FileStore, GCSStore, Part


def test_open_store_by_url(tmp_path, gcs_server):
    assert isinstance(open_store(tmp_path.as_uri()), FileStore)
    assert isinstance(open_store(str(tmp_path / "plain"), create=True), FileStore)
    assert isinstance(open_store("gs://fedbucket-test/x"), GCSStore)
    with pytest.raises(StorageError, match="unsupported storage scheme"):
        open_store("s3://bucket/x")


def test_put_get_stat_exists_delete(store: ObjectStore):
    assert not store.exists("a/b.json")
    info = store.put_bytes("a/b.json", b'{"x": 1}')
    assert info.size == 8 and info.generation > 0
    data, generation = store.get_bytes("a/b.json")
    assert data == b'{"x": 1}' and generation == info.generation
    assert store.stat("a/b.json").generation == info.generation
    assert store.read_range("a/b.json", 1, 5) == b'"x":'
    assert store.exists("a/b.json")
    store.delete("a/b.json")
    assert not store.exists("a/b.json")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("a/b.json")
    with pytest.raises(ObjectNotFound):
        store.delete("a/b.json")


def test_list_is_sorted_and_prefix_filtered(store: ObjectStore):
    for name in ["updates/c2/r1/manifest.json", "updates/c1/r1/manifest.json", "models/current.json", "updates-x"]:
        store.put_bytes(name, b"{}")
    assert [i.name for i in store.list("updates/")] == ["updates/c1/r1/manifest.json", "updates/c2/r1/manifest.json"]
    assert len(list(store.list())) == 4


@pytest.mark.parametrize("name", ["", "/abs", "a/../b", "a//b", ".hidden", "a/./b"])
def test_invalid_names_are_refused(store: ObjectStore, name: str):
    with pytest.raises(StorageError):
        store.put_bytes(name, b"x")


def test_compare_and_swap(store: ObjectStore):
    first = store.put_bytes("pointer.json", b"v1", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        store.put_bytes("pointer.json", b"other", if_generation_match=0)  # create-only
    second = store.put_bytes("pointer.json", b"v2", if_generation_match=first.generation)
    assert second.generation != first.generation
    with pytest.raises(PreconditionFailed):
        store.put_bytes("pointer.json", b"v3", if_generation_match=first.generation)  # stale
    assert store.get_bytes("pointer.json")[0] == b"v2"


def test_copy(store: ObjectStore):
    store.put_bytes("src.bin", b"payload")
    store.copy("src.bin", "dst/copied.bin")
    assert store.get_bytes("dst/copied.bin")[0] == b"payload"
    with pytest.raises(ObjectNotFound):
        store.copy("missing.bin", "dst/other.bin")


def test_concurrent_writers_exactly_one_wins(store: ObjectStore):
    """Eight writers read the same generation and race to swap the pointer: one may win."""
    base = store.put_bytes("rounds/current.json", b"start")
    for attempt in range(3):
        start = store.stat("rounds/current.json").generation
        barrier = threading.Barrier(8)
        outcomes: list[str] = []

        def writer(i: int, start=start, barrier=barrier, outcomes=outcomes, attempt=attempt) -> None:
            barrier.wait()
            try:
                store.put_bytes("rounds/current.json", f"{attempt}-{i}".encode(), if_generation_match=start)
                outcomes.append(f"{attempt}-{i}")
            except PreconditionFailed:
                outcomes.append("lost")

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [o for o in outcomes if o != "lost"]
        assert len(outcomes) == 8 and len(winners) == 1, outcomes
        assert store.get_bytes("rounds/current.json")[0] == winners[0].encode()
    assert store.stat("rounds/current.json").generation != base.generation


def test_large_object_streams_in_bounded_memory(store: ObjectStore, tmp_path):
    """A 320 MiB object goes up and down without being held in memory, let alone twice."""
    size = 320 * 1024 * 1024
    src = tmp_path / "big.bin"
    block = hashlib.sha256(b"seed").digest() * (1024 * 1024 // 32)  # 1 MiB, not all zeros
    digest = hashlib.sha256()
    with open(src, "wb") as f:
        for i in range(size // len(block)):
            piece = i.to_bytes(8, "little") + block[8:]
            f.write(piece)
            digest.update(piece)
    tracemalloc.start()
    try:
        transferred: list[int] = []
        store.upload_file("models/big/model.safetensors", src, if_generation_match=0, progress=transferred.append)
        dst = tmp_path / "back.bin"
        store.download_file("models/big/model.safetensors", dst)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(transferred) == size
    assert store.stat("models/big/model.safetensors").size == size
    back = hashlib.sha256()
    with open(dst, "rb") as f:
        while chunk := f.read(1 << 24):
            back.update(chunk)
    assert back.hexdigest() == digest.hexdigest()
    # Streaming: the peak stays below one copy of the object (uploads go in 100 MiB resumable chunks).
    assert peak < 0.75 * size, f"peak traced memory {peak / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB object"
    # range reads see the same bytes
    with open(src, "rb") as f:
        f.seek(size - 1000)
        assert store.read_range("models/big/model.safetensors", size - 1000, size) == f.read()


def test_file_store_hides_temporary_files(tmp_path):
    store = FileStore(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / ".model.safetensors.tmp-123").write_bytes(b"partial")
    store.put_bytes("models/ok.json", b"{}")
    assert [i.name for i in store.list()] == ["models/ok.json"]


def test_assembly_from_parts_written_by_many_workers(store: ObjectStore):
    """Parts written in any order, from other store instances (as Spark executors do), a range
    written twice (a retried task: the finish joins the parts it is given), more parts than one GCS
    compose takes: one atomic object, and no scratch left behind."""
    payload = bytes(range(256)) * 300 + b"tail"
    cuts = list(range(0, len(payload), 1000))  # 77 parts: a two-level compose tree on GCS
    ranges = [(at, min(1000, len(payload) - at)) for at in cuts]
    store.put_bytes("rounds/r/candidate/model.bin", b"old")
    assembly = store.begin_assembly("rounds/r/candidate/model.bin", len(payload))
    workers = [open_store(store.url) for _ in range(3)]
    parts: dict[int, Part] = {}

    def write(index: int) -> None:
        offset, length = ranges[index]
        parts[index] = workers[index % 3].write_part(assembly, offset, memoryview(payload)[offset : offset + length])

    threads = [threading.Thread(target=write, args=(i,)) for i in reversed(range(len(ranges)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    write(5)  # again (a retried task): same bytes
    assert store.get_bytes("rounds/r/candidate/model.bin")[0] == b"old"  # nothing visible before the finish
    with pytest.raises(StorageError, match="tile"):
        store.finish_assembly(assembly, [parts[i] for i in range(1, len(ranges))])
    with pytest.raises(StorageError, match="outside"):
        store.write_part(assembly, len(payload) - 2, b"abc")
    info = store.finish_assembly(assembly, [parts[i] for i in range(len(ranges))])
    assert info.size == len(payload)
    assert store.get_bytes("rounds/r/candidate/model.bin")[0] == payload
    assert [i.name for i in store.list("rounds/r/")] == ["rounds/r/candidate/model.bin"]  # no scratch left

    dropped = store.begin_assembly("rounds/r/other.bin", 10)
    store.write_part(dropped, 0, b"0123456789")
    store.abort_assembly(dropped)
    assert not store.exists("rounds/r/other.bin")
    assert [i.name for i in store.list("rounds/r/")] == ["rounds/r/candidate/model.bin"]


def test_file_store_assembly_refuses_a_swapped_scratch_file(tmp_path):
    """Whoever can write next to the candidate cannot make the workers write into another file:
    the scratch file is pinned by inode at begin, opened without following links or blocking."""
    store = FileStore(tmp_path)
    assembly = store.begin_assembly("rounds/r/candidate/model.bin", 4)
    scratch = next((tmp_path / "rounds/r/candidate").glob(".model.bin.assembly-*"))
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    scratch.unlink()
    os.link(victim, scratch)  # same size, another file
    with pytest.raises(StorageError, match="replaced"):
        store.write_part(assembly, 0, b"evil")
    scratch.unlink()
    os.mkfifo(scratch)  # a FIFO must not block the worker (no reader: refused by open, or as not a regular file)
    with pytest.raises(StorageError):
        store.write_part(assembly, 0, b"evil")
    assert victim.read_bytes() == b"keep"
