"""Safe unpacking: the one way anything gets written into a new image.

Every import path (a rootfs tarball, a directory, the layers of a
``docker save`` archive, an OCI layout or a registry pull) feeds its entries
through :class:`ImageWriter`, which guarantees:

* nothing is written outside the image: absolute and ``..`` member names are
  refused, as are hard links to outside and entries beneath a symlink; every
  directory is reached from the image root one component at a time with
  O_NOFOLLOW, so a symlink in the image is never followed while writing;
* symlinks whose target leaves the image (absolute, or climbing above the
  root) are rewritten to the relative path they mean inside the container,
  so host-side tools following them stay in the image too;
* device nodes and FIFOs are skipped; setuid and setgid bits are dropped;
  the user gets ``u+rwX`` on everything; all files are the caller's;
* OCI whiteouts (``.wh.NAME``, opaque ``.wh..wh..opq``) are applied when
  unpacking layers;
* an image grows no bigger than the size limit (``max_size``, default
  ``$CH_IMAGE_MAX_SIZE``): each file's size is counted (plus 512 bytes an
  entry) before it is written, so a small compressed "bomb" stops at once;
* what the runtime needs exists at the end (``dev proc sys tmp home``,
  ``etc/passwd etc/group etc/hosts etc/resolv.conf``).

Errors are :class:`UnpackError`: one line naming the member and why.
Atomicity (unpack into a temporary directory, rename at the end) is the
store's job: see :meth:`chspawner.images.store.Store.new_image`.
"""
from __future__ import annotations

import errno
import os
import posixpath
import stat
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import BinaryIO

from chspawner.images import ImageError
from chspawner.images.streams import ForwardReader, StreamError
from chspawner.images.trees import remove_entry

O_PATH = getattr(os, "O_PATH", 0o10000000)
DIR_FLAGS = O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
RUNTIME_DIRS = {"dev": 0o755, "proc": 0o755, "sys": 0o755, "tmp": 0o1777,
                "home": 0o755, "etc": 0o755}
RUNTIME_FILES = ("etc/passwd", "etc/group", "etc/hosts", "etc/resolv.conf")
COPY_CHUNK = 1 << 20


MAX_SIZE_ENV = "CH_IMAGE_MAX_SIZE"
ENTRY_COST = 512  # charged per entry, so a flood of empty files counts too
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


class UnpackError(ImageError):
    """Unpacking failed; the message says which member and why."""


