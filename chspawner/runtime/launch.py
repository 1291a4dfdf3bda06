"""Run the builtin launcher as ``python -I -S launch.py [OPTION...] IMAGE -- CMD``.

A script given to python is compiled from source on every run; a module it
imports comes from cached bytecode. This stub keeps the compiled part to a
few lines. ``-I`` leaves the script's directory off sys.path, so add it.
"""
import sys

sys.path.insert(0, __file__.rpartition("/")[0])
import launcher  # noqa: E402  (stdlib-only sibling module)

sys.exit(launcher.main())
