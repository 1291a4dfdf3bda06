"""chspawner-proxy under hostile input: it keeps serving others, its memory
and its log stay small. Each test reproduces one attack with a hostile
stand-in (a backend, or a client opening connections) against the
installed console command.

- a backend that, after its kernel websocket was lost once, sends a frame
  claiming 2**40 bytes and streams it;
- more half-sent requests than the proxy has file descriptors;
- slow request headers and idle kept-alive connections;
- a pooled backend connection outliving its route (the port changes hands).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from tests.harness.env import VENV_BIN
from tests.harness.net import free_port
from tests.harness.wait import until, wait_listening

PROXY = VENV_BIN / "chspawner-proxy"
MIB = 1 << 20


class Proxy:
    """chspawner-proxy on 127.0.0.1, its log in a file; ``prefix`` runs it
    under another command (prlimit)."""

    def __init__(self, tmp: Path, *args: str, prefix: tuple[str, ...] = ()) -> None:
        self.port, self.api_port = free_port(), free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"proxy-{self.port}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [*prefix, str(PROXY), "--ip", "127.0.0.1", "--port", str(self.port),
                 "--api-ip", "127.0.0.1", "--api-port", str(self.api_port), *args],
                env={**os.environ, "CONFIGPROXY_AUTH_TOKEN": self.token},
                stdout=log, stderr=subprocess.STDOUT)
        for port in (self.port, self.api_port):
            wait_listening(port, self.proc, self.log, "the proxy", timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def api(self, method: str, path: str, body: dict | None = None) -> int:
        async with aiohttp.ClientSession() as http:
            async with http.request(
                    method, f"http://127.0.0.1:{self.api_port}/api{path}", json=body,
                    headers={"Authorization": f"token {self.token}"},
                    timeout=aiohttp.ClientTimeout(total=10)) as r:
                await r.read()
                return r.status

    async def route(self, path: str, target: str) -> None:
        assert await self.api("POST", f"/routes{path}", {"target": target}) == 201

    def rss_kib(self) -> int:
        return self.status("VmRSS")

    def status(self, field: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def start_proxy(tmp_path):
    started: list[Proxy] = []

    def start(*args: str, prefix: tuple[str, ...] = ()) -> Proxy:
        started.append(Proxy(tmp_path, *args, prefix=prefix))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


# -- a small HTTP/1.1 and websocket backend, written by hand so it can lie --

async def read_head(reader: asyncio.StreamReader) -> bytes | None:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def accept_key(head: bytes) -> str:
    key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    magic = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    return base64.b64encode(hashlib.sha1(key + magic).digest()).decode()


def text_frame(text: str) -> bytes:
    data = text.encode()
    return bytes([0x81, len(data)]) + data  # (short frames only)


class HostileKernel:
    """A kernel websocket backend: its first connection sends three
    messages and vanishes (no close frame); the next ones send a frame
    header claiming 2**40 bytes, then stream, counting what went out."""

    def __init__(self) -> None:
        self.connections = 0
        self.sent = 0
        self.stream_to = 0  # bytes to stream on the later connections

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        head = await read_head(reader)
        if head is None:
            return writer.close()
        self.connections += 1
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                     + accept_key(head).encode() + b"\r\n\r\n")
        if self.connections == 1:
            writer.write(b"".join(text_frame(f"message {n}") for n in range(3)))
            await writer.drain()
            await reader.read(1)  # until the client has them (it says so)
            writer.transport.abort()  # killed: no close frame
            return
        writer.write(bytes([0x82, 127]) + (1 << 40).to_bytes(8, "big"))
        block = b"z" * MIB
        try:
            while self.sent < self.stream_to:
                writer.write(block)
                await writer.drain()
                self.sent += len(block)
            await reader.read()  # (an abort could discard what is in flight)
        except ConnectionError:
            pass
        writer.close()


async def ws_connect(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await asyncio.wait_for(read_head(reader), 10)
    assert head and head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


@contextlib.asynccontextmanager
async def server(handle):
    port = free_port()
    srv = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        yield port, srv
    finally:
        srv.close()


async def answer_ok(reader, writer) -> None:
    """A plain backend: 200 "ok" to every request, kept alive."""
    while await read_head(reader) is not None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    writer.close()


async def get_status(url: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
            await r.read()
            return r.status


# -- 1. a frame claiming 2**40 bytes after a lost backend ------------------

def test_a_terabyte_frame_after_a_lost_kernel_websocket_keeps_the_proxy_small(start_proxy):
    """The attack: a user's server, once its kernel websocket was lost (so
    the proxy drops copies on the next one), sends a frame header claiming
    2**40 bytes and streams 256 MiB. Before, the proxy held it all back to
    compare (600 MiB grown); now it goes through as it comes, and only as
    fast as the client reads, while another route keeps answering."""
    proxy = start_proxy()
    kernel = HostileKernel()
    path = "/user/mallory/api/kernels/k1/channels?session_id=s1"

    async def scenario():
        async with server(kernel.handle) as (port, _), server(answer_ok) as (ok_port, _):
            await proxy.route("/user/mallory", f"http://127.0.0.1:{port}")
            await proxy.route("/user/alice", f"http://127.0.0.1:{ok_port}")
            reader, writer = await ws_connect(proxy.port, path)
            got = await reader.readexactly(3 * len(text_frame("message 0")))
            assert got.endswith(text_frame("message 2"))
            writer.write(b"\x81\x80" + b"\0" * 4)  # an empty masked frame: "got them"
            rest = await asyncio.wait_for(reader.read(), 10)  # 1012, then closed
            assert rest.startswith(b"\x88\x02\x03\xf4")
            writer.close()

            kernel.stream_to = 256 * MIB
            before = proxy.rss_kib()
            reader, writer = await ws_connect(proxy.port, path)
            # The client reads nothing for now: the backend must be held back.
            await until(lambda: kernel.sent > 0, "the backend streams", 10)
            last = -1

            def stalled():
                nonlocal last
                same, last = kernel.sent == last, kernel.sent
                return same
            await until(stalled, "the backend held back", 30, every=0.5)
            held = kernel.sent
            assert held < 32 * MIB, "no backpressure: the proxy read on"
            assert proxy.rss_kib() - before < 32 * 1024
            assert await get_status(f"{proxy.url}/user/alice/x") == 200
            # Now the client reads it all: it goes through, unwatched.
            received, peak = 0, proxy.rss_kib()
            while received < 256 * MIB:
                chunk = await asyncio.wait_for(reader.read(4 * MIB), 10)
                assert chunk, f"cut after {received} bytes"
                received += len(chunk)
                peak = max(peak, proxy.rss_kib())
            writer.close()
            print(f"backend held at {held / MIB:.1f} MiB; proxy grew "
                  f"{(peak - before) / 1024:.1f} MiB")
            assert peak - before < 64 * 1024, f"grew by {(peak - before) // 1024} MiB"
            assert await get_status(f"{proxy.url}/user/alice/x") == 200

    asyncio.run(scenario())


# -- 2. more half-sent requests than file descriptors ------------------------

async def half_sent(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that send part of a request's headers and
    nothing more; those the proxy can't take yet are left connecting."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(("127.0.0.1", port))
        socks.append(sock)
    await asyncio.sleep(0)
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.send(b"GET /user/alice/ HTTP/1.1\r\nHost: x\r\n")
    return socks


@pytest.mark.parametrize("cap", ["auto", "above the fd limit"])
def test_half_sent_requests_beyond_the_fd_limit_do_not_stop_the_proxy(start_proxy, cap):
    """The attack: 300 half-sent requests under a 128-descriptor limit.
    Before, the proxy spun on EMFILE, logging a traceback per attempt,
    and held them an hour. Now: the route API answers (during the flood
    with the automatic connection cap), the flood's connections are closed
    after the headers timeout, a fresh client is served, the proxy does not
    spin, and its log stays under 4 KB."""
    args = ["--headers-timeout", "1000"]
    if cap != "auto":
        args += ["--max-connections", "100000"]  # accept until EMFILE
    proxy = start_proxy(*args, prefix=("prlimit", "--nofile=128:128"))

    async def scenario():
        async with server(answer_ok) as (port, _):
            await proxy.route("/user/alice", f"http://127.0.0.1:{port}")
            cpu, start = proxy.cpu_s(), time.monotonic()
            socks = await half_sent(proxy.port, 300)
            try:
                if cap == "auto":  # fds are left for the route API
                    assert await proxy.api("GET", "/routes") == 200
                await until(lambda: "Too many open files" in proxy.log() or cap == "auto",
                            "the proxy ran out of descriptors", 10)

                async def served() -> bool:
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                        return await get_status(f"{proxy.url}/user/alice/") == 200
                    return False
                await until(served, "a fresh client served", 60, every=0.2)
                elapsed = time.monotonic() - start
                assert await proxy.api("GET", "/routes") == 200
            finally:
                for sock in socks:
                    sock.close()
            cpu = proxy.cpu_s() - cpu
            log = proxy.log()
            print(f"served after {elapsed:.1f} s; proxy CPU {cpu:.2f} s; log {len(log)} B")
            assert cpu < 0.6 * elapsed + 0.5, "the proxy spun"
            assert "Traceback" not in log and len(log) < 4096, log[-2000:]

    asyncio.run(scenario())


# -- 3. slow headers, idle kept-alive connections -----------------------------

def test_slow_headers_and_idle_kept_alive_connections_are_closed(start_proxy):
    """Before, a client could keep a connection with half its headers for
    an hour. Now the headers must be in within --headers-timeout, and a
    kept-alive connection is closed after --keep-alive-timeout idle, while
    a request sent in time on it is served."""
    proxy = start_proxy("--headers-timeout", "800", "--keep-alive-timeout", "500")

    async def scenario():
        async with server(answer_ok) as (port, _):
            await proxy.route("/user/alice", f"http://127.0.0.1:{port}")
            # A slowloris: a header byte every 100 ms, never the end.
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            start = time.monotonic()
            for byte in b"GET /user/alice/ HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                if reader.at_eof() or writer.is_closing():
                    break
                with contextlib.suppress(ConnectionError):
                    writer.write(bytes([byte]))
                    await writer.drain()
                await asyncio.sleep(0.1)  # the attacker's pace, not a wait on us
                with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                    if await asyncio.wait_for(reader.read(1), 0.001) == b"":
                        break
            assert time.monotonic() - start < 5, "slow headers were kept"
            writer.close()
            # Kept alive: a second request in time is served, then idle closes it.
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            request = b"GET /user/alice/ HTTP/1.1\r\nHost: x\r\n\r\n"
            for _ in range(2):
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200")
                assert await reader.readexactly(2) == b"ok"
            idle = time.monotonic()
            assert await asyncio.wait_for(reader.read(1), 5) == b""
            assert 0.4 < time.monotonic() - idle < 4
            writer.close()

    asyncio.run(scenario())


# -- 4. a pooled connection never outlives its route ----------------------------

class Owner:
    """A backend that answers with its name, keeps connections alive, and
    notes each request and each connection the proxy closes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests = 0
        self.closed = 0

    async def handle(self, reader, writer) -> None:
        body = self.name.encode()
        while await read_head(reader) is not None:
            self.requests += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
        self.closed += 1
        writer.close()


