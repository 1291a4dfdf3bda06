"""The session proxy's state: its routes and its holds.

Paths are compared as tuples of percent-decoded segments, so a route for
``/user/alice`` matches ``/user/alice`` and ``/user/alice/lab`` but not
``/user/alicex``, and ``%61lice`` is ``alice``. A path with a ``.`` or
``..`` segment (encoded or not) is refused rather than normalized: a
browser never sends one, and refusing means no prefix can be escaped.
"""
from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

Segments = tuple[str, ...]


class BadPath(ValueError):
    """A path the proxy will not route (dot segments, not origin-form)."""


class BadTarget(ValueError):
    """A route target the proxy cannot forward to."""


def segments(path: str) -> Segments:
    """``/user/alice/lab?x`` -> ``("user", "alice", "lab")``; empty
    segments (``//``) are ignored, as configurable-http-proxy does."""
    if not path.startswith("/"):
        # Absolute-form (``GET http://evil/``) or ``*``: the request must not
        # be able to name its own target, so only origin-form is routed.
        raise BadPath(f"not an origin-form path: {path[:100]!r}")
    path = path.split("?", 1)[0].split("#", 1)[0]
    parts = tuple(unquote(s) for s in path.split("/") if s)
    if any(s in (".", "..") for s in parts):
        raise BadPath(f"dot segment in path: {path[:100]!r}")
    return parts


def strip_segments(path: str, count: int) -> str:
    """``/user/alice/lab?x``, 2 -> ``/lab?x`` (for --no-include-prefix)."""
    path, sep, query = path.partition("?")
    parts = [p for p in path.split("/") if p]
    rest = "/" + "/".join(parts[count:])
    if path.endswith("/") and parts[count:]:
        rest += "/"
    return rest + sep + query


def path_of(parts: Segments) -> str:
    """The route key configurable-http-proxy shows: ``/user/alice``, ``/``."""
    return "/" + "/".join(parts)


def iso(timestamp: float) -> str:
    """A UTC ISO 8601 time as configurable-http-proxy writes it."""
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> float:
    """Parse ``inactive_since`` (ISO 8601; naive times are UTC)."""
    moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


@dataclass
class Target:
    """Where a route sends requests: host, port and a base path that is
    prepended to the forwarded path (as configurable-http-proxy does)."""
    host: str
    port: int
    base: str

    @classmethod
    def parse(cls, url: str) -> "Target":
        parts = urlsplit(url)
        if parts.scheme not in ("http", "ws") or not parts.hostname:
            raise BadTarget(f"target must be an http:// URL, not {url[:200]!r}")
        try:
            port = parts.port or 80
        except ValueError as error:
            raise BadTarget(f"bad port in target {url[:200]!r}") from error
        return cls(parts.hostname, port, parts.path.rstrip("/"))


@dataclass(eq=False)
class Route:
    """One route: its target and whatever data the API client stored.

    It also holds its idle kept-alive connections to its target
    (``upstream``): a connection serves only the route, and the target, it
    was opened for. A route replaced or deleted is *retired*: those
    connections are closed at once, and the ones still serving a request
    are closed when it ends, so none can outlive the route (after a port
    changes hands, a pooled connection would reach its previous owner)."""
    target: Target
    data: dict
    last_activity: float = field(default_factory=time.time)
    #: the route's path ("/user/alice"), for what is kept per route
    path: str = "/"
    #: idle connections to ``target`` (tornado IOStreams), newest last
    idle: list = field(default_factory=list, repr=False)
    #: the same for the fast path (fastpath.Upstream protocols)
    fast_idle: list = field(default_factory=list, repr=False)
    retired: bool = False

    def touch(self) -> None:
        self.last_activity = time.time()

    def retire(self) -> None:
        """The route is gone or replaced: close its idle connections."""
        self.retired = True
        while self.idle:
            self.idle.pop().close()
        while self.fast_idle:
            self.fast_idle.pop().close()

    def as_json(self) -> dict:
        return {**self.data, "last_activity": iso(self.last_activity)}


