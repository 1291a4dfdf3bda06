"""The session proxy's fast path (session_proxy.proxy.fastpath) handing a
client connection to tornado's path, with a fake transport: the one case
that a real connection reaches only by a race, an answer still partly in
the transport's buffer when the next request must go to tornado's path.
In process: no services, no root."""
from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import pytest

from session_proxy.proxy import fastpath
from session_proxy.proxy.routes import Holds, RouteTable
from tests.harness.wait import until

pytestmark = pytest.mark.unit

POST = b"POST /nowhere HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nz"


class Transport(asyncio.Transport):
    """One end of a socket pair, with as many bytes still to send as the
    test says (``buffered``)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock, self.buffered = sock, 0
        self.reading, self.aborted = True, False

    def get_extra_info(self, name: str, default=None):
        return {"socket": self.sock, "peername": ("127.0.0.1", 4711)}.get(name, default)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def pause_reading(self) -> None:
        self.reading = False

    def abort(self) -> None:
        self.aborted = True
        self.sock.close()


def proxy() -> SimpleNamespace:
    """What fastpath reads of app.Proxy (the defaults of its options)."""
    options = SimpleNamespace(headers_timeout=60000, keep_alive_timeout=5000, x_forward=True,
                              include_prefix=True, error_target=None, timeout=None)
    return SimpleNamespace(options=options, routes=RouteTable(), holds=Holds(), fast=set(),
                           tasks=set(), client_gone=lambda: None)


def test_a_connection_is_handed_over_only_once_what_was_written_has_left():
    async def main() -> None:
        ours, theirs = socket.socketpair()
        handed: list[tuple[socket.socket, bytes]] = []
        connection = fastpath.ClientConnection(
            proxy(), lambda sock, address, data: handed.append((sock, data)))
        transport = Transport(ours)
        connection.connection_made(transport)
        transport.buffered = 100  # the last answer is still going out
        connection.data_received(POST)  # no route: tornado's path answers it
        assert not handed and not transport.aborted and not transport.reading
        transport.buffered = 0
        await until(lambda: handed, "the connection handed over", timeout=10)
        sock, data = handed[0]
        assert data == POST and transport.aborted
        theirs.sendall(b"more")  # the socket handed over is the same connection
        assert sock.recv(4) == b"more"
        connection.connection_lost(None)
        sock.close()
        theirs.close()
    asyncio.run(main())
