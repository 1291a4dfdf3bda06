"""The pure parts of end-to-end delivery (see
:mod:`chspawner.persist.kernel_connection`): the seq a page says it holds,
the keys spliced into a message's metadata, and what was written to a
websocket lately, for the words after it broke."""
from __future__ import annotations

import json
from collections import deque

#: The largest seq a page may name: an AckFile holds 8 bytes (keepers
#: number from their start time in microseconds, ~2**51 today).
MAX_SEQ = (1 << 63) - 1


def parse_received(raw: str | None) -> int | None:
    """``chspawner_received``'s value as a seq; None when absent or not a
    plain decimal number from 0 to MAX_SEQ (no sign, spaces or ``_``)."""
    if raw is None or not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        return None
    value = int(raw)
    return value if value <= MAX_SEQ else None


def metadata_keys(seq: int, cell: str | None = None, count: int | None = None) -> bytes:
    """The JSON members added to a relayed message's metadata."""
    keys = b'"chspawner_seq":%d' % seq
    if cell is not None:
        keys += b',"chspawner_cell":' + json.dumps(cell).encode()
    if count is not None:
        keys += b',"chspawner_count":%d' % count
    return keys


def with_metadata(metadata: bytes, keys: bytes) -> bytes:
    """A message's packed metadata (a JSON object) with ``keys`` (JSON
    members) added last, so that they win over any the kernel sent by the
    same names; unchanged if it is not an object. Bytes spliced, nothing
    parsed: this runs for every message."""
    body = metadata.rstrip()
    if not body.endswith(b"}"):
        return metadata
    body = body[:-1].rstrip()
    return body + (keys if body.endswith(b"{") else b"," + keys) + b"}"


def uncertain_notice(count: int, seconds: float) -> str:
    return (f"[chspawner] up to {count} output message(s) sent just before the connection "
            f"broke may be missing here (the connection to the browser ended without "
            f"closing; what was sent in its last {seconds:g} s may not have arrived. "
            "chspawner's JupyterLab extension recovers such messages exactly).")


class Recent:
    """What was written to one client session's websocket in the last
    ``window`` seconds, as runs of messages with the same parent (one
    execution's output), each at most a second long: a run per message
    would cost memory at high rates, and "up to N" may count a second's
    more. Bounded by ``max_runs``."""

    def __init__(self, window: float, max_runs: int = 10000):
        self.window = window
        # [parent header (packed), first time, last time, first seq, last seq, count]
        self._runs: deque[list] = deque(maxlen=max(1, max_runs))

    def add(self, now: float, seq: int, parent: bytes) -> None:
        runs = self._runs
        if runs:
            last = runs[-1]
            if now - last[1] < 1.0 and last[0] == parent:
                last[2], last[4] = now, seq
                last[5] += 1
                return
            while runs and runs[0][2] < now - self.window:
                runs.popleft()
        runs.append([parent, now, now, seq, seq, 1])

    def uncertain(self, since: float, acked: int) -> list[tuple[dict, int]]:
        """[(parent header, count)] of the messages written from ``since`` on
        that were out (acknowledged: seq <= ``acked``), by execution, in
        order of their first; those not out are sent again anyway."""
        counts: dict[bytes, int] = {}
        for parent, _first, last, first_seq, last_seq, count in self._runs:
            if last < since or first_seq > acked:
                continue
            counts[parent] = counts.get(parent, 0) + (
                count if last_seq <= acked else min(count, acked - first_seq + 1))
        found = []
        for parent, count in counts.items():
            try:
                header = json.loads(parent) if parent else {}
            except ValueError:
                header = {}
            found.append((header if isinstance(header, dict) else {}, count))
        return found
