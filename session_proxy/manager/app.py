"""The session manager: keeps users' sessions alive when their server is lost.

A JupyterHub service (run by the hub, with a token allowed to list users
and to read, start and stop servers: scopes ``list:users`` and
``servers``). Every ``interval`` it asks the hub which servers are up and
the proxy where each runs, and asks each server itself whether it is there
(``GET <url>api``, at the target the browser's requests go to). That check
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
<service prefix>api/sessions`` lists them, all of them for an admin, a
user's own for a user.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import quote, unquote

import aiohttp
from tornado import web
from traitlets import Bool, Float, Integer, Unicode, default
from traitlets.config import Application

from session_proxy.manager.records import SessionRecord, SessionStore, StoreError

RouteKey = tuple[str, ...]


def route_key(path: str) -> RouteKey:
    """One key for a server's path however it is spelt: the hub's server
    URLs are percent-encoded (``/user/a%2Bb@x/``), the session proxy lists
    its routes decoded (``/user/a+b@x``), configurable-http-proxy as
    given. Both sides go through this: decoded, non-empty segments."""
    return tuple(unquote(s) for s in path.split("?", 1)[0].split("/") if s)


class HubClient:
    """The few JupyterHub REST calls the manager makes, with its token."""

    def __init__(self, http: aiohttp.ClientSession, api_url: str):
        self.http, self.api = http, api_url.rstrip("/")

    def _server_url(self, user: str, name: str) -> str:
        base = f"{self.api}/users/{quote(user)}"
        return f"{base}/servers/{quote(name)}" if name else f"{base}/server"

    async def servers(self) -> dict[tuple[str, str], dict]:
        """Every active server's model, by (user, server name)."""
        async with self.http.get(f"{self.api}/users", params={"state": "active"}) as r:
            r.raise_for_status()
            users = await r.json()
        return {(u["name"], name): model for u in users
                for name, model in (u.get("servers") or {}).items()}

    async def server(self, user: str, name: str) -> dict | None:
        async with self.http.get(f"{self.api}/users/{quote(user)}") as r:
            r.raise_for_status()
            return ((await r.json()).get("servers") or {}).get(name)

    async def stop(self, user: str, name: str) -> None:
        async with self.http.delete(self._server_url(user, name)) as r:
            if r.status not in (202, 204, 400, 404):  # 400/404: already stopped
                raise RuntimeError(f"stopping {user}/{name}: HTTP {r.status} "
                                   f"{await r.text()}")

    async def start(self, user: str, name: str, options: dict) -> None:
        async with self.http.post(self._server_url(user, name), json=options) as r:
            if r.status not in (201, 202):
                raise RuntimeError(f"starting {user}/{name}: HTTP {r.status} "
                                   f"{await r.text()}")


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
    interval = Float(1.0, help="Seconds between checks of every session.").tag(config=True)
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

    aliases = {"config": "SessionManager.config_file",
               "db-url": "SessionManager.db_url", "proxy-api-url":
               "SessionManager.proxy_api_url", "interval": "SessionManager.interval",
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
        try:
            self.store = SessionStore(self.db_url)
        except (StoreError, PermissionError) as err:
            # One line and a failed start: not a traceback.
            raise SystemExit(f"{self.name}: {err}") from None
        self.failures: dict[tuple[str, str], int] = {}
        self.stalled_since: dict[tuple[str, str], float] = {}
        self.recovering: set[tuple[str, str]] = set()
        self.recent: dict[tuple[str, str], list[float]] = {}
        # Servers this process has seen the hub list as ready: only for
        # those can a disappearance be told apart as a stop by request.
        self.seen: set[tuple[str, str]] = set()

    async def check_once(self) -> None:
        """One round: new sessions recorded, stopped ones noted, every
        running one asked whether it is there."""
        servers = await self.hub.servers()
        routes = await self.proxy.routes()
        with self.store.transaction() as db:
            for record in self.store.live(db):
                key = (record.user, record.server_name)
                if key in self.recovering or key in servers:
                    continue
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
            targets: dict[tuple[str, str], str] = {}
            newest = self.store.newest(db, {key for key, model in servers.items()
                                            if key not in self.recovering
                                            and model.get("ready")})
            for key, model in servers.items():
                if model.get("pending") == "stop":
                    # The hub stopping it is what a stop by request looks
                    # like: no longer a server gone unseen.
                    self.seen.add(key)
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
                route = routes.get(route_key(model["url"])) or {}
                target = route.get("target", "")
                if target and target != record.target:
                    if record.target:
                        self.store.add_event(record, "moved", f"now at {target}")
                    record.target = target
                # With no route (the proxy restarting with the hub, the hub
                # not done re-adding routes), where it ran last.
                targets[key] = record.target
        # Not one being stopped: its failing to answer is no loss.
        await asyncio.gather(*(self._probe_confined(key, model["url"], targets[key])
                               for key, model in servers.items()
                               if key in targets and not model.get("pending")))

    def _new_record(self, db, key: tuple[str, str], model: dict) -> SessionRecord:
        options = model.get("user_options") or {}
        record = SessionRecord(user=key[0], server_name=key[1], url=model["url"],
                               user_options=options, image=str(options.get("image", "")),
                               mode=str(options.get("mode", "")),
                               instance=model.get("started") or "")
        db.add(record)
        self.store.add_event(record, "started", f"at {model['url']}")
        self.failures[key] = 0
        return record

    async def _probe_confined(self, key: tuple[str, str], path: str,
                              target: str) -> None:
        """A check whose failure, whatever it is, stays with its session."""
        try:
            await self._probe(key, path, target)
        except Exception as e:  # noqa: BLE001 -- one server must not stop the round
            self.log.error("session %s/%s: check failed: %s: %s", *key,
                           type(e).__name__, str(e)[:200])

    async def _probe(self, key: tuple[str, str], path: str, target: str) -> None:
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
            self._count_failure(key, f"{target} has accepted connections but answered "
                                     f"nothing for {stalled_for:.0f} s")
            return
        self.stalled_since.pop(key, None)
        if alive:
            self.failures[key] = 0
            return
        self._count_failure(key, f"no answer at {target}")

    def _count_failure(self, key: tuple[str, str], why: str) -> None:
        self.failures[key] = self.failures.get(key, 0) + 1
        if self.failures[key] >= self.lost_after:
            with self.store.transaction() as db:
                record = self.store.find(db, *key)
                if record is not None and record.state == "running":
                    self._start_recovery(record, f"{why} ({self.failures[key]} checks "
                                                 "in a row)")

    # ---------------------------------------------------------- recovery --

    def _start_recovery(self, record: SessionRecord, why: str) -> None:
        key = (record.user, record.server_name)
        self.log.warning("session %s/%s lost: %s", *key, why)
        record.state = "lost"
        self.store.add_event(record, "lost", why)
        recent = [t for t in self.recent.get(key, []) if time.monotonic() - t < 3600]
        if not self.recover or len(recent) >= self.max_recoveries:
            record.state = "stopped"
            self.store.add_event(record, "recovery-failed",
                                 "recovery is off" if not self.recover else
                                 f"lost {len(recent)} times in the last hour; left stopped")
            return
        self.recent[key] = [*recent, time.monotonic()]
        self.recovering.add(key)
        options, url = dict(record.user_options), record.url
        task = asyncio.get_running_loop().create_task(self._recover(key, url, options))
        task.add_done_callback(lambda _: self.recovering.discard(key))

    async def _recover(self, key: tuple[str, str], path: str, options: dict) -> None:
        """Hold the route, stop what's left, start again, wait until ready."""
        user, name = key
        started = time.monotonic()
        held = await self.proxy.hold(path, self.hold_timeout)
        try:
            await self.hub.stop(user, name)
            await self._wait_for(user, name, lambda m: m is None, "to stop")
            self._event(key, "recovering", "starting the server again"
                        + ("; requests held at the proxy" if held else ""))
            await self.hub.start(user, name, options)
            model = await self._wait_for(user, name,
                                         lambda m: m is not None and m.get("ready"),
                                         "to be ready again")
        except Exception as e:  # anything: record it, let the session go
            self.log.error("recovering %s/%s failed: %s", user, name, e)
            self._event(key, "recovery-failed", str(e), state="stopped")
            if held:
                await self.proxy.release(path)
            return
        self.failures[key] = 0
        self.stalled_since.pop(key, None)
        self.log.info("session %s/%s recovered", user, name)
        self._event(key, "recovered", f"in {time.monotonic() - started:.1f} s",
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
        async with aiohttp.ClientSession(headers=hub_headers, trust_env=False) as hub, \
                aiohttp.ClientSession(trust_env=False) as proxy, \
                aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                      trust_env=False) as self.probe_http:
            self.hub = HubClient(hub, self.hub_api_url)
            self.proxy = ProxyClient(proxy, self.proxy_api_url, self.proxy_auth_token)
            yield

    async def run(self) -> None:
        async with self.clients():
            self._serve_api()
            self.log.info("session manager: checking sessions every %.1f s", self.interval)
            while True:
                try:
                    await self.check_once()
                except Exception as e:  # noqa: BLE001
                    # The hub or the proxy restarting, or anything else: one
                    # line, and the next round tries again.
                    self.log.warning("session manager: check failed: %s: %s",
                                     type(e).__name__, str(e)[:200])
                await asyncio.sleep(self.interval)

    def _serve_api(self) -> None:
        if not self.service_url:
            return
        from urllib.parse import urlparse

        from jupyterhub.services.auth import HubAuth
        url = urlparse(self.service_url)
        prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/")
        auth = HubAuth(api_token=self.api_token, api_url=self.hub_api_url, cache_max_age=5)
        app = web.Application([(rf"{prefix}api/sessions", SessionsHandler,
                                {"store": self.store, "auth": auth})])
        app.listen(url.port or 80, url.hostname or "127.0.0.1")

    def start(self) -> None:
        try:
            asyncio.run(self.run())
        except KeyboardInterrupt:  # the hub stopping its services
            pass


class SessionsHandler(web.RequestHandler):
    """GET: the sessions and their history, as JSON. An admin (or a token
    allowed to administer users) sees all; a user their own."""

    def initialize(self, store: SessionStore, auth) -> None:
        self.store, self.auth = store, auth

    async def get(self) -> None:
        token = self.request.headers.get("Authorization", "").removeprefix("token ").strip()
        model = (await self.auth.user_for_token(token, use_cache=True, sync=False)
                 if token else None)
        if not model:
            raise web.HTTPError(403, "a JupyterHub token is required")
        if model.get("admin") or "admin:users" in model.get("scopes", []):
            sessions = self.store.all()
        elif model.get("kind") == "user":
            sessions = self.store.all(user=model["name"])
        else:
            raise web.HTTPError(403, "not allowed")
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"sessions": sessions}))


def main() -> None:
    # Whatever the manager writes (its records, SQLite's journals) is for
    # its own user alone.
    os.umask(0o077)
    SessionManager.launch_instance()


if __name__ == "__main__":
    main()
