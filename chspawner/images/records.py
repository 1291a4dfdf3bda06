"""An image's record: what listings show of it, measured once.

Listing images (``chspawner images``, the spawn form) and their kernels
(``/api/kernelspecs``, which JupyterLab polls) must not walk image trees:
on a parallel file system a walk of tens of images takes minutes. So what
they show is measured when an image is made (import, pull: see
:meth:`chspawner.images.store.Store.new_image`) or on ``chspawner images
refresh``, and written to ``ch/chspawner.json`` in the image, beside
Charliecloud's ``ch/metadata.json``::

    {"version": 1, "size": 123456,              bytes on disk
     "source": "...", "created": "...",        where from, when
     "description": "...",                     the image's description label
     "kernel_dirs": ["usr/share/jupyter/kernels", ...],   where kernels were sought
     "kernels": [{"dir": "usr/share/jupyter/kernels/python3",
                  "spec": {...kernel.json...}}]}

The record lives inside the image directory, so it is renamed into place,
replaced and removed with the image, never out of step with it (unless the
image is changed by hand: then ``chspawner images refresh``).

A record is believed only if nobody but the image's owner could have
written it: the image directory, ``ch/`` and the record are owned by a
trusted uid and writable by nobody else, and none is a symlink. Reading
follows no link (each step opened relative to the last, O_NOFOLLOW).
"""
from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from chspawner.images.trees import DIR_RDONLY, disk_usage, open_made_dir

RECORD_DIR = "ch"
RECORD_NAME = "chspawner.json"
VERSION = 1

#: Where in an image kernelspecs are sought (relative to its root); the
#: default of ContainerKernelSpecManager.image_kernel_dirs.
KERNEL_DIRS = ("usr/share/jupyter/kernels", "usr/local/share/jupyter/kernels",
               "opt/conda/share/jupyter/kernels")

#: A kernel.json bigger than this is not a kernelspec (and would bloat the
#: record every listing reads).
MAX_KERNEL_JSON = 64 * 1024
#: A record bigger than this is refused unread (a few kernels take ~1 KiB).
MAX_RECORD = 1024 * 1024

#: OCI labels whose value describes an image, best first.
DESCRIPTION_LABELS = ("org.opencontainers.image.description",
                      "org.opencontainers.image.title")


class RecordError(Exception):
    """A record that can't be read; the message says why."""


class UntrustedRecord(RecordError):
    """A record someone other than the image's owner could have written."""


@dataclass(frozen=True)
class ImageKernel:
    """A kernelspec found in an image: its directory (relative to the image
    root) and its kernel.json's content."""

    dir: str
    spec: dict = field(hash=False, compare=False)

    @property
    def name(self) -> str:
        return self.dir.rpartition("/")[2]


@dataclass(frozen=True)
class Record:
    size: int
    source: str
    created: str
    description: str
    kernel_dirs: tuple[str, ...]
    kernels: tuple[ImageKernel, ...]

    def to_json(self) -> dict:
        return {"version": VERSION, "size": self.size, "source": self.source,
                "created": self.created, "description": self.description,
                "kernel_dirs": list(self.kernel_dirs),
                "kernels": [{"dir": k.dir, "spec": k.spec} for k in self.kernels]}

    @classmethod
    def from_json(cls, data: object) -> Record:
        """The record in ``data``, or RecordError if it isn't one of this
        version (an older one is read as missing: measured again)."""
        try:
            if not isinstance(data, dict) or data.get("version") != VERSION:
                raise RecordError("an older or unknown record version")
            kernels = tuple(ImageKernel(_relative(k["dir"]), dict(k["spec"]))
                            for k in data["kernels"])
            record = cls(int(data["size"]), str(data["source"]), str(data["created"]),
                         str(data["description"]),
                         tuple(_relative(d) for d in data["kernel_dirs"]), kernels)
        except (LookupError, TypeError, ValueError) as e:
            raise RecordError(f"malformed record ({e})") from None
        return record


def _relative(path: object) -> str:
    """``path`` if it is a plain relative path inside an image."""
    if not isinstance(path, str) or path.startswith("/") \
            or any(p in ("", ".", "..") for p in path.split("/")):
        raise ValueError(f"bad path {str(path)[:80]!r}")
    return path


# ------------------------------------------------------------ measuring --

