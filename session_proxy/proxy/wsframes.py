"""Websocket frame boundaries (RFC 6455 5.2), read from the headers alone:
payloads are skipped by length, never decoded."""
from __future__ import annotations

#: Close frame, unmasked (server to client), status 1012 "service restart".
CLOSE_SERVICE_RESTART = b"\x88\x02\x03\xf4"
OPCODE_CLOSE = 0x8


def frame_size(buf: bytes | bytearray, pos: int) -> int | None:
    """The whole size (header + payload) of the frame starting at
    ``buf[pos]``, or None if its header is not all there yet."""
    avail = len(buf) - pos
    if avail < 2:
        return None
    second = buf[pos + 1]
    length, header = second & 0x7F, 2
    if length == 126:
        if avail < 4:
            return None
        length, header = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
    elif length == 127:
        if avail < 10:
            return None
        length, header = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
    if second & 0x80:  # masked: a 4-byte key follows
        header += 4
        if avail < header:
            return None
    return header + length


def is_control(buf: bytes | bytearray, pos: int) -> bool:
    """Whether the frame at ``buf[pos]`` is a close, ping or pong."""
    return bool(buf[pos] & 0x08)


class FrameCounter:
    """Follows frame boundaries in one direction of a websocket by reading
    frame headers and skipping payloads by length."""

    __slots__ = ("skip", "partial", "saw_close", "first_start")

    def __init__(self) -> None:
        self.skip = 0          # bytes of the current frame still to come
        self.partial = b""     # a frame header cut by the end of a chunk
        self.saw_close = False  # a close frame went by: the end is orderly
        #: where in the last chunk fed the first frame began (None: none did)
        self.first_start: int | None = None

    @property
    def at_boundary(self) -> bool:
        return self.skip == 0 and not self.partial

    def feed(self, data: bytes) -> int:
        """Follow ``data``; how many frames start in it."""
        pos, end, starts = self.skip, len(data), 0
        self.first_start = None
        if self.partial:
            # Only the cut header is joined, never the whole chunk.
            head = self.partial + data[:14]
            size = frame_size(head, 0)
            if size is None:
                self.partial = head
                return 0
            self._note_opcode(head, 0)
            pos = size - len(self.partial)
            self.partial = b""
        if pos < end:
            self.first_start = pos
        while pos < end:
            size = frame_size(data, pos)
            if size is None:
                self.partial = data[pos:]
                self.skip = 0
                return starts
            self._note_opcode(data, pos)
            pos += size
            starts += 1
        self.skip = pos - end
        return starts

    def _note_opcode(self, buf: bytes, pos: int) -> None:
        if buf[pos] & 0x0F == OPCODE_CLOSE:
            self.saw_close = True


# -- the proxy's own pings (see wsrelay: abandoned websockets) -------------

OPCODE_PONG = 0xA
#: The payload of the proxy's pings: the client's pong echoes it, which
#: tells those pongs from the ones answering the backend's own pings.
PROXY_PING_PAYLOAD = b"chspawner-proxy"
#: A ping frame, unmasked (server to client).
PROXY_PING = bytes([0x89, len(PROXY_PING_PAYLOAD)]) + PROXY_PING_PAYLOAD
#: A masked close frame (client to server), status 1001 "going away": what
#: the backend gets when the proxy gives up on a silent client.
CLOSE_GOING_AWAY_MASKED = bytes([0x88, 0x82, 0, 0, 0, 0]) + (1001).to_bytes(2, "big")


def _is_proxy_pong(buf: bytes, pos: int, size: int) -> bool:
    """Whether the whole pong frame ``buf[pos:pos+size]`` echoes the proxy's ping."""
    second = buf[pos + 1]
    if second & 0x7F != len(PROXY_PING_PAYLOAD):
        return False
    if not second & 0x80:  # unmasked (a client must mask, but be lenient)
        return buf[pos + 2:pos + size] == PROXY_PING_PAYLOAD
    mask, payload = buf[pos + 2:pos + 6], buf[pos + 6:pos + size]
    return bytes(b ^ mask[i & 3] for i, b in enumerate(payload)) == PROXY_PING_PAYLOAD


class PongFilter:
    """Follows frame boundaries from the client to the backend, as
    ``FrameCounter`` does, and takes out the pongs answering the proxy's own
    pings: those are the proxy's business, never the backend's.

    A pong (or any frame header) cut by the end of a read is held back
    until the rest comes: a few bytes, and only then is a chunk copied."""

    __slots__ = ("skip", "held")

    def __init__(self) -> None:
        self.skip = 0      # bytes of the current frame still to come
        self.held = b""    # the start of a frame whose header or pong is cut

    @property
    def at_boundary(self) -> bool:
        return self.skip == 0 and not self.held

    def feed(self, data: bytes) -> bytes:
        """What of ``data`` goes on to the backend."""
        if self.held:
            data, self.held = self.held + data, b""
        end, pos = len(data), self.skip
        if pos >= end:
            self.skip = pos - end
            return data
        cuts: list[tuple[int, int]] = []
        while pos < end:
            size = frame_size(data, pos)
            pong = data[pos] & 0x0F == OPCODE_PONG
            if size is None or (pong and pos + size > end):
                self.held = data[pos:]
                end = pos
                break
            if pong and _is_proxy_pong(data, pos, size):
                cuts.append((pos, pos + size))
            pos += size
        self.skip = pos - end if not self.held else 0
        if not cuts and end == len(data):
            return data  # the common case: all of it, no copy
        out, start = [], 0
        for a, b in cuts:
            out.append(data[start:a])
            start = b
        out.append(data[start:end])
        return b"".join(out)
