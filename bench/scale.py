"""A thousand users on one hub: what the hub side costs, in one run.

* The multi-node test cluster (tests/harness/cluster.py) with room for
  every user's job; a real JupyterHub with the session proxy as its proxy
  and the session manager as its service (tests/harness/hub.py's
  ``manager_config``, as docs/admin/sessions.md configures them).
* ``--users`` users, each with a running server: a real Slurm job
  (``sleep``) per server, followed through the hub's shared job watch, and
  a stand-in for the Jupyter server itself (bench/standin.py,
  bench/scale_spawner.py), which answers what the hub and the manager ask.
* Over a steady ``--window``: the manager's CPU seconds per minute (from
  /proc), Slurm queries per minute (slurmctld's own count of job-info RPCs,
  ``sdiag``), the hub's API calls per minute (the hub's Prometheus
  metrics); then ``--losses`` servers lost one at a time (their stand-in
  closed and their job killed, as a node crash does), each timed from the
  loss to the first answer at the same URL through the proxy.
* The proxy side by side with configurable-http-proxy: memory per idle
  websocket with ``--connections`` open (bench/proxy_conns.py), and HTTP
  requests/s and p50 (bench/proxy.py).

Run as root: ``bench/run.sh`` or, from the repository root,
``python -m bench.scale [--users 1000] [--window 60] [--losses 5]
[--connections 10000] [--check]``.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from chspawner.images.trees import remove_tree
from tests.harness.cluster import Cluster
from tests.harness.env import REPO
from tests.harness.hub import Hub, manager_config
from tests.harness.net import free_port
from tests.harness.wait import wait_listening

#: Targets: time from a server's loss to its answer again (s).
RECOVERY_TARGET = 5.0
#: Servers started at once (JupyterHub's own limit is concurrent_spawn_limit).
SPAWN_CONCURRENCY = 50
#: The hub's shared job watch's interval (SlurmChSpawner.slurm_poll_interval,
#: StandInSpawner.poll_every), and JupyterHub's poll of each server
#: (Spawner.poll_interval, as tests/harness/hub.py's manager_config sets it).
WATCH_INTERVAL = 1.0
POLL_INTERVAL = 30
#: Seconds one lost server may take to come back before the round fails.
RECOVERY_TIMEOUT = 120


# --- what is measured -------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def find_process(marker: str) -> int:
    """The one process whose command line holds ``marker`` (a path of this run's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline:
                found.append(int(entry.name))
    if len(found) != 1:
        raise RuntimeError(f"{len(found)} processes with {marker!r} in their command line")
    return found[0]


def job_info_rpcs(cluster: Cluster) -> int:
    """slurmctld's count of job-information requests (squeue's, sacct's
    none: no slurmdbd) since its start."""
    out = cluster.run("sdiag").stdout
    return sum(int(m) for m in re.findall(r"^\s*REQUEST_JOB_INFO\S*\s+\(\s*\d+\)\s+count:(\d+)",
                                          out, re.M))


async def hub_api_calls(hub: Hub) -> int:
    """Requests the hub's REST API has answered (its Prometheus histogram's
    counts, every API handler)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{hub.url}/hub/metrics") as r:
            text = await r.text()
    return int(sum(float(v) for v in re.findall(
        r'^jupyterhub_request_duration_seconds_count\{[^}]*handler="[^"]*apihandlers[^"]*"'
        r'[^}]*\}\s+(\S+)', text, re.M)))


# --- the hub ----------------------------------------------------------------

def scale_config(control_url: str, cluster: Cluster) -> str:
    return f"""
c.JupyterHub.spawner_class = "bench.scale_spawner.StandInSpawner"
c.StandInSpawner.control_url = {control_url!r}
c.StandInSpawner.slurm_env = {dict(cluster.env)!r}
c.JupyterHub.concurrent_spawn_limit = {SPAWN_CONCURRENCY * 2}
c.JupyterHub.active_server_limit = 0
c.JupyterHub.authenticate_prometheus = False
c.StandInSpawner.poll_every = {WATCH_INTERVAL}
c.Spawner.poll_interval = {POLL_INTERVAL}
c.Spawner.start_timeout = 600
c.Spawner.http_timeout = 60
"""


async def start_servers(hub: Hub, users: list[str]) -> float:
    """Every user made and their server started; seconds taken."""
    started = time.monotonic()
    async with hub.session() as http:
        async with http.post(f"{hub.url}/hub/api/users", json={"usernames": users}) as r:
            assert r.status in (201, 409), await r.text()
        limit = asyncio.Semaphore(SPAWN_CONCURRENCY)

        async def spawn(user: str) -> None:
            async with limit:
                async with http.post(f"{hub.url}/hub/api/users/{user}/server") as r:
                    assert r.status in (201, 202), f"{user}: {r.status} {await r.text()}"
                while not await ready(http, hub, user):
                    await asyncio.sleep(0.2)
        await asyncio.gather(*(spawn(u) for u in users))
    return time.monotonic() - started


async def ready(http: aiohttp.ClientSession, hub: Hub, user: str) -> bool:
    async with http.get(f"{hub.url}/hub/api/users/{user}") as r:
        server = ((await r.json()).get("servers") or {}).get("")
    return bool(server and server.get("ready"))


async def lose_and_time(hub: Hub, cluster: Cluster, control_url: str, user: str) -> float:
    """Lose ``user``'s server as a node crash would (the stand-in's
    connections cut, its job killed); seconds until its URL answers again."""
    url = f"{hub.url}/user/{user}/api"
    async with aiohttp.ClientSession(trust_env=False) as http:
        lost = time.monotonic()
        async with http.delete(f"{control_url}/servers/{user}-default"):
            pass
        cluster.run("scancel", "--signal=KILL", f"--name=standin-{user}-default")
        while time.monotonic() - lost < RECOVERY_TIMEOUT:
            try:
                async with http.get(url, allow_redirects=False,
                                    timeout=aiohttp.ClientTimeout(total=30)) as r:
                    if r.status == 200:
                        return time.monotonic() - lost
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{user}'s server did not come back within {RECOVERY_TIMEOUT} s")


def end_jobs(cluster: Cluster, timeout: float = 300) -> None:
    """Every server's job cancelled, and gone: a thousand jobs take Slurm
    longer to tidy up than the cluster's own stop waits."""
    cluster.run("scancel", "--user=root", check=False)
    deadline = time.monotonic() + timeout
    while cluster.run("squeue", "--noheader", "--format=%i", check=False).stdout.strip():
        if time.monotonic() > deadline:
            raise RuntimeError(f"jobs still listed {timeout:.0f} s after scancel")
        time.sleep(1)


