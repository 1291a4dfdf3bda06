"""Kernels in container images: the jupyter_client kernel provisioner
(:mod:`.container`), its settings (:mod:`.settings`), the mechanisms that
run and follow a kernel's process (:mod:`.launchers`: here, an srun step, a
batch job, an adopted PID), the contract with kernel managers
(:mod:`.hooks`), the discovery of the kernels inside stored images
(:mod:`.kernelspecs`), and the private transport of kernels' sockets
(:mod:`.transport`). It never imports chspawner.persist nor the spawners.

The provisioner is imported on first use, not with the package: the relay
a kernel's job runs on its node (``python -m chspawner.provisioner.transport``)
must not pay for importing jupyter_client.
"""
from __future__ import annotations

import importlib

TYPE_CHECKING = False  # (typing's, without importing typing: see transport)
if TYPE_CHECKING:
    from typing import Any

    from chspawner.provisioner.container import ContainerProvisioner, KernelStartError

__all__ = ["ContainerProvisioner", "KernelStartError"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("chspawner.provisioner.container"), name)
