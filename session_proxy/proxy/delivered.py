"""What a websocket's client already got, so that a replay after a lost
backend does not give it anything twice.

A jupyter_server writes a kernel message to its websocket, then records it
as sent (``kernel_connection``); a server killed in the instant between has
sent a message it never recorded, and the next server replays it. Only the
proxy knows what actually went to the client. So, for each websocket URL
(the client's session id is in it, and a client reconnects to the same
URL), the proxy remembers digests of the last data frames a relay
delivered, when that relay's backend vanished (no close frame: killed);
the next relay on the URL drops, among its first frames, any frame
identical to one of them. Every Jupyter message carries a unique
``msg_id``, so two identical data frames on a kernel's websocket are one
message sent twice, never two messages.
That holds for kernel websockets only (a terminal may well print the same
line twice), so only they are watched (``watched``).

The cost stays off the byte relay's hot path: a relay keeps references to
its last chunks (no copy), hashes frames only when it ends, and a new relay
hashes only its first few hundred frames.
"""
from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict, deque
from collections.abc import Iterable

from session_proxy.proxy.wsframes import frame_size, is_control

#: Digests kept per URL: more than the messages a killed server can have
#: sent without recording them (those flushed together under backpressure).
TAIL_FRAMES = 512
#: Bytes a relay keeps (references to the chunks it passed on, no copies)
#: to take its last frames' digests from, up to twice that between trims;
#: a frame bigger than that is let go (its copy would not be caught).
TAIL_BYTES = 256 << 10
#: How long a URL's digests are kept after its relay lost its backend
#: (a session takes seconds to come back; a client gives up in minutes).
KEEP_S = 600.0
#: The largest frame a new relay holds back to compare: a bigger one was
#: never remembered (``Tail`` lets it go), so it goes through unwatched.
MAX_FRAME = 2 * TAIL_BYTES
#: URLs remembered per route (per user's server: /user/NAME), oldest first
#: to go, and the bytes they may take; one user's flood of kernel URLs
#: evicts only that user's own.
ROUTE_URLS = 100
ROUTE_BYTES = 4 << 20
#: Routes remembered at once, and the bytes all of them may take (the
#: least recently updated route loses its oldest URL first).
MAX_ROUTES = 10000
MAX_BYTES = 64 << 20
#: What one digest costs in memory: 16 bytes, the bytes object around them
#: and its list slot (an estimate on the safe side).
DIGEST_COST = 64


#: A kernel's websocket, as jupyter_server serves it: /.../api/kernels/ID/channels
KERNEL_CHANNELS = re.compile(r"/api/kernels/[^/?]+/channels(?:\?|$)")


def watched(url: str) -> bool:
    """Whether copies are dropped on this websocket URL (a kernel's)."""
    return KERNEL_CHANNELS.search(url) is not None


def digest(frame: bytes | bytearray | memoryview) -> bytes:
    return hashlib.blake2b(frame, digest_size=16).digest()


class DeliveredFrames:
    """Route -> URL -> digests of the last data frames its client was sent,
    newest last, as of the last relay on it that lost its backend.

    Kept per route (a user's server, ``/user/NAME``: the route a request
    matched, which a request can't pick for someone else), with a count
    and a byte bound per route, and a route count and byte bound for all."""

    def __init__(self, route_urls: int = ROUTE_URLS, route_bytes: int = ROUTE_BYTES,
                 max_routes: int = MAX_ROUTES, max_bytes: int = MAX_BYTES,
                 keep_s: float = KEEP_S) -> None:
        self.route_urls, self.route_bytes = route_urls, route_bytes
        self.max_routes, self.max_bytes, self.keep_s = max_routes, max_bytes, keep_s
        #: route -> (its bytes, URL -> (when, digests)); oldest first at both levels
        self._by_route: OrderedDict[str, _RouteMemory] = OrderedDict()
        self.size = 0  # bytes, as ``_cost`` counts them

    def get(self, route: str, url: str) -> list[bytes]:
        memory = self._by_route.get(route)
        entry = memory.urls.get(url) if memory is not None else None
        if entry is None or time.monotonic() - entry[0] > self.keep_s:
            return []
        return entry[1]

    def remember(self, route: str, url: str, digests: list[bytes]) -> None:
        memory = self._by_route.pop(route, None) or _RouteMemory()
        self._by_route[route] = memory  # the most recently updated route last
        self._drop(memory, url)
        if digests:
            digests = digests[-TAIL_FRAMES:]
            memory.urls[url] = (time.monotonic(), digests)
            memory.size += _cost(url, digests)
            self.size += _cost(url, digests)
        now = time.monotonic()
        while memory.urls and (len(memory.urls) > self.route_urls
                               or memory.size > self.route_bytes
                               or now - next(iter(memory.urls.values()))[0] > self.keep_s):
            self._drop(memory, next(iter(memory.urls)))
        if not memory.urls:
            del self._by_route[route]
        while self._by_route and (len(self._by_route) > self.max_routes
                                  or self.size > self.max_bytes):
            oldest, memory = next(iter(self._by_route.items()))
            self._drop(memory, next(iter(memory.urls)))
            if not memory.urls:
                del self._by_route[oldest]

    def _drop(self, memory: "_RouteMemory", url: str) -> None:
        entry = memory.urls.pop(url, None)
        if entry is not None:
            memory.size -= _cost(url, entry[1])
            self.size -= _cost(url, entry[1])

    def urls(self, route: str) -> int:
        """How many URLs ``route`` has remembered."""
        memory = self._by_route.get(route)
        return len(memory.urls) if memory is not None else 0


