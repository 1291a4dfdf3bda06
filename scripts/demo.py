"""The main job on this machine, as a user would do it (run by demo.sh).

A local registry (Debian's docker-registry on 127.0.0.1) serves the demo
image, a Debian bookworm image with Python whose default command says
hello; the unprivileged user pulls it into their store with
``chspawner pull`` and runs it by name with ``chspawner run``, first with
the image's own command, then with one of theirs.

The registry and image-building pieces are the test harness's
(tests/registry.py): one way to run a real registry in this project.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from registry import Registry, _Layout, _skopeo  # noqa: E402

VENV_BIN = Path(sys.executable).parent
CACHE = Path(os.environ.get("CHSPAWNER_IMAGE_CACHE", "/var/cache/chspawner/images"))
USER = os.environ.get("CHSPAWNER_USER", "chtest")
HELLO = ("import os, platform; "
         "release = dict(l.rstrip().split('=', 1) for l in open('/etc/os-release') if '=' in l); "
         "print('Hello from', release['PRETTY_NAME'].strip('\"'), '| Python', "
         "platform.python_version(), '| uid', os.getuid(), '| in', os.getcwd())")
DEMO_VERSION = "1"  # bump when the demo image's config changes


def demo_layout() -> Path:
    """An OCI layout of the bookworm image with a default command, built
    once per bookworm build and kept in the image cache."""
    rootfs = (CACHE / "bookworm").resolve()
    cached = CACHE / f"{rootfs.name}-oci-demo{DEMO_VERSION}"
    if cached.is_dir():
        return cached
    for stale in CACHE.glob("bookworm-*-oci-demo*"):  # built from older images
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(dir=CACHE, prefix=".demo-oci."))
    try:
        layout = _Layout(work, rootfs)
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


def as_user(*argv: str) -> None:
    print(f"+ {' '.join(argv)}", flush=True)
    subprocess.run([str(REPO / "scripts/as-user.sh"), USER, *argv], check=True)


def main() -> None:
    layout = demo_layout()
    with Registry() as registry:
        ref = f"{registry.host}/demo/bookworm:1"
        _skopeo("copy", "--dest-tls-verify=false", "--dest-no-creds",
                f"oci:{layout}:demo", f"docker://{ref}")
        print(f"registry on {registry.host} serves {ref}", flush=True)
        chspawner = str(VENV_BIN / "chspawner")
        as_user(chspawner, "pull", "--insecure", ref, "demo/bookworm")
    as_user(chspawner, "images")
    as_user(chspawner, "run", "demo/bookworm")
    as_user(chspawner, "run", "demo/bookworm", "--", "python3", "-c",
            "import sys; print('and a command of your own, in', sys.prefix)")


if __name__ == "__main__":
    main()
