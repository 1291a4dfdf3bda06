"""Outputs written into the notebook on the server while no page holds the
kernel (issue 16, protocol section 4).

A notebook's kernel keeps running when its browser goes (the page closed,
reloaded, the laptop shut); its output is kept by the kernel's keeper, for
a page that comes back with the same client session. A new page, another
browser, a download read the notebook *file*: without this, what the
kernel printed meanwhile is not in it. Here the server writes it there.

For each kernel, a :class:`NotebookWriter` of the kernel manager's
:class:`NotebookWriters`:

- **When.** It writes only while no websocket holds the kernel: from the
  moment its last one is closed by its client (close code 1000 or 1001: a
  page closed or reloaded), or ``notebook_write_after`` seconds after one
  ended abnormally with no reconnect (the network cut, the laptop shut:
  the page is likely to come back, and then has it all). It stops when a
  page connects. A new server that adopts the kernel resumes at once if
  the last one was writing, else after ``notebook_write_after`` seconds
  with no page.
- **What.** It follows the kernel's keeper with a client session of its
  own (:data:`WRITER_SESSION`), from the oldest message the keeper holds,
  and folds the messages into each cell's outputs
  (:mod:`chspawner.persist.output_cells`): the cell of an execution is the
  one its execute_request named (JupyterLab's ``metadata.cellId``, kept in
  :class:`~chspawner.persist.records.CellMap`). It writes only the cells
  with output newer than what a page was last sent (the highest
  acknowledgement of the kernel's client sessions, see
  :class:`~chspawner.persist.records.AckFile`) or than what the notebook
  says it holds: each such cell gets its current execution's outputs
  whole, replacing what the cell had, so nothing is written twice, and its
  execution count.
- **Where.** The notebook of the kernel's session (the session manager:
  kernel id -> path), read and saved through the server's contents
  manager, the cell found by its id (nbformat 4.5). The notebook's
  metadata records what it holds: ``metadata.chspawner.outputs =
  {"kernel_id": ..., "seq": ...}``, every output of that kernel's messages
  up to ``seq``.
- **How often.** ``notebook_write_interval`` seconds after the first
  change not yet written, and at once when an execution ends.
- **Across a server restart.** The next server's writer replays what the
  keeper holds again; a cell with output after the notebook's recorded
  ``seq`` is written whole again (a replacement: no output twice, none
  skipped). An execution whose start the keeper no longer holds continues
  from the outputs the notebook holds of it, adding only messages after
  ``seq``; had nothing written them, the cell says its start may be
  missing.
"""
from __future__ import annotations

import asyncio
import json
import os
import weakref
from pathlib import Path
from typing import Any

import zmq
from jupyter_core.utils import ensure_async
from jupyter_server.serverapp import ServerApp
from zmq.eventloop.zmqstream import ZMQStream

from chspawner.persist.keeper import signed_request
from chspawner.persist.output_cells import NOTICE, Cell, CellOutputs, Limits
from chspawner.persist.records import AckFile, CellMap, ack_path
from chspawner.provisioner.transport import secure_client

#: The client session the writer follows a keeper as.
WRITER_SESSION = "chspawner-notebook-outputs"
#: Close codes of a websocket its client closed on purpose (page closed, reloaded).
CLEAN_CLOSE = (1000, 1001, 1005)  # normal, going away, a close frame without a code
#: The IOPub messages that change a cell's outputs or say where it stands.
FOLDED = frozenset({"stream", "display_data", "execute_result", "error", "clear_output",
                    "update_display_data", "execute_input", "status"})


def cell_map(km: Any) -> CellMap | None:
    """The kernel's record of which cell each execution came from (one per
    kernel manager, None for a kernel without records)."""
    found = getattr(km, "cell_map", None)
    if found is None and getattr(km, "acks_dir", ""):
        # (the acks directory is <kernel id>.acks beside <kernel id>.cells)
        acks = Path(km.acks_dir)
        found = km.cell_map = CellMap(acks.with_name(acks.name.removesuffix(".acks") + ".cells"))
    return found


