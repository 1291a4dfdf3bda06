"""chspawner-proxy: a reverse proxy for HTTP and websockets that JupyterHub
drives with its stock ``ConfigurableHTTPProxy`` class, plus route holds so
a session can move without its browser tabs noticing more than a pause.

Plain requests without a body take the fast path (``fastpath``: asyncio
protocols and httptools), which hands every other request, with its client
connection, to the tornado-based path here (``Proxy.take_over``). Here
requests are relayed with tornado's HTTP/1.1 connection objects directly
(no HTTP client library), over kept-alive connections to the targets, and
bodies are streamed chunk by chunk in both directions. Websockets are
relayed as raw bytes once the backend has accepted the upgrade (see
``wsrelay``). The route API lives on a separate port (``proxy_api``).

What a client or a target can make it hold is bounded: request headers
must arrive in time (``--headers-timeout``, ``--keep-alive-timeout``),
client connections are capped (``--max-connections``), and running out of
file descriptors pauses accepting instead of failing, and logging, on
every turn of the event loop (``Acceptor``).
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable

from tornado import httputil
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import bind_sockets

from session_proxy.proxy import fastpath, pages, wsrelay
from session_proxy.proxy.delivered import DeliveredFrames, watched
from session_proxy.proxy.fastpath import OUT_OF_FDS
from session_proxy.proxy.api import api_app
from session_proxy.proxy.metrics import HttpStats, ProxyMetrics
from session_proxy.proxy.routes import BadPath, BadTarget, HoldExpired, Holds, Route, RouteTable, segments
from session_proxy.proxy.tornado_internals import (
    KeepAliveConnection, accept_handler, add_listening_socket, chunk_output, connection_params,
    connections, prefill_read_buffer, request_context)
from session_proxy.proxy.upstream import Upstreams
from session_proxy.proxy.routes import strip_segments  # (in routes: fastpath uses it too)

log = logging.getLogger("session_proxy")

CHUNK = 128 * 1024
UNLIMITED = 1 << 62
# Per-connection headers (RFC 9110 7.6.1), never forwarded as they are.
# Expect goes too: tornado answers "100 Continue" to the client itself.
# Spelled as tornado's HTTPHeaders keys them ("TE" is "Te").
HOP_BY_HOP = frozenset({"Connection", "Keep-Alive", "Proxy-Connection", "Te", "Trailer",
                        "Transfer-Encoding", "Upgrade", "Expect"})
#: How long accepting pauses after running out of descriptors.
ACCEPT_BACKOFF_S = 0.25
#: At most one log line per this many seconds about running out of them.
LOG_EVERY_S = 60.0
#: Descriptors kept aside from --max-connections' automatic value: the
#: listening sockets, the route API's connections, the log, the resolver.
RESERVED_FDS = 64
#: An open-file limit under this is worth a warning at start: a websocket
#: takes two descriptors, so it is a couple of thousand browser tabs.
LOW_FD_LIMIT = 4096
UNSUPPORTED_FLAGS = {
    "--ssl-": "TLS is not supported: terminate TLS in front of the proxy",
    "--api-ssl-": "TLS on the API is not supported: keep the API on localhost",
    "--client-ssl-": "TLS to targets (JupyterHub internal_ssl) is not supported",
    "--host-routing": "host-based routing (JupyterHub subdomain_host) is not supported",
    "--socket": "unix sockets are not supported: use --ip/--port",
    "--api-socket": "unix sockets are not supported: use --api-ip/--api-port",
}


class Proxy:
    """What every request needs: routes, holds, connections, options."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.routes = RouteTable()
        self.holds = Holds()
        timeout = options.timeout / 1000 if options.timeout else None
        self.upstreams = Upstreams(connect_timeout=timeout or 30.0)
        self.backend_params = HTTP1ConnectionParameters(
            chunk_size=CHUNK, max_body_size=UNLIMITED, header_timeout=timeout)
        self.tasks: set[asyncio.Future] = set()  # keeps background tasks alive
        #: what each websocket URL's client got, for the next relay on it
        self.delivered = DeliveredFrames()
        self.websockets = 0  # relayed now: each holds a client connection
        self.pings = wsrelay.Pings(options.websocket_ping_interval / 1000,
                                   options.websocket_ping_timeout / 1000)
        self.ws_stats = wsrelay.RelayStats()  # for the metrics
        self.http_stats = HttpStats()
        self.fd_warnings = Throttled(LOG_EVERY_S)       # accepting, out of descriptors
        self.connect_warnings = Throttled(LOG_EVERY_S)  # connecting, out of descriptors
        self.public: BoundedHTTPServer | None = None
        self.fast: set[fastpath.ClientConnection] = set()  # served by fastpath now

    def count_websocket(self, relay: asyncio.Future) -> None:
        """A websocket's client connection left tornado's HTTP server (which
        counts the others): count it against --max-connections until it ends."""
        self.websockets += 1
        relay.add_done_callback(self._websocket_done)

    def _websocket_done(self, _: asyncio.Future) -> None:
        self.websockets -= 1
        self.client_gone()

    def client_gone(self) -> None:
        """A client connection that tornado's server doesn't count ended."""
        if self.public is not None:
            self.public.connection_gone()

    def client_connections(self) -> int:
        return (self.websockets + len(self.fast)
                + (len(connections(self.public)) if self.public else 0))

    def accept(self, sock: socket.socket, address: tuple) -> None:
        """A new client connection on the public port: to the fast path,
        which hands it to tornado's server (``take_over``) when it must."""
        fastpath.accept(self, self.take_over, sock, address)

    def take_over(self, sock: socket.socket, address: tuple, data: bytes) -> None:
        """Serve a connection from the fast path with tornado, from its
        unanswered bytes ``data`` on."""
        stream = IOStream(sock)
        prefill_read_buffer(stream, data)
        self.public.handle_stream(stream, address)


