"""A dead keeper's gap filled from the server's own copy of the kernel's
output: the copies lined up with the dead keeper's numbers by identity,
handed to the new keeper numbered on from them, and every session resumed
through them exactly once; and what happens when the copy can't tell."""
from __future__ import annotations

import json

import pytest

from chspawner.persist.keeper import DELIM, Keeper, RingBuffer
from chspawner.persist.keeper_state import RECENT, Takeover
from chspawner.persist.records import AckFile, KernelRecords
from chspawner.persist.witness import Witness

# No root, no services: part of the fast unit layer (pytest -m unit).
pytestmark = pytest.mark.unit

KERNEL = "5d0c9a57-2f0e-4a55-9a43-0b7f4c1b1e21"


def message(n: int) -> list[bytes]:
    """The kernel's n-th IOPub message, as any subscriber receives it."""
    header = {"msg_id": f"m{n}", "msg_type": "stream", "date": f"2026-12-04T00:00:{n:02d}"}
    return [b"stream.stdout", DELIM, b"sig", json.dumps(header).encode(), b"{}", b"{}",
            json.dumps({"name": "stdout", "text": f"{n}\n"}).encode()]


def text(frames: list[bytes]) -> str:
    return json.loads(frames[-1])["text"]


class Gap:
    """A kernel printing 1..last; its keeper (numbering from 100) killed
    after ``died_after``; a new keeper (numbering from 10,000) subscribed
    from ``back_at`` on; the server's witness saw ``witnessed``."""

    def __init__(self, tmp_path, died_after: int, back_at: int, last: int,
                 witnessed: range, witness_size: int = 1000):
        self.records = KernelRecords(tmp_path)
        old = Keeper(self.records.path(KERNEL), "ipc://old", first_seq=100)
        old.open_state()
        for n in range(1, died_after + 1):
            old.on_iopub(message(n))
        old.close()  # SIGKILLed: its state file stays (no close_state)
        self.new = Keeper(self.records.path(KERNEL), "ipc://new", first_seq=10_000)
        self.new.open_state()
        for n in range(back_at, last + 1):
            self.new.on_iopub(message(n))
        self.witness = Witness(witness_size, 1 << 20)
        for n in witnessed:
            self.witness.add(message(n))

    def recover(self):
        info = json.loads(json.dumps(self.new.info()))  # as the server gets it
        return self.witness.recover(info["previous"], info["first_seq"], info["first_ident"])

    def fill(self) -> None:
        recovery = self.recover()
        for i, frames in enumerate(recovery.messages):
            self.new.on_request([b"server", b"fill", str(recovery.first_seq + i).encode(),
                                 *frames, b"time", b"nonce", b"sig"])

    def replay(self, session: str, acked: int | None = None,
               received: int | None = None) -> list[str]:
        """What a session acknowledged at ``acked`` (or saying it
        received ``received``) is sent by the new keeper."""
        if acked is not None:
            ack = AckFile(self.records.acks_dir(KERNEL), session)
            ack.write(acked)
            ack.close()
        ident = session.encode()
        self.new._follow(ident, session, received)
        follower, sent = self.new.followers[ident], []
        assert follower.notice is None, follower.notice
        while follower.cursor <= self.new.buffer.last_seq:
            sent.append(text(self.new.buffer.get(follower.cursor)))
            follower.cursor = self.new.buffer.next_seq(follower.cursor)
        return sent

    def close(self) -> None:
        self.new.close_state()
        self.new.close()


def numbers(first: int, last: int) -> list[str]:
    return [f"{n}\n" for n in range(first, last + 1)]


