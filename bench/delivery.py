"""End-to-end delivery: what numbering every kernel message costs, and how
fast a page gets back what it missed.

Two Jupyter servers with the persistent-kernel plugins, as the test user,
each with a kernel in the Debian image, behind chspawner-proxy; the client
speaks JupyterLab 4's websocket protocol (v1). One server relays as before
(``ReplayingKernelConnection.annotate_seq`` off: today's path), the other
adds ``metadata.chspawner_seq`` to every message (the default). Measured:

* messages/s through the proxy to the client, a cell sending ``--messages``
  small stream messages as fast as the kernel can (alternating rounds, the
  median of the rounds' ratios; target: seq >= 0.9x today's);
* replay: a page away while a cell sends ``--missed`` messages, then back
  with ``chspawner_received``: the time from its reconnect to the last
  missed message received (target: <= 1 s for 10,000).

Run as root (it drops to the test user): ``bench/run.sh`` or, from the
repository root, ``python -m bench.delivery [--messages N] [--missed N]
[--rounds N] [--check]``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import re
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

from bench.proxy import ProxyProcess
from chspawner.persist.kernel_manager import keeper_info
from tests.harness.env import TEST_USER, VENV_BIN
from tests.harness.images import site_store
from tests.harness.kernel_client import execute_request
from tests.harness.servers import Servers
from tests.harness.ws_v1 import PROTOCOL, decode, encode

#: a relayed message's number, in its metadata (a search, not a parse)
SEQ = re.compile(rb'"chspawner_seq": ?(\d+)')

RATE_TARGET = 0.9
REPLAY_TARGET_S = 1.0
KERNEL = "chspawner-deb--python3"
#: sends N stream messages straight from the kernel's session: faster than
#: print, so that the relay, not the kernel, is what is measured
SEND = """\
k = get_ipython().kernel
parent = k.get_parent("shell") if hasattr(k, "get_parent") else k._parent_header
{wait}
for i in range({n}):
    {pace}
    k.session.send(k.iopub_socket, "stream", {{"name": "stdout", "text": "%d\\n" % i}},
                   parent=parent, ident=b"stream.stdout")
