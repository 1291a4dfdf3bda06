"""chspawner-proxy vs configurable-http-proxy 5.3, on the same backend.

Two backend processes, each proxy in its own process with a route to each,
and the load generator in another process. The HTTP backend and the HTTP
load generator are lean (bare asyncio protocols on uvloop, httptools to
read answers): on a 2-core machine where backend, proxy and load generator
share the cores, an aiohttp backend and client cost more CPU per request
than either proxy, and cap both at the same rate, hiding their difference.
The websocket backend is aiohttp (an echo, and a stream of small messages),
as are the websocket clients. Measured, per proxy: HTTP requests/s and p50
latency with 20 concurrent clients, websocket round-trip p50, and
server-to-client websocket messages/s.

    python -m bench.proxy [--seconds 5] [--messages 200000] [--rounds 7] [--check]

(from the repository root; it starts its backend and clients the same way).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import time

from tests.harness.env import REPO, VENV_BIN
from tests.harness.net import free_port
from tests.harness.wait import wait_listening

# This program again, in another role (--backend, --client).
ITSELF = [sys.executable, "-m", "bench.proxy"]
MESSAGE = b"m" * 100
HELLO = "/user/h/hello"  # the lean HTTP backend's route
ECHO = "/user/b/api/kernels/echo/channels"
STREAM = "/user/b/api/kernels/stream/channels"
# metric -> (higher is better, target ratio chspawner/CHP)
TARGETS = {"HTTP requests/s (20 concurrent)": (True, 1.5),
           "HTTP p50 latency (ms)": (False, 1.0),
           "websocket round trip p50 (ms)": (False, None),
           "websocket messages/s (server to client, 100 B)": (True, 1.0),
           # The proxy process's own CPU time (user + system, from /proc):
           # what the rates above cost it, however busy the machine is.
           "proxy CPU per HTTP request (us)": (False, None),
           "proxy CPU for the websocket stream (ms)": (False, None)}


# -- the backend (its own process) -------------------------------------------

def run_backend(port: int) -> None:
    from aiohttp import web

    async def echo(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_bytes(message.data)
        return ws

    async def stream(request):
        """Send ``n`` messages as fast as the connection takes them."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        for _ in range(int(request.query["n"])):
            await ws.send_bytes(MESSAGE)
        await ws.close()
        return ws

    app = web.Application()
    # Websockets at kernel websocket paths, as Jupyter's traffic mostly is:
    # the proxy watches those (see session_proxy.proxy.delivered).
    app.router.add_get(ECHO, echo)
    app.router.add_get(STREAM, stream)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def run_http_backend(port: int) -> None:
    """The HTTP backend: answers every request head with the same 100 bytes,
    at as little CPU per request as Python allows."""
    import uvloop
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(MESSAGE), MESSAGE))

    class Answers(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.buffer = transport, b""

        def data_received(self, data):
            self.buffer += data
            heads = self.buffer.count(b"\r\n\r\n")  # (the proxies send no bodies here)
            if heads:
                self.buffer = self.buffer[self.buffer.rindex(b"\r\n\r\n") + 4:]
                self.transport.write(answer * heads)

    async def serve():
        server = await asyncio.get_running_loop().create_server(Answers, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(serve())


# -- the load generator (its own process; prints one JSON object) -------------

def http_load(url: str, seconds: float, concurrency: int) -> dict:
    """``concurrency`` kept-alive connections, each sending its next request
    as soon as the answer to the last is in (bare protocols on uvloop)."""
    import httptools
    import uvloop
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    request = f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
    latencies: list[float] = []
    answered = [0]  # warm-up included (for the proxy's CPU per request)
    warm_up = 0.5  # opens the connections on both sides

    class Client(asyncio.Protocol):
        def __init__(self, began: float, until: float, done: asyncio.Future) -> None:
            self.began, self.until, self.done = began, until, done
            self.parser = httptools.HttpResponseParser(self)

        def connection_made(self, transport):
            self.transport = transport
            self.send()

        def send(self):
            self.start = time.perf_counter()
            self.transport.write(request)

        def data_received(self, data):
            self.parser.feed_data(data)

        def on_message_complete(self):
            now = time.perf_counter()
            answered[0] += 1
            if self.start >= self.began and now <= self.until:
                latencies.append(now - self.start)
            if now < self.until:
                self.send()
            else:
                self.transport.close()
                self.done.set_result(None)

        def connection_lost(self, exc):
            if not self.done.done():
                self.done.set_exception(ConnectionError(f"connection lost: {exc}"))

    async def load() -> None:
        loop = asyncio.get_running_loop()
        began = time.perf_counter() + warm_up
        done = [loop.create_future() for _ in range(concurrency)]
        for future in done:
            await loop.create_connection(lambda f=future: Client(began, began + seconds, f),
                                         parts.hostname, parts.port)
        await asyncio.gather(*done)

    uvloop.run(load())
    return {"rps": len(latencies) / seconds, "p50_ms": statistics.median(latencies) * 1e3,
            "answered": answered[0]}


async def ws_round_trips(url: str, count: int) -> dict:
    import aiohttp
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url) as ws:
            times = []
            for i in range(count + 50):
                start = time.perf_counter()
                await ws.send_bytes(MESSAGE)
                await ws.receive()
                if i >= 50:  # the first ones warm up
                    times.append(time.perf_counter() - start)
    return {"p50_ms": statistics.median(times) * 1e3}


async def ws_stream(url: str, count: int) -> dict:
    import aiohttp
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}?n={count}", max_msg_size=0) as ws:
            received, first = 0, None
            async for message in ws:
                if first is None:
                    first = time.perf_counter()
                received += 1
            elapsed = time.perf_counter() - first
    assert received == count, (received, count)
    return {"msgs": received / elapsed}