class RouteTable:
    """Longest-prefix routing over whole path segments."""

    def __init__(self) -> None:
        self.routes: dict[Segments, Route] = {}

    def add(self, parts: Segments, data: dict) -> Route:
        """Add or replace the route at ``parts``; ``data["target"]`` is the
        target URL (raises BadTarget). A route replaced is retired, even
        for the same target: the port may have changed hands meanwhile."""
        route = Route(Target.parse(str(data.get("target", ""))), dict(data),
                      path=path_of(parts))
        old = self.routes.get(parts)
        self.routes[parts] = route
        if old is not None:
            old.retire()
        return route

    def remove(self, parts: Segments) -> bool:
        route = self.routes.pop(parts, None)
        if route is not None:
            route.retire()
        return route is not None

    def get(self, parts: Segments) -> Route | None:
        return self.routes.get(parts)

    def match(self, parts: Segments) -> tuple[Segments, Route] | None:
        """The route with the longest prefix of ``parts``, with that prefix."""
        for length in range(len(parts), -1, -1):
            route = self.routes.get(parts[:length])
            if route is not None:
                return parts[:length], route
        return None

    def as_json(self, inactive_since: float | None = None) -> dict:
        return {path_of(parts): route.as_json() for parts, route in self.routes.items()
                if inactive_since is None or route.last_activity < inactive_since}


class Hold:
    """Requests under ``parts`` wait until the hold is released (a route
    for ``parts`` is added, or it is deleted) or it expires."""

    def __init__(self, parts: Segments, timeout: float) -> None:
        self.parts = parts
        self.timeout = timeout
        self.expires = time.time() + timeout
        self.waiting = 0
        self.outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._timer = asyncio.get_running_loop().call_later(timeout, self.end, "expired")

    def restart(self, timeout: float) -> None:
        """Run ``timeout`` seconds from now instead."""
        self._timer.cancel()
        self.timeout, self.expires = timeout, time.time() + timeout
        self._timer = asyncio.get_running_loop().call_later(timeout, self.end, "expired")

    def end(self, outcome: str) -> None:
        """Wake every waiter with ``"released"`` or ``"expired"``."""
        self._timer.cancel()
        if not self.outcome.done():
            self.outcome.set_result(outcome)

    def as_json(self) -> dict:
        return {"timeout": self.timeout, "expires": iso(self.expires),
                "waiting": self.waiting}


class HoldExpired(Exception):
    """A request waited for a held session that did not come back in time."""

    def __init__(self, hold: Hold) -> None:
        super().__init__(f"session {path_of(hold.parts)} is moving and did not come "
                         f"back within {hold.timeout:g} s")


class Holds:
    """The active holds, by path."""

    def __init__(self) -> None:
        self.holds: dict[Segments, Hold] = {}
        self.added = 0  # holds placed so far (a restart is not a new one)
        #: called with (seconds waited, "released" or "expired") after each
        #: request that waited on a hold (the metrics' histogram)
        self.on_waited: Callable[[float, str], None] | None = None

    def add(self, parts: Segments, timeout: float) -> Hold:
        """Hold ``parts`` for ``timeout`` seconds from now (a second hold
        on the same path restarts the clock; its waiters keep waiting)."""
        hold = self.holds.get(parts)
        if hold is not None:
            hold.restart(timeout)
            return hold
        hold = self.holds[parts] = Hold(parts, timeout)
        self.added += 1
        hold.outcome.add_done_callback(lambda _: self._forget(hold))
        return hold

    def release(self, parts: Segments) -> bool:
        hold = self.holds.get(parts)
        if hold is not None:
            hold.end("released")
        return hold is not None

    def _forget(self, hold: Hold) -> None:
        if self.holds.get(hold.parts) is hold:
            del self.holds[hold.parts]

    def covering(self, parts: Segments) -> Hold | None:
        """The hold whose path is the longest prefix of ``parts``, if any."""
        if not self.holds:
            return None  # the common case, kept cheap
        for length in range(len(parts), -1, -1):
            hold = self.holds.get(parts[:length])
            if hold is not None:
                return hold
        return None

    async def wait(self, parts: Segments) -> None:
        """Return when no hold covers ``parts``; raise HoldExpired if the
        hold that covered it ran out."""
        started = time.monotonic()
        outcome = None  # (not covered: no wait to record)
        try:
            while (hold := self.covering(parts)) is not None:
                hold.waiting += 1
                try:
                    # shield: one waiter going away must not end the hold
                    outcome = await asyncio.shield(hold.outcome)
                finally:
                    hold.waiting -= 1
                if outcome == "expired":
                    raise HoldExpired(hold)
        finally:
            if self.on_waited is not None and outcome is not None:
                self.on_waited(time.monotonic() - started, outcome)

    def as_json(self) -> dict:
        return {path_of(parts): hold.as_json() for parts, hold in self.holds.items()}
