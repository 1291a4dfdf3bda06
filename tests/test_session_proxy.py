"""chspawner-proxy, the installed console command, in front of real aiohttp
backends: configurable-http-proxy's route API, routing, streaming,
websockets, holds, the security rules, and a real JupyterHub driving it."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import subprocess
import time

import aiohttp
import pytest
from aiohttp import web

from tests.harness.env import VENV_BIN
from tests.harness.hub import Hub, kernel_in_server, spawn, stop_server
from tests.harness.net import free_port
from tests.harness.servers import PlainServer
from tests.harness.wait import until, wait_listening

PROXY = VENV_BIN / "chspawner-proxy"
BIG = 50 * 1024 * 1024
NAME = web.AppKey("name", str)
HEADERS_SEEN = web.AppKey("headers_seen", asyncio.Event)


class Proxy:
    """chspawner-proxy on 127.0.0.1 with a token; ``api`` calls its REST API."""

    def __init__(self, *args: str) -> None:
        self.port, self.api_port = free_port(), free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"http://127.0.0.1:{self.api_port}/api"
        self.proc = subprocess.Popen(
            [str(PROXY), "--ip", "127.0.0.1", "--port", str(self.port),
             "--api-ip", "127.0.0.1", "--api-port", str(self.api_port), *args],
            env={**os.environ, "CONFIGPROXY_AUTH_TOKEN": self.token},
            stderr=subprocess.PIPE, text=True)
        for port in (self.port, self.api_port):
            wait_listening(port, self.proc, self.proc.stderr.read, "the proxy", timeout=30)

    async def api(self, method: str, path: str, body: dict | None = None,
                  token: str | None = None) -> tuple[int, object]:
        headers = {"Authorization": f"token {self.token if token is None else token}"}
        async with aiohttp.ClientSession() as http:
            async with http.request(method, self.api_url + path, json=body,
                                    headers=headers) as r:
                text = await r.text()
                is_json = r.content_type == "application/json"
                return r.status, (__import__("json").loads(text) if is_json else text)

    async def route(self, path: str, target: str, **data) -> None:
        status, _ = await self.api("POST", f"/routes{path}", {"target": target, **data})
        assert status == 201

    def rss_peak_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def proxy():
    proxy = Proxy()
    yield proxy
    proxy.stop()


# -- backends --------------------------------------------------------------

async def echo(request: web.Request) -> web.Response:
    """What the backend saw: method, path, the headers a proxy sets."""
    body = await request.read()
    return web.json_response({
        "name": request.app[NAME], "method": request.method, "path": request.path_qs,
        "host": request.headers.get("Host"), "length": len(body),
        **{k: v for k, v in request.headers.items() if k.lower().startswith("x-forwarded")}})


async def big_download(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Length": str(BIG)})
    await response.prepare(request)
    block = b"x" * (1024 * 1024)
    for _ in range(BIG // len(block)):
        await response.write(block)
    return response


async def count_upload(request: web.Request) -> web.Response:
    total = 0
    async for chunk in request.content.iter_chunked(1 << 20):
        total += len(chunk)
    return web.json_response({"received": total})


async def event_stream(request: web.Request) -> web.StreamResponse:
    """Headers now, the body only once the client has seen them (an event
    stream): a proxy that waited for the body would never answer."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await request.app[HEADERS_SEEN].wait()
    await response.write(b"data: hello\n\n")
    await response.write_eof()
    return response


async def headers_seen(request: web.Request) -> web.Response:
    request.app[HEADERS_SEEN].set()
    return web.Response(text="ok")


async def no_content(request: web.Request) -> web.Response:
    return web.Response(status=204)


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.data == "vanish":
            # The server process dies: no close frame, the connection just goes.
            request.transport.abort()
            break
        if message.data.startswith("burst "):  # a kernel printing fast
            for n in range(int(message.data.split()[1])):
                await ws.send_str(str(n))
            continue
        if message.data.startswith("send "):  # messages FIRST..LAST (a replay)
            first, last = map(int, message.data.split()[1:])
            for n in range(first, last + 1):
                await ws.send_str(str(n))
            continue
        await ws.send_str(message.data)
    return ws


