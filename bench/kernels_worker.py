"""The part of bench/kernels.py that runs as the unprivileged user.

Usage: kernels_worker.py ready ROUNDS NATIVE IMAGE | concurrent N IMAGE
Prints one JSON object.
"""
import asyncio
import json
import statistics
import sys
import time

from jupyter_client.manager import AsyncKernelManager, KernelManager


def ready_time(kernel_name: str) -> float:
    """start_kernel() to the kernel_info reply, in seconds."""
    km = KernelManager(kernel_name=kernel_name)
    start = time.perf_counter()
    km.start_kernel()
    client = km.client()
    client.start_channels()
    client.wait_for_ready(timeout=120)  # sends kernel_info until it is answered
    elapsed = time.perf_counter() - start
    client.stop_channels()
    km.shutdown_kernel(now=True)
    return elapsed


def ready(rounds: int, native: str, image: str) -> dict:
    times: dict[str, list[float]] = {native: [], image: []}
    ready_time(native)  # warm the page cache for both
    ready_time(image)
    for _ in range(rounds):
        for name in (native, image):
            times[name].append(ready_time(name))
    return {name: statistics.median(t) for name, t in times.items()} | {
        "all": times}


async def one(kernel_name: str, start: float
              ) -> tuple[float, list[tuple[str, str, int]], AsyncKernelManager]:
    km = AsyncKernelManager(kernel_name=kernel_name)
    await km.start_kernel()
    client = km.client()
    client.start_channels()
    await client.wait_for_ready(timeout=600)
    # An endpoint is (transport, ip, port): IPC kernels all number their
    # sockets 1-5, each under a path of its own.
    ports = [(km.transport, km.ip, port) for port in (
        km.shell_port, km.iopub_port, km.stdin_port, km.hb_port, km.control_port)]
    client.stop_channels()
    return time.perf_counter() - start, ports, km


async def concurrent(count: int, image: str) -> dict:
    start = time.perf_counter()
    results = await asyncio.gather(*(one(image, start) for _ in range(count)),
                                   return_exceptions=True)
    total = time.perf_counter() - start
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    ports = [p for _, ps, _ in ok for p in ps]
    await asyncio.gather(*(km.shutdown_kernel(now=True) for _, _, km in ok))
    times = sorted(t for t, _, _ in ok)
    return {"count": count, "ready": len(ok), "errors": errors[:3], "total": total,
            "first": times[0] if times else None, "median": statistics.median(times)
            if times else None, "last": times[-1] if times else None,
            "port_clash": len(ports) != len(set(ports))}


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "ready":
        print(json.dumps(ready(int(sys.argv[2]), sys.argv[3], sys.argv[4])))
    else:
        print(json.dumps(asyncio.run(concurrent(int(sys.argv[2]), sys.argv[3]))))
