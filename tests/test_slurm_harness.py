"""The Slurm harness works: real daemons, real clients, the unprivileged user.

What the kernel and spawner tests will rely on: jobs run as the test user,
on the node the harness names, see their Slurm environment, may create user
namespaces (containers), and go away promptly when cancelled.
"""
from __future__ import annotations

import os
import pwd
import re
import socket
import time
from pathlib import Path

import pytest

from tests.harness import net
from tests.harness.procs import live_processes
from tests.harness.slurm import Slurm, SlurmError
from tests.harness.wait import wait_until

# The session fixture `slurm` comes from conftest, which imports it from
# tests.harness.slurm: one definition, so the session starts one cluster for every module.


def test_srun_runs_on_the_node(slurm: Slurm, user: pwd.struct_passwd):
    out = slurm.run("srun", "-N1", "hostname", user=user.pw_name).stdout
    assert out.strip() == slurm.node


def test_srun_runs_as_the_user(slurm: Slurm, user: pwd.struct_passwd):
    out = slurm.run("srun", "id", "-u", user=user.pw_name).stdout
    assert out.strip() == str(user.pw_uid)


def test_sbatch_writes_in_a_user_dir(slurm: Slurm, user: pwd.struct_passwd,
                                     user_dir: Path):
    result = user_dir / "result"
    job = slurm.submit(f"--chdir={user_dir}", f"--output={user_dir}/slurm-%j.out",
                       "--wrap", f"echo written by $SLURM_JOB_ID > {result}",
                       user=user.pw_name)
    assert slurm.wait_job(job, "COMPLETED") == "COMPLETED"
    assert result.read_text() == f"written by {job}\n"
    assert result.stat().st_uid == user.pw_uid
    assert (user_dir / f"slurm-{job}.out").read_text() == ""


def test_user_namespaces_in_jobs(slurm: Slurm, user: pwd.struct_passwd):
    out = slurm.run("srun", "unshare", "-Ur", "id", "-u", user=user.pw_name).stdout
    assert out.strip() == "0"


def test_scancel_kills_a_running_job(slurm: Slurm, user: pwd.struct_passwd):
    command = "sleep 3017"  # an odd duration, to find exactly our process
    job = slurm.submit("--output=/dev/null", "--wrap", command, user=user.pw_name)
    try:
        slurm.wait_job(job, "RUNNING", timeout=30)
        wait_until(lambda: live_processes(user.pw_uid, command), "the step to run", 10, every=0.05)
        start = time.monotonic()
        slurm.run("scancel", str(job), user=user.pw_name)
        assert slurm.wait_job(job, "CANCELLED", timeout=10) == "CANCELLED"
        wait_until(lambda: not live_processes(user.pw_uid, command), "the step to end", 10,
                   every=0.05)
        assert time.monotonic() - start < 10
    finally:
        slurm.run("scancel", str(job), check=False)
    slurm.wait_idle()


def test_job_environment(slurm: Slurm, user: pwd.struct_passwd):
    out = slurm.run("srun", "printenv", "SLURM_JOB_ID", "SLURM_JOB_NODELIST",
                    "SLURM_CONF", user=user.pw_name).stdout
    job_id, nodelist, conf = out.split()
    assert re.fullmatch(r"\d+", job_id)
    # srun returns while the job may still be COMPLETING: wait for its end.
    assert slurm.wait_job(int(job_id), "COMPLETED", timeout=10) == "COMPLETED"
    assert nodelist == slurm.node
    assert conf == str(slurm.conf)


def test_batch_job_environment(slurm: Slurm, user: pwd.struct_passwd,
                               user_dir: Path):
    out = user_dir / "env"
    job = slurm.submit(f"--output={out}", "--wrap", "printenv SLURM_JOB_ID",
                       user=user.pw_name)
    slurm.wait_job(job, "COMPLETED")
    assert out.read_text().strip() == str(job)


def test_failed_job_fails_wait_at_once(slurm: Slurm, user: pwd.struct_passwd):
    job = slurm.submit("--output=/dev/null", "--wrap", "exit 3", user=user.pw_name)
    start = time.monotonic()
    with pytest.raises(SlurmError, match=rf"job {job} is FAILED.*ExitCode=3:0"):
        slurm.wait_job(job, "COMPLETED", timeout=30)
    assert time.monotonic() - start < 10


def test_unknown_job_has_no_state(slurm: Slurm):
    assert slurm.job_state(999999) is None


def test_a_second_cluster_beside_the_first(slurm: Slurm, user: pwd.struct_passwd):
    """Own ports, munged and state: two harnesses don't collide, and one
    stopping leaves nothing behind (daemons reaped, directory gone)."""
    with Slurm() as other:
        assert other.ports and slurm.ports and not set(other.ports) & set(slurm.ports)
        assert other.munge_socket != slurm.munge_socket
        assert other.run("srun", "hostname", user=user.pw_name).stdout.strip() \
            == other.node
        processes = list(other.processes.values())
        workdir = other.workdir
    assert processes and all(p.returncode is not None for p in processes)
    assert not workdir.exists()
    # The session's cluster never noticed.
    assert slurm.run("srun", "true", user=user.pw_name).returncode == 0


def test_start_failure_is_one_line_with_the_log(monkeypatch):
    """A daemon that dies while starting: one line naming it, with its log."""
    monkeypatch.setattr(Slurm, "_config",
                        lambda self, hardware: "NoSuchOption=1\n")
    cluster = Slurm()
    with pytest.raises(SlurmError) as error:
        cluster.start()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("slurmctld failed to start")
    assert "NoSuchOption" in message
    assert not cluster.workdir.exists()


def test_daemons_run_as_expected(slurm: Slurm):
    """munged as munge, as Debian runs it; slurmctld and slurmd as root."""
    owners = {name: os.stat(f"/proc/{process.pid}").st_uid
              for name, process in slurm.processes.items()}
    assert owners == {"munged": pwd.getpwnam("munge").pw_uid,
                      "slurmctld": 0, "slurmd": 0}


def test_a_taken_port_is_retried(monkeypatch, user: pwd.struct_passwd):
    """Another process binding the port between free_port and slurmctld:
    start retries on fresh ports instead of failing."""
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        real = net.free_port
        ports = iter([taken])
        monkeypatch.setattr(net, "free_port", lambda: next(ports, None) or real())
        with Slurm() as cluster:
            assert taken not in cluster.ports
            assert cluster.run("srun", "true", user=user.pw_name).returncode == 0
