#!/bin/bash
# Image recipe "irkernel": the Debian test image (bookworm.sh) plus R and
# IRkernel from Debian (an R Jupyter kernel that does not write its ports
# back), for tests.
# Usage: irkernel.sh TARGET_DIR   (TARGET_DIR exists and is empty; run as root)
# Any change to this file, bookworm.sh or lib/chroot.sh changes the cache key
# in scripts/build-image.sh.
set -euo pipefail
t=${1:?usage: irkernel.sh TARGET_DIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bash "$here/bookworm.sh" "$t"
source "$here/lib/chroot.sh"
chroot_begin "$t"
apt_install r-base-core r-cran-irkernel
# A file only this image has: tests read it to prove code runs in the image.
echo "chspawner test image: Debian bookworm with IRkernel" > "$t/etc/chspawner-test-image"
chroot_end
