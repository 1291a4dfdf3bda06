"""The session manager: keeps users' sessions alive when their server is lost.

A JupyterHub service (run by the hub, with a token allowed to list users
and to read, start and stop servers: scopes ``list:users`` and
``servers``). What it costs follows what changes, not how many servers
there are: every ``interval`` it lists the proxy's routes (one request;
the hub's routes name their user and server) and asks the hub about the
users whose routes came, went or moved; every ``sync_interval`` it lists
all active servers, page by page. It holds one idle connection to each
server (no request is sent on it, so the server counts no activity): a
server that ends closes it, and is checked at once. Every
``probe_interval``, spread over that time, and every round while a
server fails, it asks the server itself whether it is there (``GET
<url>api``, at the target the browser's requests go to), which finds what
a connection can't tell (a node cut off, a stopped process). That check
carries no credential at all -- no token, no cookie, no redirect followed,
no proxy from the environment -- since whatever listens at a user's
target may be anyone's process (a user who killed their server and took
its port): it learns liveness only, and one server's answer (however
malformed, large or slow) can cost its own session a failed check, never
the others theirs. A server that stops
answering ``lost_after`` times in a row while the hub still counts it as
running has been lost (its container killed, its job cancelled or timed
out, its node gone): the manager holds the session's route on the session
proxy, so the browser's requests wait instead of failing, has the hub stop
what is left of the server and start it again with the same user options
(on Slurm perhaps on another node), and the hub's new route ends the hold
the moment the new server answers. Same URL, no user action.

A server the hub stops while it still answered was stopped on purpose (by
its user, an admin, the culler): it is recorded as stopped and left alone.
One that went while the manager itself was down (not seen by this
process) has no such evidence: it is recorded as lost and, with
``recover``, started again.

Records and their history (started, lost, recovering, recovered, stopped)
are kept through SQLAlchemy (SQLite by default); ``GET
<service prefix>api/sessions`` lists them a page at a time, all of them
for an admin, a user's own for a user; ``<service prefix>metrics`` and
``<service prefix>health`` say how the manager is doing
(session_proxy/manager/api.py, metrics.py). Losses and recoveries are
logged at the default level, INFO.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import resource
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import quote, unquote, urlsplit

import aiohttp
from tornado import web
from traitlets import Bool, Float, Integer, Unicode, default
from traitlets.config import Application

from session_proxy.manager import metrics
from session_proxy.manager.api import ApiSettings, handlers
from session_proxy.manager.records import SessionRecord, SessionStore, StoreError

RouteKey = tuple[str, ...]
#: A server: (user, server name).
Key = tuple[str, str]


def route_key(path: str) -> RouteKey:
    """One key for a server's path however it is spelt: the hub's server
    URLs are percent-encoded (``/user/a%2Bb@x/``), the session proxy lists
    its routes decoded (``/user/a+b@x``), configurable-http-proxy as
    given. Both sides go through this: decoded, non-empty segments."""
    return tuple(unquote(s) for s in path.split("?", 1)[0].split("/") if s)


#: JupyterHub (>= 2) answers a list request with this Accept header as
#: {"items": [...], "_pagination": {"next": {"offset", "limit"} | None}}.
PAGINATION = "application/jupyterhub-pagination+json"


def keep_alive(sock, idle: float) -> None:
    """TCP keepalive on ``sock``: probes after ``idle`` s of silence, 1 s
    apart, the connection given up after 3 unanswered (Linux's options)."""
    if sock is None or idle <= 0:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", max(1, round(idle))), ("TCP_KEEPINTVL", 1),
                          ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class HubClient:
    """The few JupyterHub REST calls the manager makes, with its token.
    ``calls`` counts them (for the check's figures and metrics)."""

    def __init__(self, http: aiohttp.ClientSession, api_url: str, page_size: int = 200):
        self.http, self.api, self.page_size = http, api_url.rstrip("/"), page_size
        self.calls = 0

    def _server_url(self, user: str, name: str) -> str:
        base = f"{self.api}/users/{quote(user)}"
        return f"{base}/servers/{quote(name)}" if name else f"{base}/server"

    async def _get(self, url: str, **kw) -> object:
        self.calls += 1
        async with self.http.get(url, **kw) as r:
            r.raise_for_status()
            return await r.json()

    async def servers(self) -> dict[Key, dict]:
        """Every active server's model, by (user, server name), page by
        page: the hub answers at most ``api_page_max_limit`` users (200 by
        default) to one request, whatever it is asked for."""
        found: dict[Key, dict] = {}
        offset = 0
        while True:
            page = await self._get(f"{self.api}/users", headers={"Accept": PAGINATION},
                                   params={"state": "active", "offset": str(offset),
                                           "limit": str(self.page_size)})
            if isinstance(page, list):
                # A hub that ignores the header: a full page may have more
                # after it, a short one is the last.
                users, following = page, (offset + len(page)
                                          if len(page) >= self.page_size else None)
            else:
                users = page.get("items") or []
                following = ((page.get("_pagination") or {}).get("next") or {}).get(
                    "offset")
            for u in users:
                found.update(user_servers(u))
            if following is None or following <= offset or not users:
                return found
            offset = following

    async def user(self, user: str) -> dict[Key, dict]:
        """One user's servers (none if there is no such user)."""
        self.calls += 1
        async with self.http.get(f"{self.api}/users/{quote(user)}") as r:
            if r.status == 404:
                return {}
            r.raise_for_status()
            return user_servers(await r.json())

    async def server(self, user: str, name: str) -> dict | None:
        return (await self.user(user)).get((user, name))

    async def stop(self, user: str, name: str) -> None:
        self.calls += 1
        async with self.http.delete(self._server_url(user, name)) as r:
            if r.status not in (202, 204, 400, 404):  # 400/404: already stopped
                raise RuntimeError(f"stopping {user}/{name}: HTTP {r.status} "
                                   f"{await r.text()}")

    async def start(self, user: str, name: str, options: dict) -> None:
        self.calls += 1
        async with self.http.post(self._server_url(user, name), json=options) as r:
            if r.status not in (201, 202):
                raise RuntimeError(f"starting {user}/{name}: HTTP {r.status} "
                                   f"{await r.text()}")


def user_servers(model: dict) -> dict[Key, dict]:
    """{(user, server name): server model} of a user's model."""
    return {(model["name"], name): server
            for name, server in (model.get("servers") or {}).items()}


class ProxyClient:
    """The session proxy's route API: routes, and holds while a session
    moves (configurable-http-proxy has no holds: then requests fail during
    the move, as without the manager, and the move still happens)."""

    def __init__(self, http: aiohttp.ClientSession, api_url: str, token: str):
        self.http, self.api = http, api_url.rstrip("/")
        self.headers = {"Authorization": f"token {token}"}

    async def routes(self) -> dict[RouteKey, dict]:
        """{route_key(path): route}."""
        async with self.http.get(f"{self.api}/api/routes", headers=self.headers) as r:
            r.raise_for_status()
            return {route_key(path): route for path, route in (await r.json()).items()}

    async def hold(self, path: str, timeout: float) -> bool:
        try:
            async with self.http.post(f"{self.api}/api/holds{path}", headers=self.headers,
                                      json={"timeout": timeout}) as r:
                return r.status in (200, 201)
        except aiohttp.ClientError:
            return False

    async def release(self, path: str) -> None:
        try:
            async with self.http.delete(f"{self.api}/api/holds{path}",
                                        headers=self.headers):
                pass
        except aiohttp.ClientError:
            pass


class Watch(asyncio.Protocol):
    """An idle connection to a server: ``ended`` is set when it closes
    (False) or when the server sends anything unasked (True)."""

    def __init__(self, ended: asyncio.Future):
        self.ended = ended

    def data_received(self, data: bytes) -> None:
        if not self.ended.done():
            self.ended.set_result(True)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(False)


class SessionManager(Application):
    """Notice lost servers within seconds and start them again."""

    name = "chspawner-session-manager"
    description = __doc__.splitlines()[0]

    hub_api_url = Unicode(help="JupyterHub's API (default: $JUPYTERHUB_API_URL).").tag(
        config=True)
    api_token = Unicode(help="The service's hub token (default: $JUPYTERHUB_API_TOKEN).",
                        ).tag(config=True)
    proxy_api_url = Unicode("http://127.0.0.1:8001",
                            help="The session proxy's route API.").tag(config=True)
    proxy_auth_token = Unicode(help="The proxy's token (default: "
                               "$CONFIGPROXY_AUTH_TOKEN).").tag(config=True)
    db_url = Unicode("sqlite:///chspawner-sessions.sqlite",
                     help="Where the records live: an SQLAlchemy URL, sqlite:///PATH or "
                     "postgresql+psycopg://USER@HOST/DB (the chspawner[postgres] extra). "
                     "Its schema is upgraded at start.").tag(config=True)
    config_file = Unicode(help="A Python config file (c.SessionManager.db_url = ...): "
                          "settings, such as a database URL with its password, "
                          "kept out of the hub's service list.").tag(config=True)
    interval = Float(1.0, help="Seconds between rounds. A round lists the proxy's "
                     "routes (one request), asks the hub about the users whose routes "
                     "came, went or changed, and checks the servers that are due. A "
                     "killed server's loss is noticed within about lost_after rounds.",
                     ).tag(config=True)
    sync_interval = Float(30.0, help="Seconds between full listings of the hub's active "
                          "servers (paged), which catch whatever the routes did not show "
                          "(a server started and stopped between two rounds).").tag(
        config=True)
    page_size = Integer(200, help="Users asked for per page of a full listing (the hub "
                        "answers at most its api_page_max_limit).").tag(config=True)
    watch_keepalive = Float(5.0, help="Seconds of silence on a server's idle watch "
                            "connection after which the kernel's TCP keepalive asks the "
                            "server's host (3 probes, 1 s apart): a node cut off without a "
                            "FIN is noticed within about this + 3 s instead of at the next "
                            "check. Answered by the host's TCP stack, never by the server: "
                            "no activity, no work for it. 0: off.").tag(config=True)
    probe_interval = Float(30.0, help="Seconds between checks (GET <url>api) of a server "
                           "whose connection stays open. A killed server is noticed at "
                           "once, by the idle connection the manager holds to it "
                           "closing; these checks find the ones whose connection can't "
                           "tell: a node cut off, a stopped process.").tag(config=True)
    probe_concurrency = Integer(100, help="Checks of servers under way at once at most.",
                                ).tag(config=True)
    watch = Bool(True, help="Hold one idle connection to each server (no request is "
                 "sent on it), so that its closing tells of the server's end at once. "
                 "Off: only the checks every probe_interval.").tag(config=True)
    probe_timeout = Float(2.0, help="Seconds a server gets to answer a check.").tag(
        config=True)
    stall_timeout = Float(60.0, help="Seconds a server that accepts connections but "
                          "answers nothing gets before it counts as lost: it is busy or "
                          "stopped (SIGSTOP, a suspended job), not gone, and starting it "
                          "again would end its kernels.").tag(config=True)
    lost_after = Integer(2, help="Failed checks in a row after which a server that "
                         "the hub still counts as running is lost.").tag(config=True)
    recover = Bool(True, help="Start lost sessions again (else only record them).").tag(
        config=True)
    max_recoveries = Integer(10, help="Recoveries of one session per hour, after which "
                             "it is left stopped (a server that can't stay up).").tag(
        config=True)
    hold_timeout = Float(120.0, help="Seconds the proxy holds a session's requests "
                         "while it is started again.").tag(config=True)
    service_url = Unicode(help="Where the manager's API listens (default: "
                          "$JUPYTERHUB_SERVICE_URL).").tag(config=True)
    api_page_size = Integer(200, help="Sessions in one page of api/sessions when the "
                            "request gives no limit.").tag(config=True)
    api_max_page_size = Integer(1000, help="The most sessions one page of api/sessions "
                                "may ask for (limit=); more is refused.").tag(config=True)
    authenticate_metrics = Bool(True, help="Require a JupyterHub token with the "
                                "read:metrics scope (an admin's has it) for <service "
                                "prefix>metrics, as JupyterHub's authenticate_prometheus; "
                                "False: anyone who reaches it may read it.").tag(config=True)
    health_max_age = Float(0.0, help="Seconds since the last completed round of checks "
                           "after which <service prefix>health answers 503 (0: ten "
                           "intervals, at least 30 s).").tag(config=True)

    # Losses and recoveries are logged at INFO: visible by default.
    @default("log_level")
    def _log_level(self):
        return logging.INFO

    @default("log_format")
    def _log_format(self):
        return "[%(levelname)1.1s %(asctime)s %(name)s] %(message)s"

    aliases = {"config": "SessionManager.config_file",
               "db-url": "SessionManager.db_url", "proxy-api-url":
               "SessionManager.proxy_api_url", "interval": "SessionManager.interval",
               "sync-interval": "SessionManager.sync_interval",
               "probe-interval": "SessionManager.probe_interval",
               "max-recoveries": "SessionManager.max_recoveries",
               "log-level": "Application.log_level"}

    @default("hub_api_url")
    def _hub_api_url(self):
        return os.environ.get("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api")

    @default("api_token")
    def _api_token(self):
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    @default("proxy_auth_token")
    def _proxy_auth_token(self):
        return os.environ.get("CONFIGPROXY_AUTH_TOKEN", "")

    @default("service_url")
    def _service_url(self):
        return os.environ.get("JUPYTERHUB_SERVICE_URL", "")

    # ------------------------------------------------------------ checks --

    def initialize(self, argv=None) -> None:
        super().initialize(argv)
        if self.config_file:
            try:
                self.load_config_file(self.config_file)
            except Exception as err:  # a missing file, a syntax error in it
                raise SystemExit(f"{self.name}: {self.config_file}: {err}") from None
            # The command line wins over the file.
            self.update_config(self.cli_config)
        if not 1 <= self.api_page_size <= self.api_max_page_size \
                or self.health_max_age < 0:
            raise SystemExit(f"{self.name}: api_page_size must be at least 1 and at most "
                             f"api_max_page_size ({self.api_max_page_size}), and "
                             f"health_max_age not negative")
        try:
            self.store = SessionStore(self.db_url)
        except (StoreError, PermissionError) as err:
            # One line and a failed start: not a traceback.
            raise SystemExit(f"{self.name}: {err}") from None
        self.health = metrics.Health()
        self.failures: dict[Key, int] = {}
        self.stalled_since: dict[Key, float] = {}
        self.recovering: set[Key] = set()
        self.recent: dict[Key, list[float]] = {}
        # Servers this process has seen the hub list as ready: only for
        # those can a disappearance be told apart as a stop by request.
        self.seen: set[Key] = set()
        # The hub's servers as last heard, by user: all of them from a full
        # listing, one user's from a question about that user.
        self.hub_view: dict[str, dict[Key, dict]] = {}
        self.last_sync = -float("inf")
        # Routes the hub added (their data names user and server), by server.
        self.route_of: dict[Key, str] = {}
        self.route_paths: dict[RouteKey, str] = {}
        # Users to ask about in the next round: a server being stopped, a
        # question that failed, a session just recovered.
        self.unsettled: set[str] = set()
        # The servers checked: where (path, target), when next, the idle
        # connection held to each, the checks under way.
        self.paths: dict[Key, str] = {}
        self.targets: dict[Key, str] = {}
        self.next_probe: dict[Key, float] = {}
        self.watchers: dict[Key, asyncio.Task] = {}
        self.probing: set[Key] = set()
        self.tasks: set[asyncio.Task] = set()
        #: Running totals, for metrics: rounds, full_syncs, hub_calls,
        #: probes, watch_closed (idle connections found closed).
        self.totals: dict[str, int] = dict.fromkeys(
            ("rounds", "full_syncs", "hub_calls", "probes", "watch_closed"), 0)
        #: The last round's figures: servers (tracked), asked (users the hub
        #: was asked about), hub_calls, probes (started), full (a full
        #: listing), seconds.
        self.last_round: dict[str, float] = {}

    async def check_once(self) -> dict[str, float]:
        """One round: the proxy's routes (one request); the hub asked about
        the users whose routes came, went or moved (and about everyone every
        ``sync_interval``); new sessions recorded, stopped ones noted; the
        servers due a check checked (in the background). What it cost comes
        back (and stays in ``last_round``)."""
        began, calls = time.monotonic(), self.hub.calls
        ask = set(self.unsettled)
        routes = await self._routes()
        if routes is not None:
            attributed = {(r["user"], str(r.get("server_name") or "")): r["target"]
                          for r in routes.values()
                          if isinstance(r.get("user"), str) and r.get("target")}
            changed = attributed.keys() ^ self.route_of.keys()
            changed |= {k for k, t in attributed.items() if self.route_of.get(k, t) != t}
            ask |= {user for user, _ in changed}
            self.route_of = attributed
            self.route_paths = {path: r.get("target", "") for path, r in routes.items()}
        try:
            full = await self._learn(ask)
        except BaseException:
            # The hub or the records failing: what this round was to learn
            # is asked again in the next.
            self.unsettled |= ask
            raise
        probes = self._probe_due()
        self.last_round = {"servers": len(self.targets), "asked": len(ask),
                           "hub_calls": self.hub.calls - calls, "probes": probes,
                           "full": full, "seconds": time.monotonic() - began}
        self.totals["rounds"] += 1
        self.totals["full_syncs"] += full
        self.totals["hub_calls"] += self.hub.calls - calls
        return self.last_round

    async def _learn(self, ask: set[str]) -> bool:
        """The hub asked about ``ask`` (and everyone, when a full listing
        is due: whether it was comes back), the records brought in line."""
        full = time.monotonic() - self.last_sync >= self.sync_interval
        if full:
            servers = await self.hub.servers()
            self.last_sync = time.monotonic()
            with self.store.transaction() as db:
                # Absent from the listing: asked about one by one before
                # anything is concluded (a server stopping while the pages
                # were read shifts the next page, so one may be missed).
                ask |= {r.user for r in self.store.live(db)
                        if (r.user, r.server_name) not in servers}
            self.hub_view = {}
            for key, model in servers.items():
                self.hub_view.setdefault(key[0], {})[key] = model
        answered = await self._ask(ask)
        if full or ask:  # (a quiet round asks nothing, reads no record)
            self._reconcile(None if full else answered, unsure=ask - answered)
        return full

    async def _routes(self) -> dict[RouteKey, dict] | None:
        try:
            return await self.proxy.routes()
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            # The proxy restarting: the hub and the checks go on without it.
            self.log.warning("session manager: listing the proxy's routes failed: %s: %s",
                             type(e).__name__, str(e)[:200])
            return None

    async def _ask(self, users: set[str]) -> set[str]:
        """The hub's word on each of ``users`` (a few at a time): those
        answered; the others stay to be asked again."""
        slots = asyncio.Semaphore(16)

        async def one(user: str) -> str | None:
            async with slots:
                try:
                    servers = await self.hub.user(user)
                except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                    self.log.warning("session manager: asking the hub about %s failed: "
                                     "%s", user, e)
                    return None
            self.hub_view[user] = servers
            return user
        found = await asyncio.gather(*(one(u) for u in users))
        return {u for u in found if u is not None}

    def _reconcile(self, users: set[str] | None, unsure: set[str]) -> None:
        """Records against the hub's view, of ``users`` (None: everyone);
        ``unsure``: users whose servers the hub could not be asked about
        (nothing concluded about them)."""
        self.unsettled = set(unsure) | (self.unsettled - users if users is not None
                                        else set())
        scope = self.hub_view.keys() if users is None else users
        view = {key: model for user in scope if user not in unsure
                for key, model in self.hub_view.get(user, {}).items()}
        with self.store.transaction() as db:
            for record in self.store.live(db, None if users is None else set(users)):
                key = (record.user, record.server_name)
                if key in self.recovering or key in view or record.user in unsure:
                    continue
                self._untrack(key)
                if key not in self.seen:
                    # Gone while the manager was down (or before its first
                    # check): nothing says it was stopped on purpose, and
                    # a session lost unnoticed must not pass for one.
                    self._start_recovery(record, "gone while the session manager was "
                                                 "down; no stop by request on record")
                elif self.failures.get(key, 0) < self.lost_after:
                    # It answered until the hub stopped it: on purpose.
                    record.state = "stopped"
                    self.store.add_event(record, "stopped", "stopped by request")
                else:  # the hub noticed the loss before we did
                    self._start_recovery(record, "the hub found the server gone")
            newest = self.store.newest(db, {key for key, model in view.items()
                                            if key not in self.recovering
                                            and model.get("ready")})
            for key, model in view.items():
                if model.get("pending") == "stop":
                    # The hub stopping it is what a stop by request looks
                    # like: no longer a server gone unseen. Followed until
                    # it is gone.
                    self.seen.add(key)
                    self.unsettled.add(key[0])
                if not model.get("ready") and key in self.route_of:
                    # Its route comes just before the hub counts it ready:
                    # asked again until it does. (One pending without a
                    # route, a job in Slurm's queue, costs nothing.)
                    self.unsettled.add(key[0])
                if key in self.recovering or not model.get("ready"):
                    continue
                record = newest.get(key)
                if record is not None and record.state != "stopped" \
                        and record.instance != model.get("started"):
                    # Stopped and started again between two checks, not by us.
                    record.state = "stopped"
                    self.store.add_event(record, "stopped", "replaced by a new server")
                if record is None or record.state == "stopped":
                    record = self._new_record(db, key, model)
                self.seen.add(key)
                target = self.route_of.get(key) or self.route_paths.get(
                    route_key(model["url"]), "")
                if target and target != record.target:
                    if record.target:
                        self.store.add_event(record, "moved", f"now at {target}")
                    record.target = target
                # With no route (the proxy restarting with the hub, the hub
                # not done re-adding routes), where it ran last.
                self._track(key, model["url"], record.target)
        # A server that answered no more stays unchecked while being stopped.
        for key in list(self.next_probe):
            if self.hub_view.get(key[0], {}).get(key, {}).get("pending"):
                self.next_probe[key] = time.monotonic() + self.interval

    def _new_record(self, db, key: Key, model: dict) -> SessionRecord:
        options = model.get("user_options") or {}
        record = SessionRecord(user=key[0], server_name=key[1], url=model["url"],
                               user_options=options, image=str(options.get("image", "")),
                               mode=str(options.get("mode", "")),
                               instance=model.get("started") or "")
        db.add(record)
        self.store.add_event(record, "started", f"at {model['url']}")
        self.failures[key] = 0
        return record

    # --------------------------------------------------------- liveness --

    def _track(self, key: Key, path: str, target: str) -> None:
        """Check ``key``'s server at ``target`` from now on: first a check
        somewhen within ``probe_interval`` (spread, so that a thousand new
        servers are not all checked in one round), and an idle connection."""
        self.paths[key] = path
        if self.targets.get(key) == target and key in self.next_probe:
            self._start_watching(key)  # (again, after a recovery)
            return
        self.targets[key] = target
        self._stop_watching(key)
        self.next_probe[key] = time.monotonic() + random.uniform(0, self.probe_interval)
        self._start_watching(key)

    def _untrack(self, key: Key) -> None:
        self._stop_watching(key)
        for state in (self.paths, self.targets, self.next_probe, self.failures,
                      self.stalled_since):
            state.pop(key, None)

    def _probe_due(self) -> int:
        """Start the checks that are due (each in the background: a slow
        server holds up no round). How many were started."""
        now, started = time.monotonic(), 0
        for key, due in list(self.next_probe.items()):
            if due > now or key in self.probing or key in self.recovering \
                    or not self.targets.get(key):
                continue
            self.next_probe[key] = now + self.probe_interval
            self.probing.add(key)
            self._background(self._probe_bounded(key))
            started += 1
        self.totals["probes"] += started
        return started

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _probe_bounded(self, key: Key) -> None:
        try:
            async with self.probe_slots:
                path, target = self.paths.get(key), self.targets.get(key)
                if path is None or not target:
                    return  # no longer tracked
                await self._probe_confined(key, path, target)
        finally:
            self.probing.discard(key)
        if key not in self.next_probe:
            return
        if self.failures.get(key) or key in self.stalled_since:
            # Failing, or not answering: asked every round until it is clear.
            self.next_probe[key] = 0.0
        elif key not in self.watchers:
            self._start_watching(key)

    def _start_watching(self, key: Key) -> None:
        target = self.targets.get(key, "")
        if self.watch and target and key not in self.watchers:
            task = asyncio.get_running_loop().create_task(self._watch(key, target))
            self.watchers[key] = task

    def _stop_watching(self, key: Key) -> None:
        task = self.watchers.pop(key, None)
        if task is not None:
            task.cancel()

    async def _watch(self, key: Key, target: str) -> None:
        """Hold an idle connection to the server (no request on it: the
        server counts nothing) until it closes: then check at once. A
        server sending anything on it unasked is left to the checks."""
        try:
            url = urlsplit(target)
            port = url.port or (443 if url.scheme == "https" else 80)
            ended = asyncio.get_running_loop().create_future()
            async with asyncio.timeout(self.probe_timeout):
                transport, _ = await asyncio.get_running_loop().create_connection(
                    lambda: Watch(ended), url.hostname, port)
            keep_alive(transport.get_extra_info("socket"), self.watch_keepalive)
            try:
                sent = await ended
            finally:
                transport.close()
        except (OSError, TimeoutError, ValueError):
            sent = False
        if self.watchers.get(key) is asyncio.current_task():
            del self.watchers[key]
            if sent:  # not a server to be watched this way: checks only
                self.watchers[key] = asyncio.current_task()
        self.totals["watch_closed"] += 1
        if key in self.next_probe and key not in self.probing \
                and key not in self.recovering:
            # Checked at once (a refusal is the first failed check), then
            # every round until it answers or is lost.
            self.next_probe[key] = time.monotonic() + self.probe_interval
            self.probing.add(key)
            self.totals["probes"] += 1
            await self._probe_bounded(key)

    async def _probe_confined(self, key: Key, path: str, target: str) -> None:
        """A check whose failure, whatever it is, stays with its session."""
        try:
            await self._probe(key, path, target)
        except Exception as e:  # noqa: BLE001 -- one server must not stop the round
            metrics.ERRORS.labels("probe").inc()
            self.log.error("session %s/%s: check failed: %s: %s", *key,
                           type(e).__name__, str(e)[:200])

    async def _probe(self, key: Key, path: str, target: str) -> None:
        """Ask the server, where it runs, whether it is there: ``GET
        <path>api`` (jupyter_server's version, no login needed), through
        the credential-free session, reading the status line and headers
        only (the body, whatever its size, is never read)."""
        if not target:
            return  # not known yet: nothing to judge by
        # Connecting and reading are timed apart: a refused or unanswered
        # connection means the server is gone; an accepted one that gets no
        # answer means it is there but stuck. The whole check is bounded
        # too, so a server trickling its headers can't hold the round.
        timeout = aiohttp.ClientTimeout(sock_connect=self.probe_timeout,
                                        sock_read=self.probe_timeout)
        stalled = False
        try:
            async with asyncio.timeout(2 * self.probe_timeout + 1) as bound:
                async with self.probe_http.get(f"{target}{path}api", timeout=timeout,
                                               allow_redirects=False):
                    pass  # any answer at all: the server is there
            alive = True
        except aiohttp.SocketTimeoutError:
            alive, stalled = False, True
        except TimeoutError:
            alive, stalled = False, bound.expired()
        except (aiohttp.ClientError, ValueError):
            alive = False
        if stalled:
            since = self.stalled_since.setdefault(key, time.monotonic())
            stalled_for = time.monotonic() - since
            if stalled_for < self.stall_timeout:
                return  # busy: neither alive nor lost yet
            metrics.PROBE_FAILURES.labels("stalled").inc()
            await self._count_failure(key, f"{target} has accepted connections but answered "
                                     f"nothing for {stalled_for:.0f} s")
            return
        self.stalled_since.pop(key, None)
        if alive:
            self.failures[key] = 0
            return
        metrics.PROBE_FAILURES.labels("unanswered").inc()
        await self._count_failure(key, f"no answer at {target}")

    async def _count_failure(self, key: Key, why: str) -> None:
        self.failures[key] = self.failures.get(key, 0) + 1
        if self.failures[key] < self.lost_after:
            return
        # Before a loss is declared, the hub's word on this one server: one
        # it is stopping, or has replaced, is no loss. (A hub that can't
        # answer is no evidence either way: the checks decide.)
        try:
            model = await self.hub.server(*key)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            model = None
        if not await self._still_routed(key):
            # The hub removes a server's route before it stops it on
            # request: checks failing after that are the stop, not a loss
            # (the hub's own poll, far slower than these checks, is not
            # what removed it). Left for the hub's word in the next round.
            self.failures[key] = self.lost_after - 1
            self.unsettled.add(key[0])
            return
        with self.store.transaction() as db:
            record = self.store.find(db, *key)
            if record is None or record.state != "running" or key in self.recovering:
                return
            if model is not None and (model.get("pending") == "stop" or (
                    model.get("ready") and model.get("started") != record.instance)):
                self.seen.add(key)
                self.unsettled.add(key[0])
                return
            self._start_recovery(record, f"{why} ({self.failures[key]} checks in a row)")

    async def _still_routed(self, key: Key) -> bool:
        """Whether the proxy routes to ``key``'s server now (a fresh
        listing; True when the proxy can't say)."""
        routes = await self._routes()
        if routes is None:
            return True
        return any(r.get("user") == key[0] and str(r.get("server_name") or "") == key[1]
                   for r in routes.values()) or route_key(self.paths.get(key, "")) in routes

    # ---------------------------------------------------------- recovery --

    def _start_recovery(self, record: SessionRecord, why: str) -> None:
        key = (record.user, record.server_name)
        self.log.warning("session %s/%s lost: %s", *key, why)
        metrics.LOSSES.inc()
        record.state = "lost"
        self.store.add_event(record, "lost", why)
        recent = [t for t in self.recent.get(key, []) if time.monotonic() - t < 3600]
        if not self.recover or len(recent) >= self.max_recoveries:
            record.state = "stopped"
            detail = ("recovery is off" if not self.recover else
                      f"lost {len(recent)} times in the last hour; left stopped")
            self.store.add_event(record, "recovery-failed", detail)
            metrics.RECOVERIES_FAILED.labels("off" if not self.recover else "limit").inc()
            self.log.warning("session %s/%s not recovered: %s", *key, detail)
            return
        metrics.RECOVERIES_STARTED.inc()
        self.recent[key] = [*recent, time.monotonic()]
        self.recovering.add(key)
        self._stop_watching(key)
        options, url = dict(record.user_options), record.url
        task = asyncio.get_running_loop().create_task(self._recover(key, url, options))
        task.add_done_callback(lambda _: self.recovering.discard(key))

    async def _recover(self, key: Key, path: str, options: dict) -> None:
        """Hold the route, stop what's left, start again, wait until ready."""
        user, name = key
        started = time.monotonic()
        held = await self.proxy.hold(path, self.hold_timeout)
        try:
            await self.hub.stop(user, name)
            await self._wait_for(user, name, lambda m: m is None, "to stop")
            self.log.info("session %s/%s recovering: starting the server again%s", user,
                          name, "; requests held at the proxy" if held else "")
            self._event(key, "recovering", "starting the server again"
                        + ("; requests held at the proxy" if held else ""),
                        state="recovering")
            await self.hub.start(user, name, options)
            model = await self._wait_for(user, name,
                                         lambda m: m is not None and m.get("ready"),
                                         "to be ready again")
        except Exception as e:  # anything: record it, let the session go
            metrics.RECOVERIES_FAILED.labels("error").inc()
            metrics.ERRORS.labels("recovery").inc()
            self.log.error("session %s/%s recovery failed after %.1f s: %s", user, name,
                           time.monotonic() - started, e)
            self._event(key, "recovery-failed", str(e), state="stopped")
            if held:
                await self.proxy.release(path)
            return
        self.failures[key] = 0
        self.stalled_since.pop(key, None)
        took = time.monotonic() - started
        metrics.RECOVERIES_SUCCEEDED.inc()
        metrics.RECOVERY_DURATION.observe(took)
        # Where it runs now: from the hub, in the next round.
        self.unsettled.add(user)
        self.log.info("session %s/%s recovered in %.1f s", user, name, took)
        self._event(key, "recovered", f"in {took:.1f} s",
                    state="running", instance=model.get("started") or "")

    async def _wait_for(self, user: str, name: str, done, what: str) -> dict | None:
        deadline = time.monotonic() + self.hold_timeout
        while not done(model := await self.hub.server(user, name)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not come {what} within "
                                   f"{self.hold_timeout:.0f} s")
            await asyncio.sleep(0.2)
        return model

    def _event(self, key, kind: str, detail: str, state: str | None = None,
               instance: str | None = None) -> None:
        with self.store.transaction() as db:
            record = self.store.find(db, *key)
            if record is None:
                return
            self.store.add_event(record, kind, detail)
            if state:
                record.state = state
            if instance is not None:  # recovered: a new server serves it
                record.instance = instance
                record.recoveries += 1
                record.target = ""  # the next check reads the new one

    # --------------------------------------------------------------- run --

    @asynccontextmanager
    async def clients(self) -> AsyncIterator[None]:
        """The manager's HTTP sessions, one per party, so that no
        credential reaches anyone but its issuer: the hub's token goes to
        the hub only, the proxy's to the proxy only, and the checks of
        users' servers (where anyone may be listening) carry nothing: no
        Authorization header, no cookie jar, no redirects followed, no
        proxy or netrc from the environment."""
        hub_headers = {"Authorization": f"token {self.api_token}"}
        # The hub's and the proxy's calls counted and timed (metrics.py).
        async with aiohttp.ClientSession(headers=hub_headers, trust_env=False, trace_configs=[
                    metrics.api_trace("hub", self.health)]) as hub, \
                aiohttp.ClientSession(trust_env=False, trace_configs=[
                    metrics.api_trace("proxy", self.health)]) as proxy, \
                aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                      trust_env=False, connector=aiohttp.TCPConnector(
                                          # A new connection each check: an
                                          # old one to a node cut off would
                                          # pass for a stalled server.
                                          force_close=True, limit=0)) as self.probe_http:
            self.hub = HubClient(hub, self.hub_api_url, self.page_size)
            self.proxy = ProxyClient(proxy, self.proxy_api_url, self.proxy_auth_token)
            self.probe_slots = asyncio.Semaphore(self.probe_concurrency)
            try:
                yield
            finally:
                for task in [*self.watchers.values(), *self.tasks]:
                    task.cancel()
                await asyncio.gather(*self.watchers.values(), *self.tasks,
                                     return_exceptions=True)
                self.watchers.clear()

    async def run(self) -> None:
        async with self.clients():
            self._serve_api()
            self.log.info("session manager: checking sessions every %.1f s", self.interval)
            while True:
                started = time.monotonic()
                try:
                    await self.check_once()
                except Exception as e:  # noqa: BLE001
                    # The hub or the proxy restarting, or anything else: one
                    # line, and the next round tries again.
                    self.log.warning("session manager: check failed: %s: %s",
                                     type(e).__name__, str(e)[:200])
                    metrics.CHECKS.labels("failed").inc()
                    metrics.ERRORS.labels("round").inc()
                    self.health.round_done(f"{type(e).__name__}: {str(e)[:200]}")
                else:
                    metrics.CHECKS.labels("ok").inc()
                    self.health.round_done()
                metrics.CHECK_DURATION.observe(time.monotonic() - started)
                await asyncio.sleep(self.interval)

    def _serve_api(self) -> None:
        if not self.service_url:
            return
        from urllib.parse import urlparse

        from jupyterhub.services.auth import HubAuth
        url = urlparse(self.service_url)
        prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/")
        auth = HubAuth(api_token=self.api_token, api_url=self.hub_api_url, cache_max_age=5)
        settings = ApiSettings(default_limit=self.api_page_size,
                               max_limit=self.api_max_page_size,
                               authenticate_metrics=self.authenticate_metrics,
                               health_max_age=self.health_max_age
                               or max(10 * self.interval, 30.0))
        app = web.Application(handlers(
            prefix, store=self.store, auth=auth, settings=settings, health=self.health,
            registry=metrics.state_registry(self.store.count_states)))
        app.listen(url.port or 80, url.hostname or "127.0.0.1")

    def start(self) -> None:
        try:
            asyncio.run(self.run())
        except KeyboardInterrupt:  # the hub stopping its services
            pass


def main() -> None:
    # Whatever the manager writes (its records, SQLite's journals) is for
    # its own user alone.
    os.umask(0o077)
    # An idle connection per server, and a check's: far more than the usual
    # soft limit of 1024 files at a thousand servers.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 16 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    SessionManager.launch_instance()


if __name__ == "__main__":
    main()
