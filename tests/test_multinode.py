"""A center's deployment on the multi-node cluster, through the hub as the
deployment guide configures it (docs/admin/center_jupyterhub_config.py,
tests/harness/center.py): a user's server in a job on one node, its kernel
in a job of its own on another, each listening at its node's address."""
from __future__ import annotations

import asyncio

import pytest

from tests.harness.center import (KERNEL, WHERE, CenterHub, end_kernel_jobs, kernel_jobs,
                                   listening, start_cell)
from tests.harness.hub import history, server_state, spawn, stop_server
from tests.harness.kernel_client import (N, Transcript, count_to, execute, kernels_url, read,
                                         reconnect, start_kernel, warm_up)
from tests.harness.wait import wait_until

# The module's hub starts within the first test's limit.
pytestmark = pytest.mark.timeout(600)


async def kernel_node(hub: CenterHub) -> tuple[str, str]:
    """A new kernel in the user's server, and where it says it runs: (kernel, node)."""
    async with hub.session() as http:
        kernel = await start_kernel(http, hub, KERNEL)
        url = f"{kernels_url(hub)}/{kernel}/channels".replace("http", "ws", 1)
        async with http.ws_connect(url) as ws:
            await warm_up(ws)
            status, output, _ = await execute(ws, WHERE)
    assert status == "ok", output
    return kernel, output.strip()


def test_server_on_one_node_kernel_on_another(center_hub, user):
    """The center's configuration as the guide gives it: the server's job on
    node A, a kernel started through the server's REST API in a job of its
    own on node B (kernel_jobs_elsewhere), both listening at their node's
    address (not on loopback, nor on every address), and the kernel answers."""
    hub, cluster = center_hub, center_hub.cluster
    # The center's other services run: the idle culler asks the hub.
    wait_until(lambda: "(idle-culler@" in hub.log(), "the idle culler to ask the hub", 60)
    result = asyncio.run(spawn(hub, {"image": "python", "mode": "kernels"}))
    try:
        assert result.get("ready"), (result, hub.log()[-4000:])
        state = asyncio.run(server_state(hub))
        a = state["node"]
        assert a in cluster.nodes
        # The site's options reached Slurm: the QOS offered (the only one).
        assert cluster.submissions(f"jupyterhub-{user.pw_name}")[-1]["qos"] == "normal"
        assert listening(cluster, a, user.pw_uid) >= {(cluster.address[a], state["port"])}
        assert {address for address, _ in listening(cluster, a, user.pw_uid)} == \
            {cluster.address[a]}

        kernel, b = asyncio.run(kernel_node(hub))
        assert b in cluster.nodes and b != a
        assert list(kernel_jobs(hub).values()) == [b]
        # The kernel's relay (5 channels) and its keeper: at B's address,
        # nothing on every address. (ipykernel itself keeps a socket of its
        # own on the node's loopback, which nothing outside the node reaches.)
        on_b = listening(cluster, b, user.pw_uid)
        at_b = {port for address, port in on_b if address == cluster.address[b]}
        assert len(at_b) >= 6 and \
            {address for address, _ in on_b} <= {cluster.address[b], "127.0.0.1"}, \
            cluster.run_on(b, "ss", "-H", "-l", "-t", "-n", "-e", "-p").stdout
    finally:
        asyncio.run(stop_server(hub))
    # Stopping the server on purpose ends its kernels' jobs.
    wait_until(lambda: not kernel_jobs(hub), "the kernel's job to end", 30)


def test_a_session_moves_off_a_lost_node(center_hub, user):
    """A cell prints 1..N in a kernel on node B while the server's node A is
    lost: the session manager brings the session back on another node at
    the same URL by itself, the new server re-attaches the kernel on B, and
    the client, reconnecting with its session id, gets every number once."""
    hub, cluster = center_hub, center_hub.cluster
    result = asyncio.run(spawn(hub, {"image": "python", "mode": "kernels"}))
    lost: list[str] = []

    async def scenario() -> Transcript:
        async with hub.session() as http:
            kernel, url, ws, t = await start_cell(http, hub, count_to(N, 0.5))
            await read(ws, t, lambda t: len(t.numbers) >= 3)
            state = await server_state(hub)
            jobs = await asyncio.to_thread(kernel_jobs, hub)
            lost.append(state["node"])
            await asyncio.to_thread(cluster.lose, state["node"])
            await read(ws, t, lambda t: False)  # what was on its way, till it closes
            assert len(t.numbers) < N
            ws = await reconnect(http, url, deadline_s=120)
            await read(ws, t, lambda t: t.reply and t.idle, timeout=120)
            assert not ws.closed, f"closed ({ws.close_code}): {t.numbers} {t.reply} {t.idle}"
            # Where the code runs now: still the kernel on B.
            status, output, _ = await execute(ws, WHERE)
            assert (status, output.strip()) == ("ok", list(jobs.values())[0])
            await ws.close()
            assert await asyncio.to_thread(kernel_jobs, hub) == jobs  # the same job
            new = await server_state(hub)
            assert new["node"] not in (state["node"], "") and new["job_id"] != state["job_id"]
            return t
    try:
        assert result.get("ready"), (result, hub.log()[-4000:])
        wait_until(lambda: history(hub)[-1:] == ["started"], "the manager to record it", 30)
        try:
            t = asyncio.run(scenario())
        except Exception as e:
            raise AssertionError(f"{e!r}; history {history(hub)}; slurmctld: "
                                 f"{cluster.log('slurmctld')[-5000:]}") from e
        assert t.numbers == list(range(1, N + 1)), t.numbers
        assert t.reply and t.stderr == []
        assert history(hub)[-3:] == ["lost", "recovering", "recovered"]
    finally:
        asyncio.run(stop_server(hub))
        end_kernel_jobs(hub)
        for node in lost:
            # (Slurm ends the jobs it had there first: slow on a busy machine.)
            cluster.restore(node, timeout=120)


