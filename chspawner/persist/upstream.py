"""How the upstream adapters declare the private parts they use, and check
that an installed upstream version still has them.

Each adapter (:mod:`chspawner.persist.upstream_jupyter_client`,
:mod:`chspawner.persist.upstream_jupyter_server`) lists its upstream
project's private names as :class:`Private` entries; :func:`missing`
reports those an installed version lacks, by name, so a changed upstream
fails loudly (the adapters check at import, tests/test_upstream_contract.py
checks everything) instead of misbehaving quietly.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any
from dataclasses import dataclass


class UpstreamChanged(ImportError):
    """An installed upstream version lacks a private part chspawner relies on."""


@dataclass(frozen=True)
class Private:
    """One private name of an upstream class.

    ``owner`` has ``name`` (a method, a trait, a class attribute), unless
    ``on_instances``: an attribute upstream sets on instances only, which
    ``used_by`` then vouches for. ``used_by`` names upstream functions whose
    source must mention it: those that call an overridden method, or read
    an attribute set from outside (an override nobody calls any more is
    the quiet failure this catches)."""

    owner: type
    name: str
    why: str
    used_by: tuple[Callable[..., Any], ...] = ()
    on_instances: bool = False

    def problem(self, with_sources: bool = True) -> str | None:
        """What is wrong with it in the installed version, or None."""
        where = f"{self.owner.__module__}.{self.owner.__qualname__}.{self.name}"
        if not self.on_instances and not hasattr(self.owner, self.name):
            return f"{where} is gone (chspawner uses it: {self.why})"
        for user in self.used_by if with_sources else ():
            try:
                source = inspect.getsource(user)
            except (OSError, TypeError):
                continue  # no source to read: the attribute check above stands
            if self.name not in source:
                return (f"{user.__module__}.{user.__qualname__} no longer uses "
                        f"{where} (chspawner relies on it: {self.why})")
        return None


def missing(parts: Iterable[Private], with_sources: bool = True) -> list[str]:
    """The problems of ``parts`` in the installed versions, one line each."""
    return [p for p in (part.problem(with_sources) for part in parts) if p]


def require(project: str, parts: Iterable[Private]) -> None:
    """UpstreamChanged naming what an installed ``project`` lacks (names
    only: reading sources is the test's job, not every server start's)."""
    problems = missing(parts, with_sources=False)
    if problems:
        raise UpstreamChanged(f"chspawner.persist does not work with this {project}: "
                              + "; ".join(problems))
