"""A kernel's session carried across moves on the multi-node cluster, as a
center runs it (docs/admin/center_jupyterhub_config.py: kernel jobs on
other nodes than the server's, kernel_session_state, kernel_move_lead):

- moved on request (the REST call JupyterLab's command makes) to another
  node: numpy arrays, a pandas frame, a function, a class and its
  instances, a generator, an open file and the random states, all there
  after the move (saved, or rebuilt by re-running their cells);
- moved before its job's time limit, without a request; then its node is
  lost and the kernel restarted elsewhere gets the latest snapshot back,
  its notebook told how old it is.

Real parts: the hub, the user's server in a Slurm job, the kernel in a
job of its own in the Debian test image (its own ipykernel, numpy and
pandas), Slurm moving and losing nodes.
"""
from __future__ import annotations

import asyncio
import json

import pytest

from tests.harness.center import KERNEL, WHERE, end_kernel_jobs, kernel_jobs, shorten
from tests.harness.hub import server_state, spawn, stop_server
from tests.harness.kernel_client import (N, Transcript, count_to, execute, kernels_url, read,
                                         reconnect, send, start_kernel, warm_up)
from tests.harness.wait import wait_until

pytestmark = pytest.mark.timeout(600)

DATA = "~/.chspawner-move-test.txt"
SESSION = [
    "import json, os, random\nimport numpy as np\nimport pandas as pd",
    f"with open(os.path.expanduser({DATA!r}), 'w') as out:\n    out.write('one\\ntwo\\nthree\\n')",
    "random.seed(7)\nnp.random.seed(7)",
    "arr = np.arange(12, dtype=float).reshape(3, 4) ** 2",
    "df = pd.DataFrame({'name': ['a', 'b', 'c'], 'value': arr[:, 0]})",
    "scale = 3\ndef twice(x):\n    return 2 * x * scale",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"
    "    def norm(self):\n        return (self.x ** 2 + self.y ** 2) ** 0.5",
    "points = [Point(3, 4), Point(6, 8)]",
    "squares = (i * i for i in range(10))\nfirst = next(squares)",
    f"f = open(os.path.expanduser({DATA!r}))\nheader = f.readline()",
    "random.random(), np.random.rand()",
    # What the random states give next, the states left as they were.
    "_r, _n = random.getstate(), np.random.get_state()\n"
    "expected = (random.random(), float(np.random.rand()))\n"
    "random.setstate(_r)\nnp.random.set_state(_n)",
]
# Every value, read without changing any: the same before and after.
LOOK = ("print(json.dumps({'arr': arr.tolist(), 'df': df.to_dict(), 'twice': twice(7), "
        "'norms': [p.norm() for p in points], "
        "'same_class': all(type(p) is Point for p in points), "
        "'first': first, 'header': header}, sort_keys=True))")
# A cell that uses them all, the unserializable ones included.
USE = ("print(json.dumps([next(squares), f.readline(), "
       "(random.random(), float(np.random.rand())) == expected]))")


def api(hub) -> str:
    """chspawner's REST calls in the user's server."""
    return kernels_url(hub).replace("/api/kernels", "/chspawner/api/kernels")


async def run_all(ws, cells: list[str]) -> None:
    for code in cells:
        status, output, ename = await execute(ws, code)
        assert status == "ok", (code, output, ename)


