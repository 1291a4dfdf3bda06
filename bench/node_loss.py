"""Recovery after a node loss, side by side with the single-node
server-kill recovery of bench/recovery.py, in one run.

* anchor: bench/recovery.py's rounds: one host, ChSpawner, the session
  proxy and manager; the server process is killed (SIGKILL); from the kill
  to the next cell's reply in the same kernel (the servers given a Jupyter
  runtime directory of their own, as the center hub's are, so that other
  runs as the same user on this machine leave their kernels alone);
* node loss: the multi-node test cluster (tests/harness/cluster.py) and a
  center's JupyterHub on its service node, configured by the deployment
  guide's own file (tests/harness/center.py: SlurmChSpawner, kernels in
  jobs of their own on another node than the server, session proxy and
  manager, PostgreSQL). Each round a kernel holds ``x = 41``; the server's
  node A is lost (``cluster.lose``: its slurmd and every process on it
  killed, the kernel's node B untouched); the client reconnects at the
  same URL, as a browser does, and runs ``print(x + 1)`` until it answers
  ``42``. Slurm's view of A is polled (sinfo) meanwhile; the time is from
  Slurm reporting A lost (not responding, ``*``, or down) to that reply
  (target <= 5 s, median), and is shown from the loss too. A reply before
  Slurm's report counts as 0 s after it (the figure is then negative: the
  session came back before Slurm noticed). Node A is restored after each
  round (not timed).

Run as root: ``bench/run.sh`` or, from the repository root,
``python -m bench.node_loss [--rounds N] [--check]``.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench.recovery import rounds as kill_rounds
from chspawner.images.trees import remove_tree
from tests.harness.center import CenterHub, center_store
from tests.harness.cluster import Cluster
from tests.harness.env import TEST_USER
from tests.harness.hub import server_state, spawn, stop_server
from tests.harness.images import site_store  # the demo's store: deb, jupyter
from tests.harness.kernel_client import execute, kernels_url, reconnect, start_kernel, warm_up
from tests.harness.postgres import Postgres

TARGET = 5.0
KERNEL = "chspawner-python--python3"  # the center's "python" image's kernel
#: Seconds between looks at Slurm's view of the lost node.
SLURM_POLL = 0.2
#: Seconds a round may take, from the loss to the next cell's reply.
ROUND_TIMEOUT = 180


def lost_in_slurm(state: str) -> bool:
    """Whether sinfo's state says the node is lost: not responding
    (``idle*``, ``allocated*``, ``mixed*``...) or down."""
    return state.endswith("*") or state.startswith("down")


class SlurmWatch(threading.Thread):
    """Polls Slurm's state of ``node`` until it reports it lost; ``reported``:
    when (perf_counter), and ``state``: what sinfo said."""

    def __init__(self, cluster: Cluster, node: str):
        super().__init__(daemon=True)
        self.cluster, self.node = cluster, node
        self.reported: float | None = None
        self.state = ""
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            state = self.cluster.node_state(self.node)
            if lost_in_slurm(state):
                self.reported, self.state = time.perf_counter(), state
                return
            self._done.wait(SLURM_POLL)

    def wait(self, timeout: float) -> float:
        """When Slurm reported the loss; exits if it did not within timeout."""
        self.join(timeout)
        self._done.set()
        if self.reported is None:
            sys.exit(f"Slurm did not report node {self.node} lost within {timeout:.0f} s "
                     f"(sinfo: {self.cluster.node_state(self.node) or '?'})")
        return self.reported


async def node_round(hub: CenterHub) -> tuple[float, float]:
    """Lose the server's node under a live kernel on another node; (seconds
    from the loss, seconds from Slurm's report) to the next cell's reply."""
    cluster = hub.cluster
    base = kernels_url(hub)
    async with hub.session() as http:
        kernel = await start_kernel(http, hub, KERNEL)
        url = f"{base}/{kernel}/channels?session_id={uuid.uuid4().hex}".replace("http", "ws", 1)
        ws = await http.ws_connect(url)
        await warm_up(ws)
        await execute(ws, "x = 41")
        node = (await server_state(hub))["node"]
        watch = SlurmWatch(cluster, node)
        watch.start()
        lost = time.perf_counter()
        await asyncio.to_thread(cluster.lose, node)
        await ws.receive()  # closed
        async with asyncio.timeout(ROUND_TIMEOUT):
            while True:  # the first connections may reach no server yet
                ws = await reconnect(http, url, deadline_s=ROUND_TIMEOUT)
                try:
                    status, out, _ = await asyncio.wait_for(execute(ws, "print(x + 1)"), 30)
                    break
                except (asyncio.TimeoutError, AssertionError, ConnectionError):
                    await ws.close()
        replied = time.perf_counter()
        if (status, out) != ("ok", "42\n"):
            sys.exit(f"the kernel came back without its state: {status} {out!r}")
        await ws.close()
        async with http.delete(f"{base}/{kernel}"):
            pass
    reported = await asyncio.to_thread(watch.wait, ROUND_TIMEOUT)
    await asyncio.to_thread(restore, cluster, node)
    return replied - lost, replied - reported


def restore(cluster: Cluster, node: str) -> None:
    """Bring the lost node back for the next round. Set DOWN first, as
    Cluster.stop does: the old server's job, cancelled while its node was
    gone, would otherwise stay COMPLETING on it past restore()'s wait."""
    cluster.run("scontrol", "update", f"nodename={node}", "state=down",
                "reason=bench-node-loss")
    cluster.restore(node, timeout=120)


