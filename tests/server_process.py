"""A real `python -m service` process on a free TCP port, for tests about what a client can do to a server:
time to answer and the server process's own memory (VmRSS / VmHWM from /proc), which an in-process TestClient
cannot show."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from api_support import require_default_models

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 90


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    port: int
    log: Path

    def memory_mb(self) -> dict[str, float]:
        """VmRSS (now) and VmHWM (peak since start) of the server process, in MiB."""
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
        return fields

    def reset_peak(self) -> None:
        """Set the process's peak (VmHWM) to its current RSS, so that the next peak is a request's own: the peak
        of start-up (loading models) can lie above the RSS at rest and hide a request's growth under it."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(models_dir: Path, tmp_path: Path, **env: str) -> Iterator[Server]:
    require_default_models(models_dir)
    port = _free_port()
    log = tmp_path / f"server-{port}.log"
    environment = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "FACE_MODELS_DIR": str(models_dir),
        "FACE_GALLERY_PATH": str(tmp_path / f"gallery-{port}.db"),
        "FACE_API_KEYS": "",
        "FACE_LOG_LEVEL": "info",
        "PYTHONPATH": str(ROOT),
        **env,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=ROOT, env=environment, stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Server(process, url, port, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
