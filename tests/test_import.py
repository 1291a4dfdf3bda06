"""``chspawner import``: every source form, and a corpus of malicious
tarballs that must give a clear error or a sanitized image while writing
nothing outside the store."""
from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import tarfile
import time

import pytest

from chspawner.images.unpack import UnpackError, contained_link_target, member_path
from tests.harness.env import AS_USER, CHSPAWNER
from tests.harness.registry import (export_docker_archive, export_oci_archive,
                                    export_oci_layout)
from tests.harness.users import as_user
from tests.harness.wait import wait_until


class Images:
    """``chspawner import|images|run`` as the test user, on a private store."""

    def __init__(self, user, store):
        self.user, self.store = user, store

    def cli(self, *args, check=False, **kwargs) -> subprocess.CompletedProcess:
        result = as_user(self.user.pw_name, str(CHSPAWNER), *args, check=False,
                         timeout=300, **kwargs)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def import_(self, src, name="x", check=False):
        return self.cli("import", "-q", "-s", str(self.store), str(src), name,
                        check=check)

    def image(self, name="x"):
        return self.store / "img" / name.replace("/", "%").replace(":", "+")

    def leftovers(self):
        """Anything an import left behind besides finished images."""
        tmp = self.store / "tmp"
        return sorted(os.listdir(tmp)) if tmp.exists() else []


@pytest.fixture
def images(user, user_dir):
    store = user_dir / "store"
    as_user(user.pw_name, "mkdir", str(store))
    return Images(user, store)


@pytest.fixture
def outside(user, user_dir):
    """A directory beside the store that no import may touch."""
    path = user_dir / "outside"
    as_user(user.pw_name, "mkdir", str(path))
    return path


