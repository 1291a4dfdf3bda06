"""Successive jupyter_servers as the test user with the persistent-kernel
plugins, sharing one state directory (as a server and its replacement do)."""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import time
import uuid
from pathlib import Path

import aiohttp

from tests.harness.env import AS_USER, VENV_BIN
from tests.harness.net import free_port
from tests.harness.procs import running
from tests.harness.wait import wait_listening


class Servers:
    """Successive jupyter_servers as the test user, sharing one state
    directory (as a server and its replacement do)."""

    def __init__(self, user, user_dir: Path, store: str, extra: list[str],
                 env: dict[str, str] | None = None):
        self.user, self.user_dir, self.store, self.extra = user, user_dir, store, extra
        self.env = env or {}
        self.token = secrets.token_hex(16)
        self.mark = uuid.uuid4().hex  # finds every process these servers started
        self.state_dir = user_dir / "state"
        self.proc: subprocess.Popen | None = None
        self.base = ""
        self.count = 0

    @property
    def headers(self) -> dict:
        return {"Authorization": f"token {self.token}"}

    def start(self) -> str:
        port = free_port()
        self.count += 1
        log = open(self.user_dir / f"server-{self.count}.log", "wb")
        self.proc = subprocess.Popen(
            [str(AS_USER), self.user.pw_name, "env", f"TMPDIR={self.user_dir}",
             f"CHSPAWNER_TEST_MARK={self.mark}", *[f"{k}={v}" for k, v in self.env.items()],
             str(VENV_BIN / "jupyter-server"), "--no-browser", f"--port={port}",
             "--ip=127.0.0.1", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={self.user_dir}",
             "--ServerApp.kernel_spec_manager_class="
             "chspawner.provisioner.kernelspecs.ContainerKernelSpecManager",
             f"--ContainerKernelSpecManager.storage={self.store}",
             "--ServerApp.kernel_manager_class="
             "chspawner.persist.kernel_manager.PersistentKernelManager",
             "--ServerApp.kernel_websocket_connection_class="
             "chspawner.persist.kernel_connection.ReplayingKernelConnection",
             "--ServerApp.session_manager_class="
             "chspawner.persist.notebook_sessions.PersistentSessionManager",
             f"--PersistentKernelManager.state_dir={self.state_dir}", *self.extra],
            stdout=log, stderr=log, start_new_session=True)
        log.close()
        wait_listening(port, self.proc, lambda: self.log()[-3000:])
        self.base = f"http://127.0.0.1:{port}"
        return self.base

    def log(self) -> str:
        return (self.user_dir / f"server-{self.count}.log").read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole server (its process group), not its kernels."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        """Shut every kernel down on purpose (a server that stops would
        leave them running), stop the server, and fail if a process it
        started is left."""
        try:
            if self.proc and self.proc.poll() is None:
                asyncio.run(shutdown_all(self))
        finally:
            self.stop()
            # Keepers notice their record is gone within a second.
            deadline = time.monotonic() + 10
            while (leftovers := self.marked()) and time.monotonic() < deadline:
                time.sleep(0.1)
            for pid in leftovers:
                os.kill(pid, signal.SIGKILL)
            assert not leftovers, f"processes left running: {leftovers}"

    def records(self) -> dict[str, dict]:
        if not self.state_dir.is_dir():
            return {}
        return {p.stem: json.loads(p.read_text()) for p in self.state_dir.glob("*.json")}

    def marked(self) -> list[int]:
        """PIDs of live processes started by these servers (marked env)."""
        found, needle = [], f"CHSPAWNER_TEST_MARK={self.mark}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if needle in (entry / "environ").read_bytes() and running(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                pass
        return found


async def shutdown_all(s: Servers) -> None:
    async with aiohttp.ClientSession(headers=s.headers) as http:
        async with http.get(f"{s.base}/api/kernels") as r:
            kernels = await r.json()
        for kernel in kernels:
            async with http.delete(f"{s.base}/api/kernels/{kernel['id']}") as r:
                assert r.status == 204


class PlainServer:
    """A stock jupyter_server as the test user, with its own Python kernel
    (the venv's ipykernel), under ``base_url``: the Jupyter protocols as
    JupyterLab 4 speaks them to a server, with nothing of chspawner."""

    def __init__(self, user, user_dir: Path, base_url: str = "/") -> None:
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.log_path = user_dir / "plain-server.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(AS_USER), user.pw_name, "env", f"TMPDIR={user_dir}",
                 f"JUPYTER_RUNTIME_DIR={user_dir}/runtime",
                 str(VENV_BIN / "jupyter-server"), "--no-browser", f"--port={self.port}",
                 "--ip=127.0.0.1", f"--IdentityProvider.token={self.token}",
                 f"--ServerApp.base_url={base_url}", f"--ServerApp.root_dir={user_dir}"],
                stdout=log, stderr=log, start_new_session=True)
        wait_listening(self.port, self.proc, lambda: self.log()[-3000:])
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict:
        return {"Authorization": f"token {self.token}"}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop it and its kernels (its process group)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
