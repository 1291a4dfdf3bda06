"""Units: websocket frame boundaries, the pongs to the proxy's own pings
taken out of a client's stream, and the proxy's memory of what a
client got (session_proxy.proxy.wsframes, session_proxy.proxy.delivered), fed the
way sockets feed them: frames cut anywhere, headers included."""
from __future__ import annotations

import pytest

from session_proxy.proxy.delivered import (
    MAX_FRAME, ROUTE_BYTES, ROUTE_URLS, TAIL_BYTES, DeliveredFrames, LeadingCopies, Tail,
    digest, watched)
from session_proxy.proxy.wsframes import PROXY_PING_PAYLOAD, FrameCounter, PongFilter

# No root, no services: part of the fast unit layer (pytest -m unit).
pytestmark = pytest.mark.unit


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A server-to-client frame (unmasked), with the 2-, 4- or 10-byte header."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, n])
    elif n < 1 << 16:
        head = bytes([0x80 | opcode, 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 127]) + n.to_bytes(8, "big")
    return head + payload


MESSAGES = [f"message {n}".encode() * (1 + n * 37 % 300) for n in range(40)]
FRAMES = [frame(m) for m in MESSAGES]
STREAM = b"".join(FRAMES)


def cut(data: bytes, every: int) -> list[bytes]:
    return [data[i:i + every] for i in range(0, len(data), every)]


@pytest.mark.parametrize("every", [1, 3, 200, 5000, len(STREAM)])
def test_the_counter_finds_where_the_first_frame_of_each_chunk_starts(every):
    boundaries, pos = [], 0
    for f in FRAMES:
        boundaries.append(pos)
        pos += len(f)
    counter, at = FrameCounter(), 0
    for chunk in cut(STREAM, every):
        counter.feed(chunk)
        inside = [b - at for b in boundaries if at <= b < at + len(chunk)]
        assert counter.first_start == (inside[0] if inside else None), at
        at += len(chunk)
    assert counter.at_boundary


@pytest.mark.parametrize("every", [1, 7, 1000, len(STREAM)])
def test_the_tail_gives_the_digests_of_the_last_whole_frames(every):
    counter, tail = FrameCounter(), Tail()
    data = STREAM + FRAMES[0][:5]  # and the start of a frame that never ends
    for chunk in cut(data, every):
        counter.feed(chunk)
        tail.add(chunk, counter.first_start)
    got = tail.digests()
    assert got and got == [digest(f) for f in FRAMES][-len(got):]
    assert digest(FRAMES[-1]) == got[-1]


def test_the_tail_skips_control_frames_and_bounds_what_it_holds():
    tail, counter = Tail(), FrameCounter()
    big = [frame(bytes([n]) * 20000) for n in range(40)]  # 800 kB in all
    for f in big + [frame(b"ping", 0x9)]:
        counter.feed(f)
        tail.add(f, counter.first_start)
    got = tail.digests()
    assert got[-1] == digest(big[-1])  # the ping is not there
    assert TAIL_BYTES // 20000 <= len(got) < 40 and tail.size <= 2 * TAIL_BYTES


def test_a_frame_too_big_to_keep_is_let_go_and_what_follows_is_kept():
    giant = frame(b"g" * (3 * TAIL_BYTES))
    small = [frame(f"after {n}".encode()) for n in range(5)]
    counter, tail, peak = FrameCounter(), Tail(), 0
    for chunk in cut(FRAMES[0] + giant + b"".join(small), 65536):
        counter.feed(chunk)
        tail.add(chunk, counter.first_start)
        peak = max(peak, tail.size)
    assert peak <= 2 * TAIL_BYTES + 65536
    assert tail.digests() == [digest(f) for f in small]


@pytest.mark.parametrize("every", [1, 5, 333, len(STREAM)])
def test_leading_copies_are_dropped_and_nothing_else(every):
    seen = [digest(f) for f in FRAMES[:10]]
    replay = b"".join(FRAMES[6:])  # 6..9 the client has, 10.. it has not
    copies, out = LeadingCopies(seen), b""
    for chunk in cut(replay, every):
        out += copies.filter(chunk)
    assert out == b"".join(FRAMES[10:])
    assert copies.dropped == 4


def test_frames_between_the_copies_go_through_and_it_ends_after_a_while():
    seen = [digest(f) for f in FRAMES[:5]]
    notice = frame(b"[chspawner] 3 messages were lost")
    later = [frame(f"later {n}".encode()) for n in range(LeadingCopies.SLACK + 10)]
    copies = LeadingCopies(seen)
    out = copies.filter(notice + FRAMES[3] + frame(b"x", 0x9) + FRAMES[4] + b"".join(later))
    assert out == notice + frame(b"x", 0x9) + b"".join(later)
    assert copies.done  # examined all it may: the rest goes through as is
    assert copies.filter(FRAMES[3][:4]) == FRAMES[3][:4]


