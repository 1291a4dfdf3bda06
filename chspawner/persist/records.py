"""Kernel records: what a new Jupyter server needs to re-attach to a kernel
its predecessor started.

Each JupyterHub server of a user has its own state directory (see
:func:`state_dir_name`). One JSON file per kernel,
``<state dir>/<kernel id>.json``, written
atomically (a reader never sees half a record) and readable only by the
user: it holds the kernel's HMAC key. The same directory holds each
kernel's logs (its keeper's socket is in a short private directory:
see :meth:`KernelRecords.keeper_address`) (see :mod:`chspawner.persist.keeper`).

Beside each record, ``<kernel id>.acks/`` holds, per client session, the
sequence number of the last kernel message the session's client was sent
(see :class:`AckFile`): a file, so that it is on record the instant it
is written, whatever happens to the server the next instant.
``<kernel id>.cells`` says which notebook cell each execution came from
(see :class:`CellMap`), for a later server that writes outputs into the
notebook or replays them to a page that did not ask for them.

A record exists exactly as long as the kernel is meant to live: it is
written when the kernel starts (and again after a restart, which changes
the PID and maybe the ports) and removed when the kernel is shut down on
purpose or found dead. Its keeper watches the record and exits when it
goes.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
from pathlib import Path
from typing import Any

from chspawner.provisioner.sockets import socket_dir, socket_name

#: jupyter_server kernel ids are UUIDs; anything else in the directory is
#: not a record (and a crafted name can't reach outside it).
_KERNEL_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def json_safe(value: Any) -> Any:
    """``value`` with bytes (the session key) as text, for JSON."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def state_dir_name(server_name: str) -> str:
    """The state directory's name (in the Jupyter runtime directory) of one
    JupyterHub server of a user: each server has its own kernels, and must
    neither adopt nor shut down another's. The default server ('') keeps
    the name it always had; a named one is known by a hash of its name,
    short and safe whatever the name (a keeper socket's path must fit in
    a Unix socket address, 107 bytes)."""
    if not server_name:
        return "chspawner-kernels"
    return "chspawner-kernels-" + hashlib.sha256(server_name.encode()).hexdigest()[:12]


