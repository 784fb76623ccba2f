"""A real `python -m service` process on a free TCP port, for tests about what a client can do to a server:
time to answer and the server process's own memory (VmRSS / VmHWM from /proc), which an in-process TestClient
cannot show."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_service(models_dir: Path, log: Path, **env: str) -> Server:
    """Start `python -m service` on a free port (no API keys; `env` adds or overrides settings), output to `log`.
    Returns at once: see wait_ready."""
    port = free_port()
    environment = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "FACE_MODELS_DIR": str(models_dir),
        "FACE_API_KEYS": "",
        "FACE_LOG_LEVEL": "warning",
        "PYTHONPATH": str(ROOT),
        **env,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=ROOT, env=environment, stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    return Server(process, f"http://127.0.0.1:{port}", port, log)


def wait_ready(server: Server, name: str = "server") -> Server:
    """Poll /ready until 200; fail the test (with the log's tail) if the process exits or takes too long."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"{name} exited with {server.process.returncode}:\n{server.log_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.process.kill()
    pytest.fail(f"{name} not ready after {STARTUP_TIMEOUT_S} s:\n{server.log_text()[-3000:]}")


def stop_service(server: Server) -> None:
    """SIGTERM (a graceful shutdown), then SIGKILL if it has not exited after 20 s."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=10)


@contextlib.contextmanager
def running_server(models_dir: Path, tmp_path: Path, **env: str) -> Iterator[Server]:
    require_default_models(models_dir)
    log = tmp_path / f"server-{free_port()}.log"
    server = spawn_service(
        models_dir, log, **{"FACE_GALLERY_PATH": str(log.with_suffix(".db")), "FACE_LOG_LEVEL": "info", **env}
    )
    try:
        yield wait_ready(server)
    finally:
        stop_service(server)


@dataclass
class EnrolmentBurst:
    """Enrolments sent as fast as a server takes them, from any number of threads, until `stop` is set: what
    was attempted, what was acknowledged (200: face ids, and when), and which requests the server cut off."""

    acknowledged: dict[str, tuple[list[str], float]] = field(default_factory=dict)
    attempted: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def send(self, url: str, prefix: str, image: tuple[str, bytes, str]) -> None:
        """One thread's stream: identities `prefix-00000`, `prefix-00001`, ... each with one photo."""
        with httpx.Client(base_url=url, timeout=30) as client:
            for i in range(100_000):
                if self.stop.is_set():
                    return
                identity = f"{prefix}-{i:05d}"
                with self.lock:
                    self.attempted.add(identity)
                try:
                    response = client.post("/enroll", data={"identity_id": identity}, files=[("images", image)])
                except httpx.TransportError as exc:  # the server died under this request
                    with self.lock:
                        self.failures.append(f"{identity}: {type(exc).__name__}")
                    return
                if response.status_code == 200:
                    with self.lock:
                        self.acknowledged[identity] = (response.json()["face_ids"], time.monotonic())

    def face_ids(self) -> dict[str, list[str]]:
        with self.lock:
            return {identity: ids for identity, (ids, _) in self.acknowledged.items()}
