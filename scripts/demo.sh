#!/bin/bash
# Set up this machine (Debian 12, as root) and run the main job: a command in
# the demo image, started unprivileged by "chspawner run".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CHSPAWNER_VENV=${CHSPAWNER_VENV:-/opt/chspawner/venv}
user=${CHSPAWNER_USER:-chtest}
scripts/setup-system.sh
scripts/setup-venv.sh >/dev/null
scripts/build-image.sh bookworm >/dev/null
image=${CHSPAWNER_IMAGE_CACHE:-/var/cache/chspawner/images}/bookworm
read -r -d '' hello <<'PY' || true
import os, platform
with open("/etc/os-release") as f:
    release = dict(line.rstrip().split("=", 1) for line in f if "=" in line)
print("Hello from", release["PRETTY_NAME"].strip('"'),
      "| Python", platform.python_version(),
      "| uid", os.getuid(), "| CH_RUNNING =", os.environ.get("CH_RUNNING"))
PY
echo "+ chspawner run --set-env $image -- python3 -c ...   (as $user)"
exec scripts/as-user.sh "$user" "$CHSPAWNER_VENV/bin/chspawner" run --set-env "$image" -- \
    python3 -c "$hello"
