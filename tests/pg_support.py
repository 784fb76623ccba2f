"""A real PostgreSQL with pgvector for the tests, from the `pgserver` wheel (PostgreSQL 16 + pgvector 0.6.2).

One server per test session, in a temporary folder, reached over its Unix socket; each test gets a database of
its own. `stop()` shuts the server down the way an operator's fast shutdown does (SIGINT to the postmaster:
sessions are cut, nothing committed is lost) and `start()` brings it back on the same data, which is what the
database-restart test needs. pg_ctl refuses to run as root, so stopping goes by the postmaster's pid.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path

import psycopg


class PostgresServer:
    def __init__(self, folder: Path):
        import pgserver  # the test extra installs it; imported here so that collection never needs it

        self.folder = folder
        self.server = pgserver.get_server(str(folder), cleanup_mode="stop")
        self._names = itertools.count()

    def url(self, database: str = "postgres") -> str:
        return self.server.get_uri(database)

    def new_database(self) -> str:
        """A fresh empty database (no pgvector yet: the gallery enables it), as a libpq URL."""
        name = f"gallery_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def pid(self) -> int | None:
        pidfile = self.folder / "postmaster.pid"
        try:
            return int(pidfile.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def stop(self, timeout_s: float = 30) -> None:
        """Fast shutdown: open sessions are terminated, committed data is kept."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise TimeoutError(f"postmaster {pid} still running after {timeout_s} s")

    def start(self) -> None:
        self.server.ensure_postgres_running()

    def close(self) -> None:
        self.stop()
