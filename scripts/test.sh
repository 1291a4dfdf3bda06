#!/bin/bash
# Set up this machine (Debian 12, as root) and run every test, then build the
# docs. Arguments go to pytest. This is what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CHSPAWNER_VENV=${CHSPAWNER_VENV:-/opt/chspawner/venv}
scripts/setup.sh busybox bookworm jupyter irkernel mpi
# The layer rules ([tool.importlinter] in pyproject.toml) first: a broken
# contract fails in seconds. Run from the repository root, it reads this
# checkout's sources.
"$CHSPAWNER_VENV/bin/lint-imports" --no-cache
# The venv's pytest, not "python -m pytest": tests must import the installed
# package, not this checkout.
# The slowest tests are listed at the end: where the suite's time goes.
"$CHSPAWNER_VENV/bin/pytest" --durations=25 "$@"
"$CHSPAWNER_VENV/bin/sphinx-build" -W --keep-going -q -b html docs build/docs
echo "docs: built in build/docs"
