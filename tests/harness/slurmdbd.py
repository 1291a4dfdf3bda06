"""Slurm's accounting for the test cluster: a throwaway MariaDB and the
lines of a ``slurmdbd.conf`` for it.

What only accounting knows: who cancelled a job (sacct's "CANCELLED by
UID"); without slurmdbd, ``scontrol show job`` and ``squeue`` say only
CANCELLED, and ``sacct`` fails ("Slurm accounting storage is disabled").

Debian's mariadb-server and slurmdbd (scripts/setup-system.sh). The
database is made fresh in the cluster's work directory as user ``mysql``
(``mariadb-install-db``: under a second), served by ``mariadbd`` as a
foreground child of the harness (tests/harness/slurm.py runs it and
slurmdbd as it runs its other daemons), on 127.0.0.1 at a free port and a
unix socket there. Root administers it over the socket (MariaDB's
unix_socket login: no password to keep); slurmdbd logs in over TCP as a
user of its own with a random password, which only slurmdbd.conf (mode
0600, root's) holds.
"""
from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

__all__ = ["MariaDB", "available"]

OWNER = "mysql"            # the Debian package's system user
DATABASE = "slurm_acct_db"
USER = "slurm"
CLIENT_TIMEOUT = 30.0


def available() -> bool:
    """Whether this machine has what accounting needs."""
    return all(shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") for tool in
               ("mariadbd", "mariadb-install-db", "mariadb", "slurmdbd"))


class MariaDB:
    """A fresh database directory under ``directory`` and how to serve it."""

    def __init__(self, directory: Path, port: int):
        self.directory, self.port = directory, port
        self.data = directory / "data"
        self.socket = directory / "mariadb.sock"
        self.log_path = directory / "mariadb.log"
        self.password = secrets.token_hex(16)

    def install(self) -> None:
        """The system tables, afresh (a retry starts from nothing)."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(mode=0o700)
        shutil.chown(self.directory, OWNER, OWNER)
        result = subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={self.data}",
             f"--user={OWNER}", "--auth-root-authentication-method=socket",
             "--skip-test-db"], capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
        if result.returncode != 0:
            raise RuntimeError(f"mariadb-install-db exited {result.returncode}: "
                               f"{result.stderr.strip()[-1000:]}")

    def argv(self) -> list[str]:
        """mariadbd in the foreground, for this directory alone (no my.cnf
        of the machine's), durability traded for speed: a test's records."""
        return ["mariadbd", "--no-defaults", f"--datadir={self.data}",
                f"--socket={self.socket}", f"--port={self.port}",
                "--bind-address=127.0.0.1", f"--user={OWNER}",
                f"--log-error={self.log_path}", f"--pid-file={self.directory / 'pid'}",
                "--skip-log-bin", "--innodb-flush-log-at-trx-commit=0",
                "--innodb-buffer-pool-size=64M"]

    def sql(self, statement: str) -> subprocess.CompletedProcess:
        """One statement as the database's root, over the unix socket."""
        return subprocess.run(["mariadb", f"--socket={self.socket}", "-e", statement],
                              capture_output=True, text=True, timeout=CLIENT_TIMEOUT)

    def up(self) -> bool:
        return self.sql("SELECT 1").returncode == 0

    def create_user(self) -> None:
        """slurmdbd's login: its database only, from 127.0.0.1 only."""
        result = self.sql(
            f"CREATE USER '{USER}'@'127.0.0.1' IDENTIFIED BY '{self.password}'; "
            f"GRANT ALL ON {DATABASE}.* TO '{USER}'@'127.0.0.1';")
        if result.returncode != 0:
            raise RuntimeError(f"mariadb: can't create slurmdbd's user: "
                               f"{result.stderr.strip()[-1000:]}")

    def slurmdbd_lines(self) -> list[str]:
        """slurmdbd.conf's storage lines."""
        return ["StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1",
                f"StoragePort={self.port}", f"StorageUser={USER}",
                f"StoragePass={self.password}", f"StorageLoc={DATABASE}"]
