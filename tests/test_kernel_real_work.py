"""Kernels mode for real work: a kernel in the chosen image sees the user's
home and the admin's binds, starts in the notebook's directory, and is the
server's default kernel; the host's kernels are offered only when the
admin allows them.

Real parts: jupyter_server as the test user with the persistent-kernel
plugins (tests/harness/servers.py), offering only the chosen image ``deb``
as the spawner does, the image's ipykernel, a websocket client.
"""
from __future__ import annotations

import asyncio
import json
import os
import uuid

import aiohttp
import pytest

from tests.harness.kernel_client import KERNEL, connect, execute, kernels_url
from tests.harness.servers import Servers


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


async def first_kernel(s: Servers, path: str) -> tuple[dict, tuple]:
    """The kernelspecs the server offers, and what a kernel started with no
    name (the default), for a notebook in ``path``, sees."""
    async with aiohttp.ClientSession(headers=s.headers) as http:
        async with http.get(f"{s.base}/api/kernelspecs") as r:
            specs = await r.json()
        # A notebook's session: the kernel starts in the notebook's directory.
        model = {"path": f"{path}/nb.ipynb", "type": "notebook", "name": "nb.ipynb",
                 "kernel": {}}
        async with http.post(f"{s.base}/api/sessions", json=model) as r:
            assert r.status == 201, await r.text()
            kernel = (await r.json())["kernel"]
        ws = await connect(http, s, kernel["id"], uuid.uuid4().hex)
        seen = await execute(ws, "import os; print(os.getcwd()); "
                                 "print(open('data.txt').read().strip()); "
                                 "print(open('/mnt/secret').read().strip()); "
                                 "print(open('/etc/chspawner-test-image').read().strip())")
        await ws.close()
        async with http.delete(f"{kernels_url(s)}/{kernel['id']}") as r:
            assert r.status == 204
        return specs | {"started": kernel["name"]}, seen


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
