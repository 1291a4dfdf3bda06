"""Relay a websocket as raw bytes, after the upgrade handshake succeeded.

Frames are never decoded or copied one by one: whatever the kernel hands
us from one socket goes to the other in one write. Only the backend's
frame *headers* are read (``FrameCounter``), so that when the backend
vanishes between two frames the client gets a proper close frame with
code 1012 (service restart) and reconnects, instead of a bare TCP close.
After a relay on the same URL lost its backend, the next one drops the
copies of what the client already got (``delivered``).

Abandoned websockets (a laptop closed, a network gone: no FIN ever comes)
are found and released (``Pings``): when the client has sent nothing for
the ping interval, the proxy sends it a ping of its own, between two of
the backend's frames; when nothing comes back within the ping timeout, both
sides are closed (the backend gets a close frame, 1001 "going away", when
the client's stream is between frames). The client's pongs to the proxy's
pings are taken out of the stream (``PongFilter``): the backend never sees
them, nor the pings. Both sockets also get TCP keepalive and a TCP user
timeout, so that a peer gone while data is in flight (no ping can be sent
in the middle of a frame) is dropped by the kernel.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from tornado.iostream import IOStream, StreamClosedError

from session_proxy.proxy.delivered import DeliveredFrames, LeadingCopies, Tail
from session_proxy.proxy.tornado_internals import read_buffer
from session_proxy.proxy.wsframes import (
    CLOSE_GOING_AWAY_MASKED, CLOSE_SERVICE_RESTART, PROXY_PING, FrameCounter, PongFilter)

log = logging.getLogger("session_proxy")

#: How long a burst from the backend gathers before the next read.
GATHER_S = 0.001
#: Why a relay ended (the ``reason`` label of the closed-websockets metric).
CLIENT_GONE, BACKEND_GONE, PING_TIMEOUT = "client_gone", "backend_gone", "ping_timeout"
#: TCP keepalive probes: every this many seconds once the idle time is up,
#: and this many unanswered ones drop the connection.
KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 10, 3


class Pings:
    """The proxy's pings to websocket clients: ``interval`` seconds of
    silence from a client gets it a ping; ``timeout`` more without a word
    closes it. An interval of 0 turns pings off (TCP keepalive stays).

    One timer for all the relays, not one each: every quarter of the
    shorter of the two, each relay is looked at (a subtraction or two; a
    few milliseconds for ten thousand), so a silent client is dropped
    within interval + timeout + that quarter. A timer per relay would cost
    each idle websocket a few hundred bytes more."""

    def __init__(self, interval: float = 30.0, timeout: float = 30.0) -> None:
        self.interval, self.timeout = interval, timeout
        self.tick = max(0.05, min(interval, timeout) / 4)
        self.relays: set[_Relay] = set()
        self.timer: asyncio.TimerHandle | None = None

    def watch(self, relay: "_Relay") -> None:
        self.relays.add(relay)
        if self.timer is None:
            self.timer = relay.loop.call_later(self.tick, self._sweep, relay.loop)

    def forget(self, relay: "_Relay") -> None:
        self.relays.discard(relay)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for relay in list(self.relays):  # (a relay given up on leaves later)
            relay.check(now)
        # While there are none, the timer stops; the next relay starts it.
        self.timer = loop.call_later(self.tick, self._sweep, loop) if self.relays else None


@dataclass
class RelayStats:
    """What the relays did, for the metrics: plain integers, incremented
    once per read or per relay, read only when metrics are scraped."""

    live: set = field(default_factory=set)  # the _Relay objects open now
    opened: int = 0
    closed: dict[str, int] = field(default_factory=lambda: {
        CLIENT_GONE: 0, BACKEND_GONE: 0, PING_TIMEOUT: 0})
    # bytes of relays that ended; those open keep their own count
    to_backend: int = 0
    to_client: int = 0

    def bytes_relayed(self) -> tuple[int, int]:
        """(to the backends, to the clients), all relays so far."""
        up, down = self.to_backend, self.to_client
        for relay in self.live:
            up += relay.to_backend
            down += relay.to_client
        return up, down

    def ended(self, relay: "_Relay") -> None:
        self.live.discard(relay)
        self.closed[relay.reason or CLIENT_GONE] += 1
        self.to_backend += relay.to_backend
        self.to_client += relay.to_client


class _Side(asyncio.Protocol):
    """One socket of the relay, as a bare asyncio protocol: data arrives by
    callback, with no future per read (tornado's IOStream needs one).
    Slotted, as the relay's other objects: ten thousand idle websockets
    are sixty thousand of them."""

    __slots__ = ("relay", "transport", "pending", "lost", "full", "resting", "peer")

    def __init__(self, relay: "_Relay") -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] | None = None  # for this side, before it is connected
        self.lost = False
        self.full = False     # its socket takes no more for now (backpressure)
        self.resting = False  # not read for a moment, so that a burst gathers
        self.peer: _Side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.pending:
            for data in self.pending:
                self.transport.write(data)
        self.pending = None
        if self.peer.lost:  # the other side went before this one was attached
            self.transport.close()

    def send(self, data: bytes) -> None:
        if self.transport is None:
            if self.pending is None:
                self.pending = []
            self.pending.append(data)
        elif not self.lost:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.relay.forward(self, data)

    def eof_received(self) -> bool:
        return False  # a half-close ends the relay: close this socket

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.gone(self)

    # Backpressure: while a socket can't take more, stop reading its peer.
    def pause_writing(self) -> None:
        self.full = True
        if self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.full = False
        if self.peer.transport is not None and not self.peer.lost and not self.peer.resting:
            self.peer.transport.resume_reading()


class _Relay:
    """Both sides, and what happens when one goes."""

    __slots__ = ("on_data", "loop", "pings", "pongs", "heard", "ping_sent", "reason",
                 "to_backend", "to_client", "stats", "client", "backend", "from_backend",
                 "url", "delivered", "scope", "copies", "seen", "tail", "done")

    def __init__(self, on_data: Callable[[], None], url: str,
                 delivered: DeliveredFrames | None, scope: str,
                 pings: Pings | None = None, stats: RelayStats | None = None,
                 done: asyncio.Future | None = None) -> None:
        self.on_data = on_data
        self.loop = asyncio.get_running_loop()
        self.pings = pings if pings is not None and pings.interval > 0 else None
        self.pongs = PongFilter() if self.pings is not None else None
        self.heard = self.loop.time()  # the client's last bytes
        self.ping_sent: float | None = None
        self.reason: str | None = None  # why it ended: who went first
        self.to_backend = self.to_client = 0
        self.stats = stats
        if stats is not None:
            stats.opened += 1
            stats.live.add(self)
        self.client, self.backend = _Side(self), _Side(self)
        self.client.peer, self.backend.peer = self.backend, self.client
        self.from_backend = FrameCounter()
        self.url, self.delivered, self.scope = url, delivered, scope
        seen = delivered.get(scope, url) if delivered is not None else []
        self.copies = LeadingCopies(seen) if seen else None
        self.seen = list(seen) if seen else None
        self.tail = Tail() if delivered is not None else None
        self.done = done if done is not None else self.loop.create_future()

    def forward(self, side: _Side, data: bytes) -> None:
        self.on_data()
        if side is self.client:
            self.to_backend += len(data)
            if self.pongs is not None:
                self.heard = self.loop.time()
                data = self.pongs.feed(data)
                if not data:
                    return
            self.backend.send(data)
            return
        self.to_client += len(data)
        if self.copies is not None:
            data = self.copies.filter(data)
            if self.copies.done:
                self._copies_done()
            if not data:
                return
        self.client.send(data)
        starts = self.from_backend.feed(data)
        if self.tail is not None:
            self.tail.add(data, self.from_backend.first_start)
        if starts > 1 and not side.resting and side.transport is not None:
            self._gather(side)

    def _copies_done(self) -> None:
        if self.copies.dropped:
            log.info("%s: dropped %d message(s) the client had before its backend went",
                     self.url.split("?")[0], self.copies.dropped)
        self.copies = None

    def _gather(self, side: _Side) -> None:
        """Several frames in one read: the backend is sending a burst (a
        kernel printing fast). Leave its socket unread for a moment, so the
        next read takes what gathered in one go: fewer, larger reads and
        writes, for this process and the client alike. A lone message (a
        reply, a keystroke's echo) never waits."""
        side.resting = True
        side.transport.pause_reading()
        asyncio.get_running_loop().call_later(GATHER_S, self._wake, side)

    def _wake(self, side: _Side) -> None:
        side.resting = False
        if not side.lost and not side.peer.full:
            side.transport.resume_reading()

    # -- the proxy's pings --------------------------------------------------

    def start_pings(self) -> None:
        if self.pings is not None:
            self.pings.watch(self)

    def check(self, now: float) -> None:
        """Called by ``Pings`` every tick: ping a client silent for the
        interval, give up on one whose ping is unanswered after the timeout."""
        pings = self.pings
        if self.ping_sent is not None:
            if self.heard >= self.ping_sent:  # the client answered (or spoke)
                self.ping_sent = None
            elif now - self.ping_sent >= pings.timeout:
                return self._give_up()
            else:
                return
        if now - self.heard < pings.interval:
            return
        transport = self.client.transport
        # In the middle of a frame no ping can go: TCP's user timeout
        # watches a client that stopped taking that frame.
        if self.from_backend.at_boundary and transport is not None and not self.client.lost:
            transport.write(PROXY_PING)
            self.ping_sent = now

    def _give_up(self) -> None:
        """No answer to a ping: the client is gone. Drop what waits for it
        and close both sides."""
        log.info("%s: no answer to a ping in %g s: websocket closed",
                 self.url.split("?")[0], self.pings.timeout)
        self.reason = self.reason or PING_TIMEOUT
        self.pings.forget(self)  # once
        # The client first, and taken as lost at once: the backend's end
        # that follows must not read as "the backend vanished" (no 1012 to
        # the client, nothing remembered for a replay).
        if self.client.transport is not None and not self.client.lost:
            self.client.transport.abort()
        self.client.lost = True
        backend = self.backend.transport
        if backend is not None and not self.backend.lost:
            if self.pongs.at_boundary:
                backend.write(CLOSE_GOING_AWAY_MASKED)
            backend.close()

    def gone(self, side: _Side) -> None:
        if self.reason is None:
            self.reason = CLIENT_GONE if side is self.client else BACKEND_GONE
        if self.copies is not None:
            self._copies_done()
        peer = side.peer
        if not peer.lost and peer.transport is not None:
            counter = self.from_backend
            if side is self.backend and not counter.saw_close:  # it vanished
                self._remember_delivered()
                if counter.at_boundary:
                    peer.transport.write(CLOSE_SERVICE_RESTART)
            peer.transport.close()  # after what is buffered has gone out
        if self.client.lost and self.backend.lost:
            self.end()

    def end(self) -> None:
        """Both sides are closed: once, stop the pings and count it."""
        if self.done.done():
            return
        if self.pings is not None:
            self.pings.forget(self)
        if self.stats is not None:
            self.stats.ended(self)
        self.done.set_result(None)

    def _remember_delivered(self) -> None:
        """The backend vanished (killed: no close frame) while the client is
        still here: what this relay (and the ones before it on the URL)
        passed on is what the next relay's backend may send again."""
        if self.tail is not None:  # (kept exactly when delivered is given)
            self.delivered.remember(self.scope, self.url, (self.seen or []) + self.tail.digests())


def _take(stream: IOStream, pings: Pings | None) -> tuple[socket.socket, bytes]:
    """Take the socket out of a tornado stream, with what tornado had read
    from it already (frames that came right after the handshake)."""
    buffered = read_buffer(stream)
    sock = stream.socket.dup()
    stream.close()  # closes tornado's descriptor; the dup keeps the connection
    sock.setblocking(False)
    keep_alive(sock, pings)
    return sock, buffered


def keep_alive(sock: socket.socket, pings: Pings | None) -> None:
    """TCP keepalive (probes after the ping interval of silence, or 60 s
    without pings), and a user timeout: data unacknowledged for the ping
    interval plus timeout drops the connection (a peer gone mid-frame)."""
    interval = pings.interval if pings is not None and pings.interval > 0 else 60.0
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):  # Linux
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(interval)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
        if pings is not None and pings.interval > 0 and hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                            int((pings.interval + pings.timeout) * 1000))
    except OSError:  # not TCP (a test's socketpair): nothing to keep alive
        pass


