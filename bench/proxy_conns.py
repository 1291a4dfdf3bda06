"""Many idle websockets through chspawner-proxy: how many it holds, and
what each costs it in memory.

A lean websocket backend (raw asyncio: answers the upgrade, then reads
until the connection ends) and ``chspawner-proxy`` each run in their own
process; a client process opens N websockets through the proxy (raw
asyncio protocols, no HTTP library per connection) and keeps them open,
answering the proxy's pings as a browser does. Measured: the time to open
them all, the proxy's resident memory before and with them (the increase
divided by N is the cost of one idle websocket), that all N are still
open after ``--hold`` seconds, as the proxy (``/health``), the backend and
the client each count them, and the proxy's CPU time meanwhile (it pings
each websocket after 30 s of silence); then all are closed and the proxy
must be back to none.

    python -m bench.proxy_conns [--connections 10000] [--hold 10]

(from the repository root). ``measure()`` is what bench/scale.py calls.
Each websocket takes two descriptors in the proxy (client and backend
side) and one in the client and in the backend: the processes' soft
RLIMIT_NOFILE is raised to the hard one, and, as root, the hard one to
what N needs. Where the hard limit can't be raised (a container without
CAP_SYS_RESOURCE), it says how many descriptors N needs and stops.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import secrets
import subprocess
import sys
import time
import urllib.request

from tests.harness.env import REPO, VENV_BIN
from tests.harness.net import free_port
from tests.harness.wait import wait_listening

ITSELF = [sys.executable, "-m", "bench.proxy_conns"]
PATH = "/user/b/api/kernels/idle/channels"  # a kernel's websocket, as most are
#: Handshakes in flight at once from the client (the proxy's listen queue
#: and the backend's are 4096 deep on Debian; stay well under).
OPENING = 256
#: Descriptors a process needs besides its connections.
SPARE_FDS = 256


class TooFewDescriptors(RuntimeError):
    """The open-file limit can't be raised to what the websockets need."""


def most_websockets() -> int:
    """How many websockets this machine's open-file limit lets the bench
    open through one proxy (after raising it as far as it may go)."""
    return (raise_fd_limit(0) - SPARE_FDS) // 2


