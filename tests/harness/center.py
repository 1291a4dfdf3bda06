"""A center's JupyterHub on the multi-node cluster (tests/harness/cluster.py),
run with the deployment guide's own configuration file.

``CenterHub`` starts JupyterHub on the cluster's service node (this host's
namespace: the hub's API at the cluster's service address, where servers
on the compute nodes reach it) with ``docs/admin/center_jupyterhub_config.py``
itself: its site values come from the environment (CHSPAWNER_HUB_IP,
CHSPAWNER_PUBLIC_URL, ...), as a center sets them, so the guide cannot
drift from what the tests run. A small test file loads it
(``load_subconfig``) and adds only what a test must have: the dummy
authenticator and the test user, the tester service's token, the
cluster's Slurm environment for the spawner, and a short session-manager
interval. Everything else is the center's: SlurmChSpawner with kernels in
jobs of their own on other nodes than the server, the session proxy and
the session manager as hub services, PostgreSQL for the hub's and the
sessions' records, the idle culler.

It is a ``Hub`` (tests/harness/hub.py): ``spawn``, ``stop_server``,
``server_state``, ``user_server`` and the kernel client work on it as on
the one-node hub. No pytest needed: ``bench/`` and ``scripts/`` use it as a
context manager::

    with Cluster() as cluster, Postgres() as pg:
        store = center_store(images.site_store(), workdir)   # python, jupyter
        with CenterHub(cluster, store, "chtest", pg.database(), pg.database()) as hub:
            asyncio.run(spawn(hub, {"image": "python", "mode": "kernels"}))
            hub.cluster.lose(asyncio.run(server_state(hub))["node"])

(``workdir``: a directory on the store's file system, /var/tmp there, that
the test user can traverse.)
"""
from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import textwrap
import uuid
from pathlib import Path

from chspawner.images.trees import remove_tree
from tests.harness.cluster import Cluster
from tests.harness.env import REPO, VENV_BIN
from tests.harness.hub import Hub
from tests.harness.kernel_client import kernels_url, send, start_kernel, warm_up
from tests.harness.net import free_port
from tests.harness.wait import wait_until

CENTER_CONFIG = REPO / "docs" / "admin" / "center_jupyterhub_config.py"
#: The session manager's service name in the center's configuration.
SESSIONS = "chspawner-sessions"
#: The center configuration's images, and the test store's image each is.
SITE_IMAGES = {"python": "deb", "jupyter": "jupyter"}
# The least the tests ask of the hub's API (admin:server_state: a server's
# job id and node).
#: The center's "python" image's kernel, and code that says where it runs.
KERNEL = "chspawner-python--python3"
WHERE = "import socket; print(socket.gethostname())"
TESTER_SCOPES = ["admin:users", "admin:servers", "access:servers", "read:users",
                 "tokens", "admin:server_state"]


def center_store(test_store: str, into: Path) -> str:
    """The center's site store, under ``into``: a test store's images
    (tests/conftest.py's kernel_store, or images.site_store() outside
    pytest: both have ``deb`` and ``jupyter``) under the names the center's
    configuration gives them, as hard links where they can be (no copy:
    instant, no space), else copied. Owned as the test store is, whose
    owner the spawner trusts."""
    src, store = Path(test_store), into / "site-store"
    store.mkdir(parents=True)
    owner = src.stat()
    for entry in src.iterdir():  # (the store's layout: img/, dlcache/, tmp/ ...)
        if entry.is_dir() and entry.name != "img":
            (store / entry.name).mkdir(mode=entry.stat().st_mode & 0o7777)
            os.chown(store / entry.name, entry.stat().st_uid, entry.stat().st_gid)
    (store / "img").mkdir(mode=(src / "img").stat().st_mode & 0o7777)
    os.chown(store / "img", owner.st_uid, owner.st_gid)
    for name, test_name in SITE_IMAGES.items():
        argv = ["cp", "-a", str(src / "img" / test_name), str(store / "img" / name)]
        if subprocess.run([*argv[:2], "-l", *argv[2:]], capture_output=True).returncode:
            shutil.rmtree(store / "img" / name, ignore_errors=True)  # (another file system)
            subprocess.run(argv, check=True)
    os.chown(store, owner.st_uid, owner.st_gid)
    os.chmod(store, owner.st_mode & 0o7777)
    return str(store)


