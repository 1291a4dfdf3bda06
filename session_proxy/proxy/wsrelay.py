"""Relay a websocket as raw bytes, after the upgrade handshake succeeded.

Frames are never decoded or copied one by one: whatever the kernel hands
us from one socket goes to the other in one write. Only the backend's
frame *headers* are read (``FrameCounter``), so that when the backend
vanishes between two frames the client gets a proper close frame with
code 1012 (service restart) and reconnects, instead of a bare TCP close.
After a relay on the same URL lost its backend, the next one drops the
copies of what the client already got (``delivered``).
"""
from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from tornado.iostream import IOStream

from session_proxy.proxy.delivered import DeliveredFrames, LeadingCopies, Tail
from session_proxy.proxy.tornado_internals import read_buffer
from session_proxy.proxy.wsframes import CLOSE_SERVICE_RESTART, FrameCounter

log = logging.getLogger("session_proxy")

#: How long a burst from the backend gathers before the next read.
GATHER_S = 0.001


class _Side(asyncio.Protocol):
    """One socket of the relay, as a bare asyncio protocol: data arrives by
    callback, with no future per read (tornado's IOStream needs one)."""

    def __init__(self, relay: "_Relay") -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []  # for this side, before it is connected
        self.lost = False
        self.full = False     # its socket takes no more for now (backpressure)
        self.resting = False  # not read for a moment, so that a burst gathers
        self.peer: _Side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        for data in self.pending:
            self.transport.write(data)
        self.pending.clear()

    def send(self, data: bytes) -> None:
        if self.transport is None:
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

    def __init__(self, on_data: Callable[[], None], url: str,
                 delivered: DeliveredFrames | None, scope: str) -> None:
        self.on_data = on_data
        self.client, self.backend = _Side(self), _Side(self)
        self.client.peer, self.backend.peer = self.backend, self.client
        self.from_backend = FrameCounter()
        self.url, self.delivered, self.scope = url, delivered, scope
        seen = delivered.get(scope, url) if delivered is not None else []
        self.copies = LeadingCopies(seen) if seen else None
        self.seen = list(seen)
        self.tail = Tail() if delivered is not None else None
        self.done = asyncio.get_running_loop().create_future()

    def forward(self, side: _Side, data: bytes) -> None:
        self.on_data()
        if side is self.client:
            self.backend.send(data)
            return
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

    def gone(self, side: _Side) -> None:
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
        if self.client.lost and self.backend.lost and not self.done.done():
            self.done.set_result(None)

    def _remember_delivered(self) -> None:
        """The backend vanished (killed: no close frame) while the client is
        still here: what this relay (and the ones before it on the URL)
        passed on is what the next relay's backend may send again."""
        if self.tail is not None:  # (kept exactly when delivered is given)
            self.delivered.remember(self.scope, self.url, self.seen + self.tail.digests())


def _take(stream: IOStream) -> tuple[socket.socket, bytes]:
    """Take the socket out of a tornado stream, with what tornado had read
    from it already (frames that came right after the handshake)."""
    buffered = read_buffer(stream)
    sock = stream.socket.dup()
    stream.close()  # closes tornado's descriptor; the dup keeps the connection
    sock.setblocking(False)
    return sock, buffered


async def relay(client: IOStream, backend: IOStream, on_data: Callable[[], None],
                head: bytes = b"", url: str = "",
                delivered: DeliveredFrames | None = None, scope: str = "") -> None:
    """Write ``head`` (the backend's 101 answer) to the client, then pipe
    bytes both ways until both sides are closed. If the backend went
    without a close frame while the client is still there, the client gets
    a 1012 close frame when the stream is at a frame boundary, then a close.
    With ``delivered``, copies of frames a relay on ``url`` already passed
    on, before it lost its backend, are dropped (see ``delivered``); what
    is remembered is kept under ``scope`` (the route: one user's server).
    Each side stops being read while the other's write buffer is full."""
    if head:
        await client.write(head)
    loop = asyncio.get_running_loop()
    state = _Relay(on_data, url, delivered, scope)
    try:
        client_sock, from_client = _take(client)
    except OSError:  # no descriptor for the dup (EMFILE): give up on this one
        client.close()
        backend.close()
        return
    try:
        backend_sock, from_backend = _take(backend)
    except OSError:
        client_sock.close()
        backend.close()
        return
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
        return
    await state.done