def run_client(args: argparse.Namespace) -> None:
    base = args.client
    if args.what == "http":
        result = http_load(base + HELLO, args.seconds, 20)
    elif args.what == "rtt":
        result = asyncio.run(ws_round_trips(base.replace("http", "ws") + ECHO, 2000))
    else:
        result = asyncio.run(ws_stream(base.replace("http", "ws") + STREAM, args.messages))
    print(json.dumps(result))


def measure(base: str, what: str, args: argparse.Namespace) -> dict:
    out = subprocess.run([*ITSELF, "--client", base, "--what", what,
                          "--seconds", str(args.seconds), "--messages", str(args.messages)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    if out.returncode:
        sys.exit(f"bench/proxy.py: client ({what}) failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


# -- the proxies ---------------------------------------------------------------

class ProxyProcess:
    def __init__(self, command: list[str], routes: dict[str, str]) -> None:
        self.port, api_port = free_port(), free_port()
        token = secrets.token_hex(16)
        self.proc = subprocess.Popen(
            [*command, "--ip", "127.0.0.1", "--port", str(self.port), "--api-ip",
             "127.0.0.1", "--api-port", str(api_port), "--log-level", "error"],
            env={**os.environ, "CONFIGPROXY_AUTH_TOKEN": token},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in (self.port, api_port):
            wait_listening(port, self.proc, lambda: f"{command[0]} exited", command[0], 30)
        import urllib.request
        for path, backend in routes.items():
            request = urllib.request.Request(
                f"http://127.0.0.1:{api_port}/api/routes{path}", method="POST",
                data=json.dumps({"target": backend}).encode(),
                headers={"Authorization": f"token {token}"})
            urllib.request.urlopen(request, timeout=10).close()
        self.url = f"http://127.0.0.1:{self.port}"

    def cpu_s(self) -> float:
        """The proxy process's CPU time so far, user and system."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def run_benchmark(args: argparse.Namespace) -> int:
    port, http_port = free_port(), free_port()
    backend = subprocess.Popen([*ITSELF, "--backend", str(port)], cwd=REPO)
    http_backend = subprocess.Popen([*ITSELF, "--http-backend", str(http_port)], cwd=REPO)
    wait_listening(port, backend, lambda: "the backend exited", "the backend", 30)
    wait_listening(http_port, http_backend, lambda: "the HTTP backend exited",
                   "the HTTP backend", 30)
    routes = {"/user/b": f"http://127.0.0.1:{port}", "/user/h": f"http://127.0.0.1:{http_port}"}
    proxies = {"chp": ["configurable-http-proxy"], "ours": [str(VENV_BIN / "chspawner-proxy")]}
    # Rounds alternate between the proxies (this machine's speed drifts
    # over seconds); see report() for how rounds become figures.
    samples: dict[str, dict[str, list[float]]] = {
        name: {metric: [] for metric in TARGETS} for name in proxies}
    try:
        running = {name: ProxyProcess(cmd, routes) for name, cmd in proxies.items()}
        for _ in range(args.rounds):
            for name, proxy in running.items():
                got = samples[name]
                cpu = proxy.cpu_s()
                http = measure(proxy.url, "http", args)
                got["proxy CPU per HTTP request (us)"].append(
                    (proxy.cpu_s() - cpu) / http["answered"] * 1e6)
                got["HTTP requests/s (20 concurrent)"].append(http["rps"])
                got["HTTP p50 latency (ms)"].append(http["p50_ms"])
                got["websocket round trip p50 (ms)"].append(
                    measure(proxy.url, "rtt", args)["p50_ms"])
                cpu = proxy.cpu_s()
                got["websocket messages/s (server to client, 100 B)"].append(
                    measure(proxy.url, "stream", args)["msgs"])
                got["proxy CPU for the websocket stream (ms)"].append(
                    (proxy.cpu_s() - cpu) * 1e3)
        for proxy in running.values():
            proxy.stop()
    finally:
        for process in (backend, http_backend):
            process.terminate()
            process.wait()
    return report(samples, args.check)


def report(samples: dict[str, dict[str, list[float]]], check: bool) -> int:
    """Medians per proxy, and the median of the rounds' ratios: each round
    measures both proxies seconds apart, so a ratio within a round is
    spared the drift of this machine's speed over minutes."""
    print(f"{'metric':48} {'CHP 5.3':>10} {'chspawner':>10} {'ratio':>7} {'target':>8}")
    missed = []
    for metric, (higher_better, target) in TARGETS.items():
        chp_rounds, our_rounds = samples["chp"][metric], samples["ours"][metric]
        chp, ours = statistics.median(chp_rounds), statistics.median(our_rounds)
        ratio = statistics.median(map(ratio_of, our_rounds, chp_rounds))
        shown = "-" if target is None else f"{'>=' if higher_better else '<='}{target}x"
        print(f"{metric:48} {chp:10.2f} {ours:10.2f} {ratio:6.2f}x {shown:>8}")
        if target is not None and (ratio < target if higher_better else ratio > target):
            missed.append(metric)
    print("ratio in each round:")
    for metric in TARGETS:
        ratios = list(map(ratio_of, samples["ours"][metric], samples["chp"][metric]))
        print(f"  {metric}: " + " ".join(f"{r:.2f}" for r in ratios))
    if missed:
        print("missed: " + "; ".join(missed))
    return 1 if check and missed else 0


def ratio_of(ours: float, chp: float) -> float:
    """ours / chp; a CPU time too short to register (0 clock ticks, in a
    short run) gives no ratio: inf, or 1 when both are 0."""
    if chp:
        return ours / chp
    return float("inf") if ours else 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="HTTP load per proxy")
    parser.add_argument("--messages", type=int, default=200_000,
                        help="websocket messages streamed per proxy")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--http-backend", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--what", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        run_backend(args.backend)
        return 0
    if args.http_backend:
        run_http_backend(args.http_backend)
        return 0
    if args.client:
        run_client(args)
        return 0
    print(f"chspawner-proxy vs configurable-http-proxy ({os.cpu_count()} cores)")
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
