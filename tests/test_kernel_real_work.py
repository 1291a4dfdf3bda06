"""Kernels mode for real work: a kernel in the chosen image sees the user's
home and the admin's binds, starts in the notebook's directory, and is the
server's default kernel; the host's kernels are offered only when the
admin allows them.

Real parts: jupyter_server as the test user with the persistent-kernel
plugins (tests/harness/servers.py), offering only the chosen image ``deb``
as the spawner does, the image's ipykernel, a websocket client; then the
same through a real JupyterHub whose ChSpawner passes it all on (the
admin's binds, offer_host_kernels, persistent kernels or not).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.harness.hub import Hub, spawn, stop_server
from tests.harness.kernel_client import KERNEL, connect, execute, kernels_url
from tests.harness.servers import Servers

#: What a kernel prints of its view: its directory, the file beside the
#: notebook, the admin's bind, the image.
LOOK = ("import os; print(os.getcwd()); print(open('data.txt').read().strip()); "
        "print(open('/mnt/secret').read().strip()); "
        "print(open('/etc/chspawner-test-image').read().strip())")


@pytest.fixture
def home(user, user_dir):
    """The user's home, with a notebook's directory and a data file in it."""
    home = user_dir / "home"
    project = home / "project"
    project.mkdir(parents=True)
    (project / "data.txt").write_text("beside the notebook\n")
    for path in (home, project, project / "data.txt"):
        os.chown(path, user.pw_uid, user.pw_gid)
    return home


def real_work_servers(user, user_dir, store, home, bind, *more: str) -> Servers:
    config = json.dumps({"binds": [f"{bind}:/mnt"]})
    return Servers(user, user_dir, store,
                   ["--ContainerKernelSpecManager.only_images=deb",
                    f"--ContainerKernelSpecManager.provisioner_config={config}", *more],
                   env={"HOME": str(home)})


async def notebook_kernel(http: aiohttp.ClientSession, s, path: str, code: str = LOOK,
                          kernel: dict | None = None) -> tuple[dict, tuple]:
    """The kernelspecs server ``s`` (Servers, or a Hub's user's server)
    offers, and what the kernel of a new notebook in ``path`` (``kernel``:
    {} for the default one, or {"name": ...}) prints running ``code``."""
    async with http.get(f"{s.base}/api/kernelspecs") as r:
        assert r.status == 200, await r.text()
        specs = await r.json()
    # A notebook's session: the kernel starts in the notebook's directory.
    name = f"nb-{uuid.uuid4().hex[:8]}.ipynb"
    model = {"path": f"{path}/{name}", "type": "notebook", "name": name,
             "kernel": kernel or {}}
    async with http.post(f"{s.base}/api/sessions", json=model) as r:
        assert r.status == 201, await r.text()
        started = (await r.json())["kernel"]
    ws = await connect(http, s, started["id"], uuid.uuid4().hex)
    seen = await execute(ws, code)
    await ws.close()
    async with http.delete(f"{kernels_url(s)}/{started['id']}") as r:
        assert r.status == 204
    return specs | {"started": started["name"]}, seen


async def first_kernel(s: Servers, path: str) -> tuple[dict, tuple]:
    """The kernelspecs the server offers, and what a kernel started with no
    name (the default), for a notebook in ``path``, sees."""
    async with aiohttp.ClientSession(headers=s.headers) as http:
        return await notebook_kernel(http, s, path)


def test_the_image_kernel_is_the_default_and_sees_home_binds_and_notebook_dir(
        user, user_dir, kernel_store, home, host_dir_outside_tmp):
    (host_dir_outside_tmp / "secret").write_text("from the admin's bind\n")
    os.chmod(host_dir_outside_tmp / "secret", 0o644)
    s = real_work_servers(user, user_dir, kernel_store, home, host_dir_outside_tmp)
    # The notebook in the home, as the server's root sees it.
    try:
        s.start()
        specs, (status, stdout, ename) = asyncio.run(first_kernel(s, "home/project"))
    except AssertionError:
        print(s.log()[-3000:])
        raise
    finally:
        s.close()
    assert specs["default"] == KERNEL and specs["started"] == KERNEL
    assert list(specs["kernelspecs"]) == [KERNEL]  # the host's python3 is not offered
    assert (status, ename) == ("ok", None), stdout
    assert stdout.split("\n")[:4] == [f"/home/{user.pw_name}/project", "beside the notebook",
                                      "from the admin's bind",
                                      "chspawner test image: Debian bookworm"]


def test_the_hosts_kernels_are_offered_when_the_admin_allows(
        user, user_dir, kernel_store, home, host_dir_outside_tmp):
    s = real_work_servers(user, user_dir, kernel_store, home, host_dir_outside_tmp,
                          "--ContainerKernelSpecManager.include_native=True")

    async def specs():
        async with aiohttp.ClientSession(headers=s.headers) as http:
            async with http.get(f"{s.base}/api/kernelspecs") as r:
                return await r.json()
    try:
        s.start()
        found = asyncio.run(specs())
    finally:
        s.close()
    assert found["default"] == KERNEL
    assert set(found["kernelspecs"]) == {KERNEL, "python3"}


# ------------------------------------------------- through the hub ----

@pytest.fixture(scope="module")
def real_work_hub(user, kernel_store):
    """A hub whose ChSpawner binds an admin's directory (at /mnt), with a
    profile of the admin's own hook (option ``plain``): kernels that end
    with their server, and the host's kernels offered beside the image's.
    In the user's real home: a project directory with a file in it."""
    site = Path(tempfile.mkdtemp(prefix="chspawner-site-", dir="/var/tmp"))
    os.chmod(site, 0o755)
    (site / "secret").write_text("from the admin's bind\n")
    os.chmod(site / "secret", 0o644)
    project = Path(tempfile.mkdtemp(prefix="chspawner-project-", dir=user.pw_dir))
    (project / "data.txt").write_text("beside the notebook\n")
    for path in (project, project / "data.txt"):
        os.chown(path, user.pw_uid, user.pw_gid)
    hub = Hub(kernel_store, user.pw_name, images=("deb",), extra_config=textwrap.dedent(f"""
        c.ChSpawner.binds = ["{site}:/mnt"]
        c.ChSpawner.extra_options = ["plain"]
        def profile(spawner, options):
            plain = options.get("plain") == "yes"
            spawner.persistent_kernels = not plain
            spawner.offer_host_kernels = plain
        c.ChSpawner.apply_user_options = profile
    """))
    yield hub, project
    hub.stop()
    shutil.rmtree(project, ignore_errors=True)
    shutil.rmtree(site, ignore_errors=True)