async def relay(client: IOStream, backend: IOStream, on_data: Callable[[], None],
                head: bytes = b"", url: str = "",
                delivered: DeliveredFrames | None = None, scope: str = "",
                pings: Pings | None = None, stats: RelayStats | None = None,
                ended: asyncio.Future | None = None) -> None:
    """Write ``head`` (the backend's 101 answer) to the client, then pipe
    bytes both ways until both sides are closed. If the backend went
    without a close frame while the client is still there, the client gets
    a 1012 close frame when the stream is at a frame boundary, then a close.
    With ``delivered``, copies of frames a relay on ``url`` already passed
    on, before it lost its backend, are dropped (see ``delivered``); what
    is remembered is kept under ``scope`` (the route: one user's server).
    Each side stops being read while the other's write buffer is full.
    With ``pings``, a silent client is pinged and dropped when it does not
    answer (see the module's docstring); ``stats`` counts what went by.
    With ``ended``, it returns once the relay runs and sets ``ended``'s
    result when both sides are closed: no task waits through an idle
    websocket's life (a kilobyte or so each, at ten thousand of them)."""
    try:
        await _relay(client, backend, on_data, head, url, delivered, scope, pings, stats,
                     ended)
    except BaseException:  # a relay that failed to start has ended all the same
        if ended is not None and not ended.done():
            ended.set_result(None)
        raise