class Throttled:
    """A warning logged at most once per interval, with how many were
    held back since: a flood of one failure must not flood the log."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = -interval
        self.held = 0

    def warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.held += 1
            return
        more = f" ({self.held} more like it since the last)" if self.held else ""
        log.warning("%s%s", message, more)
        self.last, self.held = now, 0


class Acceptor:
    """Accepts connections on one listening socket, as tornado does, but
    out of descriptors (EMFILE, ENFILE) it pauses accepting for a moment
    instead of failing (and logging) on every event loop turn, and while
    ``room()`` says no it leaves new connections in the kernel's backlog
    until ``resume()``."""

    def __init__(self, sock: socket.socket, on_connection: Callable[[socket.socket, tuple], None],
                 room: Callable[[], bool], warnings: Throttled, name: str) -> None:
        self.sock, self.on_connection, self.room = sock, on_connection, room
        self.warnings, self.name = warnings, name
        self.loop = IOLoop.current()
        self.listening = self.stopped = False
        self.resume()

    def resume(self) -> None:
        if not self.listening and not self.stopped:
            self.listening = True
            self.loop.add_handler(self.sock, self._ready, IOLoop.READ)

    def pause(self) -> None:
        if self.listening:
            self.listening = False
            self.loop.remove_handler(self.sock)

    def stop(self) -> None:
        self.pause()
        self.stopped = True

    def _ready(self, fd: object, events: int) -> None:
        for _ in range(128):  # then let other work run (as tornado does)
            if not self.room():
                return self.pause()  # resumed when a connection ends
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as error:
                if error.errno not in OUT_OF_FDS:
                    raise
                self.warnings.warn(f"{self.name}: {error.strerror}: not accepting "
                                   f"connections for {ACCEPT_BACKOFF_S:g} s at a time")
                self.pause()
                self.loop.call_later(ACCEPT_BACKOFF_S, self.resume)
                return
            self.on_connection(connection, address)


class BoundedHTTPServer(HTTPServer):
    """tornado's HTTP server with ``Acceptor``s, at most
    ``max_connections`` client connections (0: no limit; ``count`` says how
    many there are), and a keep-alive timeout of its own."""

    def initialize(self, *args, max_connections: int = 0,
                   count: Callable[[], int] | None = None,
                   keep_alive_timeout: float | None = None,
                   warnings: Throttled | None = None, name: str = "", **kwargs) -> None:
        super().initialize(*args, **kwargs)
        self.max_connections, self.name = max_connections, name
        self.count = count or (lambda: len(connections(self)))
        self.warnings = warnings or Throttled(LOG_EVERY_S)
        self.later_params = copy.copy(connection_params(self))
        self.later_params.header_timeout = keep_alive_timeout
        self.acceptors: list[Acceptor] = []
        self.full = False

    def listen_on(self, port: int, address: str,
                  accept: Callable[[socket.socket, tuple], None] | None = None) -> None:
        """Listen; ``accept`` takes each new connection (default: tornado's
        own handler, to this server)."""
        for sock in bind_sockets(port, address):
            acceptor = Acceptor(sock, accept or accept_handler(self), self.has_room,
                                self.warnings, self.name)
            self.acceptors.append(acceptor)
            add_listening_socket(self, sock, acceptor.stop)  # stop() calls acceptor.stop

    def has_room(self) -> bool:
        if not self.max_connections or self.count() < self.max_connections:
            return True
        if not self.full:
            self.full = True
            self.warnings.warn(f"{self.name}: {self.max_connections} connections open "
                               f"(--max-connections): new ones wait")
        return False

    def connection_gone(self) -> None:
        if self.full and self.count() < self.max_connections:
            self.full = False
            for acceptor in self.acceptors:
                acceptor.resume()

    def handle_stream(self, stream: IOStream, address: tuple) -> None:
        # As tornado's own, with KeepAliveConnection for HTTP1ServerConnection.
        context = request_context(self, stream, address)
        conn = KeepAliveConnection(stream, connection_params(self), self.later_params, context)
        connections(self).add(conn)
        conn.start_serving(self)

    def on_close(self, server_conn: object) -> None:
        super().on_close(server_conn)
        if self.full:
            self.connection_gone()


class Server(httputil.HTTPServerConnectionDelegate):
    """Hands each request on the public port to a ProxyRequest."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def start_request(self, server_conn: object,
                      request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        return ProxyRequest(self.proxy, request_conn)


