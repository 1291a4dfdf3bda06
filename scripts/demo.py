"""The main job on this machine, as a user would do it (run by demo.sh).

A local registry (Debian's docker-registry on 127.0.0.1) serves the demo
image, a Debian bookworm image with Python whose default command says
hello; the unprivileged user pulls it into their store with
``chspawner pull`` and runs it by name with ``chspawner run``, first with
the image's own command, then with one of theirs.

The registry and image-building pieces are the test harness's
(tests/harness/registry.py): one way to run a real registry in this project.
Run from the repository root: ``python -m scripts.demo``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.harness.env import CHSPAWNER, IMAGE_CACHE, TEST_USER
from tests.harness.images import image_path
from tests.harness.registry import Layout, Registry, skopeo
from tests.harness.users import as_user

HELLO = ("import os, platform; "
         "release = dict(l.rstrip().split('=', 1) for l in open('/etc/os-release') if '=' in l); "
         "print('Hello from', release['PRETTY_NAME'].strip('\"'), '| Python', "
         "platform.python_version(), '| uid', os.getuid(), '| in', os.getcwd())")
DEMO_VERSION = "1"  # bump when the demo image's config changes


def demo_layout() -> Path:
    """An OCI layout of the bookworm image with a default command, built
    once per bookworm build and kept in the image cache."""
    rootfs = image_path("bookworm")
    cached = IMAGE_CACHE / f"{rootfs.name}-oci-demo{DEMO_VERSION}"
    if cached.is_dir():
        return cached
    for stale in IMAGE_CACHE.glob("bookworm-*-oci-demo*"):  # built from older images
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(dir=IMAGE_CACHE, prefix=".demo-oci."))
    try:
        layout = Layout(work, rootfs)
        with layout.edit("empty", "demo") as bundle_root:
            subprocess.run(["cp", "-a", f"{rootfs}/.", str(bundle_root)], check=True)
        layout.config("demo", "--config.entrypoint=python3", "--config.cmd=-c",
                      f"--config.cmd={HELLO}", "--config.workingdir=/tmp",
                      "--config.env=PATH=/usr/local/bin:/usr/bin:/bin",
                      "--config.env=LANG=C.UTF-8")
        subprocess.run(["chmod", "-R", "a+rX", str(layout.path)], check=True)
        os.rename(layout.path, cached)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cached


def as_demo_user(*argv: str) -> None:
    """As the demo user, shown as typed, its output on the terminal."""
    print(f"+ {' '.join(argv)}", flush=True)
    as_user(TEST_USER, *argv, capture_output=False)


def main() -> None:
    layout = demo_layout()
    with Registry() as registry:
        ref = f"{registry.host}/demo/bookworm:1"
        skopeo("copy", "--dest-tls-verify=false", "--dest-no-creds",
               f"oci:{layout}:demo", f"docker://{ref}")
        print(f"registry on {registry.host} serves {ref}", flush=True)
        chspawner = str(CHSPAWNER)
        as_demo_user(chspawner, "pull", "--insecure", ref, "demo/bookworm")
    as_demo_user(chspawner, "images")
    as_demo_user(chspawner, "run", "demo/bookworm")
    as_demo_user(chspawner, "run", "demo/bookworm", "--", "python3", "-c",
                 "import sys; print('and a command of your own, in', sys.prefix)")


if __name__ == "__main__":
    main()