async def body_of(url: str) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"Cookie": "session=secret"},
                            timeout=aiohttp.ClientTimeout(total=10)) as r:
            return await r.text()


@pytest.mark.parametrize("change", ["route deleted", "same target posted again",
                                    "target changed"])
def test_a_pooled_connection_never_outlives_its_route(start_proxy, change):
    """The attack: alice's server on port P is pooled by the proxy; the
    server stops listening but its process lives on (another user's, once
    the port changed hands, say); a new server takes port P (or another
    port) and the route is set to it. Before, the next request, cookies
    and all, could go down the pooled connection to the old process."""
    proxy = start_proxy()

    async def scenario():
        first, second = Owner("first"), Owner("second")
        port = free_port()
        old = await asyncio.start_server(first.handle, "127.0.0.1", port)
        await proxy.route("/user/alice", f"http://127.0.0.1:{port}")
        assert await body_of(f"{proxy.url}/user/alice/") == "first"  # pooled now
        old.close()  # stops listening; its connections (the pooled one) stay
        new_port = free_port() if change == "target changed" else port
        new = await asyncio.start_server(second.handle, "127.0.0.1", new_port)
        try:
            if change == "route deleted":
                assert await proxy.api("DELETE", "/routes/user/alice") == 204
                # The pool went with the route, at once.
                await until(lambda: first.closed == 1, "the pooled connection closed", 5)
            await proxy.route("/user/alice", f"http://127.0.0.1:{new_port}")
            await until(lambda: first.closed == 1, "the pooled connection closed", 5)
            for _ in range(3):
                assert await body_of(f"{proxy.url}/user/alice/") == "second"
            assert first.requests == 1
        finally:
            new.close()

    asyncio.run(scenario())


