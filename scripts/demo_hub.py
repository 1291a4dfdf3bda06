"""JupyterHub with ChSpawner on 127.0.0.1, serving the demo images (run by
demo.sh after the pull-and-run part).

The demo user (``chtest``, password ``demo``) picks an image and a mode in
the spawn form: ``jupyter`` runs the whole JupyterLab server inside the
image, ``deb`` runs the server natively with the image's kernels. With
``--check``, instead of serving until Ctrl-C, a script-friendly check: spawn
the demo user's server in the image through the REST API, run code in its
containerized kernel, print the result, stop. Run from the repository root:
``python -m scripts.demo_hub [--check]``.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from tests.harness.env import TEST_USER
from tests.harness.hub import Hub, kernel_in_server, spawn, stop_server
from tests.harness.images import site_store


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="spawn, run code in a containerized kernel, print, stop")
    args = parser.parse_args()
    hub = Hub(site_store(), TEST_USER, images=("jupyter", "deb"),
              extra_config='c.DummyAuthenticator.password = "demo"\n'
                           # Ctrl-C reaches the hub too: it stops the servers.
                           'c.JupyterHub.cleanup_servers = True\n')
    try:
        print(f"JupyterHub with ChSpawner: {hub.url}/  (log in as {TEST_USER}, password demo)",
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
