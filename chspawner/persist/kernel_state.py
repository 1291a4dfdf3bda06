"""A kernel's session saved and restored, from the server:
``POST {base_url}chspawner/api/kernels/{kernel_id}/snapshot`` and
``.../restore``, ``GET {base_url}chspawner/api/snapshots``.

A jupyter_server extension. The kernel does the work (its session recorder,
kernels/ipykernel/session/chspawner_session.py, there when the kernel was
started with the provisioner's ``session_state``); the server asks it with
one silent execution, which the recorder does not record, and reads its
one-line JSON report from a user expression. A kernel without the recorder
answers that it has none.

Snapshots are keyed by kernel id (a kernel restarted in a new process or
job keeps its id); ``restore`` takes ``{"from": key}`` to bring another
kernel's snapshot (of the same user: the kernel itself refuses any other)
into this one. ``POST .../kernels/{id}/move`` saves, restarts the kernel as
a new job wherever Slurm puts it, and restores.

The same three steps, without a request (:class:`KernelSessions`, which
the persistent kernel manager asks):

- planned: a kernel whose job nears its time limit (``move_lead``
  seconds before) is moved while it is idle;
- after a loss: a kernel restarted because its job ended (its node, its
  memory, a preemption, its limit) gets its latest snapshot back, and its
  notebook is told how old that is.

Each restore is told in the kernel's notebook (the kernel manager's
notice) and in JupyterLab (a notice of chspawner.persist.session_status).
"""
from __future__ import annotations

import ast
import asyncio
import collections
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web
from tornado.ioloop import PeriodicCallback
from traitlets import Float, Int
from traitlets.config import Configurable

from chspawner.provisioner.session_state import SNAPSHOTS

#: The kernel's recorder, as the kernel imports it.
RECORDER = "chspawner_session"
#: A snapshot key: a kernel id (or any name of these characters).
KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class KernelState(Configurable):
    """How the server saves and restores its kernels' sessions."""

    snapshot_limit = Int(
        2 * 1000**3, config=True,
        help="The most bytes of variables one snapshot may hold: larger values are "
             "left to re-running the cells that made them, or reported. 0: no limit.")
    call_timeout = Float(
        600.0, config=True,
        help="Seconds a kernel has to answer a save or a restore (it answers when the "
             "cell it runs, if any, has ended).")
    move_lead = Float(
        600.0, config=True,
        help="Seconds before a kernel job's time limit at which the kernel is moved "
             "(its session saved, a new job started, the session restored there), "
             "once it is idle; a kernel busy until the limit is restarted after it "
             "with its latest snapshot. 0: no planned moves. Only kernels started "
             "with the provisioner's session_state.")
    autosave_interval = Float(
        0.0, config=True,
        help="Seconds between automatic snapshots of a recording kernel's session: "
             "once it is idle and has run cells since its last snapshot, so that a "
             "kernel lost without warning (its node, its memory) comes back as of "
             "then. 0: only before moves and on request. Each snapshot costs the "
             "time and space of writing the session's data (see the benchmarks).")
    limit_check_interval = Float(
        30.0, config=True,
        help="Seconds between looks at the kernels (their jobs' time limits, as the "
             "kernels' job watch last saw them: no query of its own; the snapshots "
             "autosave_interval asks for).")


class RecorderError(Exception):
    """The kernel could not be asked, or gave no report; one line."""


async def ask_kernel(km: Any, expression: str, timeout: float) -> dict:
    """Evaluate ``expression`` (a call of the recorder that returns one line
    of JSON) in the kernel with one silent execution; its report."""
    client = km.client()
    client.start_channels(iopub=False, stdin=False, hb=False, control=False)
    try:
        msg_id = client.execute("", silent=True, store_history=False,
                                user_expressions={"r": expression})
        while True:
            try:
                reply = await client.get_shell_msg(timeout=timeout)
            except Exception:  # (queue.Empty: no answer in time)
                raise RecorderError(f"the kernel did not answer within {timeout:.0f} s") \
                    from None
            if reply["parent_header"].get("msg_id") == msg_id:
                break
    finally:
        client.stop_channels()
    return report_of(reply["content"])


def report_of(content: dict) -> dict:
    """The recorder's report in an execute reply's user expression."""
    result = (content.get("user_expressions") or {}).get("r") or {}
    if result.get("status") != "ok":
        if result.get("ename") == "ModuleNotFoundError":
            return {"ok": False, "message": "this kernel does not record its session "
                    "(it was started without chspawner's session_state)"}
        return {"ok": False, "message": f"{result.get('ename', 'error')}: "
                                        f"{result.get('evalue', 'no answer')}"}
    try:
        return json.loads(ast.literal_eval(result["data"]["text/plain"]))
    except (KeyError, ValueError, SyntaxError):
        raise RecorderError("the kernel's answer is not a report") from None


