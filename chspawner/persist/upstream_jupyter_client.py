"""jupyter_client's private parts that persistent kernels need, all here.

jupyter_client has no public way to take over a kernel another process
started (set its spec, mark it started, reconnect its control socket), nor
to run code around the launch and the post-start of a kernel manager's
kernel. What chspawner.persist does with them goes through this module,
and :data:`PRIVATE` lists each name, checked at import (and in
tests/test_upstream_contract.py, with who calls the overridden methods).
Supported: jupyter_client 8 (pyproject's ``persist`` extra pins the major).
"""
from __future__ import annotations

import asyncio
from typing import Any

from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager, KernelManager
from jupyter_client.multikernelmanager import MultiKernelManager

from chspawner.persist.upstream import Private, require

PRIVATE = (
    Private(AsyncKernelManager, "_async_launch_kernel", "run the kernel's process detached",
            used_by=(AsyncKernelManager._async_start_kernel,)),
    Private(AsyncKernelManager, "_async_post_start_kernel", "record every (re)start",
            used_by=(AsyncKernelManager._async_start_kernel,)),
    Private(KernelManager, "_launch_args", "the working directory a restart reuses",
            used_by=(AsyncKernelManager._async_restart_kernel,)),
    Private(KernelManager, "_kernel_spec", "an adopted kernel keeps its recorded spec",
            used_by=(KernelManager.kernel_spec.fget,)),
    Private(KernelManager, "_ready", "an adopted kernel is ready", on_instances=True,
            used_by=(KernelManager.__init__, KernelManager.ready.fget)),
    Private(KernelManager, "_attempted_start", "an adopted kernel counts as started",
            on_instances=True, used_by=(KernelManager.__init__,)),
    Private(KernelManager, "_connect_control_socket", "an adopted kernel's control socket"),
    Private(KernelManager, "_close_control_socket", "letting go of a kernel"),
    Private(MultiKernelManager, "_kernels", "adding an adopted kernel, letting go of one"),
)
require("jupyter_client", PRIVATE)


class KernelManagerHooks:
    """Mixin for a jupyter_client kernel manager: jupyter_client's private
    launch and post-start steps as overridable public hooks."""

    async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
        return await self.launch_kernel_process(kernel_cmd, **kw)

    async def _async_post_start_kernel(self, **kw: Any) -> None:
        return await self.kernel_post_start(**kw)

    async def launch_kernel_process(self, kernel_cmd: list[str], **kw: Any) -> None:
        """Start the kernel's process (``kw``: Popen's options, as
        jupyter_client passes them to the provisioner)."""
        return await super()._async_launch_kernel(kernel_cmd, **kw)  # type: ignore[misc]

    async def kernel_post_start(self, **kw: Any) -> None:
        """After every start and restart, once the kernel runs."""
        return await super()._async_post_start_kernel(**kw)  # type: ignore[misc]


def launch_cwd(km: KernelManager) -> str:
    """The working directory the kernel was (last) launched in ('' if none)."""
    return str((km._launch_args or {}).get("cwd") or "")


def set_kernel_spec(km: KernelManager, spec: KernelSpec) -> None:
    """Give a kernel manager this spec instead of looking its name up."""
    km._kernel_spec = spec


def mark_started(km: KernelManager, cwd: str | None) -> None:
    """Make a kernel manager hold a kernel that runs already (started by an
    earlier server): ready; later shutdowns and restarts get fresh "ready"
    futures, as for any kernel; a restart keeps its working directory and
    ports; its control socket connected."""
    km._launch_args = {"cwd": cwd or None}
    ready = asyncio.get_running_loop().create_future()
    ready.set_result(None)
    km._ready = ready
    km._attempted_start = True
    km.start_restarter()
    km._connect_control_socket()


def close_control_socket(km: KernelManager) -> None:
    km._close_control_socket()


def add_kernel(mkm: MultiKernelManager, kernel_id: str, km: KernelManager) -> None:
    """Hold ``km`` (adopted, not started here) under ``kernel_id``."""
    mkm._kernels[kernel_id] = km


def drop_kernel(mkm: MultiKernelManager, kernel_id: str) -> None:
    """Forget ``kernel_id`` without stopping it."""
    del mkm._kernels[kernel_id]
