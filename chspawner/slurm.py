"""Talking to Slurm through its client commands (sbatch, squeue, scancel),
for the spawner (a user's server as a job) and the provisioner (a kernel
as a job): how a command is run and failures reported, and what a job's
state means."""
from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping

#: States in which a job still runs or will.
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED",
                           "RESIZING", "REQUEUED"})


class SlurmError(RuntimeError):
    """A Slurm command failed; the message says which and why, in one line."""


async def slurm_command(*argv: str, env: Mapping[str, str] | None = None,
                        preexec_fn: Callable[[], None] | None = None) -> str:
    """Run a Slurm client command; its stdout, or SlurmError with the end
    of its stderr."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None, preexec_fn=preexec_fn)
    except OSError as e:
        raise SlurmError(f"{argv[0]}: {e.strerror}") from None
    out, err = await process.communicate()
    if process.returncode != 0:
        # One line: Slurm's clients say "sbatch: error: ..." on several.
        lines = [line.strip().removeprefix(f"{argv[0]}: ")
                 for line in err.decode(errors="replace").splitlines() if line.strip()]
        raise SlurmError(f"{argv[0]}: {'; '.join(lines)[-300:] or 'failed'}")
    return out.decode()


async def job_status(job_id: str, run=slurm_command) -> tuple[str, str, str]:
    """(state, node, reason) of a job; state '' once Slurm has forgotten it.
    ``run`` runs the command (the spawner's runs it as the user)."""
    try:
        out = await run("squeue", "-h", "-j", job_id, "-o", "%T|%N|%r")
    except SlurmError as e:
        if "Invalid job id" in str(e):  # ended, and already forgotten
            return "", "", ""
        raise
    state, _, rest = out.strip().partition("|")
    node, _, reason = rest.partition("|")
    return state, node, reason


def job_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) fit to submit a job from inside another: the
    SLURM_* variables of the job we may be in would otherwise describe the
    new job's allocation to its tools; SLURM_CONF still says which cluster."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) or k == "SLURM_CONF"}
