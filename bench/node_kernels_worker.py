"""The part of bench/node_kernels.py that runs as the unprivileged user:
one kernel start on a compute node, timed, per call.

Usage:
  node_kernels_worker.py manager KERNEL_NAME [CLIENT_IP]
      jupyter_client's KernelManager starts the kernelspec KERNEL_NAME; the
      client connects to CLIENT_IP if given (a native kernel bound to
      0.0.0.0 on its node), else where the manager says (chspawner's).
  node_kernels_worker.py sbatch NODE_ADDRESS JOB_NAME LOG ARG...
      a native ipykernel as a batch job of its own, submitted with
      chspawner's sbatch command-line builder (ARG...: more sbatch options),
      its connection file written here; the client connects to NODE_ADDRESS.

Prints one JSON object: {"seconds": start request to the kernel_info reply}.
"""
import json
import queue
import subprocess
import sys
import time

from jupyter_client import BlockingKernelClient
from jupyter_client.connect import write_connection_file
from jupyter_client.manager import KernelManager

from chspawner.slurm import job_environment, parse_job_id, sbatch_argv

READY_TIMEOUT = 120


def by_manager(kernel_name: str, client_ip: str | None) -> float:
    km = KernelManager(kernel_name=kernel_name)
    if client_ip:
        # A native kernel on a node: it binds 0.0.0.0 there (jupyter_client
        # only launches on an address of this host), and is reached at the
        # node's; the ports are chosen here, as for a local kernel.
        km.ip, km.cache_ports = "0.0.0.0", False
    start = time.perf_counter()
    km.start_kernel()
    client = km.client()
    if client_ip:
        client.ip = client_ip
    client.start_channels()
    try:
        client.wait_for_ready(timeout=READY_TIMEOUT)  # kernel_info until answered
        elapsed = time.perf_counter() - start
    finally:
        client.stop_channels()
        # A shutdown request, so the kernel exits and srun with it (SIGKILL
        # to srun alone may leave its step on the node).
        km.shutdown_kernel(now=False)
    return elapsed


def kernel_info_reply(client: BlockingKernelClient) -> None:
    """As ``wait_for_ready`` (kernel_info, a reply awaited 1 s, again), but
    with no heartbeat check: with no manager, it takes a kernel whose job
    is still starting for a dead one."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        msg_id = client.kernel_info()
        try:
            while client.get_shell_msg(timeout=1)["parent_header"].get("msg_id") != msg_id:
                pass
            return
        except queue.Empty:
            continue
    raise TimeoutError(f"no kernel_info reply within {READY_TIMEOUT} s")


def by_sbatch(address: str, job_name: str, log: str, extra: list[str]) -> float:
    start = time.perf_counter()
    connection_file, info = write_connection_file(ip="0.0.0.0")
    argv = sbatch_argv(["/usr/bin/python3", "-m", "ipykernel_launcher", "-f",
                        connection_file], job_name=job_name, output=log,
                       chdir="/tmp", extra=extra)
    job = parse_job_id(subprocess.run(argv, capture_output=True, text=True, check=True,
                                      env=job_environment()).stdout)
    client = BlockingKernelClient()
    client.load_connection_info({**info, "ip": address})
    client.start_channels()
    try:
        kernel_info_reply(client)
        elapsed = time.perf_counter() - start
    finally:
        client.stop_channels()
        subprocess.run(["scancel", job], check=False, env=job_environment())
    return elapsed


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "manager":
        seconds = by_manager(rest[0], rest[1] if len(rest) > 1 else None)
    else:
        seconds = by_sbatch(rest[0], rest[1], rest[2], rest[3:])
    print(json.dumps({"seconds": seconds}))
