"""SquashFS images used in place against the same image as a directory.

In one run, as the unprivileged user, with the installed ``chspawner run``:

* start time, side by side in one hyperfine session: ``/bin/true`` in the
  busybox image and ``python3 -c pass`` in the Debian image, each from the
  image directory and from the image as one SquashFS file, zstd as
  ``chspawner images squash`` makes it: mounted warm (the mount kept
  between starts, ``CHSPAWNER_SQUASH_LINGER``, as a center sets it; target:
  at most 1.5x the directory's), and cold (every container mounts afresh,
  the default), zstd and uncompressed;
* files opened on the store's file system to run ``python3 -c 'import
  json'``: what a thousand nodes starting the same image ask of a parallel
  file system's metadata servers. Counted from outside by inotify (IN_OPEN
  on every directory of the image directory; on the SquashFS file's
  directory): target 1 for SquashFS, the file itself;
* 100 concurrent starts from one SquashFS file: all succeed, the wall
  time, and no FUSE server left once they are done.

Run as root (it drops to the test user): ``bench/run.sh`` or, from the
repository root, ``python -m bench.squash [--runs N] [--check]``.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import pwd
import struct
import subprocess
import sys
import time
from pathlib import Path

from bench.runtime_start import hyperfine
from tests.harness.env import AS_USER, CHSPAWNER, TEST_USER
from tests.harness.images import image_path, squashed
from tests.harness.procs import live_named
from tests.harness.users import as_user

START_TARGET = 1.5
#: Seconds the warm runs keep their mount after the last start: longer than
#: a hyperfine run's gaps, short enough to wait out after.
LINGER = 10
CONCURRENT = 100
#: (label, image, command)
CASES = [
    ("/bin/true", "busybox", "/bin/true"),
    ("python3 -c pass", "bookworm", "python3 -c pass"),
]
IMPORT_JSON = ["python3", "-c", "import json"]

IN_OPEN, IN_ISDIR, IN_NONBLOCK = 0x20, 0x40000000, 0o4000
EVENT = struct.Struct("iIII")


class Opens:
    """IN_OPEN events under some directories (not recursive by itself:
    each directory to watch is added)."""

    def __init__(self, directories: list[str]):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        for d in directories:
            if self.libc.inotify_add_watch(self.fd, os.fsencode(d), IN_OPEN) < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {d}")

    def files(self) -> list[str]:
        """The names of files (not directories) opened since the last call."""
        names = []
        while True:
            try:
                data = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                return names
            at = 0
            while at < len(data):
                _wd, mask, _cookie, size = EVENT.unpack_from(data, at)
                name = data[at + EVENT.size:at + EVENT.size + size].rstrip(b"\0")
                if not mask & IN_ISDIR:
                    names.append(name.decode(errors="replace"))
                at += EVENT.size + size

    def close(self) -> None:
        os.close(self.fd)


def files_opened(image: Path) -> int:
    """Files opened on the store's file system while ``python3 -c 'import
    json'`` runs in ``image`` (a directory, or a SquashFS file)."""
    if image.is_dir():
        watched = [str(image)] + [str(p) for p in image.rglob("*")
                                  if p.is_dir() and not p.is_symlink()]
    else:
        watched = [str(image.parent)]
    opens = Opens(watched)
    try:
        result = as_user(TEST_USER, str(CHSPAWNER), "run", str(image), "--", *IMPORT_JSON,
                         check=False, timeout=120, cwd="/")
        assert result.returncode == 0, result.stderr
        names = opens.files()
    finally:
        opens.close()
    if image.is_file():  # the directory holds other files too
        names = [n for n in names if n == image.name]
    return len(names)


def live_servers() -> int:
    return len(live_named(pwd.getpwnam(TEST_USER).pw_uid, "squashfuse_ll"))


def keepers() -> int:
    return len(live_named(pwd.getpwnam(TEST_USER).pw_uid, "chspawner-mount"))


def wait_quiet(timeout: float) -> int:
    """Wait for the warm mounts' keepers and the FUSE servers to go; the
    number of servers left."""
    deadline = time.monotonic() + timeout
    while (live_servers() or keepers()) and time.monotonic() < deadline:
        time.sleep(0.05)  # (polling /proc: nothing signals a process's exit)
    return live_servers()


def concurrent_starts(image: Path, n: int) -> tuple[int, float, int]:
    """(how many succeeded, wall seconds, FUSE servers left after 10 s at most)."""
    argv = [str(AS_USER), TEST_USER, str(CHSPAWNER), "run", str(image), "--", "/bin/true"]
    began = time.perf_counter()
    procs = [subprocess.Popen(argv, cwd="/", stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for _ in range(n)]
    ok = sum(p.wait(timeout=300) == 0 for p in procs)
    wall = time.perf_counter() - began
    for p in procs:
        p.stderr.close()
    return ok, wall, wait_quiet(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--concurrent", type=int, default=CONCURRENT)
    parser.add_argument("--linger", type=float, default=LINGER,
                        help="seconds the warm runs keep their mount after the last start")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()
    missed = []
    print(f"SquashFS vs directory images ({os.cpu_count()} cores, {os.uname().release})")
    print(f"{'start':<24} {'directory':>10} {'warm':>10} {'ratio':>6} {'target':>7}"
          f"   {'cold':>10} {'ratio':>6}   {'cold, uncompressed':>18} {'ratio':>6}")
    for label, name, command in CASES:
        # Every command through env(1), the same cost for each: only the
        # warm one keeps its mount.
        runs = {"directory": (image_path(name), 0), "warm": (squashed(name), args.linger),
                "cold": (squashed(name), 0), "uncompressed": (squashed(name, "none"), 0)}
        medians = hyperfine({kind: f"env CHSPAWNER_SQUASH_LINGER={linger} {CHSPAWNER} run "
                                   f"{image} -- {command}"
                             for kind, (image, linger) in runs.items()}, args.runs)
        wait_quiet(args.linger + 10)
        ms = {kind: median * 1e3 for kind, median in medians.items()}
        ratio = {kind: ms[kind] / ms["directory"] for kind in ms}
        if ratio["warm"] > START_TARGET:
            missed.append(f"start {label}")
        print(f"{label:<24} {ms['directory']:>8.2f}ms {ms['warm']:>8.2f}ms "
              f"{ratio['warm']:>5.2f}x {START_TARGET:>6.1f}x   {ms['cold']:>8.2f}ms "
              f"{ratio['cold']:>5.2f}x   {ms['uncompressed']:>16.2f}ms "
              f"{ratio['uncompressed']:>5.2f}x")
    directory, squash = image_path("bookworm"), squashed("bookworm")
    from_dir, from_squash = files_opened(directory), files_opened(squash)
    if from_squash != 1:
        missed.append("files opened")
    print(f"{'files opened: import json':<24} {from_dir:>10} {from_squash:>10} "
          f"{'':>6} {'1':>7}")
    ok, wall, left = concurrent_starts(squashed("busybox"), args.concurrent)
    if ok != args.concurrent or left:
        missed.append("concurrent starts")
    print(f"{args.concurrent} concurrent starts from one SquashFS file: {ok} succeeded "
          f"in {wall:.2f} s, {left} FUSE servers left")
    if missed:
        print("missed: " + "; ".join(missed))
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