def test_a_url_remembers_the_newest_frames_for_a_while():
    delivered = DeliveredFrames(route_urls=2, keep_s=60)
    delivered.remember("/user/a", "/a", [b"1", b"2"])
    assert delivered.get("/user/a", "/a") == [b"1", b"2"]
    assert delivered.get("/user/a", "/b") == [] and delivered.get("/user/b", "/a") == []
    delivered.remember("/user/a", "/a", [])  # a relay that had nothing: forget
    assert delivered.get("/user/a", "/a") == []
    for url in ("/a", "/b", "/c"):
        delivered.remember("/user/a", url, [url.encode()])
    assert delivered.get("/user/a", "/a") == []  # the route's oldest went
    assert delivered.get("/user/a", "/c") == [b"/c"]
    stale = DeliveredFrames(keep_s=-1)
    stale.remember("/user/a", "/a", [b"1"])
    assert stale.get("/user/a", "/a") == []


def test_one_users_flood_of_urls_evicts_only_their_own():
    """The attack: alice's kernel URLs are remembered; mallory floods the
    proxy with websockets on URLs of her own that lose their backend."""
    delivered = DeliveredFrames()
    alice = [digest(f) for f in FRAMES]
    delivered.remember("/user/alice", "/user/alice/api/kernels/k/channels", alice)
    many = [digest(bytes([n % 256, n // 256])) for n in range(512)]
    for n in range(5000):
        delivered.remember("/user/mallory", f"/user/mallory/api/kernels/{n}/channels", many)
    assert delivered.get("/user/alice", "/user/alice/api/kernels/k/channels") == alice
    assert delivered.urls("/user/mallory") <= ROUTE_URLS
    assert delivered.size <= ROUTE_BYTES + 64 * len(alice) + 100
    # One route's memory is bounded in bytes too, whatever its URLs' length.
    delivered.remember("/user/mallory", "/x" * 3_000_000, many)
    assert delivered.urls("/user/mallory") == 0


def test_all_routes_together_stay_within_the_total_bounds():
    delivered = DeliveredFrames(max_routes=50, max_bytes=100_000)
    for n in range(200):
        delivered.remember(f"/user/u{n}", "/api/kernels/k/channels", [b"d" * 16] * 100)
        assert delivered.size <= 100_000 and len(delivered._by_route) <= 50
    assert delivered.get("/user/u199", "/api/kernels/k/channels")  # the newest stay
    assert not delivered.get("/user/u0", "/api/kernels/k/channels")  # the oldest went


def test_a_frame_claiming_a_terabyte_is_let_through_not_held_back():
    """A hostile backend's frame header claims 2**40 bytes, then it streams:
    what the filter holds stays bounded, the bytes go on as they come, and
    the frames after it are examined again."""
    copies = LeadingCopies([digest(FRAMES[0])])
    head = bytes([0x82, 127]) + (1 << 40).to_bytes(8, "big")
    out = copies.filter(FRAMES[1] + head + b"z" * 1000)
    assert out == FRAMES[1] + head + b"z" * 1000
    for _ in range(100):
        assert copies.filter(b"z" * 65536) == b"z" * 65536
        assert len(copies.buf) == 0
    # A frame too big to be a copy, but that ends: what follows is examined.
    copies = LeadingCopies([digest(FRAMES[0])])
    big = frame(b"b" * (MAX_FRAME + 10))
    out = b"".join(copies.filter(c) for c in cut(big + FRAMES[0] + FRAMES[2], 65536))
    assert out == big + FRAMES[2] and copies.dropped == 1
    assert len(copies.buf) <= 65536


def test_only_kernel_websockets_are_watched():
    assert watched("/user/a/api/kernels/0b1c/channels?session_id=x&token=y")
    assert watched("/user/a/api/kernels/0b1c/channels")
    assert not watched("/user/a/terminals/websocket/1")
    assert not watched("/user/a/api/kernels/0b1c/channelsX")
    assert not watched("/user/a/api/events/subscribe")


def masked(payload: bytes, opcode: int = 0x1, mask: bytes = b"\x11\x22\x33\x44") -> bytes:
    """A client-to-server frame (masked), with the 2-, 4- or 10-byte header."""
    plain = frame(payload, opcode)
    head = bytes([plain[0], plain[1] | 0x80]) + plain[2:len(plain) - len(payload)]
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("every", [1, 2, 5, 13, 1000, 100000])
def test_pongs_to_the_proxy_are_taken_out_and_everything_else_goes_through(every):
    """Cut anywhere: the client's data frames, a pong to the backend's own
    ping (another payload) and a close go through byte for byte; the pongs
    answering the proxy's pings, wherever they fall, never do."""
    ours = masked(PROXY_PING_PAYLOAD, 0xA)
    theirs = masked(b"backend ping", 0xA)
    parts = [masked(b"x" * 300), ours, masked(b"y" * 70000), theirs, ours, ours,
             masked(b"hello"), masked(b"\x03\xe8", 0x8)]
    wanted = b"".join(p for p in parts if p != ours)
    pongs, out = PongFilter(), []
    for chunk in cut(b"".join(parts), every):
        out.append(pongs.feed(chunk))
    assert b"".join(out) == wanted
    assert pongs.at_boundary
