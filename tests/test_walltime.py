"""A session past its job's time limit, on the multi-node cluster through
a center's hub (docs/admin/center_jupyterhub_config.py: walltime_move
"offer"): the user asks to keep the session; before the server's job ends,
a successor job takes over — its server up first, then the route, then the
old job ended — while a cell prints in a kernel that has a job of its own."""
from __future__ import annotations

import asyncio
import re
import time

import pytest

from tests.harness.center import (WHERE, end_kernel_jobs, kernel_jobs, shorten,
                                   start_cell)
from tests.harness.hub import history, server_state, spawn, stop_server
from tests.harness.kernel_client import Transcript, count_to, execute, read, reconnect
from tests.harness.wait import wait_until

pytestmark = pytest.mark.timeout(600)

COUNT = 60  # numbers printed, one every 0.5 s: 30 s, across the move


def test_a_session_moves_to_its_successor_before_the_time_limit(center_hub, user):
    """The server's job is told it ends in about 5 minutes (under the
    center's move_lead of 10): a successor job is queued at once, and once
    its server answers the route switches and the old job ends. A cell
    printing 1..N in the kernel's own job goes on; the client, reconnecting
    at the same URL, gets every number exactly once; the kernel is the same
    job; the session manager saw no loss."""
    hub, cluster = center_hub, center_hub.cluster
    result = asyncio.run(spawn(hub, {"image": "python", "mode": "kernels",
                                     "keep_session": True}))

    async def scenario() -> tuple[Transcript, dict, dict, float]:
        async with hub.session() as http:
            kernel, url, ws, t = await start_cell(http, hub, count_to(COUNT, 0.5))
            await read(ws, t, lambda t: len(t.numbers) >= 3)
            old = await server_state(hub)
            jobs = await asyncio.to_thread(kernel_jobs, hub)
            await asyncio.to_thread(shorten, hub, old["job_id"], 300)
            asked = time.monotonic()
            # The old server ends once the route is switched: the socket closes.
            await read(ws, t, lambda t: False, timeout=120)
            took = time.monotonic() - asked
            ws = await reconnect(http, url, deadline_s=60)
            await read(ws, t, lambda t: t.reply and t.idle, timeout=120)
            status, output, _ = await execute(ws, WHERE)
            await ws.close()
            assert (status, output.strip()) == ("ok", list(jobs.values())[0])
            assert await asyncio.to_thread(kernel_jobs, hub) == jobs  # the same kernel job
            return t, old, await server_state(hub), took

    try:
        assert result.get("ready"), (result, hub.log()[-4000:])
        wait_until(lambda: history(hub)[-1:] == ["started"], "the manager to record it", 30)
        try:
            t, old, new, took = asyncio.run(scenario())
        except Exception as e:
            raise AssertionError(f"{e!r}; history {history(hub)}; hub log:\n"
                                 f"{hub.log()[-6000:]}") from e
        assert t.numbers == list(range(1, COUNT + 1)), t.numbers
        assert t.reply and t.stderr == []
        assert new["job_id"] not in ("", old["job_id"]) and new["node"] in cluster.nodes
        # The old job is gone, ended by the move, well before its limit.
        running = cluster.run("squeue", "-h", "-u", hub.user, "-t", "RUNNING,PENDING",
                              "-o", "%i").stdout.split()
        assert old["job_id"] not in running and new["job_id"] in running
        assert took < 120
        # A planned move is no loss: the session manager recovered nothing.
        assert "lost" not in history(hub), history(hub)
        assert re.search(rf"moved from job {old['job_id']} on \S+ to job {new['job_id']}",
                         hub.log())
    finally:
        asyncio.run(stop_server(hub))
        end_kernel_jobs(hub)
