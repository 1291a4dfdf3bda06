"""Recovery: from killing a user's server to the next cell executing.

A real JupyterHub with ChSpawner (kernels mode, image ``deb``), the session
proxy and the session manager, as in docs/admin/sessions.md. Each round: a
kernel answers a cell; the server process is killed (SIGKILL); the client
reconnects to the same kernel at the same URL, retrying as a browser does,
and runs the next cell. The time is from the kill to that cell's reply.

The anchor is stock JupyterHub, which has no recovery to time: it notices a
dead server at its next poll (``Spawner.poll_interval``, 30 s by default),
the user then starts a new server by hand, and the kernel and its state are
gone. Target: <= 5 s, median. Run as root: ``bench/run.sh`` or, from the
repository root, ``python -m bench.recovery [--rounds N] [--check]``.

``--slurm``: the same with SlurmChSpawner on a one-node Slurm cluster
(tests/harness/slurm.py): the server's job is cancelled, the kernel runs on in a
job of its own, and the session comes back in a new job (no target: the
time includes Slurm starting a job).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from chspawner.images.trees import remove_tree
from tests.harness.env import TEST_USER
from tests.harness.hub import Hub, manager_config, server_state, spawn, stop_server
from tests.harness.images import site_store  # the demo's store: jupyter, deb
from tests.harness.kernel_client import (execute, kernels_url, reconnect, start_kernel,
                                         warm_up)
from tests.harness.net import free_port
from tests.harness.slurm import Slurm

TARGET = 5.0


async def one_round(hub: Hub, lose) -> float:
    """Lose the server under a live kernel (``lose(its state)``); seconds
    until a cell runs again."""
    base = kernels_url(hub)
    async with hub.session() as http:
        kernel = await start_kernel(http, hub)
        url = f"{base}/{kernel}/channels?session_id={uuid.uuid4().hex}".replace("http", "ws", 1)
        ws = await http.ws_connect(url)
        await warm_up(ws)
        await execute(ws, "x = 41")
        killed = time.perf_counter()
        await asyncio.to_thread(lose, await server_state(hub))
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
    parser.add_argument("--slurm", action="store_true",
                        help="SlurmChSpawner on a one-node cluster; cancel the job")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.slurm:
            cluster = stack.enter_context(Slurm())
            extra = (f"c.JupyterHub.spawner_class = 'slurmchspawner'\n"
                     f"c.SlurmChSpawner.slurm_env = {cluster.env!r}\n")
            what = "server's job cancelled"

            def lose(state: dict) -> None:
                cluster.run("scancel", state["job_id"])
        else:
            extra, what = "", "server killed, same kernel"

            def lose(state: dict) -> None:
                os.kill(state["pid"], signal.SIGKILL)
        times = rounds(args.rounds, extra, lose)
    median = statistics.median(times)
    target = None if args.slurm else TARGET
    print(f"{'recovery (loss to next cell)':<32} {'stock hub':>10} {'chspawner':>10} "
          f"{'target':>7}")
    print(f"{what:<32} {'manual':>10} {median:>9.2f}s "
          + (f"{target:>6.1f}s{'  OVER TARGET' if median > target else ''}" if target
             else f"{'-':>7}"))
    print("  rounds: " + " ".join(f"{t:.2f}" for t in times) + " s")
    return 1 if args.check and target and median > target else 0


def rounds(count: int, extra_config: str, lose) -> list[float]:
    state = Path(tempfile.mkdtemp(prefix="chspawner-bench-manager-"))
    hub = Hub(site_store(), TEST_USER, images=("deb",), extra_config=manager_config(
        state, secrets.token_hex(16), free_port()) + extra_config)
    times = []
    try:
        result = asyncio.run(spawn(hub, {"image": "deb", "mode": "kernels"}))
        if not result.get("ready"):
            sys.exit(f"spawn failed: {result}")
        for _ in range(count):
            times.append(asyncio.run(one_round(hub, lose)))
        asyncio.run(stop_server(hub))
    finally:
        hub.stop()
        remove_tree(state)
    return times


if __name__ == "__main__":
    sys.exit(main())
