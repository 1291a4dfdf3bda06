"""The kernel keeper: a small process per kernel that records the kernel's
IOPub messages, numbered, outside the Jupyter server.

It subscribes to the kernel's IOPub socket and keeps the last messages
(at most ``--max-messages`` of them and ``--max-bytes`` in all) in a ring
buffer, each with a sequence number (1, 2, ...). A Jupyter server reads
them over the keeper's ZMQ ROUTER socket, a Unix socket in the state
directory. Frames, client to keeper:

``[b"follow", SESSION]``
    Stream IOPub to me for client session SESSION: every message after the
    last one the session acknowledged, then each new one as it comes. A
    session with no acknowledgement yet starts from now.
``[b"info"]``
    Reply ``[b"info", JSON]``: last and oldest seq, the kernel's last
    execution state, sessions.

A server acknowledges what it sent a session's client not over this
socket but in the session's file beside the kernel's record
(:func:`~session_proxy.kernel_records.write_ack`): a message in flight
to the keeper would die with a killed server, a written file does not.

Keeper to client: first ``[b"following", JSON]``: ``last_seq``, the newest
message when the follow came (those up to it are a replay), and
``missed_replies``, the session's executions that ended since its last
acknowledged message, with their replies rebuilt (see
:mod:`session_proxy.missed_replies`); then ``[b"msg", SEQ, *FRAMES]``
(FRAMES exactly as the kernel sent them, signature included) and, before
them when the session's gap was longer than the buffer, ``[b"lost", JSON]``
with how many were lost.

The keeper outlives the server (it runs in a session of its own) and
exits when its kernel does: when the kernel's record disappears (shut
down on purpose) or when the kernel's PID has been gone for ``--grace``
seconds (long enough for a restart to write the new PID).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from session_proxy.kernel_records import KernelRecords, read_ack, read_record
from session_proxy.missed_replies import KINDS, Executions

DELIM = b"<IDS|MSG>"
#: How many client sessions' positions to remember (oldest forgotten first).
MAX_SESSIONS = 1000


# ------------------------------------------------------------ buffer ---

class RingBuffer:
    """The last messages, each a list of frames with a sequence number,
    bounded by count and by total bytes (the newest message is always
    kept, however big)."""

    def __init__(self, max_messages: int, max_bytes: int):
        self.max_messages = max(1, max_messages)
        self.max_bytes = max(1, max_bytes)
        self._items: deque[tuple[int, list[bytes], int]] = deque()
        self._bytes = 0
        self.last_seq = 0

    @property
    def oldest_seq(self) -> int:
        """The oldest seq still held (last_seq + 1 when empty)."""
        return self._items[0][0] if self._items else self.last_seq + 1

    def append(self, frames: list[bytes]) -> int:
        self.last_seq += 1
        size = sum(len(f) for f in frames)
        self._items.append((self.last_seq, frames, size))
        self._bytes += size
        while len(self._items) > 1 and (len(self._items) > self.max_messages
                                        or self._bytes > self.max_bytes):
            self._bytes -= self._items.popleft()[2]
        return self.last_seq

    def get(self, seq: int) -> list[bytes] | None:
        index = seq - self.oldest_seq
        if 0 <= index < len(self._items):
            return self._items[index][1]
        return None

    def __len__(self) -> int:
        return len(self._items)


# ------------------------------------------------------------ keeper ---

@dataclass
class Follower:
    """A server connection being streamed to: the next seq to send it."""
    session: str
    cursor: int
    notice: dict | None = None  # a "lost" notice still to send


@dataclass
class Keeper:
    record_path: Path
    address: str
    max_messages: int = 10000
    max_bytes: int = 64 << 20
    grace: float = 30.0
    buffer: RingBuffer = field(init=False)
    followers: dict[bytes, Follower] = field(default_factory=dict)
    #: session -> last seq its client acknowledged, as of its last follow
    sessions: OrderedDict[str, int] = field(default_factory=OrderedDict)
    execution_state: str = "unknown"
    executions: Executions = field(default_factory=Executions)

    def __post_init__(self) -> None:
        self.acks_dir = KernelRecords(self.record_path.parent).acks_dir(self.record_path.stem)
        self.buffer = RingBuffer(self.max_messages, self.max_bytes)
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        # Sending to a server that went away fails instead of vanishing, so
        # we drop it; a full pipe raises Again and we retry later.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.linger = 0
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.linger = 0
        # Never drop kernel output on our side: the buffer is the bound.
        self.sub.rcvhwm = 0
        self.iopub_url: str | None = None

    # -- sockets --

    def bind(self) -> None:
        path = self.address.removeprefix("ipc://")
        if os.path.exists(path):
            os.unlink(path)  # a previous keeper's, dead
        self.router.bind(self.address)

    def follow_kernel(self, record: dict) -> None:
        """(Re)connect to the kernel's IOPub, wherever the record says it is
        (a restart with new ports moves it)."""
        info = record.get("connection_info") or {}
        transport, ip = info.get("transport", "tcp"), info.get("ip", "127.0.0.1")
        port = info.get("iopub_port")
        url = f"{transport}://{ip}:{port}" if transport == "tcp" else f"{transport}://{ip}-{port}"
        if url != self.iopub_url:
            if self.iopub_url:
                self.sub.disconnect(self.iopub_url)
            self.sub.connect(url)
            self.iopub_url = url

    # -- IOPub in --

    def on_iopub(self, frames: list[bytes]) -> None:
        self._note(self.buffer.append(frames), frames)

    def _note(self, seq: int, frames: list[bytes]) -> None:
        """Remember the kernel's execution state, for a server re-attaching,
        and what replies need (signature unchecked: these are hints for the
        server, not commands)."""
        try:
            i = frames.index(DELIM)
            header = json.loads(frames[i + 2])
            if header.get("msg_type") not in KINDS:
                return
            content = json.loads(frames[i + 5])
            if header["msg_type"] == "status":
                self.execution_state = content["execution_state"]
            self.executions.note(seq, header, json.loads(frames[i + 3]), content)
        except (ValueError, IndexError, KeyError, TypeError, AttributeError):
            pass

    # -- requests --

    def on_request(self, frames: list[bytes]) -> None:
        ident, verb, args = frames[0], frames[1], frames[2:]
        if verb == b"follow" and args:
            self._follow(ident, args[0].decode())
        elif verb == b"info":
            self._send(ident, [b"info", json.dumps(self.info()).encode()])

    def acked(self, session: str) -> int | None:
        """The last seq the session acknowledged (None: it never did)."""
        known = [seq for seq in (self.sessions.get(session),
                                 read_ack(self.acks_dir, session)) if seq is not None]
        return max(known) if known else None

    def info(self) -> dict:
        return {"last_seq": self.buffer.last_seq, "oldest_seq": self.buffer.oldest_seq,
                "held": len(self.buffer), "capacity": self.buffer.max_messages,
                "execution_state": self.execution_state,
                "sessions": {s: self.acked(s) for s in self.sessions}, "pid": os.getpid()}

    def _follow(self, ident: bytes, session: str) -> None:
        acked = self.acked(session)
        if acked is None:
            acked = self.buffer.last_seq  # new: from now on
        self.sessions[session] = acked
        self.sessions.move_to_end(session)
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        cursor = acked + 1
        self._send(ident, [b"following", json.dumps({
            "last_seq": self.buffer.last_seq,
            "missed_replies": self.executions.missed_by(session, acked)}).encode()])
        follower = Follower(session, cursor)
        if cursor < self.buffer.oldest_seq:
            follower.notice = {"lost": self.buffer.oldest_seq - cursor,
                               "first_seq": cursor, "oldest_seq": self.buffer.oldest_seq,
                               "capacity": self.buffer.max_messages,
                               "capacity_bytes": self.buffer.max_bytes}
            follower.cursor = self.buffer.oldest_seq
        self.followers[ident] = follower

    # -- streaming out --

    def flush(self) -> None:
        for ident, follower in list(self.followers.items()):
            try:
                if follower.notice is not None:
                    self._send(ident, [b"lost", json.dumps(follower.notice).encode()],
                               raise_again=True)
                    follower.notice = None
                while follower.cursor <= self.buffer.last_seq:
                    frames = self.buffer.get(follower.cursor)
                    if frames is None:  # evicted while the server was slow
                        follower.notice = {"lost": self.buffer.oldest_seq - follower.cursor,
                                           "first_seq": follower.cursor,
                                           "oldest_seq": self.buffer.oldest_seq,
                                           "capacity": self.buffer.max_messages,
                                           "capacity_bytes": self.buffer.max_bytes}
                        follower.cursor = self.buffer.oldest_seq
                        break
                    self._send(ident, [b"msg", str(follower.cursor).encode(), *frames],
                               raise_again=True)
                    follower.cursor += 1
            except zmq.Again:
                continue  # its pipe is full: the next flush goes on
            except zmq.ZMQError:
                self.followers.pop(ident, None)  # gone (server closed or died)

    def _send(self, ident: bytes, frames: list[bytes], raise_again: bool = False) -> None:
        try:
            self.router.send_multipart([ident, *frames], flags=zmq.NOBLOCK)
        except zmq.Again:
            if raise_again:
                raise
        except zmq.ZMQError:
            self.followers.pop(ident, None)
            if raise_again:
                raise

    # -- main loop --

    def run(self) -> int:
        record = read_record(self.record_path)
        if record is None:
            return 0
        self.follow_kernel(record)
        self.bind()
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        next_check, dead_since = 0.0, None
        while True:
            events = dict(poller.poll(100))
            if self.sub in events:
                for _ in range(1000):  # drain, but keep serving requests
                    try:
                        self.on_iopub(self.sub.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            if self.router in events:
                for _ in range(1000):
                    try:
                        self.on_request(self.router.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            self.flush()
            now = time.monotonic()
            if now < next_check:
                continue
            next_check = now + 0.5
            record = read_record(self.record_path)
            if record is None:
                return 0  # shut down on purpose (or dropped as dead)
            self.follow_kernel(record)
            pid = (record.get("provisioner_info") or {}).get("pid")
            if pid and _running(pid):
                dead_since = None
            elif dead_since is None:
                dead_since = now
            elif now - dead_since > self.grace:
                return 0

    def close(self) -> None:
        self.router.close()
        self.sub.close()
        self.ctx.term()
        path = self.address.removeprefix("ipc://")
        try:
            os.unlink(path)
        except OSError:
            pass


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


# --------------------------------------------------------------- CLI ---

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m session_proxy.kernel_keeper",
                                     description="Keep a kernel's IOPub messages.")
    parser.add_argument("--record", required=True, help="the kernel's record file")
    parser.add_argument("--address", required=True, help="ipc://PATH to listen on")
    parser.add_argument("--max-messages", type=int, default=10000)
    parser.add_argument("--max-bytes", type=int, default=64 << 20)
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds the kernel's PID may be gone (a restart)")
    parser.add_argument("--detach", action="store_true",
                        help="fork into a session of its own and return at once")
    args = parser.parse_args(argv)
    if args.detach:
        # Double fork: the server's child exits now (the server reaps it),
        # the keeper is nobody's child and outlives the server.
        if os.fork() > 0:
            return 0
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C on the server's terminal
    keeper = Keeper(Path(args.record), args.address, args.max_messages, args.max_bytes,
                    args.grace)
    try:
        return keeper.run()
    finally:
        keeper.close()


if __name__ == "__main__":
    sys.exit(main())