# -- 5. a client that vanishes without a word (a laptop closed) ----------------

class Listener:
    """A websocket backend that accepts, then records what reaches each
    connection (in the order they came) and when it ends."""

    def __init__(self) -> None:
        self.received: list[bytearray] = []
        self.open = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        head = await read_head(reader)
        if head is None:
            return writer.close()
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                     + accept_key(head).encode() + b"\r\n\r\n")
        self.open += 1
        received = bytearray()
        self.received.append(received)
        try:
            while data := await reader.read(65536):
                received += data
        except ConnectionError:
            pass
        self.open -= 1
        writer.close()


def masked(opcode: int, payload: bytes) -> bytes:
    """A client's frame (masked, as RFC 6455 wants), short payloads only."""
    mask = secrets.token_bytes(4)
    return (bytes([0x80 | opcode, 0x80 | len(payload)]) + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


async def answer_pings(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       pings: list[bytes]) -> None:
    """A live client: answers every ping with its pong, as a browser does."""
    while True:
        first, second = await reader.readexactly(2)
        payload = await reader.readexactly(second & 0x7F)  # (short frames only)
        if first & 0x0F == 0x9:
            pings.append(payload)
            writer.write(masked(0xA, payload))


async def metrics_of(proxy: Proxy) -> dict[str, float]:
    """The proxy's /metrics, as {sample with labels: value}."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{proxy.api_port}/metrics",
                            headers={"Authorization": f"token {proxy.token}"}) as r:
            assert r.status == 200
            text = await r.text()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_a_client_that_vanishes_is_dropped_after_ping_interval_and_timeout(start_proxy):
    """The failure that took down large hubs behind configurable-http-proxy
    4: closed laptops' websockets, never closed. Here a client opens a
    websocket and then neither reads nor answers anything (as a machine
    gone from the network: no FIN ever comes). With pings after 1 s of
    silence and 1 s to answer, the proxy closes it and its backend
    connection within about 2 s, and counts it as a ping timeout; a client
    that answers the pings on another websocket stays, and its backend
    never sees the proxy's pings or the pongs to them."""
    proxy = start_proxy("--websocket-ping-interval", "1000",
                        "--websocket-ping-timeout", "1000")

    async def scenario():
        backend = Listener()
        async with server(backend.handle) as (port, _):
            await proxy.route("/user/alice", f"http://127.0.0.1:{port}")
            gone_reader, gone_writer = await ws_connect(proxy.port, "/user/alice/ws")
            live_reader, live_writer = await ws_connect(proxy.port, "/user/alice/ws")
            pings: list[bytes] = []
            answering = asyncio.ensure_future(answer_pings(live_reader, live_writer, pings))
            try:
                await until(lambda: backend.open == 2, "both websockets open", 10)
                silent, live = backend.received
                opened = time.monotonic()
                await until(lambda: backend.open == 1, "the silent client's backend "
                            "connection closed", 15)
                waited = time.monotonic() - opened
                assert 1.5 < waited < 8, waited  # interval + timeout, with slack for load
                values = await metrics_of(proxy)
                assert values['chspawner_proxy_websockets_closed_total{reason="ping_timeout"}'] \
                    == 1
                assert values["chspawner_proxy_websockets"] == 1
                # The live client has been pinged (and answered) meanwhile.
                await until(lambda: len(pings) >= 2, "two pings answered", 10)
                live_writer.write(masked(0x1, b"still here"))
                await until(lambda: live, "the message relayed", 10)
                # Its backend got its message and nothing else: no ping, no pong.
                assert len(live) == len(masked(0x1, b"still here")) and live[0] == 0x81
                # The silent one's got a close frame (1001, going away), masked.
                assert silent == b"\x88\x82\0\0\0\0\x03\xe9"
                assert backend.open == 1
            finally:
                answering.cancel()
                live_writer.close()
                gone_writer.transport.abort()
            await until(lambda: backend.open == 0, "the live websocket closed", 10)
            values = await metrics_of(proxy)
            assert values["chspawner_proxy_websockets"] == 0
            assert values['chspawner_proxy_websockets_closed_total{reason="client_gone"}'] == 1
            assert values["chspawner_proxy_websockets_opened_total"] == 2

    asyncio.run(scenario())


def test_clients_that_close_right_after_the_upgrade_leave_nothing_open(start_proxy):
    """A client that closes as soon as it has the 101 can be gone before
    the relay has taken its socket: its backend connection must be closed
    all the same (it was left open, and counted, for good)."""
    proxy = start_proxy()

    async def scenario():
        backend = Listener()
        async with server(backend.handle) as (port, _):
            await proxy.route("/user/alice", f"http://127.0.0.1:{port}")
            for _ in range(20):
                reader, writer = await ws_connect(proxy.port, "/user/alice/ws")
                writer.close()
            await until(lambda: backend.open == 0 and len(backend.received) == 20,
                        "every backend connection closed", 15)
            values = await metrics_of(proxy)
            assert values["chspawner_proxy_websockets"] == 0
            assert values['chspawner_proxy_websockets_closed_total{reason="client_gone"}'] == 20

    asyncio.run(scenario())
