"""The kernel websocket, fed IOPub by the kernel's keeper: nothing lost
while no server or no browser is attached.

With :class:`~chspawner.persist.kernel_manager.PersistentKernelManager`,
configure::

    c.ServerApp.kernel_websocket_connection_class = (
        "chspawner.persist.kernel_connection.ReplayingKernelConnection")

A websocket connection to a kernel that has a keeper takes its IOPub
messages from the keeper's numbered stream instead of from the kernel, and
records, message by message, how far its client session (the
``session_id`` query argument, stable across a client's reconnects) has
been sent, in a file the keeper reads (see
:mod:`chspawner.persist.records`). A client reconnecting with the same
session id, to this server or to the next one, first gets every message it
has not received yet; if more were produced than the keeper holds, it is
first told how many were lost. A cell that ended meanwhile gets its
``execute_reply`` rebuilt (:mod:`chspawner.persist.missed_replies`).
Shell, control and stdin go straight to the kernel, as before.

End to end (what a page *received*, not what a socket accepted):

- every IOPub message relayed from the keeper carries the keeper's number
  in its metadata, ``chspawner_seq``; notices made here carry
  ``chspawner_notice``; a replayed message whose execution another client
  session asked for carries its notebook cell's id, ``chspawner_cell``
  (from :class:`~chspawner.persist.records.CellMap`, where each
  execute_request's ``cellId`` is noted as it is forwarded);
- ``chspawner_received=<seq>`` on the websocket URL (chspawner's JupyterLab
  extension sends it) says the page holds everything up to ``<seq>``: the
  session resumes right after it, even below what was recorded as sent;
- a client without it whose websocket ended without its close frame (a
  proxy killed, a network cut) is told, on its next connection, how many
  messages written in the last ``delivery_uncertain_seconds`` may be
  missing, in the output area of the cells they belong to.
"""
from __future__ import annotations

import functools
import json
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import zmq
from jupyter_client.jsonutil import json_default
from jupyter_server.services.kernels.connection.base import (
    deserialize_msg_from_ws_v1,
    serialize_msg_to_ws_v1,
)
from jupyter_server.services.kernels.connection.channels import (
    ZMQChannelsWebsocketConnection,
)
from tornado.websocket import WebSocketClosedError
from traitlets import Bool, Float
from zmq.eventloop.zmqstream import ZMQStream

from chspawner.images.progress import format_size
from chspawner.persist.delivery import (
    Recent, metadata_keys, parse_received, uncertain_notice, with_metadata)
from chspawner.persist.keeper import DELIM, signed_request
from chspawner.persist.keeper_state import GAP_REBUILT, Takeover, rebuilt_reply
from chspawner.persist.missed_replies import REBUILT, timestamp
from chspawner.persist.notebook_outputs import cell_map
from chspawner.persist.records import AckFile, CellMap, read_ack
from chspawner.persist.replay import BatchedReplay
from chspawner.persist.upstream_jupyter_server import WebsocketConnectionHooks, on_abort
from chspawner.provisioner.transport import secure_client


#: kernel id -> its open connections that follow its keeper
_following: dict[str, weakref.WeakSet] = {}
#: kernel id -> {client session: [(parent header, count)] of messages that
#: may not have reached it: its websocket broke just after they were written}
_uncertain: dict[str, dict[str, list[tuple[dict, int]]]] = {}
#: the most client sessions per kernel whose uncertain messages are kept
MAX_UNCERTAIN_SESSIONS = 100
V1 = "v1.kernel.websocket.jupyter.org"


def close_connections(kernel_id: str, reason: str) -> None:
    """Close the kernel's websockets that follow its keeper (1012: "service
    restart"); their clients reconnect, and follow the kernel afresh."""
    for connection in list(forget_connections(kernel_id)):
        handler = connection.websocket_handler
        if handler is not None and handler.ws_connection is not None:
            handler.close(1012, reason)


def keeper_replaced(kernel_id: str) -> None:
    """The kernel's keeper died and a new one took over (see the kernel
    manager's keeper watch): each open connection follows the new one in
    place. (Closing them instead, for their clients to reconnect, would
    lose what the kernel sends on shell while they are away, and makes
    JupyterLab show the kernel disconnected; in place, nothing else
    changes for the page.) A session whose page is away follows it when
    it reconnects."""
    for connection in list(_following.get(kernel_id, ())):
        handler = connection.websocket_handler
        if handler is not None and handler.ws_connection is not None:
            connection.follow_new_keeper()


