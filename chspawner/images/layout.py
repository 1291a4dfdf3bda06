"""Reading image layouts: OCI image layouts, ``docker save`` archives, and
the manifests and indexes registries serve.

What comes out is the image's config and its layers, in order, each a blob
file with the digest it must have. Applying a layer streams it through the
safe writer and checks the digest on the way.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chspawner.images import ImageError
from chspawner.images.streams import Sha256Tap, StreamError, TapReader, decompressed
from chspawner.images.unpack import ImageWriter

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

# uname -m -> the architecture names images use (Go's GOARCH).
ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le",
          "s390x": "s390x", "i686": "386", "armv7l": "arm", "riscv64": "riscv64"}


class LayoutError(ImageError):
    """A layout or manifest is missing, malformed or fails its digest."""


def host_arch() -> str:
    machine = os.uname().machine
    return ARCHES.get(machine, machine)


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise LayoutError(f"unsupported or malformed digest {str(digest)[:80]!r}")
    return digest


@dataclass
class Layer:
    """A layer blob on disk and the digests it must match: ``digest`` of the
    blob as stored, ``diff_id`` of its decompressed tar (None: unchecked)."""

    path: Path
    size: int
    digest: str | None = None
    diff_id: str | None = None

    def apply(self, writer: ImageWriter, count: Callable[[int], None]) -> None:
        blob_hash, tar_hash = Sha256Tap(), Sha256Tap()
        taps = [lambda data: count(len(data))] + ([blob_hash] if self.digest else [])
        try:
            with open(self.path, "rb") as f:
                raw = TapReader(f, *taps)
                with decompressed(raw) as stream:
                    tar = TapReader(stream, tar_hash) if self.diff_id else stream
                    writer.add_tar(tar, layer=True)
                    if self.diff_id:
                        tar.drain()
                raw.drain()
        except StreamError as e:
            raise LayoutError(f"layer {self.digest or self.path.name}: {e}") from None
        if self.digest and blob_hash.digest != self.digest:
            raise LayoutError(f"layer {self.digest}: digest mismatch "
                              f"(got {blob_hash.digest})")
        if self.diff_id and tar_hash.digest != self.diff_id:
            raise LayoutError(f"layer {self.path.name}: content doesn't match the "
                              f"config's diff_id {self.diff_id}")


@dataclass
class Found:
    """An image located in a layout: config, layers, manifest digest."""

    config: dict
    layers: list[Layer]
    digest: str | None


def pick_platform(index: dict, arch: str | None, where: str) -> dict:
    """The manifest descriptor for linux/``arch`` in an index."""
    arch = arch or host_arch()
    manifests = index.get("manifests") or []
    offered = []
    for m in manifests:
        platform = m.get("platform") or {}
        offered.append(f"{platform.get('os', '?')}/{platform.get('architecture', '?')}")
        if platform.get("architecture") == arch and platform.get("os", "linux") == "linux":
            return m
    if len(manifests) == 1 and not manifests[0].get("platform"):
        return manifests[0]
    raise LayoutError(f"{where}: no image for linux/{arch} (offered: "
                      f"{', '.join(offered) or 'none'}); choose one with --arch")


def load_json(data: bytes, what: str) -> dict:
    try:
        value = json.loads(data)
    except ValueError as e:
        raise LayoutError(f"{what}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise LayoutError(f"{what}: expected a JSON object")
    return value


# ---------------------------------------------------------- OCI layouts ----

def _blob(root: Path, digest: str) -> Path:
    path = root / "blobs" / "sha256" / check_digest(digest).split(":", 1)[1]
    if not path.is_file() or path.is_symlink():
        raise LayoutError(f"blob {digest} missing from the layout")
    return path


def _verified_json(root: Path, digest: str, what: str) -> dict:
    data = _blob(root, digest).read_bytes()
    hasher = Sha256Tap()
    hasher(data)
    if hasher.digest != digest:
        raise LayoutError(f"{what} {digest}: digest mismatch (got {hasher.digest})")
    return load_json(data, f"{what} {digest}")


def read_oci(root: Path, arch: str | None) -> Found:
    """The image in an OCI layout (its only one, or linux/``arch``)."""
    index_path = root / "index.json"
    if not index_path.is_file():
        raise LayoutError("OCI layout without index.json")
    node = load_json(index_path.read_bytes(), "index.json")
    digest = None
    for _depth in range(4):  # an index may point at an index (multi-arch)
        if node.get("mediaType") in MANIFEST_TYPES or "layers" in node:
            break
        descriptor = pick_platform(node, arch, "OCI layout")
        digest = check_digest(descriptor.get("digest"))
        node = _verified_json(root, digest, "manifest")
    else:
        raise LayoutError("OCI layout: indexes nested too deep")
    config = _verified_json(root, node.get("config", {}).get("digest"), "config")
    layers = [Layer(_blob(root, d["digest"]), int(d.get("size") or 0), d["digest"])
              for d in node.get("layers") or []]
    return Found(config, layers, digest)


# ------------------------------------------------------------ docker save --

def _inside(root: Path, relative: str, what: str) -> Path:
    """``relative`` under ``root``, refusing anything that leaves it."""
    path = (root / relative).resolve()
    if not str(path).startswith(str(root.resolve()) + os.sep) or not path.is_file():
        raise LayoutError(f"{what} {relative!r} is missing or outside the archive")
    return path


def read_docker_save(root: Path) -> Found:
    """The (first) image in a ``docker save`` archive's directory."""
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise LayoutError("docker archive without manifest.json")
    try:
        entries = json.loads(manifest_path.read_bytes())
        entry = entries[0]
        config_path = _inside(root, entry["Config"], "config")
        layer_paths = [_inside(root, p, "layer") for p in entry["Layers"]]
    except (ValueError, LookupError, TypeError) as e:
        raise LayoutError(f"malformed manifest.json ({e})") from None
    config = load_json(config_path.read_bytes(), "config")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(layer_paths):
        raise LayoutError(f"config lists {len(diff_ids)} layers, manifest.json "
                          f"{len(layer_paths)}")
    layers = [Layer(p, p.stat().st_size, diff_id=check_digest(d))
              for p, d in zip(layer_paths, diff_ids)]
    return Found(config, layers, None)
