"""The keeper is watched: a kernel's keeper SIGKILLed while a cell prints
is replaced within the check interval and the page follows the new one.
The server's own copy of the kernel's output (the witness) fills the gap:
every message reaches the page exactly once, nothing is told, nothing is
made up. Without it (``witness_messages=0``), and when the server was
killed too and the next one adopts the kernel, the page is told in the
cell's output which span of output was not kept, and the cell finishes
(its execute_reply and its idle status reach the page, rebuilt when they
went missing in the gap).

Real parts: jupyter_server as the unprivileged user with
PersistentKernelManager and the replaying websocket connection, the
container kernel, its keeper, and a websocket client playing the page
(aiohttp, the kernel protocol's JSON form, with JupyterLab's session ids).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from chspawner.persist.kernel_manager import keeper_info
from tests.harness.kernel_client import (Transcript, connect, count_to, execute, send,
                                         start_kernel, warm_up)
from tests.harness.procs import running
from tests.harness.servers import Servers
from tests.harness.wait import until, wait_until

INTERVAL = 1.0
M = 30  # numbers printed, one every 0.3 s
SPAN = re.compile(r"between (\S+ \S+) and (\S+ \S+) UTC \(([\d.]+) s\)")


@pytest.fixture
def servers(request, user, user_dir, kernel_store):
    s = Servers(user, user_dir, kernel_store,
                [f"--PersistentKernelManager.keeper_check_interval={INTERVAL}"])
    yield s
    for log in sorted(s.user_dir.glob("server-*.log")) + sorted(s.state_dir.glob("*.log")):
        print(f"--- {log.name}\n{log.read_text(errors='replace')[-6000:]}")
    s.close()


class Page:
    """The page's side of one execution: its transcript, and every message
    of it as it came (metadata included), in order."""

    def __init__(self, transcript: Transcript):
        self.t = transcript
        self.messages: list[dict] = []

    async def read(self, ws, until_, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while not until_(self.t):
                frame = await ws.receive()
                if frame.type != aiohttp.WSMsgType.TEXT:
                    return
                msg = json.loads(frame.data)
                if msg["parent_header"].get("msg_id") == self.t.msg_id:
                    self.messages.append(msg)
                self.t.feed(msg)

    def notices(self) -> list[dict]:
        return [m for m in self.messages if m["metadata"].get("chspawner_notice")]

    def of_type(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m["msg_type"] == kind]


def ended_flag_code(user_dir: Path, flag: str, done: str) -> str:
    """A cell that prints 'start', waits (with a deadline) for ``flag``,
    prints 'end', and leaves ``done`` once it has finished its work."""
    return (f"import os, time\nprint('start', flush=True)\n"
            f"deadline = time.monotonic() + 60\n"
            f"while not any(os.path.exists(d + '/{flag}') for d in ('/tmp', '{user_dir}')) "
            f"and time.monotonic() < deadline:\n    time.sleep(0.02)\n"
            f"print('end', flush=True)\n"
            f"for d in ('{user_dir}', '/tmp'):\n"
            f"    try:\n        open(d + '/{done}', 'w').close()\n        break\n"
            f"    except OSError:\n        pass\n")


def set_flag(s: Servers, flag: str) -> None:
    (s.user_dir / flag).write_text("")
    os.chmod(s.user_dir / flag, 0o644)


async def new_keeper(address: str, old_pid: int, within: float) -> dict:
    """The new keeper's info, once one other than ``old_pid`` answers."""
    async def replaced():
        info = await keeper_info(address)
        return info if info and info["pid"] != old_pid and info.get("previous") else None
    return await until(replaced, "a new keeper", timeout=within)


def contiguous_gap(numbers: list[int]) -> tuple[int, int]:
    """``numbers`` must be 1..M with at most one run missing: (first
    missing, count missing)."""
    assert numbers == sorted(set(numbers)) and numbers[0] == 1 and numbers[-1] == M, numbers
    missing = sorted(set(range(1, M + 1)) - set(numbers))
    if missing:
        assert missing == list(range(missing[0], missing[-1] + 1)), numbers
    return (missing[0] if missing else 0), len(missing)


