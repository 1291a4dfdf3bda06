"""A real JupyterHub with ChSpawner (and its real proxy) on 127.0.0.1,
driven through its REST API with a service token: spawning and stopping the
test user's server (or spawning it from the form, as a browser does: ``spawn_page``),
reading its state, and the hub configuration that adds
the session proxy and the session manager (docs/admin/sessions.md)."""
from __future__ import annotations

import asyncio
import html
import json
import re
import secrets
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import aiohttp

from chspawner.images.trees import remove_tree
from tests.harness import procs
from tests.harness.env import VENV_BIN
from tests.harness.kernel_client import KERNEL, execute, kernels_url, start_kernel, warm_up
from tests.harness.net import free_port

DESCRIPTIONS = {"deb": "Debian 12 with ipykernel (kernels mode)",
                "nopython": "busybox, no Python",
                "jupyter": "Debian 12 with JupyterLab (server mode)"}


#: The session manager's service name in manager_config().
MANAGER = "session-manager"


class Hub:
    """jupyterhub with ChSpawner, on 127.0.0.1, driven by a service token."""

    #: The session manager's service name, when the hub runs one.
    manager = MANAGER

    #: More environment for the hub (a subclass's site values).
    env: dict[str, str] = {}
    #: Where the hub's log is kept after stop(), for a look after a failure.
    last_log = Path("/tmp/chspawner-last-hub.log")

    def __init__(self, store: str, user: str, extra_config: str = "",
                 images: tuple[str, ...] = ("deb", "nopython", "jupyter"),
                 port: int | None = None):
        """``port``: the public one (a proxy started separately listens there)."""
        self.dir = Path(tempfile.mkdtemp(prefix="chspawner-hub-"))
        self.port, self.token, self.user = port or free_port(), secrets.token_hex(16), user
        self.url = f"http://127.0.0.1:{self.port}"
        (self.dir / "jupyterhub_config.py").write_text(textwrap.dedent(f"""
            c.JupyterHub.ip = "127.0.0.1"
            c.JupyterHub.port = {self.port}
            c.JupyterHub.hub_ip = "127.0.0.1"
            c.JupyterHub.hub_port = {free_port()}
            c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{free_port()}"
            c.ConfigurableHTTPProxy.pid_file = "{self.dir}/proxy.pid"
            c.JupyterHub.db_url = "sqlite:///{self.dir}/hub.sqlite"
            # Answer a spawn request at once (202), so the progress stream
            # is followed while the spawn goes on, as the spawn page does.
            c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}
            c.JupyterHub.cookie_secret_file = "{self.dir}/cookie_secret"
            c.JupyterHub.authenticator_class = "dummy"
            c.Authenticator.allowed_users = {{"{user}"}}
            c.JupyterHub.spawner_class = "chspawner"
            c.ChSpawner.images = {[{"name": i, "description": DESCRIPTIONS[i]}
                                   for i in images]!r}
            c.ChSpawner.site_storage = "{store}"
            c.Spawner.cmd = ["{VENV_BIN}/jupyterhub-singleuser"]
            c.Spawner.start_timeout = 120
            c.Spawner.http_timeout = 120
            c.Spawner.poll_interval = 1            # notice a lost server quickly
            c.JupyterHub.cleanup_servers = False   # a hub restart keeps them
            c.JupyterHub.services = [{{"name": "tester", "api_token": "{self.token}"}}]
            c.JupyterHub.load_roles = [{{"name": "tester", "services": ["tester"],
                "scopes": ["admin:users", "admin:servers", "access:servers", "read:users",
                           "tokens"]}}]
        """) + extra_config)
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "jupyterhub"), "-f", "jupyterhub_config.py"], cwd=self.dir,
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "hub.log", "ab"),
            env={"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", **self.env})
        deadline = time.monotonic() + 90
        while asyncio.run(self._status("/hub/api/")) != 200:
            assert self.proc.poll() is None, self.log()[-3000:]
            assert time.monotonic() < deadline, "hub did not start: " + self.log()[-3000:]
            time.sleep(0.1)

    @property
    def base(self) -> str:
        """The user's server, through the proxy (as in kernel_client)."""
        return f"{self.url}/user/{self.user}"

    def log(self) -> str:
        return (self.dir / "hub.log").read_text(errors="replace")

    async def _status(self, path: str) -> int | None:
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(self.url + path) as r:
                    return r.status
        except aiohttp.ClientError:
            return None

    def session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(headers={"Authorization": f"token {self.token}"})

    def restart(self, wait_checked: bool = True) -> None:
        """Stop the hub process alone (servers keep running), start again,
        and (unless told not to) wait for it to finish checking the servers
        it finds."""
        self._terminate()
        self.start()
        if not wait_checked:
            return

        async def checking() -> bool:
            async with self.session() as http:
                async with http.get(f"{self.url}/hub/api/users/{self.user}") as r:
                    return r.status != 200 or (await r.json()).get("pending") is not None
        deadline = time.monotonic() + 60
        while asyncio.run(checking()):
            assert time.monotonic() < deadline, "the hub is still checking servers"
            time.sleep(0.2)

    def _terminate(self) -> None:
        procs.stop(self.proc, timeout=30)

    def stop(self) -> None:
        try:
            asyncio.run(stop_server(self))  # cleanup_servers is off: do it here
        except aiohttp.ClientError:
            pass  # the hub is going already (a Ctrl-C reaches it too)
        finally:
            self._terminate()
            # Kept for a look after a failure; the next run replaces it.
            self.last_log.write_text(self.log())
            remove_tree(self.dir)


