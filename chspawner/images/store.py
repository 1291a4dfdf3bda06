"""The image store, laid out as Charliecloud's so ``ch-run NAME`` works too.

::

    $CH_IMAGE_STORAGE/            default /var/tmp/$USER.ch
        img/<name>/               an image; '/' -> '%', ':' -> '+' in <name>
            ch/metadata.json      config: arch, cwd, env, labels, entrypoint,
                                  cmd, history, source
            ch/environment        the image's Env, one NAME=VALUE per line
            ch/chspawner.json     its record: size, kernels, description
                                  (chspawner.images.records)
        img/<name>.sqfs           the same image as one SquashFS file, if
                                  made (Store.squash): containers start
                                  from it, the directory keeps the record
        dlcache/sha256-<hex>      downloaded blobs, shared between pulls
        tmp/                      imports in progress (never an image)

A store is used only if nobody but its owner could have made it or can
change it (see :func:`chspawner.runtime.launcher.trusted_dir`): the default
store sits in /var/tmp, where another user could make it first and fill it
with programs its victim would run. A store this makes is private (0700);
its ``img/``, ``dlcache/`` and ``tmp/`` get the root's mode (an admin's
shared store made 0755 stays readable by all).

An image appears in ``img/`` only complete: imports are written under
``tmp/`` and renamed into place at the end; a failed or interrupted import
is removed, and one killed outright is swept up by the next store operation.

Listing reads each image's record, a few small files, never its tree; an
image without a record (made before records, or by hand) is measured once
per process, with a log line, and recorded if the caller owns it.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from chspawner.images import ImageError, records
from chspawner.images.records import ImageKernel, Record, RecordError, UntrustedRecord
from chspawner.images.trees import DIR_RDONLY, open_made_dir, remove_tree
from chspawner.runtime.launcher import (SQUASH_SUFFIX, UntrustedPath, default_storage,
                                        image_name_to_dir, trusted_dir, trusted_store_image,
                                        trusted_uids)
from chspawner.runtime.spec import env_literal

# A reference as users write it: [host[:port]/]path[:tag][@sha256:hex].
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]*$")
RENAME_EXCHANGE = 2

log = logging.getLogger("chspawner.images")

# Images measured because they had no record to believe: {(dev, inode,
# mtime of the image directory): record}, so each is walked once per process.
_measured: dict[tuple[int, int, int], Record] = {}
MEASURED_MAX = 1000


class StoreError(ImageError):
    """A store operation failed; the message is one line."""


def check_name(name: str) -> str:
    """Return ``name`` if it can name an image in the store, else raise."""
    if not name or not NAME_RE.match(name):
        raise StoreError(f"invalid image name {name!r}: use letters, digits "
                         "and . _ - / : @, starting with a letter or digit")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise StoreError(f"invalid image name {name!r}: empty, '.' or '..' component")
    if len(image_name_to_dir(name).encode()) > 255:
        raise StoreError(f"invalid image name {name[:60]!r}...: too long")
    return name


def dir_to_name(dirname: str) -> str:
    return dirname.replace("%", "/").replace("+", ":")


@dataclass(frozen=True)
class ImageInfo:
    name: str
    path: Path
    size: int            # bytes on disk
    source: str          # where it came from, for people
    created: str
    description: str = ""                         # its description label, if any
    kernels: tuple[ImageKernel, ...] = ()         # kernelspecs inside it
    kernel_dirs: tuple[str, ...] = records.KERNEL_DIRS  # where they were sought


class Store:
    """One user's (or one site's) image store.

    ``owner``: the uid whose store this is, when someone else reads it (the
    hub, as root, reading a user's store): it is then trusted as that user's.
    """

    def __init__(self, root: str | os.PathLike | None = None, owner: int | None = None):
        self.root = Path(root or os.environ.get("CH_IMAGE_STORAGE") or default_storage())
        self.img = self.root / "img"
        self.tmp = self.root / "tmp"
        self._dlcache = self.root / "dlcache"
        self._trusted = trusted_uids(owner)
        self._checked = False   # the store exists and was found trustworthy
        self._prepared = False  # ... and has its directories
        # Records read, by image directory name: (the record's lstat, record).
        self._records: dict[str, tuple[tuple, Record]] = {}

    @property
    def dlcache(self) -> Path:
        """The download cache, made (and checked) on first use."""
        self.prepare()
        return self._dlcache

    def check(self) -> bool:
        """Refuse (StoreError, one line) a store another user made or can
        write; return False if it doesn't exist. Once found trustworthy it
        stays so (nobody else can change that), so this runs once."""
        if self._checked:
            return True
        try:
            if trusted_dir(self.root, self._trusted) is None:
                return False
            for sub in (self.img, self.tmp, self._dlcache):
                trusted_dir(sub, self._trusted)
        except UntrustedPath as e:
            raise StoreError(f"refusing image store {self.root}: {e}") from None
        self._checked = True
        return True

    def prepare(self) -> None:
        """Make the store, private, and its directories, if they are missing;
        then check it. mkdir(2) is atomic and never follows a symlink, and
        the check refuses a store another user made first."""
        if self._prepared:
            return
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            _mkdir(self.root, 0o700)
            self.check()
            mode = os.stat(self.root).st_mode & 0o755
            for sub in (self.img, self.tmp, self._dlcache):
                _mkdir(sub, mode)
        except OSError as e:
            raise StoreError(f"can't create image store {self.root}: "
                             f"{e.strerror or e}") from None
        self._checked = False
        self.check()
        self._prepared = True

    def path(self, name: str) -> Path:
        return self.img / image_name_to_dir(check_name(name))

    def exists(self, name: str) -> bool:
        path = self.path(name)
        return self.check() and path.is_dir()

    def squash_path(self, name: str) -> Path:
        """Where image ``name``'s SquashFS file is (``chspawner images
        squash``): ``img/NAME.sqfs``, beside its directory."""
        return self.img / (image_name_to_dir(check_name(name)) + SQUASH_SUFFIX)

    def runnable(self, name: str) -> Path:
        """What a container of image ``name`` starts from, as ``chspawner
        run NAME`` finds it: its SquashFS file if it has one, else its
        directory (refusing what :meth:`require` refuses)."""
        path = self.require(name)
        squash = self.squash_path(name)
        if not squash.is_file():
            return path
        try:
            return Path(trusted_store_image(str(self.root), str(squash), self._trusted))
        except UntrustedPath as e:
            raise StoreError(f"refusing image store {self.root}: {e}") from None

    def squash(self, name: str, compression: str = "zstd", quiet: bool = False) -> Path:
        """Make image ``name``'s SquashFS file from its directory
        (``compression``: mksquashfs's, or "none"). The directory stays
        beside it: its record and metadata are read from there (listing,
        kernels, checks); containers start from the file. Written under
        tmp/ and renamed into place: never seen half made."""
        path = self.require(name)
        program = shutil.which("mksquashfs")
        if program is None:
            raise StoreError("can't make a SquashFS image: mksquashfs not found in $PATH "
                             "(Debian's package squashfs-tools)")
        self.prepare()
        work = Path(tempfile.mkdtemp(prefix=_scratch_prefix("squash"), dir=self.tmp))
        try:
            new = work / "image.sqfs"
            argv = [program, str(path), str(new), "-noappend", "-no-xattrs", "-quiet",
                    *compression_options(compression), *(["-no-progress"] if quiet else [])]
            done = subprocess.run(argv, stdout=None, stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["failed"])[-1]
                raise StoreError(f"can't make a SquashFS image of {name}: mksquashfs: {last}")
            new.chmod(path.stat().st_mode & 0o644)
            final = self.squash_path(name)
            os.rename(new, final)
            return final
        finally:
            remove_tree(work)

    def require(self, name: str) -> Path:
        """The directory of image ``name``, refusing an untrusted store or
        an image in it that someone else made."""
        path = self.path(name)
        if not self.check() or not path.is_dir():
            raise StoreError(f"no image {name} in store {self.root}")
        try:
            trusted_store_image(str(self.root), str(path), self._trusted)
        except UntrustedPath as e:
            raise StoreError(f"refusing image store {self.root}: {e}") from None
        return path

    # ------------------------------------------------------------ reading --

    def images(self, only: Iterable[str] | None = None) -> list[ImageInfo]:
        """The images (only those named in ``only``, if given), from their
        records: per image an lstat of its directory and of its record, and
        the record read only when it changed since this Store last read it;
        no walk of any tree."""
        wanted = None if only is None else {image_name_to_dir(n) for n in only}
        if not self.check():
            return []
        self.sweep()
        if not self.img.is_dir():
            return []
        owners = self._image_owners()
        infos = []
        for entry in sorted(os.scandir(self.img), key=lambda e: e.name):
            if wanted is not None and entry.name not in wanted:
                continue
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                st = entry.stat(follow_symlinks=False)
                if owners is not None and st.st_uid not in owners:
                    continue  # made by someone else (while img/ was open): not listed
                path = Path(entry.path)
                record = self._record(path, st, owners)
                infos.append(ImageInfo(
                    name=dir_to_name(entry.name), path=path, size=record.size,
                    source=record.source, created=record.created,
                    description=record.description, kernels=record.kernels,
                    kernel_dirs=record.kernel_dirs))
        return infos

    def _record(self, image: Path, st: os.stat_result, owners: set[int] | None) -> Record:
        """``image``'s record; if it has none to believe, the image measured
        (once per process), and recorded if it is the caller's own."""
        record_path = image / records.RECORD_DIR / records.RECORD_NAME
        try:
            rst = os.lstat(record_path)
            key: tuple = (rst.st_dev, rst.st_ino, rst.st_mtime_ns, rst.st_ctime_ns,
                          rst.st_size)
        except OSError:
            key = ()
        cached = self._records.get(image.name)
        if key and cached is not None and cached[0] == key:
            return cached[1]
        why, untrusted = "it has none", False
        try:
            record = records.read(image, owners)
            if record is not None:
                self._records[image.name] = (key, record)
                return record
        except RecordError as e:
            why, untrusted = str(e), isinstance(e, UntrustedRecord)
        measured_key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        record = _measured.get(measured_key)
        if record is None:
            log.warning("image %s: no record to believe (%s): measuring it once; "
                        "`chspawner images refresh` records it", image, why)
            record = records.measure(image, warn=log.warning)
            if len(_measured) >= MEASURED_MAX:  # (a long-lived server, images changing)
                _measured.clear()
            _measured[measured_key] = record
            # (Never over a record someone else may have written: that
            # one stays refused, and the log says so each process.)
            if st.st_uid == os.getuid() and not untrusted:
                try:
                    records.write(image, record)
                except OSError as e:
                    log.warning("image %s: can't record it: %s", image, e.strerror or e)
        return record

    def refresh(self, names: list[str] | None = None) -> list[str]:
        """Measure and record ``names`` (default: every image), e.g. images
        made before records or changed by hand; return the names done."""
        if names is None:
            if not self.check() or not self.img.is_dir():
                return []
            names = [dir_to_name(e.name) for e in sorted(os.scandir(self.img),
                                                         key=lambda e: e.name)
                     if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
        for name in names:
            path = self.require(name)
            try:
                records.write(path, records.measure(path, warn=log.warning))
            except OSError as e:
                raise StoreError(f"can't record image {name}: {e.strerror or e}") from None
            self._records.pop(path.name, None)
        return names

    def _image_owners(self) -> set[int] | None:
        """Who may own an image here: trusted uids and the store's owner."""
        if self._trusted is None:
            return None
        return self._trusted | {os.stat(self.root).st_uid}

    def inspect(self, name: str) -> dict:
        path = self.require(name)
        return {"name": name, "path": str(path), **read_metadata(path)}

    # ----------------------------------------------------------- changing --

    def remove(self, name: str) -> None:
        path = self.require(name)
        self.prepare()
        self.squash_path(name).unlink(missing_ok=True)
        # Rename first, so the name is gone at once even for a big image.
        doomed = Path(tempfile.mkdtemp(prefix=_scratch_prefix("rm"), dir=self.tmp))
        os.rename(path, doomed / "image")  # (its record, inside it, goes too)
        self._records.pop(path.name, None)
        remove_tree(doomed)

    @contextmanager
    def new_image(self, name: str) -> Iterator[Path]:
        """A fresh directory to build image ``name`` in; on a clean exit it
        becomes the image (replacing an older one of that name), on an
        error or interrupt it vanishes."""
        final = self.path(name)
        self.prepare()
        self.sweep()
        work = Path(tempfile.mkdtemp(prefix=_scratch_prefix("import"), dir=self.tmp))
        try:
            image = work / "image"
            image.mkdir(mode=0o700)
            yield image
            # Measured now, while it is whole and nobody lists it, so
            # listings never have to (chspawner.images.records).
            try:
                records.write(image, records.measure(image, warn=log.warning))
            except OSError as e:
                raise StoreError(f"can't record image {name}: {e.strerror or e}") from None
            image.chmod(0o755)
            install(image, final)
            # A SquashFS file of the image it replaces would be run instead.
            self.squash_path(name).unlink(missing_ok=True)
        finally:
            remove_tree(work)

    def sweep(self) -> None:
        """Remove what imports killed outright (SIGKILL, a crash) left in
        tmp/. Scratch names carry the PID and host that made them; on a
        shared file system, only this host's dead ones are ours to judge."""
        if not self.tmp.is_dir():
            return
        host = socket.gethostname()
        for entry in os.scandir(self.tmp):
            parts = entry.name.split("-", 2)
            if len(parts) < 3 or not parts[1].isdigit():
                continue
            if parts[2].rpartition("-")[0] == host and not _alive(int(parts[1])):
                remove_tree(Path(entry.path))


def compression_options(compression: str) -> list[str]:
    """mksquashfs's options for ``compression``: one of its compressors,
    or "none" (nothing compressed: the fastest to start from)."""
    return ["-noI", "-noD", "-noF", "-noX"] if compression == "none" else ["-comp", compression]


def _mkdir(path: Path, mode: int) -> None:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass  # what is there is checked next


def _scratch_prefix(kind: str) -> str:
    """``KIND-PID-HOST-`` (mkdtemp's random suffix has no '-')."""
    return f"{kind}-{os.getpid()}-{socket.gethostname()}-"


def install(new: Path, final: Path) -> None:
    """Put ``new`` at ``final`` in one step, swapping out any old image."""
    try:
        os.rename(new, final)
        return
    except OSError as e:
        if not final.exists():
            raise StoreError(f"can't install image at {final}: {e.strerror}") from None
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(new), -100, os.fsencode(final),
                      RENAME_EXCHANGE) != 0:
        raise StoreError(f"can't replace image at {final}: "
                         f"{os.strerror(ctypes.get_errno())}")
    # ``new`` now holds the old image; the caller's cleanup removes it.


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------- metadata ----

def read_metadata(image: Path) -> dict:
    try:
        with open(image / "ch" / "metadata.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write_metadata(image: Path, config: dict, source: dict, arch: str | None = None,
                   history: list | None = None, environment: bool = True) -> None:
    """Write ``ch/metadata.json`` and ``ch/environment`` from an OCI image
    config's ``config`` section (Env, WorkingDir, Entrypoint, Cmd, Labels).

    The keys are Charliecloud's (arch, cwd, env, labels, history) plus the
    image's default command (entrypoint, cmd) and where it came from (source:
    ref or path, digest, time). ``environment=False`` keeps the image's own
    ch/environment.
    """
    env = {}
    for item in config.get("Env") or []:
        name, _, value = item.partition("=")
        if name:
            env[name] = value
    metadata = {
        "arch": arch or "unknown",
        "cwd": config.get("WorkingDir") or "/",
        "env": env,
        "labels": config.get("Labels") or {},
        "entrypoint": config.get("Entrypoint") or [],
        "cmd": config.get("Cmd") or [],
        "history": history or [],
        "source": {**source, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    lines = [f"{name}={env_literal(value)}\n" for name, value in env.items()
             if "\n" not in value]
    write_in_image(image, "ch/metadata.json", json.dumps(metadata, indent=2) + "\n")
    if environment:
        write_in_image(image, "ch/environment", "".join(lines))


def write_in_image(image: Path, path: str, text: str) -> None:
    """Write a file at ``path`` (one directory deep) in an image, replacing
    whatever is there (a symlink included) rather than writing through it."""
    directory, name = path.split("/")
    root = os.open(image, DIR_RDONLY)
    try:
        dfd = open_made_dir(root, directory)
        try:
            try:
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                pass
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644, dir_fd=dfd)
            with open(fd, "w") as f:
                f.write(text)
        finally:
            os.close(dfd)
    finally:
        os.close(root)