@contextlib.asynccontextmanager
async def backend(name: str = "a"):
    """An aiohttp server on a free port; yields its URL."""
    app = web.Application(client_max_size=2 * BIG)
    app[NAME] = name
    app.router.add_get("/{p:.*}/big", big_download)
    app.router.add_post("/{p:.*}/upload", count_upload)
    app.router.add_get("/{p:.*}/ws", ws_echo)
    app.router.add_get("/{p:.*}/channels", ws_echo)  # as a kernel's websocket
    app.router.add_get("/{p:.*}/events", event_stream)
    app.router.add_get("/{p:.*}/headers-seen", headers_seen)
    app.router.add_route("*", "/{p:.*}/nothing", no_content)
    app[HEADERS_SEEN] = asyncio.Event()
    app.router.add_route("*", "/{p:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def get(url: str, **kwargs) -> tuple[int, object]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url, **kwargs) as r:
            if r.content_type == "application/json":
                return r.status, await r.json()
            return r.status, await r.text()


async def raw_request(port: int, data: bytes) -> bytes:
    """Send bytes as they are (for request lines no HTTP client writes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    answer = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    return answer


# -- the route API -----------------------------------------------------------

def test_route_api_add_get_delete(proxy):
    async def scenario():
        await proxy.route("/user/alice", "http://127.0.0.1:1", jupyterhub=True, user="alice")
        status, routes = await proxy.api("GET", "/routes")
        assert status == 200
        assert routes["/user/alice"]["target"] == "http://127.0.0.1:1"
        assert routes["/user/alice"]["user"] == "alice"
        assert routes["/user/alice"]["jupyterhub"] is True
        assert routes["/user/alice"]["last_activity"].endswith("Z")
        status, one = await proxy.api("GET", "/routes/user/alice")
        assert (status, one["user"]) == (200, "alice")
        assert (await proxy.api("DELETE", "/routes/user/alice"))[0] == 204
        assert (await proxy.api("DELETE", "/routes/user/alice"))[0] == 404
        assert (await proxy.api("GET", "/routes/user/alice"))[0] == 404
        assert "/user/alice" not in (await proxy.api("GET", "/routes"))[1]
    asyncio.run(scenario())


def test_route_api_refuses_a_wrong_or_missing_token(proxy):
    async def scenario():
        assert (await proxy.api("GET", "/routes", token="wrong"))[0] == 403
        assert (await proxy.api("POST", "/routes/x", {"target": "http://127.0.0.1:1"},
                                token=""))[0] == 403
        assert (await proxy.api("POST", "/holds/x", {"timeout": 5}, token="nope"))[0] == 403
        assert "/x" not in (await proxy.api("GET", "/routes"))[1]
        assert (await proxy.api("GET", "/holds"))[1] == {}
    asyncio.run(scenario())


def test_route_api_refuses_bad_input(proxy):
    async def scenario():
        assert (await proxy.api("POST", "/routes/x", {"target": "file:///etc"}))[0] == 400
        assert (await proxy.api("POST", "/routes/x", {"nothing": 1}))[0] == 400
        # (written raw: HTTP clients resolve dot segments before sending)
        body = b'{"target": "http://127.0.0.1:1"}'
        answer = await raw_request(proxy.api_port, (
            f"POST /api/routes/user/a/../b HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: token {proxy.token}\r\nContent-Length: {len(body)}\r\n"
            f"\r\n").encode() + body)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert (await proxy.api("GET", "/routes?inactive_since=yesterday"))[0] == 400
    asyncio.run(scenario())


def test_inactive_since_lists_only_routes_idle_since_then(proxy):
    async def scenario():
        async with backend() as url:
            await proxy.route("/idle", url)
            await proxy.route("/busy", url)
            status, routes = await proxy.api("GET", "/routes")
            cutoff = max(routes["/idle"]["last_activity"], routes["/busy"]["last_activity"])
            # Activity on /busy after the cutoff (times have millisecond steps).
            deadline = time.monotonic() + 5
            while (await proxy.api("GET", "/routes"))[1]["/busy"]["last_activity"] <= cutoff:
                assert time.monotonic() < deadline
                assert (await get(proxy.url + "/busy/x"))[0] == 200
            status, idle = await proxy.api("GET", f"/routes?inactive_since={cutoff}")
            assert status == 200
            assert "/busy" not in idle
            await proxy.api("DELETE", "/routes/idle")
            await proxy.api("DELETE", "/routes/busy")
    asyncio.run(scenario())


# -- routing -------------------------------------------------------------------

def test_longest_prefix_wins_on_whole_segments(proxy):
    async def scenario():
        async with backend("short") as short, backend("long") as long_:
            await proxy.route("/user", short)
            await proxy.route("/user/alice", long_)
            assert (await get(proxy.url + "/user/alice/lab?x=1"))[1]["name"] == "long"
            assert (await get(proxy.url + "/user/alice"))[1]["name"] == "long"
            assert (await get(proxy.url + "/user/alicex/lab"))[1]["name"] == "short"
            assert (await get(proxy.url + "/user/%61lice/lab"))[1]["name"] == "long"
            status, seen = await get(proxy.url + "/user/alice/lab?x=1")
            assert seen["path"] == "/user/alice/lab?x=1"  # the prefix is kept
            await proxy.api("DELETE", "/routes/user")
            await proxy.api("DELETE", "/routes/user/alice")
    asyncio.run(scenario())


def test_no_route_no_default_is_404(proxy):
    assert asyncio.run(get(proxy.url + "/nowhere/at/all"))[0] == 404


def test_x_forwarded_headers_and_host_kept(proxy):
    async def scenario():
        async with backend() as url:
            await proxy.route("/fwd", url)
            status, seen = await get(proxy.url + "/fwd/x",
                                     headers={"X-Forwarded-For": "10.0.0.9"})
            await proxy.api("DELETE", "/routes/fwd")
        return seen
    seen = asyncio.run(scenario())
    assert seen["host"] == f"127.0.0.1:{proxy.port}"  # not the target's: no changeOrigin
    assert seen["X-Forwarded-For"] == "10.0.0.9,127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Port"] == str(proxy.port)
    assert seen["X-Forwarded-Host"] == f"127.0.0.1:{proxy.port}"


def test_connections_the_backend_closed_while_idle_are_not_reused(proxy):
    """A backend that ends every kept-alive connection once it is idle (as
    any backend does after its keep-alive timeout): the proxy's next
    requests, one with a body (which can't be retried), still go through."""
    closed = []

    async def answer_then_close(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # kept alive by its headers, closed all the same
        closed.append(True)

    async def scenario():
        server = await asyncio.start_server(answer_then_close, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        await proxy.route("/idle", f"http://127.0.0.1:{port}")
        async with aiohttp.ClientSession() as http:
            async def fetch(method: str, **kwargs) -> int:
                async with http.request(method, f"{proxy.url}/idle/x", **kwargs) as r:
                    return r.status
            first = await asyncio.gather(*(fetch("GET") for _ in range(8)))
            async with asyncio.timeout(10):
                while len(closed) < 8:  # all eight pooled connections are now dead
                    await asyncio.sleep(0.01)
            then = [await fetch("POST", data=b"body"), await fetch("GET")]
        server.close()
        return first, then

    first, then = asyncio.run(scenario())
    assert first == [200] * 8 and then == [200, 200], (first, then)


def test_default_target_and_error_target():
    async def scenario():
        async with backend("default") as default, backend("errors") as errors:
            proxy = Proxy("--default-target", default, "--error-target", errors + "/hub/error")
            try:
                status, seen = await get(proxy.url + "/anything/here")
                assert (status, seen["name"]) == (200, "default")
                assert "/" in (await proxy.api("GET", "/routes"))[1]
                await proxy.api("DELETE", "/routes/")
                # No route now: the page comes from the error target, with the code.
                status, page = await get(proxy.url + "/lost/page")
                assert status == 404
                assert page["name"] == "errors"
                assert page["path"] == "/hub/error/404?url=%2Flost%2Fpage"
                # A target that refuses connections: 503, the same way.
                await proxy.route("/dead", f"http://127.0.0.1:{free_port()}")
                status, page = await get(proxy.url + "/dead/x")
                assert (status, page["path"]) == (503, "/hub/error/503?url=%2Fdead%2Fx")
            finally:
                proxy.stop()
    asyncio.run(scenario())


# -- streaming -------------------------------------------------------------------

def test_50_mb_up_and_down_stream_through_without_buffering():
    proxy = Proxy()

    async def scenario():
        async with backend() as url:
            await proxy.route("/s", url)
            before = proxy.rss_peak_kib()
            async with aiohttp.ClientSession() as http:
                async with http.get(proxy.url + "/s/big") as r:
                    received = 0
                    async for chunk in r.content.iter_chunked(1 << 20):
                        received += len(chunk)
                assert received == BIG

                async def body():
                    block = b"y" * (1024 * 1024)
                    for _ in range(BIG // len(block)):
                        yield block
                async with http.post(proxy.url + "/s/upload", data=body()) as r:
                    assert (await r.json())["received"] == BIG
            return before, proxy.rss_peak_kib()
    try:
        before, after = asyncio.run(scenario())
    finally:
        proxy.stop()
    # 50 MB went each way; the proxy's peak resident size grew by far less.
    assert after - before < 15 * 1024, (before, after)


# -- websockets ---------------------------------------------------------------------

def test_answers_with_and_without_a_body_and_a_stream_with_its_headers_first(proxy):
    async def scenario():
        async with backend() as url:
            await proxy.route("/user/sse", url)
            base = f"{proxy.url}/user/sse"
            async with aiohttp.ClientSession() as http:
                async with http.head(f"{base}/x") as r:
                    head = r.status, int(r.headers["Content-Length"]), await r.read()
                async with http.get(f"{base}/nothing") as r:
                    empty = r.status, await r.read()
                async with http.get(f"{base}/x") as r:
                    small = r.status, (await r.json())["path"]
                async with asyncio.timeout(10):
                    async with http.get(f"{base}/events") as r:
                        streamed = [r.status, r.headers["Content-Type"]]
                        # The headers came before any of the body: now the body.
                        async with http.get(f"{base}/headers-seen") as seen:
                            assert seen.status == 200
                        streamed.append(await r.read())
            return head, empty, small, streamed
    head, empty, small, streamed = asyncio.run(scenario())
    assert head[0] == 200 and head[1] > 0 and head[2] == b""
    assert empty == (204, b"")
    assert small == (200, "/user/sse/x")
    assert streamed == [200, "text/event-stream", b"data: hello\n\n"]


async def read_to_close(port: int, data: bytes) -> bytes:
    """Send bytes as they are; everything the proxy sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


def test_pipelined_requests_are_answered_in_order_across_both_paths(proxy):
    """Plain requests take the fast path; one with a body is handed to
    tornado's with the bytes after it: all three answers, in order, and a
    request that says close is answered before the connection closes."""
    async def scenario():
        async with backend() as url:
            await proxy.route("/pipe", url)
            host = f"Host: 127.0.0.1:{proxy.port}\r\n"
            pipelined = await read_to_close(proxy.port, (
                f"GET /pipe/1 HTTP/1.1\r\n{host}\r\n"
                f"POST /pipe/2 HTTP/1.1\r\n{host}Content-Length: 3\r\n\r\nabc"
                f"GET /pipe/3 HTTP/1.1\r\n{host}Connection: close\r\n\r\n").encode())
            closing = await read_to_close(
                proxy.port, f"GET /pipe/4 HTTP/1.1\r\n{host}Connection: close\r\n\r\n".encode())
            await proxy.api("DELETE", "/routes/pipe")
        return pipelined.decode(), closing.decode()
    pipelined, closing = asyncio.run(scenario())
    assert pipelined.count("HTTP/1.1 200 ") == 3, pipelined
    places = [pipelined.index(f'"path": "/pipe/{n}"') for n in (1, 2, 3)]
    assert places == sorted(places), pipelined
    assert '"method": "POST", "path": "/pipe/2"' in pipelined and '"length": 3' in pipelined
    assert closing.startswith("HTTP/1.1 200 ") and '"path": "/pipe/4"' in closing


def test_no_include_prefix_and_no_x_forward_alike_on_both_paths():
    """--no-include-prefix and --no-x-forward, for a plain GET (fast path)
    and a POST (tornado's path): the same path and headers reach the target."""
    async def scenario(proxy: Proxy):
        async with backend() as url:
            await proxy.route("/pre/fix", url + "/base")
            headers = {"X-Forwarded-For": "10.0.0.9"}
            async with aiohttp.ClientSession() as http:
                seen = []
                for method in ("GET", "POST"):
                    async with http.request(method, f"{proxy.url}/pre/fix/a/b/?x=1",
                                            headers=headers,
                                            data=None if method == "GET" else b"body") as r:
                        seen.append(await r.json())
        return seen

    proxy = Proxy("--no-include-prefix", "--no-x-forward")
    try:
        seen = asyncio.run(scenario(proxy))
    finally:
        proxy.stop()
    for got in seen:
        assert got["path"] == "/base/a/b/?x=1", seen
        assert got["X-Forwarded-For"] == "10.0.0.9" and "X-Forwarded-Proto" not in got, seen
    assert [got["method"] for got in seen] == ["GET", "POST"]


def test_a_target_answering_nonsense_gets_the_client_a_503(proxy):
    """Not HTTP, or a 101 to a plain GET: 503, and the next request is fine."""
    answers = {b"/junk/nonsense": b"SSH-2.0-OpenSSH\r\n\r\n",
               b"/junk/switch": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n"
                                b"Connection: Upgrade\r\n\r\n",
               b"/junk/ok": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"}

    async def target(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(answers[head.split()[1]])
        await writer.drain()
        writer.close()

    async def scenario():
        server = await asyncio.start_server(target, "127.0.0.1", 0)
        await proxy.route("/junk", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        got = [await get(f"{proxy.url}/junk/{path}") for path in ("nonsense", "switch", "ok")]
        server.close()
        await proxy.api("DELETE", "/routes/junk")
        return [status for status, _ in got]
    assert asyncio.run(scenario()) == [503, 503, 200]


def test_a_big_answer_then_a_pipelined_request_for_tornado_arrive_whole(proxy):
    """A big answer to a client with a small receive buffer, and a POST
    pipelined after it (for tornado's path): both arrive whole, the
    connection is handed over only once all of the answer has left (see
    also test_proxy_fastpath.py)."""
    body = b"y" * (4 << 20)

    async def target(reader, writer):
        with contextlib.suppress(asyncio.IncompleteReadError):  # (the proxy closes it)
            while head := await reader.readuntil(b"\r\n\r\n"):
                if head.startswith(b"POST"):
                    await reader.readexactly(4)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\npost")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))
                await writer.drain()

    async def scenario():
        server = await asyncio.start_server(target, "127.0.0.1", 0)
        await proxy.route("/drain", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", proxy.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /drain/big HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"POST /drain/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                     b"Connection: close\r\n\r\nbody")
        async with asyncio.timeout(30):
            answers = await reader.read()
        writer.close()
        server.close()
        await proxy.api("DELETE", "/routes/drain")
        return answers
    answers = asyncio.run(scenario())
    assert answers.count(b"HTTP/1.1 200 OK") == 2, len(answers)
    assert body in answers and answers.endswith(b"post"), len(answers)


def test_answers_of_unknown_length_go_chunked_and_a_silent_target_times_out():
    """A target's answer that runs until it closes, or comes chunked, reaches
    the client chunked on a connection that stays open; with --timeout, a
    target that never answers gets the client a 503 in time."""
    answers = {b"/len/close": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close",
               b"/len/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"}

    async def target(reader, writer):
        while head := await reader.readuntil(b"\r\n\r\n"):
            answer = answers.get(head.split()[1])
            if answer is None:  # /len/silent: never a word
                await reader.read()
                break
            writer.write(answer)
            if b"close" in answer:
                break
        writer.close()

    async def scenario(proxy: Proxy):
        server = await asyncio.start_server(target, "127.0.0.1", 0)
        await proxy.route("/len", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        got = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
            for path in ("close", "chunked", "close"):
                async with http.get(f"{proxy.url}/len/{path}") as r:
                    got.append((r.status, r.headers.get("Transfer-Encoding"), await r.read()))
            began = time.monotonic()
            async with http.get(f"{proxy.url}/len/silent") as r:
                got.append((r.status, round(time.monotonic() - began)))
        server.close()
        return got

    proxy = Proxy("--timeout", "500")
    try:
        got = asyncio.run(scenario(proxy))
    finally:
        proxy.stop()
    assert got[:3] == [(200, "chunked", b"until close"), (200, "chunked", b"hello world"),
                       (200, "chunked", b"until close")], got
    assert got[3][0] == 503 and got[3][1] < 5, got


@contextlib.asynccontextmanager
async def websocket_through(proxy: Proxy, prefix: str):
    """A websocket to a backend's ws_echo, through a route at ``prefix``."""
    async with backend() as url:
        await proxy.route(prefix, url)
        try:
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(f"{proxy.url}{prefix}/ws") as ws:
                    yield ws
        finally:
            await proxy.api("DELETE", f"/routes{prefix}")


def test_websocket_echo(proxy):
    async def scenario():
        async with websocket_through(proxy, "/ws-user") as ws:
            for text in ("hello", "x" * 70000, "é" * 10):
                await ws.send_str(text)
                assert (await ws.receive_str(timeout=10)) == text
    asyncio.run(scenario())


def test_a_burst_of_small_messages_arrives_whole_and_in_order(proxy):
    """The relay lets a burst gather between reads: nothing may be lost,
    reordered or cut, and a lone message after it still comes back."""
    async def scenario():
        async with websocket_through(proxy, "/ws-burst") as ws:
            await ws.send_str("burst 20000")
            received = [await ws.receive_str(timeout=10) for _ in range(20000)]
            await ws.send_str("after")
            return received, await ws.receive_str(timeout=10)
    received, after = asyncio.run(scenario())
    assert received == [str(n) for n in range(20000)]
    assert after == "after"


def test_backend_vanishing_closes_the_client_websocket_with_1012(proxy):
    async def scenario():
        async with websocket_through(proxy, "/ws-gone") as ws:
            await ws.send_str("still there?")
            assert await ws.receive_str(timeout=10) == "still there?"
            await ws.send_str("vanish")
            message = await ws.receive(timeout=10)
            assert message.type == aiohttp.WSMsgType.CLOSE, message
            assert ws.close_code == 1012
    asyncio.run(scenario())


def test_after_a_lost_backend_no_kernel_message_reaches_the_client_twice(proxy):
    """A server killed between sending a kernel message and recording it as
    sent has its successor send it again: the proxy, which knows what the
    client got at that kernel websocket URL, drops the copies -- also after
    a relay that died before sending anything. Another URL (another client
    session) gets everything, and so does a websocket that is not a
    kernel's (where two identical messages may well be two messages)."""
    async def numbers(ws, last: int) -> list[int]:
        got: list[int] = []
        while not got or got[-1] != last:
            got.append(int(await ws.receive_str(timeout=10)))
        return got

    async def vanish(ws) -> None:
        await ws.send_str("vanish")
        assert (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.CLOSE

    async def resume(http, url: str) -> tuple[list[int], list[int]]:
        """Numbers 1..5, the backend vanishes, the next one dies at once,
        the one after resumes from 3."""
        async with http.ws_connect(url) as ws:
            await ws.send_str("send 1 5")
            before = await numbers(ws, 5)
            await vanish(ws)
        async with http.ws_connect(url) as ws:
            await vanish(ws)
        async with http.ws_connect(url) as ws:
            await ws.send_str("send 3 8")
            return before, await numbers(ws, 8)

    async def scenario():
        async with backend() as url:
            await proxy.route("/ws-again", url)
            try:
                async with aiohttp.ClientSession() as http:
                    kernel = f"{proxy.url}/ws-again/api/kernels/k1/channels"
                    session = await resume(http, f"{kernel}?session_id=one")
                    async with http.ws_connect(f"{kernel}?session_id=two") as ws:
                        await ws.send_str("send 3 5")
                        other_session = await numbers(ws, 5)
                    terminal = await resume(http, f"{proxy.url}/ws-again/ws?session_id=one")
            finally:
                await proxy.api("DELETE", "/routes/ws-again")
            return session, other_session, terminal
    session, other_session, terminal = asyncio.run(scenario())
    assert session == ([1, 2, 3, 4, 5], [6, 7, 8])
    assert other_session == [3, 4, 5]
    assert terminal == ([1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8])


# -- holds ---------------------------------------------------------------------------

def test_a_held_request_waits_then_reaches_the_new_route(proxy):
    async def scenario():
        async with backend("old") as old, backend("new") as new:
            await proxy.route("/user/mover", old)
            assert (await proxy.api("POST", "/holds/user/mover", {"timeout": 30}))[0] == 201
            # JupyterHub notices the server died and drops its route: still held.
            await proxy.api("DELETE", "/routes/user/mover")
            waiting = asyncio.ensure_future(get(proxy.url + "/user/mover/api/status"))
            async with aiohttp.ClientSession() as http:
                ws_waiting = asyncio.ensure_future(http.ws_connect(proxy.url + "/user/mover/ws"))
                deadline = time.monotonic() + 10
                while (await proxy.api("GET", "/holds"))[1]["/user/mover"]["waiting"] < 2:
                    assert time.monotonic() < deadline, "the requests did not wait"
                    await asyncio.sleep(0.02)
                assert not waiting.done() and not ws_waiting.done()
                await proxy.route("/user/mover", new)   # the session is back, elsewhere
                status, seen = await asyncio.wait_for(waiting, 10)
                assert (status, seen["name"]) == (200, "new")
                ws = await asyncio.wait_for(ws_waiting, 10)
                await ws.send_str("moved")
                assert await ws.receive_str(timeout=10) == "moved"
                await ws.close()
            assert (await proxy.api("GET", "/holds"))[1] == {}
            await proxy.api("DELETE", "/routes/user/mover")
    asyncio.run(scenario())


def test_a_hold_that_times_out_answers_503_with_the_reason(proxy):
    async def scenario():
        async with backend() as url:
            await proxy.route("/user/slow", url)
            await proxy.api("POST", "/holds/user/slow", {"timeout": 0.5})
            started = time.monotonic()
            status, page = await get(proxy.url + "/user/slow/lab")
            assert status == 503
            assert "session /user/slow is moving and did not come back within 0.5 s" in page
            assert time.monotonic() - started >= 0.4
            # Expired: gone from the list, requests go to the route again.
            assert (await proxy.api("GET", "/holds"))[1] == {}
            assert (await get(proxy.url + "/user/slow/lab"))[0] == 200
            await proxy.api("DELETE", "/routes/user/slow")
    asyncio.run(scenario())


def test_deleting_a_hold_releases_waiters_to_the_current_route(proxy):
    async def scenario():
        async with backend("here") as url:
            await proxy.route("/user/stay", url)
            await proxy.api("POST", "/holds/user/stay", {})
            status, holds = await proxy.api("GET", "/holds")
            assert holds["/user/stay"]["timeout"] == 30
            waiting = asyncio.ensure_future(get(proxy.url + "/user/stay/x"))
            deadline = time.monotonic() + 10
            while (await proxy.api("GET", "/holds"))[1]["/user/stay"]["waiting"] < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            assert (await proxy.api("DELETE", "/holds/user/stay"))[0] == 204
            status, seen = await asyncio.wait_for(waiting, 10)
            assert (status, seen["name"]) == (200, "here")
            assert (await proxy.api("DELETE", "/holds/user/stay"))[0] == 404
            await proxy.api("DELETE", "/routes/user/stay")
    asyncio.run(scenario())


# -- security ---------------------------------------------------------------------------

def test_a_request_cannot_pick_its_target(proxy):
    async def scenario():
        async with backend("alice") as alice, backend("bob") as bob:
            await proxy.route("/user/alice", alice)
            await proxy.route("/user/bob", bob)
            bob_port = bob.rsplit(":", 1)[1]
            # Absolute-form request line naming bob's server: refused.
            answer = await raw_request(proxy.port, (
                f"GET http://127.0.0.1:{bob_port}/user/bob/x HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{bob_port}\r\n\r\n").encode())
            assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
            # A Host header naming bob's server does not route: the path does.
            status, seen = await get(proxy.url + "/user/alice/x",
                                     headers={"Host": f"127.0.0.1:{bob_port}"})
            assert seen["name"] == "alice"
            # Dot segments can't climb out of alice's prefix into bob's.
            for path in ("/user/alice/../bob/x", "/user/alice/%2e%2e/bob/x",
                         "/user/alice/./../bob/"):
                answer = await raw_request(proxy.port, (
                    f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").encode())
                assert answer.startswith(b"HTTP/1.1 400"), (path, answer[:200])
                assert b'"bob"' not in answer
            await proxy.api("DELETE", "/routes/user/alice")
            await proxy.api("DELETE", "/routes/user/bob")
    asyncio.run(scenario())


def test_tls_flags_are_refused_with_one_line():
    result = subprocess.run([str(PROXY), "--ssl-key", "k.pem", "--port", "1"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "chspawner-proxy: --ssl-key: TLS is not supported: terminate TLS in front of the proxy"]


# -- health and metrics -----------------------------------------------------------------

def test_health_without_a_token_and_metrics_with_one(proxy):
    async def scenario():
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{proxy.api_port}/health") as r:
                assert r.status == 200
                health = await r.json()
            assert health["status"] == "ok" and {"routes", "websockets"} <= set(health)
            async with http.get(f"http://127.0.0.1:{proxy.api_port}/metrics") as r:
                assert r.status == 403
        before = await metrics(proxy)
        assert (await get(proxy.url + "/no/such/route"))[0] == 404
        async with backend() as url:
            await proxy.route("/user/measured", url)
            assert (await proxy.api("POST", "/holds/user/measured", {"timeout": 30}))[0] == 201
            waiting = asyncio.ensure_future(get(proxy.url + "/user/measured/x"))
            await until(lambda: waiting_on(proxy, "/user/measured"), "a request waiting", 10)
            await proxy.route("/user/measured", url)  # releases the hold
            assert (await waiting)[0] == 200
            async with websocket_through(proxy, "/ws-measured") as ws:
                await ws.send_str("x" * 1000)
                assert await ws.receive_str(timeout=10) == "x" * 1000
                during = await metrics(proxy)
            await proxy.api("DELETE", "/routes/user/measured")
        after = await metrics(proxy)
        grew = {name: after.get(name, 0) - before.get(name, 0) for name in after}
        assert grew['chspawner_proxy_responses_total{code="4xx"}'] >= 1
        assert grew['chspawner_proxy_responses_total{code="2xx"}'] >= 1
        assert grew['chspawner_proxy_http_bytes_total{direction="to_client"}'] > 0
        assert grew["chspawner_proxy_holds_placed_total"] == 1
        assert grew['chspawner_proxy_hold_wait_seconds_count{outcome="released"}'] == 1
        assert during["chspawner_proxy_websockets"] == before["chspawner_proxy_websockets"] + 1
        assert grew["chspawner_proxy_websockets_opened_total"] == 1
        assert grew['chspawner_proxy_websocket_bytes_total{direction="to_backend"}'] > 1000
        assert grew['chspawner_proxy_websocket_bytes_total{direction="to_client"}'] > 1000
        assert after["chspawner_proxy_websockets"] == before["chspawner_proxy_websockets"]
        assert after["chspawner_proxy_process_resident_memory_bytes"] > 0
    asyncio.run(scenario())


def test_metrics_without_token_when_told():
    proxy = Proxy("--metrics-without-token")
    try:
        status, text = asyncio.run(get(f"http://127.0.0.1:{proxy.api_port}/metrics"))
        assert status == 200 and "chspawner_proxy_routes 0.0" in text
        status, _ = asyncio.run(get(proxy.api_url + "/routes"))
        assert status == 403  # the route API still wants its token
    finally:
        proxy.stop()


async def metrics(proxy: Proxy) -> dict[str, float]:
    """The proxy's /metrics as {sample with its labels: value}."""
    status, text = await get(f"http://127.0.0.1:{proxy.api_port}/metrics",
                             headers={"Authorization": f"token {proxy.token}"})
    assert status == 200
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


async def waiting_on(proxy: Proxy, path: str) -> bool:
    return (await proxy.api("GET", "/holds"))[1].get(path, {}).get("waiting", 0) > 0


# -- the Jupyter kernel websocket subprotocol, with a real jupyter_server -------------

V1 = "v1.kernel.websocket.jupyter.org"


def test_kernel_websocket_subprotocol_and_legacy_framing(user, user_dir):
    """JupyterLab 4 offers the v1 kernel websocket subprotocol; the server
    picks it and frames messages in binary (offsets, channel, parts).
    Through the proxy, the offer reaches the server, its choice comes back,
    and a kernel_info round trip works in that framing; without the offer,
    the legacy JSON framing works."""
    from jupyter_server.services.kernels.connection.base import (
        deserialize_msg_from_ws_v1, serialize_msg_to_ws_v1)
    proxy = Proxy()
    jupyter = PlainServer(user, user_dir, base_url="/user/sub/")

    async def kernel_info(ws, v1: bool) -> dict:
        request = kernel_info_request()
        if v1:
            parts = [json.dumps(request[key]).encode()
                     for key in ("header", "parent_header", "metadata", "content")]
            await ws.send_bytes(serialize_msg_to_ws_v1(parts, "shell"))
        else:
            await ws.send_str(json.dumps({**request, "channel": "shell"}))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = await ws.receive(timeout=60)
            if v1:
                assert message.type == aiohttp.WSMsgType.BINARY, message
                channel, parts = deserialize_msg_from_ws_v1(message.data)
                reply = {"channel": channel, "header": json.loads(parts[0]),
                         "parent_header": json.loads(parts[1]),
                         "content": json.loads(parts[3])}
            else:
                assert message.type == aiohttp.WSMsgType.TEXT, message
                reply = json.loads(message.data)
            if reply["parent_header"].get("msg_id") == request["header"]["msg_id"] \
                    and reply["header"]["msg_type"] == "kernel_info_reply":
                return reply
        raise AssertionError("no kernel_info_reply")

    async def scenario():
        await proxy.route("/user/sub", jupyter.url)
        async with aiohttp.ClientSession(headers=jupyter.headers) as http:
            async with http.post(f"{proxy.url}/user/sub/api/kernels",
                                 json={"name": "python3"}) as r:
                assert r.status == 201, await r.text()
                kernel = (await r.json())["id"]
            channels = f"{proxy.url}/user/sub/api/kernels/{kernel}/channels"
            async with http.ws_connect(f"{channels}?session_id=v1", protocols=(V1,)) as ws:
                assert ws.protocol == V1
                reply = await kernel_info(ws, v1=True)
                assert reply["channel"] == "shell"
                assert reply["content"]["status"] == "ok"
            async with http.ws_connect(f"{channels}?session_id=legacy") as ws:
                assert ws.protocol is None
                reply = await kernel_info(ws, v1=False)
                assert reply["content"]["status"] == "ok"
            async with http.delete(f"{proxy.url}/user/sub/api/kernels/{kernel}") as r:
                assert r.status == 204
    try:
        asyncio.run(scenario())
    except BaseException:
        print(jupyter.log()[-3000:])
        raise
    finally:
        jupyter.stop()
        proxy.stop()


def kernel_info_request() -> dict:
    return {"header": {"msg_id": secrets.token_hex(8), "msg_type": "kernel_info_request",
                       "username": "t", "session": secrets.token_hex(8), "version": "5.3",
                       "date": ""},
            "parent_header": {}, "metadata": {}, "content": {}}


# -- a real JupyterHub ----------------------------------------------------------------------

def test_jupyterhub_drives_it_as_its_proxy(user, kernel_store):
    hub = Hub(kernel_store, user.pw_name, images=("deb",),
              extra_config=f'c.ConfigurableHTTPProxy.command = ["{PROXY}"]\n')
    try:
        assert "chspawner-proxy INFO proxying on" in hub.log()
        result = asyncio.run(spawn(hub, {"image": "deb", "mode": "kernels"}))
        assert result.get("ready"), (result, hub.log()[-3000:])
        assert asyncio.run(kernel_in_server(hub)) == \
            ("ok", "chspawner test image: Debian bookworm\n", None)
        asyncio.run(stop_server(hub))
    finally:
        hub.stop()
