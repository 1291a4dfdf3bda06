"""Processes seen through /proc: this machine's PID 1 reaps no orphans, so
a PID that still answers a signal may be a zombie."""
from __future__ import annotations

import subprocess
from pathlib import Path


def running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (or being reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def live_processes(uid: int, cmdline: str) -> list[int]:
    """PIDs of uid's processes running exactly cmdline (not zombies, whose
    cmdline is empty)."""
    wanted = cmdline.replace(" ", "\0") + "\0"
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid \
                    and (entry / "cmdline").read_text() == wanted:
                pids.append(int(entry.name))
        except OSError:  # it exited while we looked
            continue
    return pids


def live_named(uid: int, name: str) -> list[int]:
    """PIDs of uid's live processes (not zombies) whose program is ``name``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid \
                    and (entry / "comm").read_text().rstrip("\n") == name \
                    and running(int(entry.name)):
                pids.append(int(entry.name))
        except OSError:  # it exited while we looked
            continue
    return pids


def stop(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL: the process is gone
    (and reaped) after. A process already gone is left alone."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
