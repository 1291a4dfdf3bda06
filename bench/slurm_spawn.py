"""Spawn to ready on Slurm: SlurmChSpawner vs batchspawner's SlurmSpawner.

batchspawner (1.3, from PyPI) is the usual way to run a JupyterHub user's
server as a Slurm job, so it is the anchor here.

A one-node Slurm cluster (tests/slurm.py) and two hubs (tests/test_spawner.py's
``Hub``) run side by side in one run; each spawn goes from the REST API's
spawn request to the server's readiness on the progress stream, then the
server is stopped (not timed). Every round spawns, in turn:

* batchspawner: the venv's JupyterHub + JupyterLab server natively, in a
  batch job, through its ``batchspawner-singleuser`` wrapper (with its own
  default batch script, ``srun`` step included);
* SlurmChSpawner, kernels mode (image ``deb``): the very same server,
  natively, in a batch job, offering the image's kernels (like for like);
* SlurmChSpawner, server mode (image ``jupyter``): the same versions of
  the server inside the image.

Medians; the ratio is chspawner / batchspawner. There is no target: the
figures are reported (docs/benchmarks.md). A failed spawn exits 1.

Both spawners ask Slurm for the same job: 1 CPU, 2 GB, 1 hour, in the test
partition; both run Slurm's clients as the user (SlurmChSpawner by
dropping privileges itself, batchspawner through its ``exec_prefix``).

batchspawner 1.3 under JupyterHub 6.1, configured as a site would (its
own default batch script, ``srun`` step and all; see batchspawner_config):

* ``exec_prefix``: its default ``sudo -E -u {username}`` needs sudo, which
  isn't here; ``setpriv`` drops to the user the same way, keeping the
  environment. batchspawner runs squeue and scancel with the hub's own
  environment (only sbatch gets the spawner's), so the cluster's
  ``SLURM_CONF`` goes into the prefix, through ``env``.
* ``batchspawner_singleuser_cmd``, the wrapper by its full path in the venv:
  the workaround for the one JupyterHub 6 incompatibility met. JupyterHub
  6's ``Spawner.env_keep`` no longer passes the hub's PATH on (up to 5 it
  did), and the batch script exports only the spawner's environment, so
  the bare ``batchspawner-singleuser`` isn't found on the node. (The job
  then fails, but batchspawner, once the job has started, only waits for
  the port to be reported, so the spawn hangs until ``start_timeout``.)
* Its API handler (the node reports the server's port to the hub) needs
  no configuration: importing batchspawner registers it, and it works
  with JupyterHub 6 as is. The hub logs Spawner.db's deprecation warning
  once per spawn (batchspawner commits through it).

Run as root: ``bench/run.sh`` or, from the repository root,
``python -m bench.slurm_spawn [--rounds N]``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import textwrap

from tests.harness.env import TEST_USER, VENV_BIN
from tests.harness.hub import Hub, timed_spawn
from tests.harness.images import site_store  # the demo's store: jupyter, deb
from tests.harness.slurm import Slurm

# What each spawn asks for; SlurmChSpawner's defaults are 1 CPU, 2 GB, 1 h.
CHSPAWNER_RUNS = {"kernels mode (deb)": {"image": "deb", "mode": "kernels"},
                  "server mode (jupyter)": {"image": "jupyter", "mode": "server"}}


def batchspawner_config(cluster: Slurm) -> str:
    return textwrap.dedent(f"""
        c.JupyterHub.spawner_class = "batchspawner.SlurmSpawner"
        c.SlurmSpawner.exec_prefix = ("/usr/bin/setpriv --reuid={{username}} "
            "--regid={{username}} --init-groups "
            "/usr/bin/env SLURM_CONF={cluster.env['SLURM_CONF']}")
        c.SlurmSpawner.batchspawner_singleuser_cmd = "{VENV_BIN}/batchspawner-singleuser"
        c.SlurmSpawner.req_partition = "{cluster.partition}"
        c.SlurmSpawner.req_nprocs = "1"
        c.SlurmSpawner.req_memory = "2G"
        c.SlurmSpawner.req_runtime = "1:00:00"
    """)


def chspawner_config(cluster: Slurm) -> str:
    return textwrap.dedent(f"""
        c.JupyterHub.spawner_class = "slurmchspawner"
        c.SlurmChSpawner.slurm_env = {cluster.env!r}
        c.SlurmChSpawner.partitions = ["{cluster.partition}"]
    """)


def timed_slurm_spawn(hub: Hub, cluster: Slurm, options: dict, what: str) -> float:
    elapsed = timed_spawn(hub, options, what)
    # Every spawn starts on an idle node: a server still shutting down
    # would take CPU from the next one.
    cluster.wait_idle(timeout=60)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    store = site_store()
    times: dict[str, list[float]] = {"batchspawner": [], **{k: [] for k in CHSPAWNER_RUNS}}
    with Slurm() as cluster:
        anchor = Hub(store, TEST_USER, images=("deb",),
                     extra_config=batchspawner_config(cluster))
        ours = Hub(store, TEST_USER, images=("jupyter", "deb"),
                   extra_config=chspawner_config(cluster))
        try:
            for _ in range(args.rounds):
                times["batchspawner"].append(timed_slurm_spawn(anchor, cluster, {},
                                                               "batchspawner"))
                for label, options in CHSPAWNER_RUNS.items():
                    times[label].append(timed_slurm_spawn(ours, cluster, options,
                                                         f"SlurmChSpawner {label}"))
        finally:
            anchor.stop()
            ours.stop()
    base = statistics.median(times["batchspawner"])
    print(f"{'spawn to ready on Slurm (median of ' + str(args.rounds) + ')':<38} "
          f"{'batchspawner':>12} {'chspawner':>10} {'ratio':>6}")
    for label in CHSPAWNER_RUNS:
        ours_s = statistics.median(times[label])
        print(f"{'SlurmChSpawner ' + label:<38} {base:>11.2f}s {ours_s:>9.2f}s "
              f"{ours_s / base:>5.2f}x")
    # The spread matters here: batchspawner's times jump with the hub's
    # backoff while it waits for the server (see docs/benchmarks.md).
    for label, samples in times.items():
        print(f"  {label}: " + " ".join(f"{t:.2f}" for t in sorted(samples)) + " s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