def test_a_session_moves_to_another_node_on_request(center_hub, user):
    """The kernel's node drained (as an admin would before maintenance),
    the move asked for: the kernel runs on a third node, every value
    serializable came as it was, the generator and the open file were
    rebuilt by re-running their cells, and a cell using them all runs."""
    hub, cluster = center_hub, center_hub.cluster
    result = asyncio.run(spawn(hub, {"image": "python", "mode": "kernels"}))
    drained: list[str] = []

    async def scenario() -> dict:
        async with hub.session() as http:
            kernel = await start_kernel(http, hub, KERNEL)
            url = f"{kernels_url(hub)}/{kernel}/channels".replace("http", "ws", 1)
            ws = await http.ws_connect(url)
            await warm_up(ws)
            await run_all(ws, SESSION)
            before = (await execute(ws, LOOK))[1]
            [(job, node)] = (await asyncio.to_thread(kernel_jobs, hub)).items()
            await asyncio.to_thread(cluster.run, "scontrol", "update", f"NodeName={node}",
                                    "State=DRAIN", "Reason=chspawner-test")
            drained.append(node)
            async with http.post(f"{api(hub)}/{kernel}/move") as r:
                moved = (r.status, await r.json())
            await ws.close()
            ws = await reconnect(http, url)  # (the server closed it: the kernel moved)
            await warm_up(ws)
            found = {"moved": moved, "from": node, "before": before,
                     "where": (await execute(ws, WHERE))[1].strip(),
                     "after": (await execute(ws, LOOK))[1],
                     "use": await execute(ws, USE),
                     "jobs": await asyncio.to_thread(kernel_jobs, hub)}
            await execute(ws, f"f.close(); os.remove(os.path.expanduser({DATA!r}))")
            await ws.close()
            return found
    try:
        assert result.get("ready"), (result, hub.log()[-4000:])
        server_node = asyncio.run(server_state(hub))["node"]
        try:
            found = asyncio.run(scenario())
        except Exception as e:
            raise AssertionError(f"{e!r}; hub log:\n{hub.log()[-6000:]}") from e
        status, report = found["moved"]
        assert status == 200 and report["ok"], report
        assert {"squares", "f"} <= set(report["rebuilt"]) and not report["lost"], report
        assert {"arr", "df", "twice", "Point", "points", "expected"} <= set(report["restored"])
        where = found["where"]
        assert where in cluster.nodes and where not in (found["from"], server_node), found
        assert list(found["jobs"].values()) == [where]
        assert found["after"] == found["before"], found
        look = json.loads(found["after"])
        assert look["twice"] == 42 and look["same_class"] and look["norms"] == [5.0, 10.0]
        assert found["use"][:2] == ("ok", '[1, "two\\n", true]\n'), found["use"]
    finally:
        for node in drained:
            cluster.run("scontrol", "update", f"NodeName={node}", "State=RESUME")
        asyncio.run(stop_server(hub))
        end_kernel_jobs(hub)


def test_a_session_moves_before_the_limit_and_comes_back_after_a_loss(center_hub, user):
    """The kernel's job is shortened to end within kernel_move_lead: the
    server moves the kernel to a new job by itself (its variables with it).
    Then that job's node is lost while a cell runs: the notebook is told
    that the session saved at the move is restored, and how old it is; the
    new kernel has it, less what ran after."""
    hub, cluster = center_hub, center_hub.cluster
    result = asyncio.run(spawn(hub, {"image": "python", "mode": "kernels"}))
    lost: list[str] = []

    async def scenario() -> dict:
        found: dict = {}
        async with hub.session() as http:
            kernel = await start_kernel(http, hub, KERNEL)
            url = f"{kernels_url(hub)}/{kernel}/channels".replace("http", "ws", 1)
            ws = await http.ws_connect(url)
            await warm_up(ws)
            await run_all(ws, ["import numpy as np", "a = np.arange(5)",
                               "g = (i for i in range(5))\nnext(g)"])
            [first_job] = await asyncio.to_thread(kernel_jobs, hub)
            await asyncio.to_thread(shorten, hub, first_job, 240)

            def moved() -> bool:
                jobs = kernel_jobs(hub)
                return bool(jobs) and first_job not in jobs
            await asyncio.to_thread(wait_until, moved, "the kernel to move to a new job", 120)
            await ws.close()
            ws = await reconnect(http, url)
            await warm_up(ws)
            found["after_move"] = await execute(ws, "print(a.sum(), next(g))")
            await run_all(ws, ["after = 1"])
            # A cell running when the node goes.
            t = await send(ws, count_to(N, 0.5))
            await read(ws, t, lambda t: len(t.numbers) >= 3)
            [(job, node)] = (await asyncio.to_thread(kernel_jobs, hub)).items()
            lost.append(node)
            await asyncio.to_thread(cluster.lose, node)
            await read(ws, t, lambda t: False, timeout=120)  # until the server closes it
            ws = await reconnect(http, url)
            await read(ws, t, lambda t: t.stderr, timeout=60)
            found["told"] = "".join(t.stderr)
            found["after_loss"] = await execute(ws, "print(a.sum(), next(g), 'after' in globals())")
            await ws.close()
        return found
    try:
        assert result.get("ready"), (result, hub.log()[-4000:])
        try:
            found = asyncio.run(scenario())
        except Exception as e:
            raise AssertionError(f"{e!r}; hub log:\n{hub.log()[-6000:]}") from e
        assert found["after_move"][:2] == ("ok", "10 1\n"), found
        told = found["told"]
        assert f"on node {lost[0]} ended: its node failed (NODE_FAIL)" in told, told
        assert "and the session saved " in told and " ago is restored into it" in told, told
        # The snapshot of the move: the generator rebuilt at its place then.
        assert found["after_loss"][:2] == ("ok", "10 1 False\n"), found
    finally:
        asyncio.run(stop_server(hub))
        end_kernel_jobs(hub)
        for node in lost:
            cluster.restore(node, timeout=120)
