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