NO_WITNESS = "--PersistentKernelManager.witness_messages=0"


@pytest.mark.parametrize("witness", [True, False], ids=["witness", "no-witness"])
def test_a_killed_keeper_is_replaced_and_the_gap_filled_or_told(servers, witness):
    s = servers
    if not witness:
        s.extra.append(NO_WITNESS)

    async def scenario():
        s.start()
        async with aiohttp.ClientSession(headers=s.headers) as http:
            kernel = await start_kernel(http, s)
            session = uuid.uuid4().hex
            ws = await connect(http, s, kernel, session)
            await warm_up(ws)
            address = s.records()[kernel]["keeper"]
            old = await keeper_info(address)
            page = Page(await send(ws, count_to(M, 0.3), session))
            await page.read(ws, lambda t: len(t.numbers) >= 3)
            os.kill(old["pid"], signal.SIGKILL)
            killed_at = time.time()
            new = await new_keeper(address, old["pid"], INTERVAL + 20)
            await page.read(ws, lambda t: t.reply and t.idle, timeout=60)
            # Later output goes through the new keeper as before.
            status, out, _ = await execute(ws, "print('after')")
            await ws.close()
            return page, old, new, killed_at, status, out, await keeper_info(address)

    page, old, new, killed_at, status, out, now = asyncio.run(scenario())
    t = page.t
    assert not running(old["pid"]) and running(new["pid"])
    # Noticed within the interval (the new keeper's own start comes on top).
    assert new["first_time"] - killed_at < INTERVAL + 10
    assert new["previous"]["pid"] == old["pid"]
    assert t.reply and t.idle and (status, out) == ("ok", "after\n")
    # The cell ended through the new keeper: nothing made up.
    assert all("chspawner" not in m["metadata"] for m in page.of_type("status"))
    if witness:
        # Every number once, in order, and nothing to tell.
        assert t.numbers == list(range(1, M + 1)) and not page.notices(), t.order
        # (the new keeper holds the gap, numbered on from the old one's)
        assert now["filled"] and now["filled"][0] <= now["previous"]["last_seq"] + 1
        seqs = [m["metadata"]["chspawner_seq"] for m in page.messages
                if "chspawner_seq" in m["metadata"]]
        assert seqs == sorted(set(seqs))
        return
    # Told once, in the cell's output, where the gap is.
    [notice] = page.notices()
    assert notice["msg_type"] == "stream" and notice["content"]["name"] == "stderr"
    text = notice["content"]["text"]
    assert text.startswith("[chspawner] ") and t.stderr == [text]
    found = SPAN.search(text)
    assert found, text
    span = float(found[3])
    first_missing, missing = contiguous_gap(t.numbers)
    # What's missing is what the kernel printed in the span (one each
    # 0.3 s), and the notice sits where it is missing.
    assert missing <= span / 0.3 + 2, (missing, span)
    before = t.order.index("e")
    assert missing and t.numbers[:before] == list(range(1, first_missing))
    assert before >= 3 and t.order[before + 1:] == ["n"] * (len(t.numbers) - before)


