"""A kernel's death explained: a kernel in a Slurm job of its own whose job
ends (its time limit, its memory, a preemption, a cancel by its user or by
an administrator) tells its notebook why, in words, in the running cell's
output; and is started again as a new job, except after a cancel, which is
on purpose (the notebook is told it is not restarted, and the kernel is
dead). Each cause is produced for real, by Slurm itself:

- TIMEOUT: the job's own limit (``--time=1``; slurmctld checks limits
  every 30 s, so it ends 60 to 90 s after it started);
- OUT_OF_MEMORY: the cell allocates beyond the job's ``--mem``; Slurm's
  task/cgroup plugin confines the job's memory (cgroup v1 or v2, whichever
  the machine has), the kernel is killed by the cgroup's OOM killer and
  slurmstepd reports the job so;
- PREEMPTED: a job of the ``urgent`` partition (a higher PriorityTier,
  PreemptType=preempt/partition_prio, PreemptMode=CANCEL) takes the node;
- CANCELLED: scancel as the test user, and as root; who cancelled comes
  from Slurm's accounting (slurmdbd on MariaDB), as a site with accounting
  has it.

NODE_FAIL needs a node to lose: tests/test_multinode.py
(test_a_kernel_lost_with_its_node_is_told_and_replaced).

Real parts: the test cluster (one node, with accounting, memory limits and
preemption: tests/harness/slurm.py's options), jupyter_server as the
unprivileged user with PersistentKernelManager, the container kernel, and
a websocket client speaking the Jupyter kernel protocol.
"""
from __future__ import annotations

import asyncio
import json
import pwd
import time
import uuid
from collections.abc import Callable, Iterator

import aiohttp
import pytest

from tests.harness.kernel_client import (Transcript, connect, count_to, execute, send,
                                         start_kernel, warm_up)
from tests.harness.servers import Servers
from tests.harness.slurm import Slurm, SlurmError
from tests.harness.wait import wait_until

RESTARTED = ("A new kernel is starting, as a new job. Its variables and imports are "
             "gone: run the cells it needs again.")
NOT_RESTARTED = ("It is not restarted: a cancel is on purpose. Its variables and imports "
                 "are gone: start a kernel again to go on.")
# A cell that runs until its kernel ends (a number every half second).
LONG_CELL = count_to(100_000, 0.5)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Slurm]:
    """The one-node cluster with what these endings need. Memory limits
    need cgroups that slurmd can use: where it can't, the cluster starts
    without them and the out-of-memory test says why it was skipped."""
    try:
        cluster = Slurm(accounting=True, memory_limits=True, preemption=True).start()
        cluster.no_memory_limits = ""
    except SlurmError as e:
        if "cgroup" not in str(e).lower():
            raise
        cluster = Slurm(accounting=True, preemption=True).start()
        cluster.no_memory_limits = str(e)
    try:
        yield cluster
    finally:
        cluster.stop()


def kernel_jobs(cluster: Slurm, user) -> dict[str, str]:
    """{job id: state} of the user's kernel jobs."""
    return cluster.jobs(user.pw_name, "chspawner-kernel-")


@pytest.fixture
def servers(user, user_dir, kernel_store, cluster) -> Iterator[Callable[..., Servers]]:
    """A Jupyter server with kernels as jobs, each submitted with the given
    sbatch arguments; closed after, its kernel jobs ended."""
    made: list[Servers] = []

    def make(*sbatch_args: str) -> Servers:
        config = {"launcher": "sbatch",
                  "sbatch_args": [f"--partition={cluster.partition}", *sbatch_args]}
        s = Servers(user, user_dir, kernel_store,
                    [f"--ContainerKernelSpecManager.provisioner_config={json.dumps(config)}"],
                    env=cluster.env)
        made.append(s)
        return s

    yield make
    try:
        if cluster.urgent_partition:  # (first: a kernel restarted after it waits for it)
            cluster.run("scancel", f"--partition={cluster.urgent_partition}", check=False)
        for s in made:
            try:
                s.close()
            except AssertionError as e:
                raise AssertionError(f"{e}; server log:\n{s.log()[-8000:]}") from e
    finally:
        cluster.run("scancel", f"--user={user.pw_name}", check=False)
        wait_until(lambda: not kernel_jobs(cluster, user), "the kernel jobs to end", 30)


class Told:
    """What the client got: the cell's transcript, and the kernel statuses
    the server sent of its own (restarting, dead)."""

    def __init__(self, transcript: Transcript):
        self.t = transcript
        self.statuses: list[str] = []
        self.closed = False

    @property
    def words(self) -> str:
        return "".join(self.t.stderr)


async def read_until(ws, told: Told, until: Callable[[Told], bool], timeout: float) -> None:
    """Feed ``told`` until ``until(told)``, or the websocket closes (the
    server closes it when a restart moves the kernel)."""
    async with asyncio.timeout(timeout):
        while not until(told):
            frame = await ws.receive()
            if frame.type != aiohttp.WSMsgType.TEXT:
                told.closed = True
                return
            msg = json.loads(frame.data)
            told.t.feed(msg)
            if msg["msg_type"] == "status" and not msg["parent_header"]:
                told.statuses.append(msg["content"]["execution_state"])


