"""Kernels found inside stored images, offered in the kernel picker.

:class:`ContainerKernelSpecManager` lists the native kernelspecs as usual
plus, for every image in the store, the kernelspecs installed inside it
(``share/jupyter/kernels/*/kernel.json`` under ``/usr``, ``/usr/local``,
``/opt/conda``...), each wrapped with the chspawner provisioner and named
after its image. The store is read on every listing, so a newly pulled
image shows up without restarting the server; what is read is each image's
record (chspawner.images.records: its kernels, found when it was imported
or pulled), a few small files, never the image's tree, and once per
listing (``get_all_specs`` builds every spec from one reading). Enable it
with::

    c.ServerApp.kernel_spec_manager_class = "chspawner.provisioner.kernelspecs.ContainerKernelSpecManager"
"""
from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from traitlets import Bool, Dict, List, Unicode, default

from chspawner.images.records import KERNEL_DIRS, find_kernels
from chspawner.images.store import ImageInfo, Store, StoreError

PREFIX = "chspawner-"


def spec_name(image: str, kernel: str) -> str:
    """A kernelspec name (letters, digits, '.', '_', '-') for a kernel in an image."""
    return PREFIX + re.sub(r"[^A-Za-z0-9._-]", "_", f"{image}--{kernel}")


def provisioned_spec(image: str, kernel: dict, display_name: str, config: dict) -> dict:
    """``kernel`` (a kernel.json's content) wrapped to run in ``image``."""
    metadata = dict(kernel.get("metadata") or {})
    metadata["kernel_provisioner"] = {
        "provisioner_name": "chspawner", "config": {"image": image, **config}}
    return {**kernel, "display_name": display_name, "metadata": metadata}


