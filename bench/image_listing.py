"""Listing a store's kernels and images: each image's record vs a walk of
each image (what a listing cost before records), in one run.

A store of ``--images`` images, hard-linked copies of the Debian bookworm
test image (tens of thousands of files each, a python3 kernelspec in each:
hard links cost no space and give each image a whole tree to walk), each
recorded once (``Store.refresh``, as an import or pull records it). Then,
``--rounds`` times each:

* anchor: a listing that measures every image (its size: a walk of its
  tree; its kernels: its kernel directories), as listings did before;
* chspawner: ``ContainerKernelSpecManager.get_all_specs()`` (what
  ``/api/kernelspecs`` answers, which JupyterLab polls) and
  ``Store.images()`` (the spawn form's and ``chspawner images``'s list), in
  a fresh process's state (a new manager and store each round), reading
  the records.

``--delay-ms`` adds that long, busy-waited, to every stat, open and
directory read of both, as a parallel file system's metadata server might.

Run as root from the repository root: ``python -m bench.image_listing
[--images 50] [--rounds 3] [--delay-ms 0]``.
"""
from __future__ import annotations

import argparse
import builtins
import io
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from chspawner.images import records
from chspawner.images.store import Store
from chspawner.images.trees import remove_tree
from chspawner.provisioner.kernelspecs import ContainerKernelSpecManager
from tests.harness.images import image_path


def make_store(root: Path, count: int) -> Store:
    """``count`` hard-linked copies of the bookworm test image, recorded."""
    source = image_path("bookworm")
    (root / "img").mkdir(parents=True)
    for i in range(count):
        subprocess.run(["cp", "-al", str(source), str(root / "img" / f"img{i:03d}")],
                       check=True)
    store = Store(root)
    store.refresh()
    return store


def slowed(delay: float) -> Callable[[], None]:
    """Make every stat, lstat, open, directory listing and scan take
    ``delay`` s longer (busy-waited); returns the undo."""
    if not delay:
        return lambda: None
    saved = (os.stat, os.lstat, os.open, os.listdir, os.scandir, builtins.open, io.open)

    def slow(function):
        def wrapper(*args, **kwargs):
            end = time.perf_counter() + delay
            while time.perf_counter() < end:
                pass
            return function(*args, **kwargs)
        return wrapper
    os.stat, os.lstat, os.open, os.listdir, os.scandir = map(slow, saved[:5])
    builtins.open = io.open = slow(saved[5])

    def undo() -> None:
        (os.stat, os.lstat, os.open, os.listdir, os.scandir, builtins.open,
         io.open) = saved
    return undo


def walk_listing(store: Store) -> int:
    """The anchor: every image measured as a listing did before records."""
    return sum(records.measure(info.path).size for info in store.images())


def record_listing(root: Path) -> int:
    """What /api/kernelspecs and the image list read now, afresh."""
    specs = ContainerKernelSpecManager(storage=str(root), include_native=False)
    return len(specs.get_all_specs()) + len(Store(root).images())


def timed(function: Callable[[], object], delay: float) -> float:
    undo = slowed(delay)
    try:
        started = time.perf_counter()
        function()
        return time.perf_counter() - started
    finally:
        undo()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=0,
                        help="added to every metadata operation (a parallel file system)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="chspawner-listing-", dir="/var/tmp"))
    try:
        started = time.perf_counter()
        store = make_store(root, args.images)
        print(f"{args.images} images copied and recorded in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        delay = args.delay_ms / 1000
        walks, reads = [], []
        for _ in range(args.rounds):
            walks.append(timed(lambda: walk_listing(store), delay))
            reads.append(timed(lambda: record_listing(root), delay))
        walk, read = statistics.median(walks), statistics.median(reads)
        print(f"\n{'listing ' + str(args.images) + ' images':<52} {'walks':>9} "
              f"{'records':>9} {'ratio':>8}")
        print(f"{'kernels + images' + (f', +{args.delay_ms:g} ms per operation' if delay else ''):<52} "
              f"{walk:>8.3f}s {read:>8.3f}s {walk / read:>7.0f}x")
    finally:
        remove_tree(root)


if __name__ == "__main__":
    main()
