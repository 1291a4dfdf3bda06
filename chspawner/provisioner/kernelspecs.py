"""Kernels found inside stored images, offered in the kernel picker.

:class:`ContainerKernelSpecManager` lists the native kernelspecs as usual
plus, for every image in the store, the kernelspecs installed inside it
(``share/jupyter/kernels/*/kernel.json`` under ``/usr``, ``/usr/local``,
``/opt/conda``...), each wrapped with the chspawner provisioner and named
after its image. The store is read on every listing, so a newly pulled
image shows up without restarting the server. Enable it with::

    c.ServerApp.kernel_spec_manager_class = "chspawner.provisioner.kernelspecs.ContainerKernelSpecManager"
"""
from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from traitlets import Bool, Dict, List, Unicode, default

from chspawner.images.store import Store, StoreError

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
        Unicode(), ["usr/share/jupyter/kernels", "usr/local/share/jupyter/kernels",
                    "opt/conda/share/jupyter/kernels"],
        help="Where in an image to look for kernelspecs (relative to its root).",
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
        """{spec name: (image, kernel dir, kernel.json content)}."""
        found = {}
        try:
            images = Store(self.storage).images()
        except StoreError as e:
            # A store another user planted or can write: its kernels are
            # not offered (the native ones still are), and the log says why.
            self.log.error("chspawner: no image kernels: %s", e)
            return found
        for info in images:
            if self.only_images and info.name not in self.only_images:
                continue
            for rel in self.image_kernel_dirs:
                base = info.path / rel
                if base.is_symlink() or not base.is_dir():
                    continue  # never follow the image's links onto the host
                for kernel_dir in sorted(base.iterdir()):
                    kernel_json = kernel_dir / "kernel.json"
                    if kernel_dir.is_symlink() or kernel_json.is_symlink() \
                            or not kernel_json.is_file():
                        continue
                    try:
                        kernel = json.loads(kernel_json.read_text())
                    except (OSError, ValueError):
                        self.log.warning("chspawner: unreadable %s", kernel_json)
                        continue
                    name = spec_name(info.name, kernel_dir.name)
                    found.setdefault(name, (info.name, kernel_dir, kernel))
        return found

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
        image, kernel_dir, kernel = entry
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
        result = {}
        for name, resource_dir in self.find_kernel_specs().items():
            try:
                spec = self.get_kernel_spec(name)
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


def kernel_template(name: str) -> dict:
    """A kernelspec template (``kernel.json``) of the repository's kernels/
    folder, which the wheel ships as ``chspawner/kernels``."""
    templates = resources.files("chspawner") / "kernels"
    if not templates.is_dir():  # a source checkout or an editable install
        templates = Path(__file__).resolve().parents[2] / "kernels"
    return json.loads((templates / name / "kernel.json").read_text())


def default_kernel() -> dict:
    """An ipykernel kernelspec, for images that don't carry one."""
    return kernel_template("ipykernel")


__all__ = ["ContainerKernelSpecManager", "install_kernelspec", "spec_name",
           "default_kernel", "kernel_template"]
