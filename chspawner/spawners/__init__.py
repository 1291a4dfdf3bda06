"""JupyterHub spawners that put users' servers and kernels in images:
``ChSpawner`` (local, chspawner.spawners.local) and ``SlurmChSpawner``
(a Slurm job per server, chspawner.spawners.slurm).

The spawners are imported on first use, not with the package: a Slurm job
runs ``python -m chspawner.spawners.listening`` beside the server, and
must not pay for importing JupyterHub to check a port.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chspawner.spawners.local import ChSpawner, SpawnFailed
    from chspawner.spawners.slurm import SlurmChSpawner

_HOMES = {"ChSpawner": "chspawner.spawners.local", "SpawnFailed": "chspawner.spawners.local",
          "SlurmChSpawner": "chspawner.spawners.slurm"}
__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
