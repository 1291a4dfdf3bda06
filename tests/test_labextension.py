"""chspawner's JupyterLab extension, @chspawner/jupyterlab-persist
(chspawner/persist/labextension): in the installed wheel, prebuilt, where the
venv's JupyterLab finds it with no build step; its lock file naming no
registry; and its own unit tests (TypeScript, under Node: the websocket
wrapper, the wire formats, other pages' output into cells, when a save may
replace the server's writes). In the browser: tests/test_browser.py."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

NAME = "@chspawner/jupyterlab-persist"
SOURCE = Path(__file__).resolve().parent.parent / "chspawner" / "persist" / "labextension"
INSTALLED = Path(sys.prefix) / "share" / "jupyter" / "labextensions" / NAME


def test_the_wheel_installs_the_prebuilt_extension() -> None:
    package = json.loads((INSTALLED / "package.json").read_text())
    assert package["name"] == NAME
    # What JupyterLab loads: the module federation entry the build made.
    entry = INSTALLED / package["jupyterlab"]["_build"]["load"]
    assert entry.is_file() and entry.stat().st_size > 0, entry
    install = json.loads((INSTALLED / "install.json").read_text())
    assert install["packageName"] == "chspawner"
    # The source stays out of the wheel: only the build is shipped.
    import chspawner.persist
    assert not (Path(chspawner.persist.__file__).parent / "labextension").exists()


def test_the_venvs_jupyterlab_lists_it_enabled() -> None:
    jupyter = Path(sys.executable).parent / "jupyter"
    done = subprocess.run([str(jupyter), "labextension", "list"], capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if NAME in line]
    assert len(lines) == 1, done.stdout + done.stderr
    assert "enabled" in lines[0] and "OK" in lines[0], lines[0]
    assert "(python, chspawner)" in lines[0], lines[0]


def test_the_lock_file_pins_every_package_and_names_no_registry() -> None:
    lock = json.loads((SOURCE / "package-lock.json").read_text())
    packages = {path: meta for path, meta in lock["packages"].items() if path}
    assert packages
    for path, meta in packages.items():
        if meta.get("link"):
            continue
        assert meta.get("version") and meta.get("integrity"), path
        assert "resolved" not in meta, path  # npm's own configuration says where from
    # No registry host anywhere (the lock keeps packages' funding pages).
    text = "\n".join(p.read_text() for p in SOURCE.iterdir() if p.is_file())
    hosts = set(re.findall(r"\w+://([^/\"'\s]+)", text))
    assert not [h for h in hosts if "registry" in h or "npmjs" in h or "yarnpkg" in h], hosts


def test_its_typescript_unit_tests_pass_under_node(tmp_path: Path) -> None:
    tsc = SOURCE / "node_modules" / "typescript" / "bin" / "tsc"
    if not tsc.is_file():
        pytest.fail(f"{tsc} missing: scripts/setup-venv.sh builds the extension (npm ci)")
    # Compiled outside the checkout: the unit layer runs as any user.
    subprocess.run(["node", str(tsc), "-p", str(SOURCE / "tsconfig.test.json"),
                    "--outDir", str(tmp_path)], check=True, timeout=300)
    tests = sorted(str(p) for p in (tmp_path / "test").glob("*.test.js"))
    assert len(tests) >= 4, tests
    done = subprocess.run(["node", "--test", *tests], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    # Every test ran (node prints "# pass N" and "# fail 0").
    assert "# fail 0" in done.stdout, done.stdout[-2000:]
