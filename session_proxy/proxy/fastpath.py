"""The common request, relayed without tornado: a plain HTTP/1.1 request
without a body (GET, DELETE, OPTIONS...), on a routed path.

tornado's HTTP/1.1 connections cost some hundreds of Python calls per
request (a future per read, header objects, regular expressions): most of
the proxy's time per request. Here a client connection is a bare asyncio
protocol (under uvloop), its request heads are parsed by ``httptools``
(llhttp, Node's own parser, in C), the target's answer likewise, and the
bytes go on with one write per read: some tens of calls per request.

Everything else goes to tornado's server as it was, by handing the client
connection over with the bytes read so far (``handoff``), before any of
the request is answered: websocket upgrades (and with them the relay and
its copy-dropping), requests with a body, HEAD, HTTP/1.0, ``Expect``,
requests under a hold, paths with no route or that can't be routed (error
pages), heads that are malformed or too large (tornado refuses them as
before). A connection handed over stays with tornado.

The same limits hold as on tornado's path: the first request's headers
within ``--headers-timeout`` of the connection opening, each later one's
within ``--keep-alive-timeout`` of the previous answer; connections are
counted against ``--max-connections``; connections to targets are pooled
per route (``Route.fast_idle``) and closed with it; a pooled connection the
target closed just before use is retried once on a new one.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

import httptools
from tornado.httputil import responses

from session_proxy.proxy import pages
from session_proxy.proxy.routes import BadPath, Route, segments, strip_segments

log = logging.getLogger("session_proxy")

#: accept() and connect() errors that mean "no descriptor (or memory) for
#: a new socket now": wait for some to be freed, don't retry at once.
OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Per-connection headers (RFC 9110 7.6.1), never forwarded; as app.HOP_BY_HOP.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"expect"})
#: A request with one of these goes to tornado's path.
NOT_HERE = frozenset({b"transfer-encoding", b"upgrade", b"expect"})
X_FORWARDED = (b"x-forwarded-for", b"x-forwarded-port", b"x-forwarded-proto",
               b"x-forwarded-host")
#: tornado's largest request head (its max_header_size default): larger
#: ones are handed to tornado, which refuses them as it always did.
MAX_HEAD = 65536
#: Pipelined bytes held while a request is answered; beyond, reading pauses.
MAX_PENDING = 65536
#: Idle connections kept per route (as upstream.Upstreams).
MAX_IDLE = 64
LAST_CHUNK = b"0\r\n\r\n"
#: How often a connection waiting to be handed over checks that the answer
#: before has left (only while the client is slow to read it: rare).
DRAIN_POLL_S = 0.01


class ClientConnection(asyncio.Protocol):
    """One client connection: its requests, one at a time (pipelined ones
    wait their turn), until one must go to tornado.

    ``proxy`` is app.Proxy (routes, holds, options, counters);
    ``handoff(sock, address, data)`` gives the connection to tornado with
    ``data``, what was read of it and not yet answered."""

    def __init__(self, proxy: Any, handoff: Callable[[socket.socket, Any, bytes], None]) -> None:
        self.proxy, self.options, self.handoff_to = proxy, proxy.options, handoff
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.buffer = b""
        self.exchange: Exchange | None = None  # the request being answered
        self.closed = self.handed_off = self.paused = False
        self.parser = httptools.HttpRequestParser(self)
        self.url, self.headers, self.head_done = b"", [], False
        # The timeouts: one timer per connection, re-armed when it fires
        # early, instead of one timer per request.
        self.limit = self.options.headers_timeout / 1000
        self.waiting_since = self.loop.time()
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio's calls -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer
        remote = peer[0] if isinstance(peer, tuple) else "0.0.0.0"
        self.remote_ip = remote.encode("latin1")
        self.timer = self.loop.call_later(self.limit, self._check_timeout)

    def data_received(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        if self.exchange is None and not self.write_paused:
            self._next()
        elif len(self.buffer) > MAX_PENDING and not self.paused:  # (pipelined)
            self.paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        if self.handed_off:
            return  # tornado has it: counted there now
        self.proxy.fast.discard(self)
        if self.exchange is not None and self.exchange.upstream is not None:
            self.exchange.upstream.close()  # the client went: so does its request
        self.proxy.client_gone()

    def pause_writing(self) -> None:
        upstream = self.exchange.upstream if self.exchange is not None else None
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.closed or self.draining:
            return
        upstream = self.exchange.upstream if self.exchange is not None else None
        if upstream is not None and upstream.transport is not None and not upstream.lost:
            upstream.transport.resume_reading()
        elif self.exchange is None:  # the next request waited for the client to read
            if self.paused:
                self.paused = False
                self.transport.resume_reading()
            if self.buffer:
                self._next()

    write_paused = False  # the client is not reading what it is sent
    draining = False  # to be handed over once what was written has left

    # -- httptools' calls ------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        # Read now: llhttp forgets a message's flags once it is complete.
        parser = self.parser
        self.head_done, self.keep_alive = True, parser.should_keep_alive()
        self.method, self.version = parser.get_method(), parser.get_http_version()

    # -- requests ----------------------------------------------------------

    def _next(self) -> None:
        """Answer the request at the start of the buffer, once its head is in."""
        if self.draining:
            return
        buffer = self.buffer
        end = buffer.find(b"\n\r\n")
        bare = buffer.find(b"\n\n")  # bare LF line ends: tornado takes those
        if (0 <= bare and (end < 0 or bare < end)) or end == 0 or end > MAX_HEAD or (
                end > 0 and buffer[end - 1] != 13):
            return self._handoff()
        if end < 0:
            if len(buffer) > MAX_HEAD:
                self._handoff()
            return
        head_len = end + 3
        self.url, self.headers, self.head_done = b"", [], False
        try:
            self.parser.feed_data(buffer[:head_len])
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # malformed, an upgrade
            return self._handoff()
        if not self.head_done:
            return self._handoff()
        try:
            request = self._request()
        except Exception:  # a bug here must cost speed, not the request
            log.exception("fast path: handing the request to tornado's path")
            request = None
        if request is None:
            return self._handoff()
        self.buffer = buffer[head_len:]
        self.exchange = Exchange(self, *request)
        self.exchange.start()

    def _request(self) -> tuple[Route, bytes, str] | None:
        """The route, the request to send to its target and the path asked
        for, or None when the request is one for tornado's path."""
        if self.version != "1.1" or self.proxy.holds.holds:
            return None
        method = self.method
        if method in (b"HEAD", b"CONNECT"):
            return None
        try:
            path = self.url.decode("ascii")
            parts = segments(path)
        except (UnicodeDecodeError, BadPath):
            return None
        found = self.proxy.routes.match(parts)
        if found is None:
            return None
        prefix, route = found
        x_forward = self.options.x_forward
        out: list[tuple[bytes, bytes]] = []
        forwarded: dict[bytes, bytes] = {}
        host = connection = None
        length = False
        for name, value in self.headers:
            low = name.lower()
            if low in HOP_BY_HOP:
                if low in NOT_HERE:
                    return None
                if low == b"connection":
                    connection = value if connection is None else connection + b"," + value
                continue
            if low == b"content-length":
                if value.strip() != b"0":
                    return None
                length = True
            elif low == b"host":
                if host is not None:
                    return None  # tornado's path joins them; rare enough to leave there
                host = value
            elif x_forward and low in X_FORWARDED:
                before = forwarded.get(low)
                forwarded[low] = before + b"," + value if before else value
                continue
            out.append((name, value))
        if not length and method in (b"POST", b"PUT", b"PATCH"):
            return None  # tornado's path sends those with an empty chunked body
        if connection is not None:
            drop = {token.strip().lower() for token in connection.split(b",")} - {b""}
            if drop & {b"host", b"content-length"}:
                return None
            if drop - {b"close", b"keep-alive"}:
                out = [(name, value) for name, value in out if name.lower() not in drop]
                for name in drop:
                    forwarded.pop(name, None)
        target = route.target
        if host is None:
            host = f"{target.host}:{target.port}".encode("latin1")
            out.append((b"Host", host))
        if x_forward:
            after = host.rsplit(b"]", 1)[-1]
            port = host.rsplit(b":", 1)[1] if b":" in after else b"80"
            for key, name, value in ((b"x-forwarded-for", b"X-Forwarded-For", self.remote_ip),
                                     (b"x-forwarded-port", b"X-Forwarded-Port", port),
                                     (b"x-forwarded-proto", b"X-Forwarded-Proto", b"http"),
                                     (b"x-forwarded-host", b"X-Forwarded-Host", host)):
                before = forwarded.get(key)
                out.append((name, before + b"," + value if before else value))
        forward = path
        if not self.options.include_prefix and prefix:
            forward = strip_segments(path, len(prefix))
        lines = [method + b" " + (target.base + forward).encode() + b" HTTP/1.1"]
        lines += [name + b": " + value for name, value in out]
        return route, b"\r\n".join(lines) + b"\r\n\r\n", path

    def finished(self, exchange: "Exchange", keep: bool = True) -> None:
        """The answer to ``exchange`` is out: on to the next request."""
        self.exchange = None
        exchange.route.touch()
        if self.closed:
            return
        if not keep or not self.keep_alive:
            self.transport.close()
            return
        self.limit = self.options.keep_alive_timeout / 1000
        self.waiting_since = self.loop.time()
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        if self.buffer and not self.write_paused:
            self._next()

    def answer(self, exchange: "Exchange", code: int, body: bytes, content_type: str) -> None:
        """An answer made here (503 when the target can't be reached)."""
        if self.closed:
            return
        self.proxy.http_stats.answered(code)
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
                code, responses.get(code, "").encode(), content_type.encode("latin1"),
                len(body), body))
        self.finished(exchange)

    def cut(self, exchange: "Exchange") -> None:
        """Half an answer went out: the client must see the connection cut."""
        self.exchange = None
        if not self.closed:
            self.transport.close()

    # -- timeouts and handing over ------------------------------------------

    def _check_timeout(self) -> None:
        """Close a connection whose next request head is late (as tornado
        does: silently); while a request is answered the clock is stopped."""
        self.timer = None
        if self.closed or self.handed_off:
            return
        if self.exchange is not None:
            self.timer = self.loop.call_later(self.limit, self._check_timeout)
            return
        left = self.waiting_since + self.limit - self.loop.time()
        if left <= 0:
            self.transport.close()
            return
        self.timer = self.loop.call_later(left, self._check_timeout)

    def _handoff(self) -> None:
        """Give this connection to tornado's path, with the bytes of its
        request(s) not yet answered: once all that was written to it has
        left (aborting the transport drops what it still holds)."""
        transport = self.transport
        if transport.get_write_buffer_size():
            if not self.draining:
                self.draining = True
                transport.pause_reading()
                self.loop.call_later(DRAIN_POLL_S, self._drained)
            return
        try:
            sock = transport.get_extra_info("socket")
            dup = socket.fromfd(sock.fileno(), sock.family, sock.type)
        except OSError as error:  # no descriptor for the dup
            self.proxy.connect_warnings.warn(f"handing a request over: {error}")
            transport.abort()
            return
        self.handed_off = True
        self.proxy.fast.discard(self)
        transport.pause_reading()
        transport.abort()  # closes our descriptor; the dup keeps the connection
        self.handoff_to(dup, self.peer, self.buffer)
        self.buffer = b""


    def _drained(self) -> None:
        if self.closed:
            return
        if self.transport.get_write_buffer_size():
            self.loop.call_later(DRAIN_POLL_S, self._drained)
            return
        self.draining = False
        self._handoff()