"""


async def open_ws(http, url: str, session: str, received: int | None = None):
    url = f"{url}?session_id={session}"
    if received is not None:
        url += f"&chspawner_received={received}"
    return await http.ws_connect(url, protocols=(PROTOCOL,), max_msg_size=0)


async def run_cell(ws, code: str, session: str) -> str:
    request = execute_request(code, session)
    await ws.send_bytes(encode(request))
    return request["header"]["msg_id"]


async def receive(ws, msg_id: str, started: float | None = None,
                  seqs: list[int] | None = None) -> tuple[float, float, int]:
    """Read until the cell ``msg_id`` is idle: (first stream message's time,
    last one's time, how many came); each message's seq appended to
    ``seqs`` if given. A byte search per frame, a parse only for status
    messages: the client shares the machine with what it measures. (A
    kernel sending flat out drops some on its own IOPub socket, which
    holds 1,000: the rate counts those received.)"""
    seen, first, last = 0, started, 0.0
    deadline = time.monotonic() + 300
    while True:
        try:
            frame = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise AssertionError(f"the cell did not end within 300 s ({seen} came)") from None
        if frame.type != aiohttp.WSMsgType.BINARY:
            raise AssertionError(f"the websocket closed after {seen} messages")
        data = frame.data
        if seqs is not None and (numbered := SEQ.search(data)):
            seqs.append(int(numbered[1]))
        if b'"msg_type": "stream"' in data[:600]:
            seen += 1
            last = time.perf_counter()
            if first is None:
                first = last
        elif b'"idle"' in data and b'"msg_type": "status"' in data[:600]:
            msg = decode(data)
            if msg["parent_header"].get("msg_id") == msg_id:
                return first or last, last, seen


async def stream_rate(http, url: str, n: int) -> float:
    session = uuid.uuid4().hex
    ws = await open_ws(http, url, session)
    try:
        msg_id = await run_cell(ws, SEND.format(n=n, wait="", pace=""), session)
        first, last, seen = await receive(ws, msg_id)
        return (seen - 1) / (last - first)
    finally:
        await ws.close()


async def replay_time(http, url: str, n: int, keeper: str) -> float:
    """A page's websocket closes while its cell sends ``n`` messages; the
    page comes back with what it received: seconds to the last one."""
    session = uuid.uuid4().hex
    ws = await open_ws(http, url, session)
    msg_id = await run_cell(ws, SEND.format(
        n=n, wait="import time; time.sleep(1)",
        # (paced a little: flat out, the kernel's IOPub socket drops some)
        pace="i % 100 or time.sleep(0.002)"), session)
    # Seqs up to the cell's start (busy, execute_input) come before it sends.
    received = 0
    async with asyncio.timeout(60):
        async for frame in ws:
            msg = decode(frame.data)
            received = max(received, msg["metadata"].get("chspawner_seq", 0))
            if msg["msg_type"] == "execute_input" and msg["parent_header"]["msg_id"] == msg_id:
                break
    await ws.close()
    deadline = time.monotonic() + 120
    # (the cell's messages follow its execute_input, the last received)
    while (info := await keeper_info(keeper))["execution_state"] != "idle" \
            or info["last_seq"] <= received + 1:
        assert time.monotonic() < deadline, f"the kernel sent {info['last_seq'] - received} of {n}"
        await asyncio.sleep(0.05)  # (polling the keeper: nothing signals the end)
    began = time.perf_counter()
    ws = await open_ws(http, url, session, received)
    try:
        seqs: list[int] = []
        _, last, seen = await receive(ws, msg_id, began, seqs)
        # Exactly once: every message the keeper numbered after what the
        # page held, in order (the cell's own, and the statuses between).
        if seqs != list(range(received + 1, seqs[-1] + 1)):
            lost = set(range(received + 1, seqs[-1] + 1)) - set(seqs)
            raise AssertionError(f"replay not exactly once: {len(lost)} lost, "
                                 f"{len(seqs) - len(set(seqs))} repeated, of {len(seqs)}")
        assert seen >= n * 0.9, f"{seen} of the {n} missed came back"
        return last - began
    finally:
        await ws.close()


async def measure(args, proxy: ProxyProcess, servers: dict[str, Servers]) -> dict:
    headers = next(iter(servers.values())).headers
    samples: dict[str, list[float]] = {name: [] for name in servers}
    replays: list[float] = []
    async with aiohttp.ClientSession(headers=headers) as http:
        urls, keepers = {}, {}
        for name, s in servers.items():
            async with http.post(f"{proxy.url}/user/{name}/api/kernels",
                                 json={"name": KERNEL}) as r:
                assert r.status == 201, await r.text()
                kernel = (await r.json())["id"]
            urls[name] = f"{proxy.url}/user/{name}/api/kernels/{kernel}/channels".replace(
                "http", "ws", 1)
            keepers[name] = s.records()[kernel]["keeper"]
            await stream_rate(http, urls[name], 100)  # warm: the iopub subscription is live
        for _ in range(args.rounds):
            for name in servers:
                samples[name].append(await stream_rate(http, urls[name], args.messages))
        for _ in range(max(1, args.rounds // 2)):
            replays.append(await replay_time(http, urls["seq"], args.missed, keepers["seq"]))
    return {"rates": samples, "replays": replays}


def report(result: dict, args) -> int:
    today, seq = result["rates"]["today"], result["rates"]["seq"]
    ratio = statistics.median(s / t for s, t in zip(seq, today))
    replay = statistics.median(result["replays"])
    print(f"{'metric':52} {'today':>10} {'chspawner':>10} {'ratio':>7} {'target':>8}")
    print(f"{'messages/s through chspawner-proxy (seq in metadata)':52} "
          f"{statistics.median(today):10.0f} {statistics.median(seq):10.0f} "
          f"{ratio:6.2f}x {'>=' + str(RATE_TARGET) + 'x':>8}")
    print(f"{'reconnect to last of %d missed (s)' % args.missed:52} {'-':>10} "
          f"{replay:10.3f} {'-':>7} {'<=' + str(REPLAY_TARGET_S) + ' s':>8}")
    print("ratio in each round: " + " ".join(f"{s / t:.2f}" for s, t in zip(seq, today)))
    print("replay in each round (s): " + " ".join(f"{r:.3f}" for r in result["replays"]))
    missed = []
    if ratio < RATE_TARGET:
        missed.append("messages/s")
    if args.missed >= 10000 and replay > REPLAY_TARGET_S:
        missed.append("replay time")
    if missed:
        print("missed: " + "; ".join(missed))
    return 1 if args.check and missed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000, help="per stream round")
    parser.add_argument("--missed", type=int, default=10000, help="missed, then replayed")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()
    user = pwd.getpwnam(TEST_USER)
    store = site_store()
    work = Path(tempfile.mkdtemp(prefix="chspawner-bench-delivery-", dir="/tmp"))
    os.chmod(work, 0o755)
    servers: dict[str, Servers] = {}
    proxy = None
    try:
        for name, annotate in (("today", False), ("seq", True)):
            home = work / name
            home.mkdir()
            os.chown(home, user.pw_uid, user.pw_gid)
            servers[name] = Servers(user, home, store, [
                f"--ServerApp.base_url=/user/{name}/",
                f"--ReplayingKernelConnection.annotate_seq={annotate}",
                f"--PersistentKernelManager.buffer_messages={args.missed * 2 + 100}",
                # (the stock limits would cap the stream, not the relay)
                "--ServerApp.iopub_msg_rate_limit=0", "--ServerApp.iopub_data_rate_limit=0",
                "--ZMQChannelsWebsocketConnection.iopub_msg_rate_limit=0",
                "--ZMQChannelsWebsocketConnection.iopub_data_rate_limit=0"])
        servers["seq"].token = servers["today"].token  # one client, both servers
        targets = {}
        for name, s in servers.items():
            targets[f"/user/{name}"] = s.start()
            s.base += f"/user/{name}"  # (for its shutdown)
        proxy = ProxyProcess([str(VENV_BIN / "chspawner-proxy")], targets)
        print(f"delivery: today's relay vs seq in metadata, through chspawner-proxy "
              f"({os.cpu_count()} cores)", flush=True)
        result = asyncio.run(measure(args, proxy, servers))
        print(json.dumps({"rates": result["rates"], "replays": result["replays"]}))
        return report(result, args)
    finally:
        if proxy is not None:
            proxy.stop()
        for s in servers.values():
            s.close()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    raise SystemExit(main())
