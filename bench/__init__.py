"""Benchmarks: each runs chspawner against its anchor and prints the ratio.
Run them from the repository root as modules (``python -m bench.spawn``),
or all with bench/run.sh; see docs/benchmarks.md."""
