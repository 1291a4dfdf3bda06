"""A replay written in batches: what piled up while a page was away (up to
the keeper's whole buffer, 10,000 messages by default) reaches it in a
fraction of a second.

Message by message, a replay costs what the live stream does: a turn of
the event loop per keeper message, jupyter_server's parsing for its error
and rate-limit checks, a tornado write (a task and a system call) and an
acknowledgement each. Here a replayed message the keeper sent takes the
ones queued behind it on the keeper's socket along (up to
:data:`REPLAY_BATCH`); each gets the same treatment as one by one (its
seq, and its cell and count for another session, spliced into its
metadata; the kernel's current cell and the session's executions noted;
the time it was written kept for a broken websocket's notice), their websocket frames go out in one write, and the
last seq is acknowledged once that write is out: nothing is recorded as
sent that was not handed to the socket, as before.

What needs the message-by-message path takes it, in order (what was
batched before it is written first): a message after the replay (live), a
kernel error (jupyter_server may hide its traceback), the end of an
execution whose reply is rebuilt, the message a "lost" notice precedes, a
keeper's answer to a follow, anything while a keeper takeover is being
settled, and every message on a websocket that compresses.
"""
from __future__ import annotations

import json
import struct
import time
from typing import Any

import zmq
from jupyter_client.jsonutil import json_default
from jupyter_server.services.kernels.connection.base import (
    serialize_binary_message,
    serialize_msg_to_ws_v1,
)
from tornado.iostream import StreamBufferFullError, StreamClosedError
from tornado.websocket import WebSocketClosedError

from chspawner.persist.delivery import metadata_keys, with_metadata
from chspawner.persist.keeper import DELIM

#: The most messages written at once. Below what chspawner's proxy keeps
#: of a relay's last frames (``session_proxy.proxy.delivered.TAIL_FRAMES``,
#: 512): a server killed between a batch's write and its acknowledgement
#: has its next one replay the batch, and the proxy drops the copies.
REPLAY_BATCH = 256
#: The most bytes of kernel messages written at once (a batch of big
#: outputs goes out sooner).
REPLAY_BATCH_BYTES = 4 << 20
V1 = "v1.kernel.websocket.jupyter.org"


def ws_frame(payload: bytes, binary: bool) -> bytes:
    """A websocket data frame, server to client (unmasked, final, no
    extension), as tornado writes one."""
    head = 0x82 if binary else 0x81
    size = len(payload)
    if size < 126:
        return struct.pack("!BB", head, size) + payload
    if size <= 0xFFFF:
        return struct.pack("!BBH", head, 126, size) + payload
    return struct.pack("!BBQ", head, 127, size) + payload


