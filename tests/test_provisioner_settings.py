"""The provisioner's settings, the kernelspec templates and the contract
hooks: pure pieces, no root, no images, no Slurm."""
from __future__ import annotations

import asyncio

import logging

import pytest

from chspawner.provisioner import ContainerProvisioner, KernelStartError
from chspawner.provisioner.hooks import Adoptable, KernelJobHost
from chspawner.provisioner.kernelspecs import default_kernel, kernel_template
from chspawner.provisioner.settings import ProvisionerSettings, SettingsError

# No root, no services: part of the fast unit layer (pytest -m unit).
pytestmark = pytest.mark.unit


def test_defaults():
    s = ProvisionerSettings.from_config(None)
    assert (s.image, s.storage, s.binds, s.env, s.home) == ("", None, [], {}, True)
    assert (s.backend, s.launcher, s.jobid, s.job_log_dir) == ("builtin", "local", None, "")
    assert s.timeout() == 60 and not s.on_node
    assert ProvisionerSettings.from_config({"launcher": "sbatch"}).timeout() == 600
    assert ProvisionerSettings.from_config({"launch_timeout": 3}).timeout() == 3


def test_every_setting_has_help():
    for name, trait in ProvisionerSettings().traits().items():
        assert trait.help, name


def test_a_kernelspecs_config_as_the_cli_writes_it():
    s = ProvisionerSettings.from_config({
        "image": "deb", "binds": ["/scratch"], "home": True, "backend": "ch-run",
        "storage": "/var/tmp/s", "launcher": "srun", "srun_args": ["--partition=x"],
        "jobid": None, "env": {"A": "1"}})
    assert s.launcher == "srun" and s.on_node and s.srun_args == ["--partition=x"]
    assert s.jobid is None and s.env == {"A": "1"} and s.backend == "ch-run"
    # One bind given as a string is a list of one (not of its characters).
    assert ProvisionerSettings.from_config({"binds": "/scratch"}).binds == ["/scratch"]
    assert ProvisionerSettings.from_config({"jobid": 123}).jobid == 123


@pytest.mark.parametrize("config, words", [
    ({"binds": 5}, ["'binds'", "5 is not a list of strings"]),
    ({"home": "yes"}, ["'home'", "true or false"]),
    ({"launcher": "ssh"}, ["'launcher'", "'ssh'", "'local', 'srun', 'sbatch'"]),
    ({"launch_timeout": "soon"}, ["'launch_timeout'", "a number"]),
    ({"env": {"A": 1}}, ["'env'", "an object of strings"]),
    ({"sbatch_args": [1]}, ["'sbatch_args'", "a list of strings"]),
    ({"jobid": [1]}, ["'jobid'", "a string or an integer"]),
])
def test_a_wrong_type_is_one_clear_line(config, words):
    with pytest.raises(SettingsError) as error:
        ProvisionerSettings.from_config(config)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_an_unknown_key_is_named_in_a_warning(caplog):
    log = logging.getLogger("test-settings")
    with caplog.at_level(logging.WARNING, "test-settings"):
        s = ProvisionerSettings.from_config({"image": "deb", "bnids": ["/x"]}, log)
    assert s.image == "deb" and s.binds == []
    [record] = caplog.records
    assert "'bnids'" in record.getMessage() and "binds" in record.getMessage()


def test_the_provisioner_reports_a_wrong_setting_as_a_start_error():
    from jupyter_client.kernelspec import KernelSpec
    spec = KernelSpec(argv=["python3"], metadata={"kernel_provisioner": {
        "provisioner_name": "chspawner", "config": {"image": "deb", "home": "yes"}}})
    provisioner = ContainerProvisioner(kernel_id="k", kernel_spec=spec, parent=None)
    with pytest.raises(KernelStartError, match="provisioner config 'home'"):
        provisioner.settings


def test_the_default_kernelspec_is_the_shipped_template():
    kernel = default_kernel()
    assert kernel == kernel_template("ipykernel")
    assert kernel["argv"] == ["python3", "-m", "ipykernel_launcher", "-f",
                              "{connection_file}"]
    assert kernel["language"] == "python"


def test_the_contract_classes():
    """The provisioner offers Adoptable; a kernel manager that runs a
    program around kernels in jobs is a KernelJobHost (none by default)."""
    assert issubclass(ContainerProvisioner, Adoptable)
    assert KernelJobHost().kernel_job_command(None) == []


def test_persist_talks_to_the_provisioner_through_the_hooks():
    from pathlib import Path

    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.provisioning import LocalProvisioner

    from chspawner.persist.kernel_manager import (PersistentServerKernelManager,
                                                  can_reattach, in_job)

    def provisioner(launcher: str) -> ContainerProvisioner:
        spec = KernelSpec(argv=["python3"], metadata={"kernel_provisioner": {
            "provisioner_name": "chspawner", "config": {"image": "deb",
                                                        "launcher": launcher}}})
        return ContainerProvisioner(kernel_id="k", kernel_spec=spec, parent=None)

    assert issubclass(PersistentServerKernelManager, KernelJobHost)
    # Outside a PersistentKernelManager, no keeper goes around a job's kernel.
    assert PersistentServerKernelManager().kernel_job_command(Path("/staging")) == []
    assert can_reattach(provisioner("local")) and not in_job(provisioner("local"))
    assert in_job(provisioner("sbatch")) and not in_job(provisioner("srun"))
    native = LocalProvisioner(kernel_id="k", kernel_spec=KernelSpec(argv=["x"]), parent=None)
    assert not can_reattach(native) and not in_job(native)


def test_a_restart_keeps_the_kernel_on_its_node():
    """A restart asked while the kernel runs keeps it on its node, where its
    clients talk to it; one of a kernel found dead (its node lost) goes
    wherever Slurm puts it, and none goes onto a node it must stay off."""
    from jupyter_client.kernelspec import KernelSpec

    from chspawner.provisioner.launchers import Launcher

    class Job(Launcher):  # the one faked collaborator: runs, or not
        def __init__(self, runs: bool):
            super().__init__(logging.getLogger("test"))
            self.runs, self.stopped = runs, False

        async def poll(self):
            return None if self.runs else 0

        async def stop(self, signum):
            self.stopped = True

    spec = KernelSpec(argv=["python3"], metadata={"kernel_provisioner": {
        "provisioner_name": "chspawner", "config": {"image": "deb", "launcher": "sbatch"}}})
    provisioner = ContainerProvisioner(kernel_id="k", kernel_spec=spec, parent=None)
    provisioner.node = "n2"

    def restart(runs: bool, how: str, away: list[str]) -> list[str]:
        provisioner.launcher = Job(runs)
        asyncio.run(getattr(provisioner, how)(restart=True))
        return provisioner._same_node(away)

    for how in ("shutdown_requested", "kill", "terminate"):
        assert restart(True, how, ["--exclude=n1"]) == ["--nodelist=n2"], how
        assert restart(False, how, []) == [], how      # found dead: anywhere
    assert restart(True, "kill", ["--exclude=n2"]) == []  # the server's node now
    assert provisioner._same_node([]) == []  # once: a later start is a new choice
    provisioner.launcher = Job(True)
    asyncio.run(provisioner.kill())  # a shutdown, not a restart
    assert provisioner._same_node([]) == []