def test_through_the_hub_kernels_see_home_binds_and_start_beside_the_notebook(
        real_work_hub, user):
    """The spawner's defaults (persistent kernels, no host kernels), then
    the admin's plain profile (kernels end with the server, the host's
    python3 offered too, on private IPC): the image's kernel is the default
    in both, and sees the notebook's directory, the home and the bind."""
    hub, project = real_work_hub
    path = project.relative_to(user.pw_dir)  # (the server's root: the home)
    inside = f"/home/{user.pw_name}/{path}"
    expected = [inside, "beside the notebook", "from the admin's bind",
                "chspawner test image: Debian bookworm"]
    host_view = ("import os, json, ipykernel.connect as c; print(os.getcwd()); "
                 "print(json.loads(c.get_connection_info())['ip'])")

    async def session(options: dict) -> tuple:
        result = await spawn(hub, {"image": "deb", "mode": "kernels", **options})
        assert result.get("ready"), result
        try:
            async with hub.session() as http:
                image = await notebook_kernel(http, hub, str(path))
                host = None
                if options:
                    host = await notebook_kernel(http, hub, str(path), host_view,
                                                 {"name": "python3"})
                return image, host
        finally:
            await stop_server(hub)

    timings = {}
    try:
        for name, options in (("persistent", {}), ("plain", {"plain": "yes"})):
            began = time.monotonic()
            (specs, (status, stdout, ename)), host = asyncio.run(session(options))
            timings[name] = time.monotonic() - began
            assert specs["default"] == KERNEL and specs["started"] == KERNEL, name
            assert (status, ename) == ("ok", None), stdout
            assert stdout.split("\n")[:4] == expected, name
            if not options:
                assert list(specs["kernelspecs"]) == [KERNEL]
        assert set(specs["kernelspecs"]) == {KERNEL, "python3"}
        (_specs, (status, stdout, _e)) = host
        assert status == "ok", stdout
        cwd, ip = stdout.split("\n")[:2]
        # The host's kernel: in the notebook's directory on the host, its
        # sockets in the user's short private directory, not the runtime one.
        assert cwd == str(project)
        assert ip.startswith((f"/dev/shm/chspawner-{user.pw_uid}/",
                              f"/tmp/chspawner-{user.pw_uid}/")), ip
    except AssertionError:
        print(hub.log()[-4000:])
        raise
    print("seconds per spawn, kernels and stop:", timings)
