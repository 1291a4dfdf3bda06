"""JupyterHub spawners that put users' servers and kernels in images:
``ChSpawner`` (local) and ``SlurmChSpawner`` (a Slurm job per server)."""
from chspawner.spawners.local import ChSpawner, SlurmChSpawner, SpawnFailed

__all__ = ["ChSpawner", "SlurmChSpawner", "SpawnFailed"]
