"""Whose process listens on a TCP port: a server's proof of identity.

The hub must not route a user's browser (and cookies) to whatever answers
at the port it chose for the user's server: on a shared host another user
may listen there first. The kernel's socket tables (``/proc/net/tcp`` and
``/proc/net/tcp6``) list every listening socket with the uid that owns it;
reading them is a metadata read, so nothing (no secret, no request) goes to
the listener to find out whose it is.

On the hub's own host the spawner reads them itself. On a compute node the
server's Slurm job runs this module beside the server, as the user::

    python -m chspawner.spawners.listening --port P --report FILE &
    exec jupyterhub-singleuser ...

It waits until a socket of its own uid listens on the port (or one of
another uid does) and writes a report, ``{"nonce", "node", "port",
"status"}``, to FILE, in the user's own directory where no other user can
write. ``nonce`` comes from the job's environment (``CHSPAWNER_SPAWN_NONCE``,
new for each spawn), so a report of an earlier spawn is never taken for
this one's. The hub reads the report (as root, see :func:`read_report`)
and routes to the server only when it says ``mine``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Iterable
from pathlib import Path

TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
LISTEN = "0A"  # TCP_LISTEN in the tables' "st" column
NONCE_ENV = "CHSPAWNER_SPAWN_NONCE"
MAX_REPORT = 4096  # bytes: a report is a few dozen

MINE, TAKEN, NONE = "mine", "taken", "none"


def listener_uids(port: int, tables: Iterable[str] = TABLES) -> set[int]:
    """The uids owning a listening socket on ``port``, on any address
    (an IPv4 or IPv6 one, or the wildcard: any of them may receive the
    connections meant for the server)."""
    uids: set[int] = set()
    for table in tables:
        try:
            lines = Path(table).read_text().splitlines()[1:]  # (a header first)
        except FileNotFoundError:
            continue  # no IPv6 on this host
        for line in lines:
            # sl local_address rem_address st queues timer retrnsmt uid ...
            fields = line.split()
            if len(fields) > 7 and fields[3] == LISTEN \
                    and int(fields[1].rpartition(":")[2], 16) == port:
                uids.add(int(fields[7]))
    return uids


def port_owner(port: int, uid: int) -> str:
    """MINE: only ``uid`` listens on ``port``; TAKEN: another uid does
    (whether or not ``uid`` does too); NONE: nobody listens yet."""
    uids = listener_uids(port)
    if uids - {uid}:
        return TAKEN
    return MINE if uids else NONE


def node_name() -> str:
    """The node's name as Slurm knows it (squeue's %N), else the host's."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def write_report(path: Path, report: dict) -> None:
    """Atomically, mode 0600, in a directory created mode 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(report, f)
    os.replace(tmp, path)


def read_report(path: Path, uid: int, nonce: str) -> dict | None:
    """The report at ``path`` if it is this spawn's (``nonce``) and can only
    have come from ``uid``: a regular file of that owner, writable by no
    one else, not a link. None otherwise, or if there is none yet.

    Meant for the hub, as root, reading in a user's directory: the file is
    opened without following a link and without blocking (a FIFO), its
    owner checked on the open file, and only so much is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != uid \
                or info.st_mode & 0o022:
            return None
        data = f.read(MAX_REPORT + 1)
    try:
        report = json.loads(data) if len(data) <= MAX_REPORT else None
    except ValueError:
        return None
    if not isinstance(report, dict) or report.get("nonce") != nonce \
            or report.get("status") not in (MINE, TAKEN):
        return None
    return report


def watch(port: int, report: Path, nonce: str, timeout: float,
          interval: float = 0.05) -> bool:
    """Wait until the port is ours or taken, then report which; False if
    nobody listened within ``timeout`` seconds (nothing is written)."""
    deadline = time.monotonic() + timeout
    while True:
        owner = port_owner(port, os.getuid())
        if owner != NONE:
            write_report(report, {"nonce": nonce, "node": node_name(), "port": port,
                                  "status": owner})
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)  # a polling interval: listening signals nothing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chspawner.spawners.listening",
        description="Report whether this user's process listens on a port "
                    f"(the spawn's nonce comes from ${NONCE_ENV}).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--report", type=Path, required=True,
                        help="where to write the report (the user's own directory)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for a listener (default: %(default)s)")
    args = parser.parse_args(argv)
    nonce = os.environ.get(NONCE_ENV, "")
    if not nonce:
        parser.error(f"${NONCE_ENV} is not set")
    return 0 if watch(args.port, args.report, nonce, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