@pytest.mark.parametrize("witness", [True, False], ids=["witness", "no-witness"])
def test_a_cell_that_ends_while_no_keeper_runs_still_finishes(servers, witness):
    """Its end and idle status went to no keeper: the witness has them (the
    page gets the real ones); without it, the page is sent an idle status
    rebuilt (its execute_reply came on shell, as ever while the server
    runs)."""
    s = servers
    if not witness:
        s.extra.append(NO_WITNESS)
    flag, done = f"flag-{uuid.uuid4().hex}", f"done-{uuid.uuid4().hex}"

    async def scenario():
        s.start()
        async with aiohttp.ClientSession(headers=s.headers) as http:
            kernel = await start_kernel(http, s)
            session = uuid.uuid4().hex
            ws = await connect(http, s, kernel, session)
            await warm_up(ws)
            address = s.records()[kernel]["keeper"]
            old = await keeper_info(address)
            page = Page(await send(ws, ended_flag_code(s.user_dir, flag, done), session))
            await page.read(ws, lambda t: "start" in "".join(t.stdout))
            os.kill(old["pid"], signal.SIGKILL)
            set_flag(s, flag)  # the cell ends now, long before a keeper can start
            await page.read(ws, lambda t: t.reply_content is not None and t.idle, timeout=60)
            status, out, _ = await execute(ws, "print('after')")
            await ws.close()
            return page, status, out

    page, status, out = asyncio.run(scenario())
    t = page.t
    assert t.reply_content["status"] == "ok" and "chspawner" not in page.of_type(
        "execute_reply")[0]["metadata"]
    [idle] = [m for m in page.of_type("status")
              if m["content"]["execution_state"] == "idle"]
    assert (status, out) == ("ok", "after\n")
    if witness:
        assert "chspawner" not in idle["metadata"] and not page.notices()
        assert "".join(t.stdout).split() == ["start", "end"]  # 'end' from the gap
        return
    assert "rebuilt" in idle["metadata"]["chspawner"]
    [notice] = page.notices()
    assert SPAN.search(notice["content"]["text"])
    assert "".join(t.stdout).split() == ["start"]  # 'end' was printed in the gap
    assert (status, out) == ("ok", "after\n")


@pytest.mark.parametrize("ends_in_gap", [False, True])
def test_a_dead_keeper_found_by_the_next_server(servers, ends_in_gap):
    """Server and keeper killed mid-cell; the next server adopts the kernel
    with a new keeper, and the page that comes back is told, gets the rest
    of the output, and sees its cell finish (its reply rebuilt when it went
    to the dead server)."""
    s = servers
    flag, done = f"flag-{uuid.uuid4().hex}", f"done-{uuid.uuid4().hex}"
    code = ended_flag_code(s.user_dir, flag, done) if ends_in_gap else count_to(M, 0.3)

    async def scenario():
        s.start()
        async with aiohttp.ClientSession(headers=s.headers) as http:
            kernel = await start_kernel(http, s)
            session = uuid.uuid4().hex
            ws = await connect(http, s, kernel, session)
            await warm_up(ws)
            address = s.records()[kernel]["keeper"]
            old = await keeper_info(address)
            page = Page(await send(ws, code, session))
            await page.read(ws, lambda t: len(t.stdout) >= 3 or "start" in "".join(t.stdout))
            await ws.close()
            s.kill()
            os.kill(old["pid"], signal.SIGKILL)
            if ends_in_gap:
                set_flag(s, flag)
                await asyncio.to_thread(wait_until, (s.user_dir / done).exists,
                                        "the cell to end", 60)
            await asyncio.to_thread(s.start)
            ws = await connect(http, s, kernel, session)
            await page.read(ws, lambda t: t.reply_content is not None and t.idle, timeout=60)
            status, out, _ = await execute(ws, "print('after')")
            await ws.close()
            return page, old, await keeper_info(address), status, out

    page, old, new, status, out = asyncio.run(scenario())
    t = page.t
    assert new["pid"] != old["pid"] and new["previous"]["pid"] == old["pid"]
    [notice] = page.notices()
    assert SPAN.search(notice["content"]["text"]), notice
    [reply] = page.of_type("execute_reply")
    [idle] = [m for m in page.of_type("status") if m["content"]["execution_state"] == "idle"]
    if ends_in_gap:
        # Both went nowhere: rebuilt, with the count the old keeper saw.
        assert "rebuilt" in reply["metadata"]["chspawner"]
        assert "rebuilt" in idle["metadata"]["chspawner"]
        assert reply["content"]["execution_count"] == t.execution_count is not None
        assert "".join(t.stdout).split() == ["start"]
    else:
        # Still running when the new keeper came: the real ones.
        assert "chspawner" not in reply["metadata"] and "chspawner" not in idle["metadata"]
        contiguous_gap(t.numbers)
    assert reply["content"]["status"] == "ok"
    assert (status, out) == ("ok", "after\n")