#: The most executions of one session tracked until they end.
MAX_PENDING = 1000


def stop_following(stream: Any, key: bytes) -> None:
    """A page went away and jupyter_server keeps its session's streams for
    its return (see the kernel manager's ``start_buffering``): the keeper
    stream is left unread and the keeper stops sending to it. What the
    kernel prints meanwhile stays with the keeper, bounded there, not in
    the server's memory; the session's next connection follows again from
    what it acknowledged, in order. (Buffered by jupyter_server instead,
    the keeper's answer to that follow and the replay's first messages
    would wait in the buffer while the rest came straight from the
    socket: out of order.)"""
    if getattr(stream, "keeper_session", None) is None or stream.closed():
        return
    stream.stop_on_recv()
    stream.send_multipart(signed_request(key, [b"unfollow"]))


def forget_connections(kernel_id: str) -> weakref.WeakSet:
    """Stop tracking the kernel's connections (a kernel gone for good)."""
    _uncertain.pop(kernel_id, None)
    return _following.pop(kernel_id, weakref.WeakSet())


#: The close code a close frame without one counts as (RFC 6455, 7.1.5).
NO_STATUS_RECEIVED = 1005


class ReplayingKernelConnection(BatchedReplay, WebsocketConnectionHooks,
                                ZMQChannelsWebsocketConnection):
    """Stock kernel websocket connection, IOPub from the keeper."""

    delivery_uncertain_seconds = Float(
        10.0,
        help="After a client's websocket ends without its close frame (a proxy "
             "killed, a network cut, a ping timeout), the kernel messages written "
             "to it in this many seconds before count as maybe not received: a "
             "client reconnecting without chspawner_received (no chspawner "
             "JupyterLab extension) is told how many, in the cells' output.",
    ).tag(config=True)

    annotate_seq = Bool(
        True,
        help="Add the keeper's number (metadata.chspawner_seq) to each kernel "
             "message relayed to a client, and the cell id (chspawner_cell) to a "
             "replay another session asked for: what chspawner's JupyterLab "
             "extension needs to drop copies and to ask for exactly what it lacks. "
             "Off: messages as the kernel sent them (for comparison only).",
    ).tag(config=True)

    replay_in_batches = Bool(
        True,
        help="Write a replay (what a page missed) up to 256 messages a socket "
             "write (chspawner.persist.replay): 10,000 missed messages in well "
             "under a second instead of ~3 s. Off: message by message, as the "
             "live stream (for comparison only).",
    ).tag(config=True)

    _lost: dict | None = None
    #: (keeper stream, seq, parent frame) of the keeper's message being written
    _sending: tuple[ZMQStream, int, bytes] | None = None
    #: the websocket ended without the client's close frame
    _broken = False
    _received: int | None = None
    _received_parsed = False

    @property
    def received(self) -> int | None:
        """The client's ``chspawner_received``: it holds every message up to
        this seq (None: not given, or not a number; logged)."""
        if not self._received_parsed:
            self._received_parsed = True
            handler = self.websocket_handler
            raw = handler.get_argument("chspawner_received", None) if handler else None
            self._received = parse_received(raw)
            if raw is not None and self._received is None:
                self.log.warning("chspawner: ignoring chspawner_received=%r: not a seq", raw[:40])
        return self._received

    def cell_map(self) -> CellMap | None:
        """The kernel's CellMap (None: a kernel without a keeper's records),
        one per kernel, shared with the kernel's notebook writer."""
        return cell_map(self.kernel_manager)

    def _keeper_address(self) -> str:
        return getattr(self.kernel_manager, "keeper_address", "") or ""

    def create_stream(self) -> None:
        if not self._keeper_address():
            return super().create_stream()  # a kernel without a keeper: stock
        identity = self.session.bsession
        for channel in ("shell", "control", "stdin"):
            meth = getattr(self.kernel_manager, "connect_" + channel)
            self.channels[channel] = stream = meth(identity=identity)
            stream.channel = channel
        self.channels["iopub"] = self._follow_keeper()
        _following.setdefault(self.kernel_id, weakref.WeakSet()).add(self)

    def _follow(self, stream: ZMQStream, received: int | None = None) -> None:
        """Ask the keeper to stream to this session; from right after
        ``received`` when the client said what it holds. Until the keeper
        answers, what it still sends under an earlier follow is dropped: the
        new follow sends it again, in order, if the client lacks it."""
        request = [b"follow", stream.keeper_session]
        if received is not None:
            request.append(str(received).encode())
            stream.delivered = stream.acked = received
            try:
                stream.ack.write(received)  # (for a keeper that ignores the argument)
            except (OSError, ValueError, OverflowError) as error:
                self.log.warning("chspawner: can't record seq %d as received: %s",
                                 received, error)
        stream.pending_follows += 1
        stream.send_multipart(signed_request(self.kernel_manager.session.key, request))

    def _follow_keeper(self) -> ZMQStream:
        socket = self.kernel_manager.context.socket(zmq.DEALER)
        socket.linger = 0
        # A keeper on a node (TCP) lets in only the kernel's CURVE key.
        secure_client(socket, self.kernel_manager.get_connection_info(), self._keeper_address())
        socket.connect(self._keeper_address())
        stream = ZMQStream(socket)
        stream.channel = "iopub"
        # Marks the stream, not this connection: jupyter_server hands a
        # disconnected session's streams (with what they buffered) to the
        # session's next connection.
        stream.keeper_session = self.session.session.encode()
        stream.delivered = stream.acked = 0
        stream.pending_follows = 0
        stream.recent = Recent(self.delivery_uncertain_seconds)  # what was written lately (for a broken websocket)
        stream.cells_seen = {}  # parent msg_id -> cell id for a replay (None: not another's)
        # Made with the shell socket: a reply the kernel sent before went elsewhere.
        stream.shell_since = time.time()
        stream.missed_replies = {}  # seq of an execution's end -> what the keeper rebuilt
        stream.replay_until = 0  # messages up to this seq piled up before we followed
        stream.connection = self
        # This session's executions not ended yet (their idle status not
        # relayed): msg_id -> {"parent": request header, "replied": bool}.
        stream.pending = OrderedDict()
        # The keeper takeover this stream has dealt with, and, while its
        # probe is out, what it settles (see _settle_takeover).
        stream.takeover = None
        stream.settling = None
        stream.probes = set()  # our probes' ids: their replies are ours
        stream.ack = AckFile(Path(self.kernel_manager.acks_dir), self.session.session)
        weakref.finalize(stream, stream.ack.close)
        self._follow(stream, self.received)
        return stream

    def connect(self):
        done = super().connect()
        keeper = self.channels.get("iopub")
        if getattr(keeper, "keeper_session", None) is not None and keeper.connection is not self:
            # The session's streams, handed on from its last connection by
            # jupyter_server's buffering. The keeper may have sent that one
            # messages it could not write (its websocket was closing): follow
            # again, from what was acknowledged; what comes twice is dropped.
            keeper.connection = self
            _following.setdefault(self.kernel_id, weakref.WeakSet()).add(self)
            self._follow(keeper, self.received)
        if getattr(keeper, "keeper_session", None) is not None:
            ws = self.websocket_handler.ws_connection
            if ws is not None:
                on_abort(ws, self._note_broken)
            self._tell_uncertain()
        self._tell_notice()
        if getattr(keeper, "keeper_session", None) is not None and done is not None:
            # (after the nudge, which takes every shell reply while it runs)
            probe = self._settle_takeover(keeper)
            if probe is not None:
                done.add_done_callback(lambda _f: probe())
        writers = self._notebook_writers()
        if writers is not None:  # a page holds the kernel: the server stops writing
            writers.page_connected(self.kernel_id, self)
        return done

    def follow_new_keeper(self) -> None:
        """The kernel's keeper was replaced: follow the new one (the socket
        reconnects by itself to the same address), after telling the page
        what the gap cost."""
        keeper = self.channels.get("iopub")
        if getattr(keeper, "keeper_session", None) is None:
            return
        probe = self._settle_takeover(keeper)
        keeper.pending_follows = 0  # the old keeper is dead: it answers nothing more
        self._follow(keeper)
        if probe is not None:
            probe()

    # -- a keeper's death --

    def _settle_takeover(self, stream: ZMQStream):
        """If the kernel's keeper was replaced since this session last
        followed one: tell the page, once, in the interrupted cell's
        output, what could not be kept; then find out which of its
        executions ended unseen in the gap, to end them in the page (see
        _settled). Returns the probe to send once the shell is ours (None:
        nothing to settle)."""
        km = self.kernel_manager
        takeover: Takeover | None = getattr(km, "takeover", None)
        if takeover is None or stream.takeover is takeover:
            return None
        stream.takeover = takeover
        session = self.session.session
        acked = read_ack(Path(km.acks_dir), session)
        if not takeover.resumed(acked) or takeover.covered(acked):
            # Nothing of the old keeper's was ever sent here, or the gap
            # was filled in: the session resumes through it, all there.
            takeover.settled.add(session)
            return None
        interrupted = takeover.interrupted(acked)
        cells: OrderedDict[str, dict] = OrderedDict()
        if interrupted and interrupted["parent"].get("session") == session \
                and session not in takeover.settled:
            msg_id = interrupted["parent"].get("msg_id", "")
            cells[msg_id] = {"parent": interrupted["parent"], "replied": False,
                             "cell": interrupted}
        for msg_id, pending in stream.pending.items():
            entry = cells.setdefault(msg_id, {"parent": pending["parent"], "cell": None})
            entry["replied"] = pending["replied"]
        where = (interrupted or {}).get("parent") or next(
            (c["parent"] for c in cells.values()), None)
        if session not in takeover.told and (where or takeover.unsent(acked)):
            takeover.told.add(session)
            try:
                self._write_made_up("stream", {"name": "stderr",
                                               "text": takeover.notice(acked) + "\n"},
                                    where or km.running_cell or {}, "iopub",
                                    {"chspawner_notice": True})
            except WebSocketClosedError:
                takeover.told.discard(session)
        if not cells:
            takeover.settled.add(session)
            return None
        stream.settling = {"cells": cells, "probe": None}

        def probe() -> None:
            # On this session's own shell socket: the kernel answers it
            # after every request sent here before it (one socket's
            # messages keep their order), so its status on IOPub comes
            # after the end of each of them.
            shell = self.channels.get("shell")
            if shell is None or shell.closed() or stream.settling is None:
                return
            msg_id = self.session.send(shell, "kernel_info_request")["header"]["msg_id"]
            stream.settling["probe"] = msg_id
            stream.probes.add(msg_id)
        return probe

    def _settled(self, stream: ZMQStream) -> None:
        """The probe's status came through the new keeper: every execution
        still in ``settling`` ended before the new keeper heard anything,
        its end unseen. The page gets what makes the cell finish: its
        execute_reply, if it did not come on shell, and its idle status."""
        settling, stream.settling = stream.settling, None
        takeover = stream.takeover
        for msg_id, entry in settling["cells"].items():
            stream.pending.pop(msg_id, None)
            parent = entry["parent"]
            try:
                if not entry["replied"]:
                    self._write_made_up("execute_reply", rebuilt_reply(entry["cell"]),
                                        parent, "shell", GAP_REBUILT)
                self._write_made_up("status", {"execution_state": "idle"}, parent,
                                    "iopub", GAP_REBUILT)
            except WebSocketClosedError:
                return  # gone: its next connection settles it
        if takeover is not None:
            takeover.settled.add(self.session.session)

    def _write_made_up(self, msg_type: str, content: dict, parent: dict, channel: str,
                       metadata: dict) -> None:
        """A message the server makes up (no keeper seq), to the page."""
        msg = self.session.msg(msg_type, content=content, parent=parent, metadata=metadata)
        if self.subprotocol == "v1.kernel.websocket.jupyter.org":
            self.write_message(serialize_msg_to_ws_v1(msg, channel, self.session.pack),
                               binary=True)
        else:
            msg["channel"] = channel
            self.write_message(json.dumps(msg, default=json_default))

    def _note_request(self, incoming_msg: Any) -> None:
        """Track the page's execute_requests until their end comes (a
        keeper's death may swallow it). A substring test first: most
        messages are not one."""
        keeper = self.channels.get("iopub")
        if getattr(keeper, "keeper_session", None) is None:
            return
        needle = b"execute_request" if isinstance(incoming_msg, bytes) else "execute_request"
        if needle not in incoming_msg:
            return
        try:
            if self.subprotocol == "v1.kernel.websocket.jupyter.org":
                channel, msg_list = deserialize_msg_from_ws_v1(incoming_msg)
                header = json.loads(msg_list[0])
            else:
                msg = json.loads(incoming_msg)
                channel, header = msg.get("channel"), msg["header"]
        except (ValueError, IndexError, KeyError, TypeError):
            return
        if channel in (None, "shell") and header.get("msg_type") == "execute_request":
            keeper.pending[header.get("msg_id", "")] = {"parent": header, "replied": False}
            while len(keeper.pending) > MAX_PENDING:
                keeper.pending.popitem(last=False)

    def _note_broken(self) -> None:
        self._broken = True

    def _notebook_writers(self) -> Any:
        return getattr(self.multi_kernel_manager, "notebook_writers", None)

    def disconnect(self):
        keeper = self.channels.get("iopub") if self.channels else None
        if self._broken and getattr(keeper, "keeper_session", None) is not None:
            self._keep_uncertain(keeper)
        writers = self._notebook_writers()
        if writers is not None:
            # The client's close code (None: no close frame came, the
            # connection broke; 1005, tornado's None too: a close frame
            # without a code): a page that left on purpose has the server
            # write the kernel's output into its notebook.
            code = getattr(self.websocket_handler, "close_code", None)
            if code is None and not self._broken:
                code = NO_STATUS_RECEIVED
            writers.page_closed(self.kernel_id, self, code)
        return super().disconnect()

    def _keep_uncertain(self, stream: ZMQStream) -> None:
        """The websocket broke: note what was written to it lately (and is
        acknowledged, so won't be sent again), per cell, for the session's
        next connection."""
        since = time.monotonic() - self.delivery_uncertain_seconds
        by_cell = stream.recent.uncertain(since, stream.acked)
        if not by_cell:
            return
        sessions = _uncertain.setdefault(self.kernel_id, {})
        sessions.pop(self.session.session, None)
        sessions[self.session.session] = by_cell
        while len(sessions) > MAX_UNCERTAIN_SESSIONS:
            sessions.pop(next(iter(sessions)))
        self.log.warning("chspawner: kernel %s: websocket of session %s broke; up to %d "
                         "message(s) written just before may not have reached it",
                         self.kernel_id, self.session.session,
                         sum(n for _, n in by_cell))

    def _tell_uncertain(self) -> None:
        """On a session's connection after a broken one: with
        chspawner_received the keeper replays exactly what the client lacks,
        nothing is uncertain; without it, say how many may be missing."""
        found = _uncertain.get(self.kernel_id, {}).pop(self.session.session, None)
        if not found or self.received is not None:
            return
        for parent, count in found:
            try:
                self.write_stderr(uncertain_notice(count, self.delivery_uncertain_seconds),
                                  parent)
            except WebSocketClosedError:
                return

    def write_stderr(self, error_message, parent_header):
        """A notice from chspawner (not the kernel): stock, marked
        ``metadata.chspawner_notice``, no seq."""
        self.log.warning(error_message)
        msg = self.session.msg("stream", content={"text": error_message + "\n", "name": "stderr"},
                               parent=parent_header, metadata={"chspawner_notice": True})
        if self.subprotocol == V1:
            self.write_message(serialize_msg_to_ws_v1(msg, "iopub", self.session.pack),
                               binary=True)
        else:
            msg["channel"] = "iopub"
            self.write_message(json.dumps(msg, default=json_default))

    def handle_incoming_message(self, incoming_msg: Any) -> None:
        """Stock; an execute_request's cell (JupyterLab's ``metadata.cellId``)
        is noted first, for replays to another page and later readers. A
        byte search first: most messages are not that one."""
        if self._keeper_address():
            try:
                self._note_cell(incoming_msg)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError, OSError) as e:
                self.log.debug("chspawner: no cell noted: %s", e)
            self._note_request(incoming_msg)
        return super().handle_incoming_message(incoming_msg)

    def _note_cell(self, message: Any) -> None:
        if isinstance(message, str):
            if '"execute_request"' not in message:
                return
            msg = json.loads(message)
            header, metadata = msg.get("header") or {}, msg.get("metadata") or {}
        elif self.subprotocol == V1:
            if b'"execute_request"' not in message:
                return
            channel, parts = deserialize_msg_from_ws_v1(message)
            if channel != "shell":
                return
            header, metadata = json.loads(parts[0]), json.loads(parts[2])
        else:
            return  # (legacy binary: a message with buffers, not a request)
        if header.get("msg_type") != "execute_request" or not isinstance(metadata, dict):
            return
        cell, cells = metadata.get("cellId"), self.cell_map()
        if isinstance(cell, str) and cells is not None:
            cells.add(str(header.get("msg_id", "")), cell, self.session.session)

    def on_kernel_restarted(self) -> None:
        """Before the client hears "restarting" (JupyterLab then forgets the
        cell the kernel was running, and shows nothing more in it): a kernel
        whose job ended by itself is told so, in words, in that cell's
        output (see the kernel manager's notice_before_restart)."""
        if not self._say_before_restart():
            # (told again when the client reconnects)
            self.kernel_manager.told_before_restart.discard(self.session.session)
        super().on_kernel_restarted()

    def on_restart_failed(self) -> None:
        """Before the client hears "dead": a kernel not restarted (its job
        was cancelled on purpose, see the kernel manager's
        KernelJobRestarter) is told why, in words, in the running cell.
        (Gone for good: no later connection to tell if this one is closed.)"""
        self._say_before_restart()
        super().on_restart_failed()

    def _say_before_restart(self) -> bool:
        """The kernel manager's words for this client session (if any), on
        the running cell's output; False if the socket was closed."""
        km = self.kernel_manager
        before = getattr(km, "notice_before_restart", None)
        words = before(self.session.session) if before is not None else ""
        if words:
            try:
                self.write_stderr(words, km.running_cell or {})
            except WebSocketClosedError:
                return False
        return True

    def _tell_notice(self) -> None:
        """The kernel's notice (it was lost with its node, see the kernel
        manager), once to each client session, in the output of the cell
        it was running."""
        km = self.kernel_manager
        notice = getattr(km, "notice", "")
        session = self.session.session
        if not notice or session in km.notice_told:
            return
        km.notice_told.add(session)
        try:
            self.write_stderr(notice, km.running_cell or {})
        except WebSocketClosedError:
            km.notice_told.discard(session)  # gone again: the next connection tells it

    def nudge(self):
        """The stock nudge waits for an IOPub message on the client's IOPub
        stream and swallows it; the keeper's stream must lose nothing, so
        the nudge watches a throwaway subscription to the kernel instead.
        (The keeper's stream needs no nudge: it is not a PUB/SUB pair.)"""
        keeper = self.channels.get("iopub")
        if getattr(keeper, "keeper_session", None) is None:
            return super().nudge()
        probe = self.kernel_manager.connect_iopub()
        self.channels["iopub"] = probe
        try:
            done = super().nudge()
        finally:
            self.channels["iopub"] = keeper

        def close_probe(_: Any) -> None:
            if not probe.closed():
                probe.close(linger=0)

        done.add_done_callback(close_probe)
        return done

    def handle_outgoing_message(self, stream: Any, outgoing_msg: list[Any]) -> None:
        if isinstance(stream, str):
            stream = self.channels[stream]
        session = getattr(stream, "keeper_session", None)
        if session is None:
            if getattr(stream, "channel", None) == "shell" and self._shell_reply(outgoing_msg):
                return  # the answer to our own probe
            return super().handle_outgoing_message(stream, outgoing_msg)
        kind = bytes(outgoing_msg[0])
        if kind == b"following":
            following = json.loads(bytes(outgoing_msg[1]))
            stream.pending_follows = max(0, stream.pending_follows - 1)
            stream.replay_until = following["last_seq"]
            stream.missed_replies = {m["seq"]: m for m in following["missed_replies"]}
            stream.cells_seen = {}
            return
        if stream.pending_follows:
            return  # under an earlier follow: the pending one sends what is needed
        if kind == b"lost":
            self._lost = json.loads(bytes(outgoing_msg[1]))
            return
        if kind != b"msg":
            return
        if self.replay_in_batches and self.replay_batch(stream, outgoing_msg):
            return  # a replay: written with what is queued behind it (see replay.py)
        seq = int(bytes(outgoing_msg[1]))
        if seq <= stream.delivered:
            return  # a duplicate (a follow repeated): already delivered
        frames = outgoing_msg[2:]
        self._note_iopub(stream, frames)
        if self._lost:
            self._tell_lost(self._lost, frames)
            self._lost = None
        try:
            parent = frames[frames.index(DELIM) + 3]
        except (ValueError, IndexError):
            parent = b""
        self._sending = (stream, seq, parent)
        try:
            super().handle_outgoing_message(stream, frames)  # -> write_message
        finally:
            self._sending = None
        missed = stream.missed_replies.pop(seq, None)
        if missed and timestamp(missed["ended"]) < stream.shell_since:
            self._give_missed_reply(missed)
        if self._probe_seen:
            self._probe_seen = False
            self._settled(stream)

    _probe_seen = False

    def _note_iopub(self, stream: ZMQStream, frames: list[Any]) -> None:
        """Keep the parent of the kernel's latest execute_input (the cell it
        runs): a notice that the kernel was lost goes to that cell's output.
        Strike off the session's executions as their idle status passes,
        and notice the status of a takeover's probe. Byte searches first:
        most messages are neither."""
        try:
            _idents, msg_list = self.session.feed_identities([bytes(f) for f in frames])
            header = msg_list[1]
            if b'"execute_input"' in header and \
                    json.loads(header).get("msg_type") == "execute_input":
                self.kernel_manager.running_cell = parent = json.loads(msg_list[2])
                cells = self.cell_map()
                if cells is not None:  # the count a reloaded page's cell shows
                    cells.counted(str(parent.get("msg_id", "")),
                                  json.loads(msg_list[4]).get("execution_count"))
            elif b'"status"' in header and (stream.pending or stream.settling) and \
                    json.loads(header).get("msg_type") == "status":
                parent = json.loads(msg_list[2]).get("msg_id")
                if json.loads(msg_list[4]).get("execution_state") == "idle":
                    stream.pending.pop(parent, None)
                    if stream.settling:
                        stream.settling["cells"].pop(parent, None)
                if stream.settling and parent and parent == stream.settling["probe"]:
                    self._probe_seen = True  # settled once this one is written
        except (ValueError, IndexError, AttributeError):
            pass

    def _shell_reply(self, frames: list[Any]) -> bool:
        """A reply on shell: note that a tracked execution was answered;
        True for the answer to a takeover's probe (the page did not ask)."""
        keeper = self.channels.get("iopub")
        pending = getattr(keeper, "pending", None)
        if not pending and not getattr(keeper, "settling", None) \
                and not getattr(keeper, "probes", None):
            return False
        try:
            _idents, msg_list = self.session.feed_identities([bytes(f) for f in frames])
            parent = json.loads(msg_list[2]).get("msg_id")
        except (ValueError, IndexError, AttributeError):
            return False
        if parent in pending:
            pending[parent]["replied"] = True
        if keeper.settling and parent in keeper.settling["cells"]:
            keeper.settling["cells"][parent]["replied"] = True
        if parent in keeper.probes:
            keeper.probes.discard(parent)
            return True
        return False

    def _give_missed_reply(self, missed: dict) -> None:
        """After the replayed end of an execution whose reply went to a
        server that is gone, that reply, as the keeper rebuilt it."""
        msg = self.session.msg("execute_reply", content=missed["reply"],
                               parent=missed["parent"], metadata=REBUILT)
        try:
            if self.subprotocol == V1:
                self.write_message(serialize_msg_to_ws_v1(msg, "shell", self.session.pack),
                                   binary=True)
            else:
                msg["channel"] = "shell"
                self.write_message(json.dumps(msg, default=json_default))
        except WebSocketClosedError:
            pass  # gone again: the next connection rebuilds it from the replay

    def limit_rate(self, channel, msg, msg_list) -> bool:
        """Stock IOPub rate limits, but not for a replay: what piled up over
        a gap comes at once by nature, and dropping it would lose it for
        good (the keeper's buffer bounds it instead)."""
        if self._sending is not None:
            stream, seq, _parent = self._sending
            if seq <= stream.replay_until:
                return False
        return super().limit_rate(channel, msg, msg_list)

    def relay_message(self, stream: Any, msg_or_parts: Any) -> None:
        """The keeper's message gets its seq (and, replayed to a session that
        did not ask for it, its cell) in its metadata, as it is written.
        With the v1 protocol the metadata frame's bytes are spliced, no
        JSON parsed (the kernel's signature isn't forwarded, so nothing
        else changes); with the legacy one the message is a dict already."""
        if self._sending is not None and self.annotate_seq:
            sending, seq, parent = self._sending
            cell, count = (self._replayed_cell(sending, parent)
                           if seq <= sending.replay_until else (None, None))
            if isinstance(msg_or_parts, dict):
                metadata = msg_or_parts.get("metadata")
                if isinstance(metadata, dict):
                    metadata["chspawner_seq"] = seq
                    if cell is not None:
                        metadata["chspawner_cell"] = cell
                    if count is not None:
                        metadata["chspawner_count"] = count
            elif len(msg_or_parts) > 2:
                msg_or_parts[2] = with_metadata(bytes(msg_or_parts[2]),
                                                metadata_keys(seq, cell, count))
        super().relay_message(stream, msg_or_parts)

    def _replayed_cell(self, stream: ZMQStream,
                       parent: bytes) -> tuple[str | None, int | None]:
        """The cell of a replayed message's execution, when another client
        session asked for it (this one's page knows its own cells), and the
        count the execution began as (a page reloaded mid-cell never got
        its execute_input); (None, None) otherwise."""
        cells = self.cell_map()
        if cells is None or b'"msg_id"' not in parent:
            return None, None
        try:
            msg_id = str(json.loads(parent).get("msg_id", ""))
        except (ValueError, AttributeError):
            return None, None
        if msg_id not in stream.cells_seen:
            cell = cells.cell(msg_id)
            asked_by = cells.session(msg_id) if cell is not None else None
            stream.cells_seen[msg_id] = cell if asked_by != self.session.session else None
        cell = stream.cells_seen[msg_id]
        return cell, cells.count(msg_id) if cell is not None else None

    @property
    def write_message(self):
        write = self.websocket_handler.write_message
        if self._sending is None:
            return write
        return functools.partial(self._write_and_acknowledge, write)

    def _write_and_acknowledge(self, write, message, binary: bool = False):
        """Write the keeper's message to the websocket, then acknowledge it.

        The acknowledgement is a store to a mapped file (see AckFile), on
        record at once, made as soon as the message is out: handed to the
        socket, or, for a client reading slowly, once tornado has flushed
        what it held. A server killed in the instant between has sent a
        message it never recorded; the next connection is sent it again,
        and chspawner's proxy, which knows what its client already got,
        drops the copy (see ``session_proxy.proxy.delivered``; through another
        proxy the client would see it twice). The other order would lose
        it instead. A websocket that is closing refuses the write; its
        message stays unacknowledged, for the session's next connection."""
        stream, seq, parent = self._sending
        self._sending = None
        connection = self.websocket_handler.ws_connection
        if connection is None or connection.is_closing():
            return write(message, binary=binary)  # raises
        flushed = write(message, binary=binary)
        stream.delivered = seq
        stream.recent.add(time.monotonic(), seq, parent)
        self._acknowledge_when_out(stream, connection.stream, flushed, seq)
        return flushed

    def _acknowledge_when_out(self, stream: ZMQStream, socket: Any, flushed: Any,
                              seq: int) -> None:
        """Acknowledge ``seq`` once what was just written to the client's
        ``socket`` is out: at once if it was handed to the kernel, when
        ``flushed`` is done if tornado holds it; never if the client went."""
        if socket.closed():
            pass  # the client went while this was written: not out
        elif socket.writing():
            flushed.add_done_callback(
                lambda f: f.cancelled() or f.exception() or self._acknowledge(stream, seq))
        else:
            self._acknowledge(stream, seq)

    def _acknowledge(self, stream: ZMQStream, seq: int) -> None:
        """Record ``seq`` as the last message the client was sent."""
        if seq <= stream.acked:
            return
        stream.acked = seq
        try:
            stream.ack.write(seq)
        except OSError as error:
            self.log.warning("chspawner: can't record message %d as delivered: %s", seq, error)

    def _tell_lost(self, notice: dict, next_frames: list[Any]) -> None:
        """Say plainly what the gap cost, in the output area of the cell the
        replay resumes in (the parent of the first message replayed)."""
        try:
            _idents, msg_list = self.session.feed_identities([bytes(f) for f in next_frames])
            parent = json.loads(msg_list[2])
        except (ValueError, IndexError):
            parent = {}
        self.write_stderr(
            f"[chspawner] {notice['lost']} kernel output message(s) were lost while no "
            f"server or browser was attached: the kernel's buffer keeps only the last "
            f"{notice['capacity']} messages ({format_size(notice['capacity_bytes'], 0, 'bytes')} at most). "
            "The output below resumes after the gap.", parent)

