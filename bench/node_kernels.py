"""Kernels on a compute node: chspawner's (in an image) against native
ones started the same way, on the same node, in one run.

The multi-node test cluster (tests/harness/cluster.py); every kernel runs
on the same compute node, the client (jupyter_client, as the unprivileged
user) on the service node, as a Jupyter server would. Times are from the
start request to the first kernel_info reply, per launcher:

* srun: chspawner's kernelspec with launcher ``srun`` (the provisioner's
  srun step, the CURVE relay on the node, Debian's ipykernel 6.17 in the
  Debian test image ``deb``) against a plain kernelspec whose argv is the
  very same srun command line (built by the same launcher class) running
  the host's Debian ipykernel 6.17 natively, bound to 0.0.0.0 on the node
  and reached at its address; both through ``KernelManager``;
* sbatch: chspawner's kernelspec with launcher ``sbatch`` (the kernel as a
  batch job of its own, as SlurmChSpawner's kernel jobs run, without the
  persist keeper) against a plain kernelspec whose argv is the same
  native ipykernel's batch job, built by the same sbatch command-line
  builder, submitted with ``--wait`` (so that jupyter_client has a
  process to follow: sbatch, until the job ends).

All four go through jupyter_client's ``KernelManager``, as a Jupyter
server starts kernels. Rounds alternate between them, each on an idle
node; one warm-up round is not counted. Medians, and the ratio chspawner /
native (target <= 1.1x each).

Run as root (it drops to the test user): ``bench/run.sh`` or, from the
repository root, ``python -m bench.node_kernels [--rounds N] [--check]``.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path

from chspawner.provisioner.launchers import SrunStep
from bench.workdir import user_workdir
from chspawner.slurm import SlurmClient, sbatch_argv
from tests.harness.cluster import Cluster
from tests.harness.env import CHSPAWNER, TEST_USER, VENV_BIN
from tests.harness.images import site_store  # the demo's store: deb
from tests.harness.users import as_user_or_exit

TARGET = 1.1
NATIVE_ARGV = ["/usr/bin/python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
LAUNCHERS = ("srun", "sbatch")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a ratio is over its target")
    args = parser.parse_args()
    store = site_store()
    with user_workdir("node-kernels", "node_kernels_worker.py") as (_, home, worker):
        # One node: the kernels' own, nothing else running on it.
        with Cluster(nodes=1) as cluster:
            times = measure(cluster, cluster.nodes[0], store, home, worker, args.rounds)
    print(f"{'kernel on a compute node (median of ' + str(args.rounds) + ')':<40} "
          f"{'native':>8} {'chspawner':>10} {'ratio':>6} {'target':>7}")
    failed = False
    for launcher in LAUNCHERS:
        native = statistics.median(times[f"native {launcher}"])
        ours = statistics.median(times[f"chspawner {launcher}"])
        ratio = ours / native
        failed |= ratio > TARGET
        print(f"{launcher + ': start to kernel_info':<40} {native:>7.2f}s {ours:>9.2f}s "
              f"{ratio:>5.2f}x {TARGET:>6.2f}x{'  OVER TARGET' if ratio > TARGET else ''}")
    for label, samples in times.items():
        print(f"  {label}: " + " ".join(f"{t:.2f}" for t in samples) + " s")
    return 1 if args.check and failed else 0


def measure(cluster: Cluster, node: str, store: str, home: Path, worker: Path,
            rounds: int) -> dict[str, list[float]]:
    """Install the kernelspecs, then time warm-up + ``rounds`` alternating
    rounds; {label: seconds per round}."""
    partition = f"--partition={cluster.partition}"
    where = [f"--nodelist={node}", partition]
    prefix = home / "prefix"
    env = {**cluster.env, "TMPDIR": str(home), "JUPYTER_PATH": str(prefix / "share/jupyter"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime")}
    for launcher in LAUNCHERS:
        as_user_or_exit(TEST_USER, str(CHSPAWNER), "kernel", "install", "-s", store,
                        "--prefix", str(prefix), "--launcher", launcher,
                        *(f"--{launcher}-arg={arg}" for arg in where),
                        "--name", f"chspawner-{launcher}", "deb", env=env)
    # The native ones: the host's ipykernel in the srun line chspawner's srun
    # launcher builds, and in the batch job its sbatch builder writes.
    srun = SrunStep(logging.getLogger(__name__), SlurmClient(), "native-kernel", TEST_USER,
                    srun_args=where)
    sbatch = sbatch_argv(NATIVE_ARGV, job_name="native-kernel",
                         output=str(home / "native-%j.log"), chdir=str(home),
                         extra=["--wait", *where])
    for launcher, argv in (("srun", srun.command(NATIVE_ARGV)), ("sbatch", sbatch)):
        spec = prefix / f"share/jupyter/kernels/native-{launcher}"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": argv, "display_name": f"Python 3 (native, {launcher})",
            "language": "python"}))
    subprocess.run(["chown", "-R", f"{TEST_USER}:", str(prefix)], check=True)
    address = cluster.address[node]
    python = str(VENV_BIN / "python")
    runs = {
        "native srun": ["native-srun", address],
        "chspawner srun": ["chspawner-srun"],
        "native sbatch": ["native-sbatch", address],
        "chspawner sbatch": ["chspawner-sbatch"],
    }
    times: dict[str, list[float]] = {label: [] for label in runs}
    for n in range(rounds + 1):
        for label, argv in runs.items():
            out = as_user_or_exit(TEST_USER, python, str(worker), *argv, env=env)
            cluster.wait_idle(timeout=60, node=node)  # the next start finds it idle
            if n:  # round 0 warms the page cache on both sides
                # (the last line: sbatch and the kernels print to the same stdout)
                times[label].append(json.loads(out.splitlines()[-1])["seconds"])
    return times


if __name__ == "__main__":
    sys.exit(main())
