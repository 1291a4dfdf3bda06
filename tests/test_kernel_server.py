"""Image kernels the way a notebook user meets them: a real jupyter_server
(as the unprivileged user) offering them through its REST and websocket
API, and the jupyter_kernel_test conformance suite against one."""
from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import textwrap

import aiohttp
import pytest

from tests.harness.env import AS_USER, CHSPAWNER, VENV_BIN
from tests.harness.kernel_client import KERNEL, execute, warm_up
from tests.harness.net import free_port
from tests.harness.users import as_user
from tests.harness.wait import wait_listening


@pytest.fixture
def server(user, user_dir, kernel_store):
    """jupyter_server as the test user, discovering kernels in its store."""
    port, token = free_port(), secrets.token_hex(16)
    proc = subprocess.Popen(
        [str(AS_USER), user.pw_name, "env", f"TMPDIR={user_dir}",
         str(VENV_BIN / "jupyter-server"), "--no-browser", f"--port={port}",
         "--ip=127.0.0.1", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={user_dir}",
         "--ServerApp.kernel_spec_manager_class="
         "chspawner.provisioner.kernelspecs.ContainerKernelSpecManager",
         f"--ContainerKernelSpecManager.storage={kernel_store}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    wait_listening(port, proc, lambda: proc.stderr.read()[-2000:])
    yield base, token, kernel_store
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def picker_flow(base: str, token: str) -> dict:
    headers = {"Authorization": f"token {token}"}
    report = {}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{base}/api/kernelspecs") as r:
            report["specs"] = (await r.json())["kernelspecs"]
        async with http.post(f"{base}/api/kernels", json={"name": KERNEL}) as r:
            assert r.status == 201, await r.text()
            kernel = (await r.json())["id"]
        api = f"{base}/api/kernels/{kernel}"
        async with http.ws_connect(api.replace("http", "ws") + "/channels") as ws:
            await warm_up(ws)
            report["marker"] = await execute(
                ws, "print(open('/etc/chspawner-test-image').read().strip())")

            async def interrupt():
                async with http.post(f"{api}/interrupt") as r:
                    assert r.status == 204

            await execute(ws, "x = 42")
            report["interrupted"] = await execute(
                ws, "import time; print('sleeping', flush=True); time.sleep(60)",
                on_start=interrupt)
        async with http.post(f"{api}/restart") as r:
            assert r.status == 200
        async with http.ws_connect(api.replace("http", "ws") + "/channels") as ws:
            await warm_up(ws)
            report["after_restart"] = await execute(ws, "print('x' in globals())")
        async with http.delete(api) as r:
            report["deleted"] = r.status
        async with http.get(f"{base}/api/kernels") as r:
            report["remaining"] = await r.json()
    return report


async def list_specs(base: str, token: str) -> dict:
    async with aiohttp.ClientSession(headers={"Authorization": f"token {token}"}) as http:
        async with http.get(f"{base}/api/kernelspecs") as r:
            return (await r.json())["kernelspecs"]


def test_picker_flow_through_jupyter_server(server):
    result = asyncio.run(picker_flow(*server[:2]))
    spec = result["specs"][KERNEL]["spec"]
    assert spec["display_name"] == "Python 3 (ipykernel) — image deb"
    assert "python3" in result["specs"]  # native kernels stay
    assert result["marker"] == ("ok", "chspawner test image: Debian bookworm\n", None)
    assert result["interrupted"] == ("error", "sleeping\n", "KeyboardInterrupt")
    assert result["after_restart"] == ("ok", "False\n", None)  # state cleared
    assert result["deleted"] == 204 and result["remaining"] == []


def test_new_images_appear_without_restarting(server, user):
    base, token, store = server
    before = asyncio.run(list_specs(base, token))
    as_user(user.pw_name, str(CHSPAWNER), "import", "-q", "-s", store,
            f"{store}/img/deb", "deb-copy")
    after = asyncio.run(list_specs(base, token))
    as_user(user.pw_name, str(CHSPAWNER), "images", "rm", "-s", store, "deb-copy")
    assert "chspawner-deb-copy--python3" not in before
    assert after["chspawner-deb-copy--python3"]["spec"]["display_name"] \
        == "Python 3 (ipykernel) — image deb-copy"


CONFORMANCE = textwrap.dedent("""
    import unittest
    import jupyter_kernel_test

    class ImageKernel(jupyter_kernel_test.KernelTests):
        kernel_name = "KERNEL"
        language_name = "python"
        file_extension = ".py"
        code_hello_world = "print('hello, world')"
        completion_samples = [{"text": "zi", "matches": {"zip"}}]
        complete_code_samples = ["1", "print('hello, world')", "def f(x):\\n  return x*2\\n\\n"]
        incomplete_code_samples = ["print('''hello", "def f(x):\\n  x*2"]
        invalid_code_samples = ["import = 7q"]
        code_page_something = "zip?"
        code_generate_error = "raise"
        code_execute_result = [{"code": "1+2+3", "result": "6"}]
        code_display_data = [{"code": "from IPython.display import HTML; display(HTML('<b>x</b>'))",
                              "mime": "text/html"}]
        supported_history_operations = ("tail", "search")
        code_history_pattern = "1?2*"
        code_inspect_sample = "zip"
        code_clear_output = "from IPython.display import clear_output; clear_output()"

    if __name__ == "__main__":
        unittest.main()
""").replace("KERNEL", KERNEL)


@pytest.mark.parametrize("launcher", ["local", "srun"])
def test_conformance_suite(request, user, user_dir, kernel_store, launcher):
    env = []
    install = ["--launcher", launcher]
    if launcher == "srun":
        slurm = request.getfixturevalue("slurm")
        env = [f"{k}={v}" for k, v in slurm.env.items()]
        install.append(f"--srun-arg=--partition={slurm.partition}")
    prefix = user_dir / "prefix"
    as_user(user.pw_name, str(CHSPAWNER), "kernel", "install", "-s", kernel_store,
            "--prefix", str(prefix), *install, "deb")
    script = user_dir / "conformance.py"
    script.write_text(CONFORMANCE)
    os.chmod(script, 0o644)
    result = as_user(user.pw_name, "env", f"JUPYTER_PATH={prefix}/share/jupyter",
                     f"TMPDIR={user_dir}", *env, str(VENV_BIN / "python"), str(script),
                     "-v", check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "OK" in result.stderr.splitlines()[-1]
