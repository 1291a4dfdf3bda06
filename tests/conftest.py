"""Shared fixtures: the unprivileged user, the test images, the runtimes.

pytest runs as root (CI does), but every container is started as the
unprivileged test user through scripts/as-user.sh, with the installed
``chspawner`` console command, exactly as a user would type it.

Fixtures only: the helpers they use are the harness's (tests/harness).
"""
from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

# Before the harness is imported: its assertions (wait_until's, the hub's)
# report as well as a test's own.
pytest.register_assert_rewrite("tests.harness")

from chspawner.images.trees import remove_tree  # noqa: E402
from tests.harness.center import CenterHub  # noqa: E402
from tests.harness.center import center_store as make_center_store  # noqa: E402
from tests.harness.env import CHSPAWNER, OTHER_USER, TEST_USER  # noqa: E402
from tests.harness.images import image_path, tarball  # noqa: E402
from tests.harness.postgres import Postgres  # noqa: E402
from tests.harness.puller import Puller  # noqa: E402
# The real-registry harness's session fixtures (registry, basic_registry,
# token_registry, test_images).
from tests.harness.registry import (  # noqa: E402,F401
    basic_registry, registry, test_images, token_registry)
from tests.harness.runtime import BACKENDS, Runtime  # noqa: E402
# The one-node Slurm cluster's session fixture.
from tests.harness.slurm import slurm  # noqa: E402,F401
from tests.harness.users import as_user  # noqa: E402


@pytest.fixture(scope="session")
def user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        pytest.fail(f"test user {TEST_USER} missing: run scripts/setup-system.sh")


@pytest.fixture(scope="session")
def other_user() -> pwd.struct_passwd:
    """A second unprivileged account: another user of the same machine."""
    try:
        return pwd.getpwnam(OTHER_USER)
    except KeyError:
        pytest.fail(f"test user {OTHER_USER} missing: run scripts/setup-system.sh")


@pytest.fixture(scope="session")
def busybox() -> Path:
    return image_path("busybox")


@pytest.fixture(scope="session")
def bookworm() -> Path:
    return image_path("bookworm")


@pytest.fixture(params=BACKENDS)
def rt(request, user) -> Runtime:
    """Each test using this runs once per backend."""
    if request.param == "ch-run" and request.node.get_closest_marker("builtin_only"):
        pytest.skip(request.node.get_closest_marker("builtin_only").args[0])
    return Runtime(request.param, user.pw_name)


@pytest.fixture
def builtin(user) -> Runtime:
    return Runtime("builtin", user.pw_name)


@pytest.fixture
def user_dir(user) -> Path:
    """A fresh directory owned by the test user, under the host /tmp."""
    path = Path(tempfile.mkdtemp(prefix="chspawner-test-", dir="/tmp"))
    os.chown(path, user.pw_uid, user.pw_gid)
    yield path
    remove_tree(path)


@pytest.fixture
def host_dir_outside_tmp(user) -> Path:
    """A user-owned host directory the busybox image has no path to (it has
    no /var), unlike anything under /tmp, which containers see."""
    path = Path(tempfile.mkdtemp(prefix="chspawner-test-", dir="/var/tmp"))
    os.chown(path, user.pw_uid, user.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def user_image(user, user_dir, busybox) -> Path:
    """A private, writable copy of the busybox image owned by the test user."""
    path = user_dir / "img"
    as_user(user.pw_name, "cp", "-r", str(busybox), str(path))
    return path


@pytest.fixture(scope="session")
def kernel_store(user, bookworm, busybox):
    """The test user's store with the Debian image (ipykernel inside) as
    ``deb``, busybox (no Python) as ``nopython``, and the Debian image with
    JupyterHub and JupyterLab as ``jupyter``."""
    work = Path(tempfile.mkdtemp(prefix="chspawner-kernels-", dir="/tmp"))
    os.chmod(work, 0o755)
    store = work / "store"
    store.mkdir()
    os.chown(store, user.pw_uid, user.pw_gid)
    # Tarballs made as root: the images have files only root may read.
    deb = tarball(bookworm, work / "deb.tar")
    for src, name in ((deb, "deb"), (busybox, "nopython")):
        as_user(user.pw_name, str(CHSPAWNER), "import", "-q", "-s", str(store), str(src),
                name)
    deb.unlink()
    jupyter = tarball(image_path("jupyter"), work / "jupyter.tar")
    as_user(user.pw_name, str(CHSPAWNER), "import", "-q", "-s", str(store), str(jupyter),
            "jupyter")
    jupyter.unlink()
    yield str(store)
    remove_tree(work)


@pytest.fixture
def puller(user, user_dir) -> Puller:
    """``chspawner`` as the test user against a fresh private store."""
    store = user_dir / "store"
    as_user(user.pw_name, "mkdir", str(store))
    return Puller(user, store)


@pytest.fixture
def drained(slurm):
    """The node takes no new jobs until the test calls the fixture's value
    (or ends): jobs queue."""
    slurm.run("scontrol", "update", f"nodename={slurm.node}", "state=drain",
              "reason=chspawner-test")
    resumed = []

    def resume() -> None:
        if not resumed:
            slurm.run("scontrol", "update", f"nodename={slurm.node}", "state=resume")
            resumed.append(True)
    yield resume
    resume()


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the session manager's records (started on
    first use, stopped at the end)."""
    with Postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def records_url(request, tmp_path) -> str:
    """An empty database for the session records: an SQLite file, or a
    fresh database on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/sessions.sqlite"
    return request.getfixturevalue("postgres").database()


# The multi-node cluster's session fixture (tests/harness/cluster.py): its
# own daemons, apart from `slurm`'s.
from tests.harness.cluster import cluster  # noqa: E402,F401


@pytest.fixture(scope="session")
def center_store(kernel_store) -> str:
    """The site store of docs/admin/center_jupyterhub_config.py: the test
    images under the names it offers (python, jupyter)."""
    work = Path(tempfile.mkdtemp(prefix="chspawner-center-store-", dir="/tmp"))
    os.chmod(work, 0o755)
    yield make_center_store(kernel_store, work)
    remove_tree(work)


@pytest.fixture(scope="module")
def center_hub(cluster, postgres, center_store, user):
    """JupyterHub as a center runs it (docs/admin/center_jupyterhub_config.py),
    on the multi-node cluster's service node, its records on PostgreSQL."""
    with CenterHub(cluster, center_store, user.pw_name, postgres.database(),
                   postgres.database()) as hub:
        yield hub
