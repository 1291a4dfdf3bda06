"""The private parts of jupyter_client and jupyter_server that persistent
kernels rely on are still there, and still used by upstream, in the
installed versions: a failure names the attribute (and what uses it), so an
upstream release that changes them is caught here, not by kernels that
quietly stop surviving their server."""
from __future__ import annotations

import pytest

from chspawner.persist import upstream_jupyter_client, upstream_jupyter_server
from chspawner.persist.upstream import Private, UpstreamChanged, missing, require

# No root, no services: part of the fast unit layer (pytest -m unit).
pytestmark = pytest.mark.unit

PARTS = [*upstream_jupyter_client.PRIVATE, *upstream_jupyter_server.PRIVATE]


@pytest.mark.parametrize("part", PARTS, ids=lambda p: f"{p.owner.__name__}.{p.name}")
def test_upstream_still_has_it(part: Private):
    problem = part.problem()
    assert problem is None, problem


def test_the_overridden_private_methods_are_declared():
    """The four private methods persist overrides (through the adapters'
    mixins) are all checked, with the upstream code that calls them."""
    overridden = {p.name for p in PARTS if p.used_by and not p.on_instances
                  and callable(getattr(p.owner, p.name))}
    assert {"_async_launch_kernel", "_async_post_start_kernel", "_get_changed_ports",
            "_limit_rate"} <= overridden


def test_a_missing_attribute_fails_loudly_by_name():
    class Upstream:
        def caller(self):
            return self._other()

        def _used(self):
            pass

    gone = Private(Upstream, "_renamed", "what it does for us")
    assert missing([gone]) == [
        f"{__name__}.test_a_missing_attribute_fails_loudly_by_name.<locals>.Upstream"
        "._renamed is gone (chspawner uses it: what it does for us)"]
    with pytest.raises(UpstreamChanged, match="_renamed is gone"):
        require("upstream", [gone])
    unused = Private(Upstream, "_used", "an override", used_by=(Upstream.caller,))
    [problem] = missing([unused])
    assert "Upstream.caller no longer uses" in problem and "._used" in problem
