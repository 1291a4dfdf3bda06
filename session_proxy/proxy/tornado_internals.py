"""Every tornado internal the proxy relies on, and nothing else.

tornado documents its HTTP server and HTTP/1.1 connections, but not the
few hooks a proxy needs beyond them: a connection's context and the set of
open connections (to count and cap client connections), the listening
sockets (to accept with back-off instead of tornado's accept loop), the
parameters read per request (a keep-alive timeout apart from the headers
timeout), forced chunking of a request body, and an ``IOStream``'s read
buffer (to hand a websocket's socket over with the bytes already read,
and to take a connection from the fast path with the bytes it read).

They are used here only, so that a new tornado version that changes one
breaks this module, not the proxy's logic, and
tests/test_upstream_tornado.py says which one changed. pyproject.toml caps
tornado below its next major version for the same reason.
"""
from __future__ import annotations

import socket
from collections.abc import Callable

from tornado.http1connection import (
    HTTP1Connection, HTTP1ConnectionParameters, HTTP1ServerConnection)
from tornado.httpserver import HTTPServer, _HTTPRequestContext
from tornado.iostream import IOStream


def request_context(server: HTTPServer, stream: IOStream, address: tuple) -> object:
    """The context tornado's ``HTTPServer.handle_stream`` gives a new client
    connection (``remote_ip``, ``protocol``, trusted downstream proxies)."""
    return _HTTPRequestContext(stream, address, server.protocol, server.trusted_downstream)


def connection_params(server: HTTPServer) -> HTTP1ConnectionParameters:
    """The parameters ``server`` gives each client connection (from the
    keyword arguments of its constructor)."""
    return server.conn_params


def connections(server: HTTPServer) -> set[HTTP1ServerConnection]:
    """``server``'s open client connections: tornado's own set, which its
    ``handle_stream`` adds to and its ``on_close`` removes from."""
    return server._connections


def accept_handler(server: HTTPServer) -> Callable[[socket.socket, tuple], None]:
    """What tornado's accept loop calls with each accepted socket: wraps it
    in an ``IOStream`` and calls ``server.handle_stream``."""
    return server._handle_connection


def add_listening_socket(server: HTTPServer, sock: socket.socket,
                         stop_accepting: Callable[[], None]) -> None:
    """Make ``sock`` one of ``server``'s listening sockets, accepted on by
    the caller: ``server.stop()`` calls ``stop_accepting`` and closes it
    (as it does for the sockets of its own accept loop)."""
    server._sockets[sock.fileno()] = sock
    server._handlers[sock.fileno()] = stop_accepting


class KeepAliveConnection(HTTP1ServerConnection):
    """A client connection whose first request's headers must come within
    the headers timeout, and each later one's within the keep-alive
    timeout of the previous answer (tornado has one timeout for both)."""

    def __init__(self, stream: IOStream, first: HTTP1ConnectionParameters,
                 later: HTTP1ConnectionParameters, context: object) -> None:
        super().__init__(stream, first, context)
        self.later = later

    # tornado's request loop reads ``params`` once per request, to make
    # that request's HTTP1Connection: the first read gets ``first``.
    @property
    def params(self) -> HTTP1ConnectionParameters:
        params, self._params = self._params, self.later
        return params

    @params.setter
    def params(self, value: HTTP1ConnectionParameters) -> None:
        self._params = value


def chunk_output(connection: HTTP1Connection) -> None:
    """Make ``connection`` send the body that follows the headers it just
    wrote in chunks: tornado decides that by itself only for POST, PUT and
    PATCH requests without a length."""
    connection._chunking_output = True


def prefill_read_buffer(stream: IOStream, data: bytes) -> None:
    """Put ``data`` in a new ``stream``'s read buffer, as if read from its
    socket: for a connection that arrives with bytes already read
    (tornado has no public way to hand bytes in)."""
    stream._read_buffer += data
    stream._read_buffer_size += len(data)


def read_buffer(stream: IOStream) -> bytes:
    """What tornado has read from ``stream``'s socket and not handed out
    yet (tornado has no public way to hand its read buffer over)."""
    return bytes(stream._read_buffer[:stream._read_buffer_size])
