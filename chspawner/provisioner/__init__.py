"""Kernels in container images: the jupyter_client kernel provisioner
(:mod:`.container`), its settings (:mod:`.settings`), the mechanisms that
run and follow a kernel's process (:mod:`.launchers`: here, an srun step, a
batch job, an adopted PID), the contract with kernel managers
(:mod:`.hooks`), the discovery of the kernels inside stored images
(:mod:`.kernelspecs`), and the private transport of kernels' sockets
(:mod:`.transport`). It never imports chspawner.persist nor the spawners."""
from chspawner.provisioner.container import ContainerProvisioner, KernelStartError

__all__ = ["ContainerProvisioner", "KernelStartError"]
