"""JupyterHub with ChSpawner on 127.0.0.1, serving the demo images (run by
demo.sh after the pull-and-run part).

The demo user (``chtest``, password ``demo``) picks an image and a mode in
the spawn form: ``jupyter`` runs the whole JupyterLab server inside the
image, ``deb`` runs the server natively with the image's kernels. With
``--check``, instead of serving until Ctrl-C, a script-friendly check: spawn
the demo user's server in the image through the REST API, run code in its
containerized kernel, print the result, stop.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_spawner import Hub, kernel_in_server, spawn, stop_server  # noqa: E402

VENV_BIN = Path(sys.executable).parent
CACHE = Path(os.environ.get("CHSPAWNER_IMAGE_CACHE", "/var/cache/chspawner/images"))
USER = os.environ.get("CHSPAWNER_USER", "chtest")
STORE = Path("/var/tmp/chspawner-demo-store")


def site_store() -> str:
    """The admin's store with the demo images, owned by the demo user and
    readable by all (imported once, as that user)."""
    chspawner = str(VENV_BIN / "chspawner")
    if not STORE.exists():
        subprocess.run([str(REPO / "scripts/as-user.sh"), USER, "mkdir", "-p", str(STORE)],
                       check=True)
    for name in ("jupyter", "bookworm"):
        image = "deb" if name == "bookworm" else name
        if (STORE / "img" / image).is_dir():
            continue
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            os.chmod(tmp, 0o755)
            tarball = Path(tmp) / "image.tar"  # as root: images have root-only files
            subprocess.run(["tar", "-C", str((CACHE / name).resolve()), "-cf", str(tarball),
                            "."], check=True)
            os.chmod(tarball, 0o644)
            print(f"importing demo image {image} into {STORE}", flush=True)
            subprocess.run([str(REPO / "scripts/as-user.sh"), USER, chspawner, "import",
                            "-q", "-s", str(STORE), str(tarball), image], check=True)
    return str(STORE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="spawn, run code in a containerized kernel, print, stop")
    args = parser.parse_args()
    hub = Hub(site_store(), USER, images=("jupyter", "deb"),
              extra_config='c.DummyAuthenticator.password = "demo"\n'
                           # Ctrl-C reaches the hub too: it stops the servers.
                           'c.JupyterHub.cleanup_servers = True\n')
    try:
        print(f"JupyterHub with ChSpawner: {hub.url}/  (log in as {USER}, password demo)",
              flush=True)
        if args.check:
            result = asyncio.run(spawn(hub, {"image": "jupyter", "mode": "server"}))
            if not result.get("ready"):
                print(f"spawn failed: {result}", file=sys.stderr)
                return 1
            print("spawned:", "; ".join(result["events"]), flush=True)
            status, output, _ = asyncio.run(kernel_in_server(hub, "python3"))
            print(f"kernel in the image says ({status}): {output.strip()}", flush=True)
            asyncio.run(stop_server(hub))
            return 0 if status == "ok" else 1
        print("Ctrl-C to stop.", flush=True)
        hub.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