def parse_size(text: str) -> int:
    """Bytes in a size such as ``10G``, ``512M``, ``1.5TiB`` or ``1000``
    (K, M, G, T, P are powers of 1024); ValueError if it isn't one."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in SIZE_UNITS else ""
    number = value[:len(value) - len(unit)]
    try:
        size = int(float(number) * SIZE_UNITS[unit])
    except (ValueError, OverflowError):
        raise ValueError(f"invalid size {text!r}: use a number of bytes, or one "
                         "with K, M, G or T (e.g. 10G)") from None
    if size <= 0:
        raise ValueError(f"invalid size {text!r}: must be more than 0")
    return size


def default_max_size() -> int | None:
    """The limit in ``$CH_IMAGE_MAX_SIZE`` (None: unset or empty)."""
    text = os.environ.get(MAX_SIZE_ENV, "").strip()
    if not text:
        return None
    try:
        return parse_size(text)
    except ValueError as e:
        raise UnpackError(f"{MAX_SIZE_ENV}: {e}") from None


def format_limit(size: int) -> str:
    for unit in ("P", "T", "G", "M", "K"):
        if size >= SIZE_UNITS[unit] and size % SIZE_UNITS[unit] == 0:
            return f"{size // SIZE_UNITS[unit]}{unit}"
    return f"{size} bytes"


def _shown(name: str, limit: int = 120) -> str:
    """A member name fit for a one-line message."""
    name = name.replace("\n", "\\n")
    return name if len(name) <= limit else name[:limit] + f"...({len(name)} chars)"


def member_path(name: str) -> str:
    """The normalized path of an archive member inside the image ('' = root).

    Absolute names and any ``..`` are refused, not repaired: an archive that
    has them was not made for unpacking into an image.
    """
    if name.startswith("/"):
        raise UnpackError(f"{_shown(name)}: absolute path in archive")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnpackError(f"{_shown(name)}: '..' in path")
    return "/".join(parts)


def contained_link_target(link_path: str, target: str) -> str | None:
    """Rewrite a symlink target that would leave the image, or return None.

    ``link_path`` is the link's path in the image. Inside the container, an
    absolute target starts at the image root and ``..`` stops there; the
    rewrite is the same place as a relative path from the link's directory.
    """
    base = posixpath.dirname(link_path)
    parts = [] if target.startswith("/") else base.split("/") if base else []
    escapes = target.startswith("/")
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            else:
                escapes = True
        else:
            parts.append(part)
    if not escapes:
        return None
    resolved = "/".join(parts) or "."
    return posixpath.relpath("/" + resolved, "/" + base) if base else resolved


def _umask() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


class ImageWriter:
    """Writes entries into an (empty) image directory, safely.

    Directories are reached through O_PATH file descriptors cached by path
    (tar members come grouped by directory, so most lookups are a hit); any
    replacement of a directory drops its cached descendants.
    """

    CACHE_SIZE = 128

    UNSET = -1

    def __init__(self, root: str, max_size: int | None = UNSET):
        """``max_size``: the most bytes this writer may write (None: no
        limit; by default ``$CH_IMAGE_MAX_SIZE``)."""
        self.root = root
        self.max_size = default_max_size() if max_size == self.UNSET else max_size
        self.written = 0
        self.root_fd = os.open(root, DIR_FLAGS)
        self.umask = _umask()
        self._dirs: OrderedDict[str, int] = OrderedDict()
        self._layer_paths: set[str] | None = None  # paths added by this layer

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        os.close(self.root_fd)

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------- directories --

    def _dir_fd(self, path: str, member: str) -> int:
        """An O_PATH fd for directory ``path`` (creating missing ones),
        reached from the nearest cached ancestor without following any
        symlink."""
        if not path:
            return self.root_fd
        fd = self._dirs.get(path)
        if fd is not None:
            self._dirs.move_to_end(path)
            return fd
        parts = path.split("/")
        known = len(parts) - 1
        while known and "/".join(parts[:known]) not in self._dirs:
            known -= 1
        fd = self.root_fd
        if known:
            ancestor = "/".join(parts[:known])
            self._dirs.move_to_end(ancestor)
            fd = self._dirs[ancestor]
        for i in range(known, len(parts)):
            fd = self._open_dir(fd, parts[i], "/".join(parts[:i + 1]), member)
        return fd

    def _open_dir(self, parent_fd: int, name: str, path: str, member: str) -> int:
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            self._mkdir(parent_fd, name, 0o755)
            fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                what = "a symlink" if _is_link(parent_fd, name) else "not a directory"
                raise UnpackError(f"{_shown(member)}: {_shown(path, 60)} is {what}; "
                                  "refusing to write beneath it") from None
            raise
        self._dirs[path] = fd
        if len(self._dirs) > self.CACHE_SIZE:
            # The oldest is never ``parent_fd`` (just moved to the end or
            # just opened), so the walk in _dir_fd goes on safely.
            os.close(self._dirs.popitem(last=False)[1])
        return fd

    def _forget(self, path: str) -> None:
        """Drop cached fds for ``path`` and everything under it."""
        prefix = path + "/"
        for key in [k for k in self._dirs if k == path or k.startswith(prefix)]:
            os.close(self._dirs.pop(key))

    def _mkdir(self, parent_fd: int, name: str, mode: int) -> None:
        os.mkdir(name, mode, dir_fd=parent_fd)
        if mode & self.umask:
            os.chmod(name, mode, dir_fd=parent_fd, follow_symlinks=True)

    def _remove(self, parent_fd: int, name: str, path: str) -> bool:
        """Remove whatever is at ``path``; False if nothing was there."""
        if not _exists(parent_fd, name):
            return False
        self._forget(path)
        remove_entry(parent_fd, name)
        return True

    # ------------------------------------------------------------ entries --

    def _charge(self, name: str, size: int) -> None:
        """Count ``size`` bytes (and the entry) against the limit, before
        they are written: past it, stop at once."""
        self.written += size + ENTRY_COST
        if self.max_size is not None and self.written > self.max_size:
            raise UnpackError(f"{_shown(name)}: image larger than the size limit "
                              f"of {format_limit(self.max_size)} (--max-size or "
                              f"{MAX_SIZE_ENV})")

    def _split(self, name: str, size: int = 0) -> tuple[str, int, str]:
        self._charge(name, size)
        path = member_path(name)
        if not path:
            return "", -1, ""
        parent, _, base = path.rpartition("/")
        return path, self._dir_fd(parent, name), base

    def _added(self, path: str) -> None:
        if self._layer_paths is not None:
            self._layer_paths.add(path)

    def add_dir(self, name: str, mode: int) -> None:
        path, pfd, base = self._split(name)
        if not path:
            return  # the root itself: its mode is the store's business
        mode = (mode & 0o1777) | 0o700
        try:
            self._mkdir(pfd, base, mode)
        except FileExistsError:
            if not _is_dir(pfd, base):
                self._remove(pfd, base, path)
                self._mkdir(pfd, base, mode)
            else:
                os.chmod(base, mode, dir_fd=pfd)
        self._added(path)

    def add_file(self, name: str, mode: int, mtime: float, size: int,
                 write: Callable[[int], None]) -> None:
        """A regular file, which ``write(fd)`` writes: ``size`` bytes of
        data (counted against the size limit before anything is written)."""
        path, pfd, base = self._split(name, size)
        if not path:
            raise UnpackError(f"{_shown(name)}: a file can't be the image root")
        final = self._file_mode(mode)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(base, flags, final, dir_fd=pfd)
        except FileExistsError:
            self._remove(pfd, base, path)
            fd = os.open(base, flags, final, dir_fd=pfd)
        try:
            write(fd)
            if final & self.umask:
                os.fchmod(fd, final)
            os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)
        self._added(path)

    def add_symlink(self, name: str, target: str) -> None:
        path, pfd, base = self._split(name)
        if not path:
            raise UnpackError(f"{_shown(name)}: a symlink can't be the image root")
        if not target or "\0" in target:
            raise UnpackError(f"{_shown(name)}: empty symlink target")
        rewritten = contained_link_target(path, target)
        if rewritten is not None:
            target = rewritten
        try:
            os.symlink(target, base, dir_fd=pfd)
        except FileExistsError:
            self._remove(pfd, base, path)
            os.symlink(target, base, dir_fd=pfd)
        self._added(path)

    def add_hardlink(self, name: str, target: str) -> None:
        path, pfd, base = self._split(name)
        try:
            target_path = member_path(target)
        except UnpackError as e:
            raise UnpackError(f"{_shown(name)}: hard link to outside the image "
                              f"({e})") from None
        if not path or not target_path:
            raise UnpackError(f"{_shown(name)}: hard link to the image root")
        tparent, _, tbase = target_path.rpartition("/")
        tfd = self._dir_fd(tparent, name)
        try:
            os.stat(tbase, dir_fd=tfd, follow_symlinks=False)
        except FileNotFoundError:
            raise UnpackError(f"{_shown(name)}: hard link target {_shown(target)} "
                              "is not in the image") from None
        if _is_dir(tfd, tbase):
            raise UnpackError(f"{_shown(name)}: hard link to a directory")
        self._remove(pfd, base, path)
        os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        self._added(path)

    def skip_device(self, name: str) -> None:
        member_path(name)  # skipped, but a name that escapes is still refused

    def _file_mode(self, mode: int) -> int:
        mode = (mode & 0o777) | 0o600  # setuid, setgid, sticky dropped
        return mode | 0o100 if mode & 0o111 else mode

    # ---------------------------------------------------------- whiteouts --

    def begin_layer(self) -> None:
        """Entries from here on form one layer; whiteouts apply below it."""
        self._layer_paths = set()

    def _whiteout(self, name: str) -> bool:
        """Apply ``name`` if it is a whiteout; True if it was one."""
        base = posixpath.basename(name.rstrip("/"))
        if not base.startswith(WHITEOUT):
            return False
        path = member_path(name)
        parent = posixpath.dirname(path)
        pfd = self._dir_fd(parent, name)
        if base == OPAQUE:
            # Hide everything the lower layers put here, but not what this
            # layer adds, wherever in the layer its entries come.
            prefix = parent + "/" if parent else ""
            for entry in _listdir(pfd):
                if prefix + entry not in self._layer_paths:
                    self._remove(pfd, entry, prefix + entry)
            return True
        hidden = base[len(WHITEOUT):]
        if hidden in ("", ".", ".."):
            raise UnpackError(f"{_shown(name)}: bad whiteout")
        hidden_path = f"{parent}/{hidden}" if parent else hidden
        if hidden_path not in self._layer_paths:
            self._remove(pfd, hidden, hidden_path)
        return True

    # ------------------------------------------------------------ sources --

    def add_tar(self, stream: BinaryIO, layer: bool = False) -> None:
        """Unpack a tar stream (already decompressed). With ``layer``, it is
        one OCI layer: whiteouts apply to what is already in the image."""
        self._unpack(ForwardReader(stream), layer)

    def add_tar_file(self, f: BinaryIO, count: Callable[[int], None]) -> None:
        """Unpack an uncompressed tarball on disk: file contents are copied
        by the kernel (sendfile) straight from the archive's own file."""
        self._unpack(f, False, f.fileno(), count)

    def _unpack(self, f: BinaryIO, layer: bool, data_fd: int | None = None,
                count: Callable[[int], None] | None = None) -> None:
        if layer:
            self.begin_layer()
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in _headers(tar):
                    self._add_member(tar, member, layer, data_fd)
                    if count:
                        count(tarfile.BLOCKSIZE + (-(-member.size // 512) * 512
                                                   if member.isreg() else 0))
        except (tarfile.TarError, StreamError) as e:
            raise UnpackError(f"not a valid tar archive: {e}") from None
        finally:
            self._layer_paths = None

    def _add_member(self, tar: tarfile.TarFile, m: tarfile.TarInfo, layer: bool,
                    data_fd: int | None) -> None:
        try:
            if layer and self._whiteout(m.name):
                return
            if m.isdir():
                self.add_dir(m.name, m.mode)
            elif m.isreg():
                size = m.size
                if data_fd is not None:
                    def write(fd):
                        _copy_member(fd, data_fd, m)
                    if m.issparse():  # holes are kept, not written
                        size = sum(length for _, length in m.sparse)
                else:
                    def write(fd):
                        _copy(fd, tar.extractfile(m), m.size)
                self.add_file(m.name, m.mode, m.mtime, size, write)
            elif m.issym():
                self.add_symlink(m.name, m.linkname)
            elif m.islnk():
                self.add_hardlink(m.name, m.linkname)
            elif m.ischr() or m.isblk() or m.isfifo():
                self.skip_device(m.name)
            else:
                raise UnpackError(f"{_shown(m.name)}: unsupported member type "
                                  f"{m.type!r}")
        except UnpackError:
            raise
        except OSError as e:
            raise UnpackError(f"{_shown(m.name)}: {e.strerror or e}") from None

    def add_tree(self, src: str) -> None:
        """Copy a directory tree, under the same rules as a tarball."""
        for rel, entry in _walk(src):
            st = entry.stat(follow_symlinks=False)
            try:
                if stat.S_ISDIR(st.st_mode):
                    self.add_dir(rel, st.st_mode)
                elif stat.S_ISREG(st.st_mode):
                    src = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    try:
                        self.add_file(rel, st.st_mode, st.st_mtime, st.st_size,
                                      lambda fd: _sendfile(fd, src, st.st_size))
                    finally:
                        os.close(src)
                elif stat.S_ISLNK(st.st_mode):
                    self.add_symlink(rel, os.readlink(entry.path))
                else:
                    self.skip_device(rel)
            except UnpackError:
                raise
            except OSError as e:
                raise UnpackError(f"{_shown(rel)}: {e.strerror or e}") from None

    # -------------------------------------------------------------- finish --

    def finish(self) -> None:
        """Make what the runtime needs, where the image lacks it."""
        for d, mode in RUNTIME_DIRS.items():
            if not _exists(self.root_fd, d):
                self._mkdir(self.root_fd, d, mode)
        etc = self._dir_fd("etc", "etc")
        for path in RUNTIME_FILES:
            name = posixpath.basename(path)
            # The runtime binds the host's hosts and resolv.conf onto these,
            # which needs a file, not a symlink (often dangling, to /run).
            if name in ("hosts", "resolv.conf") and _is_link(etc, name):
                os.unlink(name, dir_fd=etc)
            if not _exists(etc, name):
                content = {"passwd": "root:x:0:0:root:/root:/bin/sh\n",
                           "group": "root:x:0:\n"}.get(name, "")
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                             | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=etc)
                os.write(fd, content.encode())
                os.close(fd)


