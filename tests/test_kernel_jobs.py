"""Kernels in Slurm jobs of their own (provisioner launcher ``sbatch``):
they outlive the Jupyter server that started them, whatever becomes of
its process or job, with their keeper beside them in the job.

Real parts: the test cluster's slurmctld and slurmd, jupyter_server as the
unprivileged user with PersistentKernelManager, the container kernel, and a
websocket client speaking the Jupyter kernel protocol.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import uuid

import aiohttp
import pytest
import zmq
import zmq.asyncio

from tests.harness.env import VENV_BIN
from tests.harness.kernel_client import (N, connect, count_to, read, send, start_kernel,
                                         warm_up, without_the_copy)
from tests.harness.servers import Servers
from tests.harness.wait import wait_until

from chspawner.persist.kernel_manager import keeper_info


def kernel_jobs(slurm, user) -> dict[str, str]:
    """{job id: state} of the user's kernel jobs."""
    return slurm.jobs(user.pw_name, "chspawner-kernel-")


@pytest.fixture
def job_servers(user, user_dir, kernel_store, slurm):
    config = {"launcher": "sbatch", "sbatch_args": [f"--partition={slurm.partition}"]}
    s = Servers(user, user_dir, kernel_store,
                [f"--ContainerKernelSpecManager.provisioner_config={json.dumps(config)}"],
                env=slurm.env)
    yield s
    try:
        s.close()
    finally:
        wait_until(lambda: not kernel_jobs(slurm, user), "the kernel jobs to end", 30)


async def unsigned_info(address: str) -> list[bytes] | None:
    """What a keeper answers to a request not signed with the kernel's key."""
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(address)
        await sock.send_multipart([b"info"])
        return await sock.recv_multipart() if await sock.poll(1000) else None
    finally:
        sock.close()


def test_a_kernel_job_outlives_its_server_and_restarts_as_a_new_job(job_servers, slurm,
                                                                      user):
    """A cell prints 1..N; the server is killed mid-way; the kernel, in its
    own job, runs on; the next server adopts it by its job and the client
    gets every number (the one in flight at the kill maybe twice: no
    session proxy here). A restart is a new job; a shutdown
    ends the job."""
    s = job_servers
    key_of = {}

    async def scenario():
        s.start()
        async with aiohttp.ClientSession(headers=s.headers) as http:
            kernel = await start_kernel(http, s)
            record = s.records()[kernel]
            key_of["key"] = record["connection_info"]["key"].encode()
            session = uuid.uuid4().hex
            ws = await connect(http, s, kernel, session)
            await warm_up(ws)
            t = await send(ws, count_to(N, 0.5))
            await read(ws, t, lambda t: len(t.numbers) >= 3)
            s.kill()
            await read(ws, t, lambda t: False)  # what was on its way, till it closes
            seen_by_first = len(t.numbers)
            await asyncio.to_thread(s.start)
            ws = await connect(http, s, kernel, session)
            await read(ws, t, lambda t: t.reply and t.idle, timeout=90)
            await ws.close()
            adopted = s.records()[kernel]

            ws = await connect(http, s, kernel, session)  # open across the restart
            async with http.post(f"{s.base}/api/kernels/{kernel}/restart") as r:
                assert r.status == 200, await r.text()
            restarted = s.records()[kernel]
            # It followed the old job's keeper: closed, for its client to reconnect.
            await read(ws, t, lambda t: False, timeout=30)
            closed_with = ws.close_code
            ws = await connect(http, s, kernel, uuid.uuid4().hex)
            await warm_up(ws)
            after = await send(ws, "print(6 * 7)")
            await read(ws, after, lambda t: t.reply and t.idle, timeout=60)
            await ws.close()
            return t, record, adopted, restarted, seen_by_first, after, closed_with

    t, record, adopted, restarted, seen_by_first, after, closed_with = asyncio.run(scenario())
    job = record["provisioner_info"]["job_id"]
    assert job and record["provisioner_info"]["pid"] is None
    assert record["keeper"].startswith("tcp://")
    assert without_the_copy(t.numbers, seen_by_first) == list(range(1, N + 1)), t.numbers
    assert t.reply and t.stderr == [] and seen_by_first < N
    assert adopted["provisioner_info"]["job_id"] == job  # the same kernel, taken over
    new_job = restarted["provisioner_info"]["job_id"]
    assert new_job != job and restarted["keeper"] != record["keeper"]
    assert after.numbers == [42]
    assert closed_with == 1012
    jobs = kernel_jobs(slurm, user)
    assert job not in jobs and jobs.get(new_job) == "RUNNING", jobs
    # The keeper is on TCP: it lets in only the kernel's CURVE key, and
    # answers only requests signed with the kernel's HMAC key.
    assert asyncio.run(unsigned_info(restarted["keeper"])) is None
    assert asyncio.run(keeper_info(restarted["keeper"], key=key_of["key"])) is None
    assert asyncio.run(keeper_info(restarted["keeper"], key=key_of["key"],
                                   connection=restarted["connection_info"]))["last_seq"] > 0


def test_a_kernel_job_nobody_recorded_ends(user, user_dir, slurm):
    """A server that dies between submitting a kernel's job and recording
    the kernel leaves a kernel no server would ever adopt: its keeper
    ends it after --record-timeout."""
    staging = user_dir / "staging"
    staging.mkdir()
    os.chown(staging, user.pw_uid, user.pw_gid)
    public, secret = zmq.curve_keypair()
    (staging / "kernel.json").write_text(json.dumps({
        "iopub_port": 1, "key": "k", "curve_publickey": public.decode(),
        "curve_secretkey": secret.decode()}))
    # What a kernel's relay writes once the kernel is up (here: nothing is).
    (staging / "relay.json").write_text(json.dumps({
        "kernel_ipc": f"{staging}/k", "kernel_ports": {"iopub_port": 2}}))
    script = (f"exec {VENV_BIN}/python -m chspawner.persist.keeper --job "
              f"--record {user_dir}/never.json --connection-file {staging}/kernel.json "
              f"--address-file {staging}/keeper --record-timeout 2 --grace 2 -- sleep 600")
    job = str(slurm.submit(f"--partition={slurm.partition}", f"--chdir={user_dir}",
                           "--output=/dev/null", f"--wrap={script}", user=user.pw_name))
    started = time.monotonic()
    slurm.wait_job(int(job), {"RUNNING"})
    wait_until(lambda: (user_dir / "staging" / "keeper").exists(), "the keeper to listen", 30)
    slurm.wait_job(int(job), {"COMPLETED", "FAILED", "CANCELLED"}, timeout=30)
    assert time.monotonic() - started < 30