def make_tar(path, entries, compression=""):
    """entries: (name, type, content-or-target, mode) tuples."""
    with tarfile.open(path, f"w:{compression}", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, value, mode in entries:
            info = tarfile.TarInfo(name)
            info.mode = mode
            info.mtime = 1_600_000_000
            data = None
            if kind == "file":
                data = value.encode()
                info.size = len(data)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, value
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, value
            elif kind in ("chr", "blk", "fifo"):
                info.type = {"chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
                             "fifo": tarfile.FIFOTYPE}[kind]
                info.devmajor, info.devminor = 1, 3
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    os.chmod(path, 0o644)
    return path


BASE = [("bin", "dir", None, 0o755), ("bin/hello", "file", "#!/bin/sh\necho hi\n", 0o755),
        ("etc", "dir", None, 0o755), ("etc/passwd", "file", "root:x:0:0::/:/bin/sh\n", 0o644)]


# ------------------------------------------------------------- sources ----

@pytest.mark.parametrize("compression", ["", "gz", "xz", "bz2"])
def test_tarball_forms(images, user_dir, compression):
    tar = make_tar(user_dir / f"rootfs.tar.{compression}", BASE, compression)
    images.import_(tar, check=True)
    image = images.image()
    assert (image / "bin/hello").read_text() == "#!/bin/sh\necho hi\n"
    for d in ("dev", "proc", "sys", "tmp", "home"):
        assert (image / d).is_dir()
    for f in ("etc/passwd", "etc/group", "etc/hosts", "etc/resolv.conf"):
        assert (image / f).is_file()
    assert stat.S_IMODE((image / "tmp").stat().st_mode) == 0o1777
    assert (image / "bin/hello").stat().st_mtime == 1_600_000_000
    assert images.leftovers() == []


def test_zstd_tarball(images, user_dir):
    plain = make_tar(user_dir / "rootfs.tar", BASE)
    subprocess.run(["zstd", "-q", str(plain), "-o", str(user_dir / "rootfs.tar.zst")],
                   check=True)
    os.chmod(user_dir / "rootfs.tar.zst", 0o644)
    images.import_(user_dir / "rootfs.tar.zst", check=True)
    assert (images.image() / "bin/hello").exists()


def test_single_top_directory_is_stripped(images, user_dir):
    tar = make_tar(user_dir / "r.tar",
                   [("myimage", "dir", None, 0o755)]
                   + [(f"myimage/{n}", k, v, m) for n, k, v, m in BASE])
    images.import_(tar, check=True)
    assert (images.image() / "bin/hello").is_file()
    assert not (images.image() / "myimage").exists()


def test_directory_source(images, busybox):
    images.import_(busybox, "bb", check=True)
    assert (images.image("bb") / "bin/busybox").is_file()
    out = images.cli("run", "-s", str(images.store), "bb", "--", "echo", "ran",
                     check=True).stdout
    assert out == "ran\n"


def test_store_listing_inspect_path_rm(images, user_dir, busybox):
    images.import_(busybox, "example.com/tools:1.0", check=True)
    listing = images.cli("images", "-s", str(images.store), check=True).stdout
    assert "example.com/tools:1.0" in listing and "MiB" in listing
    meta = json.loads(images.cli("images", "inspect", "-s", str(images.store),
                                 "example.com/tools:1.0", check=True).stdout)
    assert meta["source"]["kind"] == "directory"
    path = images.cli("images", "path", "-s", str(images.store),
                      "example.com/tools:1.0", check=True).stdout.strip()
    assert path == str(images.image("example.com/tools:1.0"))
    # ch-run finds it by name too: the layout is Charliecloud's.
    ch = as_user(images.user.pw_name, "ch-run", "-s", str(images.store),
                 "example.com/tools:1.0", "--", "true", check=False)
    assert ch.returncode == 0, ch.stderr
    images.cli("images", "rm", "-s", str(images.store), "example.com/tools:1.0",
               check=True)
    assert not images.image("example.com/tools:1.0").exists()
    result = images.cli("images", "rm", "-s", str(images.store), "example.com/tools:1.0")
    assert result.returncode == 1 and "no image" in result.stderr


def test_reimport_replaces(images, user_dir):
    images.import_(make_tar(user_dir / "a.tar", BASE), check=True)
    images.import_(make_tar(user_dir / "b.tar", BASE + [("new", "file", "2", 0o644)]),
                   check=True)
    assert (images.image() / "new").read_text() == "2"
    assert images.leftovers() == []


@pytest.mark.parametrize("name", ["../x", "a/../b", "/abs", "", "a//b", "x%y"])
def test_bad_image_names(images, user_dir, name):
    result = images.import_(make_tar(user_dir / "r.tar", BASE), name)
    assert result.returncode == 1
    assert "invalid image name" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (images.store / "img").exists() or os.listdir(images.store / "img") == []


# ---------------------------------------------------- malicious corpus ----

def assert_refused(images, result, outside, *words):
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1, line
    for word in words:
        assert word in line, line
    assert not images.image().exists()
    assert images.leftovers() == []
    assert os.listdir(outside) == []


@pytest.mark.parametrize("entries, words", [
    ([("../evil", "file", "x", 0o644)], ["../evil", "'..'"]),
    ([("a/../../evil", "file", "x", 0o644)], ["'..'"]),
    ([("/tmp/evil", "file", "x", 0o644)], ["/tmp/evil", "absolute"]),
    ([("h", "hardlink", "../../etc/passwd", 0o644)], ["h", "hard link"]),
    ([("h", "hardlink", "/etc/passwd", 0o644)], ["h", "hard link"]),
    ([("h", "hardlink", "nothere", 0o644)], ["h", "not in the image"]),
])
def test_escaping_names_are_refused(images, user_dir, outside, entries, words):
    tar = make_tar(user_dir / "evil.tar", BASE + entries)
    assert_refused(images, images.import_(tar), outside, *words)


@pytest.mark.parametrize("kind", ["absolute", "relative", "root"])
def test_no_entry_beneath_a_symlink(images, user_dir, outside, kind):
    """A symlink, then a file through it: the classic escape."""
    target = {"absolute": str(outside),
              "relative": "../" * 12 + str(outside).lstrip("/"),
              "root": "."}[kind]
    tar = make_tar(user_dir / "evil.tar", BASE + [("link", "symlink", target, 0o777),
                                                  ("link/evil", "file", "x", 0o644)])
    assert_refused(images, images.import_(tar), outside, "link/evil", "symlink")


def test_links_leaving_the_image_are_rewritten(images, user_dir, outside):
    tar = make_tar(user_dir / "links.tar", BASE + [
        ("abs", "symlink", "/etc/passwd", 0o777),
        ("bin/up", "symlink", "../../../../etc", 0o777),
        ("bin/fine", "symlink", "hello", 0o777),
        ("bin/sibling", "symlink", "../etc/passwd", 0o777),
    ])
    images.import_(tar, check=True)
    image = images.image()
    assert os.readlink(image / "abs") == "etc/passwd"
    assert os.readlink(image / "bin/up") == "../etc"
    assert os.readlink(image / "bin/fine") == "hello"          # untouched
    assert os.readlink(image / "bin/sibling") == "../etc/passwd"  # untouched
    assert (image / "abs").resolve() == (image / "etc/passwd").resolve()


def test_devices_fifos_skipped_setid_stripped(images, user_dir, user):
    tar = make_tar(user_dir / "odd.tar", BASE + [
        ("dev", "dir", None, 0o755),
        ("dev/null", "chr", None, 0o666), ("dev/sda", "blk", None, 0o660),
        ("fifo", "fifo", None, 0o644),
        ("bin/su", "file", "x", 0o4755), ("bin/wall", "file", "x", 0o2755),
        ("locked", "dir", None, 0o000), ("locked/f", "file", "x", 0o000),
    ])
    images.import_(tar, check=True)
    image = images.image()
    assert os.listdir(image / "dev") == []
    assert not (image / "fifo").exists()
    assert stat.S_IMODE((image / "bin/su").stat().st_mode) == 0o755
    assert stat.S_IMODE((image / "bin/wall").stat().st_mode) == 0o755
    assert stat.S_IMODE((image / "locked").stat().st_mode) == 0o700  # u+rwX
    assert stat.S_IMODE((image / "locked/f").stat().st_mode) == 0o600
    for path in image.rglob("*"):
        assert path.lstat().st_uid == user.pw_uid


def test_huge_names(images, user_dir, outside):
    tar = make_tar(user_dir / "long.tar", BASE + [("d/" + "x" * 300, "file", "x", 0o644)])
    result = images.import_(tar)
    assert_refused(images, result, outside, "too long")
    assert len(result.stderr) < 400  # the name is shortened in the message


def test_very_deep_paths_stay_inside(images, user_dir, outside):
    """Deeper than PATH_MAX: unpacked one directory at a time, inside."""
    deep = "/".join(["deep"] * 1100) + "/f"
    images.import_(make_tar(user_dir / "deep.tar", BASE + [(deep, "file", "x", 0o644)]),
                   check=True)
    assert os.listdir(outside) == []
    fd = os.open(images.image(), os.O_RDONLY)
    try:
        for _ in range(1100):
            fd2 = os.open("deep", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = fd2
        assert os.stat("f", dir_fd=fd).st_size == 1
    finally:
        os.close(fd)


def test_not_an_archive(images, user_dir, outside):
    junk = user_dir / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b" + os.urandom(2000))
    junk.chmod(0o644)
    result = images.import_(junk)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert images.leftovers() == [] and not images.image().exists()


def test_truncated_archive(images, user_dir, outside):
    full = make_tar(user_dir / "full.tar", BASE + [("big", "file", "y" * 100_000, 0o644)])
    cut = user_dir / "cut.tar"
    cut.write_bytes(full.read_bytes()[:60_000])
    cut.chmod(0o644)
    assert_refused(images, images.import_(cut), outside, "cut.tar")


# -------------------------------------------------------- interruption ----

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_import_leaves_nothing(images, user_dir, bookworm, sig):
    """Stop an import midway: no image, no partial directory (a SIGKILLed
    one is swept by the next store operation)."""
    tar = user_dir / "big.tar"
    subprocess.run(["tar", "-C", str(bookworm), "-cf", str(tar), "."], check=True)
    tar.chmod(0o644)
    proc = subprocess.Popen([str(AS_USER), images.user.pw_name, str(CHSPAWNER), "import",
                             "-q", "-s", str(images.store), str(tar), "big"],
                            stderr=subprocess.PIPE, text=True)
    try:
        # Midway: the import's scratch image holds some files already.
        def started():
            tmp = images.store / "tmp"
            return tmp.exists() and any(
                len(os.listdir(tmp / d / "image")) > 3 for d in os.listdir(tmp)
                if (tmp / d / "image").is_dir())
        wait_until(started, "the import to start writing", every=0.01)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0
    assert not images.image("big").exists()
    if sig != signal.SIGKILL:
        assert images.leftovers() == []
    images.cli("images", "-s", str(images.store), check=True)  # any store operation
    images.import_(make_tar(user_dir / "small.tar", BASE), "small", check=True)
    assert images.leftovers() == []


# ---------------------------------------------------------------- units ---

@pytest.mark.unit
def test_member_path_rules():
    assert member_path("./usr/bin/") == "usr/bin"
    assert member_path(".") == ""
    for bad in ("/etc", "../x", "a/../../b", "a/.."):
        with pytest.raises(UnpackError):
            member_path(bad)


@pytest.mark.unit
@pytest.mark.parametrize("link, target, expected", [
    ("abs", "/etc/passwd", "etc/passwd"),
    ("usr/bin/python3", "/usr/bin/python3.11", "python3.11"),
    ("usr/lib/x", "/", "../.."),
    ("a/b", "../../../../etc", "../etc"),
    ("a/b", "../c", None),
    ("a/b", "c/../../d", None),
    ("x", "y", None),
])
def test_link_rewriting(link, target, expected):
    assert contained_link_target(link, target) == expected


# ------------------------------------------- image archives and layouts ----

@pytest.mark.parametrize("form", ["oci-dir", "oci-archive", "docker-archive"])
def test_image_layouts_and_archives(images, user, user_dir, test_images, form):
    """Layers applied in order, whiteouts included, config kept: the
    multi-layer test image, in each form skopeo writes it."""
    image = test_images.multi
    src = user_dir / form
    if form == "oci-dir":
        export_oci_layout(image, src, owner=user)
    elif form == "oci-archive":
        export_oci_archive(image, src, owner=user)
    else:
        export_docker_archive(image, src, owner=user)
    images.import_(src, "multi", check=True)
    root = images.image("multi")
    for path, content in image.files.items():
        assert (root / path.lstrip("/")).read_text() == content, path
    for path in image.absent:
        assert not (root / path.lstrip("/")).exists(), path
    meta = json.loads(images.cli("images", "inspect", "-s", str(images.store), "multi",
                                 check=True).stdout)
    assert meta["cwd"] == "/data" and meta["env"]["GREETING"] == "hello"
    assert meta["source"]["kind"] in ("oci", "docker-archive")
    assert images.cli("run", "-s", str(images.store), "multi",
                      check=True).stdout == image.cmd_output
    assert images.leftovers() == []


def test_multi_arch_oci_layout(images, user, user_dir, test_images):
    src = user_dir / "layout"
    export_oci_layout(test_images.multiarch, src, owner=user)
    images.import_(src, "native", check=True)
    assert (images.image("native") / "arch.txt").read_text() == "amd64\n"
    images.cli("import", "-q", "-s", str(images.store), "--arch", "arm64", str(src),
               "arm", check=True)
    assert (images.image("arm") / "arch.txt").read_text() == "arm64\n"


def test_corrupted_layer_in_a_layout_is_refused(images, user, user_dir, test_images,
                                                outside):
    src = user_dir / "layout"
    export_oci_layout(test_images.one, src, owner=user)
    blobs = src / "blobs" / "sha256"
    layer = max(blobs.iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(layer.read_bytes())
    data[-100] ^= 0xFF  # inside the gzip stream's tail: still decodes or not,
    layer.write_bytes(bytes(data))  # the digest no longer matches either way
    assert_refused(images, images.import_(src), outside)


def test_sparse_files_keep_their_holes(images, user_dir):
    """GNU tar's sparse members, through the kernel-side copy path."""
    rootfs = user_dir / "sparse-root"
    rootfs.mkdir()
    sparse = rootfs / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(64 << 20)
        f.seek(40 << 20)
        f.write(b"data in the middle")
    tar = user_dir / "sparse.tar"
    subprocess.run(["tar", "-S", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
    tar.chmod(0o644)
    images.import_(tar, check=True)
    copy = images.image() / "sparse.img"
    assert copy.stat().st_size == 64 << 20
    with open(copy, "rb") as f:
        f.seek(40 << 20)
        assert f.read(18) == b"data in the middle"
        f.seek(0)
        assert f.read(4096) == bytes(4096)
    assert copy.stat().st_blocks * 512 < 1 << 20  # still sparse


# ----------------------------------------------------------- size limit ----

class Zeros(io.RawIOBase):
    """``size`` zero bytes, read in chunks (never all in memory)."""

    def __init__(self, size):
        self.left = size

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def gzip_bomb(path, files=(), big=128 << 20):
    """A small .tar.gz that unpacks to ``big`` bytes of zeros (plus
    ``files``, a list of (name, size))."""
    with tarfile.open(path, "w:gz", compresslevel=9) as tar:
        for name, size in [*files, ("big", big)]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = size, 0o644
            tar.addfile(info, io.BufferedReader(Zeros(size)))
    os.chmod(path, 0o644)
    return path


@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_gzip_bomb_stops_at_the_size_limit(images, user_dir, outside, how):
    """128 MiB of zeros in a ~130 KB tarball, 32 MiB allowed: refused as
    soon as the big member's header is read, nothing left behind."""
    bomb = gzip_bomb(user_dir / "bomb.tar.gz", files=[("small", 1000)])
    assert bomb.stat().st_size < 1 << 20
    args = ["import", "-q", "-s", str(images.store), str(bomb), "x"]
    start = time.monotonic()
    if how == "option":
        result = images.cli(*args[:1], "--max-size=32M", *args[1:])
    else:
        result = as_user(images.user.pw_name, "env", "CH_IMAGE_MAX_SIZE=32M",
                         str(CHSPAWNER), *args, check=False, timeout=300)
    elapsed = time.monotonic() - start
    assert_refused(images, result, outside, "big: image larger than the size limit of 32M")
    assert elapsed < 30, elapsed


def test_a_flood_of_empty_files_counts_too(images, user_dir, outside):
    """Each entry counts 512 bytes: 10000 empty files pass no 1M limit."""
    path = user_dir / "flood.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for i in range(10_000):
            tar.addfile(tarfile.TarInfo(f"f{i}"))
    os.chmod(path, 0o644)
    assert_refused(images, images.cli("import", "-q", "--max-size=1M", "-s",
                                      str(images.store), str(path), "x"),
                   outside, "image larger than the size limit of 1M")


def test_an_image_within_the_limit_imports(images, user_dir):
    bomb = gzip_bomb(user_dir / "ok.tar.gz", big=4 << 20)
    images.cli("import", "-q", "--max-size=5M", "-s", str(images.store), str(bomb), "x",
               check=True)
    assert (images.image() / "big").stat().st_size == 4 << 20


def test_the_size_limit_covers_image_layers(images, user, user_dir, test_images,
                                            outside):
    src = user_dir / "layout"
    export_oci_layout(test_images.one, src, owner=user)
    assert_refused(images, images.cli("import", "-q", "--max-size=2K", "-s",
                                      str(images.store), str(src), "x"),
                   outside, "image larger than the size limit of 2K")


def test_the_size_limit_covers_pulls(images, registry, test_images, outside):
    result = images.cli("pull", "-q", "--insecure", "--max-size=2K", "-s",
                        str(images.store), test_images.one.at(registry), "x")
    assert_refused(images, result, outside, "image larger than the size limit of 2K")


@pytest.mark.parametrize("option, env, code, words", [
    (["--max-size=lots"], {}, 64, "argument --max-size: invalid size 'lots'"),
    (["--max-size=0"], {}, 64, "must be more than 0"),
    ([], {"CH_IMAGE_MAX_SIZE": "10X"}, 1, "CH_IMAGE_MAX_SIZE: invalid size '10X'"),
])
def test_bad_size_limits(images, user_dir, option, env, code, words):
    tar = make_tar(user_dir / "rootfs.tar", BASE)
    extra = [f"{k}={v}" for k, v in env.items()]
    result = as_user(images.user.pw_name, "env", *extra, str(CHSPAWNER), "import", "-q",
                     *option, "-s", str(images.store), str(tar), "x", check=False)
    assert result.returncode == code, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr
    assert not images.image().exists()
