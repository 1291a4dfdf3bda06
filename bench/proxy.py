"""chspawner-proxy vs configurable-http-proxy 5.3, on the same backend.

One aiohttp backend process (an HTTP endpoint, a websocket echo, a
websocket that streams small messages), each proxy in its own process with
one route to it, and the load generator in a third process, so that the
measuring side costs as little as it can on a small machine. Measured, per
proxy: HTTP requests/s and p50 latency with 20 concurrent clients,
websocket round-trip p50, and server-to-client websocket messages/s.

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
ECHO = "/user/b/api/kernels/echo/channels"
STREAM = "/user/b/api/kernels/stream/channels"
# metric -> (higher is better, target ratio chspawner/CHP)
TARGETS = {"HTTP requests/s (20 concurrent)": (True, 0.8),
           "HTTP p50 latency (ms)": (False, 1.3),
           "websocket round trip p50 (ms)": (False, None),
           "websocket messages/s (server to client, 100 B)": (True, 1.0)}


# -- the backend (its own process) -------------------------------------------

def run_backend(port: int) -> None:
    from aiohttp import web

    async def hello(request):
        return web.Response(body=MESSAGE)

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
    app.router.add_get("/user/b/hello", hello)
    # Websockets at kernel websocket paths, as Jupyter's traffic mostly is:
    # the proxy watches those (see session_proxy.proxy.delivered).
    app.router.add_get(ECHO, echo)
    app.router.add_get(STREAM, stream)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# -- the load generator (its own process; prints one JSON object) -------------

async def http_load(url: str, seconds: float, concurrency: int) -> dict:
    import aiohttp
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def one_client(until: float) -> None:
            while (start := time.perf_counter()) < until:
                async with http.get(url) as r:
                    await r.read()
                latencies.append(time.perf_counter() - start)
        # A short warm-up opens the connections on both sides.
        await asyncio.gather(*(one_client(time.perf_counter() + 0.5)
                               for _ in range(concurrency)))
        latencies.clear()
        began = time.perf_counter()
        await asyncio.gather(*(one_client(began + seconds) for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return {"rps": len(latencies) / elapsed, "p50_ms": statistics.median(latencies) * 1e3}


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
        result = asyncio.run(http_load(base + "/user/b/hello", args.seconds, 20))
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
    def __init__(self, command: list[str], backend: str) -> None:
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
        request = urllib.request.Request(
            f"http://127.0.0.1:{api_port}/api/routes/user/b", method="POST",
            data=json.dumps({"target": backend}).encode(),
            headers={"Authorization": f"token {token}"})
        urllib.request.urlopen(request, timeout=10).close()
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def run_benchmark(args: argparse.Namespace) -> int:
    port = free_port()
    backend = subprocess.Popen([*ITSELF, "--backend", str(port)], cwd=REPO)
    wait_listening(port, backend, lambda: "the backend exited", "the backend", 30)
    target = f"http://127.0.0.1:{port}"
    proxies = {"chp": ["configurable-http-proxy"], "ours": [str(VENV_BIN / "chspawner-proxy")]}
    # Rounds alternate between the proxies (this machine's speed drifts
    # over seconds); see report() for how rounds become figures.
    samples: dict[str, dict[str, list[float]]] = {
        name: {metric: [] for metric in TARGETS} for name in proxies}
    try:
        running = {name: ProxyProcess(cmd, target) for name, cmd in proxies.items()}
        for _ in range(args.rounds):
            for name, proxy in running.items():
                got = samples[name]
                http = measure(proxy.url, "http", args)
                got["HTTP requests/s (20 concurrent)"].append(http["rps"])
                got["HTTP p50 latency (ms)"].append(http["p50_ms"])
                got["websocket round trip p50 (ms)"].append(
                    measure(proxy.url, "rtt", args)["p50_ms"])
                got["websocket messages/s (server to client, 100 B)"].append(
                    measure(proxy.url, "stream", args)["msgs"])
        for proxy in running.values():
            proxy.stop()
    finally:
        backend.terminate()
        backend.wait()
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
        ratio = statistics.median(o / c for o, c in zip(our_rounds, chp_rounds))
        shown = "-" if target is None else f"{'>=' if higher_better else '<='}{target}x"
        print(f"{metric:48} {chp:10.2f} {ours:10.2f} {ratio:6.2f}x {shown:>8}")
        if target is not None and (ratio < target if higher_better else ratio > target):
            missed.append(metric)
    print("ratio in each round:")
    for metric in TARGETS:
        ratios = [o / c for o, c in zip(samples["ours"][metric], samples["chp"][metric])]
        print(f"  {metric}: " + " ".join(f"{r:.2f}" for r in ratios))
    if missed:
        print("missed: " + "; ".join(missed))
    return 1 if check and missed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="HTTP load per proxy")
    parser.add_argument("--messages", type=int, default=200_000,
                        help="websocket messages streamed per proxy")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--what", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        run_backend(args.backend)
        return 0
    if args.client:
        run_client(args)
        return 0
    print(f"chspawner-proxy vs configurable-http-proxy ({os.cpu_count()} cores)")
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