async def _relay(client: IOStream, backend: IOStream, on_data: Callable[[], None],
                 head: bytes, url: str, delivered: DeliveredFrames | None, scope: str,
                 pings: Pings | None, stats: RelayStats | None,
                 ended: asyncio.Future | None) -> None:
    if head:
        try:
            await client.write(head)
        except StreamClosedError:
            client.close()
            backend.close()
            if ended is not None:
                ended.set_result(None)
            return
    loop = asyncio.get_running_loop()
    state = _Relay(on_data, url, delivered, scope, pings, stats, ended)
    try:
        client_sock, from_client = _take(client, pings)
    except OSError:  # no descriptor for the dup (EMFILE): give up on this one
        client.close()
        backend.close()
        return state.end()
    try:
        backend_sock, from_backend = _take(backend, pings)
    except OSError:
        client_sock.close()
        backend.close()
        return state.end()
    # The tornado streams (closed now) would live as long as this coroutine:
    # let them go, they are a kilobyte or two of each idle websocket.
    del client, backend
    if from_client:
        state.forward(state.client, from_client)
    if from_backend:
        state.forward(state.backend, from_backend)
    try:
        await loop.connect_accepted_socket(lambda: state.client, client_sock)
        await loop.connect_accepted_socket(lambda: state.backend, backend_sock)
    except OSError:
        client_sock.close()
        backend_sock.close()
        return state.end()
    state.start_pings()
    if ended is None:
        await state.done
