"""RunSpec: the one description of a container start, and its argv.

Everything in chspawner that starts a container (the kernel provisioner, the
spawners, the session manager) builds a :class:`RunSpec` and calls
:func:`to_argv`; nothing else writes container command lines. Both backends
take the same ch-run options, because the builtin launcher speaks ch-run's
command line, so one serializer serves both.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ("builtin", "ch-run")

#: The stub that runs the builtin launcher from cached bytecode.
LAUNCH_SCRIPT = str(Path(__file__).with_name("launch.py"))


@dataclass(frozen=True)
class Bind:
    """Host ``src`` bind-mounted at ``dst`` inside the container (default:
    the same path)."""

    src: str
    dst: str | None = None

    def __post_init__(self) -> None:
        if not self.src or ":" in self.src:
            raise ValueError(f"bind source must be a path without ':': {self.src!r}")
        if self.dst is not None and (not self.dst.startswith("/") or ":" in self.dst):
            raise ValueError(f"bind destination must be an absolute path "
                             f"without ':': {self.dst!r}")
        if (self.dst or self.src) == "/":  # ch-run refuses it too
            raise ValueError("bind destination can't be /")

    @classmethod
    def parse(cls, text: str) -> Bind:
        """``SRC[:DST]``, as on the command line; ``SRC:`` is refused."""
        src, sep, dst = text.partition(":")
        if sep and not dst:
            raise ValueError(f"bind destination missing: {text!r}")
        return cls(src, dst or None)

    def option(self) -> str:
        return f"--bind={self.src}" + (f":{self.dst}" if self.dst else "")


@dataclass(frozen=True)
class RunSpec:
    """What to run, in which image, and how the container looks.

    Environment changes apply in this order: the image's ``ch/environment``
    (``image_env``), then ``unset_env`` globs, then ``env``. As with ch-run's
    ``--set-env``, a ``:``-separated item ``$NAME`` in a value is replaced by
    NAME's value (``PATH="/opt/bin:$PATH"``) unless ``env_expand`` is false,
    which ch-run applies to every assignment, the image's included.
    Quotes in values are kept as given.
    """

    image: str
    command: Sequence[str]
    binds: Sequence[Bind] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    unset_env: Sequence[str] = ()
    image_env: bool = False
    env_expand: bool = True
    cwd: str | None = None
    writable: bool = False
    #: tmpfs overlay over the image: True for the default size, or a size.
    write_fake: bool | str = False
    home: bool = False
    private_tmp: bool = False
    passwd: bool = True
    uid: int | None = None
    gid: int | None = None
    join: bool = False
    join_ct: int | None = None
    join_tag: str | None = None
    join_pid: int | None = None
    storage: str | None = None
    #: CDI devices (``vendor.com/class=NAME``, a kind, or a spec file):
    #: ``--device``, whose environment comes before ``env``.
    devices: Sequence[str] = ()
    #: > 0: --verbose that many times; < 0: --quiet that many times.
    verbosity: int = 0

    def __post_init__(self) -> None:
        if not self.image:
            raise ValueError("RunSpec: image is empty")
        if isinstance(self.command, str) or not self.command:
            raise ValueError("RunSpec: command must be a non-empty list of strings")
        object.__setattr__(self, "binds", tuple(
            Bind.parse(b) if isinstance(b, str) else b for b in self.binds))
        for name in self.env:
            if not name or "=" in name or "\0" in name:
                raise ValueError(f"RunSpec: invalid environment variable name {name!r}")
        if isinstance(self.devices, str) or any(not d or not isinstance(d, str)
                                                for d in self.devices):
            raise ValueError("RunSpec: devices must be a list of CDI device names")
        object.__setattr__(self, "devices", tuple(self.devices))
        if self.writable and self.devices:
            raise ValueError("RunSpec: devices exclude writable (use write_fake)")
        if any(not g for g in self.unset_env):
            raise ValueError("RunSpec: empty --unset-env glob")
        if self.writable and self.write_fake:
            raise ValueError("RunSpec: writable and write_fake exclude each other")
        for what in ("uid", "gid", "join_ct", "join_pid"):
            value = getattr(self, what)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"RunSpec: {what} must be a non-negative integer")
        if self.join_pid is not None and (self.join or self.join_ct or self.join_tag):
            raise ValueError("RunSpec: join_pid excludes join, join_ct, join_tag")

    def options(self) -> list[str]:
        """The ch-run options for this spec (both backends accept them)."""
        opts: list[str] = [b.option() for b in self.binds]
        if self.cwd is not None:
            opts.append(f"--cd={self.cwd}")
        if self.writable:
            opts.append("--write")
        if self.write_fake:
            opts.append("--write-fake" if self.write_fake is True
                        else f"--write-fake={self.write_fake}")
        if self.home:
            opts.append("--home")
        if self.private_tmp:
            opts.append("--private-tmp")
        if not self.passwd:
            opts.append("--no-passwd")
        if self.uid is not None:
            opts.append(f"--uid={self.uid}")
        if self.gid is not None:
            opts.append(f"--gid={self.gid}")
        if self.join:
            opts.append("--join")
        if self.join_ct is not None:
            opts.append(f"--join-ct={self.join_ct}")
        if self.join_tag is not None:
            opts.append(f"--join-tag={self.join_tag}")
        if self.join_pid is not None:
            opts.append(f"--join-pid={self.join_pid}")
        if self.storage is not None:
            opts.append(f"--storage={self.storage}")
        opts += ["--verbose"] * max(self.verbosity, 0)
        opts += ["--quiet"] * max(-self.verbosity, 0)
        if self.image_env:
            opts.append("--set-env")
        opts += [f"--device={device}" for device in self.devices]
        opts += [f"--unset-env={glob}" for glob in self.unset_env]
        if not self.env_expand:
            opts.append("--env-no-expand")
        opts += [f"--set-env={name}={env_literal(value)}"
                 for name, value in self.env.items()]
        return opts


def env_literal(value: str) -> str:
    """Protect a value from ch-run's stripping of one pair of '' quotes
    (on the command line and in environment files alike)."""
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return f"'{value}'"
    return value


def to_argv(spec: RunSpec, backend: str = "builtin", *,
            python: str | None = None, ch_run: str | None = None) -> list[str]:
    """The command line that starts ``spec`` with ``backend``.

    ``builtin`` runs the stdlib launcher under ``python -I -S`` (isolated,
    no site: the fastest start); ``python`` defaults to this interpreter.
    ``ch-run`` runs Charliecloud's runtime (``ch_run``, default ``ch-run``
    or ``$CHSPAWNER_CH_RUN``).
    """
    if backend == "builtin":
        prefix = [python or sys.executable, "-I", "-S", LAUNCH_SCRIPT]
    elif backend == "ch-run":
        prefix = [ch_run or os.environ.get("CHSPAWNER_CH_RUN", "ch-run")]
    else:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return [*prefix, *spec.options(), spec.image, "--", *spec.command]
