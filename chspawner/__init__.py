"""chspawner: Jupyter in users' own container images on HPC, unprivileged.

Kept tiny on purpose: ``chspawner run`` imports this package on every
container start.
"""
from chspawner._version import __version__

__all__ = ["__version__"]
