"""Whole directory trees: removing and measuring them, whatever their depth.

An image can be deeper than PATH_MAX or Python's recursion limit, and can
hold directories without u+w; these helpers cope with all of that and never
follow symlinks.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

DIR_RDONLY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_made_dir(root: int, name: str) -> int:
    """An fd of the directory ``name`` in the directory ``root``, made
    (mode 0755) if missing; anything else by that name (a file, a symlink
    an image brought) is replaced, never followed."""
    try:
        os.mkdir(name, 0o755, dir_fd=root)
    except FileExistsError:
        if not stat.S_ISDIR(os.stat(name, dir_fd=root, follow_symlinks=False).st_mode):
            os.unlink(name, dir_fd=root)
            os.mkdir(name, 0o755, dir_fd=root)
    return os.open(name, DIR_RDONLY, dir_fd=root)


def remove_tree(path: Path) -> None:
    """rm -rf ``path``; see :func:`remove_entry`."""
    parent = os.open(os.path.dirname(os.path.abspath(path)), DIR_RDONLY)
    try:
        remove_entry(parent, os.path.basename(os.path.abspath(path)))
    finally:
        os.close(parent)


def remove_entry(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd``, a whole tree if it is a directory.

    Iterative, holding one directory open at a time (climbing back with
    ".."), so no tree is too deep for it (recursion or file descriptor
    limits); never follows symlinks; gives itself u+rwx on directories an
    image left without.
    """
    try:
        os.unlink(name, dir_fd=dir_fd)
        return
    except FileNotFoundError:
        return
    except IsADirectoryError:
        pass
    fd = _open_dir_for_removal(dir_fd, name)
    names: list[str] = []
    pending = [_clear_files(fd)]
    while pending[-1] or names:
        if pending[-1]:
            child = pending[-1].pop()
            sub = _open_dir_for_removal(fd, child)
            os.close(fd)
            fd = sub
            names.append(child)
            pending.append(_clear_files(fd))
        else:
            parent = os.open("..", DIR_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir(names.pop(), dir_fd=fd)
            pending.pop()
    os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def _open_dir_for_removal(dir_fd: int, name: str) -> int:
    try:
        return os.open(name, DIR_RDONLY, dir_fd=dir_fd)
    except PermissionError:
        os.chmod(name, 0o700, dir_fd=dir_fd)
        return os.open(name, DIR_RDONLY, dir_fd=dir_fd)


def _clear_files(fd: int) -> list[str]:
    """Unlink everything but subdirectories in ``fd``; return those."""
    if not os.fstat(fd).st_mode & 0o200:
        os.fchmod(fd, 0o700)
    subdirs = []
    with os.scandir(fd) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            else:
                os.unlink(entry.name, dir_fd=fd)
    return subdirs


def disk_usage(path: str) -> int:
    """The bytes of blocks the tree at ``path`` uses, following no symlink;
    what lies deeper than PATH_MAX is not counted (an image listing shows
    the figure; nothing depends on it being exact)."""
    total = 0
    stack = [path]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:  # deeper than PATH_MAX, or unreadable: not counted
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:  # its path is longer than PATH_MAX: not counted
                    continue
                total += st.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return total