class ContainerKernelSpecManager(KernelSpecManager):
    """Native kernels, plus the kernels inside every image in the store."""

    image_kernel_dirs = List(
        Unicode(), list(KERNEL_DIRS),
        help="Where in an image to look for kernelspecs (relative to its root). "
             "Images record the kernels in the default places when they are "
             "imported or pulled; other places are searched inside every "
             "image at every listing (slow on a parallel file system).",
    ).tag(config=True)
    storage = Unicode(
        None, allow_none=True,
        help="The image store (default: $CH_IMAGE_STORAGE or /var/tmp/$USER.ch).",
    ).tag(config=True)
    include_native = Bool(
        help="Also list the kernels installed natively (on the server's host). "
             "Default: yes, unless ``only_images`` names the image(s) chosen for "
             "the server: then only their kernels are offered, so that nobody "
             "runs on the host by mistake; an admin who wants the host's kernels "
             "beside them sets this.",
    ).tag(config=True)
    only_images = List(
        Unicode(), help="Offer only these images' kernels (default: every image).",
    ).tag(config=True)
    preferred_kernels = List(
        Unicode(), ["python3", "ir"],
        help="The kernel (by its directory name in the image) that is the "
             "default when ``only_images`` names an image: the first of these "
             "the image has, else its first kernel by name.",
    ).tag(config=True)
    provisioner_config = Dict(
        help="Provisioner settings for every image kernel (binds, env, home, backend, "
             "launcher, job_log_dir...: see chspawner.provisioner.settings).",
    ).tag(config=True)
    display_name_template = Unicode(
        "{display_name} — image {image}",
        help="Display name of an image kernel; fields: display_name, image, kernel.",
    ).tag(config=True)

    @default("include_native")
    def _default_include_native(self) -> bool:
        return not self.only_images

    def image_default_kernel(self) -> str | None:
        """The kernelspec name that should be the server's default kernel:
        the chosen image's (``only_images``, first image), by
        ``preferred_kernels``; None when no image was chosen or it has none."""
        if not self.only_images:
            return None
        image = self.only_images[0]
        mine = {kernel_dir.name: name for name, (found, kernel_dir, _k)
                in self.image_kernels().items() if found == image}
        for wanted in self.preferred_kernels:
            if wanted in mine:
                return mine[wanted]
        return mine[min(mine)] if mine else None

    def image_kernels(self) -> dict[str, tuple[str, Path, dict]]:
        """{spec name: (image, kernel dir, kernel.json content)}, from the
        images' records: one reading of the store."""
        found: dict[str, tuple[str, Path, dict]] = {}
        try:
            # (With only_images, the usual case in kernels mode, only
            # those images' records are read.)
            images = self._store().images(self.only_images or None)
        except StoreError as e:
            # A store another user planted or can write: its kernels are
            # not offered (the native ones still are), and the log says why.
            self.log.error("chspawner: no image kernels: %s", e)
            return found
        for info in images:
            if self.only_images and info.name not in self.only_images:
                continue
            for kernel in self._kernels_of(info):
                name = spec_name(info.name, kernel.name)
                found.setdefault(name, (info.name, info.path / kernel.dir, kernel.spec))
        return found

    def _store(self) -> Store:
        """One Store per storage, so that it keeps the records it read
        (read again only when they change)."""
        store = getattr(self, "_chspawner_store", None)
        if store is None or store[0] != self.storage:
            store = (self.storage, Store(self.storage))
            self._chspawner_store = store
        return store[1]

    def _kernels_of(self, info: ImageInfo) -> tuple:
        """``info``'s recorded kernels, or, if ``image_kernel_dirs`` isn't
        where they were recorded from, the kernels there (a search inside
        the image, at every listing: said once in the log)."""
        if tuple(self.image_kernel_dirs) == tuple(info.kernel_dirs):
            return info.kernels
        if not getattr(self, "_chspawner_said_dirs", False):
            self._chspawner_said_dirs = True
            self.log.warning("chspawner: image_kernel_dirs differs from the places "
                             "images record kernels from: searching inside every "
                             "image at every listing")
        return tuple(find_kernels(info.path, self.image_kernel_dirs,
                                  lambda message: self.log.warning("chspawner: %s",
                                                                   message)))

    def find_kernel_specs(self) -> dict[str, str]:
        specs = super().find_kernel_specs() if self.include_native else {}
        for name, (_image, kernel_dir, _kernel) in self.image_kernels().items():
            specs[name] = str(kernel_dir)
        return specs

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if not kernel_name.startswith(PREFIX):
            if not self.include_native:
                raise NoSuchKernel(kernel_name)
            return super().get_kernel_spec(kernel_name)
        entry = self.image_kernels().get(kernel_name)
        if entry is None:
            raise NoSuchKernel(kernel_name)
        return self._image_spec(*entry)

    def _image_spec(self, image: str, kernel_dir: Path, kernel: dict) -> KernelSpec:
        display = self.display_name_template.format(
            display_name=kernel.get("display_name", kernel_dir.name), image=image,
            kernel=kernel_dir.name)
        # The kernel runs from the store it was found in, whatever the
        # default store of the user running it.
        config = {**({"storage": self.storage} if self.storage else {}),
                  **self.provisioner_config}
        spec = provisioned_spec(image, kernel, display, config)
        return self.kernel_spec_class(resource_dir=str(kernel_dir), **spec)

    def get_all_specs(self) -> dict[str, dict]:
        """Every spec, the images' from one reading of the store (not one
        per kernel, as the base class's per-name lookups would make it)."""
        result = {}
        native = super().find_kernel_specs() if self.include_native else {}
        entries: dict[str, tuple] = {name: (path,) for name, path in native.items()}
        entries.update(self.image_kernels())
        for name, entry in entries.items():
            try:
                if len(entry) == 1:
                    resource_dir = entry[0]
                    spec = super().get_kernel_spec(name)
                else:
                    resource_dir = str(entry[1])
                    spec = self._image_spec(*entry)
            except Exception as e:  # one broken spec must not hide the others
                self.log.warning("chspawner: kernelspec %s: %s", name, e)
                continue
            result[name] = {"resource_dir": resource_dir, "spec": spec.to_dict()}
        return result


def install_kernelspec(image: str, kernel: dict, name: str, display_name: str,
                       config: dict, prefix: str | None = None) -> Path:
    """Write a normal kernelspec that runs ``kernel`` in ``image``, for
    tools that don't use the discovery."""
    from jupyter_core.paths import jupyter_data_dir
    base = Path(prefix) / "share" / "jupyter" if prefix else Path(jupyter_data_dir())
    target = base / "kernels" / name
    target.mkdir(parents=True, exist_ok=True)
    spec = provisioned_spec(image, kernel, display_name, config)
    (target / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
    return target


def kernel_files(name: str) -> Path:
    """A folder of the repository's kernels/ folder, which the wheel ships
    as ``chspawner/kernels``."""
    shipped = resources.files("chspawner") / "kernels"
    if not shipped.is_dir():  # a source checkout or an editable install
        shipped = Path(__file__).resolve().parents[2] / "kernels"
    return Path(str(shipped / name))


def kernel_template(name: str) -> dict:
    """A kernelspec template (``kernel.json``) of the kernels/ folder."""
    return json.loads((kernel_files(name) / "kernel.json").read_text())


def default_kernel() -> dict:
    """An ipykernel kernelspec, for images that don't carry one."""
    return kernel_template("ipykernel")


__all__ = ["ContainerKernelSpecManager", "install_kernelspec", "spec_name",
           "default_kernel", "kernel_files", "kernel_template"]
