"""Recovery: from killing a user's server to the next cell executing.

A real JupyterHub with ChSpawner (kernels mode, image ``deb``), the session
proxy and the session manager, as in docs/admin/sessions.md. Each round: a
kernel answers a cell; the server process is killed (SIGKILL); the client
reconnects to the same kernel at the same URL, retrying as a browser does,
and runs the next cell. The time is from the kill to that cell's reply.

The anchor is stock JupyterHub, which has no recovery to time: it notices a
dead server at its next poll (``Spawner.poll_interval``, 30 s by default),
the user then starts a new server by hand, and the kernel and its state are
gone. Target: <= 5 s, median. Run as root: ``bench/run.sh`` or
``python bench/recovery.py [--rounds N] [--check]``.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))
from demo_hub import site_store  # noqa: E402  (the demo's store: jupyter, deb)
from test_kernel_server import KERNEL, execute, free_port, warm_up  # noqa: E402
from test_session_manager import (manager_config, reconnect,  # noqa: E402
                                  server_state)
from test_spawner import Hub, spawn, stop_server  # noqa: E402

from chspawner.images.trees import remove_tree  # noqa: E402

USER = os.environ.get("CHSPAWNER_USER", "chtest")
TARGET = 5.0


async def one_round(hub: Hub) -> float:
    """Kill the server under a live kernel; seconds until a cell runs again."""
    base = f"{hub.url}/user/{hub.user}/api/kernels"
    async with hub.session() as http:
        async with http.post(base, json={"name": KERNEL}) as r:
            if r.status != 201:
                sys.exit(f"can't start a kernel: {r.status} {await r.text()}")
            kernel = (await r.json())["id"]
        url = f"{base}/{kernel}/channels?session_id={uuid.uuid4().hex}".replace("http", "ws", 1)
        ws = await http.ws_connect(url)
        await warm_up(ws)
        await execute(ws, "x = 41")
        killed = time.perf_counter()
        os.kill((await server_state(hub))["pid"], signal.SIGKILL)
        await ws.receive()  # closed
        while True:  # the first connection may reach the dead server still
            ws = await reconnect(http, url)
            try:
                status, out, _ = await asyncio.wait_for(execute(ws, "print(x + 1)"), 30)
                break
            except (asyncio.TimeoutError, AssertionError, ConnectionError):
                await ws.close()
        took = time.perf_counter() - killed
        if (status, out) != ("ok", "42\n"):
            sys.exit(f"the kernel came back without its state: {status} {out!r}")
        await ws.close()
        async with http.delete(f"{base}/{kernel}"):
            pass
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="chspawner-bench-manager-"))
    hub = Hub(site_store(), USER, images=("deb",),
              extra_config=manager_config(state, secrets.token_hex(16), free_port()))
    times = []
    try:
        result = asyncio.run(spawn(hub, {"image": "deb", "mode": "kernels"}))
        if not result.get("ready"):
            sys.exit(f"spawn failed: {result}")
        for _ in range(args.rounds):
            times.append(asyncio.run(one_round(hub)))
        asyncio.run(stop_server(hub))
    finally:
        hub.stop()
        remove_tree(state)
    median = statistics.median(times)
    print(f"{'recovery (kill to next cell)':<32} {'stock hub':>10} {'chspawner':>10} "
          f"{'target':>7}")
    print(f"{'server killed, same kernel':<32} {'manual':>10} {median:>9.2f}s "
          f"{TARGET:>6.1f}s{'  OVER TARGET' if median > TARGET else ''}")
    print("  rounds: " + " ".join(f"{t:.2f}" for t in times) + " s")
    return 1 if args.check and median > TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
