#!/bin/bash
# Everything a fresh Debian 12 machine needs before the demo, tests or
# benchmarks (as root; idempotent): Debian packages and the test user, the
# venv with this checkout installed, and the images named as arguments.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CHSPAWNER_VENV=${CHSPAWNER_VENV:-/opt/chspawner/venv}
scripts/setup-system.sh
scripts/setup-venv.sh >/dev/null
for image in "$@"; do
    scripts/build-image.sh "$image" >/dev/null
done