def end_a_kernel_job(s: Servers, code: str, end: Callable[[str], None],
                     timeout: float = 60) -> tuple[str, Told]:
    """Start the server and a kernel, run ``code`` until it printed, end the
    kernel's job with ``end(job_id)``, and read until the notebook is told
    why (and the kernel restarts or is declared dead). (The job, what the
    client got.)"""
    async def scenario() -> tuple[str, Told]:
        await asyncio.to_thread(s.start)
        async with aiohttp.ClientSession(headers=s.headers) as http:
            kernel, session = await start_kernel(http, s), uuid.uuid4().hex
            ws = await connect(http, s, kernel, session)
            await warm_up(ws)
            # The job before the cell runs: a cell that ends its own job
            # (out of memory) may see the kernel restarted in a new job
            # before its first output is read.
            job = str(s.records()[kernel]["provisioner_info"]["job_id"])
            told = Told(await send(ws, code, session))
            await read_until(ws, told, lambda told: told.t.stdout, 60)
            await asyncio.to_thread(end, job)
            await read_until(ws, told, lambda told: told.words and (
                {"restarting", "dead"} & set(told.statuses)), timeout)
            await ws.close()
            told.kernel = kernel
            return job, told
    try:
        return asyncio.run(scenario())
    except Exception as e:
        raise AssertionError(f"{e!r}; server log:\n{s.log()[-6000:]}") from e


def notice(job: str, node: str, because: str, then: str = RESTARTED) -> str:
    return f"[chspawner] The kernel's job {job} on node {node} ended: {because}. {then}\n"


def assert_restarted(s: Servers, kernel: str, job: str) -> None:
    """The kernel runs again, in a new job: its record names a new job, and
    a cell runs on it (the restart done, not under way)."""
    def new_job() -> bool:
        record = s.records().get(kernel) or {}
        return str(record.get("provisioner_info", {}).get("job_id") or job) != job
    wait_until(new_job, "the kernel to run again in a new job", 60)

    async def run_a_cell() -> tuple[str, str, str | None]:
        async with aiohttp.ClientSession(headers=s.headers) as http:
            ws = await connect(http, s, kernel, uuid.uuid4().hex)
            try:
                return await execute(ws, "print(6 * 7)")
            finally:
                await ws.close()
    assert asyncio.run(run_a_cell()) == ("ok", "42\n", None)


def test_a_kernel_job_at_its_time_limit(servers, cluster, user):
    """--time=1: Slurm ends the job at its limit (TIMEOUT); the notebook is
    told, and a new kernel job starts."""
    s = servers("--time=1")
    started = time.monotonic()
    job, told = end_a_kernel_job(s, LONG_CELL, lambda job: None, timeout=150)
    assert told.words == notice(job, cluster.node, "it reached its time limit (TIMEOUT)"), \
        told.words
    assert "restarting" in told.statuses and "dead" not in told.statuses
    assert_restarted(s, told.kernel, job)
    assert time.monotonic() - started < 150


def test_a_kernel_job_over_its_memory(servers, cluster, user):
    """--mem=600M and a cell that allocates 2 GiB: the cgroup's OOM killer
    ends the kernel, Slurm the job (OUT_OF_MEMORY); told, and restarted."""
    if cluster.no_memory_limits:
        pytest.skip(f"slurmd can't confine memory here: {cluster.no_memory_limits}")
    s = servers("--mem=600M")
    code = "print('allocating', flush=True)\nx = bytearray(2 << 30)\nprint('still here')\n"
    job, told = end_a_kernel_job(s, code, lambda job: None)
    assert told.words == notice(
        job, cluster.node,
        "it used more memory than its job asked for, and was killed (OUT_OF_MEMORY)"), \
        told.words
    assert "still here\n" not in told.t.stdout
    assert_restarted(s, told.kernel, job)


def test_a_kernel_job_preempted(servers, cluster, user):
    """A job of the urgent partition wants the whole node: Slurm cancels the
    kernel's job (PREEMPTED); told, and a new kernel job waits in the
    queue."""
    s = servers()

    def preempt(job: str) -> None:
        cluster.submit(f"--partition={cluster.urgent_partition}", "--exclusive",
                       "--output=/dev/null", "--wrap=sleep 300")

    job, told = end_a_kernel_job(s, LONG_CELL, preempt)
    assert told.words == notice(
        job, cluster.node, "it was preempted by a job of higher priority (PREEMPTED)"), \
        told.words
    # Its new job waits for the node while the urgent one holds it.
    wait_until(lambda: list(kernel_jobs(cluster, user).values()) == ["PENDING"],
               "the new kernel job to wait in the queue", 30)
    cluster.run("scancel", f"--partition={cluster.urgent_partition}")
    assert_restarted(s, told.kernel, job)


@pytest.mark.parametrize("by", ["user", "root"])
def test_a_kernel_job_cancelled(servers, cluster, user, by):
    """scancel, as the kernel's user or as root: the notebook is told who
    cancelled it (Slurm's accounting knows), and that it is not restarted;
    the kernel is dead, and no new job is submitted."""
    s = servers()
    as_user = user.pw_name if by == "user" else None
    job, told = end_a_kernel_job(s, LONG_CELL,
                                 lambda job: cluster.run("scancel", job, user=as_user))
    who = "by you" if by == "user" else \
        f"by an administrator, {pwd.getpwuid(0).pw_name}"
    assert told.words == notice(job, cluster.node, f"it was cancelled {who} (CANCELLED)",
                                NOT_RESTARTED), told.words
    assert "dead" in told.statuses and "restarting" not in told.statuses, told.statuses

    async def kernel_status() -> int:
        async with aiohttp.ClientSession(headers=s.headers) as http:
            async with http.get(f"{s.base}/api/kernels/{told.kernel}") as r:
                return r.status
    assert asyncio.run(kernel_status()) == 404  # dropped, as a dead kernel is
    assert not kernel_jobs(cluster, user)  # and nothing started in its place
    assert not s.records()
