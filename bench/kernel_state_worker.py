"""The part of bench/kernel_state.py that runs as the unprivileged user.

Usage: kernel_state_worker.py ROUNDS RECORDING PLAIN KEY
(RECORDING and PLAIN: kernel names, with and without the session
recorder; KEY: the snapshot's name). Prints one JSON object.
"""
import ast
import json
import statistics
import sys
import time

from jupyter_client.manager import KernelManager

#: A notebook as analyses go: data made by a few expensive cells (pure
#: Python loops, as loading and cleaning often are), many cheap cells that
#: look at it, a function, a class and its instances, a generator (re-run,
#: not saved) and the random state.
NOTEBOOK = [
    "import random, math\nimport numpy as np\nimport pandas as pd",
    "random.seed(1)\nrng = np.random.default_rng(1)",
    # the expensive cells
    "raw = np.array([sum((i * j) % 7 for j in range(600)) for i in range(40000)], float)",
    "frame = pd.DataFrame({'x': raw, 'y': [math.sin(v) for v in raw]})\n"
    "frame['z'] = [sum(math.cos(v * k) for k in range(100)) for v in frame['y']]",
    "primes = [n for n in range(2, 200000) if all(n % d for d in range(2, int(n ** 0.5) + 1))]",
    # the cheap cells
    "def scale(v, by=2.0):\n    return v * by",
    "class Summary:\n    def __init__(self, name, values):\n        self.name, self.values = name, values\n"
    "    def mean(self):\n        return float(np.mean(self.values))",
    "summaries = [Summary(c, frame[c].to_numpy()) for c in frame.columns]",
    "batches = (frame.iloc[i:i + 100] for i in range(0, len(frame), 100))",
    "first = next(batches)",
    "noise = rng.normal(size=1000)",
    "pick = random.random()",
    *[f"m{i} = scale(frame['x'].iloc[{i}]) + {i}" for i in range(30)],
    *[f"s{i} = summaries[{i % 3}].mean() + m{i}" for i in range(30)],
]


class Kernel:
    def __init__(self, name: str):
        self.km = KernelManager(kernel_name=name)
        self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)

    def run(self, code: str) -> float:
        start = time.perf_counter()
        reply = self.kc.execute_interactive(code, timeout=600, output_hook=lambda m: None)
        elapsed = time.perf_counter() - start
        if reply["content"]["status"] != "ok":
            raise SystemExit(f"cell failed: {code[:60]!r}: {reply['content'].get('evalue')}")
        return elapsed

    def call(self, expression: str) -> tuple[float, dict]:
        """As the server asks the recorder: a silent execution."""
        start = time.perf_counter()
        reply = self.kc.execute_interactive("", silent=True, timeout=600,
                                            user_expressions={"r": expression})
        elapsed = time.perf_counter() - start
        text = reply["content"]["user_expressions"]["r"]["data"]["text/plain"]
        return elapsed, json.loads(ast.literal_eval(text))

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def run_notebook(name: str) -> tuple[float, float, Kernel]:
    """The whole notebook in a new kernel: (total, the cheap cells' total, the kernel)."""
    kernel = Kernel(name)
    times = [kernel.run(code) for code in NOTEBOOK]
    return sum(times), sum(times[5:]), kernel


def main() -> None:
    rounds, recording, plain, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    plain_runs, recorded_runs, cheap_plain, cheap_recorded = [], [], [], []
    saves, restores = [], []
    for _ in range(rounds):
        total, cheap, kernel = run_notebook(plain)
        kernel.close()
        plain_runs.append(total)
        cheap_plain.append(cheap)
        total, cheap, kernel = run_notebook(recording)
        recorded_runs.append(total)
        cheap_recorded.append(cheap)
        elapsed, saved = kernel.call(
            f"__import__('chspawner_session').snapshot({key!r}, None, 'bench')")
        kernel.close()
        assert saved["ok"], saved
        saves.append((elapsed, saved))
        fresh = Kernel(recording)
        elapsed, restored = fresh.call(f"__import__('chspawner_session').restore({key!r})")
        assert restored["ok"], restored
        fresh.run("assert len(primes) == 17984 and len(summaries) == 3 and s29 > 0")
        fresh.close()
        restores.append((elapsed, restored))
    median = statistics.median
    print(json.dumps({
        "cells": len(NOTEBOOK),
        "rerun": median(plain_runs), "recorded": median(recorded_runs),
        "cheap_plain": median(cheap_plain), "cheap_recorded": median(cheap_recorded),
        "snapshot": median(s for s, _ in saves), "bytes": saves[-1][1]["bytes"],
        "saved": len(saves[-1][1]["saved"]), "rebuilt": saves[-1][1]["rebuilt"],
        "restore": median(r for r, _ in restores),
        "rerun_cells": restores[-1][1]["rerun_cells"],
    }))


if __name__ == "__main__":
    main()
