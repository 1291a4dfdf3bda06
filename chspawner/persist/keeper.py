"""The kernel keeper: a small process per kernel that records the kernel's
IOPub messages, numbered, outside the Jupyter server.

It subscribes to the kernel's IOPub socket and keeps the last messages
(at most ``--max-messages`` of them and ``--max-bytes`` in all) in a ring
buffer, each with a sequence number (1, 2, ...). A Jupyter server reads
them over the keeper's ZMQ ROUTER socket, a Unix socket in the state
directory. Frames, client to keeper:

``[b"follow", SESSION]`` or ``[b"follow", SESSION, RECEIVED]``
    Stream IOPub to me for client session SESSION: every message after the
    last one the session acknowledged, then each new one as it comes. A
    session with no acknowledgement yet starts from now. RECEIVED (decimal):
    the session's client says it holds every message up to that seq (its
    page's own count, see kernel_connection's ``chspawner_received``):
    the session then resumes right after it, even below what was recorded
    as sent; a number above the newest message is ignored, one below this
    keeper's first (an earlier keeper's) means all it holds.
``[b"unfollow"]``
    Stop streaming to me (its page went away: the server holds nothing
    for it meanwhile; the session's next connection follows again, from
    what it acknowledged).
``[b"fill", SEQ, *FRAMES]`` (on the Unix socket only)
    Hold this message, numbered SEQ, below our own: one the kernel
    published while no keeper ran, that the server's witness kept (see
    :mod:`chspawner.persist.witness`). Taken only in order, numbered on
    from the dead keeper's last; sessions then resume through them into
    our own messages.
``[b"info"]``
    Reply ``[b"info", JSON]``: last and oldest seq, the kernel's last
    execution state, sessions and those streamed to now, what was filled
    in.

A server acknowledges what it sent a session's client not over this
socket but in the session's file beside the kernel's record
(:class:`~chspawner.persist.records.AckFile`): a message in flight
to the keeper would die with a killed server, a written file does not.

Keeper to client: first ``[b"following", JSON]``: ``last_seq``, the newest
message when the follow came (those up to it are a replay), and
``missed_replies``, the session's executions that ended since its last
acknowledged message, with their replies rebuilt (see
:mod:`chspawner.persist.missed_replies`); then ``[b"msg", SEQ, *FRAMES]``
(FRAMES exactly as the kernel sent them, signature included) and, before
them when the session's gap was longer than the buffer, ``[b"lost", JSON]``
with how many were lost.

Every request ends with three frames, ``TIME NONCE SIG``: the client's
clock (seconds since the epoch, decimal), 16 random bytes (hex), and the
hex HMAC-SHA256 of all the frames before SIG (joined by NUL) under the
kernel's key (see :func:`signed_request`). A keeper listening on TCP
(``--job``, below) is reachable from the network, so it is a CurveZMQ
server that lets in only the kernel's own CURVE key (jupyter_client's
``curve_publickey``, also its client key; see
:mod:`chspawner.provisioner.transport`): others fail the handshake, before any
message is read. It takes no message over MAX_REQUEST bytes (libzmq drops
the sender as the size is announced, before buffering it), and of the
rest only those whose signature holds, whose time is within REPLAY_WINDOW
seconds of ours, and whose nonce it has not seen in that window: a copy of
an old request is refused. (On a Unix socket in the user's own state
directory the file system keeps others out; the frames are not checked.)

Sequence numbers start at a keeper's start time in microseconds, so a
later keeper of the same kernel numbers above an earlier one: a session
acknowledged up to a number this keeper never issued saw none of its
messages, and gets all it holds.

On the server's host, the keeper also keeps a small mapped file beside
the record (:mod:`chspawner.persist.keeper_state`): its last seq and when
it came, the kernel's state, the execution begun last. A keeper that
exits removes it; one that is killed leaves it, and the keeper the server
starts in its place reads it first and reports it (``previous`` in its
info, with ``first_time``, when it got its first message): what the gap
between the two cost.

The keeper outlives the server (it runs in a session of its own) and
exits when its kernel does: when the kernel's record disappears (shut
down on purpose) or when the kernel's PID has been gone for ``--grace``
seconds (long enough for a restart to write the new PID).

``--job`` (a kernel in a Slurm job of its own): the keeper runs inside
the kernel's job, on its node, and starts the kernel itself (the command
after ``--``), so that it lives exactly as long as the kernel: the job
ends when the kernel exits. It takes the kernel's CURVE keys from the
connection file before the kernel starts, learns where the kernel's IOPub
socket is (node-local IPC) from the ``relay.json`` the kernel's relay
writes beside it, listens on TCP (a port of its choosing, written to
``--address-file``), and ends the kernel when its
record, once written, disappears, or was never written within
``--record-timeout`` seconds (the server that submitted the job died
before it could record the kernel: nobody would ever adopt it).
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from chspawner.provisioner.transport import CurveKeys, node_address, secure_client
from chspawner.persist.records import KernelRecords, read_ack, read_record
from chspawner.persist.keeper_state import KeeperState, message_ident, read_keeper_state
from chspawner.persist.missed_replies import KINDS, Executions

DELIM = b"<IDS|MSG>"
#: How many client sessions' positions to remember (oldest forgotten first).
MAX_SESSIONS = 1000
#: The largest request taken (they are a few frames of a few bytes).
MAX_REQUEST = 64 << 10
#: send() flags: another frame follows, or the message's last (never blocking)
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
#: Seconds a signed request stays acceptable (clocks of the server's host
#: and the kernel's node may differ a little); its nonce is kept as long.
REPLAY_WINDOW = 120.0


# ------------------------------------------------------------ buffer ---

class RingBuffer:
    """The last messages, each a list of frames with a sequence number,
    bounded by count and by total bytes (the newest message is always
    kept, however big).

    It may also hold, below its own numbers, messages handed over by the
    server (:meth:`fill`): what the kernel published while no keeper ran,
    numbered on from the dead keeper's last seq. Those go first when the
    bounds are reached, and :meth:`next_seq` steps from the last of them
    to the first of our own."""

    def __init__(self, max_messages: int, max_bytes: int, first_seq: int = 1):
        self.max_messages = max(1, max_messages)
        self.max_bytes = max(1, max_bytes)
        self._items: deque[tuple[int, list[bytes], int]] = deque()
        self._filled: deque[tuple[int, list[bytes], int]] = deque()
        self._bytes = 0
        self.first_seq = first_seq
        self.last_seq = first_seq - 1
        #: the first and last seq ever filled in (None: nothing was)
        self.fill_first: int | None = None
        self.fill_last: int | None = None

    @property
    def oldest_seq(self) -> int:
        """The oldest seq still held (last_seq + 1 when empty)."""
        if self._filled:
            return self._filled[0][0]
        return self._own_oldest

    @property
    def _own_oldest(self) -> int:
        return self._items[0][0] if self._items else self.last_seq + 1

    def append(self, frames: list[bytes]) -> int:
        self.last_seq += 1
        size = sum(len(f) for f in frames)
        self._items.append((self.last_seq, frames, size))
        self._bytes += size
        self._evict()
        return self.last_seq

    def fill(self, seq: int, frames: list[bytes]) -> bool:
        """Hold ``seq``, a message from before our first: taken only in
        order, each right after the last filled in, all below first_seq.
        Whether it was taken."""
        if seq >= self.first_seq or (self.fill_last is not None and seq != self.fill_last + 1):
            return False
        size = sum(len(f) for f in frames)
        self._filled.append((seq, frames, size))
        self._bytes += size
        if self.fill_first is None:
            self.fill_first = seq
        self.fill_last = seq
        self._evict()
        return True

    def _evict(self) -> None:
        while len(self._filled) + len(self._items) > 1 and (
                len(self._filled) + len(self._items) > self.max_messages
                or self._bytes > self.max_bytes):
            self._bytes -= (self._filled or self._items).popleft()[2]

    def known(self, seq: int) -> bool:
        """Whether ``seq`` is a position in our numbering (held or not):
        from just before the first filled in (or our first) to our last."""
        if self.fill_first is not None and self.fill_first - 1 <= seq <= self.fill_last:
            return True
        return self.first_seq - 1 <= seq <= self.last_seq

    def next_seq(self, seq: int) -> int:
        """The seq that comes after ``seq``: the filled-in messages run on
        into our own."""
        if self.fill_last is not None and seq == self.fill_last:
            return self.first_seq
        return seq + 1

    def get(self, seq: int) -> list[bytes] | None:
        if self._filled and self._filled[0][0] <= seq <= self._filled[-1][0]:
            return self._filled[seq - self._filled[0][0]][1]
        index = seq - self._own_oldest
        if 0 <= index < len(self._items):
            return self._items[index][1]
        return None

    def __len__(self) -> int:
        return len(self._filled) + len(self._items)


# ------------------------------------------------------------ keeper ---

@dataclass
class Follower:
    """A server connection being streamed to: the next seq to send it."""
    session: str
    cursor: int
    notice: dict | None = None  # a "lost" notice still to send
    #: the "following" answer, still to send (first: a server drops what
    #: comes under an earlier follow until it has it, so it must not be
    #: lost to a full pipe)
    following: bytes | None = None


@dataclass
class Keeper:
    record_path: Path
    address: str
    max_messages: int = 10000
    max_bytes: int = 64 << 20
    grace: float = 30.0
    first_seq: int = 1
    #: the kernel's HMAC key: requests are signed with it
    key: bytes = b""
    #: on TCP: the kernel's CURVE keys (the only client let in)
    curve: CurveKeys | None = None
    buffer: RingBuffer = field(init=False)
    followers: dict[bytes, Follower] = field(default_factory=dict)
    #: session -> last seq its client acknowledged, as of its last follow
    sessions: OrderedDict[str, int] = field(default_factory=OrderedDict)
    execution_state: str = "unknown"
    executions: Executions = field(default_factory=Executions)
    #: on the server's host: what we leave should we die (see keeper_state)
    state: KeeperState | None = None
    #: what the keeper before us left, had it died (None: there was none)
    previous: dict | None = None

    def __post_init__(self) -> None:
        self.acks_dir = KernelRecords(self.record_path.parent).acks_dir(self.record_path.stem)
        self.buffer = RingBuffer(self.max_messages, self.max_bytes, self.first_seq)
        self.signed = self.address.startswith("tcp://")
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        # Sending to a server that went away fails instead of vanishing, so
        # we drop it; a full pipe raises Again and we retry later.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.linger = 0
        self.sub = self._new_sub()
        self.iopub_url: str | None = None
        # On TCP, a stranger's huge message is dropped as it is announced; on
        # our Unix socket only the user's server comes, and a message it
        # hands over (fill) is as big as the kernel made it.
        self.router.maxmsgsize = MAX_REQUEST if self.signed else -1
        self.nonces: OrderedDict[bytes, float] = OrderedDict()
        self.first_ident = ""  # our first message's identity (hex), once we have one
        self.auth = None
        self.behind = False  # a follower's pipe was full at the last flush

    # -- sockets --

    def bind(self) -> None:
        if self.signed:  # tcp://HOST:* : a port of our choosing
            if self.curve is None:
                raise RuntimeError("a keeper on TCP needs the kernel's CURVE keys")
            self.auth = self.curve.authenticator(self.ctx)
            self.curve.serve(self.router)
            self.router.bind(self.address)
            self.address = self.router.last_endpoint.decode()
            return
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
                self.sub.close()  # (CURVE options are set before connecting)
                self.sub = self._new_sub()
            secure_client(self.sub, info, url)  # a kernel's relay on a node
            self.sub.connect(url)
            self.iopub_url = url

    def _new_sub(self) -> zmq.Socket:
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.linger = 0
        sub.rcvhwm = 0  # never drop kernel output on our side: the buffer is the bound
        return sub

    # -- IOPub in --

    def on_iopub(self, frames: list[bytes]) -> None:
        seq = self.buffer.append(frames)
        if self.state is not None:
            ident = message_ident(frames)
            if seq == self.buffer.first_seq:
                self.first_ident = ident.hex()
            self.state.message(seq, time.time_ns(), ident)
        self._note(seq, frames)

    def fill(self, frames: list[bytes]) -> None:
        """``[SEQ, *FRAMES]`` from the server: a message the kernel
        published while no keeper ran, which the server's witness kept
        (see :mod:`chspawner.persist.witness`), numbered on from the dead
        keeper's. Only on the server's host (a Unix socket: its sender is
        the user's own server)."""
        if self.signed or len(frames) < 2:
            return
        try:
            seq = int(frames[0])
        except ValueError:
            return
        self.buffer.fill(seq, frames[1:])

    def open_state(self) -> None:
        """Take over the state file: first read what a keeper before us
        left there (it exists only if that one died: one that exits removes
        it), for the server to say what its death cost."""
        path = KernelRecords(self.record_path.parent).keeper_state_path(self.record_path.stem)
        self.previous = read_keeper_state(path)
        self.state = KeeperState(path, os.getpid(), self.buffer.first_seq)

    def close_state(self) -> None:
        """We exit on purpose: nothing to report to a successor."""
        if self.state is not None:
            self.state.close()
            self.state = None
            KernelRecords(self.record_path.parent).keeper_state_path(
                self.record_path.stem).unlink(missing_ok=True)

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
            parent = json.loads(frames[i + 3])
            if header["msg_type"] == "status":
                self.execution_state = content["execution_state"]
            self.executions.note(seq, header, parent, content)
            if self.state is not None:
                self._note_state(seq, header["msg_type"], parent, content)
        except (ValueError, IndexError, KeyError, TypeError, AttributeError):
            pass

    def _note_state(self, seq: int, kind: str, parent: dict, content: dict) -> None:
        """What a successor needs: the state, the execution begun last."""
        state = self.state
        if kind == "status":
            state.execution_state(content.get("execution_state", ""))
        if parent.get("msg_type") != "execute_request":
            return
        if kind == "execute_input":
            state.began(parent, content.get("execution_count"))
        elif kind == "error":
            state.errored(parent.get("msg_id", ""),
                          {k: content.get(k) for k in ("ename", "evalue", "traceback")})
        elif kind == "status" and content.get("execution_state") == "idle":
            state.ended(parent.get("msg_id", ""), seq)

    # -- requests --

    def on_request(self, frames: list[bytes]) -> None:
        if len(frames) < 5:
            return  # (identity, verb, time, nonce, signature at least)
        ident, verb, args = frames[0], frames[1], frames[2:-3]
        if self.signed and not self._fresh_and_signed(frames[1:]):
            return  # not from a holder of the kernel's key, or a replay: no answer
        if verb == b"follow" and args:
            self._follow(ident, args[0].decode(), _received(args[1:2]))
        elif verb == b"unfollow":
            self.followers.pop(ident, None)
        elif verb == b"fill":
            self.fill(args)
        elif verb == b"info":
            self._send(ident, [b"info", json.dumps(self.info()).encode()])

    def _fresh_and_signed(self, request: list[bytes]) -> bool:
        """Whether ``request`` (TIME NONCE SIG last) is signed with the
        kernel's key, recent, and not seen before."""
        *signed, nonce_sig = request
        if not hmac.compare_digest(nonce_sig, sign(self.key, signed)):
            return False
        try:
            sent = float(signed[-2])
        except ValueError:
            return False
        now = time.time()
        while self.nonces and next(iter(self.nonces.values())) < now - REPLAY_WINDOW:
            self.nonces.popitem(last=False)
        nonce = signed[-1]
        if abs(now - sent) > REPLAY_WINDOW or nonce in self.nonces:
            return False
        self.nonces[nonce] = now
        return True

    def acked(self, session: str) -> int | None:
        """The last seq the session acknowledged (None: it never did);
        first_seq - 1 for a number this keeper never issued (an earlier
        keeper's: the session has seen nothing of ours)."""
        known = [seq for seq in (self.sessions.get(session),
                                 read_ack(self.acks_dir, session)) if seq is not None]
        if not known:
            return None
        acked = max(known)
        if not self.buffer.known(acked):
            return self._before_ours()
        return acked

    def _before_ours(self) -> int:
        """The position of a session that saw none of what we hold: just
        before the first message filled in, or our own first."""
        first = self.buffer.fill_first
        return (first if first is not None else self.first_seq) - 1

    def info(self) -> dict:
        return {"last_seq": self.buffer.last_seq, "oldest_seq": self.buffer.oldest_seq,
                "first_seq": self.buffer.first_seq,
                "first_time": self.state.first_time / 1e9 if self.state else None,
                "first_ident": self.first_ident,
                "filled": ([self.buffer.fill_first, self.buffer.fill_last]
                           if self.buffer.fill_first is not None else None),
                "previous": self.previous,
                "held": len(self.buffer), "capacity": self.buffer.max_messages,
                "execution_state": self.execution_state,
                "sessions": {s: self.acked(s) for s in self.sessions},
                "followed": sorted({f.session for f in self.followers.values()}),
                "pid": os.getpid()}

    def _follow(self, ident: bytes, session: str, received: int | None = None) -> None:
        acked = self.acked(session)
        if received is not None and received <= self.buffer.last_seq:
            # What the client holds, not what a server sent (maybe into a
            # socket that broke): an earlier keeper's number means none of ours.
            acked = received if self.buffer.known(received) else self._before_ours()
        if acked is None:
            acked = self.buffer.last_seq  # new: from now on
        self.sessions[session] = acked
        self.sessions.move_to_end(session)
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        cursor = self.buffer.next_seq(acked)
        follower = Follower(session, cursor, following=json.dumps({
            "last_seq": self.buffer.last_seq,
            "missed_replies": self.executions.missed_by(session, acked)}).encode())
        if cursor < self.buffer.oldest_seq:
            follower.notice = {"lost": self.buffer.oldest_seq - cursor,
                               "first_seq": cursor, "oldest_seq": self.buffer.oldest_seq,
                               "capacity": self.buffer.max_messages,
                               "capacity_bytes": self.buffer.max_bytes}
            follower.cursor = self.buffer.oldest_seq
        self.followers[ident] = follower

    # -- streaming out --

    def flush(self) -> None:
        self.behind = False
        for ident, follower in list(self.followers.items()):
            try:
                if follower.following is not None:
                    self._send(ident, [b"following", follower.following], raise_again=True)
                    follower.following = None
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
                    self._send_msg(ident, follower.cursor, frames)
                    follower.cursor = self.buffer.next_seq(follower.cursor)
            except zmq.Again:
                self.behind = True  # its pipe is full: the next flush goes on, soon
                continue
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

    def _send_msg(self, ident: bytes, seq: int, frames: list[bytes]) -> None:
        """``[b"msg", SEQ, *FRAMES]`` to ``ident``, raising as ``_send``
        with ``raise_again``. Frame by frame with plain flags: a replay
        sends thousands of these at once, and pyzmq's send_multipart
        spends more on checking and combining flags for each frame than
        on sending it. (A multipart message is all queued or not at all:
        once its first frame is taken, the rest are.)"""
        send = self.router.send
        try:
            send(ident, _MORE)
            send(b"msg", _MORE)
            send(b"%d" % seq, _MORE)
            for frame in frames[:-1]:
                send(frame, _MORE)
            send(frames[-1], _LAST)
        except zmq.Again:
            raise
        except zmq.ZMQError:
            self.followers.pop(ident, None)
            raise

    # -- main loop --

    def serve(self, poller: zmq.Poller, timeout_ms: int = 100) -> None:
        """One round: take in kernel output and requests, stream out. A
        follower behind (its pipe was full) is flushed again within a
        millisecond: a replay must not wait for the next event (a ROUTER
        can't poll for one follower's room)."""
        events = dict(poller.poll(min(timeout_ms, 1) if self.behind else timeout_ms))
        # Requests first: a new session follows "from now", and a follow
        # that waited while we were starved of CPU (a loaded host) came
        # before the output that piled up meanwhile, which it must get.
        if self.router in events:
            for _ in range(1000):
                try:
                    self.on_request(self.router.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
        if self.sub in events:
            for _ in range(1000):  # drain, but keep serving requests
                try:
                    self.on_iopub(self.sub.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
        self.flush()

    def poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        return poller

    def run(self) -> int:
        """Keep a kernel started by the server, on the server's host."""
        record = read_record(self.record_path)
        if record is None:
            return 0
        self.open_state()
        try:
            return self._keep(record)
        finally:
            self.close_state()

    def _keep(self, record: dict) -> int:
        self.follow_kernel(record)
        self.bind()
        poller = self.poller()
        next_check, dead_since = 0.0, None
        while True:
            self.serve(poller)
            now = time.monotonic()
            if now < next_check:
                continue
            next_check = now + 0.5
            record = read_record(self.record_path)
            if record is None:
                return 0  # shut down on purpose (or dropped as dead)
            self.follow_kernel(record)
            poller = self.poller()  # (a kernel that moved has a new subscription)
            # No PID: a kernel in a job elsewhere, kept here because its own
            # keeper was gone; its record alone says whether it is wanted.
            pid = (record.get("provisioner_info") or {}).get("pid")
            if not pid or _running(pid):
                dead_since = None
            elif dead_since is None:
                dead_since = now
            elif now - dead_since > self.grace:
                return 0

    def run_job(self, command: list[str], connection_file: Path, address_file: Path,
                record_timeout: float) -> int:
        """Start the kernel (``command``) and keep it, inside its job; the
        kernel's exit status when it exits."""
        # The keys, before the kernel's relay rewrites the file for the kernel.
        requested = json.loads(connection_file.read_text())
        self.key = requested.get("key", "").encode()
        self.curve = CurveKeys.from_info(requested)
        kernel = subprocess.Popen(command)
        # scancel signals every process of the job: the kernel gets its own
        # and ends, then so do we.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        started = time.monotonic()
        relay = self._wait_relay(connection_file.with_name("relay.json"), kernel,
                                 started + record_timeout)
        if relay is None:
            return self._end(kernel)
        # The kernel's own IOPub socket, on this node: no network involved.
        self.sub.connect(f"ipc://{relay['kernel_ipc']}-{relay['kernel_ports']['iopub_port']}")
        if self.address == "tcp://*:*":  # (the default) this node's address, as the relay
            self.address = f"tcp://{node_address()}:*"
        self.bind()
        port = self.address.rpartition(":")[2]
        tmp = address_file.with_name(f".{address_file.name}.tmp")
        tmp.write_text(json.dumps({"port": int(port)}))
        os.replace(tmp, address_file)
        poller = self.poller()
        seen, ending = False, None
        next_check = 0.0
        while kernel.poll() is None:
            self.serve(poller)
            now = time.monotonic()
            if now < next_check:
                continue
            next_check = now + 0.5
            recorded = self.record_path.exists()
            seen = seen or recorded
            unwanted = (seen and not recorded) or (
                not seen and now - started > record_timeout)
            if unwanted and ending is None:
                kernel.terminate()
                ending = now
            elif ending is not None and now - ending > self.grace:
                kernel.kill()
        self.serve(poller, 0)  # its last words, for a follower still there
        return kernel.returncode

    def _end(self, kernel: subprocess.Popen) -> int:
        """End the kernel (its relay passes it on); its exit status."""
        if kernel.poll() is None:
            kernel.terminate()
            try:
                kernel.wait(self.grace)
            except subprocess.TimeoutExpired:
                kernel.kill()
        return kernel.wait()

    def _wait_relay(self, path: Path, kernel: subprocess.Popen,
                    unrecorded_until: float) -> dict | None:
        """What the kernel's relay wrote once the kernel is up (None: it
        exited first, or nobody recorded it by ``unrecorded_until``)."""
        while kernel.poll() is None:
            if time.monotonic() > unrecorded_until and not self.record_path.exists():
                return None
            try:
                info = json.loads(path.read_text())
                if info.get("kernel_ports", {}).get("iopub_port"):
                    return info
            except (OSError, ValueError, AttributeError):
                pass  # not yet
            time.sleep(0.02)  # a polling interval: nothing signals the write
        return None

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
        self.router.close()
        self.sub.close()
        self.ctx.term()
        if self.address.startswith("ipc://"):
            try:
                os.unlink(self.address.removeprefix("ipc://"))
            except OSError:
                pass


def _received(frames: list[bytes]) -> int | None:
    """A follow's RECEIVED argument (None: absent or not a number)."""
    try:
        value = int(frames[0])
    except (IndexError, ValueError):
        return None
    return value if value >= 0 else None


def sign(key: bytes, frames: list[bytes]) -> bytes:
    """A request's signature under the kernel's key (see the module doc)."""
    return hmac.new(key, b"\0".join(frames), hashlib.sha256).hexdigest().encode()


def signed_request(key: bytes, frames: list[bytes]) -> list[bytes]:
    """``frames`` as a request to a keeper: with the time, a nonce and the
    signature of it all (see the module doc)."""
    signed = [*frames, repr(time.time()).encode(), os.urandom(16).hex().encode()]
    return [*signed, sign(key, signed)]


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


# --------------------------------------------------------------- CLI ---

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chspawner.persist.keeper",
                                     description="Keep a kernel's IOPub messages.")
    parser.add_argument("--record", required=True, help="the kernel's record file")
    parser.add_argument("--address", default="tcp://*:*",
                        help="ipc://PATH (or, with --job, tcp://HOST:*) to listen on")
    parser.add_argument("--max-messages", type=int, default=10000)
    parser.add_argument("--max-bytes", type=int, default=64 << 20)
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds the kernel's PID may be gone (a restart); with "
                             "--job, seconds an unwanted kernel gets to end")
    parser.add_argument("--detach", action="store_true",
                        help="fork into a session of its own and return at once")
    job = parser.add_argument_group("a kernel in a job of its own")
    job.add_argument("--job", action="store_true",
                     help="start the kernel (the command after --) and keep it")
    job.add_argument("--connection-file", type=Path,
                     help="where the kernel writes back its ports")
    job.add_argument("--address-file", type=Path, help="where to write our port")
    job.add_argument("--record-timeout", type=float, default=300.0,
                     help="seconds to wait for the kernel's record to be written")
    job.add_argument("command", nargs="*", help="the kernel's command (after --)")
    args = parser.parse_args(argv)
    if args.job and not (args.command and args.connection_file and args.address_file):
        parser.error("--job needs --connection-file, --address-file and a command")
    if args.detach:
        # Double fork: the server's child exits now (the server reaps it),
        # the keeper is nobody's child and outlives the server.
        if os.fork() > 0:
            return 0
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
    if not args.job:  # (a job's kernel, our child, must not inherit this)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C on the server's terminal
    keeper = Keeper(Path(args.record), args.address, args.max_messages, args.max_bytes,
                    args.grace, first_seq=time.time_ns() // 1000)
    try:
        if args.job:
            return keeper.run_job(args.command, args.connection_file, args.address_file,
                                  args.record_timeout)
        return keeper.run()
    finally:
        keeper.close()


if __name__ == "__main__":
    sys.exit(main())
