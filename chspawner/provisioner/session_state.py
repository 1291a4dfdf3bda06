"""The session recorder in an ipykernel kernel (``session_state``).

A kernel started with it records which cells made and changed which
variables, so that its session can be saved and brought back in a new
kernel (kernels/ipykernel/session/chspawner_session.py;
docs/user/kernel-state.md). Nothing is asked of the image beyond
ipykernel: the recorder and a cloudpickle (pure Python) are copied into
the kernel's staging directory, which the container sees, and the
kernel's ``-m ipykernel_launcher`` becomes the recorder's launcher there.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import cloudpickle

from chspawner.provisioner.kernelspecs import kernel_files

#: Where snapshots go, under the user's home (the container's and the host's).
SNAPSHOTS = Path(".local") / "share" / "chspawner" / "snapshots"
LAUNCHER = "chspawner_kernel.py"


def is_ipykernel(cmd: list[str]) -> bool:
    """Whether a kernel's argv is ipykernel's usual ``PYTHON -m ipykernel_launcher``."""
    return len(cmd) >= 3 and cmd[1] == "-m" and cmd[2] in ("ipykernel_launcher", "ipykernel")


def stage_recorder(staging: Path) -> Path:
    """Copy the recorder and cloudpickle into ``staging``/session (again on
    every start: a restart after an upgrade gets the new one). Returns it."""
    target = staging / "session"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(kernel_files("ipykernel") / "session", target,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(Path(cloudpickle.__file__).parent, target / "cloudpickle",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return target


def recording_command(cmd: list[str], session_inside: Path) -> list[str]:
    """The kernel's argv with the recorder's launcher (seen at
    ``session_inside`` in the container) for ``-m ipykernel_launcher``."""
    return [cmd[0], str(session_inside / LAUNCHER), *cmd[3:]]


__all__ = ["LAUNCHER", "SNAPSHOTS", "is_ipykernel", "recording_command", "stage_recorder"]
