#!/bin/bash
# Image recipe "jupyter": the Debian test image plus JupyterHub's single-user
# server and JupyterLab, so a whole Jupyter server can run inside an image.
# Usage: jupyter.sh TARGET_DIR   (TARGET_DIR exists and is empty; run as root)
# Any change to this file changes the cache key in scripts/build-image.sh.
set -euo pipefail
t=${1:?usage: jupyter.sh TARGET_DIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bash "$here/bookworm.sh" "$t"
in_chroot() {
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C \
        HOME=/root chroot "$t" "$@"
}
# For the build only: the network (bookworm.sh emptied resolv.conf, as the
# runtime binds the host's), /proc, and /dev (apt's gpg wants /dev/null).
cp /etc/resolv.conf "$t/etc/resolv.conf"
mount -t proc proc "$t/proc"
mount --bind /dev "$t/dev"
cleanup() { umount "$t/dev" "$t/proc" 2>/dev/null || true; : > "$t/etc/resolv.conf"; }
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
in_chroot apt-get update
in_chroot apt-get install -y --no-install-recommends python3-pip
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
in_chroot apt-get clean
rm -rf "$t"/var/lib/apt/lists/* "$t"/var/cache/apt/*.bin
cleanup
trap - EXIT INT TERM HUP
find "$t" \( -path "$t/etc/shadow*" -o -path "$t/etc/gshadow*" \) \
     -prune -o ! -type l -exec chmod a+rX {} +
