"""A throwaway PostgreSQL server for the session manager's records.

Debian's postgresql package (scripts/setup-system.sh): initdb into a
temporary directory as the ``postgres`` user, the server run as our
foreground child (as tests/harness/slurm.py runs its daemons), listening on
127.0.0.1 at a free port and on a unix socket in that directory. The
superuser connects over the socket (trust: the directory is postgres's
alone, and we are root); everyone else over TCP with a password (scram),
so a login over 127.0.0.1 proves nothing but the password. Each test that
wants one gets a fresh database owned by a test role. Stopped and removed
at the end.
"""
from __future__ import annotations

import itertools
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.harness import procs
from tests.harness.net import free_port
from tests.harness.wait import wait_listening

BIN = Path("/usr/lib/postgresql/15/bin")
OWNER = "postgres"          # the Debian package's system user
ROLE = "chspawner_test"
STOP_TIMEOUT = 30


class PostgresError(Exception):
    pass


class Postgres:
    def __init__(self):
        self.owner = pwd.getpwnam(OWNER)
        self.workdir = Path(tempfile.mkdtemp(prefix="chspawner-pg-"))
        self.data = self.workdir / "data"
        self.log_path = self.workdir / "postgres.log"
        self.port = 0
        self.password = secrets.token_hex(16)
        self.process: subprocess.Popen | None = None
        self._names = itertools.count(1)

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, *argv: str) -> str:
        result = subprocess.run(argv, user=OWNER, group=OWNER, extra_groups=[],
                                capture_output=True, text=True, cwd=self.workdir)
        if result.returncode != 0:
            raise PostgresError(f"{argv[0]} failed: {result.stderr.strip()[-1000:]}")
        return result.stdout

    def start(self) -> Postgres:
        if not (BIN / "postgres").exists():
            raise PostgresError(f"{BIN}/postgres missing: run scripts/setup-system.sh")
        self.workdir.chmod(0o700)
        shutil.chown(self.workdir, OWNER, OWNER)
        self._run(str(BIN / "initdb"), "-D", str(self.data), "-U", OWNER, "-E", "UTF8",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync")
        for attempt in range(3):
            self._serve()
            try:
                wait_listening(self.port, self.process, self.log, what="postgres",
                               timeout=60)
                break
            except AssertionError:
                # The free port taken meanwhile (net.free_port is racy): again.
                if self.process.poll() is None or "could not bind" not in self.log() \
                        or attempt == 2:
                    raise
        self.sql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{self.password}'")
        return self

    def _serve(self) -> None:
        self.port = free_port()
        with open(self.log_path, "wb") as out:
            # Our own session: pytest's teardown stops it, not a Ctrl-C.
            self.process = subprocess.Popen(
                [str(BIN / "postgres"), "-D", str(self.data), "-h", "127.0.0.1",
                 "-p", str(self.port), "-k", str(self.workdir), "-c", "fsync=off"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, user=OWNER, group=OWNER, extra_groups=[])

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def sql(self, statement: str, database: str = "postgres") -> str:
        """One statement as the superuser, over the unix socket."""
        return self._run(str(BIN / "psql"), "-X", "-q", "-v",
                         "ON_ERROR_STOP=1", "-h", str(self.workdir), "-p", str(self.port),
                         "-U", OWNER, "-d", database, "-At", "-c", statement)

    def database(self) -> str:
        """A fresh, empty database the test role owns: its SQLAlchemy URL."""
        name = f"records_{next(self._names)}"
        self.sql(f"CREATE DATABASE {name} OWNER {ROLE}")
        return self.url(name)

    def url(self, database: str) -> str:
        return (f"postgresql+psycopg://{ROLE}:{self.password}@127.0.0.1:{self.port}/"
                f"{database}")

    def stop(self) -> None:
        if self.process is not None:
            # SIGINT: a fast shutdown, which ends the tests' pooled
            # connections (SIGTERM's smart one would wait for them).
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
                try:
                    self.process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    procs.stop(self.process, 1)
            self.process = None
        shutil.rmtree(self.workdir, ignore_errors=True)
