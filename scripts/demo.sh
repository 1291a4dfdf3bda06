#!/bin/bash
# Set up this machine (Debian 12, as root) and run the main job: the
# unprivileged user pulls the demo image from a local registry with
# "chspawner pull" and runs it by name with "chspawner run" (scripts/demo.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CHSPAWNER_VENV=${CHSPAWNER_VENV:-/opt/chspawner/venv}
scripts/setup.sh bookworm
exec "$CHSPAWNER_VENV/bin/python" scripts/demo.py
