"""Short private directories for a user's Unix sockets.

A Unix socket's address holds 107 bytes at most, so no socket of ours may
live under a directory as deep as a user's home or Jupyter runtime
directory can be (``/gpfs/home/projects/GROUP/USER/.local/share/jupyter/
runtime`` is common). The kernel keepers' sockets and the IPC sockets of
the server's own kernels live instead in one short directory per user and
host, private as the runtime directory is:

- ``/dev/shm/chspawner-UID`` (node-local memory, like the sockets; it
  outlives a login session, as a kept kernel must), else
- ``/tmp/chspawner-UID``, else
- ``$XDG_RUNTIME_DIR`` (made by the system for each user, but removed at
  the user's last logout: the last resort for kernels meant to outlive
  their server).

Each is used only if it is a directory of the caller's, mode 0700 (made so
if missing), reached without following a symlink, with the same check as
``ch-run --join``'s rendezvous (:func:`chspawner.runtime.launcher.private_dir`):
in the world-writable sticky /dev/shm and /tmp, another user can take the
name first (a denial, which is why there are fallbacks) but can neither
make us use their directory nor move ours away.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from chspawner.runtime.launcher import private_dir

#: Where a per-user directory is made, in order of preference.
BASES = ("/dev/shm", "/tmp")
#: The longest socket directory taken: room is left for names of ~50 bytes.
MAX_DIR = 56


class SocketDirError(RuntimeError):
    """No short private directory for the user's sockets; says why."""


def socket_dir() -> Path:
    """The caller's short private socket directory (see the module)."""
    tried = []
    candidates = [os.path.join(base, f"chspawner-{os.getuid()}") for base in BASES]
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    for path, create in [*((c, True) for c in candidates), (runtime, False)]:
        if not path.startswith("/") or len(path.encode()) > MAX_DIR:
            continue
        fd = private_dir(path, create=create)
        if fd is not None:
            os.close(fd)
            return Path(path)
        tried.append(path)
    raise SocketDirError("no private directory for the kernels' Unix sockets: "
                         f"{', '.join(tried) or 'none'} taken by someone else or not "
                         "private (have them removed, or set XDG_RUNTIME_DIR to a short "
                         "private directory of yours)")


def socket_name(*parts: str) -> str:
    """A short name, the same for the same ``parts`` (a state directory and a
    kernel id, say), different for different ones."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


class PrivateIpcMixin:
    """For a jupyter_client KernelManager: a kernel on IPC transport (the
    server's own kernels: ``--KernelManager.transport=ipc``) binds its
    sockets in the short private directory, not beside its connection
    file in the Jupyter runtime directory, which is as deep as the home."""

    def _ip_default(self) -> str:
        if getattr(self, "transport", "") == "ipc":
            name = socket_name(str(getattr(self, "connection_file", "") or os.getpid()))
            return str(socket_dir() / f"kernel-{name}")
        return super()._ip_default()  # type: ignore[misc]
