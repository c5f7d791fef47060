"""Starts a real kvmemd on a free loopback port for the Python tests.

The binary: $KVMEMD if set, else build/bin/kvmemd of this repository.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kvmemd_path() -> str:
    path = os.environ.get("KVMEMD") or str(REPO / "build" / "bin" / "kvmemd")
    if not os.access(path, os.X_OK):
        pytest.fail(f"kvmemd not found at {path}: build it (make build) or set KVMEMD")
    return path


class Daemon:
    def __init__(self, extra: list[str] | None = None) -> None:
        import kvmem

        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.data_dir = tempfile.mkdtemp(prefix="kvmem-pytest-")
        self.proc = subprocess.Popen(
            [kvmemd_path(), "--listen", self.address, "--data-dir", self.data_dir,
             "--log-level", "warn", *(extra or [])])
        deadline = time.monotonic() + 20
        while True:
            try:
                kvmem.Client(self.address, connect_timeout_ms=500).close()
                return
            except kvmem.Error:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"kvmemd did not come up on {self.address}")
                time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        return self.proc.returncode


@pytest.fixture(scope="session")
def daemon():
    d = Daemon()
    yield d
    assert d.stop() == 0, "kvmemd did not shut down gracefully on SIGTERM"


@pytest.fixture()
def client(daemon):
    import kvmem

    with kvmem.Client(daemon.address) as c:
        yield c


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: needs torch/transformers and a real model (skipped when absent)")
