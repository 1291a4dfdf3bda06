"""Relay a websocket as raw bytes, after the upgrade handshake succeeded.

Frames are never decoded or copied one by one: whatever the kernel hands
us from one socket goes to the other in one write. Only the backend's
frame *headers* are read (``FrameCounter``), so that when the backend
vanishes between two frames the client gets a proper close frame with
code 1012 (service restart) and reconnects, instead of a bare TCP close.
"""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from tornado.iostream import IOStream

#: Close frame, unmasked (server to client), status 1012 "service restart".
CLOSE_SERVICE_RESTART = b"\x88\x02\x03\xf4"
OPCODE_CLOSE = 0x8
#: How long a burst from the backend gathers before the next read.
GATHER_S = 0.001


def frame_size(buf: bytes, pos: int) -> int | None:
    """The whole size (header + payload) of the frame starting at
    ``buf[pos]``, or None if its header is not all there yet."""
    avail = len(buf) - pos
    if avail < 2:
        return None
    second = buf[pos + 1]
    length, header = second & 0x7F, 2
    if length == 126:
        if avail < 4:
            return None
        length, header = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
    elif length == 127:
        if avail < 10:
            return None
        length, header = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
    if second & 0x80:  # masked: a 4-byte key follows
        header += 4
        if avail < header:
            return None
    return header + length


class FrameCounter:
    """Follows frame boundaries in one direction of a websocket by reading
    frame headers and skipping payloads by length."""

    def __init__(self) -> None:
        self.skip = 0          # bytes of the current frame still to come
        self.partial = b""     # a frame header cut by the end of a chunk
        self.saw_close = False  # a close frame went by: the end is orderly

    @property
    def at_boundary(self) -> bool:
        return self.skip == 0 and not self.partial

    def feed(self, data: bytes) -> int:
        """Follow ``data``; how many frames start in it."""
        pos, end, starts = self.skip, len(data), 0
        if self.partial:
            # Only the cut header is joined, never the whole chunk.
            head = self.partial + data[:14]
            size = frame_size(head, 0)
            if size is None:
                self.partial = head
                return 0
            self._note_opcode(head, 0)
            pos = size - len(self.partial)
            self.partial = b""
        while pos < end:
            size = frame_size(data, pos)
            if size is None:
                self.partial = data[pos:]
                self.skip = 0
                return starts
            self._note_opcode(data, pos)
            pos += size
            starts += 1
        self.skip = pos - end
        return starts

    def _note_opcode(self, buf: bytes, pos: int) -> None:
        if buf[pos] & 0x0F == OPCODE_CLOSE:
            self.saw_close = True


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

    def __init__(self, on_data: Callable[[], None]) -> None:
        self.on_data = on_data
        self.client, self.backend = _Side(self), _Side(self)
        self.client.peer, self.backend.peer = self.backend, self.client
        self.from_backend = FrameCounter()
        self.done = asyncio.get_running_loop().create_future()

    def forward(self, side: _Side, data: bytes) -> None:
        self.on_data()
        side.peer.send(data)
        if side is self.backend and self.from_backend.feed(data) > 1 and not side.resting:
            self._gather(side)

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
        peer = side.peer
        if not peer.lost and peer.transport is not None:
            counter = self.from_backend
            if side is self.backend and not counter.saw_close and counter.at_boundary:
                peer.transport.write(CLOSE_SERVICE_RESTART)
            peer.transport.close()  # after what is buffered has gone out
        if self.client.lost and self.backend.lost and not self.done.done():
            self.done.set_result(None)


def _take(stream: IOStream) -> tuple[socket.socket, bytes]:
    """Take the socket out of a tornado stream, with what tornado had read
    from it already (frames that came right after the handshake)."""
    # tornado has no public way to hand over its read buffer; this reads
    # its private attributes, which have been stable since tornado 5.
    buffered = bytes(stream._read_buffer[:stream._read_buffer_size])
    sock = stream.socket.dup()
    stream.close()  # closes tornado's descriptor; the dup keeps the connection
    sock.setblocking(False)
    return sock, buffered


async def relay(client: IOStream, backend: IOStream, on_data: Callable[[], None],
                head: bytes = b"") -> None:
    """Write ``head`` (the backend's 101 answer) to the client, then pipe
    bytes both ways until both sides are closed. If the backend went
    without a close frame while the client is still there, the client gets
    a 1012 close frame when the stream is at a frame boundary, then a close."""
    if head:
        await client.write(head)
    loop = asyncio.get_running_loop()
    state = _Relay(on_data)
    client_sock, from_client = _take(client)
    backend_sock, from_backend = _take(backend)
    if from_client:
        state.backend.send(from_client)
    if from_backend:
        state.from_backend.feed(from_backend)
        state.client.send(from_backend)
    try:
        await loop.connect_accepted_socket(lambda: state.client, client_sock)
        await loop.connect_accepted_socket(lambda: state.backend, backend_sock)
    except OSError:
        client_sock.close()
        backend_sock.close()
        return
    await state.done
