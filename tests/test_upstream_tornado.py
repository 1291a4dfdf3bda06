"""The tornado internals the proxy relies on
(session_proxy.proxy.tornado_internals), each checked against the installed
tornado: a new tornado version that renames or changes one fails here, with
a message naming it, rather than as a proxy that misbehaves. In process,
over loopback connections: no services, no root.
"""
from __future__ import annotations

import asyncio
import socket

import pytest
import tornado
from tornado import httpserver, httputil
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream

from session_proxy.proxy.tornado_internals import (
    KeepAliveConnection, accept_handler, add_listening_socket, chunk_output, connection_params,
    connections, prefill_read_buffer, read_buffer, request_context)

# No root, no services: part of the fast unit layer (pytest -m unit).
pytestmark = pytest.mark.unit

TORNADO = f"tornado {tornado.version}"
DEADLINE_S = 10.0


def changed(what: str) -> str:
    """The failure message: which internal, in which tornado."""
    return (f"{TORNADO} changed {what}, which session_proxy/proxy/tornado_internals.py "
            f"relies on: adapt that module (and pyproject.toml's tornado bound)")


class Answers(httputil.HTTPServerConnectionDelegate):
    """A server delegate that answers every request with 200 and its path."""

    def start_request(self, server_conn: object,
                      request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        return Answer(request_conn)


class Answer(httputil.HTTPMessageDelegate):
    def __init__(self, conn: httputil.HTTPConnection) -> None:
        self.conn = conn

    def headers_received(self, start_line, headers) -> None:
        self.path = start_line.path.encode()

    def finish(self) -> None:
        self.conn.write_headers(
            httputil.ResponseStartLine("HTTP/1.1", 200, "OK"),
            httputil.HTTPHeaders({"Content-Length": str(len(self.path))}), self.path)
        self.conn.finish()


async def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends on ``sock`` until it closes it, or until
    the deadline (then with ``...`` at the end: still open)."""
    loop = asyncio.get_running_loop()
    data = b""
    try:
        async with asyncio.timeout(DEADLINE_S):
            while chunk := await loop.sock_recv(sock, 65536):
                data += chunk
    except TimeoutError:
        return data + b"..."
    return data


def stream_pair() -> tuple[IOStream, socket.socket]:
    """A tornado stream and the plain socket at its other end, over TCP on
    loopback (the request context tells IP connections from others)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    theirs.setblocking(False)
    return IOStream(ours), theirs


def test_private_names_exist():
    """The names themselves, all at once: one message lists every one gone."""
    stream, peer = stream_pair()
    try:
        server = HTTPServer(Answers())
        relied_on = {
            "tornado.httpserver._HTTPRequestContext": hasattr(httpserver, "_HTTPRequestContext"),
            "HTTPServer.conn_params": hasattr(server, "conn_params"),
            "HTTPServer.protocol": hasattr(server, "protocol"),
            "HTTPServer.trusted_downstream": hasattr(server, "trusted_downstream"),
            "HTTPServer._connections": isinstance(getattr(server, "_connections", None), set),
            "TCPServer._sockets": isinstance(getattr(server, "_sockets", None), dict),
            "TCPServer._handlers": isinstance(getattr(server, "_handlers", None), dict),
            "TCPServer._handle_connection": callable(getattr(server, "_handle_connection", None)),
            "HTTP1Connection._chunking_output": hasattr(
                HTTP1Connection(stream, True), "_chunking_output"),
            "IOStream._read_buffer": hasattr(stream, "_read_buffer"),
            "IOStream._read_buffer_size": hasattr(stream, "_read_buffer_size"),
        }
    finally:
        stream.close()
        peer.close()
    gone = [name for name, there in relied_on.items() if not there]
    assert not gone, changed(", ".join(gone))


def test_request_context():
    async def main() -> None:
        stream, peer = stream_pair()
        try:
            server = HTTPServer(Answers())
            context = request_context(server, stream, ("192.0.2.7", 4711))
            assert getattr(context, "remote_ip", None) == "192.0.2.7", changed(
                "_HTTPRequestContext(stream, address, protocol, trusted_downstream)")
            assert getattr(context, "protocol", None) == "http", changed(
                "_HTTPRequestContext's protocol")
        finally:
            stream.close()
            peer.close()
    asyncio.run(main())


def test_keep_alive_connection_reads_params_per_request():
    """The first request gets the first parameters, each later one the later
    ones, and the server's connection set follows the connection: here the
    later ones allow shorter headers than the second request has."""
    async def main() -> None:
        stream, peer = stream_pair()
        server = HTTPServer(Answers())
        first = HTTP1ConnectionParameters(max_header_size=65536)
        later = HTTP1ConnectionParameters(max_header_size=64)
        conn = KeepAliveConnection(stream, first, later,
                                   request_context(server, stream, ("192.0.2.7", 4711)))
        connections(server).add(conn)
        conn.start_serving(server)
        long_header = b"X-Long: " + b"x" * 200 + b"\r\n"
        request = b"GET /%s HTTP/1.1\r\nHost: h\r\n" + long_header + b"\r\n"
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(peer, request % b"one" + request % b"two")
        answers = await read_until_closed(peer)
        peer.close()
        assert answers.count(b"HTTP/1.1 200") == 1 and answers.endswith(b"/one"), changed(
            "how HTTP1ServerConnection reads its params (once per request, "
            f"in _server_request_loop): answers {answers!r}")
        async with asyncio.timeout(DEADLINE_S):
            while conn in connections(server):
                await asyncio.sleep(0.01)  # tornado's on_close runs on a later turn
    try:
        asyncio.run(main())
    except TimeoutError:
        pytest.fail(changed("HTTPServer.on_close: a closed connection stays in _connections"))


def test_connection_params_and_accept_handler():
    """The accept handler hands a socket to handle_stream as an IOStream;
    the server's parameters come from its constructor."""
    handed: list[tuple[IOStream, tuple]] = []

    class Recording(HTTPServer):
        def handle_stream(self, stream: IOStream, address: tuple) -> None:
            handed.append((stream, address))

    async def main() -> None:
        server = Recording(Answers(), chunk_size=4096, max_body_size=12345)
        params = connection_params(server)
        assert (params.chunk_size, params.max_body_size) == (4096, 12345), changed(
            "HTTPServer.conn_params")
        ours, theirs = socket.socketpair()
        try:
            accept_handler(server)(ours, ("192.0.2.7", 4711))
            async with asyncio.timeout(DEADLINE_S):
                while not handed:
                    await asyncio.sleep(0.01)  # handle_stream may run on a later turn
            stream, address = handed[0]
            assert isinstance(stream, IOStream) and stream.socket is ours, changed(
                "TCPServer._handle_connection")
            assert address == ("192.0.2.7", 4711), changed("TCPServer._handle_connection")
        finally:
            ours.close()
            theirs.close()
    try:
        asyncio.run(main())
    except TimeoutError:
        pytest.fail(changed("TCPServer._handle_connection: handle_stream was not called"))


def test_add_listening_socket():
    """server.stop() stops accepting on a socket added this way and closes it."""
    stopped: list[bool] = []

    async def main() -> None:
        server = HTTPServer(Answers())
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        add_listening_socket(server, sock, lambda: stopped.append(True))
        server.stop()
        assert stopped == [True], changed("TCPServer.stop (it calls _handlers' entries)")
        assert sock.fileno() == -1, changed("TCPServer.stop (it closes _sockets' entries)")
    asyncio.run(main())


def test_chunk_output():
    """A DELETE with a body of unknown length goes out chunked."""
    async def main() -> None:
        stream, peer = stream_pair()
        conn = HTTP1Connection(stream, True)
        conn.write_headers(httputil.RequestStartLine("DELETE", "/x", "HTTP/1.1"),
                           httputil.HTTPHeaders({"Host": "h", "Transfer-Encoding": "chunked"}))
        chunk_output(conn)
        await conn.write(b"abc")
        conn.finish()
        stream.close()
        sent = await read_until_closed(peer)
        peer.close()
        assert sent.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), changed(
            f"HTTP1Connection._chunking_output: sent {sent!r}")
    asyncio.run(main())


