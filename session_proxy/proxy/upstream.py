"""Connections from the proxy to route targets, kept alive and reused.

Opening a TCP connection per request is what made tornado's simple HTTP
client slow as a proxy; a small pool of idle keep-alive connections per
route does away with it without any HTTP client library. The pool is the
route's own (``Route.idle``): a connection is reused only for the route
and the target it was opened for, and is closed when the route is
replaced or deleted (``Route.retire``), never handed to a later route on
the same host and port, whose owner may have changed.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket

from tornado.iostream import IOStream
from tornado.tcpclient import TCPClient

from session_proxy.proxy.routes import Route, Target


def _ip_family(host: str) -> int | None:
    """AF_INET/AF_INET6 for an IP literal, None for a name to resolve."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


class Upstreams:
    """Connections to targets; at most ``max_idle`` idle ones per route."""

    def __init__(self, connect_timeout: float, max_idle: int = 64) -> None:
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._tcp = TCPClient()

    async def get(self, route: Route) -> tuple[IOStream, bool]:
        """A connection to ``route``'s target and whether it was reused (a
        reused one may have been closed by the backend an instant ago)."""
        idle = route.idle
        while idle:
            stream = idle.pop()
            if _still_open(stream):
                return stream, True
            stream.close()
        return await self.connect(route.target), False

    async def connect(self, target: Target) -> IOStream:
        """A new connection; IP literals skip the resolver's thread pool."""
        family = _ip_family(target.host)
        if family is None:
            stream = await self._tcp.connect(target.host, target.port,
                                             timeout=self.connect_timeout)
        else:
            stream = IOStream(socket.socket(family, socket.SOCK_STREAM))
            try:
                await asyncio.wait_for(stream.connect((target.host, target.port)),
                                       self.connect_timeout)
            except BaseException:
                stream.close()
                raise
        stream.set_nodelay(True)
        return stream

    def put(self, route: Route, stream: IOStream) -> None:
        """Keep ``stream`` for the next request on ``route`` (closed if the
        route was retired meanwhile). Idle ones are not watched (that would
        cost two changes to the event loop's interest list per request);
        get() checks one before handing it out."""
        idle = route.idle
        if route.retired or stream.closed() or len(idle) >= self.max_idle:
            stream.close()
            return
        idle.append(stream)


def _still_open(stream: IOStream) -> bool:
    """Whether an idle connection is still open: a peek that finds nothing
    to read. End of stream means the backend closed it while idle; bytes
    from an idle backend mean it is not in a state to reuse either."""
    if stream.closed():
        return False
    try:
        stream.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False
