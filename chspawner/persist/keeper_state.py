"""What a kernel's keeper leaves behind when it dies, and what its
successor makes of it.

A keeper on the server's host keeps a small file beside the kernel's
record, ``<kernel id>.keeper-state``, mapped into memory (as the
acknowledgement files are, see :class:`~chspawner.persist.records.AckFile`):
each message it numbers is a store to memory, on record the instant it is
made, whatever happens to the keeper the next instant (a SIGKILL, the OOM
killer). It holds the keeper's PID, its first and last seq with the time
each came in, the kernel's last execution state, and the execution the
kernel last began (its request's header, its execution count, the seq of
its end when it ended, its error if any), and the identities of its last
:data:`RECENT` messages (:func:`message_ident`), by seq.

A new keeper of the same kernel reads the file before it takes it over,
and reports it (``previous`` in its ``info``), with the time of the first
message it got itself: the server then knows exactly what could not be
kept (the output between the two) and which execution the gap cut into
(see :class:`Takeover`), whichever server asks, this one or the next.
The identities let a server that watched the kernel's output itself (a
:class:`~chspawner.persist.witness.Witness`) line its copies up with the
dead keeper's numbers and fill the gap exactly.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import mmap
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

MAGIC = b"CHK2"
SIZE = 8192
#: pid, first seq, first time (ns), last seq, last time (ns), state
_FIXED = struct.Struct("<4sxxxxqqqqqq")
_CELL_AT = _FIXED.size
_CELL_HEAD = struct.Struct("<II")  # length, CRC-32 of the JSON that follows
#: the last messages' identities, a ring indexed by seq % RECENT
RECENT = 64
IDENT_SIZE = 16
_IDENT = struct.Struct(f"<q{IDENT_SIZE}s")  # seq, identity
_RING_AT = SIZE - RECENT * _IDENT.size
_CELL_MAX = _RING_AT - _CELL_AT - _CELL_HEAD.size
STATES = {"unknown": 0, "idle": 1, "busy": 2, "starting": 3}
_STATE_NAMES = {v: k for k, v in STATES.items()}


class KeeperState:
    """The keeper's side: the mapped file, rewritten from scratch."""

    def __init__(self, path: Path, pid: int, first_seq: int):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, SIZE)
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        self._map[:SIZE] = bytes(SIZE)
        self.pid, self.first_seq, self.first_time = pid, first_seq, 0
        self.state = 0
        self.cell: dict | None = None
        self.message(first_seq - 1, 0)

    def message(self, seq: int, when_ns: int, ident: bytes = b"") -> None:
        """A message numbered ``seq`` came in at ``when_ns`` (epoch ns);
        its :func:`message_ident` is ``ident``. (Its identity first: a kill
        between the two stores leaves the ring ahead of last_seq, which a
        reader ignores.)"""
        if not self.first_time and when_ns:
            self.first_time = when_ns
        if ident:
            _IDENT.pack_into(self._map, _RING_AT + (seq % RECENT) * _IDENT.size, seq, ident)
        _FIXED.pack_into(self._map, 0, MAGIC, self.pid, self.first_seq, self.first_time,
                         seq, when_ns, self.state)

    def execution_state(self, state: str) -> None:
        self.state = STATES.get(state, 0)

    def began(self, parent: dict, count: int | None) -> None:
        """The kernel began the execution ``parent`` (its execute_input)."""
        self.cell = {"parent": parent, "count": count}
        self._write_cell()

    def errored(self, msg_id: str, error: dict) -> None:
        if self.cell and self.cell["parent"].get("msg_id") == msg_id:
            self.cell["error"] = error
            self._write_cell()

    def ended(self, msg_id: str, seq: int) -> None:
        if self.cell and self.cell["parent"].get("msg_id") == msg_id:
            self.cell["ended_seq"] = seq
            self._write_cell()

    def _write_cell(self) -> None:
        data = json.dumps(self.cell).encode()
        if len(data) > _CELL_MAX:  # a header padded with much: keep what matters
            parent = {k: self.cell["parent"].get(k) for k in ("msg_id", "msg_type", "session")}
            data = json.dumps({**self.cell, "parent": parent, "error": None}).encode()[:_CELL_MAX]
        # Torn by a kill mid-store, it fails its CRC and reads as unknown.
        _CELL_HEAD.pack_into(self._map, _CELL_AT, len(data), zlib.crc32(data))
        start = _CELL_AT + _CELL_HEAD.size
        self._map[start:start + len(data)] = data

    def close(self) -> None:
        self._map.close()


