"""JupyterLab 4's kernel websocket protocol, ``v1.kernel.websocket.jupyter.org``:
a message as one binary frame (offsets, channel, header, parent header,
metadata, content), for clients that play the page."""
from __future__ import annotations

import json

PROTOCOL = "v1.kernel.websocket.jupyter.org"
PARTS = ("header", "parent_header", "metadata", "content")


def encode(msg: dict, channel: str = "shell") -> bytes:
    parts = [json.dumps(msg[k]).encode() for k in PARTS]
    offsets = [8 * (1 + 1 + len(parts) + 1)]
    offsets.append(offsets[-1] + len(channel.encode()))
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    head = len(offsets).to_bytes(8, "little") + b"".join(
        o.to_bytes(8, "little") for o in offsets)
    return head + channel.encode() + b"".join(parts)


def decode(data: bytes) -> dict:
    """The message, with its ``channel`` and ``msg_type`` as the legacy
    protocol's JSON has them."""
    n = int.from_bytes(data[:8], "little")
    offsets = [int.from_bytes(data[8 * (i + 1):8 * (i + 2)], "little") for i in range(n)]
    channel = data[offsets[0]:offsets[1]].decode()
    parts = [data[offsets[i]:offsets[i + 1]] for i in range(1, n - 1)]
    msg = {k: json.loads(p) for k, p in zip(PARTS, parts)}
    return msg | {"channel": channel, "msg_type": msg["header"]["msg_type"]}