def note_execute_request(km: Any, msg: dict, session: str) -> None:
    """Remember the cell of an execute_request a page sends (JupyterLab
    puts the cell's id in its metadata, ``cellId``)."""
    header = msg.get("header") or {}
    if header.get("msg_type") != "execute_request":
        return
    cell_id = (msg.get("metadata") or {}).get("cellId")
    cells = cell_map(km)
    if cells is not None and isinstance(cell_id, str) and header.get("msg_id"):
        cells.add(str(header["msg_id"]), cell_id, session)


def pages_sent(acks_dir: Path) -> int:
    """The newest message any client session of the kernel was sent (0:
    none), the writer's own session aside."""
    own = ack_path(acks_dir, WRITER_SESSION).name
    newest = 0
    try:
        entries = list(acks_dir.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if entry.name == own:
            continue
        try:
            newest = max(newest, int.from_bytes(entry.read_bytes()[:AckFile.SIZE], "big"))
        except OSError:
            continue
    return newest


def recorded(nb: Any, kernel_id: str) -> int | None:
    """The seq the notebook says it holds of ``kernel_id`` (None: it
    records another kernel, or nothing)."""
    outputs = ((nb.get("metadata") or {}).get("chspawner") or {}).get("outputs") or {}
    if outputs.get("kernel_id") == kernel_id and isinstance(outputs.get("seq"), int):
        return outputs["seq"]
    return None


class Changed(Exception):
    """The notebook changed between reading it and saving it."""


class NotebookWriter:
    """Writes one kernel's output into its notebook while no page holds it."""

    def __init__(self, owner: NotebookWriters, kernel_id: str):
        self.owner, self.kernel_id = owner, kernel_id
        self.log = owner.log
        self.pages: weakref.WeakSet = weakref.WeakSet()
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task | None = None
        self.stream: ZMQStream | None = None
        self.cells: CellOutputs | None = None
        self.path = ""
        self.since = 0  # cells with output after this seq are written
        self.file_seq: int | None = None  # what the notebook held of us when we began
        self.file_cells: dict[str, dict] = {}
        self.seq = 0  # the newest message taken in
        self.replay_until = 0
        self.lost: dict | None = None
        self.dirty: set[str] = set()
        self.flush_at: asyncio.TimerHandle | None = None
        self.writing: asyncio.Task | None = None
        self.writing_on_record: bool | None = owner.was_writing(kernel_id) or None

    @property
    def km(self) -> Any:
        return self.owner.manager.get_kernel(self.kernel_id)

    @property
    def active(self) -> bool:
        return self.task is not None or self.stream is not None

    # -- pages --

    def page_connected(self, page: Any) -> None:
        self.pages.add(page)
        if self.active:
            self.log.info("chspawner: a page holds kernel %s again: no more writing into %s",
                          self.kernel_id, self.path)
        self.stop()

    def page_closed(self, page: Any, close_code: int | None) -> None:
        if page not in self.pages:
            return  # (disconnect is called twice when a kernel dies)
        self.pages.discard(page)
        if len(self.pages):
            return
        if close_code in CLEAN_CLOSE:
            self.start()
        else:
            self.start_later(self.owner.manager.notebook_write_after)

    def start_later(self, delay: float) -> None:
        self._cancel_timer()
        self.timer = asyncio.get_event_loop().call_later(delay, self.start)

    # -- writing --

    def start(self) -> None:
        self._cancel_timer()
        if len(self.pages) or self.active or not self.owner.manager.notebook_outputs:
            return
        if not self.owner.ready:
            if isinstance(self.owner.manager.parent, ServerApp):
                self.start_later(1.0)  # (a server still starting: no sessions yet)
            return  # (else not in a Jupyter server: no notebooks to write)
        self._record(True)
        self.task = asyncio.ensure_future(self._begin())

    def _record(self, writing: bool) -> None:
        """On record for the next server: whether this one was writing."""
        if self.writing_on_record is not writing:
            self.owner.save_state(self.kernel_id, writing)
            self.writing_on_record = writing

    def stop(self, forget: bool = False) -> None:
        """A page holds the kernel again (or it is gone): stop writing."""
        self._cancel_timer()
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.stream is not None:
            if not self.stream.closed():
                self.stream.close(linger=0)
            self.stream = None
        if self.flush_at is not None:
            self.flush_at.cancel()
            self.flush_at = None
        self.cells = None
        self.dirty.clear()
        if not forget:
            self._record(False)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    async def _begin(self) -> None:
        try:
            self.path = await self.owner.notebook_path(self.kernel_id)
            km = self.km
            if not self.path or not getattr(km, "keeper_address", ""):
                self.log.debug("chspawner: kernel %s: no notebook to write into", self.kernel_id)
                return  # not a notebook's kernel (a console), or no keeper
            model = await ensure_async(self.owner.contents_manager.get(
                self.path, content=True, type="notebook"))
            nb = model["content"]
            self.file_seq = recorded(nb, self.kernel_id)
            self.file_cells = {c.get("id"): c for c in nb.get("cells", []) if c.get("id")}
            self.since = max(pages_sent(Path(km.acks_dir)), self.file_seq or 0)
            manager = self.owner.manager
            self.cells = CellOutputs(Limits(manager.notebook_outputs_per_cell,
                                            manager.notebook_output_bytes_per_cell,
                                            manager.notebook_output_bytes_per_kernel))
            self.seq = self.replay_until = 0
            self.lost = None
            self.stream = self._follow(km)
            self.log.info("chspawner: no page holds kernel %s: writing its output into %s",
                          self.kernel_id, self.path)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the notebook unreadable, gone, not JSON...
            self.log.warning("chspawner: not writing kernel %s's output into %r: %s",
                             self.kernel_id, self.path, error)
        finally:
            if self.task is asyncio.current_task():  # (not a later start's)
                self.task = None

    def _follow(self, km: Any) -> ZMQStream:
        """Follow the keeper from the oldest message it holds (an
        acknowledgement below anything it numbered asks for them all)."""
        ack = AckFile(Path(km.acks_dir), WRITER_SESSION)
        ack.write(1)
        ack.close()
        socket = km.context.socket(zmq.DEALER)
        socket.linger = 0
        secure_client(socket, km.get_connection_info(), km.keeper_address)
        socket.connect(km.keeper_address)
        stream = ZMQStream(socket)
        stream.on_recv(self._on_frames)
        stream.send_multipart(signed_request(km.session.key,
                                             [b"follow", WRITER_SESSION.encode()]))
        return stream

    def _on_frames(self, frames: list[bytes]) -> None:
        if self.cells is None:
            return
        kind = frames[0]
        if kind == b"following":
            self.replay_until = json.loads(frames[1])["last_seq"]
            if self.replay_until <= self.seq:
                self._flush_soon(0)
        elif kind == b"lost":
            self.lost = json.loads(frames[1])
        elif kind == b"msg":
            try:
                self._take(int(frames[1]), frames[2:])
            except (ValueError, KeyError, IndexError, TypeError) as error:
                self.log.debug("chspawner: unreadable kernel message: %s", error)

    def _take(self, seq: int, frames: list[bytes]) -> None:
        """One kernel message, numbered ``seq``."""
        if seq <= self.seq:
            return  # (a copy)
        self.seq = seq
        for changed in self._fold(seq, frames):
            if changed.last_seq <= self.since:
                continue  # a page was sent it: not ours to write
            self.dirty.add(changed.cell_id)
            if seq < self.replay_until:
                pass  # written once the replay is in
            elif changed.ended:
                self._flush_soon(0)
            else:
                self._flush_soon(self.owner.manager.notebook_write_interval)
        if seq == self.replay_until:
            self._flush_soon(0)  # the replay is in: write it at once

    def _fold(self, seq: int, frames: list[bytes]) -> list[Cell]:
        """Fold the message into its cell's outputs; the cells it changed."""
        km, cells = self.km, self.cells
        _idents, parts = km.session.feed_identities(frames)
        header, parent = km.session.unpack(parts[1]), km.session.unpack(parts[2])
        kind, parent_id = header.get("msg_type", ""), parent.get("msg_id", "")
        if kind not in FOLDED or (parent.get("msg_type") != "execute_request"
                                  and kind != "update_display_data"):
            return []
        content = km.session.unpack(parts[4])
        if kind == "status" and content.get("execution_state") != "idle":
            return []
        cell_id = None
        if kind != "update_display_data":
            cells_of = cell_map(km)
            cell_id = cells_of.cell(parent_id) if cells_of is not None and parent_id else None
            if not cell_id:
                return []
            if kind != "execute_input" and not self._continues(cell_id, parent_id) \
                    and not self._resume(seq, cell_id, parent_id):
                return []
        cells.add(seq, kind, parent_id, content, cell_id)
        return cells.changed

    def _continues(self, cell_id: str, parent_id: str) -> bool:
        cell = self.cells.cells.get(cell_id)
        return cell is not None and cell.msg_id == parent_id

    def _resume(self, seq: int, cell_id: str, parent_id: str) -> bool:
        """An execution first seen mid-way: its start is older than the
        oldest message the keeper holds. Messages up to what the notebook
        holds (or a page was sent, and may have saved) are left out; the
        execution continues from the outputs the notebook has of it. With
        no record of ours in the notebook, the cell says its start may be
        missing. False: leave this message out."""
        if self.file_seq is not None:
            if seq <= self.since:
                return False
            held = self.file_cells.get(cell_id)
            if held is not None:
                self.cells.seed(cell_id, parent_id, held.get("outputs", []),
                                held.get("execution_count"))
                return True
        cell = self.cells.seed(cell_id, parent_id, [], None)
        lost = self.lost or {}
        self.cells.mark_gap(cell, (
            f"{NOTICE}the beginning of this cell's output may be missing here: it came "
            f"before the oldest message the kernel's keeper still held when the server "
            f"wrote this notebook (it keeps the last {lost.get('capacity', '?')} "
            "messages)."))
        return True

    def _flush_soon(self, delay: float) -> None:
        if not self.dirty:
            return
        if self.flush_at is not None:
            if delay > 0:
                return  # one is due already
            self.flush_at.cancel()
        self.flush_at = asyncio.get_event_loop().call_later(delay, self._flush)

    def _flush(self) -> None:
        self.flush_at = None
        if self.writing is not None:  # one at a time; the next follows it
            self.writing.add_done_callback(lambda _: self._flush_soon(0))
            return
        self.writing = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        # What to write, taken at once: the file then holds exactly the
        # messages up to ``seq`` (messages that come in during the save
        # are the next write's).
        cells, seq = self.cells, self.seq
        todo = {cid: (cells.nbformat_outputs(cells.cells[cid]),
                      cells.cells[cid].execution_count)
                for cid in self.dirty if cid in cells.cells}
        self.dirty.clear()
        try:
            import nbformat  # (only a server that writes needs it)
            cm = self.owner.contents_manager
            model = await ensure_async(cm.get(self.path, content=True, type="notebook"))
            nb = model["content"]
            by_id = {c.get("id"): c for c in nb.cells}
            for cell_id, (outputs, count) in todo.items():
                target = by_id.get(cell_id)
                if target is None or target.get("cell_type") != "code":
                    continue  # deleted, or not ours to fill
                target["outputs"] = [nbformat.from_dict(o) for o in outputs]
                if count is not None:
                    target["execution_count"] = count
            meta = nb.metadata.setdefault("chspawner", {})
            meta["outputs"] = {"kernel_id": self.kernel_id,
                               "seq": max(seq, recorded(nb, self.kernel_id) or 0)}
            # Never bring back a notebook deleted (or renamed) meanwhile, nor
            # save over a change made since it was read: look again, just
            # before saving (a 404 if it is gone).
            now = await ensure_async(cm.get(self.path, content=False, type="notebook"))
            if now.get("last_modified") != model.get("last_modified"):
                raise Changed()
            await ensure_async(cm.save({"type": "notebook", "format": "json",
                                        "content": nb}, self.path))
        except Exception as error:
            if getattr(error, "status_code", None) == 404:
                self.log.info("chspawner: %s is gone: no more writing kernel %s's output",
                              self.path, self.kernel_id)
                self.stop()
                return
            if not isinstance(error, Changed):
                self.log.warning("chspawner: can't write kernel %s's output into %r: %s",
                                 self.kernel_id, self.path, error)
            if self.cells is cells:
                self.dirty.update(todo)  # tried again
                self._flush_soon(self.owner.manager.notebook_write_interval)
        finally:
            self.writing = None


class NotebookWriters:
    """The writers of a kernel manager's kernels (see the module doc)."""

    def __init__(self, manager: Any):
        self.manager = manager
        self.log = manager.log
        self.writers: dict[str, NotebookWriter] = {}

    def writer(self, kernel_id: str) -> NotebookWriter:
        found = self.writers.get(kernel_id)
        if found is None:
            found = self.writers[kernel_id] = NotebookWriter(self, kernel_id)
        return found

    @property
    def ready(self) -> bool:
        """Whether the server has its sessions and contents (not while the
        kernel manager adopts kernels, before the server made them)."""
        server = self.manager.parent
        return getattr(server, "session_manager", None) is not None and \
            getattr(server, "contents_manager", None) is not None

    @property
    def contents_manager(self) -> Any:
        return getattr(self.manager.parent, "contents_manager", None)

    async def notebook_path(self, kernel_id: str) -> str:
        """The notebook whose session runs ``kernel_id`` ('' if none)."""
        sessions = getattr(self.manager.parent, "session_manager", None)
        if sessions is None or self.contents_manager is None:
            return ""
        try:
            model = await ensure_async(sessions.get_session(kernel_id=kernel_id))
        except Exception as error:  # (404: no session for it)
            self.log.debug("chspawner: kernel %s has no session: %s", kernel_id, error)
            return ""
        path = model.get("path") or ""
        return path if model.get("type") == "notebook" or path.endswith(".ipynb") else ""

    # -- state on record, for the next server --

    def _state_path(self, kernel_id: str) -> Path:
        return self.manager.records.notebook_state_path(kernel_id)

    def save_state(self, kernel_id: str, writing: bool) -> None:
        try:
            path = self._state_path(kernel_id)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps({"writing": writing}))
            os.replace(tmp, path)
        except (OSError, ValueError) as error:
            self.log.warning("chspawner: can't record kernel %s's notebook writing: %s",
                             kernel_id, error)

    def was_writing(self, kernel_id: str) -> bool:
        try:
            return bool(json.loads(self._state_path(kernel_id).read_text())["writing"])
        except (OSError, ValueError, KeyError, TypeError):
            return False

    # -- events --

    def page_connected(self, kernel_id: str, page: Any) -> None:
        self.writer(kernel_id).page_connected(page)

    def page_closed(self, kernel_id: str, page: Any, close_code: int | None) -> None:
        writer = self.writers.get(kernel_id)
        if writer is not None:
            writer.page_closed(page, close_code)

    def adopted(self, kernel_id: str) -> None:
        """A kernel taken over from an earlier server, with no page yet."""
        writer = self.writer(kernel_id)
        if self.was_writing(kernel_id):
            writer.start_later(0)
        else:
            writer.start_later(self.manager.notebook_write_after)

    def moved(self, kernel_id: str) -> None:
        """The kernel restarted elsewhere (a new job, a new keeper): a
        writing follows the new keeper."""
        writer = self.writers.get(kernel_id)
        if writer is not None and writer.active:
            writer.stop()
            writer.start()

    def forget(self, kernel_id: str) -> None:
        writer = self.writers.pop(kernel_id, None)
        if writer is not None:
            writer.stop(forget=True)

    def close_all(self) -> None:
        for kernel_id in list(self.writers):
            self.forget(kernel_id)