def test_read_buffer():
    """What tornado read past what was asked for is handed over."""
    async def main() -> None:
        stream, peer = stream_pair()
        try:
            peer.sendall(b"HTTP/1.1 101 x\r\n\r\nframes")
            async with asyncio.timeout(DEADLINE_S):
                head = await stream.read_until(b"\r\n\r\n")
            assert head == b"HTTP/1.1 101 x\r\n\r\n"
            assert read_buffer(stream) == b"frames", changed(
                "IOStream._read_buffer / _read_buffer_size")
        finally:
            stream.close()
            peer.close()
    asyncio.run(main())


def test_prefill_read_buffer():
    """Bytes put in a new stream's read buffer are read before the socket's."""
    async def main() -> None:
        stream, peer = stream_pair()
        try:
            prefill_read_buffer(stream, b"GET / HTTP/1.1\r\n")
            peer.sendall(b"\r\nafter")
            async with asyncio.timeout(DEADLINE_S):
                head = await stream.read_until(b"\r\n\r\n")
                rest = await stream.read_bytes(5)
            assert (head, rest) == (b"GET / HTTP/1.1\r\n\r\n", b"after"), changed(
                "IOStream._read_buffer / _read_buffer_size")
        finally:
            stream.close()
            peer.close()
    asyncio.run(main())