class KernelRecords:
    """The records in one state directory (created mode 0700)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def ensure(self) -> Path:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # An existing directory keeps its mode; the records hold kernel keys.
        self.directory.chmod(0o700)
        return self.directory

    def path(self, kernel_id: str) -> Path:
        if not _KERNEL_ID.match(kernel_id):
            raise ValueError(f"not a kernel id: {kernel_id!r}")
        return self.directory / f"{kernel_id}.json"

    def keeper_address(self, kernel_id: str) -> str:
        """Where the kernel's keeper listens: a Unix socket in the user's
        short private socket directory (:mod:`chspawner.provisioner.sockets`),
        not beside the record, whose directory is as deep as the user's
        home; named by a hash of this directory and the kernel id. (The
        record keeps the address: older ones, beside it, are still found.)"""
        self.path(kernel_id)  # (checks the id)
        name = socket_name(str(self.directory.resolve()), kernel_id)
        return f"ipc://{socket_dir() / (name + '.keeper')}"

    def acks_dir(self, kernel_id: str) -> Path:
        return self.directory / f"{kernel_id}.acks"

    def keeper_state_path(self, kernel_id: str) -> Path:
        """What the kernel's keeper leaves should it die (see
        :mod:`chspawner.persist.keeper_state`)."""
        return self.directory / f"{kernel_id}.keeper-state"

    def cells_path(self, kernel_id: str) -> Path:
        return self.directory / f"{kernel_id}.cells"

    def notebook_state_path(self, kernel_id: str) -> Path:
        """Whether the server was writing the kernel's output into its
        notebook (see :mod:`chspawner.persist.notebook_outputs`)."""
        return self.directory / f"{kernel_id}.notebook"

    def log_path(self, kernel_id: str, what: str) -> Path:
        return self.directory / f"{kernel_id}.{what}.log"

    def write(self, kernel_id: str, record: dict) -> None:
        self.ensure()
        target = self.path(kernel_id)
        tmp = target.with_name(f".{target.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(json_safe(record), f, indent=1)
        os.replace(tmp, target)

    def read(self, kernel_id: str) -> dict | None:
        return read_record(self.path(kernel_id))

    def remove(self, kernel_id: str) -> None:
        self.path(kernel_id).unlink(missing_ok=True)
        for what in ("kernel", "keeper"):
            self.log_path(kernel_id, what).unlink(missing_ok=True)
        self.cells_path(kernel_id).unlink(missing_ok=True)
        self.keeper_state_path(kernel_id).unlink(missing_ok=True)
        self.notebook_state_path(kernel_id).unlink(missing_ok=True)
        shutil.rmtree(self.acks_dir(kernel_id), ignore_errors=True)

    def all(self) -> dict[str, dict]:
        """{kernel id: record} for every readable record."""
        found = {}
        if not self.directory.is_dir():
            return found
        for path in sorted(self.directory.glob("*.json")):
            record = read_record(path)
            if record and record.get("kernel_id") == path.stem:
                found[path.stem] = record
        return found


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# -------------------------------------------------- acknowledgements ---

def ack_path(acks_dir: Path, session: str) -> Path:
    """The file of one client session: named by a hash of the session id,
    which the client chooses, so that no id can name a path."""
    return acks_dir / hashlib.sha256(session.encode()).hexdigest()[:32]


class AckFile:
    """Where one client session's acknowledgements are written: the file,
    mapped into memory. Recording a message is a store to shared memory,
    no system call: it is in the page cache, for any later reader, the
    instant it is made, even if this process is killed right after. It
    comes right after the socket's send returns, which is where the
    scheduler likes to switch to a process just woken (such as a client
    that kills the server on seeing the message): a kill there leaves the
    message sent but not recorded, and the session proxy drops the copy
    the next server sends (:mod:`session_proxy.proxy.delivered`)."""

    SIZE = 8

    def __init__(self, acks_dir: Path, session: str):
        acks_dir.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(ack_path(acks_dir, session), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < self.SIZE:
                os.ftruncate(fd, self.SIZE)  # (a new file reads as seq 0)
            self._map = mmap.mmap(fd, self.SIZE)
        finally:
            os.close(fd)  # the mapping keeps the file

    def write(self, seq: int) -> None:
        self._map[:self.SIZE] = seq.to_bytes(self.SIZE, "big")

    def close(self) -> None:
        self._map.close()


def read_ack(acks_dir: Path, session: str) -> int | None:
    """The session's last acknowledged seq; None if it never had one (no
    file, or a new one: seqs start at 1)."""
    try:
        with open(ack_path(acks_dir, session), "rb") as f:
            data = f.read(AckFile.SIZE)
    except OSError:
        return None
    seq = int.from_bytes(data, "big") if len(data) == AckFile.SIZE else 0
    return seq or None


# ------------------------------------------------------------ cells ---

class CellMap:
    """Which notebook cell each execution of one kernel came from.

    JupyterLab puts the id of the cell it runs in the execute_request's
    metadata (``cellId``); the kernel's later messages name only the
    request (their parent's ``msg_id``). The server notes each request as
    it forwards it, one JSON line appended to ``<kernel id>.cells``
    (``{"msg_id", "cell_id", "session"}``), and, when the execution's
    execute_input passes, its execution count (``{"msg_id", "count"}``),
    so that whoever comes later, a new server, a new page, the writer of
    outputs into the notebook, can still tell which cell a message belongs
    to and which count the cell shows. Bounded: when the file holds twice
    ``keep`` lines it is rewritten with the newest ``keep``. A line cut
    short by a crash is skipped."""

    def __init__(self, path: Path, keep: int = 1000):
        self.path = Path(path)
        self.keep = max(1, keep)
        #: msg_id -> [cell id, session, execution count or None]
        self._cells: dict[str, list] = {}
        self._lines = 0
        self._read_size = 0
        self._inode = 0

    def add(self, msg_id: str, cell_id: str, session: str = "") -> None:
        if not msg_id or not cell_id:
            return
        self.refresh()
        self._append({"msg_id": msg_id, "cell_id": cell_id, "session": session})
        self._cells[msg_id] = [cell_id, session, None]

    def counted(self, msg_id: str, count: int) -> None:
        """The execution ``msg_id`` (a known one) began as ``count``."""
        found = self._cells.get(msg_id)
        if found is None:
            self.refresh()
            found = self._cells.get(msg_id)
        if found is None or found[2] == count or not isinstance(count, int):
            return
        self._append({"msg_id": msg_id, "count": count})
        found[2] = count

    def count(self, msg_id: str) -> int | None:
        """The execution count of ``msg_id``, if its start was seen."""
        self.cell(msg_id)
        found = self._cells.get(msg_id)
        return found[2] if found else None

    def _append(self, entry: dict) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(entry) + "\n")
            self._read_size = f.tell()
        self._lines += 1
        if self._lines >= 2 * self.keep:
            self._compact()

    def cell(self, msg_id: str) -> str | None:
        """The cell id of the execution ``msg_id``, if known."""
        found = self._cells.get(msg_id)
        if found is None:
            self.refresh()
            found = self._cells.get(msg_id)
        return found[0] if found else None

    def session(self, msg_id: str) -> str | None:
        """The client session that asked for the execution ``msg_id``."""
        self.cell(msg_id)
        found = self._cells.get(msg_id)
        return found[1] if found else None

    def refresh(self) -> None:
        """Read what was appended since last read (by this or another process)."""
        try:
            with open(self.path, "rb") as f:
                stat = os.fstat(f.fileno())
                if stat.st_ino != self._inode or stat.st_size < self._read_size:
                    # new, or rewritten (compacted): read it all again
                    self._cells.clear()
                    self._lines = 0
                    self._read_size = 0
                    self._inode = stat.st_ino
                f.seek(self._read_size)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1  # a line still being written waits
        for raw in data[:end].splitlines():
            try:
                entry = json.loads(raw)
                msg_id = str(entry["msg_id"])
                if "cell_id" in entry:
                    self._cells[msg_id] = [str(entry["cell_id"]),
                                           str(entry.get("session", "")), entry.get("count")]
                elif msg_id in self._cells and isinstance(entry.get("count"), int):
                    self._cells[msg_id][2] = entry["count"]
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            self._lines += 1
        self._read_size += end
        while len(self._cells) > 2 * self.keep:  # (another process's additions)
            self._cells.pop(next(iter(self._cells)))

    def _compact(self) -> None:
        newest = list(self._cells.items())[-self.keep:]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            for msg_id, (cell_id, session, count) in newest:
                entry = {"msg_id": msg_id, "cell_id": cell_id, "session": session}
                if count is not None:
                    entry["count"] = count
                f.write(json.dumps(entry) + "\n")
            size = f.tell()
            inode = os.fstat(f.fileno()).st_ino
        os.replace(tmp, self.path)
        self._inode = inode
        self._cells = dict(newest)
        self._lines = len(newest)
        self._read_size = size
