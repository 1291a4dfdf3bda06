"""``chspawner import``: bring an image in from a file or directory.

Accepted sources, told apart by their content, not their names:

* a root file system: a directory, or a tarball (.tar, .tar.gz, .tar.xz,
  .tar.zst, .tar.bz2); a tarball holding a single top directory has it
  stripped;
* a ``docker save`` archive (or its unpacked directory);
* an OCI image layout, as a directory or an archive.

Layers are applied in order with OCI whiteouts. Every byte goes through
:class:`~chspawner.images.unpack.ImageWriter`, and digests are checked.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path

from chspawner.images import ImageError, layout
from chspawner.images.progress import ByteCounter, Progress, ProgressCallback, no_progress
from chspawner.images.store import Store, read_metadata, write_in_image, write_metadata
from chspawner.images.streams import StreamError, TapReader, compression_of, decompressed
from chspawner.images.unpack import ImageWriter, UnpackError, default_max_size

# First member names that mark an image archive (docker save, OCI), not a
# root file system.
ARCHIVE_MARKERS = re.compile(
    r"^(\./)?(oci-layout|index\.json|manifest\.json|repositories|blobs(/|$)"
    r"|[0-9a-f]{64}(/|\.json$|\.tar$))")
# A tarball's single top directory is stripped, unless it looks like a
# root file system's own top level.
ROOTFS_TOP = {"bin", "boot", "dev", "etc", "home", "lib", "lib64", "opt", "proc",
              "root", "run", "sbin", "srv", "sys", "tmp", "usr", "var"}


class ImportFailed(ImageError):
    """Import failed; one line, naming the source."""


def import_image(src: str, name: str, store: Store, arch: str | None = None,
                 progress: ProgressCallback = no_progress,
                 max_size: int | None = ImageWriter.UNSET) -> Path:
    """Import ``src`` as image ``name``; return the image's path.

    ``max_size``: the most bytes the image may take unpacked (None: no
    limit; by default ``$CH_IMAGE_MAX_SIZE``); past it, the import fails
    and leaves nothing."""
    path = Path(src)
    if not path.exists():
        raise ImportFailed(f"{src}: no such file or directory")
    kind = source_kind(path)
    source = {"kind": kind, "path": str(path.resolve())}
    with store.new_image(name) as image:
        try:
            if max_size == ImageWriter.UNSET:
                max_size = default_max_size()
            if kind == "directory":
                progress(Progress("unpack", f"copying {src}", 0, None, ""))
                with ImageWriter(str(image), max_size) as writer:
                    writer.add_tree(str(path))
            elif kind == "tarball":
                _unpack_rootfs_tar(path, image, progress, max_size)
            else:
                found, source["kind"] = _apply_layout(path, kind, image, arch, progress,
                                                      max_size)
                source["digest"] = found.digest
            with ImageWriter(str(image), None) as writer:
                writer.finish()
        except (UnpackError, layout.LayoutError) as e:
            raise ImportFailed(f"{src}: {e}") from None
        if kind in ("directory", "tarball"):
            keep_or_write_metadata(image, source)
        else:
            config = found.config
            write_metadata(image, config.get("config") or {}, source,
                           arch=config.get("architecture"), history=config.get("history"))
        progress(Progress("done", f"imported {name}", 1, 1, ""))
    return store.path(name)


def source_kind(path: Path) -> str:
    """directory, tarball (root file systems), oci, docker-archive, or
    archive (an image archive of either kind, told once unpacked)."""
    if path.is_dir():
        if (path / "oci-layout").is_file():
            return "oci"
        if (path / "manifest.json").is_file() and not (path / "etc").exists():
            return "docker-archive"
        return "directory"
    try:
        with open(path, "rb") as f, decompressed(f) as stream, \
                tarfile.open(fileobj=stream, mode="r|") as tar:
            first = next(iter(tar), None)
    except (tarfile.TarError, StreamError, OSError, EOFError) as e:
        raise ImportFailed(f"{path}: not a tar archive or image ({e})") from None
    if first is None:
        raise ImportFailed(f"{path}: empty archive")
    return "archive" if ARCHIVE_MARKERS.match(first.name) else "tarball"


def _unpack_rootfs_tar(path: Path, image: Path, progress: ProgressCallback,
                       max_size: int | None) -> None:
    counter = ByteCounter(progress, "unpack", f"unpacking {path.name}",
                          path.stat().st_size)
    with open(path, "rb") as f, ImageWriter(str(image), max_size) as writer:
        if compression_of(f.read(8)) is None:
            f.seek(0)
            writer.add_tar_file(f, counter.add)
        else:
            f.seek(0)
            with decompressed(TapReader(f, lambda data: counter.add(len(data)))) as stream:
                writer.add_tar(stream)
    counter.finish()
    _strip_single_top(image)


def _strip_single_top(image: Path) -> None:
    """``myimage/{bin,etc,...}`` becomes the image itself."""
    entries = os.listdir(image)
    if len(entries) != 1 or entries[0] in ROOTFS_TOP:
        return
    top = image / entries[0]
    if top.is_symlink() or not top.is_dir():
        return
    moved = image.parent / "top"
    os.rename(top, moved)
    os.rmdir(image)
    os.rename(moved, image)
    image.chmod(0o700)


def _apply_layout(path: Path, kind: str, image: Path, arch: str | None,
                  progress: ProgressCallback,
                  max_size: int | None) -> tuple[layout.Found, str]:
    """Apply a docker save or OCI image's layers; return what was found and
    which kind it was. An archive is unpacked first (through the same safe
    writer) into the import's scratch space."""
    root = path
    if kind == "archive":
        root = image.parent / "archive"
        root.mkdir(mode=0o700)
        progress(Progress("unpack", f"reading {path.name}", 0, None, ""))
        with open(path, "rb") as f, decompressed(f) as stream, \
                ImageWriter(str(root), max_size) as writer:
            writer.add_tar(stream)
        kind = "oci" if (root / "oci-layout").is_file() else "docker-archive"
    found = (layout.read_oci(root, arch) if kind == "oci"
             else layout.read_docker_save(root))
    counter = ByteCounter(progress, "unpack", f"applying {len(found.layers)} layers",
                          sum(layer.size for layer in found.layers))
    with ImageWriter(str(image), max_size) as writer:
        for layer in found.layers:
            layer.apply(writer, counter.add)
    counter.finish()
    return found, kind


def keep_or_write_metadata(image: Path, source: dict) -> None:
    """A root file system carries no config; keep a Charliecloud image's own
    ch/metadata.json and ch/environment if it has them, noting the source."""
    existing = read_metadata(image)
    if existing:
        existing["source"] = source
        write_in_image(image, "ch/metadata.json", json.dumps(existing, indent=2) + "\n")
    else:
        has_env = (image / "ch" / "environment").is_file()
        write_metadata(image, {}, source, environment=not has_env)
