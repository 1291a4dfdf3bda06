"""Starting containers: one RunSpec, one function that turns it into argv.

``RunSpec`` and ``to_argv`` live in :mod:`chspawner.runtime.spec`; they are
loaded on first use so that ``chspawner run``, which needs only the stdlib
launcher, doesn't pay for importing them.
"""

__all__ = ["Bind", "RunSpec", "to_argv", "BACKENDS"]


def __getattr__(name):
    if name in __all__:
        from chspawner.runtime import spec
        return getattr(spec, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