def slurm_spawner_config(slurm) -> str:
    """A hub's configuration lines for SlurmChSpawner on the one-node test
    cluster (``slurm``: tests/harness/slurm.py), for a Hub's extra_config."""
    return textwrap.dedent(f"""
        c.JupyterHub.spawner_class = "slurmchspawner"
        c.SlurmChSpawner.slurm_env = {slurm.env!r}
        c.SlurmChSpawner.partitions = ["{slurm.partition}"]
        c.SlurmChSpawner.max_cpus = 2
    """)


async def spawn(hub: Hub, options: dict) -> dict:
    """POST the server with ``options``; follow the progress stream to the
    end. Returns the status, the reply and the progress messages."""
    api = f"{hub.url}/hub/api/users/{hub.user}"
    async with hub.session() as http:
        async with http.post(f"{api}", json={}) as r:
            assert r.status in (201, 409), await r.text()  # the user exists
        async with http.post(f"{api}/server", json=options) as r:
            result = {"status": r.status, "reply": await r.text(), "events": []}
        if r.status >= 400:
            return result
        async with asyncio.timeout(180):
            async with http.get(f"{api}/server/progress") as stream:
                async for line in stream.content:
                    if line.startswith(b"data:"):
                        event = json.loads(line[5:])
                        result["events"].append(event.get("message", ""))
                        if event.get("ready") or event.get("failed"):
                            result["ready"] = event.get("ready", False)
                            break
    return result


async def spawn_page(hub: Hub, fields: dict | None = None) -> tuple[int, str]:
    """Log in as the user (the dummy authenticator) and open the spawn
    form, or submit it with ``fields`` as a browser does: status and page."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(f"{hub.url}/hub/login") as r:
            xsrf = re.search(r'name="_xsrf" value="([^"]+)"', await r.text())[1]
        async with http.post(f"{hub.url}/hub/login", data={
                "username": hub.user, "password": "", "_xsrf": xsrf}) as r:
            assert r.status == 200, await r.text()
        async with http.get(f"{hub.url}/hub/spawn/{hub.user}") as r:
            page = await r.text()
            if fields is None:
                return r.status, page
            # (The form's action carries the token, as ?_xsrf=...)
            action = html.unescape(re.search(r'action="([^"]+)"', page)[1])
        async with http.post(hub.url + action, data=fields) as r:
            return r.status, await r.text()


def timed_spawn(hub: Hub, options: dict, what: str = "spawn") -> float:
    """For the benchmarks: seconds from the spawn request to the server
    ready, then stop it; a failed spawn exits, with the hub log's tail."""
    start = time.perf_counter()
    result = asyncio.run(spawn(hub, options))
    elapsed = time.perf_counter() - start
    if not result.get("ready"):
        sys.exit(f"{what}: spawn failed: {result}\nhub log:\n{hub.log()[-3000:]}")
    asyncio.run(stop_server(hub))
    return elapsed


async def stop_server(hub: Hub) -> None:
    """Stop the user's server and wait until the hub lists none."""
    async with hub.session() as http:
        async with http.delete(f"{hub.url}/hub/api/users/{hub.user}/server") as r:
            assert r.status in (202, 204, 400), await r.text()
        async with asyncio.timeout(60):
            while True:
                async with http.get(f"{hub.url}/hub/api/users/{hub.user}") as r:
                    if not (await r.json())["servers"]:
                        return
                await asyncio.sleep(0.2)