class Exchange:
    """One request to a target and its answer."""

    __slots__ = ("client", "route", "request", "path", "upstream", "reused", "started")

    def __init__(self, client: ClientConnection, route: Route, request: bytes,
                 path: str) -> None:
        self.client, self.route, self.request, self.path = client, route, request, path
        self.upstream: Upstream | None = None
        self.reused = self.started = False

    def start(self) -> None:
        self.route.touch()
        idle = self.route.fast_idle
        while idle:
            upstream = idle.pop()
            if not upstream.lost:
                self.reused = True
                upstream.send(self)
                return
        self._keep(asyncio.ensure_future(self.connect()))

    async def connect(self) -> None:
        """Open a new connection to the target and send the request on it."""
        proxy, route = self.client.proxy, self.route
        loop = asyncio.get_running_loop()
        target = route.target
        try:
            _, upstream = await asyncio.wait_for(
                loop.create_connection(lambda: Upstream(route, proxy.options.timeout),
                                       target.host, target.port),
                proxy.upstreams.connect_timeout)
        except (OSError, asyncio.TimeoutError) as error:
            if getattr(error, "errno", None) in OUT_OF_FDS:  # one line a minute, not one a request
                proxy.connect_warnings.warn(f"connecting to targets: {error}")
            else:
                log.warning("%s: %s", route.data.get("target"), error or "timed out")
            return await self.fail(503)
        if self.client.closed:
            upstream.close()
            return
        upstream.send(self)

    def failed(self) -> None:
        """The target's connection broke (or it timed out) before the answer was all out."""
        self.upstream = None
        if self.client.closed:
            return
        if self.started:
            self.client.cut(self)
        elif self.reused:  # closed by the target just before: once more on a new one
            self.reused = False
            self._keep(asyncio.ensure_future(self.connect()))
        else:
            self._keep(asyncio.ensure_future(self.fail(503)))

    async def fail(self, code: int) -> None:
        self.client.proxy.http_stats.upstream_errors += 1
        body, content_type = await pages.error_page(
            self.client.options.error_target, code, self.path)
        self.client.answer(self, code, body, content_type)

    def _keep(self, task: asyncio.Future) -> None:
        tasks = self.client.proxy.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)