class ProxyRequest(httputil.HTTPMessageDelegate):
    """One request from a client: route it, then relay it to its target
    and the answer back, or answer it here (errors, expired holds)."""

    def __init__(self, proxy: Proxy, conn: httputil.HTTPConnection) -> None:
        self.proxy = proxy
        self.conn = conn
        self.backend: HTTP1Connection | None = None  # while the request body flows
        self.streams_body = False  # the body goes to self.backend as it comes
        self.answered = False      # the response was made here; drop any body

    # -- the client's side (tornado calls these) -----------------------

    async def headers_received(self, start_line: httputil.RequestStartLine,
                               headers: httputil.HTTPHeaders) -> None:
        self.start_line = start_line
        try:
            parts = segments(start_line.path)
            if self.proxy.holds.holds:  # (no await at all in the common case)
                await self.proxy.holds.wait(parts)
        except BadPath as error:
            return await self.answer(400, str(error))
        except HoldExpired as error:
            return await self.answer(503, str(error))
        found = self.proxy.routes.match(parts)
        if found is None:
            return await self.error_page(404)
        prefix, route = found
        route.touch()
        self.route = route
        websocket = headers.get("Upgrade", "").lower() == "websocket"
        body = has_body(headers)
        path = self.forward_path(start_line.path, len(prefix), route)
        headers = self.forward_headers(headers, websocket, route)
        request = httputil.RequestStartLine(start_line.method, path, "HTTP/1.1")
        if websocket:
            return await self.upgrade(request, headers)
        if body:
            await self.start_streaming(request, headers)
        else:
            # Not awaited here: an answer finished before tornado has read
            # the whole request makes it close the connection after it.
            self.keep(asyncio.ensure_future(self.exchange(request, headers)))

    def data_received(self, chunk: bytes) -> "asyncio.Future[None] | None":
        if self.streams_body and self.backend is not None and not self.answered:
            self.proxy.http_stats.to_backend += len(chunk)
            return self.backend.write(chunk)
        return None

    def finish(self) -> None:
        if self.streams_body and self.backend is not None and not self.answered:
            self.backend.finish()

    def on_connection_close(self) -> None:
        """The client went: so does the request's backend connection."""
        if self.backend is not None:
            self.backend.close()

    # -- what goes to the target ---------------------------------------

    def forward_path(self, path: str, prefix_len: int, route: Route) -> str:
        """The path the target sees: the target's own path in front (as
        configurable-http-proxy's prependPath), the prefix kept unless
        --no-include-prefix."""
        if not self.proxy.options.include_prefix and prefix_len:
            path = strip_segments(path, prefix_len)
        return route.target.base + path

    def forward_headers(self, headers: httputil.HTTPHeaders, websocket: bool,
                        route: Route) -> httputil.HTTPHeaders:
        """The client's headers, Host kept (as configurable-http-proxy's
        default, no changeOrigin), less hop-by-hop ones, plus X-Forwarded-*."""
        upgrade = headers.get("Upgrade", "")
        strip_hop_by_hop(headers)
        if websocket:
            headers["Connection"], headers["Upgrade"] = "Upgrade", upgrade
        host = headers.get("Host")
        if host is None:
            host = headers["Host"] = f"{route.target.host}:{route.target.port}"
        if self.proxy.options.x_forward:
            context = getattr(self.conn, "context", None)
            port = host.rsplit(":", 1)[1] if ":" in host.rsplit("]", 1)[-1] else "80"
            for name, value in (("For", getattr(context, "remote_ip", "")),
                                ("Port", port), ("Proto", "http"), ("Host", host)):
                before = headers.get(f"X-Forwarded-{name}")
                headers[f"X-Forwarded-{name}"] = f"{before},{value}" if before else value
        return headers

    # -- plain requests --------------------------------------------------

    async def exchange(self, request: httputil.RequestStartLine,
                       headers: httputil.HTTPHeaders) -> None:
        """A request without a body: send it, relay the answer. A kept-alive
        connection the backend closed just before we used it is retried
        once on a new one, which is safe as nothing reached the backend."""
        for attempt in range(2):
            if (opened := await self.open_backend(fresh=attempt > 0)) is None:
                return
            stream, reused = opened
            backend = self.backend = HTTP1Connection(stream, True, self.proxy.backend_params)
            backend.write_headers(request, headers)
            backend.finish()
            relay = ResponseRelay(self)
            if await self.relay_response(backend, relay, stream) or relay.started:
                return
            if not reused:
                break
        self.proxy.http_stats.upstream_errors += 1
        await self.error_page(503)

    async def start_streaming(self, request: httputil.RequestStartLine,
                              headers: httputil.HTTPHeaders) -> None:
        """A request with a body: open the backend request now; the body
        follows through data_received as it arrives, the answer is relayed
        meanwhile."""
        if (opened := await self.open_backend()) is None:
            return
        stream, _ = opened
        self.backend = HTTP1Connection(stream, True, self.proxy.backend_params)
        # tornado re-chunks a body of unknown length by itself only for
        # POST, PUT and PATCH; other methods need telling.
        rechunk = "Content-Length" not in headers and request.method not in (
            "POST", "PUT", "PATCH")
        if rechunk:
            headers["Transfer-Encoding"] = "chunked"
        self.backend.write_headers(request, headers)
        if rechunk:
            chunk_output(self.backend)
        self.streams_body = True
        self.keep(asyncio.ensure_future(self.relay_or_fail(stream, ResponseRelay(self))))

    async def open_backend(self, fresh: bool = False) -> tuple[IOStream, bool] | None:
        """A connection to the route's target (a new one if ``fresh``, else
        maybe a kept-alive one) and whether it was reused; None, with a 503
        page sent, when the target can't be reached."""
        try:
            if fresh:
                return await self.proxy.upstreams.connect(self.route.target), False
            return await self.proxy.upstreams.get(self.route)
        except (OSError, StreamClosedError, asyncio.TimeoutError) as error:
            if getattr(error, "errno", None) in OUT_OF_FDS:  # one line a minute, not one a request
                self.proxy.connect_warnings.warn(f"connecting to targets: {error}")
            else:
                log.warning("%s: %s", self.route.data.get("target"), error)
            self.proxy.http_stats.upstream_errors += 1
            await self.error_page(503)
            return None

    async def relay_or_fail(self, stream: IOStream, relay: "ResponseRelay") -> None:
        """Relay the answer; a 503 page if none of it went out."""
        if not await self.relay_response(self.backend, relay, stream) and not relay.started:
            self.proxy.http_stats.upstream_errors += 1
            await self.error_page(503)

    async def relay_response(self, backend: HTTP1Connection, relay: "ResponseRelay",
                             stream: IOStream) -> bool:
        """Relay the backend's answer to the client. True when it all went
        through; the connection then goes back to the pool if it may."""
        try:
            await backend.read_response(relay)
        except (StreamClosedError, httputil.HTTPInputError, OSError):
            pass
        if relay.switched:
            return True  # both connections belong to the websocket relay now
        if not relay.finished:
            stream.close()
            if relay.started:  # half an answer went out: the client must see a cut
                self.conn.close()
            return False
        if relay.keep_alive and backend.stream is not None and not stream.closed():
            self.proxy.upstreams.put(self.route, backend.detach())
        else:
            stream.close()
        self.backend = None
        return True

    # -- websockets ------------------------------------------------------

    async def upgrade(self, request: httputil.RequestStartLine,
                      headers: httputil.HTTPHeaders) -> None:
        """Send the upgrade request on a new connection; on 101, both
        connections leave HTTP and are piped as bytes; any other answer is
        relayed as an ordinary response."""
        if (opened := await self.open_backend(fresh=True)) is None:
            return
        stream, _ = opened
        backend = self.backend = HTTP1Connection(stream, True, self.proxy.backend_params)
        backend.write_headers(request, headers)
        backend.finish()
        await self.relay_or_fail(stream, ResponseRelay(self, on_switch=self.switch_protocols))

    def switch_protocols(self, backend: HTTP1Connection,
                         start_line: httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> None:
        """The backend said 101: pass its answer on verbatim and relay bytes."""
        backend_stream = backend.detach()
        self.backend = None
        client = self.conn.detach()
        head = [f"HTTP/1.1 101 {start_line.reason}"]
        head += [f"{name}: {value}" for name, value in headers.get_all()]
        # ended: set when both sides are closed (no task waits meanwhile)
        ended = asyncio.get_running_loop().create_future()
        setup = asyncio.ensure_future(wsrelay.relay(
            client, backend_stream, self.route.touch,
            ("\r\n".join(head) + "\r\n\r\n").encode("latin1"),
            url=self.start_line.path,
            delivered=self.proxy.delivered if watched(self.start_line.path) else None,
            scope=self.route.path, pings=self.proxy.pings, stats=self.proxy.ws_stats,
            ended=ended))
        self.keep(setup)
        self.proxy.count_websocket(ended)

    # -- answers made here -------------------------------------------------

    async def error_page(self, code: int) -> None:
        """configurable-http-proxy's way: see ``pages.error_page``."""
        body, content_type = await pages.error_page(self.proxy.options.error_target, code,
                                                    self.start_line.path)
        await self.answer(code, body, content_type)

    async def answer(self, code: int, body: str | bytes,
                     content_type: str | None = None) -> None:
        """Respond with ``body``: a str is shown as a small HTML page."""
        if isinstance(body, str):
            body = pages.html_page(code, body)
            content_type = "text/html; charset=utf-8"
        self.answered = True
        self.proxy.http_stats.answered(code)
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        head = httputil.HTTPHeaders({"Content-Type": content_type or "text/html",
                                     "Content-Length": str(len(body))})
        start = httputil.ResponseStartLine("HTTP/1.1", code, httputil.responses.get(code, ""))
        try:
            if self.start_line.method == "HEAD":
                await self.conn.write_headers(start, head)
            else:
                await self.conn.write_headers(start, head, body)
            self.conn.finish()
        except StreamClosedError:
            pass

    def keep(self, task: asyncio.Future) -> None:
        """Hold a reference to a background task until it is done."""
        self.proxy.tasks.add(task)
        task.add_done_callback(self.proxy.tasks.discard)


class ResponseRelay(httputil.HTTPMessageDelegate):
    """Reads the backend's response and writes it to the client as it comes."""

    def __init__(self, request: ProxyRequest, on_switch=None) -> None:
        self.request = request
        self.on_switch = on_switch
        self.started = self.finished = self.switched = False
        self.keep_alive = False
        # A body of known length: its headers wait for its first chunk, so
        # that a small answer leaves in one write (one read for the client).
        self.head: tuple[httputil.ResponseStartLine, httputil.HTTPHeaders] | None = None

    def headers_received(self, start_line: httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> "asyncio.Future[None] | None":
        self.request.proxy.http_stats.answered(start_line.code)
        if start_line.code == 101 and self.on_switch is not None:
            self.started = self.finished = self.switched = True
            self.on_switch(self.request.backend, start_line, headers)
            return None
        if 100 <= start_line.code < 200:
            return None  # an interim answer: tornado reads on to the real one
        self.started = True
        self.keep_alive = reusable(start_line, headers, self.request.start_line.method)
        strip_hop_by_hop(headers)
        start = httputil.ResponseStartLine("HTTP/1.1", start_line.code, start_line.reason)
        if "Content-Length" in headers:
            self.head = start, headers
            return None
        return self.request.conn.write_headers(start, headers)  # a stream: at once

    def data_received(self, chunk: bytes) -> "asyncio.Future[None]":
        self.request.proxy.http_stats.to_client += len(chunk)
        if self.head is not None:
            (start, headers), self.head = self.head, None
            return self.request.conn.write_headers(start, headers, chunk)
        return self.request.conn.write(chunk)

    def finish(self) -> None:
        self.finished = True
        self.request.route.touch()
        if self.head is not None:  # no body (HEAD, 204, 304, length 0)
            (start, headers), self.head = self.head, None
            self.request.conn.write_headers(start, headers)
        self.request.conn.finish()


def strip_hop_by_hop(headers: httputil.HTTPHeaders) -> None:
    """Remove the per-connection headers, and those Connection names (a
    scan of the few headers there are, not a failed lookup per name)."""
    drop = HOP_BY_HOP
    if "Connection" in headers:
        drop = drop | {header_key(name) for name in headers["Connection"].split(",")}
    for name in [name for name in headers if name in drop]:
        del headers[name]


def header_key(name: str) -> str:
    """A header name as HTTPHeaders keys it: `` keep-ALIVE`` -> ``Keep-Alive``."""
    return "-".join(word.capitalize() for word in name.strip().split("-"))


def has_body(headers: httputil.HTTPHeaders) -> bool:
    """Does a body follow the request's headers? (Before hop-by-hop
    headers are removed: Transfer-Encoding is one.)"""
    return "Transfer-Encoding" in headers or headers.get("Content-Length", "0") != "0"


def reusable(start_line: httputil.ResponseStartLine, headers: httputil.HTTPHeaders,
             method: str) -> bool:
    """May the backend connection carry another request after this answer?
    Not if it said close, or its body runs until the connection closes."""
    connection = headers.get("Connection", "").lower()
    if start_line.version == "HTTP/1.1":
        keep = "close" not in connection
    else:
        keep = "keep-alive" in connection
    delimited = ("Content-Length" in headers or "Transfer-Encoding" in headers
                 or method == "HEAD" or start_line.code in (204, 304))
    return keep and delimited


# -- the command ----------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="chspawner-proxy",
        description="Reverse proxy with configurable-http-proxy's REST API and "
                    "route holds (token: $CONFIGPROXY_AUTH_TOKEN).")
    parser.add_argument("--ip", default="", help="public address (default: all)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-ip", default="localhost")
    parser.add_argument("--api-port", type=int, help="default: --port + 1")
    parser.add_argument("--default-target", help="target of the route / at start")
    parser.add_argument("--error-target",
                        help="error pages come from <error-target>/<code>?url=<path>")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warn", "warning", "error"])
    parser.add_argument("--timeout", "--proxy-timeout", type=int, metavar="MS",
                        help="connecting to a target and waiting for its answer's headers")
    parser.add_argument("--headers-timeout", type=positive_ms, default=60000, metavar="MS",
                        help="a client connection whose request headers are not all in "
                             "this long after it opened is closed (default: 60000, as "
                             "configurable-http-proxy's Node server)")
    parser.add_argument("--keep-alive-timeout", type=positive_ms, default=5000, metavar="MS",
                        help="a kept-alive client connection is closed when the next "
                             "request's headers are not all in this long after the last "
                             "answer (default: 5000, as configurable-http-proxy)")
    parser.add_argument("--max-connections", type=int, default=0, metavar="N",
                        help="client connections open at once (websockets included); "
                             "more wait in the listen queue. Default: about half the "
                             "file descriptors the proxy may open, as each client "
                             "connection may need one to its target as well")
    parser.add_argument("--websocket-ping-interval", type=non_negative_ms, default=30000,
                        metavar="MS",
                        help="a websocket client silent this long gets a ping from the "
                             "proxy (0: no pings; TCP keepalive stays). Default: 30000")
    parser.add_argument("--websocket-ping-timeout", type=positive_ms, default=30000,
                        metavar="MS",
                        help="a websocket client that does not answer the proxy's ping "
                             "within this is taken as gone: both sides are closed. "
                             "Default: 30000")
    parser.add_argument("--metrics-without-token", action="store_true",
                        help="serve /metrics on the API port without the API token "
                             "(default: the token is needed, as for the route API)")
    parser.add_argument("--no-x-forward", dest="x_forward", action="store_false",
                        help="don't add X-Forwarded-* headers")
    parser.add_argument("--no-include-prefix", dest="include_prefix", action="store_false",
                        help="strip the route's prefix from the forwarded path")
    parser.add_argument("--pid-file", help="write the process id here")
    return parser.parse_args(argv)


def positive_ms(text: str) -> int:
    """A number of milliseconds above zero, for argparse."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a positive number of milliseconds: {text!r}")
    return value


def non_negative_ms(text: str) -> int:
    """A number of milliseconds, 0 or more, for argparse."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds (0 or more): {text!r}")
    return value


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one (the usual
    practice for a server: the soft default, 1024, is a few hundred
    clients); the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def default_max_connections(fd_limit: int) -> int:
    """Half the descriptors left after RESERVED_FDS: one for the client,
    one for its target."""
    return max(16, (fd_limit - RESERVED_FDS) // 2)


def refuse_unsupported(argv: list[str]) -> None:
    """One clear line for configurable-http-proxy flags this proxy lacks."""
    for arg in argv:
        for flag, why in UNSUPPORTED_FLAGS.items():
            if arg.startswith(flag):
                sys.exit(f"chspawner-proxy: {arg.split('=')[0]}: {why}")


async def serve(options: argparse.Namespace, token: str) -> None:
    proxy = Proxy(options)
    if options.default_target:
        proxy.routes.add((), {"target": options.default_target})
    if not token:
        log.warning("CONFIGPROXY_AUTH_TOKEN is not set: the route API refuses everything")
    timeouts = {"idle_connection_timeout": options.headers_timeout / 1000,
                "keep_alive_timeout": options.keep_alive_timeout / 1000}
    public = proxy.public = BoundedHTTPServer(
        Server(proxy), max_body_size=UNLIMITED, chunk_size=CHUNK,
        max_connections=options.max_connections, count=proxy.client_connections,
        warnings=proxy.fd_warnings, name="public port", **timeouts)
    public.listen_on(options.port, options.ip, proxy.accept)
    # The route API has its own server and port, and no connection limit
    # (only the hub uses it): it keeps answering while the public port is full.
    metrics = ProxyMetrics(proxy.routes, proxy.holds, proxy.ws_stats, proxy.http_stats,
                           lambda: len(connections(public)) + len(proxy.fast))
    api = BoundedHTTPServer(api_app(proxy.routes, proxy.holds, token, metrics.exposition,
                                    options.metrics_without_token,
                                    lambda: {"routes": len(proxy.routes.routes),
                                             "websockets": proxy.websockets}),
                            warnings=proxy.fd_warnings, name="route API", **timeouts)
    api.listen_on(options.api_port or options.port + 1, options.api_ip)
    log.info("proxying on %s:%d, route API on %s:%d, at most %d client connections",
             options.ip or "*", options.port, options.api_ip,
             options.api_port or options.port + 1, options.max_connections)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    public.stop()
    api.stop()


def event_loop_factory():
    """uvloop where it is installed: its event loop makes the per-read cost
    of relaying (websockets above all) a fraction of asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    refuse_unsupported(argv)
    options = parse_args(argv)
    if options.max_connections < 0:
        sys.exit("chspawner-proxy: --max-connections: must be 0 (automatic) or more")
    fd_limit = raise_fd_limit()
    options.max_connections = options.max_connections or default_max_connections(fd_limit)
    level = {"warn": "WARNING"}.get(options.log_level, options.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s chspawner-proxy %(levelname)s "
                                            "%(message)s")
    if fd_limit < LOW_FD_LIMIT:
        log.warning("open-file limit %d (hard): room for about %d websockets; raise it "
                    "(systemd LimitNOFILE=, ulimit -Hn) to twice the clients expected",
                    fd_limit, default_max_connections(fd_limit))
    if options.pid_file:
        with open(options.pid_file, "w") as f:
            f.write(str(os.getpid()))
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(serve(options, os.environ.get("CONFIGPROXY_AUTH_TOKEN", "")))
    except OSError as error:  # e.g. the port is taken
        sys.exit(f"chspawner-proxy: {error}")
    except (BadTarget, BadPath) as error:
        sys.exit(f"chspawner-proxy: --default-target: {error}")


if __name__ == "__main__":
    main()