def read_keeper_state(path: Path) -> dict | None:
    """What a keeper left in ``path`` (None: no file, or not one):
    ``{"pid", "first_seq", "first_time", "last_seq", "last_time",
    "execution_state", "cell"}``, times in epoch seconds."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if len(data) < SIZE or data[:4] != MAGIC:
        return None
    _magic, pid, first_seq, first_time, last_seq, last_time, state = \
        _FIXED.unpack_from(data, 0)
    length, crc = _CELL_HEAD.unpack_from(data, _CELL_AT)
    start = _CELL_AT + _CELL_HEAD.size
    cell = None
    if 0 < length <= _CELL_MAX and zlib.crc32(data[start:start + length]) == crc:
        try:
            cell = json.loads(data[start:start + length])
        except ValueError:
            cell = None
    recent = {}
    for i in range(RECENT):
        seq, ident = _IDENT.unpack_from(data, _RING_AT + i * _IDENT.size)
        if first_seq <= seq <= last_seq and any(ident):
            recent[seq] = ident.hex()
    return {"pid": pid, "first_seq": first_seq, "first_time": first_time / 1e9,
            "last_seq": last_seq, "last_time": last_time / 1e9,
            "execution_state": _STATE_NAMES.get(state, "unknown"), "cell": cell,
            "recent": dict(sorted(recent.items()))}


def message_ident(frames: list[bytes]) -> bytes:
    """A kernel message's identity, the same whoever received it: a hash
    of its header (which holds its msg_id and time), :data:`IDENT_SIZE`
    bytes. Frames without the ``<IDS|MSG>`` delimiter are hashed whole."""
    try:
        header = frames[frames.index(b"<IDS|MSG>") + 2]
    except (ValueError, IndexError):
        header = b"\0".join(frames)
    return hashlib.blake2b(header, digest_size=IDENT_SIZE).digest()


# ---------------------------------------------------------- takeover ---

@dataclass
class Takeover:
    """A keeper that died, and the one that took its place: what the
    server tells each client session resumed across the gap."""

    #: the new keeper's first seq, and when it got its first message
    first_seq: int
    first_time: float
    #: what the dead keeper left (read_keeper_state), None if nothing
    previous: dict | None
    #: client sessions told, and those whose interrupted cell was settled
    told: set[str] = field(default_factory=set)
    settled: set[str] = field(default_factory=set)
    #: the seqs of the gap's messages the server filled in from its copy
    #: (see chspawner.persist.witness): first, last; None if none were
    filled: tuple[int, int] | None = None

    @classmethod
    def from_info(cls, info: dict) -> "Takeover | None":
        """From a new keeper's info (None when it followed no other)."""
        previous = info.get("previous")
        if not previous:
            return None
        filled = info.get("filled")
        return cls(info.get("first_seq", 0), info.get("first_time") or 0.0, previous,
                   filled=tuple(filled) if filled else None)

    def covered(self, acked: int | None) -> bool:
        """Whether the gap was filled for a session with this
        acknowledgement: it resumes through the filled-in messages, losing
        nothing (it was sent everything before the first of them)."""
        return (self.filled is not None and acked is not None
                and self.filled[0] - 1 <= acked)

    @property
    def gap_start(self) -> float:
        return (self.previous or {}).get("last_time") or 0.0

    @property
    def old_last_seq(self) -> int:
        return (self.previous or {}).get("last_seq") or 0

    @property
    def cell(self) -> dict | None:
        """The execution the old keeper saw begin last, if any."""
        return (self.previous or {}).get("cell")

    def resumed(self, acked: int | None) -> bool:
        """Whether a session with this acknowledgement followed the old
        keeper (a number below the new keeper's: it saw the old one's
        messages) and so is resumed across the gap."""
        return acked is not None and 0 < acked < self.first_seq

    def unsent(self, acked: int | None) -> int:
        """Messages the old keeper numbered that the session was never
        sent: lost with it."""
        if acked is None or acked >= self.first_seq:
            return 0
        if self.filled is not None:  # those from the first filled in on are not lost
            return max(0, self.filled[0] - 1 - acked)
        return max(0, self.old_last_seq - acked)

    def interrupted(self, acked: int | None) -> dict | None:
        """The execution whose end the session may never have received
        because of the gap: the old keeper's last one, unless the session
        was sent its end. ``{"parent", "count", "error"}`` or None."""
        cell = self.cell
        if not cell or not self.resumed(acked):
            return None
        ended = cell.get("ended_seq")
        if ended is not None and acked >= ended:
            return None  # the session has its end
        return cell

    def notice(self, acked: int | None) -> str:
        """The words for a resumed session: what could not be kept."""
        if self.filled is not None:
            return (f"[chspawner] The kernel's output keeper stopped and a new one took "
                    f"over; the server filled in what the kernel printed meanwhile, but "
                    f"{self.unsent(acked)} earlier output message(s) the old keeper held "
                    "and had not yet sent here were not kept. Output after that follows.")
        start, end = self.gap_start, self.first_time
        if start and end:
            span = (f"between {clock(start)} and {clock(end)} UTC "
                    f"({max(0.0, end - start):.1f} s)")
        elif end:
            span = f"until {clock(end)} UTC"
        else:
            span = "while no keeper ran"
        text = (f"[chspawner] The kernel's output keeper stopped and a new one took over: "
                f"output the kernel produced {span} was not kept, and whatever it printed "
                "then is missing here")
        unsent = self.unsent(acked)
        if unsent:
            text += (f", as are {unsent} earlier output message(s) the old keeper held "
                     "but had not yet sent here")
        return text + ". Output after that follows."


def clock(epoch: float) -> str:
    """An epoch time as UTC wall clock, to the millisecond."""
    when = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M:%S.") + f"{when.microsecond // 1000:03d}"


def rebuilt_reply(cell: dict | None) -> dict:
    """The execute_reply content of an execution that ended in a gap: its
    count and error when the old keeper saw them (an error printed during
    the gap is not known: the reply then says ok)."""
    cell = cell or {}
    count = cell.get("count")
    if cell.get("error"):
        return {"status": "error", "execution_count": count, **cell["error"]}
    return {"status": "ok", "execution_count": count, "user_expressions": {}, "payload": []}


#: What a message the server made up after a keeper's death says of itself.
GAP_REBUILT = {"chspawner": "rebuilt: the kernel's output keeper died and this "
                            "execution ended before a new one took over"}