class Upstream(asyncio.Protocol):
    """A connection to a route's target, carrying one request at a time;
    pooled on the route (``Route.fast_idle``) between requests. While
    idle it is still read, so a close by the target is seen at once."""

    def __init__(self, route: Route, timeout_ms: int | None) -> None:
        self.route = route
        self.timeout = timeout_ms / 1000 if timeout_ms else None
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.lost = False
        self.out: list[bytes] = []  # for the client, from the current read
        self.timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.reason, self.headers = b"", []
        self.interim = self.complete = self.junk = False
        self.rechunk = self.until_close = self.keep = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, exchange: Exchange) -> None:
        self._reset()
        self.exchange = exchange
        exchange.upstream = self
        self.transport.write(exchange.request)
        if self.timeout is not None:  # --timeout: for the answer's headers
            self.timer = asyncio.get_running_loop().call_later(self.timeout, self._timed_out)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _timed_out(self) -> None:
        self.timer = None
        log.warning("%s: no answer in %g s", self.route.data.get("target"), self.timeout)
        self.close()

    # -- asyncio's calls -------------------------------------------------

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # bytes from an idle target: not fit for reuse
            return self.close()
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as error:  # (or a 101)
            log.warning("%s: bad answer: %s", self.route.data.get("target"), error)
            self._flush(exchange)
            return self.close()
        self._flush(exchange)
        if self.complete:
            self._done(exchange)

    def _flush(self, exchange: Exchange) -> None:
        if self.out and not exchange.client.closed:
            exchange.client.transport.write(b"".join(self.out))
        self.out.clear()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            return
        if self.until_close and exchange.started:  # its body ran to the close: all there
            self.out.append(LAST_CHUNK)
            self._flush(exchange)
            exchange.upstream = None
            exchange.client.finished(exchange)
        else:
            exchange.failed()

    def _done(self, exchange: Exchange) -> None:
        """The whole answer is out: back to the pool, or closed."""
        self.exchange = None
        exchange.upstream = None
        route = self.route
        if (not self.keep or self.junk or self.lost or route.retired
                or len(route.fast_idle) >= MAX_IDLE):
            self.close()
        else:
            self.transport.resume_reading()  # (paused if the client was slow)
            route.fast_idle.append(self)
        exchange.client.finished(exchange)

    # -- httptools' calls ------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            self.junk = True  # a second answer to one request

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        code = self.parser.get_status_code()
        if code < 200:  # an interim answer: read on to the real one
            self.interim = True
            self.reason, self.headers = b"", []
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.exchange.client.proxy.http_stats.answered(code)
        drop = HOP_BY_HOP
        connection = b""
        length = chunked = False
        for name, value in self.headers:
            low = name.lower()
            if low == b"connection":
                connection += b"," + value.lower()
            elif low == b"content-length":
                length = True
            elif low == b"transfer-encoding":
                chunked = True
        tokens = {token.strip() for token in connection.split(b",")} - {b""}
        if tokens - {b"close", b"keep-alive"}:
            drop = drop | tokens
        lines = [b"HTTP/1.1 %d %s" % (code, self.reason)]
        lines += [name + b": " + value for name, value in self.headers
                  if name.lower() not in drop]
        bodyless = code in (204, 304)
        self.rechunk = not length and not bodyless
        self.until_close = self.rechunk and not chunked
        if self.rechunk:  # as tornado's path: a body of unknown length goes chunked
            lines.append(b"Transfer-Encoding: chunked")
        if self.parser.get_http_version() == "1.1":
            keep = b"close" not in tokens
        else:
            keep = b"keep-alive" in tokens
        self.keep = keep and (length or chunked or bodyless)
        self.out.append(b"\r\n".join(lines) + b"\r\n\r\n")
        self.exchange.started = True

    def on_body(self, body: bytes) -> None:
        self.exchange.client.proxy.http_stats.to_client += len(body)
        if self.rechunk:
            self.out.append(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.rechunk:
            self.out.append(LAST_CHUNK)
        self.complete = True


def accept(proxy: Any, handoff: Callable[[socket.socket, Any, bytes], None],
           sock: socket.socket, address: Any) -> None:
    """Serve a newly accepted client connection here (counted at once)."""
    connection = ClientConnection(proxy, handoff)
    proxy.fast.add(connection)
    sock.setblocking(False)
    task = asyncio.ensure_future(
        asyncio.get_running_loop().connect_accepted_socket(lambda: connection, sock))

    def started(task: asyncio.Future) -> None:
        proxy.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("a client connection: %s", task.exception())
            sock.close()
            proxy.fast.discard(connection)
            proxy.client_gone()

    proxy.tasks.add(task)
    task.add_done_callback(started)
