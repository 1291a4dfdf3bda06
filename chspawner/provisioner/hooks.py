"""The contract between the provisioner and the kernel managers that use
it, both ways, declared here so neither looks the other up by name.

- :class:`KernelJobHost` is *asked of* a kernel manager: one that inherits
  it runs a program of its own around a kernel in a batch job of its own
  (chspawner.persist's keeper). The provisioner calls it, and nothing else
  of the kernel manager beyond jupyter_client's public traits.
- :class:`Adoptable` is *offered by* the provisioner: what a kernel
  manager that keeps kernels across servers may ask (whether the kernel
  runs in a job of its own, that job's state, where its files are staged).
  A provisioner that isn't one can't be taken over by a new server.

Layer rule: chspawner.provisioner imports nothing of the kernel managers
(chspawner.persist); they import this.
"""
from __future__ import annotations

from pathlib import Path

from chspawner.slurm import Job, JobState


class KernelJobHost:
    """A kernel manager whose kernels in batch jobs run under its program.

    (A plain class, not an ABC: kernel managers are traitlets classes,
    whose metaclass an ABC's would clash with.)"""

    def kernel_job_command(self, staging: Path) -> list[str]:
        """The command that runs before the kernel's own, inside the
        kernel's batch job; the kernel's command follows it as arguments.
        ``staging`` is the kernel's staging directory (shared with the node:
        its connection file is ``kernel.json`` there). [] for none."""
        return []


class Adoptable:
    """A provisioner whose kernel a new process can take over from its
    provisioner info (``load_provisioner_info``)."""

    @property
    def in_job(self) -> bool:
        """Whether the kernel runs in a Slurm batch job of its own (then
        it lives on a node, and so does a KernelJobHost's program)."""
        raise NotImplementedError

    @property
    def staging(self) -> Path | None:
        """The kernel's staging directory (None before its first start)."""
        raise NotImplementedError

    async def job_state(self) -> JobState:
        """The state of the kernel's job now (in_job kernels); SlurmError
        when Slurm can't say."""
        raise NotImplementedError

    @property
    def last_job(self) -> Job | None:
        """The kernel's job as Slurm last showed it (when its poll asked),
        with Slurm's own word for its state (TIMEOUT, NODE_FAIL...): why it
        ended, once it has. None for a kernel not in a job, or not asked yet."""
        raise NotImplementedError


__all__ = ["Adoptable", "KernelJobHost"]