def raise_fd_limit(needed: int) -> int:
    """Soft RLIMIT_NOFILE up to the hard one; as root, the hard one up to
    ``needed`` first (children, the proxy among them, inherit both)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed
        except (ValueError, OSError):
            pass
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def accept_key(key: bytes) -> bytes:
    import hashlib
    magic = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    return base64.b64encode(hashlib.sha1(key.strip() + magic).digest())


# -- the backend (its own process) ---------------------------------------------

class BackendSide(asyncio.Protocol):
    """One websocket: the upgrade answered, then whatever comes is dropped."""

    open = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport, self.head, self.upgraded = transport, b"", False

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        key = next(line.split(b":", 1)[1] for line in self.head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                             + accept_key(key) + b"\r\n\r\n")
        self.upgraded, self.head = True, b""
        BackendSide.open += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upgraded:
            BackendSide.open -= 1


def run_backend(port: int) -> None:
    """Serve websockets on ``port``; each line on stdin gets the number open."""
    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(BackendSide, "127.0.0.1", port, backlog=4096)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while await reader.readline():
            print(BackendSide.open, flush=True)
        server.close()
    asyncio.run(serve())


# -- the client (its own process) ------------------------------------------------

class ClientSide(asyncio.Protocol):
    """One websocket through the proxy: the handshake, then pongs to pings."""

    open = 0

    def __init__(self, upgraded: asyncio.Future) -> None:
        self.upgraded, self.buf, self.done = upgraded, b"", False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        key = base64.b64encode(secrets.token_bytes(16))
        transport.write(b"GET " + PATH.encode() + b" HTTP/1.1\r\nHost: bench\r\n"
                        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.done:
            if b"\r\n\r\n" not in self.buf:
                return
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            self.done = True
            if head.startswith(b"HTTP/1.1 101"):
                ClientSide.open += 1
                self.upgraded.set_result(True)
            else:
                self.upgraded.set_exception(RuntimeError(head.split(b"\r\n")[0].decode()))
                return
        # Frames from the proxy: only its pings (short, unmasked) come here.
        while len(self.buf) >= 2 and len(self.buf) >= 2 + (self.buf[1] & 0x7F):
            size = 2 + (self.buf[1] & 0x7F)
            frame, self.buf = self.buf[:size], self.buf[size:]
            if frame[0] & 0x0F == 0x9:  # ping: pong with the payload, masked (zero mask)
                self.transport.write(bytes([0x8A, 0x80 | (size - 2)]) + b"\0\0\0\0"
                                     + frame[2:])

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done and self.upgraded.done() and not self.upgraded.exception():
            ClientSide.open -= 1
        elif not self.upgraded.done():
            self.upgraded.set_exception(exc or ConnectionError("closed"))


def run_client(port: int, count: int) -> None:
    """Open ``count`` websockets to the proxy on ``port``; print one JSON
    line when they are open; on each line read, print how many still are;
    at the end of stdin, close them all."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        transports: list[asyncio.BaseTransport] = []
        slots = asyncio.Semaphore(OPENING)
        failures: list[str] = []

        async def one() -> None:
            async with slots:
                upgraded = loop.create_future()
                try:
                    transport, _ = await loop.create_connection(
                        lambda: ClientSide(upgraded), "127.0.0.1", port)
                    transports.append(transport)
                    await asyncio.wait_for(upgraded, 60)
                except (OSError, RuntimeError, asyncio.TimeoutError) as error:
                    failures.append(repr(error))

        started = time.monotonic()
        await asyncio.gather(*(one() for _ in range(count)))
        opened_s = time.monotonic() - started
        print(json.dumps({"open": ClientSide.open, "open_s": opened_s,
                          "failures": len(failures), "first_failure": failures[:1]}),
              flush=True)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while await reader.readline():
            print(ClientSide.open, flush=True)
        for transport in transports:
            transport.close()
        await asyncio.sleep(0)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())


# -- the measurement ------------------------------------------------------------

