"""The session manager's HTTP API, under its service prefix.

- ``api/sessions``: the sessions and their history, a page at a time
  (``offset``, ``limit``), filtered by ``user``, ``state`` and ``since``;
  an admin (or a token allowed ``admin:users``) sees all, a user their own;
- ``metrics``: Prometheus metrics (session_proxy/manager/metrics.py), for a
  token with the ``read:metrics`` scope (JupyterHub's own for /hub/metrics)
  unless ``authenticate_metrics`` is off;
- ``health``: 200 while rounds of checks complete, 503 once the last one
  that did is older than ``health_max_age`` or the records don't answer;
  no token needed (as JupyterHub's /hub/health), and it says nothing about
  anyone's sessions.

Tokens are JupyterHub's, checked with the hub (``GET /hub/api/user``),
given as ``Authorization: token ...`` or ``Bearer ...`` (Prometheus's
``authorization`` setting sends the latter).
"""
from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from tornado import web

from session_proxy.manager.metrics import Health
from session_proxy.manager.records import SessionStore

STATES = ("running", "lost", "recovering", "stopped")


@dataclass
class ApiSettings:
    """The manager's settings its API reads (SessionManager's traits)."""
    default_limit: int
    max_limit: int
    authenticate_metrics: bool
    health_max_age: float


class Handler(web.RequestHandler):
    """Errors as one line of JSON, and the caller's identity from the hub."""

    def initialize(self, store: SessionStore, auth, settings: ApiSettings,
                   health: Health, registry: CollectorRegistry) -> None:
        self.store, self.auth, self.api = store, auth, settings
        self.health, self.registry = health, registry

    def write_error(self, status_code: int, **kwargs) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": status_code,
                                "message": self._reason if "exc_info" not in kwargs
                                else getattr(kwargs["exc_info"][1], "log_message", None)
                                or self._reason}))

    async def identity(self) -> dict:
        """The token's owner as the hub describes it (with its scopes);
        403 without a token the hub knows."""
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip() if scheme.lower() in ("token", "bearer") else ""
        model = (await self.auth.user_for_token(token, use_cache=True, sync=False)
                 if token else None)
        if not model:
            raise web.HTTPError(403, "a JupyterHub token is required")
        return model


def is_admin(model: dict) -> bool:
    return bool(model.get("admin")) or "admin:users" in model.get("scopes", [])


class SessionsHandler(Handler):
    """GET: a page of sessions, ``{"sessions": [...], "total", "offset",
    "limit", "next_offset"}`` (``next_offset`` null on the last page)."""

    async def get(self) -> None:
        model = await self.identity()
        user = self.get_query_argument("user", None)
        if not is_admin(model):
            if model.get("kind") != "user":
                raise web.HTTPError(403, "not allowed")
            if user not in (None, model["name"]):
                raise web.HTTPError(403, "a user sees only their own sessions")
            user = model["name"]
        offset = self.integer("offset", 0, 0)
        limit = self.integer("limit", self.api.default_limit, 1)
        if limit > self.api.max_limit:
            raise web.HTTPError(400, f"limit: at most {self.api.max_limit}")
        state = self.get_query_argument("state", None)
        if state is not None and state not in STATES:
            raise web.HTTPError(400, f"state: one of {', '.join(STATES)}, not {state!r}")
        history = self.get_query_argument("history", "1") not in ("0", "false", "no")
        page = self.store.page(offset=offset, limit=limit, user=user, state=state,
                               since=self.since(), history=history)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"sessions": page.sessions, "total": page.total,
                                "offset": page.offset, "limit": page.limit,
                                "next_offset": page.next_offset}))

    def integer(self, name: str, default: int, least: int) -> int:
        text = self.get_query_argument(name, None)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise web.HTTPError(400, f"{name}: an integer of at least {least}, not {text!r}")
        return value

    def since(self) -> datetime.datetime | None:
        text = self.get_query_argument("since", None)
        if text is None:
            return None
        try:
            # "Z" too: what JupyterHub's own timestamps end with.
            when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise web.HTTPError(400, f"since: an ISO 8601 time such as "
                                     f"2026-01-31T08:00:00Z, not {text!r}") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        # The records' times are UTC (SQLite keeps them without a zone).
        return when.astimezone(datetime.timezone.utc)


class MetricsHandler(Handler):
    """GET: the metrics in Prometheus's text format."""

    async def get(self) -> None:
        if self.api.authenticate_metrics:
            model = await self.identity()
            if not (model.get("admin") or "read:metrics" in model.get("scopes", [])):
                raise web.HTTPError(403, "the read:metrics scope is required")
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        # The module's counters, then this manager's own (its records).
        self.finish(generate_latest(REGISTRY) + generate_latest(self.registry))


class HealthHandler(Handler):
    """GET: 200 or 503, with what it is judged by."""

    def get(self) -> None:
        healthy, model = self.health.report(self.api.health_max_age, self.store.ping())
        model["healthy"] = healthy
        self.set_status(200 if healthy else 503)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(model))


def handlers(prefix: str, **kwargs) -> list[tuple]:
    """The API's routes under ``prefix`` (``/services/NAME/``)."""
    # A service's name may hold what a pattern reads otherwise ("." say).
    prefix = re.escape(prefix)
    return [(rf"{prefix}api/sessions", SessionsHandler, kwargs),
            (rf"{prefix}metrics", MetricsHandler, kwargs),
            (rf"{prefix}health", HealthHandler, kwargs)]