# --- the run ----------------------------------------------------------------

def hub_side(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="chspawner-scale-"))
    control_port = free_port()
    control_url = f"http://127.0.0.1:{control_port}"
    standin = subprocess.Popen([sys.executable, "-m", "bench.standin", "--control",
                                str(control_port)], cwd=REPO,
                               stderr=open(workdir / "standin.log", "wb"))
    cpus = args.users // 3 + 8
    try:
        wait_listening(control_port, standin, lambda: (workdir / "standin.log").read_text())
        with Cluster(nodes=3, cpus=cpus) as cluster:
            state = workdir / "state"
            state.mkdir()
            proxy_token = os.urandom(16).hex()
            Hub.env = {"PYTHONPATH": str(REPO)}
            hub = Hub(str(workdir), "scaleadmin", manager_config(
                state, proxy_token, free_port()) + scale_config(control_url, cluster),
                images=("deb",))
            try:
                users = [f"u{i:04d}" for i in range(args.users)]
                rpc_spawn = job_info_rpcs(cluster)
                took = asyncio.run(start_servers(hub, users))
                rpc_spawn = job_info_rpcs(cluster) - rpc_spawn
                print(f"{args.users} servers started in {took:.0f} s", flush=True)
                manager = find_process(str(state))
                cpu0, rpc0, api0 = (cpu_seconds(manager), job_info_rpcs(cluster),
                                    asyncio.run(hub_api_calls(hub)))
                time.sleep(args.window)  # the steady state being measured
                minutes = args.window / 60
                cpu = (cpu_seconds(manager) - cpu0) / minutes
                rpcs = (job_info_rpcs(cluster) - rpc0) / minutes
                api = (asyncio.run(hub_api_calls(hub)) - api0) / minutes
                rows += [("session manager CPU s / minute", f"{cpu:.1f}", "—"),
                         (f"Slurm job queries while {args.users} servers started "
                          f"({took:.0f} s)", f"{rpc_spawn}",
                          f"≤ {took / WATCH_INTERVAL + 1:.0f}: one per watch interval"),
                         ("Slurm job queries / minute, steady", f"{rpcs:.0f}",
                          f"≤ {60 / WATCH_INTERVAL:.0f}: one per watch interval; one per "
                          f"server per poll would be {args.users * 60 / POLL_INTERVAL:.0f}"),
                         ("hub API calls / minute", f"{api:.0f}", "—")]
                times = [asyncio.run(lose_and_time(hub, cluster, control_url, user))
                         for user in random.sample(users, args.losses)]
                rows.append((f"a server's loss to its answer again, among {args.users}"
                             f" (median of {args.losses}, max {max(times):.1f} s)",
                             f"{statistics.median(times):.1f} s",
                             f"≤ {RECOVERY_TARGET:.0f} s"))
                print_rows(rows)  # before the teardown, which takes a while
            finally:
                hub.stop()
                end_jobs(cluster)
    finally:
        standin.terminate()
        standin.wait(10)
        remove_tree(workdir)
    return rows


def print_rows(rows: list[tuple[str, str, str]]) -> None:
    print(f"\n{'metric':<70} {'value':>10}  target")
    for metric, value, target in rows:
        print(f"{metric:<70} {value:>10}  {target}")
    print(flush=True)


def proxy_side(args: argparse.Namespace) -> None:
    """The proxy's own benchmarks, side by side with configurable-http-proxy:
    their tables as they print them."""
    from bench.proxy_conns import most_websockets
    connections = min(args.connections, most_websockets())
    if connections < args.connections:
        print(f"(the open-file limit holds {connections} websockets here, not "
              f"{args.connections}: measured with {connections})", flush=True)
    for argv in (["bench.proxy_conns", "--connections", str(connections)],
                 ["bench.proxy", "--rounds", str(args.proxy_rounds),
                  "--seconds", str(args.proxy_seconds)]):
        subprocess.run([sys.executable, "-m", *argv], cwd=REPO, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--window", type=float, default=60,
                        help="seconds of steady state measured")
    parser.add_argument("--losses", type=int, default=5)
    parser.add_argument("--connections", type=int, default=10000,
                        help="idle websockets through the proxy")
    parser.add_argument("--proxy-rounds", type=int, default=3,
                        help="bench/proxy.py's rounds")
    parser.add_argument("--proxy-seconds", type=float, default=5,
                        help="bench/proxy.py's seconds of HTTP load per proxy and round")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the recovery target is missed")
    args = parser.parse_args()
    rows = hub_side(args)
    proxy_side(args)
    if args.check:
        median = float(rows[-1][1].split()[0])
        sys.exit(0 if median <= RECOVERY_TARGET else 1)


if __name__ == "__main__":
    main()
