"""The harness's small utilities do what the tests rely on: waits end
with the condition's value or fail naming what they waited for; a free
port can be bound and a refused target refuses; a zombie is not running."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import urllib.parse

import pytest

from tests.harness.net import free_port, refused_target
from tests.harness.procs import running
from tests.harness.text import parse_env, tail
from tests.harness.wait import read_line, until, wait_until

# No root, no services: part of the fast unit layer (pytest -m unit).
pytestmark = pytest.mark.unit


def test_wait_until_returns_the_conditions_value():
    answers = iter([0, None, "", "here"])
    assert wait_until(lambda: next(answers), "an answer", timeout=5, every=0.001) == "here"


def test_wait_until_fails_naming_what_it_waited_for():
    with pytest.raises(AssertionError, match="timed out waiting for the impossible"):
        wait_until(lambda: False, "the impossible", timeout=0.05, every=0.01)


def test_until_takes_sync_and_async_conditions():
    async def later() -> int:
        return 7
    assert asyncio.run(until(later, "an async answer", timeout=1)) == 7
    assert asyncio.run(until(lambda: [1], "a sync answer", timeout=1)) == [1]
    with pytest.raises(AssertionError, match="timed out waiting for nothing"):
        asyncio.run(until(lambda: 0, "nothing", timeout=0.05, every=0.01))


def test_a_free_port_binds_and_a_refused_target_refuses():
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
    url = urllib.parse.urlsplit(refused_target())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((url.hostname, url.port), timeout=5).close()


def test_running_is_false_for_a_zombie_and_a_reaped_process():
    assert running(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    # Not reaped yet: a zombie once it has exited.
    wait_until(lambda: not running(child.pid), "the child to exit", timeout=30, every=0.01)
    child.wait()
    assert not running(child.pid)


def test_read_line_fails_after_its_deadline():
    read_end, write_end = os.pipe()
    with os.fdopen(read_end) as stream, os.fdopen(write_end, "w") as writer:
        with pytest.raises(AssertionError, match="no output within 0.05 s"):
            read_line(stream, deadline_s=0.05)
        writer.write("hello \n")
        writer.flush()
        assert read_line(stream, deadline_s=5) == "hello"


def test_tail_and_parse_env():
    assert tail("a\nb\n c \nd\n", lines=2) == "c | d"
    assert parse_env("A=1\nB=x=y\nnoise\n") == {"A": "1", "B": "x=y"}
