"""SlurmChSpawner's site options on a real Slurm: the server's job gets
the admin's account and QOS (the user's choice among them), and the
admin's set-up lines run in it before the server; a choice not offered
is refused before anything is submitted.

(The test cluster has no accounting (AccountingStorageType=none): any
account is accepted and kept as given, but a job's QOS shows as "(null)";
and it has no node features or reservations, so a constraint would never
be met: QOS, ``constraint`` and ``reservation`` are tested in sbatch's
argv, in tests/test_spawner_options.py.)"""
from __future__ import annotations

import asyncio
import json
import secrets
import textwrap
from pathlib import Path

import pytest

from tests.harness.hub import Hub, spawn, stop_server, user_server
from tests.harness.wait import wait_until


@pytest.fixture(scope="module")
def marker(user):
    path = Path(user.pw_dir, f".chspawner-setup-{secrets.token_hex(4)}")
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def site_hub(user, kernel_store, slurm, marker):
    extra = textwrap.dedent(f"""
        c.JupyterHub.spawner_class = "slurmchspawner"
        c.SlurmChSpawner.slurm_env = {slurm.env!r}
        c.SlurmChSpawner.partitions = ["{slurm.partition}"]
        c.SlurmChSpawner.accounts = ["lab", "physics"]
        c.SlurmChSpawner.qos = ["normal", "high"]
        c.SlurmChSpawner.extra_sbatch_args = ["--comment=site-extra"]
        c.SlurmChSpawner.job_setup = ['echo "setup ran in $SLURM_JOB_ID" > {marker}']
    """)
    hub = Hub(kernel_store, user.pw_name, extra_config=extra)
    yield hub
    hub.stop()


def test_the_server_job_gets_the_site_account_extra_args_and_setup(site_hub, slurm, user, marker):
    result = asyncio.run(spawn(site_hub, {"image": "deb", "mode": "kernels",
                                          "account": "physics", "qos": "high"}))
    try:
        assert result.get("ready"), (result, site_hub.log()[-3000:])
        [job] = slurm.jobs(user.pw_name, "jupyterhub-")
        info = slurm.job_info(int(job))
        # (QOS: "(null)" without accounting, whatever sbatch was given.)
        assert (info["Account"], info["Comment"].strip()) == ("physics", "site-extra"), info
        wait_until(marker.exists, "the site's set-up line to run")
        assert marker.read_text() == f"setup ran in {job}\n"
    finally:
        asyncio.run(stop_server(site_hub))


@pytest.mark.parametrize("options, words", [
    ({"image": "deb", "account": "chem"}, "account 'chem' is not offered (offered: lab, "
                                          "physics)"),
    ({"image": "deb", "qos": "urgent"}, "qos 'urgent' is not offered (offered: normal, high)"),
    ({"image": "deb", "account": "lab\n#SBATCH --qos=urgent"}, "account may not contain"),
    ({"image": "deb", "partition": "nope"}, "partition 'nope' is not offered"),
])
def test_a_choice_not_offered_submits_nothing(site_hub, slurm, user, options, words):
    result = asyncio.run(spawn(site_hub, options))
    assert result["status"] == 400, result
    assert words in json.loads(result["reply"])["message"]
    assert asyncio.run(user_server(site_hub)) == {}
    assert not slurm.jobs(user.pw_name, "jupyterhub-")
