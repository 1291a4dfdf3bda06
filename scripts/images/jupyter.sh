#!/bin/bash
# Image recipe "jupyter": the Debian test image plus JupyterHub's single-user
# server and JupyterLab, so a whole Jupyter server can run inside an image.
# Usage: jupyter.sh TARGET_DIR   (TARGET_DIR exists and is empty; run as root)
# Any change to this file, bookworm.sh or lib/chroot.sh changes the cache key
# in scripts/build-image.sh.
set -euo pipefail
t=${1:?usage: jupyter.sh TARGET_DIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bash "$here/bookworm.sh" "$t"
source "$here/lib/chroot.sh"
chroot_begin "$t"
apt_install python3-pip
# The same JupyterHub as the hub's (jupyterhub-singleuser talks to it).
# Wheels are fetched by the host's pip (its network and certificate setup),
# for the image's Python, which is the same Debian python3; the chroot's pip
# installs them offline.
venv=${CHSPAWNER_VENV:-/opt/chspawner/venv}
version=$("$venv/bin/python" -c 'import jupyterhub; print(jupyterhub.__version__)')
mkdir -p "$t/tmp/wheels"
"$venv/bin/python" -m pip download -q -d "$t/tmp/wheels" \
    "jupyterhub==$version" jupyterlab
in_chroot pip install --no-cache-dir --break-system-packages --no-index \
    --find-links /tmp/wheels "jupyterhub==$version" jupyterlab
rm -rf "$t/tmp/wheels"
chroot_end
