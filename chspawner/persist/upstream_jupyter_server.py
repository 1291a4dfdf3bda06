"""jupyter_server's private parts that persistent kernels need, all here.

jupyter_server has no public way to add a kernel it did not start to its
kernel manager, to let go of one without stopping it, to learn which
signal stops the server, nor to change how a kernel's websocket limits
IOPub's rate or finds changed ports. What chspawner.persist does with them
goes through this module, and :data:`PRIVATE` lists each name, checked at
import (and in tests/test_upstream_contract.py, with who uses the names
set or overridden here). Supported: jupyter_server 2 (pyproject's
``persist`` extra pins the major).
"""
from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable
from typing import Any

from jupyter_server.serverapp import ServerApp
from jupyter_server.services.kernels.connection.channels import (
    ZMQChannelsWebsocketConnection,
)
from jupyter_server.services.kernels.kernelmanager import (
    MappingKernelManager,
    ServerKernelManager,
)
from tornado.websocket import WebSocketProtocol13

from chspawner.persist.upstream import Private, require

PRIVATE = (
    Private(MappingKernelManager, "_get_changed_ports",
            "a kernel that moved to another node gets fresh streams",
            used_by=(MappingKernelManager.ports_changed,)),
    Private(ZMQChannelsWebsocketConnection, "_limit_rate", "no rate limit on a replay",
            used_by=(ZMQChannelsWebsocketConnection.handle_outgoing_message,)),
    Private(ZMQChannelsWebsocketConnection, "_on_zmq_reply",
            "a kernel message's metadata gets chspawner_seq as it is written",
            used_by=(ZMQChannelsWebsocketConnection.handle_outgoing_message,)),
    Private(WebSocketProtocol13, "_abort",
            "a websocket that ended without the client's close frame",
            used_by=(WebSocketProtocol13._receive_frame_loop,
                     WebSocketProtocol13.on_connection_close)),
    Private(MappingKernelManager, "_kernel_connections", "an adopted kernel's websockets"),
    Private(MappingKernelManager, "_kernel_ports", "letting go of a kernel"),
    Private(MappingKernelManager, "_finish_kernel_start", "an adopted kernel is followed"),
    Private(MappingKernelManager, "_initialized_culler", "culling adopted kernels"),
    Private(ServerKernelManager, "_kernel_info_future",
            "an adopted busy kernel's info comes over control", on_instances=True,
            used_by=(ZMQChannelsWebsocketConnection.request_kernel_info,)),
    Private(ServerKernelManager, "_activity_stream", "letting go of a kernel",
            on_instances=True, used_by=(MappingKernelManager.stop_watching_activity,)),
    Private(ServerApp, "_signal_stop", "which signal stopped the server; SIGINT's way",
            used_by=(ServerApp.init_signal,)),
)
require("jupyter_server", PRIVATE)


class MappingKernelManagerHooks:
    """Mixin for jupyter_server's mapping kernel manager: its private
    changed-ports step as an overridable public hook."""

    def _get_changed_ports(self, kernel_id: str):
        return self.changed_ports(kernel_id)

    def changed_ports(self, kernel_id: str) -> list | None:
        """The ports of ``kernel_id`` that changed since last asked (None:
        none): a session reconnecting then gets fresh streams."""
        return super()._get_changed_ports(kernel_id)  # type: ignore[misc]


class WebsocketConnectionHooks:
    """Mixin for jupyter_server's kernel websocket connection: its private
    IOPub rate limit as an overridable public hook."""

    def _limit_rate(self, channel: str, msg: dict, msg_list: list) -> bool:
        return self.limit_rate(channel, msg, msg_list)

    def limit_rate(self, channel: str, msg: dict, msg_list: list) -> bool:
        """Whether the message is dropped by the IOPub rate limits."""
        return super()._limit_rate(channel, msg, msg_list)  # type: ignore[misc]

    def _on_zmq_reply(self, stream: Any, msg_or_parts: Any) -> None:
        self.relay_message(stream, msg_or_parts)

    def relay_message(self, stream: Any, msg_or_parts: Any) -> None:
        """Write a kernel message to the client: with the v1 websocket
        protocol ``msg_or_parts`` is the list of its frames after the
        signature (header, parent header, metadata, content, buffers), as
        bytes; with the legacy one, the message as a dict."""
        super()._on_zmq_reply(stream, msg_or_parts)  # type: ignore[misc]


def on_abort(ws_connection: Any, note: Callable[[], None]) -> None:
    """Have ``note()`` called when tornado's websocket ``ws_connection``
    ends without the client's close frame: its socket closed or reset, a
    ping or close timed out. (tornado aborts every websocket at its end;
    one whose client sent its close frame is marked client_terminated
    before that.)"""
    abort = ws_connection._abort

    def noted_abort() -> None:
        if not ws_connection.client_terminated:
            note()
        abort()
    ws_connection._abort = noted_abort


def utcnow() -> datetime.datetime:
    """Now, as jupyter_server dates a kernel's activity (aware, UTC)."""
    return datetime.datetime.now(datetime.timezone.utc)


def adopt_kernel(mkm: MappingKernelManager, kernel_id: str, km: ServerKernelManager,
                 kernel_info: asyncio.Future) -> None:
    """Count ``km`` (held by ``mkm`` already) as one of the server's kernels
    with no websocket yet; the first websocket's kernel info is
    ``kernel_info``'s result."""
    mkm._kernel_connections[kernel_id] = 0
    km._kernel_info_future = kernel_info


async def follow_kernel(mkm: MappingKernelManager, kernel_id: str) -> None:
    """What jupyter_server does once a kernel it started runs: watch its
    activity, its ports; and cull, if configured."""
    await mkm._finish_kernel_start(kernel_id)
    if not mkm._initialized_culler:
        mkm.initialize_culler()


def let_go(mkm: MappingKernelManager, km: ServerKernelManager, kernel_id: str) -> None:
    """Forget the server's state of a kernel about to be forgotten, without
    stopping it: its activity stream, websocket count and ports."""
    stream = getattr(km, "_activity_stream", None)  # (set once activity is watched)
    if stream is not None and not stream.closed():
        stream.close(linger=0)
    km._activity_stream = None
    mkm._kernel_connections.pop(kernel_id, None)
    mkm._kernel_ports.pop(kernel_id, None)


def on_stop_signal(server: Any, note: Callable[[int], None]) -> bool:
    """Have ``note(signal)`` called first whenever the server is asked to
    stop by a signal (SIGTERM, SIGINT: its own stop handler, which it
    installs later, is wrapped in place). False if ``server`` isn't a
    jupyter_server ServerApp (a kernel manager made outside one)."""
    if not isinstance(server, ServerApp):
        return False
    stop = server._signal_stop

    def signal_stop(sig: int, frame: Any) -> None:
        note(sig)
        stop(sig, frame)
    server._signal_stop = signal_stop
    return True


def stop_handler(server: Any) -> Callable[[int, Any], None] | None:
    """The server's own stop-by-signal handler (None outside a ServerApp)."""
    return server._signal_stop if isinstance(server, ServerApp) else None
