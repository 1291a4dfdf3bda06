"""Where things are: the checkout, the venv's programs, the test images,
the test users. Environment variables override the defaults, as in CI."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
AS_USER = REPO / "scripts" / "as-user.sh"
# The venv running this process: its console commands are the installed
# package's, exactly as users type them.
VENV_BIN = Path(sys.executable).parent
CHSPAWNER = VENV_BIN / "chspawner"
IMAGE_CACHE = Path(os.environ.get("CHSPAWNER_IMAGE_CACHE", "/var/cache/chspawner/images"))
TEST_USER = os.environ.get("CHSPAWNER_USER", "chtest")
# The other ordinary account on the same machine: the attacker in isolation tests.
OTHER_USER = os.environ.get("CHSPAWNER_OTHER_USER", "chtest2")
# An account whose home is 120 characters deep, on another file system than
# the stores (scripts/setup-system.sh): a center's paths.
DEEP_USER = os.environ.get("CHSPAWNER_DEEP_USER", "chdeep")
