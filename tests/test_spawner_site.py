"""SlurmChSpawner's site options on a real Slurm.

On the multi-node cluster (the spawner driven directly: its own checks,
then its own ``launch()`` submits the server's job): the admin's
``constraint`` puts the job on the one node with that feature, the
admin's ``reservation`` on the reserved node; the job carries the user's
account and QOS among the admin's; the admin's set-up lines run, on that
node, before the server's command.

Through a real hub on the one-node Slurm, with an ``apply_user_options``
of the admin's in place: the server's job gets the site account, extra
sbatch arguments and set-up lines; and bad input in any field (shell
metacharacters, a newline, NUL, an over-long value, a choice the admin
did not offer) gets a one-line message and changes nothing: no job, no
server, no traceback in the hub's log.

The test clusters have no accounting (AccountingStorageType=none): Slurm
keeps any account as given and drops the QOS ("(null)" in ``scontrol show
job``), so the QOS a job was submitted with is read from slurmctld's
job_submit/logging lines (the harness's ``submissions()``). Accounts from
users' associations need slurmdbd: here, only that sacctmgr failing (no
slurmdbd) counts as no account, in one line; tests/test_spawner_options.py
covers the associations with a fake sacctmgr.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from jupyterhub.objects import Hub as HubObject

from chspawner.slurm import SlurmError
from chspawner.spawners import SlurmChSpawner
from chspawner.spawners.local import SpawnFailed
from chspawner.spawners.options import OptionError
from tests.harness.hub import Hub, spawn, spawn_page, stop_server, user_server
from tests.harness.wait import wait_until


@pytest.fixture(scope="module")
def marker(user):
    path = Path(user.pw_dir, f".chspawner-setup-{secrets.token_hex(4)}")
    yield path
    path.unlink(missing_ok=True)


# ------------------------------------------- on the multi-node cluster ---

# The "server": it notes where it runs, after the set-up line (its marker
# is $0; the server's arguments follow, unused), and stays.
SERVER = ["/bin/sh", "-c", 'echo "server $(hostname)" >> "$0"; exec sleep 600']


def cluster_spawner(cluster, user, store: str, marker: Path, **site) -> SlurmChSpawner:
    """A SlurmChSpawner as the hub makes one for the user, with the site's
    accounts and QOS and ``site`` (constraint, reservation)."""
    spawner = SlurmChSpawner(
        images=[{"name": "deb"}], site_storage=store, slurm_env=cluster.env,
        partitions=[cluster.partition], cmd=[*SERVER, str(marker)], queue_poll_interval=0.1,
        job_setup=[f'echo "setup $(hostname) $SLURM_JOB_ID" >> {marker}'],
        **{"accounts": ["lab", "physics"], "qos": ["normal", "high"], **site})
    spawner.user = SimpleNamespace(name=user.pw_name, escaped_name=user.pw_name,
                                   url=f"/user/{user.pw_name}/", groups=[])
    spawner.hub = HubObject()
    return spawner


async def submit(spawner: SlurmChSpawner, options: dict) -> None:
    """start()'s steps up to the job's submission."""
    spawner.user_options = options
    spawner.check_options()
    spawner.pick_port()
    await spawner.launch()


@pytest.mark.parametrize("site", ["constraint", "reservation"])
def test_the_server_job_lands_where_the_site_says_with_the_users_choices(
        cluster, user, kernel_store, marker, site):
    first, featured, reserved = cluster.nodes
    with cluster.features(featured, "bigmem", "ib"), \
            cluster.reservation(reserved, user.pw_name) as reservation:
        spawner = cluster_spawner(cluster, user, kernel_store, marker, **(
            {"constraint": "bigmem&ib"} if site == "constraint"
            else {"reservation": reservation}))
        asyncio.run(submit(spawner, {"image": "deb", "mode": "kernels",
                                     "account": "physics", "qos": "high"}))
        try:
            job = int(spawner.job_id)
            cluster.wait_job(job, "RUNNING")
            info = cluster.job_info(job)
            node = featured if site == "constraint" else reserved
            assert info["NodeList"] == node, info
            assert (info["Account"], info["Features"], info.get("Reservation", "")) == (
                ("physics", "bigmem&ib", "") if site == "constraint"
                else ("physics", "(null)", reservation)), info
            [request] = cluster.submissions(f"jupyterhub-{user.pw_name}")[-1:]
            assert (request["qos"], request["account"]) == ("high", "physics"), request
            # The set-up line ran on the node, in the job, before the server.
            wait_until(lambda: marker.exists() and marker.read_text().count("\n") == 2,
                       "the set-up line and the server to run")
            assert marker.read_text() == f"setup {node} {job}\nserver {node}\n"
        finally:
            asyncio.run(spawner.stop(now=True))
            marker.unlink(missing_ok=True)


def test_a_site_option_slurm_refuses_fails_the_spawn_in_one_line(cluster, user,
                                                                  kernel_store, marker):
    """The admin's mistake (a reservation that does not exist): sbatch's
    reason, in one line; nothing submitted."""
    spawner = cluster_spawner(cluster, user, kernel_store, marker, reservation="gone")
    with pytest.raises(SpawnFailed) as failed:
        asyncio.run(submit(spawner, {"image": "deb"}))
    assert str(failed.value) == ("can't submit the server's job: sbatch: error: Batch job "
                                 "submission failed: Requested reservation is invalid")
    assert spawner.job_id == ""
    assert not cluster.jobs(user.pw_name, "jupyterhub-")


def test_accounts_from_slurm_without_slurmdbd_is_no_account_in_one_line(
        cluster, user, kernel_store, marker):
    """sacctmgr needs slurmdbd, which the test cluster lacks: it fails at
    once, which counts as no account (a warning in the hub's log)."""
    spawner = cluster_spawner(cluster, user, kernel_store, marker, accounts=[],
                              accounts_from_slurm=True)
    with pytest.raises(SlurmError, match="accounting_storage/slurmdbd"):
        asyncio.run(spawner.slurm().associations(user.pw_name))
    spawner.user_options = {"image": "deb"}
    with pytest.raises(OptionError) as refused:
        asyncio.run(spawner.run_pre_spawn_hook())
    assert str(refused.value) == ("you have no Slurm account this hub may use; ask your "
                                  "site's admins for one")
    assert not cluster.jobs(user.pw_name, "jupyterhub-")


# ------------------------------------ through a hub, on the one-node Slurm ---

# The admin's own hook: a course's environment, and an option of its own.
HOOK = textwrap.dedent("""
    def apply_user_options(spawner, options):
        spawner.environment = {"COURSE": options.get("course", "none")}
    c.SlurmChSpawner.apply_user_options = apply_user_options
    c.SlurmChSpawner.extra_options = ["course"]
""")


@pytest.fixture(scope="module")
def site_hub(user, kernel_store, slurm, marker):
    extra = textwrap.dedent(f"""
        c.JupyterHub.spawner_class = "slurmchspawner"
        c.SlurmChSpawner.slurm_env = {slurm.env!r}
        c.SlurmChSpawner.partitions = ["{slurm.partition}"]
        c.SlurmChSpawner.accounts = ["lab", "physics"]
        c.SlurmChSpawner.qos = ["normal", "high"]
        c.SlurmChSpawner.max_gpus = 1
        c.SlurmChSpawner.extra_sbatch_args = ["--comment=site-extra"]
        c.SlurmChSpawner.job_setup = ['echo "setup ran in $SLURM_JOB_ID" > {marker}']
    """) + HOOK
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
        assert (info["Account"], info["Comment"].strip()) == ("physics", "site-extra"), info
        assert slurm.submissions(f"jupyterhub-{user.pw_name}")[-1]["qos"] == "high"
        wait_until(marker.exists, "the site's set-up line to run")
        assert marker.read_text() == f"setup ran in {job}\n"
    finally:
        asyncio.run(stop_server(site_hub))


# Bad values, each in every field: what a shell would act on, a second line
# of the job's script, a NUL, a value far too long.
BAD = {"semicolon": "lab;id", "subshell": "$(id)", "backticks": "`id`", "and": "lab&&id",
       "newline": "lab\n#SBATCH --qos=high", "nul": "lab\x00", "long": "a" * 5000}
TEXT_FIELDS = ("image", "mode", "partition", "account", "qos", "course")
NUMBER_FIELDS = ("cpus", "mem_gb", "hours", "gpus")


def text_refusal(field: str, value: str) -> str:
    if len(value) > 200:
        return f"{field} is too long ({len(value)} characters; at most 200)"
    first = next(c for c in value if c in ";$`&\n\x00")
    return f"{field} may not contain {first!r}"


BAD_INPUT = [
    *(pytest.param({field: value}, text_refusal(field, value), id=f"{field}-{name}")
      for field in TEXT_FIELDS for name, value in BAD.items()),
    *(pytest.param({field: value}, f"{field} must be a whole number from",
                   id=f"{field}-{name}")
      for field in NUMBER_FIELDS for name, value in {**BAD, "huge": 10 ** 400}.items()),
    pytest.param({"account": "chem"}, "account 'chem' is not offered (offered: lab, physics)",
                 id="account-not-offered"),
    pytest.param({"qos": "urgent"}, "qos 'urgent' is not offered (offered: normal, high)",
                 id="qos-not-offered"),
    pytest.param({"partition": "gpu"}, "partition 'gpu' is not offered", id="partition-not-offered"),
    pytest.param({"image": "secret"}, "image 'secret' is not offered here", id="image-not-offered"),
    pytest.param({"image": "../../etc"}, "invalid image name '../../etc'", id="image-path"),
    pytest.param({"x\ny" * 30: "1"}, "unknown options: 'x\\ny", id="key-newline"),
]


@pytest.mark.parametrize("options, words", BAD_INPUT)
def test_bad_input_in_any_field_is_one_line_and_changes_nothing(site_hub, slurm, user,
                                                                 options, words):
    before = len(site_hub.log())
    result = asyncio.run(spawn(site_hub, {"image": "deb", "mode": "kernels", **options}))
    assert result["status"] == 400, result
    message = json.loads(result["reply"])["message"]
    assert words in message and "\n" not in message and len(message) < 200, message
    assert asyncio.run(user_server(site_hub)) == {}
    assert not slurm.jobs(user.pw_name)
    # In the hub's log: the message, in one line; no traceback.
    log = site_hub.log()[before:]
    assert message in log and "Traceback" not in log, log


def test_the_spawn_form_refuses_an_over_long_number_clearly(site_hub, slurm, user):
    """A form's 5000 digits: the field's bounds (int() would refuse them
    with a Python message)."""
    status, page = asyncio.run(spawn_page(site_hub, {"image": "deb", "cpus": "9" * 5000}))
    assert status == 400, page[-2000:]
    assert "cpus must be a whole number from 1 to 8" in page
    assert asyncio.run(user_server(site_hub)) == {}
    assert not slurm.jobs(user.pw_name)
