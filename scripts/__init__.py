"""The demo's Python programs (run by scripts/demo.sh as modules from the
repository root: ``python -m scripts.demo``, ``python -m scripts.demo_hub``)."""
