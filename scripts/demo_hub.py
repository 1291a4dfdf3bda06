"""A center's JupyterHub on a multi-node Slurm cluster on this machine,
serving the demo images (run by demo.sh after the pull-and-run part).

The cluster is the tests' (tests/harness/cluster.py): slurmctld and the hub
on the service node, three compute nodes with their own addresses,
hostnames and slurmd. The hub runs with the deployment guide's own
configuration file (docs/admin/center_jupyterhub_config.py, through
tests/harness/center.py): users' servers are Slurm jobs on the compute
nodes, each kernel a job of its own on another node, the session proxy and
manager keep sessions alive, PostgreSQL holds the records.

The demo user (``chtest``, password ``demo``) picks an image and a mode in
the spawn form: ``python`` (kernels mode: the server runs natively, its
kernels in the image), ``jupyter`` (server mode: JupyterLab inside the
image). With ``--check``, instead of serving until Ctrl-C, a
script-friendly check: spawn the demo user's server through the REST API,
start a kernel in the image, print where each runs and what the kernel
says, stop. Run as root from the repository root:
``python -m scripts.demo_hub [--check]``.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tests.harness.center import CenterHub, center_store
from tests.harness.cluster import Cluster
from tests.harness.env import TEST_USER
from tests.harness.hub import kernel_in_server, server_state, spawn, stop_server
from tests.harness.images import site_store
from tests.harness.postgres import Postgres

#: The kernel of the center's "python" image, and what it is asked.
KERNEL = "chspawner-python--python3"
WHERE = ("import socket; print(socket.gethostname(), '|', "
         "open('/etc/chspawner-test-image').read().strip())")


def check(hub: CenterHub) -> int:
    """Spawn, run code in a kernel on another node, print, stop: 0 if all went."""
    result = asyncio.run(spawn(hub, {"image": "python", "mode": "kernels"}))
    if not result.get("ready"):
        print(f"spawn failed: {result}", file=sys.stderr)
        return 1
    try:
        print("spawned:", "; ".join(result["events"]), flush=True)
        state = asyncio.run(server_state(hub))
        server_node = state["node"]
        print(f"server: Slurm job {state['job_id']} on compute node {server_node} "
              f"({hub.cluster.address[server_node]}:{state['port']})", flush=True)
        status, output, _ = asyncio.run(kernel_in_server(hub, KERNEL, WHERE))
        kernel_node, _, says = output.strip().partition(" | ")
        print(f"kernel: in image 'python' on compute node {kernel_node} "
              f"({hub.cluster.address.get(kernel_node, '?')}), says ({status}): {says}",
              flush=True)
        if status != "ok" or kernel_node not in hub.cluster.nodes or kernel_node == server_node:
            print("the kernel should run on another compute node than the server",
                  file=sys.stderr)
            return 1
        return 0
    finally:
        asyncio.run(stop_server(hub))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="spawn, run code in a kernel on another node, print, stop")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="chspawner-demo-", dir="/var/tmp"))
    os.chmod(work, 0o755)  # the store inside is the users'
    try:
        store = center_store(site_store(), work)
        with Cluster(nodes=3) as cluster, Postgres() as pg:
            print(f"cluster: service node {cluster.service_address}, compute nodes "
                  + ", ".join(f"{n} ({cluster.address[n]})" for n in cluster.nodes), flush=True)
            with CenterHub(cluster, store, TEST_USER, pg.database(), pg.database(),
                           extra_config='c.DummyAuthenticator.password = "demo"\n') as hub:
                print(f"JupyterHub (docs/admin/center_jupyterhub_config.py): {hub.url}/  "
                      f"(log in as {TEST_USER}, password demo)", flush=True)
                if args.check:
                    return check(hub)
                print("Ctrl-C to stop.", flush=True)
                try:
                    hub.proc.wait()
                except KeyboardInterrupt:
                    pass
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
