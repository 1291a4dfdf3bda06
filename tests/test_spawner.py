"""ChSpawner under a real JupyterHub with its real configurable-http-proxy:
the hub (as root) spawns the test user's server, through the REST API."""
from __future__ import annotations

import ast
import asyncio
import json
import pwd
import re
import secrets
import subprocess
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest

from chspawner.images.trees import remove_tree
from tests.harness.env import REPO
from tests.harness.hub import (Hub, kernel_in_server, server_state, spawn, spawn_page,
                                slurm_spawner_config, stop_server, user_server)
from tests.harness.wait import wait_until


@pytest.fixture(scope="module")
def hub(user, kernel_store):
    hub = Hub(kernel_store, user.pw_name)
    yield hub
    hub.stop()


def test_kernels_mode_spawn_through_the_rest_api(hub):
    result = asyncio.run(spawn(hub, {"image": "deb", "mode": "kernels"}))
    try:
        assert result["status"] in (201, 202), result["reply"]
        assert result.get("ready"), result["events"]
        assert any("kernels mode with image deb" in e for e in result["events"])
        assert asyncio.run(kernel_in_server(hub)) == \
            ("ok", "chspawner test image: Debian bookworm\n", None)
    finally:
        asyncio.run(stop_server(hub))
    # Kernels outlive a server that dies (chspawner.persist's kernel manager),
    # but one stopped on purpose takes them along: no record left.
    records = Path(pwd.getpwnam(hub.user).pw_dir, ".local/share/jupyter/runtime",
                   "chspawner-kernels")
    wait_until(lambda: not list(records.glob("*.json")), "the kernel to be shut down", 30)


@pytest.mark.parametrize("which", ["local", "slurm"])
def test_server_mode_runs_the_whole_server_in_the_image(request, which):
    """The single-user server itself in the image: its own kernel runs there."""
    hub = request.getfixturevalue("hub" if which == "local" else "slurm_hub")
    result = asyncio.run(spawn(hub, {"image": "jupyter", "mode": "server"}))
    try:
        assert result.get("ready"), (result, hub.log()[-3000:])
        assert asyncio.run(kernel_in_server(hub, "python3")) == \
            ("ok", "chspawner test image: Debian bookworm\n", None)
    finally:
        asyncio.run(stop_server(hub))


@pytest.mark.parametrize("options, words", [
    ({"image": "../etc"}, ["invalid image name"]),
    ({"image": "notoffered"}, ["not offered"]),
    ({"image": "deb", "mode": "bogus"}, ["mode 'bogus' is not offered"]),
    ({"image": "deb", "exec_prefix": "touch /tmp/pwned"}, ["unknown options"]),
    ({"image": "nopython", "mode": "server"}, ["no jupyterhub-singleuser"]),
])
def test_bad_options_are_refused_and_change_nothing(hub, options, words):
    result = asyncio.run(spawn(hub, options))
    assert result["status"] == 400, result
    for word in words:
        assert word in result["reply"], result["reply"]

    async def servers():
        async with hub.session() as http:
            async with http.get(f"{hub.url}/hub/api/users/{hub.user}") as r:
                return (await r.json())["servers"]
    assert asyncio.run(servers()) == {}
    assert not Path("/tmp/pwned").exists()


