#!/bin/bash
# Build (or update) the virtual environment that runs chspawner and its tests,
# from Debian's /usr/bin/python3 in a path every user can read, and install
# this checkout into it (not editable: the unprivileged user may not be able
# to read the checkout). Idempotent.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${CHSPAWNER_VENV:-/opt/chspawner/venv}
umask 022

if [[ ! -x $venv/bin/python ]]; then
    mkdir -p "$(dirname "$venv")"
    /usr/bin/python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
# (chspawner's own command is a plain script, whatever pip installs it;
# a recent pip for the other commands' wrappers.)
"${pip[@]}" --upgrade 'pip>=26.3' hatchling
"${pip[@]}" "$repo[test,docs]"
# Always reinstall the checkout itself, so tests run what is checked out.
"${pip[@]}" --no-deps --no-build-isolation --force-reinstall "$repo"
# setuptools' distutils-precedence.pth runs an import at every interpreter
# start (~0.6 ms of each "chspawner run"); nothing here needs setuptools.
if "$venv/bin/python" -m pip show -q setuptools 2>/dev/null; then
    "$venv/bin/python" -m pip uninstall -q -y setuptools
fi
echo "$venv"
