"""Stand-ins for many users' single-user servers, all in one process.

bench/scale.py runs 1,000 users' sessions against the real hub, session
proxy and session manager; 1,000 real Jupyter servers would need more
memory than the machine has, and what is measured is the hub side, not the
servers. A stand-in answers what the hub and the manager ask of a server
(JupyterHub's wait for the server's URL, the manager's ``GET <url>api``):
any GET gets ``200 {"version": ...}``, on keep-alive connections.

    python -m bench.standin --control PORT

The control API, on 127.0.0.1:PORT (the spawner of bench/scale_spawner.py
calls it):

* ``POST /servers/KEY``: a new server for KEY (a user's server), listening
  on a fresh port of 127.0.0.1; answers ``{"port": N}``;
* ``DELETE /servers/KEY``: KEY's server is lost: its listener closes and
  every connection to it is cut (as a killed process's would be);
* ``GET /servers``: how many are open.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os

from aiohttp import web

ANSWER = json.dumps({"version": "2.0.0-standin"}).encode()
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(ANSWER)).encode() + b"\r\n\r\n" + ANSWER)
#: The most of a request's head kept while waiting for its end.
MAX_HEAD = 16 * 1024


class StandInServer(asyncio.Protocol):
    """One connection to a stand-in: every request head gets RESPONSE (no
    request the hub or the manager makes of a server has a body)."""

    def __init__(self, connections: set[asyncio.Transport]):
        self.connections, self.buffer = connections, b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.connections.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            self.buffer = self.buffer[end + 4:]
            self.transport.write(RESPONSE)
        if len(self.buffer) > MAX_HEAD:
            self.transport.close()


class StandIns:
    """Every stand-in server of this process, by key."""

    def __init__(self) -> None:
        self.servers: dict[str, tuple[asyncio.base_events.Server,
                                      set[asyncio.Transport]]] = {}

    async def open(self, key: str) -> int:
        await self.close(key)  # a start after a loss the hub never stopped
        connections: set[asyncio.Transport] = set()
        server = await asyncio.get_running_loop().create_server(
            lambda: StandInServer(connections), "127.0.0.1", 0, backlog=64)
        self.servers[key] = (server, connections)
        return server.sockets[0].getsockname()[1]

    async def close(self, key: str) -> bool:
        server, connections = self.servers.pop(key, (None, set()))
        if server is None:
            return False
        server.close()
        for transport in list(connections):
            transport.abort()
        return True


def control_app(standins: StandIns) -> web.Application:
    async def open_server(request: web.Request) -> web.Response:
        return web.json_response({"port": await standins.open(request.match_info["key"])})

    async def close_server(request: web.Request) -> web.Response:
        closed = await standins.close(request.match_info["key"])
        return web.json_response({"closed": closed})

    async def count(request: web.Request) -> web.Response:
        return web.json_response({"open": len(standins.servers)})

    app = web.Application()
    app.add_routes([web.post("/servers/{key}", open_server),
                    web.delete("/servers/{key}", close_server),
                    web.get("/servers", count)])
    return app


def raise_fd_limit() -> None:
    """Every stand-in is a listening socket, and each gets connections: the
    soft limit on open files (often 1,024) up to the hard one."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", type=int, required=True,
                        help="the control API's port (127.0.0.1)")
    args = parser.parse_args()
    raise_fd_limit()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    os.environ.pop("http_proxy", None)
    web.run_app(control_app(StandIns()), host="127.0.0.1", port=args.control,
                print=None, access_log=None)


if __name__ == "__main__":
    main()
