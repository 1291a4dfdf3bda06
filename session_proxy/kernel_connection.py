"""The kernel websocket, fed IOPub by the kernel's keeper: nothing lost
while no server or no browser is attached.

With :class:`~session_proxy.kernel_manager.PersistentKernelManager`,
configure::

    c.ServerApp.kernel_websocket_connection_class = (
        "session_proxy.kernel_connection.ReplayingKernelConnection")

A websocket connection to a kernel that has a keeper takes its IOPub
messages from the keeper's numbered stream instead of from the kernel, and
tells the keeper, message by message, how far its client session (the
``session_id`` query argument, stable across a client's reconnects) has
received. A client reconnecting with the same session id, to this server or
to the next one, first gets every message it has not received yet; if more
were produced than the keeper holds, it is first told how many were lost.
Shell, control and stdin go straight to the kernel, as before.
"""
from __future__ import annotations

import json
from typing import Any

import zmq
from jupyter_server.services.kernels.connection.channels import (
    ZMQChannelsWebsocketConnection,
)
from zmq.eventloop.zmqstream import ZMQStream


class ReplayingKernelConnection(ZMQChannelsWebsocketConnection):
    """Stock kernel websocket connection, IOPub from the keeper."""

    _lost: dict | None = None

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

    def _follow_keeper(self) -> ZMQStream:
        socket = self.kernel_manager.context.socket(zmq.DEALER)
        socket.linger = 0
        socket.connect(self._keeper_address())
        stream = ZMQStream(socket)
        stream.channel = "iopub"
        # Marks the stream, not this connection: jupyter_server hands a
        # disconnected session's streams (with what they buffered) to the
        # session's next connection.
        stream.keeper_session = self.session.session.encode()
        stream.delivered = 0
        stream.send_multipart([b"follow", stream.keeper_session])
        return stream

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
            return super().handle_outgoing_message(stream, outgoing_msg)
        kind = bytes(outgoing_msg[0])
        if kind == b"lost":
            self._lost = json.loads(bytes(outgoing_msg[1]))
            return
        if kind != b"msg":
            return
        seq = int(bytes(outgoing_msg[1]))
        if seq <= stream.delivered:
            return  # a duplicate (a follow repeated): already delivered
        frames = outgoing_msg[2:]
        if self._lost:
            self._tell_lost(self._lost, frames)
            self._lost = None
        # Acknowledge, then write. The ack goes straight onto the socket
        # (ZMQStream would hold it until the loop comes round again), so by
        # the time the client can act on this message -- say, its server is
        # killed -- the keeper knows where to resume. The other order leaves
        # a window after every write in which a kill replays the message
        # twice; this one leaves only the instant between two statements.
        if not stream.closed():
            try:
                stream.socket.send_multipart([b"ack", session, str(seq).encode()],
                                             zmq.NOBLOCK)
            except zmq.ZMQError:
                self.log.warning("chspawner: can't acknowledge message %d to the keeper", seq)
        stream.delivered = seq
        super().handle_outgoing_message(stream, frames)

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
            f"{notice['capacity']} messages ({_size(notice['capacity_bytes'])} at most). "
            "The output below resumes after the gap.", parent)


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "bytes" else f"{n:.0f} {unit}"
        n /= 1024
    return str(n)
