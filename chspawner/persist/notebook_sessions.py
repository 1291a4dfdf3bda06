"""Jupyter's sessions -- which notebook or console talks to which kernel --
kept in a file beside the kernel records instead of in the server's memory.

A server that replaces a lost one re-adopts the kernels
(:mod:`chspawner.persist.kernel_manager`); with the sessions kept too, a
browser that reloads a notebook, or logs in anew, finds the notebook's
running kernel instead of starting another::

    c.ServerApp.session_manager_class = (
        "chspawner.persist.notebook_sessions.PersistentSessionManager")

Sessions whose kernel is gone are dropped by jupyter_server itself the
next time they are listed.
"""
from __future__ import annotations

from jupyter_server.services.sessions.sessionmanager import SessionManager
from traitlets import default

from chspawner.persist.kernel_manager import PersistentKernelManager
from chspawner.persist.records import KernelRecords


class PersistentSessionManager(SessionManager):
    """Stock sessions, in ``sessions.sqlite`` in the kernel manager's
    ``state_dir`` (in memory, as stock, beside any other kernel manager):
    so, like the kernels, per JupyterHub server of the user."""

    @default("database_filepath")
    def _default_database_filepath(self) -> str:
        if not isinstance(self.kernel_manager, PersistentKernelManager) \
                or not self.kernel_manager.state_dir:
            return ":memory:"
        return str(KernelRecords(self.kernel_manager.state_dir).ensure() / "sessions.sqlite")