def snapshot_call(key: str, limit: int, note: str = "") -> str:
    return f"__import__({RECORDER!r}).snapshot({key!r}, {limit or None!r}, {note!r})"


def restore_call(key: str) -> str:
    return f"__import__({RECORDER!r}).restore({key!r})"


def snapshot_age(root: Path, key: str) -> float | None:
    """Seconds since the snapshot ``key`` was made; None: there is none."""
    try:
        created = json.loads((root / key / "manifest.json").read_text())["created"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return max(0.0, time.time() - float(created))


def age_words(seconds: float) -> str:
    """"40 s", "12 min", "2.5 h": how old a snapshot is."""
    if seconds < 90:
        return f"{round(seconds)} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def restored_brief(report: dict) -> str:
    """A restore's report in one short sentence (a JupyterLab notification
    shows 140 characters)."""
    if not report.get("ok"):
        return f"The kernel's session could not be restored: {report.get('message', '')}"[:140]
    parts = [f"{len(report.get('restored', []))} variables loaded"]
    if report.get("rerun_cells"):
        parts.append(f"{len(report['rerun_cells'])} cells re-run")
    if report.get("lost"):
        parts.append(f"{len(report['lost'])} not restored")
    return (f"Kernel session restored from a snapshot {age_words(report.get('age_s', 0))} "
            f"old: {', '.join(parts)}.")


def list_snapshots(root: Path) -> list[dict]:
    """The user's snapshots, newest first: their manifests' summaries."""
    found = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    for entry in entries:
        try:
            manifest = json.loads((entry / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        how = [v.get("how") for v in manifest.get("variables", {}).values()]
        found.append({"key": entry.name, "created": manifest.get("created"),
                      "bytes": manifest.get("bytes"), "note": manifest.get("note", ""),
                      "saved": how.count("saved"), "rerun": how.count("rerun"),
                      "lost": how.count("lost")})
    return sorted(found, key=lambda s: s["created"] or 0, reverse=True)


class KernelSessions:
    """The server's saves, restores and moves of its kernels' sessions: on
    request (the handlers), before a job's time limit (the limit watch),
    after a kernel's restart that lost its job (the kernel manager asks
    :meth:`restore_after_restart`)."""

    def __init__(self, kernel_manager: Any, state: KernelState,
                 log: logging.Logger | None = None, root: Path | None = None):
        self.kernel_manager = kernel_manager
        self.state = state
        self.log = log or logging.getLogger(__name__)
        self.root = root or Path.home() / SNAPSHOTS
        #: What JupyterLab says once each (chspawner.persist.session_status)
        self.notices: collections.deque[dict] = collections.deque(maxlen=100)
        #: kernel id -> its restore under way after a restart
        self._restoring: dict[str, asyncio.Future] = {}
        #: the jobs already moved (or being moved) off before their limit
        self._moved_jobs: set[str] = set()
        #: kernel id -> its last_activity just after its last snapshot (its
        #: own busy and idle count as activity: only later activity is new)
        self._saved_activity: dict[str, Any] = {}
        self._saving: set[str] = set()
        #: kernel id -> when the autosave's look first saw it
        self._first_seen: dict[str, float] = {}
        self._watch: PeriodicCallback | None = None

    @staticmethod
    def records_session(km: Any) -> bool:
        """Whether the kernel was started with its session recorder."""
        settings = getattr(getattr(km, "provisioner", None), "settings", None)
        return bool(getattr(settings, "session_state", False))

    def moves_before_limit(self, kernel_id: str) -> bool:
        """Whether the kernel moves to a new job before its job's limit."""
        if self.state.move_lead <= 0 or kernel_id not in self.kernel_manager:
            return False
        return self.records_session(self._kernel(kernel_id))

    def age(self, kernel_id: str) -> float | None:
        return snapshot_age(self.root, kernel_id)

    def _kernel(self, kernel_id: str) -> Any:
        return self.kernel_manager.get_kernel(kernel_id)

    async def save(self, kernel_id: str, note: str) -> dict:
        km = self._kernel(kernel_id)
        self._saving.add(kernel_id)
        try:
            report = await self._ask(km, snapshot_call(kernel_id, self.state.snapshot_limit,
                                                       note))
        finally:
            self._saving.discard(kernel_id)
        if report.get("ok"):
            self._saved_activity[kernel_id] = getattr(km, "last_activity", None)
        return report

    async def restore(self, kernel_id: str, key: str | None = None) -> dict:
        km = self._kernel(kernel_id)
        report = await self._ask(km, restore_call(key or kernel_id))
        if report.get("ok") and (key or kernel_id) == kernel_id:
            # (its snapshot is its session again: nothing new to save yet)
            self._saved_activity[kernel_id] = getattr(km, "last_activity", None)
        self.say(kernel_id, restored_brief(report))
        log = self.log.info if report.get("ok") else self.log.warning
        log("chspawner: kernel %s: %s", kernel_id, report.get("message"))
        return report

    async def _ask(self, km: Any, expression: str) -> dict:
        try:
            return await ask_kernel(km, expression, self.state.call_timeout)
        except RecorderError as e:
            return {"ok": False, "message": str(e)}

    def say(self, kernel_id: str, text: str) -> None:
        self.notices.append({"id": f"kernel-session:{kernel_id}:{time.time():.6f}",
                             "text": text, "at": time.time()})

    def recent_notices(self, within: float) -> list[dict[str, str]]:
        since = time.time() - within
        return [{"id": n["id"], "text": n["text"]} for n in self.notices if n["at"] >= since]

    # -------------------------------------------------------------- moves --

    async def move(self, kernel_id: str, why: str = "on request") -> dict:
        """Save the session, restart the kernel as a new job (wherever Slurm
        puts it), restore the session there. The restore's report (or the
        save's, when the save failed: the kernel is then left as it was)."""
        km = self._kernel(kernel_id)
        saved = await self.save(kernel_id, f"moved {why}")
        if not saved.get("ok"):
            return saved
        mover = getattr(km.provisioner, "move_at_next_restart", None)
        if mover is not None:
            mover()
        km.restore_pending = True
        self._restoring.pop(kernel_id, None)
        self.log.info("chspawner: moving kernel %s %s (%d bytes saved)", kernel_id, why,
                      saved.get("bytes", 0))
        # jupyter_server's restart: its clients follow, and the persistent
        # kernel manager's kernel_started starts the restore as soon as the
        # new kernel runs (restore_after_restart). Not awaited: the future it
        # returns, which waits for a kernel_info reply; jupyter_server drops
        # that wait, unresolved, when the restart changed the kernel's ports,
        # as a move to a new job does.
        await self.kernel_manager.restart_kernel(kernel_id)
        restoring = self._restoring.pop(kernel_id, None)
        if restoring is not None:
            report = await restoring
        else:  # (a kernel manager that doesn't ask: restored here)
            km.restore_pending = False
            report = await self.restore(kernel_id)
        return {**report, "action": "move", "node": getattr(km.provisioner, "node", "")}

    def restore_after_restart(self, km: Any) -> None:
        """The kernel manager's call, once a restarted kernel runs (a move,
        or a restart after its job ended with a snapshot there): restore
        its session, in the background (the notebook's next cells queue
        behind the restore in the kernel)."""
        km.restore_pending = False
        self._restoring[km.kernel_id] = asyncio.ensure_future(self.restore(km.kernel_id))

    def wants_restore_after_loss(self, km: Any) -> float | None:
        """For a kernel whose job ended (about to be restarted): the age of
        its latest snapshot, if it records its session and has one (the
        restart will bring it back); None otherwise."""
        if not self.records_session(km):
            return None
        age = self.age(km.kernel_id)
        if age is not None:
            km.restore_pending = True
        return age

    # -------------------------------------------------- planned moves ---

    def watch(self) -> None:
        """Start looking at the kernels every ``limit_check_interval`` (once)."""
        if self._watch is not None or self.state.limit_check_interval <= 0 or (
                self.state.move_lead <= 0 and self.state.autosave_interval <= 0):
            return
        self._watch = PeriodicCallback(self.look, self.state.limit_check_interval * 1000)
        self._watch.start()

    def look(self) -> None:
        """Move each kernel :meth:`due_for_move` (once per job); save each
        :meth:`due_for_save`."""
        now = time.time()
        self._forget_gone()
        moving = set()
        for kernel_id, job in self.due_for_move(now):
            self._moved_jobs.add(job.id)
            moving.add(kernel_id)
            asyncio.ensure_future(self._move_before_limit(kernel_id, job.end_time - now))
        for kernel_id in self.due_for_save(now):
            if kernel_id not in moving:
                asyncio.ensure_future(self._autosave(kernel_id))

    def _forget_gone(self) -> None:
        """Drop what is kept of kernels the server no longer has."""
        known = set(self.kernel_manager.list_kernel_ids())
        for kept in (self._saved_activity, self._first_seen, self._restoring):
            for kernel_id in kept.keys() - known:
                del kept[kernel_id]

    def due_for_save(self, now: float) -> list[str]:
        """The recording, idle kernels whose last snapshot is older than
        ``autosave_interval`` (or that have none and were first seen that
        long ago) and that did something since it."""
        interval = self.state.autosave_interval
        if interval <= 0:
            return []
        due = []
        for kernel_id in list(self.kernel_manager.list_kernel_ids()):
            km = self._kernel(kernel_id)
            if kernel_id in self._saving or not self.records_session(km) \
                    or getattr(km, "execution_state", "") != "idle":
                continue
            age = self.age(kernel_id)
            if age is None:  # none yet: one an interval after the server first saw it
                age = now - self._first_seen.setdefault(kernel_id, now)
            if age < interval:
                continue
            saved = self._saved_activity.get(kernel_id)
            if saved is not None and getattr(km, "last_activity", None) == saved:
                continue  # nothing ran since
            due.append(kernel_id)
        return due

    async def _autosave(self, kernel_id: str) -> None:
        try:
            report = await self.save(kernel_id, "autosave")
        except Exception:
            self.log.exception("chspawner: saving kernel %s's session", kernel_id)
            return
        if not report.get("ok"):
            self.log.warning("chspawner: kernel %s's session was not saved: %s", kernel_id,
                             report.get("message"))

    def due_for_move(self, now: float) -> list[tuple[str, Any]]:
        """The kernels to move now, with their jobs: recording their session,
        idle (a busy kernel is looked at again next time), their job running
        and ending within ``move_lead``, and not moved off that job yet."""
        due = []
        for kernel_id in list(self.kernel_manager.list_kernel_ids()):
            km = self._kernel(kernel_id)
            job = getattr(km.provisioner, "last_job", None)
            if job is None or not job.alive or not job.end_time \
                    or job.id in self._moved_jobs or not self.records_session(km) \
                    or job.end_time - now > self.state.move_lead \
                    or getattr(km, "execution_state", "") != "idle":
                continue
            due.append((kernel_id, job))
        return due

    async def _move_before_limit(self, kernel_id: str, left: float) -> None:
        try:
            report = await self.move(kernel_id, f"{age_words(left)} before its job's "
                                                f"time limit")
        except Exception:
            self.log.exception("chspawner: moving kernel %s before its time limit", kernel_id)
            return
        if not report.get("ok"):
            self.log.warning("chspawner: kernel %s was not moved before its time limit: %s",
                             kernel_id, report.get("message"))
            self.say(kernel_id, f"A kernel was not moved before its time limit: "
                                f"{report.get('message', '')}"[:140])


class _Handler(APIHandler):
    auth_resource = "kernels"

    def initialize(self, sessions: KernelSessions) -> None:
        self.sessions = sessions

    def _known(self, kernel_id: str) -> None:
        if kernel_id not in self.kernel_manager:
            raise web.HTTPError(404, f"no kernel {kernel_id}")

    def _answer(self, report: dict) -> None:
        self.set_status(200 if report.get("ok") else 409)
        self.finish(json.dumps(report))


class SnapshotHandler(_Handler):
    """``POST .../kernels/{id}/snapshot``: save the kernel's session."""

    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        self._known(kernel_id)
        self._answer(await self.sessions.save(kernel_id, "on request"))


class RestoreHandler(_Handler):
    """``POST .../kernels/{id}/restore`` (body ``{"from": key}``, optional):
    bring a saved session into the kernel."""

    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        self._known(kernel_id)
        body = self.get_json_body() or {}
        key = body.get("from") or kernel_id
        if not isinstance(key, str) or not KEY.match(key):
            raise web.HTTPError(400, "'from' must name a snapshot (a kernel id)")
        self._answer(await self.sessions.restore(kernel_id, key))


class MoveHandler(_Handler):
    """``POST .../kernels/{id}/move``: save, restart as a new job, restore."""

    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        self._known(kernel_id)
        self._answer(await self.sessions.move(kernel_id))


class SnapshotsHandler(_Handler):
    """``GET .../snapshots``: the user's snapshots, newest first."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.finish(json.dumps({"snapshots": list_snapshots(self.sessions.root)}))


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "chspawner.persist.kernel_state"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    state = KernelState(parent=serverapp)
    sessions = KernelSessions(serverapp.kernel_manager, state, serverapp.log)
    # (the persistent kernel manager asks it after a restart; the session
    # status reads its notices)
    serverapp.kernel_manager.kernel_sessions = sessions
    base = url_path_join(serverapp.web_app.settings["base_url"], "chspawner/api")
    kernel = r"/kernels/(?P<kernel_id>[A-Za-z0-9_.-]+)"
    given = {"sessions": sessions}
    serverapp.web_app.add_handlers(".*$", [
        (base + kernel + "/snapshot", SnapshotHandler, given),
        (base + kernel + "/restore", RestoreHandler, given),
        (base + kernel + "/move", MoveHandler, given),
        (base + "/snapshots", SnapshotsHandler, given),
    ])
    sessions.watch()
    serverapp.log.info("chspawner: kernels' sessions saved, restored and moved at %s (moves "
                       "%.0f s before a kernel job's limit, saves every %.0f s; 0: none)",
                       base, state.move_lead, state.autosave_interval)
