"""configurable-http-proxy's REST API, plus holds.

``/api/routes[/<path>]``: GET (all, optionally ``?inactive_since=<iso>``,
or one), POST ``{"target": url, ...}`` (201), DELETE (204, 404 if absent).
``/api/holds[/<path>]``: GET (all), POST ``{"timeout": s}`` (201), DELETE.
``/metrics``: Prometheus metrics (``metrics``).
``/health``: 200 and ``{"status": "ok", ...}`` while the proxy serves.
Every request needs ``Authorization: token <CONFIGPROXY_AUTH_TOKEN>``,
except ``/health`` and, with ``--metrics-without-token``, ``/metrics``.
"""
from __future__ import annotations

import hmac
import json
import logging
import math
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST
from tornado import web

from session_proxy.proxy.routes import BadPath, BadTarget, Holds, RouteTable, parse_iso, segments

log = logging.getLogger("session_proxy")
DEFAULT_HOLD_S = 30.0
MAX_HOLD_S = 24 * 3600.0


class ApiHandler(web.RequestHandler):
    """Token check, JSON in and out, and the path below the API prefix."""

    prefix = ""

    def initialize(self, routes: RouteTable, holds: Holds, token: str) -> None:
        self.routes, self.holds, self.token = routes, holds, token

    def prepare(self) -> None:
        given = self.request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        # No token configured means a closed API, never an open one.
        if not (self.token and scheme.lower() == "token"
                and hmac.compare_digest(value.strip().encode(), self.token.encode())):
            raise web.HTTPError(403)

    def parts(self) -> tuple[str, ...]:
        """The path after the API prefix, as segments (400 if unroutable)."""
        try:
            return segments(self.request.path[len(self.prefix):] or "/")
        except BadPath as error:
            raise web.HTTPError(400, reason=str(error)[:200]) from None

    def body(self) -> dict:
        if not self.request.body:
            return {}
        try:
            data = json.loads(self.request.body)
        except ValueError:
            raise web.HTTPError(400, reason="body is not JSON") from None
        if not isinstance(data, dict):
            raise web.HTTPError(400, reason="body is not a JSON object")
        return data

    def send_json(self, data: dict, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))

    def check_xsrf_cookie(self) -> None:
        """A token in a header is not a cookie: no XSRF check."""


class RoutesHandler(ApiHandler):
    prefix = "/api/routes"

    def get(self, _: str = "") -> None:
        if self.request.path.rstrip("/") != self.prefix:
            route = self.routes.get(self.parts())
            if route is None:
                raise web.HTTPError(404)
            return self.send_json(route.as_json())
        since = self.get_query_argument("inactive_since", None)
        try:
            cutoff = parse_iso(since) if since else None
        except ValueError:
            raise web.HTTPError(400, reason="inactive_since is not an ISO 8601 time") from None
        self.send_json(self.routes.as_json(cutoff))

    def post(self, _: str = "") -> None:
        parts, data = self.parts(), self.body()
        try:
            self.routes.add(parts, data)
        except BadTarget as error:
            raise web.HTTPError(400, reason=str(error)[:200]) from None
        # The session is back: whoever waited on its hold goes there now.
        self.holds.release(parts)
        log.info("route /%s -> %s", "/".join(parts), data["target"])
        self.set_status(201)
        self.finish()

    def delete(self, _: str = "") -> None:
        parts = self.parts()
        if not self.routes.remove(parts):
            raise web.HTTPError(404)
        log.info("route /%s removed", "/".join(parts))
        self.set_status(204)
        self.finish()


class HoldsHandler(ApiHandler):
    prefix = "/api/holds"

    def get(self, _: str = "") -> None:
        self.send_json(self.holds.as_json())

    def post(self, _: str = "") -> None:
        parts = self.parts()
        timeout = self.body().get("timeout", DEFAULT_HOLD_S)
        if (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
                or not math.isfinite(timeout) or not 0 < timeout <= MAX_HOLD_S):
            raise web.HTTPError(400, reason=f"timeout must be a number of seconds "
                                            f"in (0, {MAX_HOLD_S:g}]")
        hold = self.holds.add(parts, float(timeout))
        log.info("hold /%s for %g s", "/".join(parts), timeout)
        self.send_json(hold.as_json(), 201)

    def delete(self, _: str = "") -> None:
        parts = self.parts()
        if not self.holds.release(parts):
            raise web.HTTPError(404)
        log.info("hold /%s released", "/".join(parts))
        self.set_status(204)
        self.finish()


class MetricsHandler(ApiHandler):
    """Prometheus metrics, behind the token unless ``open``."""

    def initialize(self, routes: RouteTable, holds: Holds, token: str,
                   exposition: Callable[[], bytes], open: bool) -> None:
        super().initialize(routes, holds, token)
        self.exposition, self.open = exposition, open

    def prepare(self) -> None:
        if not self.open:
            super().prepare()

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.exposition())


class HealthHandler(web.RequestHandler):
    """No token: a load balancer or a probe asks it. The answer says only
    that the proxy runs, and how many routes and websockets it has."""

    def initialize(self, status: Callable[[], dict]) -> None:
        self.status = status

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps({"status": "ok", **self.status()}))


def api_app(routes: RouteTable, holds: Holds, token: str,
            exposition: Callable[[], bytes] | None = None, metrics_open: bool = False,
            status: Callable[[], dict] | None = None) -> web.Application:
    state = {"routes": routes, "holds": holds, "token": token}
    handlers: list = [
        (r"/api/routes(/.*)?", RoutesHandler, state),
        (r"/api/holds(/.*)?", HoldsHandler, state),
        (r"/health", HealthHandler, {"status": status or dict}),
    ]
    if exposition is not None:
        handlers.append((r"/metrics", MetricsHandler,
                         {**state, "exposition": exposition, "open": metrics_open}))
    return web.Application(handlers, log_function=lambda handler: log.debug(
        "api %s %s %s", handler.get_status(), handler.request.method, handler.request.uri))
