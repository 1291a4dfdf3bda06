"""JupyterHub spawners that put users' servers and kernels in images:
``ChSpawner`` (local, chspawner.spawners.local) and ``SlurmChSpawner``
(a Slurm job per server, chspawner.spawners.slurm)."""
from chspawner.spawners.local import ChSpawner, SpawnFailed
from chspawner.spawners.slurm import SlurmChSpawner

__all__ = ["ChSpawner", "SlurmChSpawner", "SpawnFailed"]