#: Code that prints the test image's marker file.
READ_MARKER = "print(open('/etc/chspawner-test-image').read().strip())"


async def kernel_in_server(hub: Hub, kernel: str = KERNEL, code: str = READ_MARKER) -> tuple:
    """Start ``kernel`` in the user's server and run ``code`` in it (by
    default: read the test image's marker file): (status, output, ename)."""
    base = kernels_url(hub)
    async with hub.session() as http:
        kernel = await start_kernel(http, hub, kernel)
        async with http.ws_connect(f"{base}/{kernel}/channels".replace("http", "ws")) as ws:
            await warm_up(ws)
            return await execute(ws, code)


async def user_server(hub: Hub) -> dict:
    """The user's default server as the hub's REST API shows it ({} if none)."""
    async with hub.session() as http:
        async with http.get(f"{hub.url}/hub/api/users/{hub.user}") as r:
            return (await r.json())["servers"].get("", {})


async def server_state(hub: Hub) -> dict:
    """The spawner's state: the server's pid (local) or job id (Slurm);
    empty while the hub has no server for the user (a move)."""
    async with hub.session() as http:
        async with http.get(f"{hub.url}/hub/api/users/{hub.user}") as r:
            server = (await r.json())["servers"].get("")
            return server["state"] if server and server["ready"] else {}


async def sessions(hub: Hub) -> list[dict]:
    """The session manager's records of the sessions ([] if it can't say yet)."""
    async with hub.session() as http:
        async with http.get(f"{hub.url}/services/{hub.manager}/api/sessions") as r:
            if r.status != 200:
                return []
            return (await r.json())["sessions"]


def history(hub: Hub) -> list[str]:
    """The kinds of events (started, lost, recovering, ...) of the last session."""
    found = asyncio.run(sessions(hub))
    return [e["kind"] for e in found[-1]["history"]] if found else []


async def answers(hub: Hub) -> int | None:
    """The user's server's status through the proxy, at the session's URL."""
    try:
        async with hub.session() as http:
            async with http.get(f"{hub.url}/user/{hub.user}/api/status",
                                allow_redirects=False) as r:
                return r.status
    except aiohttp.ClientError:
        return None


# As docs/admin/sessions.md gives them ("servers": read:servers,
# start:servers and delete:servers).
MANAGER_SCOPES = ["list:users", "servers"]


def manager_config(state_dir: Path, proxy_token: str, manager_port: int,
                   db_url: str = "") -> str:
    """Hub configuration (extra_config) for sessions that outlive their
    server: chspawner-proxy as the hub's proxy and the session manager as a
    hub service keeping its records at ``db_url`` (a PostgreSQL database of
    tests/harness/postgres.py), else in an SQLite file in ``state_dir``."""
    db_url = db_url or f"sqlite:///{state_dir}/sessions.sqlite"
    return textwrap.dedent(f"""
        c.ConfigurableHTTPProxy.command = ["{VENV_BIN}/chspawner-proxy"]
        c.ConfigurableHTTPProxy.auth_token = "{proxy_token}"
        # JupyterHub's own poll stays at its default: the manager notices
        # first, which is how it tells a loss from a stop by request.
        c.Spawner.poll_interval = 30
        c.JupyterHub.services.append({{
            "name": "{MANAGER}", "url": "http://127.0.0.1:{manager_port}",
            "command": ["{VENV_BIN}/chspawner-session-manager",
                        "--db-url={db_url}",
                        "--proxy-api-url=" + c.ConfigurableHTTPProxy.api_url,
                        "--interval=0.5",
                        # a test's kills in a row count against this
                        "--max-recoveries=50"],
            "environment": {{"CONFIGPROXY_AUTH_TOKEN": "{proxy_token}"}},
        }})
        # The least the manager needs: list users' servers (with their
        # user_options), read one, start and stop them. No access:servers:
        # its checks of users' servers carry no credential.
        c.JupyterHub.load_roles.append({{
            "name": "{MANAGER}", "services": ["{MANAGER}"],
            "scopes": {MANAGER_SCOPES!r}}})
        c.JupyterHub.load_roles[0]["scopes"].append("admin:server_state")
    """)