async def post_body(hub: Hub, body: str) -> tuple[int, str]:
    """POST a raw JSON ``body`` to start the user's server."""
    api = f"{hub.url}/hub/api/users/{hub.user}"
    async with hub.session() as http:
        async with http.post(api, json={}) as r:
            assert r.status in (201, 409), await r.text()  # the user exists
        async with http.post(f"{api}/server", data=body,
                             headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.text()


@pytest.mark.parametrize("body, words", [
    ('{"image": 0}', "image must be a string, not a number"),
    ('{"image": "deb", "mode": 0}', "mode must be a string, not a number"),
    ('{"image": null}', "image must be a string, not null"),
    ('{"image": ["deb"]}', "image must be a string, not an array"),
    ('{"user_options": {"image": true}}', "image must be a string, not true"),
    ("false", "the request body must be a JSON object, not false"),
    ("0", "the request body must be a JSON object, not a number"),
    ("[]", "the request body must be a JSON object, not an array"),
])
def test_options_of_the_wrong_type_are_refused(hub, body, words):
    """Types before values: a falsy option of the wrong type is not read as
    "the default" (it was: the default image spawned)."""
    status, reply = asyncio.run(post_body(hub, body))
    assert status == 400, reply
    assert words in reply, reply
    assert asyncio.run(user_server(hub)) == {}


@pytest.fixture(scope="module")
def broken_hub(user, kernel_store):
    """A hub whose server exits at once, in the image."""
    hub = Hub(kernel_store, user.pw_name, extra_config=textwrap.dedent("""
        c.ChSpawner.image_cmd = ["/bin/sh", "-c", "echo broken >&2; exit 3", "--"]
    """))
    yield hub
    hub.stop()


def test_a_server_exiting_at_once_ends_the_spawn_with_its_status(broken_hub):
    start = time.monotonic()
    result = asyncio.run(spawn(broken_hub, {"image": "jupyter", "mode": "server"}))
    assert result.get("ready") is False, result
    assert time.monotonic() - start < 30  # not the hub's 120 s http_timeout
    assert result["events"][-1] == ("Spawn failed: the server exited with status 3 "
                                    "before it answered (image jupyter, server mode)"), \
        result["events"]
    # JupyterHub's SpawnException: one line in the hub's log, no traceback.
    assert "Traceback" not in broken_hub.log(), broken_hub.log()[-3000:]


def test_options_form_lists_the_admins_images():
    from chspawner.spawners import ChSpawner
    spawner = ChSpawner(images=[{"name": "deb", "description": "Debian <ipykernel>"}],
                        modes=["kernels", "server"])
    text = spawner.render_options_form()
    assert '<option value="deb">deb — Debian &lt;ipykernel&gt;</option>' in text
    assert 'value="kernels" checked' in text and 'value="server"' in text
    assert spawner.options_from_form({"image": ["deb"], "mode": ["server"]}) == \
        {"image": "deb", "mode": "server"}


def test_options_form_escapes_the_admins_text():
    """Rendered from a template, autoescaped: a description is text."""
    from chspawner.spawners import ChSpawner
    spawner = ChSpawner(images=[{"name": "deb", "description": '"><script>x()</script>'}])
    text = spawner.render_options_form()
    assert "<script>" not in text
    assert "deb — &#34;&gt;&lt;script&gt;x()&lt;/script&gt;</option>" in text


@pytest.mark.parametrize("images, words", [
    ([{"name": "../etc"}], "ChSpawner.images[0]: invalid image name '../etc'"),
    ([{"name": "deb"}, {"name": "x", "pul": "r/x:1"}], "ChSpawner.images[1]: unknown key"),
    ([{"description": "no name"}], "ChSpawner.images[0] has no 'name'"),
    ([{"name": 3}], "ChSpawner.images[0]: 'name' must be str, not int"),
    ([{"name": "x", "description": None}], "'description' must be str, not NoneType"),
    ([{"name": "x", "pull": ["r/x:1"]}], "'pull' must be str, not list"),
    ([{"name": "x", "insecure": "yes"}], "'insecure' must be bool, not str"),
    ([{"name": "x"}, {"name": "x"}], "ChSpawner.images[1]: image 'x' is listed twice"),
])
def test_the_admins_image_list_is_checked(images, words):
    """A misspelt key or a bad name stops the hub's start with a message
    (it was ignored: "pul" never pulled)."""
    from traitlets import TraitError

    from chspawner.spawners import ChSpawner
    with pytest.raises(TraitError) as refused:
        ChSpawner(images=images)
    assert words in str(refused.value)
    ChSpawner(images=[{"name": "x", "description": "d", "pull": "r/x:1", "insecure": True}])


def test_get_command_is_the_native_server_or_the_container(tmp_path):
    """One hook for the server's argv; ``cmd`` is never swapped."""
    from types import SimpleNamespace

    from chspawner.spawners import ChSpawner
    spawner = ChSpawner(images=[{"name": "jupyter"}], cmd=["/venv/bin/jupyterhub-singleuser"],
                        image_cmd=["jupyterhub-singleuser"])
    spawner.user = SimpleNamespace(name="alice")
    spawner.store_for = lambda image: SimpleNamespace(  # the one collaborator faked
        root=tmp_path, require=lambda name: tmp_path / name,
        runnable=lambda name: tmp_path / name)
    spawner.image, spawner.mode = "jupyter", "kernels"
    args = spawner.get_args()
    assert spawner.get_command() == ["/venv/bin/jupyterhub-singleuser", *args]
    assert "--ContainerKernelSpecManager.only_images=jupyter" in args
    spawner.mode = "server"
    argv = spawner.get_command()
    image = argv.index(str(tmp_path / "jupyter"))
    assert argv[image + 1:] == ["--", "jupyterhub-singleuser", *spawner.get_args()]
    assert "--home" in argv[:image]
    assert spawner.cmd == ["/venv/bin/jupyterhub-singleuser"]
    # Nothing of one spawn's mode stays for the next (they grew the
    # ``args`` trait: kernels mode's flags reached a later server mode).
    assert spawner.args == [] and spawner.get_args() == spawner.get_args()


@pytest.mark.unit
def test_kernels_mode_args_are_the_same_for_both_spawners(tmp_path):
    """Kernels mode: the chosen image's kernels only (the host's with
    offer_host_kernels), the admin's binds in every kernel's provisioner
    config, persistent kernels or kernels that end with the server; a job
    adds its own settings to the same config (kernel_jobs)."""
    from types import SimpleNamespace

    from traitlets import TraitError

    from chspawner.spawners import ChSpawner, SlurmChSpawner

    def kernels_args(cls, **traits) -> list[str]:
        spawner = cls(images=[{"name": "deb"}], binds=["/scratch", "/data:/mnt/data"],
                      **traits)
        spawner.user = SimpleNamespace(name="alice")
        spawner.store_for = lambda image: SimpleNamespace(root=tmp_path)  # (faked)
        spawner.log_dir = lambda: tmp_path / "logs"                       # (Slurm's)
        spawner.image, spawner.mode = "deb", "kernels"
        return spawner.get_args()

    def flag(args: list[str], name: str) -> list[str]:
        return [a.partition("=")[2] for a in args if a.partition("=")[0] == name]

    local = kernels_args(ChSpawner)
    assert flag(local, "--ContainerKernelSpecManager.only_images") == ["deb"]
    assert flag(local, "--ContainerKernelSpecManager.include_native") == ["False"]
    assert flag(local, "--ContainerKernelSpecManager.storage") == [str(tmp_path)]
    assert [ast.literal_eval(c) for c in
            flag(local, "--ContainerKernelSpecManager.provisioner_config")] == \
        [{"binds": ["/scratch", "/data:/mnt/data"]}]
    assert flag(local, "--ServerApp.kernel_manager_class") == \
        ["chspawner.persist.kernel_manager.PersistentKernelManager"]
    assert "--KernelManager.transport=ipc" in local
    # Slurm without kernel jobs: the very same server (on a compute node).
    assert kernels_args(SlurmChSpawner, kernel_jobs=False) == local

    plain = kernels_args(ChSpawner, persistent_kernels=False, offer_host_kernels=True)
    assert flag(plain, "--ContainerKernelSpecManager.include_native") == ["True"]
    assert flag(plain, "--ServerApp.kernel_manager_class") == \
        ["chspawner.persist.kernel_manager.EphemeralKernelManager"]
    assert not [a for a in plain if "Persistent" in a or "Replaying" in a]
    assert kernels_args(SlurmChSpawner, persistent_kernels=False,
                        offer_host_kernels=True, kernel_jobs=True) == plain

    jobs = kernels_args(SlurmChSpawner)  # (kernel_jobs: the default)
    [config] = flag(jobs, "--ContainerKernelSpecManager.provisioner_config")
    assert ast.literal_eval(config)["binds"] == ["/scratch", "/data:/mnt/data"]
    assert ast.literal_eval(config)["launcher"] == "sbatch"
    assert ast.literal_eval(config)["away_from_server"] is False
    assert "--PersistentKernelManager.keep_kernels_on_sigterm=True" in jobs
    # Without binds, no config: the provisioner's defaults (home on).
    spawner = ChSpawner(images=[{"name": "deb"}])
    assert spawner.kernel_provisioner_config() == {}
    # A bind the runtime would refuse stops the hub, naming the entry.
    for binds, words in ((["/ok", "scratch"], "binds[1]: bind source must be an absolute"),
                         (["/a:b"], "binds[0]: bind destination must be an absolute")):
        with pytest.raises(TraitError) as refused:
            ChSpawner(binds=binds)
        assert f"ChSpawner.{words}" in str(refused.value)


@pytest.mark.unit
def test_the_kernel_managers_make_the_chosen_images_kernel_the_default(tmp_path):
    """Both kernel managers of kernels mode ask the kernelspec manager for
    the image's kernel; without an image chosen, the host's python3 stays."""
    from jupyter_client.kernelspec import KernelSpecManager

    from chspawner.persist.kernel_manager import (EphemeralKernelManager,
                                                  PrivateIpcServerKernelManager)

    class Chosen(KernelSpecManager):
        def image_default_kernel(self) -> str:
            return "chspawner-deb--python3"

    km = EphemeralKernelManager(kernel_spec_manager=Chosen(), root_dir=str(tmp_path))
    assert km.default_kernel_name == "chspawner-deb--python3"
    assert km.kernel_manager_class == \
        "chspawner.persist.kernel_manager.PrivateIpcServerKernelManager"
    assert isinstance(km.kernel_manager_factory(), PrivateIpcServerKernelManager)
    km = EphemeralKernelManager(kernel_spec_manager=KernelSpecManager(),
                                root_dir=str(tmp_path))
    assert km.default_kernel_name == "python3"


# ------------------------------------------------------------ on Slurm ----

def test_slurm_form_offers_resources_within_the_admins_bounds():
    from chspawner.spawners import SlurmChSpawner
    spawner = SlurmChSpawner(images=[{"name": "deb"}], partitions=["short", "gpu"],
                             max_cpus=4, max_gpus=2)
    text = spawner.render_options_form()
    assert '<option value="short">short</option><option value="gpu">gpu</option>' in text
    assert 'name="cpus" id="cpus" min="1" max="4" value="1"' in text
    assert 'name="gpus" id="gpus" min="0" max="2" value="0"' in text
    assert spawner.options_from_form({"image": ["deb"], "partition": ["gpu"],
                                      "cpus": ["2"], "gpus": ["1"]}) == \
        {"image": "deb", "partition": "gpu", "cpus": 2, "gpus": 1}
    assert 'name="gpus"' not in SlurmChSpawner(images=[{"name": "deb"}]).render_options_form()


def test_slurm_job_argv_is_one_builders(user, tmp_path):
    """The server's job: a small request when kernels have jobs of their
    own (which get the user's request, through the provisioner's config,
    with the same log directory), its output in the user's log directory,
    the listening check beside the server."""
    import shlex
    from types import SimpleNamespace

    from chspawner.slurm import Resources, sbatch_argv
    from chspawner.spawners import SlurmChSpawner
    spawner = SlurmChSpawner(images=[{"name": "deb"}], cmd=["/venv/bin/jupyterhub-singleuser"],
                             partitions=["short"], max_cpus=4, port=8123,
                             kernel_sbatch_args=["--account=lab"],
                             job_log_dir="{home}/logs/{username}%")
    spawner.user = SimpleNamespace(name=user.pw_name)
    spawner.store_for = lambda image: SimpleNamespace(root=tmp_path)  # (faked)
    spawner.image, spawner.mode = "deb", "kernels"
    spawner.request = {"partition": "short", "cpus": 3, "mem_gb": 4, "hours": 2, "gpus": 0}
    logs = f"{user.pw_dir}/logs/{user.pw_name}%"
    config = {"launcher": "sbatch",
              "sbatch_args": [*Resources(3, 4, 2, "short").sbatch_options(), "--account=lab"],
              "job_log_dir": logs, "away_from_server": False,
              "slurm_poll_interval": 1.0, "slurm_query_command": ["squeue"],
              "slurm_accounting_command": ["sacct"]}
    assert f"--ContainerKernelSpecManager.provisioner_config={config!r}" in spawner.get_args()
    argv = spawner.job_argv()
    script = argv[-1].removeprefix("--wrap=").split("\n")
    assert script[:-1] == spawner.bind_lines()  # (the server on its node's address)
    watch = shlex.split(script[-1].partition(" </dev/null")[0])
    assert watch[1:] == ["-m", "chspawner.spawners.listening", "--port", "8123", "--report",
                         str(spawner.report_path()), "--timeout", str(spawner.start_timeout)]
    assert argv == sbatch_argv(
        spawner.get_command(), job_name=f"jupyterhub-{user.pw_name}",
        output=f"{logs}%/server-%j.log",  # (a literal % doubled for sbatch)
        chdir=user.pw_dir, resources=Resources(cpus=1, mem_gb=2, hours=2, partition="short"),
        background=watch, setup=spawner.bind_lines())
    spawner.job_id = "77"
    assert spawner.job_log_path() == Path(logs, "server-77.log")


def test_a_job_logs_tail_is_its_last_lines_bounded(tmp_path):
    """What a failed job's log adds to the spawn error: 5 lines at most,
    2000 bytes at most, no line cut in its middle; None without a log."""
    from chspawner.spawners import joblog
    log = tmp_path / "server-1.log"
    log.write_text("".join(f"line {i}\n" for i in range(20)))
    assert asyncio.run(joblog.tail(str(log), None)) == \
        "line 15\nline 16\nline 17\nline 18\nline 19"
    log.write_text("x" * 5000 + "\nlast words\n")
    assert asyncio.run(joblog.tail(str(log), None)) == "last words"
    log.write_text("y" * 5000)
    assert asyncio.run(joblog.tail(str(log), None)) == "y" * 2000
    assert asyncio.run(joblog.tail(str(tmp_path / "none.log"), None)) is None


def test_the_job_log_directory_is_made_private_or_says_why_not(tmp_path):
    from chspawner.spawners import joblog
    logs = tmp_path / "state" / "chspawner" / "logs"
    asyncio.run(joblog.make_dir(str(logs), None))
    assert logs.is_dir() and logs.stat().st_mode & 0o777 == 0o700
    asyncio.run(joblog.make_dir(str(logs), None))  # (there already: fine)
    (tmp_path / "file").write_text("")
    with pytest.raises(joblog.JobLogError) as failed:
        asyncio.run(joblog.make_dir(str(tmp_path / "file" / "logs"), None))
    assert str(failed.value).startswith(
        f"can't create the job log directory {tmp_path}/file/logs: ")
    assert "\n" not in str(failed.value)


@pytest.fixture(scope="module")
def slurm_hub(user, kernel_store, slurm):
    hub = Hub(kernel_store, user.pw_name, extra_config=slurm_spawner_config(slurm))
    yield hub
    hub.stop()


def test_slurm_kernels_mode_spawn(slurm_hub, slurm, user):
    """The server's job is small; the user's request goes to each kernel,
    a job of its own; stopping the server ends both."""
    result = asyncio.run(spawn(slurm_hub, {"image": "deb", "mode": "kernels",
                                           "cpus": 2, "hours": 1}))
    try:
        assert result["status"] in (201, 202), result["reply"]
        assert result.get("ready"), (result["events"], slurm_hub.log()[-3000:])
        assert any(e.startswith("submitted Slurm job") for e in result["events"])
        assert any(f"running on {slurm.node}" in e for e in result["events"])
        assert any(f"server responding on {slurm.node}" in e for e in result["events"])
        assert asyncio.run(kernel_in_server(slurm_hub)) == \
            ("ok", "chspawner test image: Debian bookworm\n", None)
        [server_job] = slurm.jobs(user.pw_name, "jupyterhub-")
        [kernel_job] = slurm.jobs(user.pw_name, "chspawner-kernel-")
        assert slurm.job_info(int(server_job))["NumCPUs"] == "1"
        assert slurm.job_info(int(kernel_job))["NumCPUs"] == "2"
    finally:
        asyncio.run(stop_server(slurm_hub))
    wait_until(lambda: not slurm.jobs(user.pw_name, "chspawner-kernel-"),
               "the kernel's job to end with its server")
    # Stopping the server cancelled its job: it leaves the queue.
    deadline = time.monotonic() + 60
    while slurm.run("squeue", "-h", "-u", user.pw_name, "-n",
                    f"jupyterhub-{user.pw_name}").stdout.strip():
        assert time.monotonic() < deadline, "the server's job is still queued"
        time.sleep(0.2)


def test_slurm_no_report_path_for_a_users_token_to_abuse(slurm_hub):
    """batchspawner's report handler sets any spawner attribute a user's
    server posts, exec_prefix included. SlurmChSpawner needs none (the hub
    picks the port), so a user's own token posting there reaches nothing,
    and the running server is unchanged."""
    result = asyncio.run(spawn(slurm_hub, {"image": "deb", "mode": "kernels"}))

    async def inject() -> int:
        api = f"{slurm_hub.url}/hub/api"
        async with slurm_hub.session() as http:
            async with http.post(f"{api}/users/{slurm_hub.user}/tokens", json={}) as r:
                assert r.status == 201, await r.text()
                token = (await r.json())["token"]
        async with aiohttp.ClientSession(headers={"Authorization": f"token {token}"}) \
                as http:
            async with http.post(f"{api}/batchspawner", json={
                    "port": 1, "exec_prefix": "touch /tmp/pwned;"}) as r:
                return r.status
    try:
        assert result.get("ready"), result
        before = asyncio.run(user_server(slurm_hub))
        assert asyncio.run(inject()) == 404
        assert asyncio.run(user_server(slurm_hub)) == before
    finally:
        asyncio.run(stop_server(slurm_hub))
    assert not Path("/tmp/pwned").exists()


@pytest.mark.parametrize("options, words", [
    ({"image": "deb", "cpus": "²"}, ["cpus must be a whole number from 1 to 2"]),
    ({"image": "deb", "cpus": 1.5}, ["cpus must be a whole number from 1 to 2"]),
    ({"image": "deb", "partition": 1}, ["partition must be a string, not a number"]),
    ({"image": "deb", "partition": "gpu"}, ["partition 'gpu' is not offered"]),
    ({"image": "deb", "cpus": 64}, ["cpus must be a whole number from 1 to 2"]),
    ({"image": "deb", "hours": "1; touch /tmp/pwned"}, ["hours must be"]),
    ({"image": "deb", "gpus": 1}, ["gpus must be a whole number from 0 to 0"]),
    ({"image": "deb", "mem_gb": True}, ["mem_gb must be"]),
])
def test_slurm_options_within_bounds(slurm_hub, options, words):
    result = asyncio.run(spawn(slurm_hub, options))
    assert result["status"] == 400, result
    for word in words:
        assert word in result["reply"]
    assert not Path("/tmp/pwned").exists()


@pytest.mark.parametrize("cpus", ["²", "٣", "1.5", "-1"])
def test_slurm_form_refuses_what_is_not_a_whole_number_clearly(slurm_hub, cpus):
    """A superscript two passed str.isdigit() and failed int() with a
    Python message; now every non-number gets the field's bounds."""
    status, page = asyncio.run(spawn_page(slurm_hub, {"image": "deb", "cpus": cpus}))
    assert status == 400, page[-2000:]
    assert "cpus must be a whole number from 1 to 2" in page
    assert "invalid literal" not in page
    assert asyncio.run(user_server(slurm_hub)) == {}


# ------------------------------------------------- restarts and losses ----

@pytest.mark.parametrize("which", ["local", "slurm"])
def test_hub_restart_reattaches_and_lost_servers_are_noticed(request, which, slurm):
    hub = request.getfixturevalue("hub" if which == "local" else "slurm_hub")
    result = asyncio.run(spawn(hub, {"image": "deb", "mode": "kernels"}))
    try:
        assert result.get("ready"), (result, hub.log()[-3000:])
        before = asyncio.run(user_server(hub))
        hub.restart()
        after = asyncio.run(user_server(hub))
        assert after.get("ready") and after["url"] == before["url"]
        # Still the same server, and its kernels still run in the image.
        assert asyncio.run(kernel_in_server(hub))[1] == \
            "chspawner test image: Debian bookworm\n"
        # Now lose it behind the hub's back: the hub notices by itself.
        if which == "slurm":
            jobs = slurm.run("squeue", "-h", "-o", "%i", "-n",
                             f"jupyterhub-{hub.user}").stdout.split()
            slurm.run("scancel", *jobs)
        else:
            subprocess.run(["pkill", "-KILL", "-u", hub.user, "-f",
                            "jupyterhub-singleuser"], check=False)
        wait_until(lambda: not asyncio.run(user_server(hub)), "the hub to notice")
    finally:
        asyncio.run(stop_server(hub))
        if which == "slurm":
            # The kernel's job outlived the lost server, for a successor to
            # take over (test_session_manager has one); none comes here.
            left = slurm.jobs(hub.user, "chspawner-kernel-")
            if left:
                slurm.run("scancel", *left)


def test_slurm_controller_outage_never_drops_a_running_server(slurm_hub, slurm):
    result = asyncio.run(spawn(slurm_hub, {"image": "deb", "mode": "kernels"}))
    try:
        assert result.get("ready"), (result, slurm_hub.log()[-3000:])
        with slurm.controller_down():
            # The hub polls every second, through its one watch of Slurm
            # jobs, which says once that Slurm doesn't answer: let a few
            # polls fail (a few seconds of the outage), the server kept.
            wait_until(lambda: "Slurm does not answer" in slurm_hub.log(),
                       "the hub to find slurmctld down")
            outage = time.monotonic() + 3
            wait_until(lambda: time.monotonic() > outage
                       and asyncio.run(user_server(slurm_hub)).get("ready"),
                       "a few polls of the server while slurmctld is down")
        back = wait_until(lambda: re.search(r"Slurm answers again, after [\d.]+ s and "
                                            r"(\d+) failed queries", slurm_hub.log()),
                          "the hub to find slurmctld back")
        # (A squeue that can't reach slurmctld takes seconds to give up.)
        assert int(back.group(1)) >= 1, back.group(0)
        assert slurm_hub.log().count("Slurm does not answer") == 1  # (once per outage)
        assert asyncio.run(user_server(slurm_hub)).get("ready")
        assert asyncio.run(kernel_in_server(slurm_hub))[1] == \
            "chspawner test image: Debian bookworm\n"
    finally:
        asyncio.run(stop_server(slurm_hub))


@pytest.fixture(scope="module")
def broken_slurm_hub(user, kernel_store, slurm):
    """A hub whose server command fails at once on the node, saying why.
    Its job logs go to a directory of this test's own in the user's home
    (the default's place, a name of its own), which does not exist yet."""
    state = Path(user.pw_dir, ".local/state", f"chspawner-test-{secrets.token_hex(4)}")
    extra = textwrap.dedent(f"""
        c.JupyterHub.spawner_class = "slurmchspawner"
        c.SlurmChSpawner.slurm_env = {slurm.env!r}
        c.SlurmChSpawner.job_log_dir = "{{home}}/.local/state/{state.name}/logs"
        c.Spawner.cmd = ["/bin/sh", "-c", "echo starting; echo broken: no such thing >&2; "
                                          "exit 3"]
    """)
    hub = Hub(kernel_store, user.pw_name, extra_config=extra)
    hub.logs = state / "logs"
    yield hub
    hub.stop()
    remove_tree(state)


def test_slurm_job_failing_before_the_server_answers_ends_the_spawn(broken_slurm_hub, user):
    """At once, with the job's state and the end of its log: the job's
    output is kept, in the user's log directory (made by the user, theirs
    alone), one file per job."""
    import stat
    start = time.monotonic()
    result = asyncio.run(spawn(broken_slurm_hub, {"image": "deb", "mode": "kernels"}))
    assert result.get("ready") is False, result
    assert time.monotonic() - start < 30  # not the hub's 120 s http_timeout
    job = next(e.split()[3] for e in result["events"] if e.startswith("submitted Slurm job"))
    log = broken_slurm_hub.logs / f"server-{job}.log"
    # (Its state: gone, or caught while Slurm tidies up after it.)
    assert re.fullmatch(
        rf"Spawn failed: Slurm job {job} ended before the server answered \([A-Za-z, ]+\); "
        rf"the end of its log, {re.escape(str(log))}:\nstarting\nbroken: no such thing",
        result["events"][-1]), result["events"]
    info, logs = log.lstat(), broken_slurm_hub.logs.lstat()
    assert stat.S_ISREG(info.st_mode) and info.st_uid == user.pw_uid
    assert stat.S_ISDIR(logs.st_mode) and logs.st_uid == user.pw_uid
    assert stat.S_IMODE(logs.st_mode) == 0o700


async def spawn_until(hub: Hub, options: dict, word: str) -> list[str]:
    """Start a spawn and follow its progress until a message has ``word``."""
    api = f"{hub.url}/hub/api/users/{hub.user}"
    events = []
    async with hub.session() as http:
        async with http.post(f"{api}/server", json=options) as r:
            # (JupyterHub may answer 201 for a spawn still pending, when it
            # replaced a spawner whose last spawn failed: the stream tells.)
            assert r.status in (201, 202), await r.text()
        async with asyncio.timeout(60):
            async with http.get(f"{api}/server/progress") as stream:
                async for line in stream.content:
                    if line.startswith(b"data:"):
                        events.append(json.loads(line[5:]).get("message", ""))
                        if word in events[-1]:
                            return events
    raise AssertionError(events)


def queued_jobs(slurm, user) -> list[str]:
    return slurm.run("squeue", "-h", "-o", "%i", "-n", f"jupyterhub-{user}").stdout.split()


def test_slurm_stop_during_the_queue_wait_cancels_the_job(slurm_hub, slurm, drained):
    events = asyncio.run(spawn_until(slurm_hub, {"image": "deb"}, " waits: "))
    assert any(e.startswith("submitted Slurm job") for e in events)
    # (The node drained: Slurm's reason, in words.)
    assert "nodes it needs are not available (down, drained or reserved)" in events[-1], \
        events
    assert "place 1 of 1 in the queue" in events[-1], events
    assert len(queued_jobs(slurm, slurm_hub.user)) == 1
    asyncio.run(stop_server(slurm_hub))
    wait_until(lambda: not queued_jobs(slurm, slurm_hub.user), "the job to go")


def test_slurm_a_job_held_behind_another_says_why_where_and_when(slurm_hub, slurm):
    """Another job holds the whole node for 10 minutes: the spawn page
    says, in words, that the server's job waits for busy nodes, its place
    in the queue and when Slurm expects it to start (the blocker's end);
    once the blocker ends, the job starts and the server answers."""
    blocker = slurm.submit("--exclusive", "--time=10", "--job-name=blocker",
                           "--output=/dev/null", "--wrap=sleep 600")
    try:
        slurm.wait_job(blocker, {"RUNNING"})
        events = asyncio.run(spawn_until(slurm_hub, {"image": "deb"}, "Slurm expects it"))
        said = events[-1]
        job = next(e.split()[3] for e in events if e.startswith("submitted Slurm job"))
        assert said.startswith(f"job {job} waits: the nodes it needs are busy with other "
                               "jobs (Resources); place 1 of 1 in the queue; Slurm expects "
                               "it to start at "), events
        # (The blocker's end: ten minutes after it started, give or take.)
        assert re.search(r"\(in (9|10) min\)$", said), said
    finally:
        slurm.run("scancel", str(blocker))
    wait_until(lambda: asyncio.run(user_server(slurm_hub)).get("ready"),
               "the server to be ready once the node is free", 120)
    asyncio.run(stop_server(slurm_hub))
    wait_until(lambda: not queued_jobs(slurm, slurm_hub.user), "the job to go")


def test_slurm_a_server_job_ended_by_someone_else_is_explained_on_the_form(slurm_hub, slurm):
    """An administrator cancels the running server's job (scancel, as
    root): once the hub's poll has seen it gone, the spawn form says
    which job ended, on which node, and why, in words; with no Slurm
    accounting here, that who cancelled it is not known. The next spawn's
    page says it first."""
    result = asyncio.run(spawn(slurm_hub, {"image": "deb"}))
    assert result.get("ready"), result
    state = asyncio.run(server_state(slurm_hub))
    job, node = state["job_id"], state["node"]
    slurm.run("scancel", job)
    # (The hub polls its servers every poll_interval, 30 s by default.)
    wait_until(lambda: asyncio.run(user_server(slurm_hub)) == {},
               "the hub to see the server's job gone", 90)
    status, page = asyncio.run(spawn_page(slurm_hub))
    said = re.search(r'id="chspawner-last-end">([^<]*)<', page)
    assert status == 200 and said, page[-2000:]
    assert re.fullmatch(
        rf"Your last server&#39;s job {job} on node {node} ended: it was cancelled "
        r"\(CANCELLED\); by whom is not known here: only Slurm&#39;s accounting "
        r"\(slurmdbd\) records that \(at \d\d:\d\d\)\.", said[1]), said[1]
    result = asyncio.run(spawn(slurm_hub, {"image": "deb"}))
    try:
        events = result["events"]
        said = [i for i, e in enumerate(events)
                if e.startswith(f"Your last server's job {job} on node {node} ended: it was "
                                "cancelled")]
        submitted = [i for i, e in enumerate(events) if e.startswith("submitted Slurm job")]
        assert result.get("ready") and said and said[0] < submitted[0], result
    finally:
        asyncio.run(stop_server(slurm_hub))
    # Said, and the server stopped on purpose: nothing on the next form.
    status, page = asyncio.run(spawn_page(slurm_hub))
    assert status == 200 and "chspawner-last-end" not in page
    wait_until(lambda: not queued_jobs(slurm, slurm_hub.user), "the job to go")


def test_slurm_hub_restart_during_the_queue_wait_reattaches(slurm_hub, slurm, drained):
    """The job id was saved at submission: the restarted hub follows the
    same job until its server answers, and no second job is submitted."""
    events = asyncio.run(spawn_until(slurm_hub, {"image": "deb"}, " waits: "))
    job = next(e.split()[3] for e in events if e.startswith("submitted Slurm job"))
    try:
        slurm_hub.restart(wait_checked=False)
        assert queued_jobs(slurm, slurm_hub.user) == [job]
        drained()  # resume: the job starts
        wait_until(lambda: asyncio.run(user_server(slurm_hub)).get("ready"),
                   "the re-attached server to be ready", 120)
        assert queued_jobs(slurm, slurm_hub.user) == [job]
        assert asyncio.run(kernel_in_server(slurm_hub))[1] == \
            "chspawner test image: Debian bookworm\n"
    finally:
        asyncio.run(stop_server(slurm_hub))
    wait_until(lambda: not queued_jobs(slurm, slurm_hub.user), "the job to go")


# ------------------------------------------------ pulled on first use ----

@pytest.fixture
def pulling_hub(user, user_dir, kernel_store, registry, test_images):
    """A hub whose admin lists images by registry reference only: the site
    store (the test user's) starts empty."""
    yield from _pulling_hub(user, user_dir, kernel_store, registry, test_images)


@pytest.fixture
def limited_pulling_hub(user, user_dir, kernel_store, registry, test_images):
    """The same, with the admin's limit on an image's unpacked size."""
    yield from _pulling_hub(user, user_dir, kernel_store, registry, test_images,
                            'c.ChSpawner.pull_args = ["--max-size=1K"]')


def _pulling_hub(user, user_dir, kernel_store, registry, test_images, more: str = ""):
    store = user_dir / "site"
    subprocess.run([str(REPO / "scripts/as-user.sh"), user.pw_name, "mkdir", str(store)],
                   check=True)
    images = [{"name": "hello", "description": "pulled on first use", "insecure": True,
               "pull": test_images.one.at(registry)},
              {"name": "missing", "insecure": True,
               "pull": f"{registry.host}/no/such:image"}]
    hub = Hub(kernel_store, user.pw_name, extra_config=textwrap.dedent(f"""
        c.ChSpawner.images = {images!r}
        c.ChSpawner.site_storage = "{store}"
        c.ChSpawner.modes = ["kernels"]
    """) + more)
    hub.site = store
    yield hub
    hub.stop()


def test_an_admins_image_is_pulled_on_its_first_spawn(pulling_hub):
    result = asyncio.run(spawn(pulling_hub, {"image": "hello"}))
    try:
        assert result.get("ready"), (result, pulling_hub.log()[-3000:])
        pulled = [e for e in result["events"] if e.startswith("image hello: ")]
        assert any("download" in e and "%" in e for e in pulled), result["events"]
        assert (pulling_hub.site / "img/hello/hello.txt").is_file()
        assert result["events"].index(pulled[-1]) < \
            next(i for i, e in enumerate(result["events"]) if "starting" in e)
    finally:
        asyncio.run(stop_server(pulling_hub))
    # The next spawn uses the stored image: no second pull.
    result = asyncio.run(spawn(pulling_hub, {"image": "hello"}))
    asyncio.run(stop_server(pulling_hub))
    assert result.get("ready") and not any("pulling" in e for e in result["events"])


def test_the_admins_pull_limits_apply(limited_pulling_hub):
    result = asyncio.run(spawn(limited_pulling_hub, {"image": "hello"}))
    assert result.get("ready") is False, result
    assert result["events"][-1].startswith("Spawn failed: can't pull image hello: "), \
        result["events"]
    assert "1K" in result["events"][-1] or "1024" in result["events"][-1], result["events"]
    assert not (limited_pulling_hub.site / "img/hello").exists()


def test_a_failed_pull_fails_the_spawn_with_its_reason(pulling_hub):
    result = asyncio.run(spawn(pulling_hub, {"image": "missing"}))
    assert result.get("ready") is False, result
    assert result["events"][-1].startswith(
        "Spawn failed: can't pull image missing: "), result["events"]
    assert "no/such:image: HTTP 404" in result["events"][-1]
    assert not (pulling_hub.site / "img/missing").exists()
    assert not asyncio.run(user_server(pulling_hub))
