"""Another user can't plant images in someone's store.

The default store, /var/tmp/$USER.ch, is in a directory anyone can write:
the attacker (``other_user``, chtest2) makes it first, or a symlink of that
name, or gets an image into an open ``img/``; the victim (``user``, chtest)
must get a one-line refusal from every store operation, never the
attacker's programs. A store made by the victim is private; an image given
by directory path is the victim's own choice and still runs.
"""
from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from chspawner.images.trees import remove_tree
from tests.harness.env import CHSPAWNER
from tests.harness.users import as_user

EXIT_FAILED, EXIT_RUNTIME = 1, 31


def chspawner(user, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess:
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    return as_user(user.pw_name, "env", *extra, str(CHSPAWNER), *args, check=False,
                   timeout=120)


def assert_refused(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def store_operations(store: Path | None, image: str, busybox: Path) -> dict[str, list]:
    """Each store operation on ``image``, as argv (the default store when
    ``store`` is None), with the exit status a refusal has."""
    s = [] if store is None else ["-s", str(store)]
    return {
        "list": (["images", "list", *s], EXIT_FAILED),
        "inspect": (["images", "inspect", *s, image], EXIT_FAILED),
        "path": (["images", "path", *s, image], EXIT_FAILED),
        "rm": (["images", "rm", *s, image], EXIT_FAILED),
        "import": (["import", "-q", *s, str(busybox), "mine"], EXIT_FAILED),
        "kernel list": (["kernel", "list", *s], EXIT_FAILED),
        "run": (["run", *s, image, "--", "true"], EXIT_RUNTIME),
        "run ch-run": (["run", "--backend=ch-run", *s, image, "--", "true"], EXIT_RUNTIME),
    }


@pytest.fixture
def default_store(user, other_user) -> Path:
    """The test user's default store path, free for the test to plant in:
    a store already there (the demo's, say) is moved aside and put back
    after the test; whatever the test made there is removed."""
    path = Path(f"/var/tmp/{user.pw_name}.ch")
    kept = None
    if os.path.lexists(path):
        kept = Path(tempfile.mkdtemp(prefix=f"{user.pw_name}.ch-kept-", dir="/var/tmp"))
        os.rename(path, kept / "store")
    yield path
    if os.path.lexists(path):
        remove_tree(path)
    if kept is not None:
        os.rename(kept / "store", path)
        kept.rmdir()


@pytest.fixture
def attacker_store(other_user, busybox) -> Path:
    """A store of the attacker's own, with busybox as ``evil``."""
    path = Path(tempfile.mkdtemp(prefix="chspawner-attacker-", dir="/var/tmp"))
    os.chown(path, other_user.pw_uid, other_user.pw_gid)
    os.chmod(path, 0o755)
    result = chspawner(other_user, "import", "-q", "-s", str(path / "store"),
                       str(busybox), "evil")
    assert result.returncode == 0, result.stderr
    as_user(other_user.pw_name, "chmod", "-R", "go+rX", str(path))
    yield path / "store"
    remove_tree(path)


@pytest.fixture
def sticky_dir(user) -> Path:
    """A directory like /tmp: anyone may create in it, only owners remove."""
    path = Path(tempfile.mkdtemp(prefix="chspawner-sticky-", dir="/var/tmp"))
    os.chmod(path, 0o1777)
    yield path
    remove_tree(path)


@pytest.fixture
def victim_store(user, user_dir, busybox) -> Path:
    """The test user's own store, with busybox as ``bb``."""
    store = user_dir / "store"
    result = chspawner(user, "import", "-q", "-s", str(store), str(busybox), "bb")
    assert result.returncode == 0, result.stderr
    return store


# ------------------------------------------------------ planted stores ----

@pytest.mark.parametrize("operation", list(store_operations(None, "", Path())))
def test_a_store_planted_at_the_default_path_is_refused(user, other_user, busybox,
                                                        default_store, operation):
    """The attacker made /var/tmp/chtest.ch (with an image) before the
    victim: every operation on the victim's default store refuses it."""
    result = chspawner(other_user, "import", "-q", "-s", str(default_store),
                       str(busybox), "evil")
    assert result.returncode == 0, result.stderr
    as_user(other_user.pw_name, "chmod", "-R", "go+rX", str(default_store))
    argv, code = store_operations(None, "evil", busybox)[operation]
    result = chspawner(user, *argv)
    assert_refused(result, code, f"refusing image store {default_store}",
                   other_user.pw_name, "not you")
    # Nothing changed in it: the image is still there, nothing was added.
    assert sorted(os.listdir(default_store / "img")) == ["evil"]


def test_a_symlink_planted_at_the_default_path_is_refused(user, other_user, busybox,
                                                          default_store, attacker_store):
    as_user(other_user.pw_name, "ln", "-s", str(attacker_store), str(default_store))
    for name, (argv, code) in store_operations(None, "evil", busybox).items():
        result = chspawner(user, *argv)
        assert_refused(result, code, f"refusing image store {default_store}",
                       "a symlink made by " + other_user.pw_name)
    assert sorted(os.listdir(attacker_store / "img")) == ["evil"]


def test_a_store_named_by_the_environment_is_checked_too(user, other_user, busybox,
                                                         sticky_dir):
    """CH_IMAGE_STORAGE pointing into a shared directory: same attack."""
    planted = sticky_dir / "victims-store"
    assert chspawner(other_user, "import", "-q", "-s", str(planted), str(busybox),
                     "evil").returncode == 0
    as_user(other_user.pw_name, "chmod", "-R", "go+rX", str(planted))
    for argv, code in store_operations(None, "evil", busybox).values():
        assert_refused(chspawner(user, *argv, env={"CH_IMAGE_STORAGE": str(planted)}),
                       code, str(planted), other_user.pw_name)


def test_the_victim_creates_the_default_store_private(user, other_user, busybox,
                                                      default_store):
    """No store yet: the first import makes it 0700 (mkdir: atomic, never
    through a symlink), and it works; the attacker can't get in."""
    result = chspawner(user, "import", "-q", str(busybox), "bb")
    assert result.returncode == 0, result.stderr
    st = default_store.lstat()
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == user.pw_uid
    assert stat.S_IMODE(st.st_mode) == 0o700
    for sub in ("img", "tmp", "dlcache"):
        assert stat.S_IMODE((default_store / sub).stat().st_mode) == 0o700
    assert "bb" in chspawner(user, "images", "list").stdout
    assert chspawner(user, "run", "bb", "--", "echo", "ran").stdout == "ran\n"
    denied = as_user(other_user.pw_name, "mkdir", str(default_store / "img" / "evil"),
                     check=False)
    assert denied.returncode != 0


# ------------------------------------------------------- open stores ----

@pytest.mark.parametrize("where,mode", [("", 0o775), ("", 0o757), ("img", 0o777),
                                        ("tmp", 0o1777), ("dlcache", 0o770)])
def test_a_store_others_can_write_is_refused(user, busybox, victim_store, where, mode):
    path = victim_store / where if where else victim_store
    as_user(user.pw_name, "chmod", f"{mode:o}", str(path))
    for argv, code in store_operations(victim_store, "bb", busybox).values():
        assert_refused(chspawner(user, *argv), code,
                       f"{path} is writable by group or others", "chmod go-w")
    as_user(user.pw_name, "chmod", "go-w", str(path))
    assert chspawner(user, "run", "-s", str(victim_store), "bb", "--", "echo",
                     "ran").stdout == "ran\n"


def test_a_store_in_a_directory_anyone_can_rename_in_is_refused(user, user_dir, busybox):
    """Not sticky: anyone could move the store away and put theirs there."""
    shared = user_dir / "shared"
    as_user(user.pw_name, "mkdir", str(shared))
    store = shared / "store"
    assert chspawner(user, "import", "-q", "-s", str(store), str(busybox),
                     "bb").returncode == 0
    os.chmod(shared, 0o777)
    assert_refused(chspawner(user, "images", "list", "-s", str(store)), EXIT_FAILED,
                   f"{shared} is writable by others and not sticky")
    assert_refused(chspawner(user, "run", "-s", str(store), "bb", "--", "true"),
                   EXIT_RUNTIME, "not sticky")


def test_an_image_planted_while_img_was_open_is_refused(user, other_user, busybox,
                                                        victim_store):
    """img/ was world-writable for a while: the attacker's image stays
    refused (and unlisted) after the victim closes it again."""
    img = victim_store / "img"
    for path in (victim_store.parent, victim_store):
        os.chmod(path, 0o755)
    os.chmod(img, 0o777)
    as_user(other_user.pw_name, "cp", "-r", str(busybox), str(img / "evil"))
    os.chmod(img, 0o755)
    listing = chspawner(user, "images", "list", "-s", str(victim_store))
    assert listing.returncode == 0 and "bb" in listing.stdout
    assert "evil" not in listing.stdout
    for backend in ("builtin", "ch-run"):
        assert_refused(chspawner(user, "run", f"--backend={backend}", "-s",
                                 str(victim_store), "evil", "--", "true"),
                       EXIT_RUNTIME, "belongs to " + other_user.pw_name)
    assert_refused(chspawner(user, "images", "path", "-s", str(victim_store), "evil"),
                   EXIT_FAILED, "belongs to " + other_user.pw_name)


# ------------------------------------------------------ what still works ----

def test_an_image_given_by_path_runs_whatever_the_store(user, other_user, busybox,
                                                        default_store, attacker_store):
    as_user(other_user.pw_name, "ln", "-s", str(attacker_store), str(default_store))
    result = chspawner(user, "run", str(busybox), "--", "echo", "ran")
    assert result.returncode == 0 and result.stdout == "ran\n", result.stderr


def test_a_shared_store_placed_by_root_is_usable(user, other_user, busybox):
    """A site store owned by its own account, in a directory only root
    writes: root put it there, so every user may read and run from it."""
    site = Path(tempfile.mkdtemp(prefix="chspawner-site-", dir="/var/tmp"))
    try:
        os.chmod(site, 0o755)
        store = site / "store"
        store.mkdir(mode=0o755)
        os.chown(store, other_user.pw_uid, other_user.pw_gid)
        assert chspawner(other_user, "import", "-q", "-s", str(store), str(busybox),
                         "tools").returncode == 0
        for sub in ("img", "tmp", "dlcache"):  # the root's mode: readable by all
            assert stat.S_IMODE((store / sub).stat().st_mode) == 0o755
        assert "tools" in chspawner(user, "images", "list", "-s", str(store)).stdout
        assert chspawner(user, "run", "-s", str(store), "tools", "--", "echo",
                         "ran").stdout == "ran\n"
    finally:
        remove_tree(site)


def test_store_api_names_the_owner_whose_store_root_reads(user, other_user, busybox,
                                                          default_store):
    """The hub (root) reads a user's store as that user's: Store(owner=uid)
    refuses a store planted by someone else."""
    from chspawner.images.store import Store, StoreError
    assert chspawner(other_user, "import", "-q", "-s", str(default_store),
                     str(busybox), "evil").returncode == 0
    with pytest.raises(StoreError, match=f"made by {other_user.pw_name}"):
        Store(default_store, owner=user.pw_uid).images()
    assert Store(default_store, owner=other_user.pw_uid).require("evil")


def test_a_jupyter_server_lists_no_kernels_from_a_planted_store(user, other_user, busybox,
                                                               attacker_store):
    """The kernel picker of the victim's server (ContainerKernelSpecManager)
    offers none of the attacker's images, says why in the log, and still
    offers the native kernels."""
    script = ("import logging, sys\n"
              "from chspawner.provisioner.kernelspecs import ContainerKernelSpecManager\n"
              "logging.basicConfig(level=logging.ERROR)\n"
              "ksm = ContainerKernelSpecManager(storage=sys.argv[1])\n"
              "ksm.log = logging.getLogger('ksm')\n"
              "print(sorted(ksm.find_kernel_specs()))\n")
    python = str(CHSPAWNER.parent / "python")
    result = as_user(user.pw_name, python, "-c", script, str(attacker_store), check=False,
                     timeout=120)
    assert result.returncode == 0, result.stderr
    assert "evil" not in result.stdout
    assert "python3" in result.stdout  # the native kernel stays
    assert "no image kernels: refusing image store" in result.stderr, result.stderr
