"""A center's deployment on the multi-node cluster, through the hub as the
deployment guide configures it (docs/admin/center_jupyterhub_config.py,
tests/harness/center.py): a user's server in a job on one node, its kernel
in a job of its own on another, each listening at its node's address."""
from __future__ import annotations

import asyncio

from tests.harness.center import CenterHub, listening
from tests.harness.hub import server_state, spawn, stop_server
from tests.harness.kernel_client import execute, kernels_url, start_kernel, warm_up
from tests.harness.wait import wait_until

KERNEL = "chspawner-python--python3"   # the center's "python" image's kernel
WHERE = "import socket; print(socket.gethostname())"


def kernel_jobs(hub: CenterHub) -> dict[str, str]:
    """{job id: node} of the user's running kernel jobs."""
    out = hub.cluster.run("squeue", "-h", "-u", hub.user, "-t", "RUNNING",
                          "-o", "%i %N %j").stdout
    return {job: node for job, node, name in (line.split(" ", 2) for line in out.splitlines())
            if name.startswith("chspawner-kernel-")}


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
    result = asyncio.run(spawn(hub, {"image": "python", "mode": "kernels"}))
    try:
        assert result.get("ready"), (result, hub.log()[-4000:])
        state = asyncio.run(server_state(hub))
        a = state["node"]
        assert a in cluster.nodes
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
