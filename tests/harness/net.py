"""Loopback ports for test servers."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A port the kernel just had free. Racy by nature (it is released
    before the server binds it): harnesses whose servers can lose it retry
    on a clash."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def refused_target() -> str:
    """A URL nothing listens at (the port was just closed): connections are
    refused."""
    return f"http://127.0.0.1:{free_port()}"
