"""A session's unavailability in a planned move (a successor job before
the time limit) against the unplanned recovery of the same session, in one
run, on the multi-node test cluster through a center's hub
(tests/harness/center.py: the deployment guide's configuration,
SlurmChSpawner with kernels in jobs of their own, session proxy and
manager, PostgreSQL).

A prober asks the user's server for ``api/status`` at the session's URL,
through the session proxy, every PROBE_S seconds (each request given up to
REQUEST_TIMEOUT_S). Unavailability: the longest time between two answered
probes, while the session changes jobs.

* planned (chspawner's walltime_move): the server's job is told, by the
  admin's scontrol, that it ends in about 5 minutes (under move_lead): a
  successor job is queued, its server comes up, the route switches, the
  old job ends. Also printed: from the successor's server answering to the
  route switched (the hub's log). Target: <= 0.5 s of unavailability.
* unplanned (the anchor, what happens without it): the server's job is
  cancelled (scancel, as a time limit ends it); the session manager sees
  the loss, holds the route and has the hub start the server again.

Each round ends when the hub has a new job running for the user.

Run as root: ``bench/run.sh`` or, from the repository root,
``python -m bench.walltime_move [--rounds N] [--check]``.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from chspawner.images.trees import remove_tree
from tests.harness.center import CenterHub, center_store, shorten
from tests.harness.cluster import Cluster
from tests.harness.env import TEST_USER
from tests.harness.hub import server_state, spawn, stop_server
from tests.harness.images import site_store  # the demo's store: deb, jupyter
from tests.harness.postgres import Postgres

TARGET = 0.5
PROBE_S = 0.02
REQUEST_TIMEOUT_S = 60.0
ROUND_TIMEOUT = 240


class Prober:
    """Asks the session's URL all the time; the longest time between two
    answers (any status below 500 from the user's server)."""

    def __init__(self, http: aiohttp.ClientSession, url: str):
        self.http, self.url = http, url
        self.last_ok: float | None = None
        self.longest = 0.0
        self.failures = 0
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            sent = time.perf_counter()
            try:
                async with self.http.get(self.url, allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(REQUEST_TIMEOUT_S)) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            now = time.perf_counter()
            if ok:
                if self.last_ok is not None:
                    self.longest = max(self.longest, now - self.last_ok)
                self.last_ok = now
            else:
                self.failures += 1
            await asyncio.sleep(max(0.0, PROBE_S - (now - sent)))

    def __enter__(self) -> Prober:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def until_moved(hub: CenterHub, old_job: str) -> dict:
    """The server's state once the hub has another job for it, ready."""
    async with asyncio.timeout(ROUND_TIMEOUT):
        while True:
            state = await server_state(hub)
            if state.get("job_id") not in (None, "", old_job):
                return state
            await asyncio.sleep(0.2)


async def one_round(hub: CenterHub, planned: bool) -> tuple[float, int]:
    """(the longest time without an answer, failed probes) in one move."""
    url = f"{hub.url}/user/{hub.user}/api/status"
    async with hub.session() as http:
        old = await server_state(hub)
        with Prober(http, url) as prober:
            while prober.last_ok is None:  # (answering before the move)
                await asyncio.sleep(PROBE_S)
            if planned:
                await asyncio.to_thread(shorten, hub, old["job_id"], 300)
            else:
                await asyncio.to_thread(hub.cluster.run, "scancel", old["job_id"])
            await until_moved(hub, old["job_id"])
            # ... and answering there, a moment after.
            settled = time.perf_counter()
            while (prober.last_ok or 0) < settled + 1.0:
                await asyncio.sleep(PROBE_S)
        return prober.longest, prober.failures


def switch_times(log: str) -> list[float]:
    """The hub's "route switched S s after its server answered", per move."""
    return [float(s) for s in re.findall(r"route switched ([0-9.]+) s after", log)]


def rounds(count: int) -> tuple[list[tuple[float, int]], list[tuple[float, int]], list[float]]:
    work = Path(tempfile.mkdtemp(prefix="chspawner-bench-move-", dir="/var/tmp"))
    planned, unplanned = [], []
    try:
        os.chmod(work, 0o755)
        store = center_store(site_store(), work)
        with Cluster() as cluster, Postgres() as pg, \
                CenterHub(cluster, store, TEST_USER, pg.database(), pg.database()) as hub:
            result = asyncio.run(spawn(hub, {"image": "python", "mode": "kernels",
                                             "keep_session": True}))
            if not result.get("ready"):
                sys.exit(f"spawn failed: {result}\nhub log:\n{hub.log()[-3000:]}")
            for _ in range(count):
                planned.append(asyncio.run(one_round(hub, planned=True)))
                unplanned.append(asyncio.run(one_round(hub, planned=False)))
            switched = switch_times(hub.log())
            asyncio.run(stop_server(hub))
    finally:
        remove_tree(work)
    return planned, unplanned, switched


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the planned move's median is over its target")
    args = parser.parse_args()
    planned, unplanned, switched = rounds(args.rounds)
    moved = statistics.median(t for t, _ in planned)
    lost = statistics.median(t for t, _ in unplanned)
    print(f"{'unavailable while the session changes jobs (median of ' + str(args.rounds) + ')':<58}"
          f" {'longest gap':>12} {'failed':>7} {'target':>7}")
    print(f"{'unplanned: job cancelled, session manager recovers':<58} {lost:>11.3f}s "
          f"{sum(f for _, f in unplanned):>7} {'-':>7}")
    print(f"{'planned: successor job, route switched (walltime_move)':<58} {moved:>11.3f}s "
          f"{sum(f for _, f in planned):>7} {TARGET:>6.1f}s"
          f"{'  OVER TARGET' if moved > TARGET else ''}")
    print(f"planned / unplanned: {moved / lost:.3f}x")
    print("  planned: " + " ".join(f"{t:.3f}" for t, _ in planned) + " s")
    print("  unplanned: " + " ".join(f"{t:.3f}" for t, _ in unplanned) + " s")
    print("  successor answering -> route switched: "
          + " ".join(f"{t * 1000:.1f}" for t in switched) + " ms")
    return 1 if args.check and moved > TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