def test_a_kernel_lost_with_its_node_is_told_and_replaced(center_hub, user):
    """The kernel's own node B is lost while a cell runs: the notebook is
    told so in words, in that cell's output, and the session goes on with
    a new kernel on another node (the next cell runs)."""
    hub, cluster = center_hub, center_hub.cluster
    result = asyncio.run(spawn(hub, {"image": "python", "mode": "kernels"}))
    lost: list[str] = []

    async def scenario() -> tuple[Transcript, str, str]:
        async with hub.session() as http:
            kernel, url, ws, t = await start_cell(http, hub, count_to(N, 0.5))
            await read(ws, t, lambda t: len(t.numbers) >= 3)
            [b] = (await asyncio.to_thread(kernel_jobs, hub)).values()
            lost.append(b)
            await asyncio.to_thread(cluster.lose, b)
            # The server restarts the kernel once Slurm has the job ended
            # (the node down), and closes the websocket: the client reconnects.
            await read(ws, t, lambda t: False, timeout=120)
            ws = await reconnect(http, url)
            await read(ws, t, lambda t: t.stderr, timeout=60)
            status, output, _ = await execute(ws, WHERE)
            await ws.close()
            return t, status, output.strip()
    try:
        assert result.get("ready"), (result, hub.log()[-4000:])
        server_node = asyncio.run(server_state(hub))["node"]
        try:
            t, status, now_on = asyncio.run(scenario())
        except Exception as e:
            raise AssertionError(f"{e!r}; hub log:\n{hub.log()[-6000:]}") from e
        [b] = lost
        assert f"on node {b} ended: its node failed (NODE_FAIL). A new kernel is starting" \
            in "".join(t.stderr), t.stderr
        assert status == "ok" and now_on not in (b, server_node) and now_on in cluster.nodes
        assert len(t.numbers) < N  # the cell did not go on: its kernel is gone
    finally:
        asyncio.run(stop_server(hub))
        end_kernel_jobs(hub)
        for node in lost:
            # (Slurm ends the jobs it had there first: slow on a busy machine.)
            cluster.restore(node, timeout=120)


@pytest.mark.unit
def test_the_words_say_why_a_kernel_job_ended():
    """A kernel job that ended: Slurm's word for its state says why, in
    the words of chspawner.slurm_words; said as the restart begins, then
    once it is done. (Every cause: tests/test_slurm_words.py.)"""
    from chspawner.persist.kernel_manager import lost_kernel_notice, why_job_ended
    from chspawner.slurm import Job, JobState

    assert why_job_ended(Job("7", JobState.GONE, "TIMEOUT", "n1")) == \
        "job 7 on node n1 ended: it reached its time limit (TIMEOUT)"
    assert why_job_ended(Job("7", JobState.GONE, "NODE_FAIL", "n1")) == \
        "job 7 on node n1 ended: its node failed (NODE_FAIL)"
    assert why_job_ended(None, "7", "n1") == \
        "job 7 on node n1 ended: Slurm no longer knows the job (it ended a while ago)"
    told = lost_kernel_notice(why_job_ended(Job("7", JobState.GONE, "TIMEOUT", "n1")),
                              new_node="n3")
    assert told.startswith("[chspawner] The kernel's job 7 on node n1 ended: it reached "
                           "its time limit (TIMEOUT). A new kernel was started on n3. ")
    assert "\n" not in told
    assert lost_kernel_notice(why_job_ended(Job("7", JobState.GONE, "NODE_FAIL", "n1"))) \
        .startswith("[chspawner] The kernel's job 7 on node n1 ended: its node failed "
                    "(NODE_FAIL). A new kernel is starting, as a new job. ")
