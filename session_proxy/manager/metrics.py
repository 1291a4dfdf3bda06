"""The session manager's Prometheus metrics, and what its health says.

Metrics are prometheus_client's, kept at module level in its default
registry as JupyterHub keeps its own (``jupyterhub_*`` at /hub/metrics):
here ``chspawner_sessions_*`` at ``<service prefix>metrics``. The manager's
code counts with one call where something happens (``CHECKS.labels(...)
.inc()``); the calls to the hub and the proxy are counted and timed by an
aiohttp trace (``api_trace``) on their HTTP sessions, so a new call is
measured without code of its own. The number of sessions in each state is
read from the records when Prometheus scrapes (one GROUP BY), not kept up
to date at every round.

``Health`` is what the health endpoint reports: when the last round of
checks completed, and whether the hub and the proxy answered lately.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "chspawner_sessions_"
# Seconds: a check round is sub-second to a few seconds; a recovery is a
# server's start (seconds locally, minutes when a Slurm job queues).
ROUND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RECOVERY_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

CHECKS = Counter(f"{PREFIX}checks", "Rounds of checks, by result (ok: the hub and the "
                 "proxy were read and every server asked; failed: the round stopped "
                 "early).", ["result"])
CHECK_DURATION = Histogram(f"{PREFIX}check_duration_seconds", "Seconds one round of "
                           "checks took (hub, proxy, records and every server's probe).",
                           buckets=ROUND_BUCKETS)
PROBE_FAILURES = Counter(f"{PREFIX}probe_failures", "Checks of a user's server that "
                         "failed, by reason (unanswered: refused or unreachable; stalled: "
                         "accepted but silent past stall_timeout; error: an error in the "
                         "check itself).", ["reason"])
LOSSES = Counter(f"{PREFIX}losses", "Sessions found lost (their server gone while the "
                 "hub counted it as running, or gone while the manager was down).")
RECOVERIES_STARTED = Counter(f"{PREFIX}recoveries_started", "Recoveries started: a "
                             "lost server being stopped and started again.")
RECOVERIES_SUCCEEDED = Counter(f"{PREFIX}recoveries_succeeded", "Recoveries whose new "
                               "server became ready.")
RECOVERIES_FAILED = Counter(f"{PREFIX}recoveries_failed", "Lost sessions left stopped, "
                            "by reason (error: the stop or start failed or timed out; "
                            "limit: max_recoveries reached; off: recover is False).",
                            ["reason"])
RECOVERY_DURATION = Histogram(f"{PREFIX}recovery_duration_seconds", "Seconds from a "
                              "recovery's start to its new server being ready.",
                              buckets=RECOVERY_BUCKETS)
API_REQUESTS = Counter(f"{PREFIX}api_requests", "Requests made to the hub's and the "
                       "proxy's APIs, by party (hub, proxy), kind (method and path "
                       "template) and status (the HTTP status, or 'error' when no "
                       "answer came).", ["party", "kind", "status"])
API_DURATION = Histogram(f"{PREFIX}api_request_duration_seconds", "Seconds until the "
                         "hub's or the proxy's API answered (its headers), by party and "
                         "kind.", ["party", "kind"], buckets=API_BUCKETS)
ERRORS = Counter(f"{PREFIX}errors", "Errors the manager logged, by where (round: a "
                 "round of checks; probe: one server's check; recovery: a recovery).",
                 ["where"])

# Users' names and servers' paths out of the kinds: one series per call,
# not one per user.
_TEMPLATES = [
    (re.compile(r"/api/(routes|holds)/.*"), r"/api/\1/{path}"),
    (re.compile(r"/users/[^/]+"), "/users/{name}"),
    (re.compile(r"/servers/[^/]+"), "/servers/{name}"),
]


def kind_of(method: str, path: str) -> str:
    """``GET /users/{name}`` for ``GET /hub/api/users/alice``: the call,
    without who it was about, relative to the API's root (hub's /hub/api,
    the proxy's /)."""
    path = path.split("/hub/api", 1)[-1] or "/"
    for pattern, template in _TEMPLATES:
        path = pattern.sub(template, path)
    return f"{method.upper()} {path}"