def measure(image: Path, kernel_dirs: Iterable[str] = KERNEL_DIRS,
            warn: Callable[[str], None] = lambda message: None) -> Record:
    """Measure ``image``: its size (a walk of the whole tree), its kernels
    and its description. The slow part, done once per image."""
    from chspawner.images.store import read_metadata  # (store imports this module)
    meta = read_metadata(image)
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else {}
    description = next((str(labels[k]) for k in DESCRIPTION_LABELS if labels.get(k)), "")
    dirs = tuple(kernel_dirs)
    return Record(size=disk_usage(str(image)),
                  source=str(source.get("ref") or source.get("path") or "unknown"),
                  created=str(source.get("time", "")), description=description,
                  kernel_dirs=dirs, kernels=tuple(find_kernels(image, dirs, warn)))


def find_kernels(image: Path, kernel_dirs: Iterable[str],
                 warn: Callable[[str], None] = lambda message: None) -> list[ImageKernel]:
    """The kernelspecs in ``image``'s ``kernel_dirs``, by directory name
    (the first of a name wins), following none of the image's symlinks
    (they would point onto the host)."""
    found: dict[str, ImageKernel] = {}
    for rel in kernel_dirs:
        base = image / rel
        if base.is_symlink() or not base.is_dir():
            continue
        for kernel_dir in sorted(base.iterdir()):
            kernel_json = kernel_dir / "kernel.json"
            if kernel_dir.name in found or kernel_dir.is_symlink() \
                    or kernel_json.is_symlink() or not kernel_json.is_file():
                continue
            try:
                if kernel_json.stat().st_size > MAX_KERNEL_JSON:
                    raise ValueError("too big")
                spec = json.loads(kernel_json.read_text())
                if not isinstance(spec, dict):
                    raise ValueError("not an object")
            except (OSError, ValueError) as e:
                warn(f"unreadable {kernel_json}: {e}")
                continue
            found[kernel_dir.name] = ImageKernel(f"{rel.strip('/')}/{kernel_dir.name}", spec)
    return list(found.values())


# -------------------------------------------------------------- on disk --

def write(image: Path, record: Record) -> None:
    """Write ``record`` into ``image`` in one step (a new file renamed over
    the old: a reader sees one or the other, never half), replacing a
    symlink rather than writing through it, with ``ch/`` made writable by
    its owner only (a record others could change would not be believed)."""
    text = json.dumps(record.to_json(), indent=1) + "\n"
    root = os.open(image, DIR_RDONLY)
    try:
        ch = open_made_dir(root, RECORD_DIR)
        try:
            mode = os.fstat(ch).st_mode
            if mode & 0o022:  # (an image's own ch/ may come open from its tar)
                os.fchmod(ch, stat.S_IMODE(mode) & ~0o022)
            scratch = f".{RECORD_NAME}.{os.getpid()}"
            try:
                os.unlink(scratch, dir_fd=ch)
            except FileNotFoundError:
                pass
            fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644, dir_fd=ch)
            with open(fd, "w") as f:
                os.fchmod(fd, 0o644)
                f.write(text)
            os.rename(scratch, RECORD_NAME, src_dir_fd=ch, dst_dir_fd=ch)
        finally:
            os.close(ch)
    finally:
        os.close(root)


def read(image: Path, owners: set[int] | None) -> Record | None:
    """The record of ``image``; None if it has none. RecordError if it is
    unreadable, of another version, or could have been written by someone
    not in ``owners`` (None: anyone) or by someone other than its owner."""
    fds: list[int] = []
    try:
        try:
            fds.append(os.open(image, DIR_RDONLY))
            _trusted(fds[-1], image, owners)
            try:
                fds.append(os.open(RECORD_DIR, DIR_RDONLY, dir_fd=fds[-1]))
            except FileNotFoundError:
                return None
            _trusted(fds[-1], f"{image}/{RECORD_DIR}", owners)
            try:
                fds.append(os.open(RECORD_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                                   | os.O_NONBLOCK, dir_fd=fds[-1]))
            except FileNotFoundError:
                return None
            st = _trusted(fds[-1], f"{image}/{RECORD_DIR}/{RECORD_NAME}", owners)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RECORD:
                raise RecordError("not a regular file, or too big")
            with os.fdopen(os.dup(fds[-1]), "rb") as f:
                data = f.read(MAX_RECORD + 1)
        except OSError as e:
            raise RecordError(f"can't read it: {e.strerror or e}") from None
    finally:
        for fd in fds:
            os.close(fd)
    try:
        return Record.from_json(json.loads(data))
    except ValueError as e:
        raise RecordError(f"not valid JSON ({e})") from None


def _trusted(fd: int, what: str, owners: set[int] | None) -> os.stat_result:
    st = os.fstat(fd)
    if owners is not None and st.st_uid not in owners:
        raise UntrustedRecord(f"{what} belongs to uid {st.st_uid}, not to a trusted user")
    if st.st_mode & 0o022:
        raise UntrustedRecord(f"{what} is writable by others")
    return st