class BatchedReplay:
    """Mixin for :class:`~chspawner.persist.kernel_connection.ReplayingKernelConnection`:
    its keeper messages that are a replay, written in batches."""

    _batching = False

    def replay_batch(self, stream: Any, first: list[Any]) -> bool:
        """Write ``first`` (a keeper ``msg`` whose seq is a replay's) and the
        messages queued behind it; False when it needs the
        message-by-message path (nothing was taken)."""
        if self._batching or not self._batchable(stream, first):
            return False
        handler = self.websocket_handler
        connection = handler.ws_connection if handler is not None else None
        if connection is None or connection.is_closing() \
                or handler.get_compression_options() is not None:
            return False
        queued, size = [first], 0
        socket = stream.socket
        while len(queued) < REPLAY_BATCH and size < REPLAY_BATCH_BYTES:
            try:
                parts = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:  # (Again: nothing more queued)
                break
            queued.append(parts)
            size += sum(len(p) for p in parts)
        self._batching = True
        # parent header -> (cell, count) for a replay to another session, this batch
        cells: dict[bytes, tuple[str | None, int | None]] = {}
        gone = False  # the websocket refused a write
        try:
            batch: list[tuple[int, bytes, bytes]] = []
            for parts in queued:
                if not gone and self._batchable(stream, parts):
                    try:
                        entry = self._batch_entry(stream, parts, batch, cells)
                    except (ValueError, KeyError, TypeError) as error:
                        # (one by one, it would fail alone, the rest going on)
                        self.log.error("chspawner: malformed kernel message %s not relayed: %s",
                                       parts[1][:20], error)
                        continue
                    if entry is not None:
                        batch.append(entry)
                    continue
                if batch:
                    gone = not self._write_batch(stream, batch)
                    batch = []
                if gone and parts[0] == b"msg":
                    continue  # not written, not recorded: the session's next follow sends it
                try:
                    # (in order, one by one; a follow's answer or a lost
                    # notice is state, taken even when the websocket is gone)
                    self.handle_outgoing_message(stream, parts)
                except WebSocketClosedError:
                    gone = True
            if batch:
                self._write_batch(stream, batch)
        finally:
            self._batching = False
        return True

    def _batchable(self, stream: Any, parts: list[Any]) -> bool:
        if len(parts) < 3 or parts[0] != b"msg" or stream.pending_follows \
                or stream.settling or self._lost:
            return False
        try:
            seq = int(parts[1])
            frames = parts[2:]
            i = frames.index(DELIM)
            header = frames[i + 2]
        except (ValueError, IndexError):
            return False  # (as stock does with what is not a Jupyter message)
        if len(frames) < i + 6:
            return False
        # An error's traceback may be hidden by jupyter_server (allow_tracebacks).
        return seq <= stream.replay_until and seq not in stream.missed_replies \
            and b'"error"' not in header

    def _batch_entry(self, stream: Any, parts: list[Any], batch: list[tuple[int, bytes, bytes]],
                     cells: dict[bytes, tuple[str | None, int | None]],
                     ) -> tuple[int, bytes, bytes] | None:
        """(seq, websocket payload, parent header) of one replayed message;
        None for a copy already delivered or one that goes as it is."""
        seq = int(parts[1])
        if seq <= (batch[-1][0] if batch else stream.delivered):
            return None  # a duplicate (a follow repeated): already delivered
        frames = parts[2:]
        i = frames.index(DELIM)  # (there: see _batchable)
        header, parent, metadata, content = frames[i + 2:i + 6]
        if b'"execute_input"' in header or (b'"status"' in header and stream.pending):
            self._note_iopub(stream, frames)
        cell = count = None
        if self.annotate_seq:
            known = cells.get(parent)
            if known is None:
                known = cells[parent] = self._replayed_cell(stream, parent)
            cell, count = known
        if self.subprotocol == V1:
            if self.annotate_seq:
                metadata = with_metadata(metadata, metadata_keys(seq, cell, count))
            payload = serialize_msg_to_ws_v1(
                [header, parent, metadata, content, *frames[i + 6:]], "iopub")
            return seq, ws_frame(payload, True), parent
        _, fed = self.session.feed_identities(frames)
        msg = self.session.deserialize(fed)
        if self.annotate_seq and isinstance(msg.get("metadata"), dict):
            msg["metadata"]["chspawner_seq"] = seq
            if cell is not None:
                msg["metadata"]["chspawner_cell"] = cell
            if count is not None:
                msg["metadata"]["chspawner_count"] = count
        msg["channel"] = "iopub"  # (as jupyter_server serializes it, legacy protocol)
        if msg["buffers"]:
            return seq, ws_frame(serialize_binary_message(msg), True), parent
        return seq, ws_frame(json.dumps(msg, default=json_default).encode(), False), parent

    def _write_batch(self, stream: Any, batch: list[tuple[int, bytes, bytes]]) -> bool:
        """One write of the batch's frames; its last seq acknowledged once
        it is out (see ``_write_and_acknowledge``). False: the websocket
        is closing or gone, nothing was written or recorded."""
        connection = self.websocket_handler.ws_connection
        if connection is None or connection.is_closing():
            return False
        socket = connection.stream
        try:
            flushed = socket.write(b"".join(frame for _seq, frame, _parent in batch))
        except (StreamClosedError, StreamBufferFullError):
            return False
        last = batch[-1][0]
        stream.delivered = last
        now = time.monotonic()
        for seq, _frame, parent in batch:
            stream.recent.add(now, seq, parent)
        self._acknowledge_when_out(stream, socket, flushed, last)
        return True

