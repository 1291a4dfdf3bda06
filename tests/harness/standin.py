"""A stand-in single-user server, for tests (and benchmarks) that need many
of them cheaply: it answers every GET with 200 and ``{}`` at the address
JupyterHub gives it ($JUPYTERHUB_SERVICE_URL), which is all the hub (its
readiness check) and the session manager (its checks) ask of a server.
Run as a script by JupyterHub's SimpleLocalProcessSpawner: see
``standin_config``. Standard library only."""
from __future__ import annotations

import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


class Answer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as jupyter_server

    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass  # quiet: the hub's log is for the hub


def standin_config() -> str:
    """Hub configuration (extra_config for tests/harness/hub.Hub): every
    server a stand-in, run by the hub as a local process."""
    return (f'\nc.JupyterHub.spawner_class = "simple"\n'
            f'c.Spawner.cmd = [{sys.executable!r}, {str(Path(__file__))!r}]\n'
            f'c.Spawner.args = []\n')


def main() -> None:
    # Stopped at once, however it is asked to (the spawner sends SIGINT
    # first, which a process started in the background may have ignored).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: os._exit(0))
    url = urlsplit(os.environ["JUPYTERHUB_SERVICE_URL"])
    ThreadingHTTPServer((url.hostname or "127.0.0.1", url.port), Answer).serve_forever()


if __name__ == "__main__":
    main()
