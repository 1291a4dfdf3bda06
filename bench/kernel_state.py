"""A kernel's session saved and restored (chspawner's session recorder)
against re-running the whole notebook, in one run, as the unprivileged
user, with Debian's ipykernel in the Debian test image:

* the notebook (bench/kernel_state_worker.py: 72 cells, three of them
  expensive) run in a new kernel: the re-run a user does today after
  losing a kernel;
* its snapshot (time, bytes) and its restore into a new kernel (the
  variables loaded, the cells a generator needs re-run): target restore
  <= 0.2x the re-run;
* recording's overhead on cell execution: the same notebook in a kernel
  with the recorder and in one without, alternating rounds, medians
  (target <= 5%; the cheap cells alone are printed too).

Run as root (it drops to the test user): ``bench/run.sh`` or, from the
repository root, ``python -m bench.kernel_state [--rounds N] [--check]``.
"""
from __future__ import annotations

import argparse
import json
import pwd
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from bench.workdir import install_test_image_kernel, user_workdir
from tests.harness.env import TEST_USER, VENV_BIN
from tests.harness.users import as_user_or_exit

RESTORE_TARGET = 0.2
OVERHEAD_TARGET = 0.05
PLAIN, RECORDING = "chspawner-deb--python3", "chspawner-deb-recording"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the restore or the recording is over its target")
    args = parser.parse_args()
    user = pwd.getpwnam(TEST_USER)
    key = f"bench-{uuid.uuid4().hex[:12]}"
    with user_workdir("kernel-state", "kernel_state_worker.py") as (work, home, worker):
        env = install_test_image_kernel(work, home)
        # The same kernel with the provisioner's session_state.
        kernels = home / "share/jupyter/kernels"
        shutil.copytree(kernels / PLAIN, kernels / RECORDING)
        spec = json.loads((kernels / RECORDING / "kernel.json").read_text())
        spec["metadata"]["kernel_provisioner"]["config"]["session_state"] = True
        spec["display_name"] += " (recording)"
        (kernels / RECORDING / "kernel.json").write_text(json.dumps(spec))
        subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(home)],
                       check=True)
        try:
            r = json.loads(as_user_or_exit(TEST_USER, str(VENV_BIN / "python"), str(worker),
                                           str(args.rounds), RECORDING, PLAIN, key, env=env))
        finally:
            shutil.rmtree(Path(user.pw_dir) / ".local/share/chspawner/snapshots" / key,
                          ignore_errors=True)
    restore_ratio = r["restore"] / r["rerun"]
    overhead = r["recorded"] / r["rerun"] - 1
    cheap = r["cheap_recorded"] / r["cheap_plain"] - 1
    over = lambda bad: "  OVER TARGET" if bad else ""  # noqa: E731
    print(f"notebook: {r['cells']} cells; snapshot: {r['saved']} variables saved, "
          f"{', '.join(r['rebuilt']) or 'none'} to re-run (cells "
          f"{', '.join(map(str, r['rerun_cells']))}), {r['bytes'] / 1e6:.2f} MB")
    print(f"{'a lost kernel back':<28} {'re-run all':>10} {'chspawner':>10} {'ratio':>6} "
          f"{'target':>7}")
    print(f"{'restore into a new kernel':<28} {r['rerun']:>9.3f}s {r['restore']:>9.3f}s "
          f"{restore_ratio:>5.2f}x {RESTORE_TARGET:>6.2f}x"
          f"{over(restore_ratio > RESTORE_TARGET)}")
    print(f"{'snapshot (once, ahead)':<28} {'':>10} {r['snapshot']:>9.3f}s "
          f"{r['snapshot'] / r['rerun']:>5.2f}x")
    print(f"{'recording, whole notebook':<28} {r['rerun']:>9.3f}s {r['recorded']:>9.3f}s "
          f"{overhead:>+5.1%} {OVERHEAD_TARGET:>+6.0%}{over(overhead > OVERHEAD_TARGET)}")
    per_cell = (r["cheap_recorded"] - r["cheap_plain"]) / (r["cells"] - 5) * 1000
    print(f"{'recording, 67 cheap cells':<28} {r['cheap_plain']:>9.3f}s "
          f"{r['cheap_recorded']:>9.3f}s {cheap:>+5.1%}  ({per_cell:+.2f} ms a cell)",
          flush=True)
    failed = restore_ratio > RESTORE_TARGET or overhead > OVERHEAD_TARGET
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
