"""The server's own copy of a kernel's latest output: what fills the gap a
dead keeper leaves.

A keeper (:mod:`chspawner.persist.keeper`) numbers and holds a kernel's
IOPub messages. Killed, it takes nothing with it that it had numbered, its
mapped state file (:mod:`chspawner.persist.keeper_state`) says how far it
got, but what the kernel publishes from then until a new keeper subscribes
goes to no keeper at all. The Jupyter server is alive meanwhile (it is the
one that notices the death), so it subscribes to the kernel's IOPub too,
once per kernel whose keeper runs on its host, and keeps the last messages
exactly as the kernel sent them: a :class:`Witness`.

When a new keeper has taken over, :meth:`Witness.recover` lines the
witness's copies up with the dead keeper's numbers, by the identities of
its last messages that the state file holds (:func:`message_ident`): the
message with the dead keeper's last seq, the few before it (those it
numbered but had not yet sent to some page), and after it every message up
to the new keeper's first, the gap. The server hands those to the new
keeper, numbered on from the dead one's (``fill``), and every page resumes
through them, exactly once, as if no keeper had died.

The witness can't help when it did not hold the dead keeper's last message
(more output than it keeps, ``witness_messages``/``witness_bytes``) or the
new keeper's first (it subscribed late), or when the server died with the
keeper; then the page is told what could not be kept, as before.

Costs: one subscription per kernel and up to ``max_messages`` copies in the
server's memory, no parsing and no hashing per message (identities are
computed only when a gap is recovered, from the newest back).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from chspawner.persist.keeper_state import message_ident


@dataclass
class Recovery:
    """What a witness recovered: messages numbered ``first_seq`` on."""
    first_seq: int
    messages: list[list[bytes]]

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.messages) - 1


class Witness:
    """The last messages a kernel published, as received (bounded by
    count and by bytes; the newest is always kept)."""

    def __init__(self, max_messages: int, max_bytes: int):
        self.max_messages = max(1, max_messages)
        self.max_bytes = max(1, max_bytes)
        self._items: deque[tuple[list[bytes], int]] = deque()
        self._bytes = 0

    def add(self, frames: list[bytes]) -> None:
        size = sum(len(f) for f in frames)
        self._items.append((frames, size))
        self._bytes += size
        while len(self._items) > 1 and (len(self._items) > self.max_messages
                                        or self._bytes > self.max_bytes):
            self._bytes -= self._items.popleft()[1]

    def __len__(self) -> int:
        return len(self._items)

    def _index(self, ident: bytes, after: int = -1) -> int | None:
        """The newest position holding ``ident`` above ``after``."""
        for i in range(len(self._items) - 1, after, -1):
            if message_ident(self._items[i][0]) == ident:
                return i
        return None

    def holds(self, ident_hex: str) -> bool:
        try:
            return self._index(bytes.fromhex(ident_hex)) is not None
        except ValueError:
            return False

    def recover(self, previous: dict, first_seq: int, first_ident: str) -> Recovery | None:
        """The messages a dead keeper's successor lacks, numbered on from
        the dead keeper's: ``previous`` is what the dead one left
        (read_keeper_state: ``last_seq`` and the identities of its last
        messages, ``recent``), ``first_seq``/``first_ident`` the new
        keeper's first message. None when the witness can't tell exactly."""
        try:
            recent = {int(seq): bytes.fromhex(ident)
                      for seq, ident in (previous.get("recent") or {}).items()}
            stop = bytes.fromhex(first_ident)
            last = int(previous["last_seq"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        if last not in recent or not stop:
            return None
        at_last = self._index(recent[last])
        if at_last is None:
            return None  # the dead keeper's last message is no longer held
        at_stop = self._index(stop, after=at_last)
        if at_stop is None:
            return None  # the new keeper's first is not held: the gap's end unknown
        # Back from the last: those the dead keeper numbered just before,
        # each checked against its identity.
        start, seq = at_last, last
        while start > 0 and recent.get(seq - 1) == message_ident(self._items[start - 1][0]):
            start, seq = start - 1, seq - 1
        messages = [frames for frames, _size in list(self._items)[start:at_stop]]
        recovery = Recovery(seq, messages)
        if recovery.last_seq >= first_seq:
            return None  # (numbers can't run into the new keeper's: never in practice)
        return recovery
