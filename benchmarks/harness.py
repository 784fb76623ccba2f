"""Timing, a real server process, an HTTP load generator, resident memory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Timing:
    """Wall-clock latencies of repeated calls, in milliseconds."""

    samples_ms: np.ndarray

    @property
    def n(self) -> int:
        return len(self.samples_ms)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p95(self) -> float:
        return self.percentile(95)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples_ms))

    @property
    def min(self) -> float:
        return float(np.min(self.samples_ms))


def measure(fn: Callable[[], object], repeat: int, warmup: int = 2, max_seconds: float | None = None) -> Timing:
    """Call fn warmup times untimed, then up to `repeat` times timed (stopping early after max_seconds)."""
    for _ in range(warmup):
        fn()
    samples = []
    started = time.perf_counter()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(1000 * (time.perf_counter() - t0))
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            break
    return Timing(np.array(samples))


def rss_mb(pid: int) -> tuple[float, float]:
    """(current resident set, peak resident set) of a process in MiB, from /proc/<pid>/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024  # kB -> MiB
    return values.get("VmRSS", float("nan")), values.get("VmHWM", float("nan"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m service` in a child process, configured only through its environment, on a free port."""

    def __init__(self, env: dict[str, str], start_timeout: float = 300.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(self.port)}
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def __enter__(self) -> ServerProcess:  # noqa: PYI034 (a plain class, never subclassed)
        import httpx

        started = time.perf_counter()
        self.log = open(self.env.get("BENCH_SERVER_LOG", os.devnull), "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = started + self.start_timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode} before it was ready")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    self.startup_seconds = time.perf_counter() - started
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the server was not ready within {self.start_timeout:.0f} s")

    def rss_mb(self) -> tuple[float, float]:
        return rss_mb(self.process.pid)

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latency: Timing

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else float("nan")


def load(url: str | Sequence[str], make_request: Callable, concurrency: int, requests: int, warmup: int = 2
         ) -> LoadResult:
    """Closed loop: `concurrency` threads, each with its own keep-alive connection, send `requests` in all,
    each thread its next request as soon as the last one answered. make_request(client) -> httpx.Response.
    Given several URLs (replicas), the threads' connections go to them in turn, as a round-robin proxy's would."""
    import httpx

    urls = [url] if isinstance(url, str) else list(url)
    clients = [httpx.Client(base_url=urls[i % len(urls)], timeout=120) for i in range(concurrency)]
    try:
        for client in clients:  # open every connection and warm the server's paths, untimed
            for _ in range(warmup if client is clients[0] else 1):
                make_request(client).raise_for_status()
        remaining = [requests]
        lock = threading.Lock()
        samples: list[float] = []
        errors = [0]

        def worker(client) -> None:
            while True:
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                t0 = time.perf_counter()
                response = make_request(client)
                elapsed = 1000 * (time.perf_counter() - t0)
                with lock:
                    samples.append(elapsed)
                    if response.status_code != 200:
                        errors[0] += 1

        threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
    finally:
        for client in clients:
            client.close()
    return LoadResult(concurrency, len(samples), errors[0], seconds, Timing(np.array(samples)))


def write_section_alone(path: Path, lines: list[str], command: str, started: str, load_before: float) -> None:
    """A section measured by one benchmark run on its own (`make bench` regenerates it with the rest), with a line
    saying when, by which command, and under what load, put into the report at `path`."""
    said = (f"Measured on {started} UTC by `{command}` alone (`make bench` regenerates it with the rest): load average "
            f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores.")
    if lines:
        replace_section(path, [lines[0], "", said, *lines[1:]])


def replace_section(path: Path, lines: list[str]) -> None:
    """Put a Markdown section (lines[0] is its `## ` heading) into a file in place of its earlier version, or at
    the end: for the benchmarks that run alone and update their part of BENCHMARKS.md."""
    text = path.read_text().splitlines() if path.exists() else []
    start = next((i for i, line in enumerate(text) if line == lines[0]), None)
    if start is None:
        text += ["", *lines]
    else:
        end = next((i for i in range(start + 1, len(text)) if text[i].startswith("## ")), len(text))
        text[start:end] = lines
    path.write_text("\n".join(text).rstrip("\n") + "\n")
