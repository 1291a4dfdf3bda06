"""Slurm jobs' logs in the user's own directory: made, and read back, as
the user.

The hub runs as root and the directory is in the user's home, where the
user decides what every name is (a symlink to another user's file, a
FIFO): so the hub never creates or reads there itself. It runs
``mkdir`` and ``tail`` as the user (the ``preexec_fn`` that drops to the
user's account), with a deadline and a bound on what it reads.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

PATH = "/usr/local/bin:/usr/bin:/bin"
#: Seconds a mkdir or tail as the user may take (a home on a hung NFS server).
TIMEOUT = 10.0
#: A failed job's log, in a spawn error: its last lines, at most this long.
TAIL_LINES = 5
TAIL_BYTES = 2000


class JobLogError(RuntimeError):
    """The directory could not be made; the message says why, in one line."""


async def _as_user(argv: Sequence[str], preexec_fn: Callable[[], None] | None,
                   limit: int) -> tuple[int | None, bytes, bytes]:
    """(status, stdout, stderr) of ``argv`` run with ``preexec_fn``, each
    output cut at ``limit`` bytes; status None if it ran past TIMEOUT (then
    it is killed)."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={"PATH": PATH, "LANG": "C.UTF-8"},
        preexec_fn=preexec_fn)
    try:
        async with asyncio.timeout(TIMEOUT):
            out, err = await asyncio.gather(process.stdout.read(limit),
                                            process.stderr.read(limit))
            return await process.wait(), out, err
    except TimeoutError:
        return None, b"", b""
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


async def make_dir(path: str, preexec_fn: Callable[[], None] | None) -> None:
    """Create ``path`` (and its parents) as the user, mode 0700: the logs
    are the user's alone. One that exists is left as its owner made it."""
    status, _, err = await _as_user(["mkdir", "-p", "-m", "0700", "--", path], preexec_fn,
                                    TAIL_BYTES)
    if status != 0:
        why = err.decode(errors="replace").strip().splitlines()
        raise JobLogError(f"can't create the job log directory {path}: "
                          + (why[-1].removeprefix("mkdir: ") if why else "timed out"))


async def tail(path: str, preexec_fn: Callable[[], None] | None,
               lines: int = TAIL_LINES, size: int = TAIL_BYTES) -> str | None:
    """The last ``lines`` lines of the log at ``path`` (at most ``size``
    bytes of it), read as the user; None if it can't be read."""
    status, out, _ = await _as_user(["tail", "-c", str(size), "--", path], preexec_fn, size)
    if status != 0:
        return None
    text = out.decode(errors="replace").splitlines()
    if len(out) >= size and len(text) > 1:
        text = text[1:]  # (cut in its middle)
    return "\n".join(line.rstrip() for line in text[-lines:] if line.strip())