class _RouteMemory:
    """One route's URLs, oldest first, and the bytes they take."""

    def __init__(self) -> None:
        self.urls: OrderedDict[str, tuple[float, list[bytes]]] = OrderedDict()
        self.size = 0


def _cost(url: str, digests: list[bytes]) -> int:
    return len(url) + DIGEST_COST * len(digests)


class Tail:
    """The last bytes a relay passed on to its client, kept as the chunks
    they came in, from a frame boundary on: what the digests of its last
    frames are taken from when it ends."""

    __slots__ = ("chunks", "size")

    def __init__(self) -> None:
        #: (chunk, offset of the first frame that starts in it, or None);
        #: made at the first chunk: an idle websocket's Tail stays small
        self.chunks: deque[tuple[bytes, int | None]] | tuple = ()
        self.size = 0

    def add(self, data: bytes, first_frame_at: int | None) -> None:
        if not self.chunks:
            if first_frame_at is None:
                return  # the rest of a frame whose start was let go
            if not isinstance(self.chunks, deque):
                self.chunks = deque()
        self.chunks.append((data, first_frame_at))
        self.size += len(data)
        if self.size > 2 * TAIL_BYTES:  # (trimmed now and then, not per chunk)
            self._trim()

    def _trim(self) -> None:
        """Keep the newest chunks from the latest frame start that leaves
        TAIL_BYTES; failing that, from the latest frame start at all. A
        frame in progress bigger than that is let go (its copy would not
        be caught: a rare message shown twice, against holding it all)."""
        kept, cut = 0, len(self.chunks)
        for i in range(len(self.chunks) - 1, 0, -1):
            chunk, start = self.chunks[i]
            kept += len(chunk)
            if start is not None:
                cut = i
                if kept >= TAIL_BYTES:
                    break
        for _ in range(cut):
            self.size -= len(self.chunks.popleft()[0])

    def digests(self) -> list[bytes]:
        """Digests of the whole data frames held, oldest first."""
        if not self.chunks:
            return []
        buf = b"".join(chunk for chunk, _ in self.chunks)
        pos, found = self.chunks[0][1] or 0, []
        while (size := frame_size(buf, pos)) is not None and pos + size <= len(buf):
            if not is_control(buf, pos):
                found.append(digest(memoryview(buf)[pos:pos + size]))
            pos += size
        return found[-TAIL_FRAMES:]


class LeadingCopies:
    """Drops, among the first frames a new relay gets from its backend, the
    data frames whose digests are in ``seen``: copies of what the client
    already got. Works on whole frames, gathered across reads, for as many
    frames as could be copies (and some); then it lets everything through."""

    #: Frames examined beyond the number of digests: other messages (a
    #: notice, a reply) may come among the copies.
    SLACK = 64

    def __init__(self, seen: Iterable[bytes]) -> None:
        self.seen = set(seen)
        self.left = len(self.seen) + self.SLACK
        self.buf = bytearray()  # at most a frame of MAX_FRAME and one read
        self.passing = 0  # bytes still to come of a frame let through unwatched
        self.dropped = 0

    @property
    def done(self) -> bool:
        return self.left <= 0

    def filter(self, data: bytes) -> bytes:
        """What of ``data`` goes on to the client. While not done, only
        whole frames go (a partial one waits for its end), but never one
        bigger than MAX_FRAME: that one goes as it comes, unwatched."""
        out = bytearray()
        if self.passing:
            through = min(self.passing, len(data))
            out += data[:through]
            self.passing -= through
            data = data[through:]
        self.buf += data
        pos = 0
        while self.left > 0:
            size = frame_size(self.buf, pos)
            if size is None:
                break
            if pos + size > len(self.buf):
                if size > MAX_FRAME:  # never held back whole (nor compared)
                    out += memoryview(self.buf)[pos:]
                    self.passing = pos + size - len(self.buf)
                    pos = len(self.buf)
                    self.left -= 1
                break
            frame = memoryview(self.buf)[pos:pos + size]
            if not is_control(self.buf, pos) and digest(frame) in self.seen:
                self.dropped += 1
            else:
                out += frame
            frame.release()
            pos += size
            self.left -= 1
        if self.done:
            out += memoryview(self.buf)[pos:]
            self.buf = bytearray()
        else:
            del self.buf[:pos]
        return bytes(out)
