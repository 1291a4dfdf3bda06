"""The test harness: every piece the tests, the benchmarks (bench/) and the
demo (scripts/) share, each once.

Import it as a package from the repository root: pytest finds it through
``tests/__init__.py`` (its append import mode puts the root at the end of
``sys.path``), and bench and scripts run as modules from the root
(``python -m bench.spawn``)::

    from tests.harness.hub import Hub, spawn
    from tests.harness.wait import wait_until

Modules: ``env`` (where things are), ``users`` (commands as the test user),
``images`` (the test images and the demo store), ``net`` (ports),
``wait`` (waiting on a condition with a deadline), ``procs`` (processes),
``text`` (reading command output), ``runtime`` (``chspawner run`` as the
user), ``puller`` (``chspawner pull`` as the user), ``registry`` (real OCI
registries), ``slurm`` (a one-node Slurm cluster), ``kernel_client`` (the
Jupyter kernel protocol over a server's websocket), ``servers`` (successive
jupyter_servers with persistent kernels), ``hub`` (JupyterHub with
ChSpawner, and the session manager's hub configuration).

No module here imports a test module; the session fixtures of the registry
and Slurm harnesses reach pytest through tests/conftest.py.
"""
