"""Object storage by URL: ``file:///dir`` (embedded default) and ``gs://bucket/prefix``.

Both stores give the same guarantees, checked by one conformance suite (tests/test_storage.py):

- a write is atomic: readers see the old object or the new one, never a part;
- every object has a ``generation`` that changes on each write, and writes accept
  ``if_generation_match`` (``0`` means "only if absent") for compare-and-swap;
- large objects stream in bounded memory (``upload_file``/``download_file``/``open_reader``).

Usage::

    store = open_store("gs://my-federation/prod")      # or "file:///srv/federation"
    info = store.put_bytes("rounds/current.json", data, if_generation_match=0)
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from fedbucket.errors import ObjectNotFound, PreconditionFailed, StorageError

#: Size of the pieces large objects are streamed in (also the GCS resumable-upload chunk).
STREAM_CHUNK_BYTES = 16 * 1024 * 1024

ProgressCallback = Callable[[int], None]
"""Called with the number of bytes just transferred."""


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    generation: int
    updated: datetime


def _check_name(name: str) -> str:
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise StorageError(f"invalid object name {name!r}")
    return name


class ObjectStore(ABC):
    """A flat namespace of immutable-per-generation objects under one root URL."""

    url: str

    @abstractmethod
    def stat(self, name: str) -> ObjectInfo:
        """Size, generation and update time of ``name``; :class:`ObjectNotFound` if absent."""

    def exists(self, name: str) -> bool:
        try:
            self.stat(name)
        except ObjectNotFound:
            return False
        return True

    @abstractmethod
    def get_bytes(self, name: str) -> tuple[bytes, int]:
        """Whole object and its generation. For small objects (documents)."""

    @abstractmethod
    def read_range(self, name: str, start: int, end: int, *, generation: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``name`` (optionally of one exact generation)."""

    @abstractmethod
    def open_reader(self, name: str, *, generation: int | None = None) -> BinaryIO:
        """A sequential, buffered reader over one generation of ``name``."""

    @abstractmethod
    def put_bytes(self, name: str, data: bytes, *, if_generation_match: int | None = None) -> ObjectInfo:
        """Write ``data`` atomically; :class:`PreconditionFailed` if the generation differs."""

    @abstractmethod
    def upload_file(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        if_generation_match: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> ObjectInfo:
        """Stream a local file to ``name`` in bounded memory."""

    @abstractmethod
    def copy(self, src: str, dst: str) -> ObjectInfo:
        """Copy object ``src`` to ``dst`` inside this store (server-side where possible).

        Unconditional: fake-gcs-server ignores preconditions on copies, so no caller may rely on one.
        """

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose names start with ``prefix``, in name order."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Delete ``name``; :class:`ObjectNotFound` if absent."""

    def download_file(
        self, name: str, path: str | os.PathLike[str], *, progress: ProgressCallback | None = None
    ) -> ObjectInfo:
        """Stream one generation of ``name`` to a local file (written atomically)."""
        info = self.stat(name)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part-{uuid.uuid4().hex}")
        try:
            with self.open_reader(name, generation=info.generation) as src, open(tmp, "wb") as dst:
                while chunk := src.read(STREAM_CHUNK_BYTES):
                    dst.write(chunk)
                    if progress:
                        progress(len(chunk))
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        return info


# --------------------------------------------------------------------------------------------
# file://


class FileStore(ObjectStore):
    """Objects as files under a directory.

    Atomic writes go through a temporary file in the same directory and ``os.replace``. The
    generation is the file's ``st_mtime_ns``, forced to increase on every write while holding an
    exclusive ``flock`` on ``<root>/.fedbucket.lock``, which makes compare-and-swap safe between
    processes on one machine (not across NFS clients: use ``gs://`` for that).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()
        self._lock_path = self.root / ".fedbucket.lock"

    def _path(self, name: str) -> Path:
        return self.root / _check_name(name)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _info(self, name: str, path: Path) -> ObjectInfo:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.url}/{name} does not exist") from None
        return ObjectInfo(name, st.st_size, st.st_mtime_ns, datetime.fromtimestamp(st.st_mtime_ns / 1e9, UTC))

    def stat(self, name: str) -> ObjectInfo:
        return self._info(name, self._path(name))

    def get_bytes(self, name: str) -> tuple[bytes, int]:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                generation = os.fstat(f.fileno()).st_mtime_ns
                return f.read(), generation
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.url}/{name} does not exist") from None

    def read_range(self, name: str, start: int, end: int, *, generation: int | None = None) -> bytes:
        with self.open_reader(name, generation=generation) as f:
            f.seek(start)
            return f.read(max(0, end - start))

    def open_reader(self, name: str, *, generation: int | None = None) -> BinaryIO:
        try:
            f = open(self._path(name), "rb")  # noqa: SIM115 - returned to the caller
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.url}/{name} does not exist") from None
        if generation is not None and os.fstat(f.fileno()).st_mtime_ns != generation:
            f.close()
            raise PreconditionFailed(f"{self.url}/{name} changed while being read (generation moved)")
        return f

    def _commit(self, name: str, tmp: Path, if_generation_match: int | None) -> ObjectInfo:
        path = self._path(name)
        with self._locked():
            try:
                current: int | None = path.stat().st_mtime_ns
            except FileNotFoundError:
                current = None
            if if_generation_match is not None and (current or 0) != if_generation_match:
                raise PreconditionFailed(
                    f"{self.url}/{name}: expected generation {if_generation_match}, found {current or 0}"
                )
            generation = max(time.time_ns(), (current or 0) + 1)
            os.utime(tmp, ns=(generation, generation))
            tmp.replace(path)
            return self._info(name, path)

    def _tmp_for(self, name: str) -> Path:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")

    def put_bytes(self, name: str, data: bytes, *, if_generation_match: int | None = None) -> ObjectInfo:
        tmp = self._tmp_for(name)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return self._commit(name, tmp, if_generation_match)
        finally:
            tmp.unlink(missing_ok=True)

    def upload_file(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        if_generation_match: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> ObjectInfo:
        tmp = self._tmp_for(name)
        try:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(STREAM_CHUNK_BYTES):
                    dst.write(chunk)
                    if progress:
                        progress(len(chunk))
                dst.flush()
                os.fsync(dst.fileno())
            return self._commit(name, tmp, if_generation_match)
        finally:
            tmp.unlink(missing_ok=True)

    def copy(self, src: str, dst: str) -> ObjectInfo:
        tmp = self._tmp_for(dst)
        try:
            try:
                shutil.copyfile(self._path(src), tmp)
            except FileNotFoundError:
                raise ObjectNotFound(f"{self.url}/{src} does not exist") from None
            return self._commit(dst, tmp, None)
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for fn in filenames:
                if fn.startswith("."):
                    continue
                name = fn if rel_dir == "." else f"{rel_dir}/{fn}"
                if name.startswith(prefix):
                    found.append(name)
        for name in sorted(found):
            with contextlib.suppress(ObjectNotFound):
                yield self.stat(name)

    def delete(self, name: str) -> None:
        path = self._path(name)
        with self._locked():
            self._info(name, path)
            path.unlink()


# --------------------------------------------------------------------------------------------
# gs://


class _ProgressReader:
    """A file wrapper that reports every read to a progress callback (seeks rewind the count)."""

    def __init__(self, raw: BinaryIO, progress: ProgressCallback) -> None:
        self._raw, self._progress = raw, progress

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._progress(len(data))
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        before = self._raw.tell()
        after = self._raw.seek(offset, whence)
        if after < before:
            self._progress(after - before)
        return after

    def tell(self) -> int:
        return self._raw.tell()


class GCSStore(ObjectStore):
    """Objects in a Google Cloud Storage bucket, under an optional prefix.

    Uses google-cloud-storage's own retry policy (exponential backoff on 429/5xx/connection
    errors only). Conditional writes are retried too, which makes one case need care: a write
    that succeeded but whose response was lost comes back as 412 on the retry. ``put_bytes``
    recognises that case by comparing the stored bytes with its own.

    Credentials: ``credentials`` if given, else Application Default Credentials; with
    ``STORAGE_EMULATOR_HOST`` set (tests, local demo) it talks anonymously to that emulator.
    """

    def __init__(self, url: str, *, credentials: object | None = None, project: str | None = None) -> None:
        from google.cloud import storage

        parsed = urlparse(url)
        if parsed.scheme != "gs" or not parsed.netloc:
            raise StorageError(f"{url!r} is not a gs://bucket[/prefix] URL")
        self.url = url.rstrip("/")
        self.prefix = parsed.path.strip("/")
        if self.prefix:
            self.prefix += "/"
        if os.environ.get("STORAGE_EMULATOR_HOST") and credentials is None:
            from google.auth.credentials import AnonymousCredentials

            credentials = AnonymousCredentials()
            project = project or os.environ.get("GOOGLE_CLOUD_PROJECT", "fedbucket-local")
        from google.auth.exceptions import DefaultCredentialsError

        try:
            self._client = storage.Client(project=project, credentials=credentials)
        except DefaultCredentialsError as exc:
            raise StorageError(
                f"no Google credentials for {url}: pass a service-account key file (--credentials) or run "
                f"`gcloud auth application-default login` ({exc})"
            ) from None
        self._bucket = self._client.bucket(parsed.netloc)

    def _blob(self, name: str, generation: int | None = None):  # noqa: ANN202 - google type
        return self._bucket.blob(self.prefix + _check_name(name), generation=generation)

    @contextlib.contextmanager
    def _translate(self, name: str) -> Iterator[None]:
        from google.api_core import exceptions as gexc

        try:
            yield
        except gexc.NotFound:
            raise ObjectNotFound(f"{self.url}/{name} does not exist") from None
        except gexc.PreconditionFailed:
            raise PreconditionFailed(f"{self.url}/{name}: generation precondition failed") from None
        except gexc.GoogleAPICallError as exc:
            raise StorageError(f"{self.url}/{name}: {exc}") from exc

    def _to_info(self, name: str, blob) -> ObjectInfo:  # noqa: ANN001 - google type
        return ObjectInfo(name, int(blob.size or 0), int(blob.generation), blob.updated)

    def stat(self, name: str) -> ObjectInfo:
        from google.cloud.storage.retry import DEFAULT_RETRY

        blob = self._blob(name)
        with self._translate(name):
            blob.reload(retry=DEFAULT_RETRY)
        return self._to_info(name, blob)

    def get_bytes(self, name: str) -> tuple[bytes, int]:
        from google.cloud.storage.retry import DEFAULT_RETRY

        blob = self._blob(name)
        with self._translate(name):
            data = blob.download_as_bytes(retry=DEFAULT_RETRY, checksum="crc32c")
        return data, int(blob.generation)

    def read_range(self, name: str, start: int, end: int, *, generation: int | None = None) -> bytes:
        from google.cloud.storage.retry import DEFAULT_RETRY

        if end <= start:
            return b""
        blob = self._blob(name, generation)
        with self._translate(name):
            # google-cloud-storage's `end` is inclusive.
            return blob.download_as_bytes(start=start, end=end - 1, retry=DEFAULT_RETRY, checksum=None)

    def open_reader(self, name: str, *, generation: int | None = None) -> BinaryIO:
        from google.cloud.storage.retry import DEFAULT_RETRY

        blob = self._blob(name, generation)
        with self._translate(name):
            blob.reload(retry=DEFAULT_RETRY)
            reader = blob.open("rb", chunk_size=STREAM_CHUNK_BYTES, retry=DEFAULT_RETRY)
        return (
            io.BufferedReader(reader, buffer_size=STREAM_CHUNK_BYTES)
            if not isinstance(reader, io.BufferedReader)
            else reader
        )

    def put_bytes(self, name: str, data: bytes, *, if_generation_match: int | None = None) -> ObjectInfo:
        from google.cloud.storage.retry import DEFAULT_RETRY

        blob = self._blob(name)
        try:
            with self._translate(name):
                blob.upload_from_string(data, if_generation_match=if_generation_match, retry=DEFAULT_RETRY)
        except PreconditionFailed:
            # A retried write whose first attempt landed also ends here; it is ours if the bytes are.
            with contextlib.suppress(ObjectNotFound):
                current, generation = self.get_bytes(name)
                if current == data and if_generation_match is not None and generation != if_generation_match:
                    return self.stat(name)
            raise
        return self._to_info(name, blob)

    def upload_file(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        if_generation_match: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> ObjectInfo:
        from google.cloud.storage.retry import DEFAULT_RETRY

        blob = self._blob(name)
        size = Path(path).stat().st_size
        # No chunk_size: the library's resumable upload with its default chunk (100 MiB), which
        # bounds memory per chunk and was the fastest setting measured against the emulator.
        with self._translate(name), open(path, "rb") as src:
            blob.upload_from_file(
                _ProgressReader(src, progress) if progress else src,
                size=size,
                if_generation_match=if_generation_match,
                retry=DEFAULT_RETRY,
            )
        return self.stat(name)

    def copy(self, src: str, dst: str) -> ObjectInfo:
        from google.cloud.storage.retry import DEFAULT_RETRY

        with self._translate(src):
            blob = self._bucket.copy_blob(
                self._blob(src),
                self._bucket,
                self.prefix + _check_name(dst),
                retry=DEFAULT_RETRY,
            )
        return self._to_info(dst, blob)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        from google.cloud.storage.retry import DEFAULT_RETRY

        with self._translate(prefix or "<root>"):
            for blob in self._client.list_blobs(self._bucket, prefix=self.prefix + prefix, retry=DEFAULT_RETRY):
                yield self._to_info(blob.name[len(self.prefix) :], blob)

    def delete(self, name: str) -> None:
        from google.cloud.storage.retry import DEFAULT_RETRY

        blob = self._blob(name)
        with self._translate(name):
            blob.delete(retry=DEFAULT_RETRY)


def open_store(url: str, *, credentials: object | None = None) -> ObjectStore:
    """The store for ``url``: ``file:///abs/dir``, a plain directory path, or ``gs://bucket/prefix``."""
    parsed = urlparse(url)
    if parsed.scheme == "gs":
        return GCSStore(url, credentials=credentials)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{url!r}: file URLs must be local (file:///absolute/path)")
        return FileStore(unquote(parsed.path))
    if parsed.scheme == "":
        return FileStore(url)
    raise StorageError(f"{url!r}: unsupported storage scheme {parsed.scheme!r}; use file:// or gs://")


@functools.lru_cache(maxsize=16)
def cached_store(url: str) -> ObjectStore:
    """One store per URL and process: for Spark workers, which get URLs (clients do not pickle)."""
    return open_store(url)


__all__ = [
    "STREAM_CHUNK_BYTES",
    "FileStore",
    "GCSStore",
    "ObjectInfo",
    "ObjectStore",
    "ProgressCallback",
    "cached_store",
    "open_store",
]
