#!/bin/bash
# Set up this machine (Debian 12, as root) and run the main job:
#  1. the unprivileged user pulls the demo image from a local registry with
#     "chspawner pull" and runs it by name with "chspawner run" (demo.py);
#  2. a center on this machine (demo_hub.py): a 3-node Slurm cluster in
#     network namespaces, JupyterHub with the deployment guide's
#     configuration serving Jupyter in the demo images until Ctrl-C; with
#     --check, it spawns the demo user's server (a job on one node) through
#     the REST API instead, runs code in a kernel in the image (a job on
#     another node), prints where each ran and the result, and stops.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the Python parts run as modules from here
export CHSPAWNER_VENV=${CHSPAWNER_VENV:-/opt/chspawner/venv}
scripts/setup.sh bookworm jupyter
"$CHSPAWNER_VENV/bin/python" -m scripts.demo
exec "$CHSPAWNER_VENV/bin/python" -m scripts.demo_hub "$@"
