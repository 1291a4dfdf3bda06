"""Spawn to ready through a real JupyterHub: ChSpawner running the
single-user server inside the ``jupyter`` image against JupyterHub's own
LocalProcessSpawner running the same server natively (from the venv).

Both hubs run side by side in one run; rounds alternate; medians. Target:
ChSpawner <= 1.1x. Run as root: ``bench/run.sh`` or, from the repository
root, ``python -m bench.spawn [--rounds N] [--check]``.
"""
from __future__ import annotations

import argparse
import statistics
import sys

from tests.harness.env import TEST_USER
from tests.harness.hub import Hub, timed_spawn
from tests.harness.images import site_store  # the demo's store: jupyter, deb

TARGET = 1.1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    store = site_store()
    native = Hub(store, TEST_USER, images=("jupyter",),
                 extra_config='c.JupyterHub.spawner_class = "localprocess"\n')
    ours = Hub(store, TEST_USER, images=("jupyter",))
    times: dict[str, list[float]] = {"native": [], "chspawner": []}
    try:
        for _ in range(args.rounds):
            times["native"].append(timed_spawn(native, {}))
            times["chspawner"].append(timed_spawn(ours, {"image": "jupyter",
                                                         "mode": "server"}))
    finally:
        native.stop()
        ours.stop()
    a, o = statistics.median(times["native"]), statistics.median(times["chspawner"])
    ratio = o / a
    print(f"{'spawn to ready':<32} {'native':>8} {'in image':>9} {'ratio':>6} {'target':>7}")
    print(f"{'LocalProcessSpawner / ChSpawner':<32} {a:>7.2f}s {o:>8.2f}s {ratio:>5.2f}x "
          f"{TARGET:>6.1f}x{'  OVER TARGET' if ratio > TARGET else ''}")
    return 1 if args.check and ratio > TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
