"""Object storage by URL: ``file:///dir`` (embedded default) and ``gs://bucket/prefix``.

Both stores give the same guarantees, checked by one conformance suite (tests/test_storage.py):

- a write is atomic: readers see the old object or the new one, never a part;
- every object has a ``generation`` that changes on each write, and writes accept
  ``if_generation_match`` (``0`` means "only if absent") for compare-and-swap;
- large objects stream in bounded memory (``upload_file``/``download_file``/``open_reader``);
- ``ObjectInfo.updated`` is the commit time as the store sees it (GCS: the server's clock; files:
  the inode's change time, which the kernel sets and no writer can forge), never a writer's stamp;
- an object too large for one writer is *assembled*: :meth:`ObjectStore.begin_assembly` names it,
  many workers write disjoint byte ranges (:meth:`~ObjectStore.write_part` returns the
  :class:`Part` it wrote), and :meth:`~ObjectStore.finish_assembly` commits exactly the parts it is
  given, atomically, once they tile the object (files: positioned writes into one pre-sized hidden
  file; GCS: one new object per written part, never overwritten, joined by ``compose``);
- ``list(match_glob=...)`` filters on the store's side (GCS ``matchGlob``; files: a directory walk
  that only descends where the pattern can match), so a round's listing does not grow with history
  (the GCS emulator used in tests ignores ``matchGlob``; the client applies the pattern again);
- every failure is a :class:`~fedbucket.protocol.errors.StorageError`; a failing endpoint is
  retried, with a warning line per retry, until ``retry_timeout`` seconds, then
  :class:`~fedbucket.protocol.errors.StorageUnavailable`.

Usage::

    store = open_store("gs://my-federation/prod")      # or "file:///srv/federation"
    info = store.put_bytes("rounds/current.json", data, if_generation_match=0)
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import fnmatch
import functools
import io
import logging
import mmap
import os
import re
import stat
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import unquote, urlparse

from fedbucket.protocol.errors import (
    ObjectNotFound,
    ObjectTooLarge,
    PreconditionFailed,
    StorageError,
    StorageUnavailable,
)

log = logging.getLogger(__name__)

#: Size of the pieces large objects are streamed in (also the GCS resumable-upload chunk).
STREAM_CHUNK_BYTES = 16 * 1024 * 1024
#: How long a storage call retries a failing endpoint before :class:`StorageUnavailable`.
DEFAULT_RETRY_TIMEOUT_SECONDS = 120.0

ProgressCallback = Callable[[int], None]
"""Called with the number of bytes just transferred."""

#: Resumable-upload chunk of :meth:`ObjectStore.upload_buffer`. The buffer is sent without copies,
#: so the chunk costs no memory; fewer chunks mean fewer round trips, and fake-gcs-server rehashes
#: everything received so far at every chunk. 1 GiB: a DistilBERT- or BERT-sized update in one request.
UPLOAD_BUFFER_CHUNK_BYTES = 1024 * 1024 * 1024
#: google-cloud-storage sends objects up to this size in one multipart request, larger ones resumably.
_MULTIPART_MAX_BYTES = 8 * 1024 * 1024


class Hasher(Protocol):
    """What :meth:`ObjectStore.download_file` feeds the downloaded bytes to (``hashlib`` objects)."""

    def update(self, data: bytes, /) -> None: ...


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    generation: int
    updated: datetime


@dataclass(frozen=True)
class Assembly:
    """An object being assembled from byte ranges written independently (e.g. by Spark executors).

    Small and picklable: the driver begins it, workers write parts through their own store opened
    from the same URL, the driver finishes it. Nothing is visible under ``name`` until then.
    ``identity`` pins the file store's scratch file (device, inode) so a swapped file is refused.
    """

    name: str
    size: int
    token: str
    identity: tuple[int, int] | None = None


@dataclass(frozen=True)
class Part:
    """One byte range written into an assembly: what :meth:`ObjectStore.finish_assembly` joins.
    ``key`` names where the store put it (GCS: the part object, unique per write; files: None)."""

    offset: int
    length: int
    key: str | None = None


def check_tiling(assembly: Assembly, parts: Sequence[Part]) -> list[Part]:
    """``parts`` sorted by offset; :class:`StorageError` unless they cover ``[0, assembly.size)``
    exactly once (no gap, no overlap, no empty part)."""
    ordered = sorted(parts, key=lambda part: part.offset)
    at = 0
    for part in ordered:
        if part.offset != at or part.length <= 0:
            raise StorageError(f"{assembly.name}: parts do not tile the object (expected a part at byte {at})")
        at += part.length
    if at != assembly.size:
        raise StorageError(f"{assembly.name}: parts cover {at} of {assembly.size} bytes")
    return ordered


def _check_part(assembly: Assembly, offset: int, length: int) -> None:
    if offset < 0 or offset + length > assembly.size:
        raise StorageError(f"{assembly.name}: part [{offset}, {offset + length}) outside its {assembly.size} bytes")


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
    def get_bytes(self, name: str, *, max_bytes: int | None = None) -> tuple[bytes, int]:
        """Whole object and its generation. For small objects (documents): with ``max_bytes``,
        :class:`ObjectTooLarge` is raised after reading at most ``max_bytes + 1`` bytes."""

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
    def upload_buffer(
        self,
        name: str,
        data: bytes | bytearray | memoryview,
        *,
        if_generation_match: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> ObjectInfo:
        """Write a large in-memory payload to ``name`` atomically, without copying it; ``progress``
        moves as the bytes are sent (never backwards, never past ``len(data)``, also on retries)."""

    @abstractmethod
    def copy(self, src: str, dst: str) -> ObjectInfo:
        """Copy object ``src`` to ``dst`` inside this store (server-side where possible).

        Unconditional: fake-gcs-server ignores preconditions on copies, so no caller may rely on one.
        """

    @abstractmethod
    def list(self, prefix: str = "", *, match_glob: str | None = None) -> Iterator[ObjectInfo]:
        """Objects whose names start with ``prefix`` (and, if given, match ``match_glob``, where
        ``*`` matches within one path segment), in name order. The store filters on its side, so
        the cost follows what matches, not everything under the prefix."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Delete ``name``; :class:`ObjectNotFound` if absent."""

    @abstractmethod
    def begin_assembly(self, name: str, size: int) -> Assembly:
        """Start assembling a ``size``-byte object ``name`` from parts (nothing visible yet)."""

    @abstractmethod
    def write_part(self, assembly: Assembly, offset: int, data: bytes | memoryview) -> Part:
        """Write ``data`` at byte ``offset`` of the assembly and return the :class:`Part` to finish
        it with. Safe from many processes at once; a retried task may write the same range again
        (the finish uses the parts it is given, so a late duplicate changes nothing)."""

    @abstractmethod
    def finish_assembly(
        self, assembly: Assembly, parts: Sequence[Part], *, if_generation_match: int | None = None
    ) -> ObjectInfo:
        """Commit the assembly atomically as ``assembly.name`` from exactly ``parts``, which must
        tile the object (:func:`check_tiling`). Cleans up its scratch."""

    @abstractmethod
    def abort_assembly(self, assembly: Assembly) -> None:
        """Drop an assembly that will not be finished (best effort; never raises)."""

    def download_file(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        progress: ProgressCallback | None = None,
        hasher: Hasher | None = None,
    ) -> ObjectInfo:
        """Stream one generation of ``name`` to a local file (written atomically). ``hasher`` is
        updated with every byte written, in order, as they arrive (no second pass to hash them)."""
        info = self.stat(name)
        target = Path(path)
        tmp = target.with_name(f".{target.name}.part-{uuid.uuid4().hex}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as dst:
                sink = _DownloadSink(dst, progress, hasher)
                self._download_to(name, info.generation, sink)
                sink.flush()
            tmp.replace(target)
        except OSError as exc:  # the local side: a full disk, a read-only folder
            raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return info

    def _download_to(self, name: str, generation: int, sink: _DownloadSink) -> None:
        """Write one generation of ``name`` into ``sink``, in order (stores may do it in one request)."""
        with self.open_reader(name, generation=generation) as src:
            while chunk := src.read(STREAM_CHUNK_BYTES):
                sink.write(chunk)


class _DownloadSink:
    """A download's destination: the file, the hasher and the progress callback in one ``write``.

    Progress is reported per MiB at most, so a download in 8 KiB pieces (GCS) does not call a
    progress bar thirty thousand times."""

    _REPORT_EVERY = 1024 * 1024

    def __init__(self, file: BinaryIO, progress: ProgressCallback | None, hasher: Hasher | None) -> None:
        self._file, self._progress, self._hasher = file, progress, hasher
        self._unreported = 0

    def write(self, data: bytes) -> int:
        n = self._file.write(data)
        if self._hasher is not None:
            self._hasher.update(data)
        if self._progress is not None:
            self._unreported += len(data)
            if self._unreported >= self._REPORT_EVERY:
                self._progress(self._unreported)
                self._unreported = 0
        return n

    def flush(self) -> None:
        if self._progress is not None and self._unreported:
            self._progress(self._unreported)
            self._unreported = 0
        self._file.flush()


# --------------------------------------------------------------------------------------------
# file://


class FileStore(ObjectStore):
    """Objects as regular files under a directory.

    Atomic writes go through a temporary file in the same directory and ``os.replace``. The
    generation is the file's ``st_mtime_ns``, forced to increase on every write while holding an
    exclusive ``flock`` on ``<root>/.fedbucket.lock``, which makes compare-and-swap safe between
    processes on one machine (not across NFS clients: use ``gs://`` for that). The commit time is
    the inode's ``st_ctime``: set by the kernel on the write, not by the writer.

    Anyone who can write under the root is untrusted, so reads open path components one by one
    with ``O_NOFOLLOW`` (a symbolic link anywhere below the root is refused, never followed), open
    only regular files (a FIFO or a device is refused without blocking) and are bounded by the
    caller's size limit, not by what ``stat`` said.

    The root must exist (``create=True``, used by ``fedbucket init`` and tests, makes it): a
    mistyped URL is an error, not an empty federation.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(root).absolute()
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create {self.root.as_uri()}: {exc.strerror or exc}") from None
        if not self.root.is_dir():
            raise StorageError(
                f"{self.root.as_uri()} does not exist or is not a directory: check the URL "
                "(`fedbucket init` creates a federation)"
            )
        self.root = self.root.resolve()
        self.url = self.root.as_uri()
        self._lock_path = self.root / ".fedbucket.lock"

    def _path(self, name: str) -> Path:
        return self.root / _check_name(name)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._lock_path, "a+b") as lock:  # OSError here is translated by the callers
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- safe access: no symlinks, regular files only ----------------------------------------

    @contextlib.contextmanager
    def _parent_fd(self, name: str) -> Iterator[tuple[int, str]]:
        """An fd of ``name``'s directory, reached without following any link; and the last part."""
        parts = _check_name(name).split("/")
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise StorageError(f"{self.url}: the federation root is gone or unreadable ({exc.strerror})") from None
        try:
            for part in parts[:-1]:
                try:
                    child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except OSError as exc:
                    raise self._error(name, exc) from None
                os.close(fd)
                fd = child
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def _error(self, name: str, exc: OSError) -> StorageError:
        if exc.errno == errno.ENOENT:
            return ObjectNotFound(f"{self.url}/{name} does not exist")
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            return StorageError(f"{self.url}/{name}: a path component is a symbolic link or not a directory")
        return StorageError(f"{self.url}/{name}: {exc.strerror or exc}")

    def _open_regular(self, name: str) -> BinaryIO:
        with self._parent_fd(name) as (dir_fd, last):
            try:
                fd = os.open(last, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError as exc:
                raise self._error(name, exc) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StorageError(f"{self.url}/{name} is not a regular file; refused")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def _info_of(self, name: str, st: os.stat_result) -> ObjectInfo:
        return ObjectInfo(name, st.st_size, st.st_mtime_ns, datetime.fromtimestamp(st.st_ctime_ns / 1e9, UTC))

    def stat(self, name: str) -> ObjectInfo:
        with self._parent_fd(name) as (dir_fd, last):
            try:
                st = os.stat(last, dir_fd=dir_fd, follow_symlinks=False)
            except OSError as exc:
                raise self._error(name, exc) from None
        if not stat.S_ISREG(st.st_mode):
            raise StorageError(f"{self.url}/{name} is not a regular file; refused")
        return self._info_of(name, st)

    def get_bytes(self, name: str, *, max_bytes: int | None = None) -> tuple[bytes, int]:
        with self._open_regular(name) as f:
            generation = os.fstat(f.fileno()).st_mtime_ns
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise ObjectTooLarge(f"{self.url}/{name} is larger than the {max_bytes} bytes allowed")
        return data, generation

    def read_range(self, name: str, start: int, end: int, *, generation: int | None = None) -> bytes:
        with self.open_reader(name, generation=generation) as f:
            f.seek(start)
            return f.read(max(0, end - start))

    def open_reader(self, name: str, *, generation: int | None = None) -> BinaryIO:
        f = self._open_regular(name)
        if generation is not None and os.fstat(f.fileno()).st_mtime_ns != generation:
            f.close()
            raise PreconditionFailed(f"{self.url}/{name} changed while being read (generation moved)")
        return f

    # -- writes --------------------------------------------------------------------------------

    def _commit(self, name: str, tmp: Path, if_generation_match: int | None) -> ObjectInfo:
        path = self._path(name)
        with self._locked():
            try:
                current: int | None = path.lstat().st_mtime_ns
            except FileNotFoundError:
                current = None
            if if_generation_match is not None and (current or 0) != if_generation_match:
                raise PreconditionFailed(
                    f"{self.url}/{name}: expected generation {if_generation_match}, found {current or 0}"
                )
            generation = max(time.time_ns(), (current or 0) + 1)
            os.utime(tmp, ns=(generation, generation))
            tmp.replace(path)
            return self.stat(name)

    def _tmp_for(self, name: str) -> Path:
        path = self._path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error(name, exc) from None
        if os.path.realpath(path.parent) != str(path.parent):
            raise StorageError(f"{self.url}/{name}: a path component is a symbolic link; refused")
        return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")

    @contextlib.contextmanager
    def _writing(self, name: str) -> Iterator[Path]:
        tmp = self._tmp_for(name)
        try:
            yield tmp
        except OSError as exc:  # a full disk, a permission problem: part of the error tree
            raise StorageError(f"{self.url}/{name}: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, name: str, data: bytes, *, if_generation_match: int | None = None) -> ObjectInfo:
        with self._writing(name) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return self._commit(name, tmp, if_generation_match)

    def upload_file(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        if_generation_match: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> ObjectInfo:
        with self._writing(name) as tmp:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(STREAM_CHUNK_BYTES):
                    dst.write(chunk)
                    if progress:
                        progress(len(chunk))
                dst.flush()
                os.fsync(dst.fileno())
            return self._commit(name, tmp, if_generation_match)

    def upload_buffer(
        self,
        name: str,
        data: bytes | bytearray | memoryview,
        *,
        if_generation_match: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> ObjectInfo:
        view = memoryview(data).cast("B")
        with self._writing(name) as tmp:
            with open(tmp, "wb") as dst:
                for start in range(0, len(view), STREAM_CHUNK_BYTES):  # pieces: a progress that moves
                    piece = view[start : start + STREAM_CHUNK_BYTES]
                    dst.write(piece)
                    if progress:
                        progress(len(piece))
                dst.flush()
                os.fsync(dst.fileno())
            return self._commit(name, tmp, if_generation_match)

    def copy(self, src: str, dst: str) -> ObjectInfo:
        with self._writing(dst) as tmp:
            with self._open_regular(src) as source, open(tmp, "wb") as target:
                while chunk := source.read(STREAM_CHUNK_BYTES):
                    target.write(chunk)
            return self._commit(dst, tmp, None)

    # -- listing -------------------------------------------------------------------------------

    def _walk(self, directory: str, segments: list[str]) -> Iterator[str]:
        """Names under ``directory`` matching the glob ``segments``, descending only where they can
        match; literal segments are looked up, never listed. Links and dot-names are skipped."""
        base = self.root / directory if directory else self.root
        head, rest = segments[0], segments[1:]
        if not any(c in head for c in "*?["):
            candidates = [head]
        else:
            try:
                candidates = sorted(e.name for e in os.scandir(base))
            except OSError:
                return
            candidates = [c for c in candidates if fnmatch.fnmatchcase(c, head)]
        for entry in candidates:
            if entry.startswith("."):
                continue
            try:
                st = (base / entry).lstat()
            except OSError:
                continue
            name = f"{directory}/{entry}" if directory else entry
            if rest and stat.S_ISDIR(st.st_mode):
                yield from self._walk(name, rest)
            elif not rest and stat.S_ISREG(st.st_mode):
                yield name

    def list(self, prefix: str = "", *, match_glob: str | None = None) -> Iterator[ObjectInfo]:
        if match_glob is not None:
            names = sorted(n for n in self._walk("", match_glob.split("/")) if n.startswith(prefix))
        else:
            base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
            if not base.is_dir() or base.is_symlink():
                return
            names = []
            for dirpath, dirnames, filenames in os.walk(base):  # os.walk does not follow links
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel_dir = Path(dirpath).relative_to(self.root).as_posix()
                for fn in filenames:
                    name = fn if rel_dir == "." else f"{rel_dir}/{fn}"
                    if not fn.startswith(".") and name.startswith(prefix):
                        names.append(name)
            names.sort()
        for name in names:
            with contextlib.suppress(StorageError):  # gone, or not a regular file: not an object
                yield self.stat(name)

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            with self._locked():
                self.stat(name)
                path.unlink()
        except OSError as exc:
            raise self._error(name, exc) from None

    # -- assembly: positioned writes into one pre-sized hidden file -----------------------------

    def _assembly_file(self, assembly: Assembly, flags: int) -> int:
        """The scratch file, opened without following a link or blocking on a FIFO, and refused
        unless it is the very regular file ``begin_assembly`` made (same inode, one link, its size)."""
        with self._parent_fd(assembly.name) as (dir_fd, last):
            try:
                fd = os.open(
                    f".{last}.assembly-{assembly.token}",
                    flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                    dir_fd=dir_fd,
                )
            except OSError as exc:
                raise self._error(assembly.name, exc) from None
        if assembly.identity is not None:
            st = os.fstat(fd)
            if (
                not stat.S_ISREG(st.st_mode)
                or st.st_nlink != 1
                or (st.st_dev, st.st_ino) != assembly.identity
                or st.st_size != assembly.size
            ):
                os.close(fd)
                raise StorageError(f"{self.url}/{assembly.name}: its assembly file was replaced; refused")
        os.set_blocking(fd, True)
        return fd

    def begin_assembly(self, name: str, size: int) -> Assembly:
        self._tmp_for(name)  # creates the folder, refuses links
        assembly = Assembly(name, size, uuid.uuid4().hex)
        fd = self._assembly_file(assembly, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            os.ftruncate(fd, size)  # sparse: the parts fill it
            st = os.fstat(fd)
        except OSError as exc:
            raise StorageError(f"{self.url}/{name}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        return dataclasses.replace(assembly, identity=(st.st_dev, st.st_ino))

    def write_part(self, assembly: Assembly, offset: int, data: bytes | memoryview) -> Part:
        view = memoryview(data).cast("B")
        _check_part(assembly, offset, len(view))
        fd = self._assembly_file(assembly, os.O_WRONLY)
        try:
            written = 0
            while written < len(view):  # pwrite may write less than asked
                written += os.pwrite(fd, view[written:], offset + written)
        except OSError as exc:
            raise StorageError(f"{self.url}/{assembly.name}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        return Part(offset, len(view))

    def finish_assembly(
        self, assembly: Assembly, parts: Sequence[Part], *, if_generation_match: int | None = None
    ) -> ObjectInfo:
        check_tiling(assembly, parts)
        path = self._path(assembly.name)
        tmp = path.with_name(f".{path.name}.assembly-{assembly.token}")
        try:
            fd = self._assembly_file(assembly, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return self._commit(assembly.name, tmp, if_generation_match)
        except OSError as exc:
            raise StorageError(f"{self.url}/{assembly.name}: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def abort_assembly(self, assembly: Assembly) -> None:
        with contextlib.suppress(OSError, StorageError):
            path = self._path(assembly.name)
            path.with_name(f".{path.name}.assembly-{assembly.token}").unlink(missing_ok=True)


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


class _BufferStream:
    """A memory buffer as the stream of a resumable upload, without copies.

    ``read`` hands each chunk over as a :class:`_ChunkBody` over the buffer, which the HTTP layer
    (requests, then urllib3) sends block by block as a file-like body: no chunk-sized copy is ever
    made (only 1 MiB blocks, as they are sent), and every block sent moves the progress. The
    library's own checksum needs the chunk as one buffer, so uploads from here pass
    ``checksum=None``; the crc32c is computed here, while sending, and compared with the stored
    object's afterwards.
    """

    def __init__(self, view: memoryview, progress: ProgressCallback | None) -> None:
        import google_crc32c

        self._view, self._progress = view, progress
        self._position = 0
        self._sent = 0  # high-water mark: a retried chunk does not move the progress twice
        self._crc_upto = 0  # the crc32c covers [0, _crc_upto), each byte once even if resent
        self.crc32c = google_crc32c.Checksum()

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        self._position = min(max(0, base + offset), len(self._view))
        return self._position

    def read(self, size: int = -1) -> _ChunkBody:
        end = len(self._view) if size < 0 else min(len(self._view), self._position + size)
        body = _ChunkBody(self, self._position, end)
        self._position = end
        return body

    def sent(self, start: int, block: bytes) -> None:
        end = start + len(block)
        if start <= self._crc_upto < end:
            self.crc32c.update(block[self._crc_upto - start :])
            self._crc_upto = end
        if end > self._sent:
            if self._progress:
                self._progress(end - self._sent)
            self._sent = end


class _ChunkBody:
    """One resumable-upload chunk ``[start, end)`` of a :class:`_BufferStream`, as a request body.

    ``len`` gives requests the Content-Length; urllib3 then calls ``read`` until it is empty.
    Blocks are at least 1 MiB whatever urllib3 asks for (16 KiB): it sends what it gets, and
    bigger blocks mean fewer system calls.
    """

    _BLOCK = 1024 * 1024

    def __init__(self, stream: _BufferStream, start: int, end: int) -> None:
        self._stream, self._start, self._end = stream, start, end
        self._position = start

    def __len__(self) -> int:
        return self._end - self._start

    def read(self, size: int = -1) -> bytes:
        end = self._end if size < 0 else min(self._end, self._position + max(size, self._BLOCK))
        # bytes: google-crc32c's C code refuses memoryviews (it takes immutable buffers only)
        block = bytes(self._stream._view[self._position : end])
        self._stream.sent(self._position, block)
        self._position = end
        return block


class _TranslatingReader(io.RawIOBase):
    """A reader whose failures mid-stream are :class:`StorageError`s like every other call's."""

    def __init__(self, raw: BinaryIO, translate: Callable[[], contextlib.AbstractContextManager[None]]) -> None:
        super().__init__()
        self._raw, self._translate = raw, translate

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        with self._translate():
            data = self._raw.read(len(buffer))
        n = len(data)
        memoryview(buffer)[:n] = data
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._raw.close()
        super().close()


class GCSStore(ObjectStore):
    """Objects in a Google Cloud Storage bucket, under an optional prefix.

    Uses google-cloud-storage's retry predicate (429/5xx/connection errors only) with a bounded
    ``retry_timeout`` and a warning line per retry, so an unreachable endpoint is reported while it
    is retried and ends in :class:`StorageUnavailable`, not in silence or a traceback. Conditional
    writes are retried too, which makes one case need care: a write that succeeded but whose
    response was lost comes back as 412 on the retry. ``put_bytes`` recognises that case by
    comparing the stored bytes with its own.

    Credentials: ``credentials`` if given, else Application Default Credentials; with
    ``STORAGE_EMULATOR_HOST`` set (tests, local demo) it talks anonymously to that emulator.
    """

    def __init__(
        self,
        url: str,
        *,
        credentials: object | None = None,
        project: str | None = None,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT_SECONDS,
    ) -> None:
        from google.api_core.retry import Retry
        from google.cloud import storage
        from google.cloud.storage.retry import DEFAULT_RETRY

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
        self.retry_timeout = retry_timeout
        # The library's own predicate (what is worth retrying), our bound and a line per retry.
        self._retry = Retry(
            predicate=DEFAULT_RETRY._predicate,
            initial=1.0,
            maximum=min(16.0, retry_timeout),
            multiplier=2.0,
            timeout=retry_timeout,
            on_error=self._log_retry,
        )
        # (connect, read) seconds per HTTP attempt: a black-holed endpoint must not eat the budget.
        self._timeout = (min(10.0, retry_timeout), 60.0)

    def _log_retry(self, exc: Exception) -> None:
        log.warning("%s: %s; retrying (limit %.0f s)", self.url, _one_line(exc), self.retry_timeout)

    def _blob(self, name: str, generation: int | None = None):  # noqa: ANN202 - google type
        return self._bucket.blob(self.prefix + _check_name(name), generation=generation)

    @contextlib.contextmanager
    def _translate(self, name: str) -> Iterator[None]:
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as auth_exc

        try:
            yield
        except gexc.NotFound:
            raise ObjectNotFound(f"{self.url}/{name} does not exist") from None
        except gexc.PreconditionFailed:
            raise PreconditionFailed(f"{self.url}/{name}: generation precondition failed") from None
        except gexc.RetryError as exc:  # not a GoogleAPICallError: the retry budget ran out
            raise StorageUnavailable(
                f"{self.url} unreachable: gave up retrying (limit {self.retry_timeout:.0f} s): "
                f"{_one_line(exc.cause) if exc.cause else exc}"
            ) from None
        except gexc.GoogleAPICallError as exc:
            raise StorageError(f"{self.url}/{name}: {_one_line(exc)}") from None
        except (auth_exc.GoogleAuthError, OSError, ValueError) as exc:
            # requests' ConnectionError is an OSError; google-resumable-media raises ValueErrors
            raise StorageError(f"{self.url}/{name}: {_one_line(exc)}") from None
        except Exception as exc:
            if type(exc).__module__.startswith(("google.", "requests", "urllib3")):
                raise StorageError(f"{self.url}/{name}: {_one_line(exc)}") from None
            raise

    def _to_info(self, name: str, blob) -> ObjectInfo:  # noqa: ANN001 - google type
        return ObjectInfo(name, int(blob.size or 0), int(blob.generation), blob.updated)

    def stat(self, name: str) -> ObjectInfo:
        blob = self._blob(name)
        with self._translate(name):
            blob.reload(retry=self._retry, timeout=self._timeout)
        return self._to_info(name, blob)

    def get_bytes(self, name: str, *, max_bytes: int | None = None) -> tuple[bytes, int]:
        blob = self._blob(name)
        with self._translate(name):
            if max_bytes is None:
                data = blob.download_as_bytes(retry=self._retry, timeout=self._timeout, checksum="crc32c")
            else:  # a range read: never more than the bound, whatever the object's size
                data = blob.download_as_bytes(
                    start=0, end=max_bytes, retry=self._retry, timeout=self._timeout, checksum=None
                )
        if max_bytes is not None and len(data) > max_bytes:
            raise ObjectTooLarge(f"{self.url}/{name} is larger than the {max_bytes} bytes allowed")
        return data, int(blob.generation)

    def read_range(self, name: str, start: int, end: int, *, generation: int | None = None) -> bytes:
        if end <= start:
            return b""
        blob = self._blob(name, generation)
        with self._translate(name):
            # google-cloud-storage's `end` is inclusive.
            return blob.download_as_bytes(
                start=start, end=end - 1, retry=self._retry, timeout=self._timeout, checksum=None
            )

    def open_reader(self, name: str, *, generation: int | None = None) -> BinaryIO:
        blob = self._blob(name, generation)
        with self._translate(name):
            blob.reload(retry=self._retry, timeout=self._timeout)
            reader = blob.open("rb", chunk_size=STREAM_CHUNK_BYTES, retry=self._retry)
        return io.BufferedReader(
            _TranslatingReader(reader, functools.partial(self._translate, name)), buffer_size=STREAM_CHUNK_BYTES
        )

    def put_bytes(self, name: str, data: bytes, *, if_generation_match: int | None = None) -> ObjectInfo:
        blob = self._blob(name)
        try:
            with self._translate(name):
                blob.upload_from_string(
                    data, if_generation_match=if_generation_match, retry=self._retry, timeout=self._timeout
                )
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
        blob = self._blob(name)
        try:
            size = Path(path).stat().st_size
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
        if size > _MULTIPART_MAX_BYTES:
            # Memory-mapped and sent like a buffer: no chunk-sized copies on the heap, one request
            # per GiB, and a progress that moves as the bytes go (not once per 100 MiB chunk).
            with open(path, "rb") as src:
                mapped = mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                return self._upload_view(name, memoryview(mapped), if_generation_match, progress)
            finally:
                with contextlib.suppress(BufferError):  # a traceback may still hold a view: GC closes it
                    mapped.close()
        with self._translate(name), open(path, "rb") as src:
            blob.upload_from_file(
                _ProgressReader(src, progress) if progress else src,
                size=size,
                if_generation_match=if_generation_match,
                retry=self._retry,
                timeout=self._timeout,
            )
        return self.stat(name)

    def upload_buffer(
        self,
        name: str,
        data: bytes | bytearray | memoryview,
        *,
        if_generation_match: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> ObjectInfo:
        view = memoryview(data).cast("B")
        if len(view) <= _MULTIPART_MAX_BYTES:  # the library sends these in one multipart request (a copy)
            with self._translate(name):
                self._blob(name).upload_from_string(
                    bytes(view), if_generation_match=if_generation_match, retry=self._retry, timeout=self._timeout
                )
            if progress:
                progress(len(view))
            return self.stat(name)
        return self._upload_view(name, view, if_generation_match, progress)

    def _upload_view(
        self, name: str, view: memoryview, if_generation_match: int | None, progress: ProgressCallback | None
    ) -> ObjectInfo:
        """A resumable upload of ``view`` without copies (see :class:`_BufferStream`)."""
        import base64

        blob = self._blob(name)
        # A multiple of 256 KiB, as GCS requires of every chunk but the last.
        blob.chunk_size = UPLOAD_BUFFER_CHUNK_BYTES
        stream = _BufferStream(view, progress)
        with self._translate(name):
            blob.upload_from_file(
                stream,  # type: ignore[arg-type] - a stream whose reads are request bodies (see the class)
                size=len(view),
                if_generation_match=if_generation_match,
                retry=self._retry,
                timeout=self._timeout,
                checksum=None,
            )
        sent = base64.b64encode(stream.crc32c.digest()).decode()
        if blob.crc32c != sent:
            # A create-only, content-addressed name must not keep corrupted bytes (best effort).
            with contextlib.suppress(StorageError), self._translate(name):
                blob.delete(if_generation_match=blob.generation, retry=self._retry, timeout=self._timeout)
            raise StorageError(f"{self.url}/{name}: stored crc32c {blob.crc32c} != sent {sent}; upload again")
        return self._to_info(name, blob)

    def _download_to(self, name: str, generation: int, sink: _DownloadSink) -> None:
        # One streaming GET of the pinned generation (a retry resumes where it stopped, so the sink
        # sees every byte once, in order), with the library's crc32c check: the ranged reads of
        # open_reader cost a request, a copy and no checksum per 16 MiB.
        blob = self._blob(name, generation)
        with self._translate(name):
            blob.download_to_file(sink, retry=self._retry, timeout=self._timeout)

    def copy(self, src: str, dst: str) -> ObjectInfo:
        with self._translate(src):
            blob = self._bucket.copy_blob(
                self._blob(src), self._bucket, self.prefix + _check_name(dst), retry=self._retry, timeout=self._timeout
            )
        return self._to_info(dst, blob)

    def list(self, prefix: str = "", *, match_glob: str | None = None) -> Iterator[ObjectInfo]:
        with self._translate(prefix or match_glob or "<root>"):
            blobs = self._client.list_blobs(
                self._bucket,
                prefix=self.prefix + prefix,
                match_glob=self.prefix + match_glob if match_glob is not None else None,
                retry=self._retry,
                timeout=self._timeout,
            )
            for blob in blobs:
                name = blob.name[len(self.prefix) :]
                # GCS filters on its side; fake-gcs-server <= 1.54 ignores matchGlob (fixed upstream
                # after it), so the pattern is applied again here: a no-op against GCS.
                if match_glob is None or glob_matches(match_glob, name):
                    yield self._to_info(name, blob)

    def delete(self, name: str) -> None:
        blob = self._blob(name)
        with self._translate(name):
            blob.delete(retry=self._retry, timeout=self._timeout)

    # -- assembly: one object per part, joined by compose (at most 32 sources per call) ----------

    _COMPOSE_FAN_IN = 32

    def _parts_prefix(self, assembly: Assembly) -> str:
        return f"{assembly.name}.assembly-{assembly.token}/"

    def _part_name(self, assembly: Assembly, label: str) -> str:
        # unique per write; ".part": a bucket lifecycle rule on that suffix removes what a killed job left
        return f"{self._parts_prefix(assembly)}{label}-{uuid.uuid4().hex}.part"

    def begin_assembly(self, name: str, size: int) -> Assembly:
        return Assembly(_check_name(name), size, uuid.uuid4().hex)

    def write_part(self, assembly: Assembly, offset: int, data: bytes | memoryview) -> Part:
        data = bytes(data)
        _check_part(assembly, offset, len(data))
        # A new object per write, created only if absent: a retried or late duplicate never
        # replaces a part the finish may already use (and a bucket retention policy forbids replacing).
        name = self._part_name(assembly, f"{offset:020d}")
        self.put_bytes(name, data, if_generation_match=0)
        return Part(offset, len(data), name)

    def finish_assembly(
        self, assembly: Assembly, parts: Sequence[Part], *, if_generation_match: int | None = None
    ) -> ObjectInfo:
        sources = []
        for part in check_tiling(assembly, parts):
            if part.key is None or not part.key.startswith(self._parts_prefix(assembly)):
                raise StorageError(f"{self.url}/{assembly.name}: part at byte {part.offset} is not of this assembly")
            sources.append(part.key)
        try:
            level = 0
            while len(sources) > self._COMPOSE_FAN_IN:  # a tree of composes: 32 x 32 x ... parts
                groups = [sources[i : i + self._COMPOSE_FAN_IN] for i in range(0, len(sources), self._COMPOSE_FAN_IN)]
                sources = [self._part_name(assembly, f"compose-{level}-{i:06d}") for i in range(len(groups))]
                for target, group in zip(sources, groups, strict=True):
                    self._compose(target, group, None)
                level += 1
            self._compose(assembly.name, sources, if_generation_match)
            info = self.stat(assembly.name)
        finally:  # every part and intermediate, and any late duplicate a retried task wrote
            self.abort_assembly(assembly)
        if info.size != assembly.size:
            raise StorageError(f"{self.url}/{assembly.name}: assembled {info.size} bytes, expected {assembly.size}")
        return info

    def _compose(self, target: str, sources: Sequence[str], if_generation_match: int | None) -> None:
        blob = self._blob(target)
        blob.content_type = "application/octet-stream"
        with self._translate(target):
            blob.compose(
                [self._blob(s) for s in sources],
                if_generation_match=if_generation_match,
                retry=self._retry,
                timeout=self._timeout,
            )

    def abort_assembly(self, assembly: Assembly) -> None:
        with contextlib.suppress(StorageError):
            for info in list(self.list(self._parts_prefix(assembly))):
                with contextlib.suppress(StorageError):
                    self.delete(info.name)


def glob_matches(pattern: str, name: str) -> bool:
    """Whether ``name`` matches ``pattern`` segment by segment (``*`` never crosses a ``/``)."""
    parts, names = pattern.split("/"), name.split("/")
    return len(parts) == len(names) and all(fnmatch.fnmatchcase(n, p) for p, n in zip(parts, names, strict=True))


def _one_line(exc: BaseException) -> str:
    """An exception as one short line: the OS error inside a connection failure ("Connection
    refused"), else its text on one line, cut at 200 characters (google errors carry bodies)."""
    text = " ".join(str(exc).split())
    connection = "Max retries exceeded" in text or "Connection" in type(exc).__name__
    if connection and (errno_text := re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)):
        return errno_text.group(1).strip()
    return (text[:200] + "…") if len(text) > 200 else text or type(exc).__name__


def open_store(
    url: str,
    *,
    credentials: str | os.PathLike[str] | object | None = None,
    create: bool = False,
    retry_timeout: float | None = None,
) -> ObjectStore:
    """The store for ``url``: ``file:///abs/dir``, a plain directory path, or ``gs://bucket/prefix``.

    ``credentials`` (gs:// only): a service-account key file or a ``google.auth`` credentials object;
    ``None`` uses Application Default Credentials. ``create`` makes a missing ``file://`` root
    (only ``fedbucket init`` and tests do); ``retry_timeout`` bounds how long a failing ``gs://``
    endpoint is retried.
    """
    parsed = urlparse(url)
    if parsed.scheme == "gs":
        if isinstance(credentials, str | os.PathLike):
            credentials = _service_account(credentials)
        return GCSStore(url, credentials=credentials, retry_timeout=retry_timeout or DEFAULT_RETRY_TIMEOUT_SECONDS)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{url!r}: file URLs must be local (file:///absolute/path)")
        return FileStore(unquote(parsed.path), create=create)
    if parsed.scheme == "":
        return FileStore(url, create=create)
    raise StorageError(f"{url!r}: unsupported storage scheme {parsed.scheme!r}; use file:// or gs://")


def _service_account(path: str | os.PathLike[str]) -> object:
    from google.oauth2 import service_account

    try:
        return service_account.Credentials.from_service_account_file(os.fspath(path))
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot use credentials file {os.fspath(path)!r}: {exc}") from None


@functools.lru_cache(maxsize=16)
def cached_store(url: str) -> ObjectStore:
    """One store per URL and process: for Spark workers, which get URLs (clients do not pickle)."""
    return open_store(url)


__all__ = [
    "DEFAULT_RETRY_TIMEOUT_SECONDS",
    "STREAM_CHUNK_BYTES",
    "FileStore",
    "GCSStore",
    "ObjectInfo",
    "ObjectStore",
    "ProgressCallback",
    "cached_store",
    "open_store",
]
