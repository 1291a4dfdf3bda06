"""Image records (chspawner.images.records): what listings show, measured
once at import, pull and refresh, so that listing images and kernels (and
rendering the spawn form) reads a few small files per image and never
walks an image's tree; a missing, old, unreadable or untrusted record is
measured from the image instead, with a log line, never a crash.

The images are real: tiny root file systems brought in by the project's
importer, some carrying a kernelspec."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from chspawner.images import records
from chspawner.images.importer import import_image
from chspawner.images.records import RECORD_DIR, RECORD_NAME
from chspawner.images.store import Store
from chspawner.images.trees import disk_usage
from chspawner.provisioner.kernelspecs import ContainerKernelSpecManager
from chspawner.spawners import ChSpawner
from tests.harness.env import CHSPAWNER, TEST_USER

IMAGES = 30
KERNEL = {"argv": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          "display_name": "Python 3", "language": "python"}


def tiny_tar(path: Path, kernel: bool, label: str = "") -> Path:
    """A root file system tarball: a few files, and a kernelspec if asked."""
    members = {"etc/hostname": "tiny\n", "bin/hello": "#!/bin/sh\necho hi\n"}
    if kernel:
        members["usr/share/jupyter/kernels/python3/kernel.json"] = json.dumps(KERNEL)
        members["opt/conda/share/jupyter/kernels/ir/kernel.json"] = json.dumps(
            {**KERNEL, "display_name": "R", "language": "R"})
    if label:  # a Charliecloud image's own metadata, kept by the import
        members["ch/metadata.json"] = json.dumps(
            {"labels": {"org.opencontainers.image.description": label}})
    with tarfile.open(path, "w") as tar:
        for name, text in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(text.encode()))
    return path


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """A store of IMAGES images, every other one with two kernels."""
    work = tmp_path_factory.mktemp("records")
    store = Store(work / "store")
    with_kernel, without = tiny_tar(work / "k.tar", True), tiny_tar(work / "n.tar", False)
    for i in range(IMAGES):
        import_image(str(with_kernel if i % 2 == 0 else without), f"img{i:02}", store)
    return store.root


class Counter:
    """Every file-system look a listing takes, as (kind, path): opens,
    directory reads (Python's audit events) and stat/lstat (wrapped)."""

    def __init__(self, monkeypatch):
        self.events: list[tuple[str, str]] = []
        self.on = False
        sys.addaudithook(self._audit)  # (can't be removed: switched off after)
        for name in ("stat", "lstat"):
            real = getattr(os, name)

            def counted(path, *args, _real=real, _name=name, **kwargs):
                self._note(_name, path)
                return _real(path, *args, **kwargs)
            monkeypatch.setattr(os, name, counted)

    def _audit(self, event: str, args: tuple) -> None:
        if self.on and event in ("open", "os.scandir", "os.listdir", "os.walk"):
            self._note(event, args[0] if args else None)

    def _note(self, kind: str, path) -> None:
        if self.on and path is not None and not isinstance(path, int):
            self.events.append((kind, os.fsdecode(os.fspath(path))))

    def __enter__(self) -> Counter:
        self.events.clear()
        self.on = True
        return self

    def __exit__(self, *exc) -> None:
        self.on = False

    def inside_images(self, store: Path) -> list[tuple[str, str]]:
        """Looks inside an image's tree other than at its record: an image
        directory itself, its ch/ and its record are fine; so are the
        relative names the record reader opens step by step."""
        img = f"{store}/img/"
        allowed_relative = {RECORD_DIR, RECORD_NAME}
        bad = []
        for kind, path in self.events:
            if not path.startswith("/"):
                if path not in allowed_relative:
                    bad.append((kind, path))
                continue
            if not path.startswith(img):
                continue
            parts = path[len(img):].split("/")
            if parts[1:] not in ([], [RECORD_DIR], [RECORD_DIR, RECORD_NAME]):
                bad.append((kind, path))
        return bad

    def opens(self) -> int:
        return sum(1 for kind, _path in self.events if kind == "open")


@pytest.fixture
def counter(monkeypatch):
    return Counter(monkeypatch)


def form_of(store_root: Path) -> str:
    """The spawn form a user whose own store is ``store_root`` gets."""
    spawner = ChSpawner(images=[{"name": "site", "description": "the site's"}],
                        allow_user_images=True, user_storage=str(store_root))
    spawner.user = SimpleNamespace(name=TEST_USER, groups=[])
    return spawner.render_options_form()


def test_listing_kernels_and_the_form_read_records_only(many, counter):
    ksm = ContainerKernelSpecManager(storage=str(many))
    ksm.include_native = False
    listings = {
        "images": lambda: Store(many).images(),
        "get_all_specs": ksm.get_all_specs,
        "find_kernel_specs": ksm.find_kernel_specs,
        "get_kernel_spec": lambda: ksm.get_kernel_spec("chspawner-img04--python3"),
        "form": lambda: form_of(many),
    }
    for what, listing in listings.items():
        with counter:
            result = listing()
        assert counter.inside_images(many) == [], what
        # Per image: its directory, ch/ and record opened, and only if the
        # record changed since this reader last read it; plus a few for the
        # store itself (img/, tmp/, the trust checks).
        assert counter.opens() <= 3 * IMAGES + 10, (what, counter.opens())
        assert result, what
    specs = ksm.get_all_specs()
    assert len(specs) == IMAGES  # two kernels in every other image
    assert specs["chspawner-img00--ir"]["spec"]["display_name"] == "R — image img00"
    assert specs["chspawner-img00--python3"]["resource_dir"] == \
        str(many / "img/img00/usr/share/jupyter/kernels/python3")
    # A reader that keeps its Store reads an unchanged record once.
    with counter:
        ksm.get_all_specs()
    assert counter.opens() <= 10, counter.events
    assert "img29" in form_of(many)
    # A server for one image (kernels mode) reads that image's record only.
    one = ContainerKernelSpecManager(storage=str(many), only_images=["img04"])
    with counter:
        assert sorted(one.get_all_specs()) == ["chspawner-img04--ir",
                                             "chspawner-img04--python3"]
    assert counter.inside_images(many) == []
    assert counter.opens() <= 3 + 10, counter.events


def test_the_record_matches_the_image_after_import(tmp_path):
    store = Store(tmp_path / "store")
    path = import_image(str(tiny_tar(tmp_path / "k.tar", True, label="A tiny one")),
                        "tiny", store)
    record = records.read(path, None)
    record_file = path / RECORD_DIR / RECORD_NAME
    assert record.size == disk_usage(str(path)) - os.lstat(record_file).st_blocks * 512
    assert {k.dir: k.spec for k in record.kernels} == {
        "usr/share/jupyter/kernels/python3": KERNEL,
        "opt/conda/share/jupyter/kernels/ir": {**KERNEL, "display_name": "R",
                                              "language": "R"}}
    assert record.description == "A tiny one"
    [info] = store.images()
    assert (info.size, info.source, info.description) == \
        (record.size, str(tmp_path / "k.tar"), "A tiny one")
    assert os.stat(record_file).st_mode & 0o777 == 0o644


def test_refresh_records_what_was_changed_by_hand(tmp_path):
    store = Store(tmp_path / "store")
    path = import_image(str(tiny_tar(tmp_path / "n.tar", False)), "tiny", store)
    kernel_dir = path / "usr/local/share/jupyter/kernels/julia"
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(json.dumps({**KERNEL, "display_name": "J"}))
    (path / "big").write_bytes(b"x" * 200_000)
    ksm = ContainerKernelSpecManager(storage=str(store.root), include_native=False)
    assert ksm.find_kernel_specs() == {}  # the record is what is listed
    out = subprocess.run([str(CHSPAWNER), "images", "refresh", "-s", str(store.root)],
                         capture_output=True, text=True, check=True).stdout
    assert out == "recorded tiny\n"
    assert list(ksm.find_kernel_specs()) == ["chspawner-tiny--julia"]
    [info] = Store(store.root).images()
    assert info.size >= 200_000
    result = subprocess.run([str(CHSPAWNER), "images", "refresh", "-s", str(store.root),
                             "nope"], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "no image nope" in result.stderr


@pytest.mark.parametrize("damage", ["missing", "garbage", "old", "symlink", "open"])
def test_a_record_not_to_believe_is_measured_once_with_a_log_line(tmp_path, damage,
                                                                  caplog):
    store = Store(tmp_path / "store")
    path = import_image(str(tiny_tar(tmp_path / "k.tar", True)), "tiny", store)
    record_file = path / RECORD_DIR / RECORD_NAME
    planted = {**records.read(path, None).to_json(), "kernels": []}
    if damage == "missing":
        record_file.unlink()
    elif damage == "garbage":
        record_file.write_text("{not json")
    elif damage == "old":
        record_file.write_text(json.dumps({**planted, "version": 0}))
    elif damage == "symlink":  # pointing at a record that lists no kernels
        (tmp_path / "elsewhere.json").write_text(json.dumps(planted))
        record_file.unlink()
        record_file.symlink_to(tmp_path / "elsewhere.json")
    elif damage == "open":  # one anyone could have rewritten
        record_file.write_text(json.dumps(planted))
        record_file.chmod(0o666)
    ksm = ContainerKernelSpecManager(storage=str(store.root), include_native=False)
    with caplog.at_level(logging.WARNING, logger="chspawner.images"):
        assert sorted(ksm.find_kernel_specs()) == ["chspawner-tiny--ir",
                                                   "chspawner-tiny--python3"]
        assert sorted(ksm.find_kernel_specs()) == ["chspawner-tiny--ir",
                                                   "chspawner-tiny--python3"]
    said = [r.getMessage() for r in caplog.records if "no record to believe" in r.getMessage()]
    assert len(said) == 1 and "chspawner images refresh" in said[0], said
    if damage == "open":  # never written over: it stays refused
        assert record_file.stat().st_mode & 0o777 == 0o666
    else:  # the owner (here root) listing its own image records it again
        assert not record_file.is_symlink()
        assert len(records.read(path, None).kernels) == 2


def test_a_record_another_user_wrote_is_not_believed(tmp_path, user, other_user):
    """Read for a user (as the hub reads a user's store), a record that
    belongs to somebody else is measured from the image instead."""
    store = Store(tmp_path / "store")
    path = import_image(str(tiny_tar(tmp_path / "k.tar", True)), "tiny", store)
    record_file = path / RECORD_DIR / RECORD_NAME
    record_file.write_text(json.dumps({**records.read(path, None).to_json(),
                                       "kernels": [], "size": 1}))
    os.chown(record_file, other_user.pw_uid, other_user.pw_gid)
    [info] = Store(store.root, owner=user.pw_uid).images()
    assert info.size > 1 and len(info.kernels) == 2
    assert record_file.stat().st_uid == other_user.pw_uid  # left as it was


def test_the_record_matches_the_image_after_a_pull(puller, registry, test_images):
    """Pulled by the user from a real registry: recorded as it lands."""
    image = test_images.one
    ref = image.at(registry)
    puller.pull(ref, "one", check=True)
    path = puller.image("one")
    record = records.read(path, {puller.user.pw_uid})
    record_file = path / RECORD_DIR / RECORD_NAME
    assert record_file.stat().st_uid == puller.user.pw_uid
    assert record.size == disk_usage(str(path)) - os.lstat(record_file).st_blocks * 512
    assert (record.source, record.kernels) == (ref, ())
    listed = puller.cli("images", "-s", str(puller.store), check=True).stdout
    assert "one  " in listed and ref in listed


def test_the_form_describes_a_users_image_by_its_recorded_label(tmp_path):
    store = Store(tmp_path / "store")
    import_image(str(tiny_tar(tmp_path / "a.tar", False, label="Climate tools")), "climate",
                 store)
    import_image(str(tiny_tar(tmp_path / "b.tar", False)), "plain", store)
    form = form_of(store.root)
    assert "your image: Climate tools" in form
    assert f"your image, from {tmp_path / 'b.tar'}" in form
