"""Kernels in container images: the jupyter_client kernel provisioner
(:mod:`.container`), the discovery of the kernels inside stored images
(:mod:`.kernelspecs`), and the private transport of kernels' sockets
(:mod:`.transport`)."""
from chspawner.provisioner.container import ContainerProvisioner, KernelStartError

__all__ = ["ContainerProvisioner", "KernelStartError"]
