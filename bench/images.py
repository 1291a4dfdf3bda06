"""Bringing images in: ``chspawner pull`` and ``chspawner import`` against
their anchors, side by side in one run, as the unprivileged user.

* pull: a three-layer Debian image (the bookworm test image, ~170 MB) from a
  local docker-registry, cold (empty layer cache) every round, against
  ``skopeo copy`` + ``umoci unpack --rootless`` of the same image;
* import: a tarball of that image against plain ``tar -x``.

Rounds alternate between the two so slow and fast moments of the disk hit
both alike; medians are reported. Run as root (it drops to the test user):
``bench/run.sh`` or, from the repository root,
``python -m bench.images [--rounds N] [--check]``.
"""
from __future__ import annotations

import argparse
import os
import pwd
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from chspawner.images.trees import remove_tree
from tests.harness.env import CHSPAWNER, TEST_USER
from tests.harness.images import image_path, tarball
from tests.harness.registry import Layout, Registry, skopeo
from tests.harness.users import as_user_or_exit

TARGETS = {"pull": 1.0, "import": 1.3}
# The image's layers after the first (everything else): /usr/share, then
# Python's library.
LATER_LAYERS = ("usr/share", "usr/lib/python3.11")


def timed(argv: list[str]) -> float:
    subprocess.run(["sync"], check=True)  # no writeback left from the last round
    start = time.perf_counter()
    as_user_or_exit(TEST_USER, *argv)
    return time.perf_counter() - start


def build_layout(work: Path, rootfs: Path) -> tuple[Path, str]:
    """An OCI layout with the Debian image split into three layers; returns
    it and the tag of the full image."""
    layout = Layout(work, rootfs)
    excludes = [f"--exclude=./{part}" for part in LATER_LAYERS]
    with layout.edit("empty", "l0") as bundle_root:
        subprocess.run(f"tar -C {rootfs} {' '.join(excludes)} -cf - . "
                       f"| tar -C {bundle_root} -xf -", shell=True, check=True)
    for i, part in enumerate(LATER_LAYERS, 1):
        with layout.edit(f"l{i - 1}", f"l{i}") as bundle_root:
            subprocess.run(["cp", "-a", str(rootfs / part), str(bundle_root / part)],
                           check=True)
    return layout.path, f"l{len(LATER_LAYERS)}"


def bench(name: str, rounds: int, anchor: Callable[[int], list[str]],
          ours: Callable[[int], list[str]]) -> float:
    """Alternate anchor and chspawner ``rounds`` times. Each round writes to
    fresh directories, removed only at the end: deleting a tree between
    rounds would make the disk discard blocks while the next one runs."""
    anchor_times, our_times = [], []
    for i in range(rounds):
        anchor_times.append(timed(anchor(i)))
        our_times.append(timed(ours(i)))
    a, o = statistics.median(anchor_times), statistics.median(our_times)
    ratio = o / a
    print(f"{name:<8} {a:>9.2f}s {o:>10.2f}s {ratio:>6.2f}x {TARGETS[name]:>6.1f}x"
          f"{'  OVER TARGET' if ratio > TARGETS[name] else ''}", flush=True)
    return ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a ratio is over its target")
    args = parser.parse_args()
    user = pwd.getpwnam(TEST_USER)
    rootfs = image_path("bookworm")
    # On /var/tmp, where the store lives by default, not a tmpfs.
    work = Path(tempfile.mkdtemp(prefix="chspawner-bench-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    scratch = work / "user"
    scratch.mkdir()
    os.chown(scratch, user.pw_uid, user.pw_gid)
    print(f"{'':<8} {'anchor':>10} {'chspawner':>11} {'ratio':>7} {'target':>7}")
    ratios = {}
    try:
        layout, tag = build_layout(work / "build", rootfs)
        with Registry(work / "registry") as registry:
            ref = f"{registry.host}/bench/debian:1"
            skopeo("copy", "--dest-tls-verify=false", "--dest-no-creds",
                   f"oci:{layout}:{tag}", f"docker://{ref}")
            ratios["pull"] = bench(
                "pull", args.rounds,
                lambda i: ["sh", "-c", f"skopeo --insecure-policy copy -q "
                           f"--src-tls-verify=false docker://{ref} oci:{scratch}/oci{i}:1 "
                           f"&& umoci unpack --rootless --image {scratch}/oci{i}:1 "
                           f"{scratch}/bundle{i}"],
                lambda i: [str(CHSPAWNER), "pull", "-q", "--insecure",
                           "-s", f"{scratch}/pull{i}", ref, "deb"])
        debian = tarball(rootfs, work / "debian.tar")
        ratios["import"] = bench(
            "import", args.rounds,
            lambda i: ["sh", "-c", f"mkdir {scratch}/untarred{i} && "
                       f"tar -xf {debian} -C {scratch}/untarred{i}"],
            lambda i: [str(CHSPAWNER), "import", "-q", "-s", f"{scratch}/import{i}",
                       str(debian), "deb"])
    finally:
        remove_tree(work)  # umoci --rootless leaves directories without u+w
    over = any(ratios[k] > TARGETS[k] for k in ratios)
    return 1 if args.check and over else 0


if __name__ == "__main__":
    sys.exit(main())
