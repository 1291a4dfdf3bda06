"""The provisioner's settings: a kernelspec's
``metadata.kernel_provisioner.config``, declared and checked.

Every key is a trait here, with its type, default and help, so a value of
the wrong type stops the kernel's start with one clear line naming the key,
and a key nobody reads (a typo) is named in a warning instead of silently
doing nothing. The spawner passes some of them to every image kernel
(``ContainerKernelSpecManager.provisioner_config``).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from traitlets import (Bool, Dict, Enum, Float, HasTraits, Int, List, TraitError,
                       Unicode, Union)

from chspawner.runtime.spec import BACKENDS

#: Where a kernel runs: here, a Slurm job step (srun), a batch job of its own.
LAUNCHERS = ("local", "srun", "sbatch")


class SettingsError(ValueError):
    """A setting has a value of the wrong type; the message names it, in one line."""


class ProvisionerSettings(HasTraits):
    """The keys of a chspawner kernelspec's provisioner config."""

    image = Unicode(
        "", help="The image the kernel runs in: a name in the store, or an image "
                 "directory (absolute path). Required.")
    storage = Unicode(
        None, allow_none=True,
        help="The image store to find ``image`` in (default: $CH_IMAGE_STORAGE or "
             "/var/tmp/$USER.ch).")
    binds = List(
        Unicode(), help="Host directories bound into the container (SRC or SRC:DST).")
    devices = List(
        Unicode(), help="CDI devices the kernel's container gets (chspawner run "
                        "--device): vendor.com/class=NAME, or a whole kind such as "
                        "nvidia.com/gpu, which in a Slurm job is the job's own GPUs.")
    env = Dict(
        value_trait=Unicode(), key_trait=Unicode(),
        help="Environment variables set in the container, over the image's.")
    home = Bool(
        True, help="Bind the user's $HOME at /home/$USER (always, on a compute node), "
                   "so that a notebook's kernel sees the files beside it. False: the "
                   "container has no view of the home.")
    backend = Enum(
        BACKENDS, "builtin",
        help="The container runtime: chspawner's own (builtin), or Charliecloud's ch-run.")
    launcher = Enum(
        LAUNCHERS, "local",
        help="Where the kernel runs: here (local), as a Slurm job step on a compute "
             "node (srun), or as a Slurm batch job of its own (sbatch).")
    jobid = Union(
        [Unicode(), Int()], default_value=None, allow_none=True,
        help="launcher srun: run as a step of this existing job (the user's "
             "allocation) instead of a new one.")
    srun_args = List(Unicode(), help="launcher srun: more srun options (--partition=...).")
    sbatch_args = List(
        Unicode(), help="launcher sbatch: more sbatch options (--time=..., --partition=...).")
    away_from_server = Bool(
        False, help="launcher sbatch, for a server that runs in a Slurm job itself: keep "
                    "the kernel's job off the server's node (sbatch --exclude=NODE, NODE "
                    "the server job's $SLURMD_NODENAME), so that losing one node loses "
                    "the server or its kernels, never both. Outside a job: no effect.")
    slurm_poll_interval = Float(
        1.0, help="launcher sbatch: seconds between the server's queries of its kernels' "
                  "job states: one squeue per interval for all its kernels' jobs (the "
                  "spawner gives its own slurm_poll_interval).")
    slurm_query_command = List(
        Unicode(), ["squeue"],
        help="launcher sbatch: the command run, with squeue's arguments after it, to "
             "learn the kernels' job states (the spawner gives its own).")
    slurm_accounting_command = List(
        Unicode(), ["sacct"],
        help="launcher sbatch: the command asked, with sacct's arguments, how a job "
             "squeue has forgotten ended, where Slurm keeps accounting; empty: never.")
    slurm_table_dir = Unicode(
        "", help="launcher sbatch: a directory shared with the hub, where the hub "
                 "publishes job states (the spawner gives its slurm_table_dir): the "
                 "kernels' jobs are listed there and their states read there, squeue "
                 "run here only when no fresh table comes. Empty: squeue here.")
    session_state = Bool(
        False, help="An ipykernel kernel records which cells make and change which "
                    "variables, so that its session can be saved and restored in a new "
                    "kernel (docs/user/kernel-state.md). Snapshots go under the user's "
                    "~/.local/share/chspawner/snapshots; needs ``home``. The image needs "
                    "nothing beyond ipykernel.")
    launch_timeout = Float(
        None, allow_none=True,
        help="Seconds the kernel has to bind its ports, queueing included "
             "(default: 60 here, 600 on a compute node).")
    job_log_dir = Unicode(
        "", help="launcher sbatch: the directory the kernel's job writes its output "
                 "to (the spawner gives the user's log directory). Default: the "
                 "kernel's staging directory, removed with the kernel.")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None,
                    log: logging.Logger | logging.LoggerAdapter | None = None
                    ) -> "ProvisionerSettings":
        """Settings from a kernelspec's provisioner config: SettingsError for
        a value of the wrong type, a warning naming each unknown key."""
        settings = cls()
        if config is None:
            return settings
        if not isinstance(config, Mapping):
            raise SettingsError("the kernelspec's provisioner config is not a JSON object")
        known = set(settings.trait_names())
        for key, value in config.items():
            if key not in known:
                if log is not None:
                    log.warning("chspawner: unknown provisioner config key %r in the "
                                "kernelspec (ignored; known: %s)", key, ", ".join(sorted(known)))
                continue
            try:
                settings.set_trait(key, value)
            except TraitError:
                raise SettingsError(
                    f"provisioner config {key!r}: {value!r} is not "
                    f"{_expected(settings.traits()[key])}") from None
        return settings

    @property
    def on_node(self) -> bool:
        """Whether the kernel runs on a compute node (srun or sbatch)."""
        return self.launcher in ("srun", "sbatch")

    def timeout(self) -> float:
        """Seconds the kernel has to bind its ports."""
        if self.launch_timeout is not None:
            return self.launch_timeout
        return 600.0 if self.on_node else 60.0


def _expected(trait: Any) -> str:
    """What a trait takes, in words, for an error message."""
    if isinstance(trait, Enum):
        return "one of " + ", ".join(map(repr, trait.values))
    words = {Unicode: "a string", Bool: "true or false", Float: "a number",
             List: "a list of strings", Dict: "an object of strings",
             Union: "a string or an integer"}
    for kind, word in words.items():
        if isinstance(trait, kind):
            return word
    return trait.info()


__all__ = ["LAUNCHERS", "ProvisionerSettings", "SettingsError"]