def node_rounds(count: int) -> tuple[list[float], list[float]]:
    """(from the loss, from Slurm's report) per round, on a fresh cluster."""
    # (on the store's file system, for hard links: see center_store)
    work = Path(tempfile.mkdtemp(prefix="chspawner-bench-node-loss-", dir="/var/tmp"))
    from_loss, from_report = [], []
    try:
        os.chmod(work, 0o755)
        store = center_store(site_store(), work)
        with Cluster() as cluster, Postgres() as pg, \
                CenterHub(cluster, store, TEST_USER, pg.database(), pg.database()) as hub:
            result = asyncio.run(spawn(hub, {"image": "python", "mode": "kernels"}))
            if not result.get("ready"):
                sys.exit(f"spawn failed: {result}\nhub log:\n{hub.log()[-3000:]}")
            for _ in range(count):
                loss, report = asyncio.run(node_round(hub))
                from_loss.append(loss)
                from_report.append(report)
            asyncio.run(stop_server(hub))
    finally:
        remove_tree(work)
    return from_loss, from_report


def kill(state: dict) -> None:
    os.kill(state["pid"], signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the node loss's median is over its target")
    args = parser.parse_args()
    # The one-host servers' kernel records in a runtime directory of their
    # own, as the center hub's (tests/harness/center.py): another run as the
    # same user on this machine must neither adopt nor drop this one's kernels.
    runtime = Path(tempfile.mkdtemp(prefix="chspawner-bench-runtime-", dir="/tmp"))
    try:
        shutil.chown(runtime, TEST_USER, TEST_USER)
        killed = kill_rounds(args.rounds, "c.Spawner.environment = "
                             f"{{'JUPYTER_RUNTIME_DIR': {str(runtime)!r}}}\n", kill)
    finally:
        remove_tree(runtime)
    from_loss, from_report = node_rounds(args.rounds)
    anchor, loss = statistics.median(killed), statistics.median(from_loss)
    # A reply before Slurm's report: 0 s after it, for the median and the target.
    after = statistics.median(max(t, 0.0) for t in from_report)
    print(f"{'recovery to the next cell (median of ' + str(args.rounds) + ')':<44} "
          f"{'from loss':>10} {'from Slurm':>11} {'target':>7}")
    print(f"{'one host: server killed (bench/recovery.py)':<44} {anchor:>9.2f}s {'-':>11} "
          f"{'-':>7}")
    print(f"{'cluster: server node lost, kernel on another':<44} {loss:>9.2f}s "
          f"{after:>10.2f}s {TARGET:>6.1f}s{'  OVER TARGET' if after > TARGET else ''}")
    print(f"node loss / server kill, from the loss: {loss / anchor:.2f}x")
    print("  server killed: " + " ".join(f"{t:.2f}" for t in killed) + " s")
    print("  node lost, from the loss: " + " ".join(f"{t:.2f}" for t in from_loss) + " s")
    print("  node lost, from Slurm's report: " + " ".join(f"{t:.2f}" for t in from_report)
          + " s")
    return 1 if args.check and after > TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