def _walk(top: str) -> Iterator[tuple[str, os.DirEntry]]:
    """Entries under ``top`` as (path relative to top, DirEntry), parents
    first, never following symlinks; iterative, so depth is no problem."""
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(top, rel) if rel else top) as it:
            entries = sorted(it, key=lambda e: e.name, reverse=True)
        for entry in entries:
            path = f"{rel}/{entry.name}" if rel else entry.name
            yield path, entry
            if entry.is_dir(follow_symlinks=False):
                stack.append(path)


def _listdir(path_fd: int) -> list[str]:
    """os.listdir for an O_PATH directory fd (which can't be read itself)."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=path_fd)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _is_dir(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _copy(fd: int, source: BinaryIO, size: int) -> None:
    remaining = size
    while remaining:
        chunk = source.read(min(remaining, COPY_CHUNK))
        if not chunk:
            raise UnpackError("archive ends in the middle of a file")
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]
        remaining -= len(chunk)


def _headers(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """A tar's members, forgetting each once yielded (nothing looks back,
    and a big archive would otherwise keep them all in memory)."""
    for member in tar:
        tar.members.clear()
        yield member


def _copy_member(fd: int, data_fd: int, m: tarfile.TarInfo) -> None:
    """A member's data from the archive file, holes of sparse files kept."""
    if not m.issparse():
        _sendfile(fd, data_fd, m.size, m.offset_data)
        return
    position = m.offset_data
    for offset, length in m.sparse:
        os.lseek(fd, offset, os.SEEK_SET)
        _sendfile(fd, data_fd, length, position)
        position += length
    os.ftruncate(fd, m.size)


def _sendfile(out_fd: int, in_fd: int, size: int, offset: int = 0) -> None:
    """Copy ``size`` bytes from ``in_fd`` at ``offset``, in the kernel."""
    end = offset + size
    while offset < end:
        sent = os.sendfile(out_fd, in_fd, offset, end - offset)
        if sent == 0:
            raise UnpackError("archive ends in the middle of a file")
        offset += sent
