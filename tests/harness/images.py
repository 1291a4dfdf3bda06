"""The test images (built by scripts/build-image.sh into the image cache)
and the demo's site store of them."""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from chspawner.images.store import compression_options
from tests.harness.env import CHSPAWNER, IMAGE_CACHE, TEST_USER
from tests.harness.users import as_user

# The admin's store of the demo (scripts/demo_hub.py) and of the benchmarks
# that run a hub: kept between runs, images are imported once.
SITE_STORE = Path("/var/tmp/chspawner-demo-store")


def image_path(name: str) -> Path:
    """The built test image ``name`` (busybox, bookworm, jupyter); fails
    (pytest's failure, also outside pytest) naming the command that builds it."""
    path = IMAGE_CACHE / name
    if not path.is_dir():
        pytest.fail(f"test image {path} missing: run scripts/build-image.sh {name}")
    return path.resolve()


def squashed(name: str, compression: str = "zstd") -> Path:
    """The built test image ``name`` as one SquashFS file beside it in the
    cache (made once per build, as root: the images have files only root
    may read), readable by all; ``compression`` "none": uncompressed."""
    image = image_path(name)
    path = image.with_name(image.name + ("" if compression == "zstd" else f"-{compression}")
                           + ".sqfs")
    if not path.is_file():
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".sqfs", delete=False) as tmp:
            pass
        try:
            subprocess.run(["mksquashfs", str(image), tmp.name, "-noappend", "-quiet",
                            "-no-progress", *compression_options(compression)], check=True,
                           stdout=subprocess.DEVNULL)
            os.chmod(tmp.name, 0o644)
            os.rename(tmp.name, path)
        finally:
            if os.path.exists(tmp.name):
                os.unlink(tmp.name)
    return path


def tarball(image: Path, path: Path) -> Path:
    """``image`` as a tarball at ``path``, readable by all. Made as root:
    the images have files only root may read."""
    subprocess.run(["tar", "-C", str(image), "-cf", str(path), "."], check=True)
    os.chmod(path, 0o644)
    return path


def site_store(user: str = TEST_USER) -> str:
    """The admin's store with the demo images (``jupyter``, and bookworm as
    ``deb``), owned by ``user`` and readable by all (imported once, as that
    user)."""
    if not SITE_STORE.exists():
        as_user(user, "mkdir", "-p", str(SITE_STORE))
    for name in ("jupyter", "bookworm"):
        image = "deb" if name == "bookworm" else name
        if (SITE_STORE / "img" / image).is_dir():
            continue
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            os.chmod(tmp, 0o755)
            tar = tarball(image_path(name), Path(tmp) / "image.tar")
            print(f"importing demo image {image} into {SITE_STORE}", flush=True)
            as_user(user, str(CHSPAWNER), "import", "-q", "-s", str(SITE_STORE), str(tar),
                    image, capture_output=False)
    return str(SITE_STORE)
