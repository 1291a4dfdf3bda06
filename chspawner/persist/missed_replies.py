"""Execute replies that went to a server that is gone, rebuilt from the
kernel's output.

A kernel answers an ``execute_request`` twice: the reply, on the shell
channel, to the server that asked, and the output and status, on IOPub,
to everyone -- the kernel's keeper included. When a cell ends while its
server is down, the reply reaches no one, and a notebook would show the
cell as running for ever, though the keeper replays all its output. IOPub
has what the reply says: the execution count (``execute_input``), an error
if there was one (``error``), and the end (``status: idle``).

The keeper follows every execution (:class:`Executions`); when a client
session follows it again, it hands over those of the session's executions
that ended since the session's last acknowledged message, each with the
seq of its end and the reply rebuilt. The server's connection sends such a
reply after that message, if the execution ended before the connection's
shell socket existed (before that, the kernel's reply went elsewhere).
"""
from __future__ import annotations

import datetime
from collections import OrderedDict

#: What a rebuilt reply's metadata says about itself.
REBUILT = {"chspawner": "rebuilt from the kernel's output: its reply went to a server "
                        "that is gone"}
#: The IOPub messages that tell: the count, an error, the end.
KINDS = frozenset({"execute_input", "error", "status"})


class Executions:
    """What IOPub has shown of recent executions, by request id."""

    def __init__(self, limit: int = 1000):
        self.limit = limit
        self.by_request: OrderedDict[str, dict] = OrderedDict()

    def note(self, seq: int, header: dict, parent: dict, content: dict) -> None:
        """One IOPub message of a kind in :data:`KINDS`."""
        if parent.get("msg_type") != "execute_request":
            return
        request = parent.get("msg_id", "")
        seen = self.by_request.get(request)
        if seen is None:
            seen = self.by_request[request] = {"session": parent.get("session", ""),
                                               "parent": parent}
            while len(self.by_request) > self.limit:
                self.by_request.popitem(last=False)
        kind = header.get("msg_type")
        if kind == "execute_input":
            seen["execution_count"] = content.get("execution_count")
        elif kind == "error":
            seen["error"] = {k: content.get(k) for k in ("ename", "evalue", "traceback")}
        elif kind == "status" and content.get("execution_state") == "idle":
            seen["ended_seq"], seen["ended"] = seq, str(header.get("date", ""))

    def missed_by(self, session: str, acked: int) -> list[dict]:
        """The session's executions that ended after message ``acked``:
        ``{"seq": the end's seq, "ended": its date, "parent": the request's
        header, "reply": the execute_reply content}``."""
        missed = []
        for seen in self.by_request.values():
            if seen["session"] != session or seen.get("ended_seq", 0) <= acked:
                continue
            reply = {"status": "ok", "execution_count": seen.get("execution_count"),
                     "user_expressions": {}, "payload": []}
            if "error" in seen:
                reply = {"status": "error", "execution_count": seen.get("execution_count"),
                         **seen["error"]}
            missed.append({"seq": seen["ended_seq"], "ended": seen["ended"],
                           "parent": seen["parent"], "reply": reply})
        return missed


def timestamp(date: object) -> float:
    """A message header's date (ISO 8601) as epoch seconds; an unreadable
    one counts as never (nothing is rebuilt for it)."""
    try:
        when = datetime.datetime.fromisoformat(str(date).replace("Z", "+00:00"))
    except ValueError:
        return float("inf")
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()
