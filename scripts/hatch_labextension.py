"""Hatch build hook: the JupyterLab extension @chspawner/jupyterlab-persist,
built from its source (chspawner/persist/labextension) with JupyterLab's own
tooling and put into the wheel as a prebuilt extension, at
share/jupyter/labextensions/@chspawner/jupyterlab-persist, where a JupyterLab
in the same environment loads it with no build step.

The build: ``npm ci`` (the exact versions of the committed lock file; npm's
cache outside the checkout), ``tsc``, then ``jupyter labextension build``
(webpack with JupyterLab's module federation, from @jupyterlab/builder and
the core metadata of the build environment's jupyterlab). It is skipped when
the output was built from the same sources (a hash of them, kept beside
the output), so reinstalling the checkout costs nothing more.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

NAME = "@chspawner/jupyterlab-persist"
SOURCE = Path("chspawner/persist/labextension")
#: What the build reads: a change to any of these builds again.
INPUTS = ("package.json", "package-lock.json", "tsconfig.json", ".npmrc", "src")


class LabextensionBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        source = Path(self.root) / SOURCE
        output = source / "build"
        stamp = source / ".build-stamp"
        digest = source_hash(source)
        built = (output / "package.json").is_file() and (
            stamp.is_file() and stamp.read_text().strip() == digest)
        if not built:
            build(source)
            stamp.write_text(digest + "\n")
        target = f"share/jupyter/labextensions/{NAME}"
        build_data["shared_data"][str(output)] = target
        build_data["shared_data"][str(source / "install.json")] = f"{target}/install.json"


def source_hash(source: Path) -> str:
    """SHA-256 over the build's inputs (names and contents), tests left out."""
    h = hashlib.sha256()
    files: list[Path] = []
    for name in INPUTS:
        path = source / name
        if path.is_dir():
            files += sorted(p for p in path.rglob("*.ts") if "test" not in p.relative_to(path).parts)
        elif path.is_file():
            files.append(path)
    for path in files:
        h.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def build(source: Path) -> None:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise RuntimeError(
            f"building the JupyterLab extension {NAME} needs node and npm (Debian: "
            "apt-get install npm; scripts/setup-system.sh installs them)")
    env = dict(os.environ)
    # npm's cache outside the checkout; the registry is npm's own setting.
    cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chspawner" / "npm"
    env.setdefault("npm_config_cache", str(cache))
    env.update(npm_config_update_notifier="false", npm_config_fund="false",
               npm_config_audit="false")
    run = lambda *argv: subprocess.run(argv, cwd=source, env=env, check=True)  # noqa: E731
    run(npm, "ci", "--no-progress", "--loglevel=error")
    run(npm, "run", "build:lib")
    # JupyterLab's extension builder (@jupyterlab/builder's
    # build-labextension: webpack with module federation, the tool "jupyter
    # labextension build" runs), against the core metadata of this build's
    # jupyterlab: the JupyterLab the extension is built for, read from disk.
    # Called directly rather than through "jupyter labextension build": from
    # JupyterLab 4.6 that hands over to jupyter_builder, which refuses
    # Debian 12's Node.js 18 although @jupyterlab/builder (webpack) runs on it.
    spec = importlib.util.find_spec("jupyterlab")
    if spec is None or spec.origin is None:
        raise RuntimeError(f"building the JupyterLab extension {NAME} needs the jupyterlab "
                           "Python package (pyproject.toml's build-system requires it)")
    core = Path(spec.origin).parent / "staging"
    run("node", "node_modules/@jupyterlab/builder/lib/build-labextension.js",
        "--core-path", str(core), ".")


if __name__ == "__main__":
    # By hand, from the repository root: python -m scripts.hatch_labextension
    build(Path(__file__).resolve().parent.parent / SOURCE)
