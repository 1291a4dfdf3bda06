"""The part of bench/node_kernels.py that runs as the unprivileged user:
one kernel start on a compute node, timed, per call.

Usage: node_kernels_worker.py KERNEL_NAME [CLIENT_IP]

jupyter_client's KernelManager starts the kernelspec KERNEL_NAME; the client
connects to CLIENT_IP if given (a native kernel, bound to 0.0.0.0 on its
node), else where the manager says (chspawner's). Prints one JSON object:
{"seconds": start request to the first kernel_info reply}.
"""
import json
import sys
import time

from jupyter_client.manager import KernelManager

READY_TIMEOUT = 120
SHUTDOWN_TIMEOUT = 30


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
        stop(km, client)
    return elapsed


def stop(km: KernelManager, client) -> None:
    """Shut the kernel down by request, through the client (the manager's own
    control socket, for a native kernel, went to 0.0.0.0), so that it exits
    and srun (or sbatch --wait) with it: SIGKILL to srun alone may leave its
    step on the node. Killed only if it won't go."""
    client.shutdown()
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT
    while km.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    client.stop_channels()
    if km.is_alive():
        km.shutdown_kernel(now=True)
    else:
        km.cleanup_resources()


if __name__ == "__main__":
    name, *client_ip = sys.argv[1:]
    print(json.dumps({"seconds": by_manager(name, client_ip[0] if client_ip else None)}))
