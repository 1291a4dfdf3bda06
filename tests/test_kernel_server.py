"""Image kernels the way a notebook user meets them: a real jupyter_server
(as the unprivileged user) offering them through its REST and websocket
API, and the jupyter_kernel_test conformance suite against one."""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import textwrap
import time
import uuid

import aiohttp
import pytest

from conftest import AS_USER, CHSPAWNER, VENV_BIN, as_user

KERNEL = "chspawner-deb--python3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
         "chspawner.kernelspecs.ContainerKernelSpecManager",
         f"--ContainerKernelSpecManager.storage={kernel_store}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "jupyter_server did not start"
            time.sleep(0.05)
    yield base, token
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def execute_request(code: str) -> dict:
    msg_id = uuid.uuid4().hex
    return {"header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "t",
                       "session": uuid.uuid4().hex, "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": True,
                        "user_expressions": {}, "allow_stdin": False,
                        "stop_on_error": True}}


async def picker_flow(base: str, token: str) -> dict:
    headers = {"Authorization": f"token {token}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{base}/api/kernelspecs") as r:
            specs = (await r.json())["kernelspecs"]
        async with http.post(f"{base}/api/kernels", json={"name": KERNEL}) as r:
            assert r.status == 201, await r.text()
            kernel = await r.json()
        ws_url = base.replace("http", "ws") + f"/api/kernels/{kernel['id']}/channels"
        output, status = [], None
        async with http.ws_connect(ws_url) as ws:
            request = execute_request(
                "print(open('/etc/chspawner-test-image').read().strip())")
            await ws.send_str(json.dumps(request))
            async with asyncio.timeout(60):
                async for frame in ws:
                    msg = json.loads(frame.data)
                    if msg["parent_header"].get("msg_id") != request["header"]["msg_id"]:
                        continue
                    if msg["msg_type"] == "stream":
                        output.append(msg["content"]["text"])
                    if msg["msg_type"] == "execute_reply":
                        status = msg["content"]["status"]
                        break
        async with http.delete(f"{base}/api/kernels/{kernel['id']}") as r:
            deleted = r.status
        async with http.get(f"{base}/api/kernels") as r:
            remaining = await r.json()
    return {"specs": specs, "output": "".join(output), "status": status,
            "deleted": deleted, "remaining": remaining}


def test_picker_flow_through_jupyter_server(server):
    result = asyncio.run(picker_flow(*server))
    spec = result["specs"][KERNEL]["spec"]
    assert spec["display_name"] == "Python 3 (ipykernel) — image deb"
    assert "python3" in result["specs"]  # native kernels stay
    assert result["output"] == "chspawner test image: Debian bookworm\n"
    assert result["status"] == "ok"
    assert result["deleted"] == 204 and result["remaining"] == []


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


def test_conformance_suite(user, user_dir, kernel_store):
    prefix = user_dir / "prefix"
    as_user(user.pw_name, str(CHSPAWNER), "kernel", "install", "-s", kernel_store,
            "--prefix", str(prefix), "deb")
    script = user_dir / "conformance.py"
    script.write_text(CONFORMANCE)
    os.chmod(script, 0o644)
    result = as_user(user.pw_name, "env", f"JUPYTER_PATH={prefix}/share/jupyter",
                     f"TMPDIR={user_dir}", str(VENV_BIN / "python"), str(script), "-v",
                     check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "OK" in result.stderr.splitlines()[-1]