class CenterHub(Hub):
    """JupyterHub as docs/admin/center_jupyterhub_config.py sets it up, on
    ``cluster``'s service node; the public URL on 127.0.0.1 (``url``)."""

    manager = SESSIONS

    last_log = Path("/tmp/chspawner-last-center-hub.log")

    def __init__(self, cluster: Cluster, store: str, user: str, hub_db: str,
                 sessions_db: str, manager_interval: float = 0.5, extra_config: str = ""):
        """``store``: the site store (see center_store); ``hub_db``,
        ``sessions_db``: the hub's and the session manager's database URLs
        (tests/harness/postgres.py's ``database()``); ``extra_config``: more
        hub configuration after the test's (the demo's password)."""
        self.cluster = cluster
        self.dir = Path(tempfile.mkdtemp(prefix="chspawner-center-"))
        self.port, self.token, self.user = free_port(), secrets.token_hex(16), user
        self.password = secrets.token_hex(8)  # the user's, for a browser's login
        self.url = f"http://127.0.0.1:{self.port}"
        #: The user's servers' Jupyter runtime directory (their kernels' records).
        self.runtime_dir = Path(pwd.getpwnam(user).pw_dir, ".local", "share",
                                f"chspawner-center-{self.token[:8]}", "runtime")
        state = self.dir / "state"
        state.mkdir(mode=0o700)
        self.hub_port = free_port()
        # The center's site values, as a center's service unit would set them.
        self.env = {
            "CHSPAWNER_HUB_IP": cluster.service_address,
            "CHSPAWNER_HUB_PORT": str(self.hub_port),
            "CHSPAWNER_PUBLIC_URL": self.url,
            "CHSPAWNER_SITE_STORE": store,
            "CHSPAWNER_STATE_DIR": str(state),
            "CHSPAWNER_HUB_DB": hub_db,
            "CHSPAWNER_SESSIONS_DB": sessions_db,
            "CHSPAWNER_VENV": str(VENV_BIN.parent),
            "CHSPAWNER_PARTITIONS": cluster.partition,
            # No slurmdbd on the test cluster: no associations to offer
            # (QOS is passed to sbatch; Slurm without accounting ignores it).
            "CHSPAWNER_ACCOUNTS_FROM_SLURM": "no",
            "CHSPAWNER_QOS": "normal",
            "CHSPAWNER_PROXY_API_PORT": str(free_port()),
            "CHSPAWNER_SESSIONS_PORT": str(free_port()),
            "CONFIGPROXY_AUTH_TOKEN": secrets.token_hex(16),
        }
        # What only a test needs, after the center's file.
        (self.dir / "jupyterhub_config.py").write_text(textwrap.dedent(f"""
            load_subconfig({str(CENTER_CONFIG)!r})
            c.JupyterHub.authenticator_class = "dummy"
            c.DummyAuthenticator.password = {self.password!r}
            c.Authenticator.allowed_users = {{{user!r}}}
            c.SlurmChSpawner.slurm_env = {dict(cluster.env)!r}
            # This hub's servers keep their kernels' records apart: another
            # hub of the same test user (another module, another run at the
            # same time) must neither adopt them nor drop them as dead.
            c.Spawner.environment = {{"JUPYTER_RUNTIME_DIR": {str(self.runtime_dir)!r}}}
            # Answer a spawn request at once (202); the progress stream is
            # followed, as the spawn page does.
            c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}
            # A time limit a test shortens is noticed within a second.
            c.SlurmChSpawner.walltime_check_interval = 1.0
            c.JupyterHub.services.append({{"name": "tester", "api_token": {self.token!r}}})
            c.JupyterHub.load_roles.append({{"name": "tester", "services": ["tester"],
                                             "scopes": {TESTER_SCOPES!r}}})
            for service in c.JupyterHub.services:
                if service["name"] == {SESSIONS!r}:
                    service["command"] += ["--interval={manager_interval}",
                                           # a test's losses in a row count against this
                                           "--max-recoveries=50"]
        """) + extra_config)
        try:
            self.start()
        except BaseException:
            self._terminate()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self.runtime_dir.parent.exists():
                remove_tree(self.runtime_dir.parent)

    def __enter__(self) -> CenterHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def shorten(hub: CenterHub, job: str, left_s: int) -> None:
    """The admin's scontrol: the job's time limit now ends about
    ``left_s`` seconds from now (Slurm counts whole minutes)."""
    elapsed = hub.cluster.run("squeue", "-h", "-j", job, "-o", "%M").stdout.strip()
    days, _, clock = elapsed.rpartition("-")  # ([D-][HH:]MM:SS)
    seconds = 0
    for part in clock.split(":"):
        seconds = seconds * 60 + int(part)
    seconds += int(days or 0) * 86400
    minutes = (seconds + left_s) // 60 + 1
    hub.cluster.run("scontrol", "update", f"JobId={job}", f"TimeLimit={minutes}")


def listening(cluster: Cluster, node: str, uid: int) -> set[tuple[str, int]]:
    """The (address, port) pairs on which uid's processes listen on node (TCP)."""
    out = cluster.run_on(node, "ss", "-H", "-l", "-t", "-n", "-e").stdout
    found = set()
    for line in out.splitlines():
        fields = line.split()
        if f"uid:{uid}" not in fields:
            continue
        address, _, port = fields[3].rpartition(":")
        found.add((address.strip("[]"), int(port)))
    return found


# ------------------------------------------ the user's kernels' jobs ---

def kernel_jobs(hub: CenterHub) -> dict[str, str]:
    """{job id: node} of the user's running kernel jobs."""
    out = hub.cluster.run("squeue", "-h", "-u", hub.user, "-t", "RUNNING",
                          "-o", "%i %N %j").stdout
    return {job: node for job, node, name in (line.split(" ", 2) for line in out.splitlines())
            if name.startswith("chspawner-kernel-")}


def end_kernel_jobs(hub: CenterHub) -> None:
    """After a test: no kernel job of the user's left for the next one (a
    server stopped after a failure may not have ended them)."""
    if kernel_jobs(hub):
        hub.cluster.run("scancel", "-u", hub.user, "-t", "RUNNING,PENDING", check=False)
    wait_until(lambda: not kernel_jobs(hub), "the kernel jobs to end", 30)


async def start_cell(http, hub: CenterHub, code: str):
    """A new kernel, a websocket to it at the session's URL with a client
    session id of its own, and ``code`` running in it:
    (kernel, the websocket's URL, the websocket, the transcript)."""
    kernel = await start_kernel(http, hub, KERNEL)
    url = f"{kernels_url(hub)}/{kernel}/channels?session_id={uuid.uuid4().hex}"
    url = url.replace("http", "ws", 1)
    ws = await http.ws_connect(url)
    await warm_up(ws)
    return kernel, url, ws, await send(ws, code)
