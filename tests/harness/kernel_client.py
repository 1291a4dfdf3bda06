"""A Jupyter client over a server's websocket, in the kernel protocol's
terms: execute requests, their replies and output (a Transcript), and the
reconnection a browser makes. The servers are the harness's Hub (through
the proxy) or Servers (straight)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid

import aiohttp

# The container kernel the test stores offer (the bookworm image as "deb").
KERNEL = "chspawner-deb--python3"
N = 40  # numbers printed, one every 0.5 s: 20 s of output


def count_to(n: int, every: float) -> str:
    return (f"import time\nfor i in range(1, {n + 1}):\n"
            f"    print(i, flush=True)\n    time.sleep({every})\n")


def execute_request(code: str, session: str | None = None) -> dict:
    """An execute_request; ``session`` as JupyterLab sends it, its client id
    (the websocket's session_id) in every header."""
    msg_id = uuid.uuid4().hex
    return {"header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "t",
                       "session": session or uuid.uuid4().hex, "version": "5.3",
                       "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": True,
                        "user_expressions": {}, "allow_stdin": False,
                        "stop_on_error": True}}


async def warm_up(ws) -> None:
    """Run nothing once: a kernel's first output can go out before the new
    websocket's iopub subscription is live (ZMQ's slow joiner); once a reply
    has come back, it is."""
    await execute(ws, "pass")


async def execute(ws, code: str, on_start=None) -> tuple[str, str, str | None]:
    """Run ``code`` over the kernel's websocket: (status, stdout, ename).
    ``on_start`` is awaited once the code has printed something.

    Done when both the execute_reply (shell) and the kernel's idle status for
    the request (IOPub) have come, as the protocol says and JupyterLab does:
    the two channels are not ordered with each other, and output relayed
    through a kernel's keeper (session_proxy) may well come after the reply."""
    request = execute_request(code)
    await ws.send_str(json.dumps(request))
    output, started, reply, idle = [], False, None, False
    async with asyncio.timeout(90):
        async for frame in ws:
            msg = json.loads(frame.data)
            if msg["parent_header"].get("msg_id") != request["header"]["msg_id"]:
                continue
            if msg["msg_type"] == "stream":
                output.append(msg["content"]["text"])
                if on_start and not started:
                    started = True
                    await on_start()
            elif msg["msg_type"] == "execute_reply":
                reply = msg["content"]
            elif msg["msg_type"] == "status" and \
                    msg["content"]["execution_state"] == "idle":
                idle = True
            if reply is not None and idle:
                return reply["status"], "".join(output), reply.get("ename")
    raise AssertionError("no execute_reply" if reply is None else "no idle status")


def kernels_url(server) -> str:
    """The kernels REST API of a Jupyter server: ``server.base`` is a
    Servers' own, or a Hub's user's server through the proxy."""
    return f"{server.base}/api/kernels"


async def start_kernel(http: aiohttp.ClientSession, server, name: str = KERNEL) -> str:
    """A new kernel in ``server`` (a Hub or Servers): its id."""
    async with http.post(kernels_url(server), json={"name": name}) as r:
        assert r.status == 201, (await r.text()) + server.log()[-4000:]
        return (await r.json())["id"]


async def connect(http: aiohttp.ClientSession, server, kernel: str, session: str):
    """A websocket to ``kernel`` with the client session id ``session``."""
    url = f"{kernels_url(server)}/{kernel}/channels?session_id={session}"
    return await http.ws_connect(url.replace("http", "ws", 1))


class Transcript:
    """What one execution sent the client: numbers printed, stderr
    notices, whether the reply and the final idle status came."""

    def __init__(self, msg_id: str):
        self.msg_id = msg_id
        self.numbers: list[int] = []
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.order: list[str] = []  # "n" for a number, "e" for stderr
        self.reply = False
        self.reply_content: dict | None = None
        self.execution_count: int | None = None  # from execute_input
        self.idle = False

    def feed(self, msg: dict) -> None:
        if msg["parent_header"].get("msg_id") != self.msg_id:
            return
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream" and content["name"] == "stdout":
            self.stdout.append(content["text"])
            for line in content["text"].splitlines():
                if line.strip().isdigit():
                    self.numbers.append(int(line))
                    self.order.append("n")
        elif kind == "stream" and content["name"] == "stderr":
            self.stderr.append(content["text"])
            self.order.append("e")
        elif kind == "execute_reply":
            self.reply = content["status"] == "ok"
            self.reply_content = content
        elif kind == "execute_input":
            self.execution_count = content["execution_count"]
        elif kind == "status" and content["execution_state"] == "idle":
            self.idle = True


def without_the_copy(numbers: list[int], seen_by_first: int) -> list[int]:
    """``numbers`` less the one copy a client straight on the server (no
    session proxy) may get after a kill: the message sent at the instant
    of the kill, before it was recorded as sent, comes again first from
    the next server. Anything else repeated, missing or out of order stays."""
    numbers = list(numbers)
    cut = seen_by_first
    if 0 < cut < len(numbers) and numbers[cut] == numbers[cut - 1]:
        del numbers[cut]
    return numbers


async def read(ws, transcript: Transcript, until, timeout: float = 60) -> None:
    """Feed ``transcript`` from ``ws`` until ``until(transcript)`` holds or
    the socket closes."""
    async with asyncio.timeout(timeout):
        while not until(transcript):
            frame = await ws.receive()
            if frame.type != aiohttp.WSMsgType.TEXT:
                return  # closed: the server is gone
            transcript.feed(json.loads(frame.data))


async def send(ws, code: str, session: str | None = None) -> Transcript:
    request = execute_request(code, session)
    await ws.send_str(json.dumps(request))
    return Transcript(request["header"]["msg_id"])


async def reconnect(http: aiohttp.ClientSession, url: str, deadline_s: float = 60):
    """Open the websocket again as a client does after losing it: retry
    until the session answers at its URL again."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            return await http.ws_connect(url)
        except aiohttp.ClientError:
            assert time.monotonic() < end, "the session did not come back"
            await asyncio.sleep(0.2)  # (a client's retry pace, not a wait for an event)


async def start_cell(http: aiohttp.ClientSession, server, code: str, name: str = KERNEL):
    """A new kernel ``name`` in ``server`` (a hub: the user's server), a
    websocket to it at the session's URL with a client session id of its
    own, and ``code`` running in it: (kernel, the websocket's URL, the
    websocket, the transcript)."""
    kernel, session = await start_kernel(http, server, name), uuid.uuid4().hex
    url = f"{kernels_url(server)}/{kernel}/channels?session_id={session}"
    url = url.replace("http", "ws", 1)
    ws = await http.ws_connect(url)
    await warm_up(ws)
    # As JupyterLab sends it: the request names the client's session, so
    # the reply to a cell that ends while the client is away is kept for it.
    return kernel, url, ws, await send(ws, code, session)