def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def cpu_s(pid: int) -> float:
    """CPU seconds (user and system) ``pid`` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ask(proc: subprocess.Popen) -> str:
    """One line to a helper process, its one-line answer."""
    proc.stdin.write("\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def health(api_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/health", timeout=30) as r:
        return json.loads(r.read())


def measure(connections: int = 10000, hold_s: float = 10.0,
            proxy_args: tuple[str, ...] = (), command: tuple[str, ...] | None = None) -> dict:
    """Open ``connections`` idle websockets through a fresh chspawner-proxy,
    hold them ``hold_s`` seconds, close them. Returns the figures (see the
    module's docstring); ``ok`` says whether all were open throughout and
    the proxy was back to none at the end. Raises ``TooFewDescriptors`` if
    the open-file limit can't hold them (``most_websockets()`` says how
    many it can). ``command`` runs another proxy program (e.g. under a
    profiler) instead of the installed one."""
    fd_limit = raise_fd_limit(2 * connections + SPARE_FDS)
    if fd_limit < 2 * connections + SPARE_FDS:
        raise TooFewDescriptors(
            f"{connections} websockets need {2 * connections + SPARE_FDS} descriptors "
            f"in the proxy; RLIMIT_NOFILE allows {fd_limit} (run as root with "
            f"CAP_SYS_RESOURCE, or raise the hard limit): at most {most_websockets()} here")
    backend_port, port, api_port = free_port(), free_port(), free_port()
    token = secrets.token_hex(16)
    helper = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True, "cwd": REPO}
    backend = subprocess.Popen([*ITSELF, "--backend", str(backend_port)], **helper)
    proxy = subprocess.Popen(
        [*(command or [str(VENV_BIN / "chspawner-proxy")]), "--ip", "127.0.0.1",
         "--port", str(port),
         "--api-ip", "127.0.0.1", "--api-port", str(api_port), "--log-level", "warning",
         *proxy_args], env={**os.environ, "CONFIGPROXY_AUTH_TOKEN": token})
    client = None
    try:
        wait_listening(backend_port, backend, lambda: "the backend exited", "the backend", 30)
        for p in (port, api_port):
            wait_listening(p, proxy, lambda: "the proxy exited", "the proxy", 30)
        request = urllib.request.Request(
            f"http://127.0.0.1:{api_port}/api/routes/user/b", method="POST",
            data=json.dumps({"target": f"http://127.0.0.1:{backend_port}"}).encode(),
            headers={"Authorization": f"token {token}"})
        urllib.request.urlopen(request, timeout=10).close()
        # One websocket first, so that what is loaded once (code, buffers)
        # is in the baseline, not counted against the N.
        warm = subprocess.Popen([*ITSELF, "--client", str(port), "--count", "1"], **helper)
        json.loads(warm.stdout.readline())
        warm.stdin.close()
        warm.wait(timeout=30)
        started = time.monotonic()  # until its close has reached the proxy
        while health(api_port)["websockets"] and time.monotonic() - started < 30:
            time.sleep(0.1)
        before = rss_kib(proxy.pid)
        client = subprocess.Popen([*ITSELF, "--client", str(port), "--count",
                                   str(connections)], **helper)
        opened = json.loads(client.stdout.readline())
        with_them = rss_kib(proxy.pid)
        seen_open = health(api_port)["websockets"]
        cpu_before = cpu_s(proxy.pid)
        time.sleep(hold_s)  # idle: the point is that nothing happens (pings aside)
        hold_cpu = cpu_s(proxy.pid) - cpu_before
        after_hold = {"proxy": health(api_port)["websockets"],
                      "backend": int(ask(backend)), "client": int(ask(client))}
        held_rss = rss_kib(proxy.pid)
        client.stdin.close()
        client.wait(timeout=120)
        started = time.monotonic()
        while (left := health(api_port)["websockets"]) and time.monotonic() - started < 60:
            time.sleep(0.2)
        closed_s = time.monotonic() - started
        ok = (opened["open"] == connections and seen_open == connections
              and all(n == connections for n in after_hold.values()) and left == 0)
        return {"connections": connections, "ok": ok, "open_s": round(opened["open_s"], 2),
                "opened": opened["open"], "failures": opened["failures"],
                "first_failure": opened["first_failure"],
                "open_after_hold": after_hold, "hold_s": hold_s,
                "proxy_cpu_s_during_hold": round(hold_cpu, 2),
                "proxy_rss_before_mib": round(before / 1024, 1),
                "proxy_rss_with_mib": round(with_them / 1024, 1),
                "proxy_rss_after_hold_mib": round(held_rss / 1024, 1),
                "rss_per_websocket_kib": round((max(with_them, held_rss) - before)
                                               / connections, 2),
                "left_after_close": left, "close_s": round(closed_s, 2),
                "fd_limit": fd_limit}
    finally:
        for proc in (client, proxy, backend):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10000,
                        help="idle websockets to open (default: 10000)")
    parser.add_argument("--hold", type=float, default=10.0,
                        help="seconds to keep them open before counting (default: 10)")
    parser.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        raise_fd_limit(0)
        run_backend(args.backend)
        return 0
    if args.client:
        raise_fd_limit(0)
        run_client(args.client, args.count)
        return 0
    if args.connections < 1:
        parser.error("--connections: at least 1")
    try:
        result = measure(args.connections, args.hold)
    except TooFewDescriptors as error:
        sys.exit(f"bench/proxy_conns.py: {error}")
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
