"""Waiting on a condition with a deadline, never a bare sleep."""
from __future__ import annotations

import asyncio
import select
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout: float = 60,
               every: float = 0.1) -> T:
    """Poll ``condition()`` every ``every`` s until it is true; its value.
    Fails (AssertionError) naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


async def until(condition: Callable[[], Any | Awaitable[Any]], what: str,
                timeout: float = 20, every: float = 0.05) -> Any:
    """:func:`wait_until` inside an event loop; ``condition`` may be sync or
    async."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(every)


def wait_listening(port: int, proc: subprocess.Popen, log: Callable[[], str],
                   what: str = "jupyter_server", timeout: float = 60) -> None:
    """Until ``proc`` (``what``) accepts connections on ``port``; ``log()``
    says why, should it exit first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            assert proc.poll() is None, log()
            assert time.monotonic() < deadline, f"{what} did not start"
            time.sleep(0.05)


def read_line(stream, deadline_s: float = 20) -> str:
    """One line from a pipe, or fail after a deadline (never hang a test)."""
    ready, _, _ = select.select([stream], [], [], deadline_s)
    assert ready, f"no output within {deadline_s} s"
    return stream.readline().strip()