def test_the_gap_is_filled_and_every_session_resumes_exactly_once(tmp_path):
    gap = Gap(tmp_path, died_after=5, back_at=9, last=11, witnessed=range(1, 12))
    try:
        recovery = gap.recover()
        # 1..5 as the dead keeper numbered them (100..104), then 6..8 on.
        assert recovery.first_seq == 100 and recovery.last_seq == 107
        assert [text(m) for m in recovery.messages] == numbers(1, 8)
        gap.fill()
        assert gap.new.info()["filled"] == [100, 107]
        # A page sent 1..3 by the dead keeper; one that says it received
        # 1..7 (some of the gap, from an earlier fill's replay); a page
        # that had all the dead keeper's: each gets exactly the rest.
        assert gap.replay("a", acked=102) == numbers(4, 11)
        assert gap.replay("b", received=106) == numbers(8, 11)
        assert gap.replay("c", acked=104) == numbers(6, 11)
        assert gap.replay("d", acked=107) == numbers(9, 11)
        # A page that is told of the takeover gets no notice for it.
        takeover = Takeover.from_info(gap.new.info())
        assert takeover.filled == (100, 107)
        assert takeover.covered(102) and not takeover.covered(98)
    finally:
        gap.close()


def test_the_dead_keepers_last_messages_are_matched_by_identity_only(tmp_path):
    """The witness subscribed late (it never saw 1..3): the dead keeper's
    4 and 5 still line up; a session sent less than that resumes from 4."""
    gap = Gap(tmp_path, died_after=5, back_at=8, last=9, witnessed=range(4, 10))
    try:
        recovery = gap.recover()
        assert (recovery.first_seq, [text(m) for m in recovery.messages]) == \
            (103, numbers(4, 7))
        gap.fill()
        assert gap.replay("a", acked=101) == numbers(4, 9)  # (its 3 is told lost)
    finally:
        gap.close()


def test_a_witness_that_cant_tell_recovers_nothing(tmp_path):
    # It no longer holds the dead keeper's last message (a gap longer than it keeps).
    gap = Gap(tmp_path, died_after=5, back_at=40, last=41, witnessed=range(1, 42),
              witness_size=20)
    assert gap.recover() is None
    gap.close()
    # It never got the new keeper's first (its copy not come yet).
    gap = Gap(tmp_path, died_after=5, back_at=9, last=11, witnessed=range(1, 9))
    assert gap.recover() is None
    gap.close()
    # The dead keeper had numbered nothing.
    gap = Gap(tmp_path, died_after=0, back_at=3, last=4, witnessed=range(1, 5))
    assert gap.recover() is None
    gap.close()


def test_only_the_last_messages_identities_are_kept(tmp_path):
    gap = Gap(tmp_path, died_after=RECENT + 30, back_at=RECENT + 32, last=RECENT + 32,
              witnessed=range(1, RECENT + 33))
    try:
        recovery = gap.recover()
        assert recovery.first_seq == 100 + 30  # 31.. (the last RECENT of the dead keeper)
        assert text(recovery.messages[0]) == "31\n"
    finally:
        gap.close()


def test_a_ring_buffer_takes_a_fill_only_in_order_and_drops_it_first():
    ring = RingBuffer(max_messages=5, max_bytes=1 << 20, first_seq=1000)
    ring.append([b"own-1"])
    assert not ring.fill(1000, [b"x"])  # not below our own
    assert ring.fill(50, [b"f50"]) and ring.fill(51, [b"f51"])
    assert not ring.fill(53, [b"f53"])  # not right after the last
    assert ring.oldest_seq == 50 and ring.get(51) == [b"f51"] and ring.get(52) is None
    assert ring.next_seq(51) == 1000 and ring.next_seq(50) == 51
    assert ring.known(49) and ring.known(51) and not ring.known(52) and ring.known(999)
    for n in range(2):
        ring.append([b"own"])
    assert len(ring) == 5
    ring.append([b"own-5"])  # bounds: the fill goes first
    assert ring.oldest_seq == 51 and ring.get(50) is None


def test_a_fill_is_refused_on_a_keeper_reachable_over_tcp(tmp_path):
    k = Keeper(tmp_path / f"{KERNEL}.json", "tcp://127.0.0.1:*", first_seq=1000)
    try:
        k.fill([b"5", *message(1)])
        assert k.info()["filled"] is None
    finally:
        k.close()