@dataclass
class Party:
    """When one API last answered (any HTTP status) and last failed to
    (no connection, a timeout), in time.monotonic()."""
    answered: float | None = None
    failed: float | None = None

    @property
    def answers(self) -> bool | None:
        """Whether its latest request got an answer (None: none made yet)."""
        if self.answered is None and self.failed is None:
            return None
        return (self.answered or 0) >= (self.failed or 0)


@dataclass
class Health:
    """What the health endpoint reports."""
    started: float = field(default_factory=time.monotonic)
    last_round: float | None = None       # the last round that completed
    last_round_error: str = ""            # why the latest round failed, if it did
    parties: dict[str, Party] = field(default_factory=lambda: {"hub": Party(),
                                                               "proxy": Party()})

    def round_done(self, error: str = "") -> None:
        self.last_round_error = error
        if not error:
            self.last_round = time.monotonic()

    def report(self, max_age: float, database: bool) -> tuple[bool, dict]:
        """(healthy, its JSON model). Healthy: a round completed within
        ``max_age`` seconds (or the manager started less than that ago and
        none has failed yet) and the records answer."""
        now = time.monotonic()
        age = None if self.last_round is None else now - self.last_round
        fresh = age < max_age if age is not None else (now - self.started < max_age
                                                       and not self.last_round_error)
        model = {"last_check_age": None if age is None else round(age, 3),
                 "max_check_age": max_age,
                 "hub": self.parties["hub"].answers,
                 "proxy": self.parties["proxy"].answers,
                 "database": database}
        if self.last_round_error:
            model["last_check_error"] = self.last_round_error
        return fresh and database, model


def api_trace(party: str, health: Health) -> aiohttp.TraceConfig:
    """Count and time every request of one HTTP session (the hub's or the
    proxy's), and note in ``health`` whether that party answers."""
    trace = aiohttp.TraceConfig(trace_config_ctx_factory=SimpleNamespace)
    state = health.parties[party]

    async def start(_session, ctx, params: aiohttp.TraceRequestStartParams) -> None:
        ctx.started, ctx.kind = time.monotonic(), kind_of(params.method, params.url.path)

    async def end(_session, ctx, params: aiohttp.TraceRequestEndParams) -> None:
        state.answered = time.monotonic()
        API_REQUESTS.labels(party, ctx.kind, str(params.response.status)).inc()
        API_DURATION.labels(party, ctx.kind).observe(state.answered - ctx.started)

    async def failed(_session, ctx, _params: aiohttp.TraceRequestExceptionParams) -> None:
        state.failed = time.monotonic()
        API_REQUESTS.labels(party, ctx.kind, "error").inc()

    trace.on_request_start.append(start)
    trace.on_request_end.append(end)
    trace.on_request_exception.append(failed)
    trace.freeze()
    return trace


class StateCollector(Collector):
    """``chspawner_sessions_in_state{state}``: the records in each state,
    counted by the database when scraped."""

    STATES = ("running", "lost", "recovering", "stopped")

    def __init__(self, count_states: Callable[[], dict[str, int]]):
        self.count_states = count_states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(f"{PREFIX}in_state", "Sessions in each state, from the "
                                  "records (running: answering; lost: gone, its recovery "
                                  "about to start; recovering: being started again; "
                                  "stopped: by request, or left stopped).",
                                  labels=["state"])
        counts = self.count_states()
        for state in sorted({*self.STATES, *counts}):
            gauge.add_metric([state], counts.get(state, 0))
        yield gauge


def state_registry(count_states: Callable[[], dict[str, int]]) -> CollectorRegistry:
    """A registry of this manager's own (its records): scraped with the
    default one, which holds the module's counters."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(count_states))
    return registry
