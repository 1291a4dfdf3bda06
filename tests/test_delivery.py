"""End-to-end delivery (issue 16, the server's side): what counts is what
the client received, not what a socket accepted.

A client's websocket is cut abruptly mid-stream by killing a TCP relay in
front of the server (the way a killed session proxy or a dropped network
takes it: the server wrote messages into a socket that never reached the
client, and recorded them as sent). A client that reconnects with
``chspawner_received`` (as chspawner's JupyterLab extension does) then
gets every message exactly once; a plain client is told how many may be
missing. Real parts: jupyter_server as the unprivileged user with the
persist plugins, the container kernel, both websocket protocols. The pure
parts (chspawner.persist.delivery, the keeper's follow) are unit tests.
"""
from __future__ import annotations

import asyncio
import json
import re
import uuid

import aiohttp
import pytest

from chspawner.persist.delivery import (
    Recent, metadata_keys, parse_received, uncertain_notice, with_metadata)
from chspawner.persist.keeper import Keeper
from chspawner.persist.kernel_manager import keeper_info
from chspawner.persist.records import KernelRecords, read_ack
from chspawner.persist.replay import ws_frame
from session_proxy.proxy.wsframes import frame_size
from tests.harness.kernel_client import execute_request, kernels_url, start_kernel
from tests.harness.servers import Servers
from tests.harness.wait import until
from tests.harness.ws_v1 import PROTOCOL as V1, decode as v1_decode, encode as v1_encode

COUNT = 1500  # numbers printed, one every 4 ms
CUT_AT = 200  # numbers received before the cut


# ------------------------------------------------------------- unit ---

@pytest.mark.unit
def test_received_values_are_plain_seqs_or_ignored():
    assert parse_received("0") == 0
    assert parse_received("1764858000000123") == 1764858000000123
    for bad in (None, "", "-1", " 5", "1_000", "5.0", "x", "١٢", "9" * 20, str(1 << 63)):
        assert parse_received(bad) is None, bad


@pytest.mark.unit
def test_metadata_keys_are_spliced_last_into_any_object():
    keys = metadata_keys(7)
    assert json.loads(with_metadata(b"{}", keys)) == {"chspawner_seq": 7}
    assert json.loads(with_metadata(b' { } \n', keys)) == {"chspawner_seq": 7}
    spliced = with_metadata(b'{"a": {"b": "}"}, "chspawner_seq": 1}', metadata_keys(9, 'c"1'))
    assert json.loads(spliced) == {"a": {"b": "}"}, "chspawner_seq": 9, "chspawner_cell": 'c"1'}
    assert with_metadata(b"[]", keys) == b"[]"  # not an object: as it was


@pytest.mark.unit
def test_recent_counts_what_was_out_in_the_window_by_execution():
    a, b = json.dumps({"msg_id": "a"}).encode(), json.dumps({"msg_id": "b"}).encode()
    recent = Recent(window=10)
    for i in range(5):
        recent.add(100.0 + i * 0.1, 1 + i, a)  # seqs 1..5 at 100.0..100.4
    for i in range(5):
        recent.add(100.5 + i * 0.1, 6 + i, b)  # seqs 6..10
    assert recent.uncertain(since=90, acked=10) == [({"msg_id": "a"}, 5), ({"msg_id": "b"}, 5)]
    # Not out yet (unacknowledged) is sent again, so not uncertain.
    assert recent.uncertain(since=90, acked=7) == [({"msg_id": "a"}, 5), ({"msg_id": "b"}, 2)]
    assert recent.uncertain(since=100.45, acked=10) == [({"msg_id": "b"}, 5)]
    recent.add(200.0, 11, a)  # the old runs leave the window
    assert recent.uncertain(since=0, acked=11) == [({"msg_id": "a"}, 1)]
    assert "up to 3 output message(s)" in uncertain_notice(3, 10)


@pytest.mark.unit
def test_a_follow_with_received_resumes_right_after_it(tmp_path):
    kernel = "7ab1eacd-f40a-494f-b066-717e217e1809"
    k = Keeper(tmp_path / f"{kernel}.json", "ipc://unused", first_seq=1000)
    try:
        k._follow(b"s1", "page")  # from now
        for n in range(10):
            k.on_iopub([b"frame", str(n).encode()])  # 1000..1009
        acks = KernelRecords(tmp_path).acks_dir(kernel)
        acks.mkdir()
        from chspawner.persist.records import AckFile
        ack = AckFile(acks, "page")
        ack.write(1008)  # the server sent up to 1008; the page got 1003
        ack.close()
        k._follow(b"s2", "page", 1003)
        assert k.followers[b"s2"].cursor == 1004
        k._follow(b"s3", "page", 5)  # an earlier keeper's number: all of ours
        assert k.followers[b"s3"].cursor == 1000
        k._follow(b"s4", "page", 99999)  # not issued yet: ignored, as recorded
        assert k.followers[b"s4"].cursor == 1009
        assert read_ack(acks, "page") == 1008
    finally:
        k.close()


@pytest.mark.unit
def test_an_unfollow_stops_only_the_requesters_stream(tmp_path):
    """(What a server asks when a page goes away: see stop_following.)"""
    k = Keeper(tmp_path / "k.json", "ipc://unused")
    try:
        k._follow(b"s1", "page")
        k._follow(b"s2", "other")
        assert k.info()["followed"] == ["other", "page"]
        k.on_request([b"s1", b"unfollow", b"time", b"nonce", b"sig"])  # (unsigned on ipc)
        assert list(k.followers) == [b"s2"] and k.info()["followed"] == ["other"]
        assert "page" in k.info()["sessions"]  # where it resumes is kept
    finally:
        k.close()


@pytest.mark.unit
@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_a_batched_replays_frames_are_websocket_data_frames(size):
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    for binary, opcode in ((True, 0x82), (False, 0x81)):
        frame = ws_frame(payload, binary)
        assert frame[0] == opcode  # final, no extension bits
        assert not frame[1] & 0x80  # unmasked: server to client
        assert frame_size(frame, 0) == len(frame) and frame.endswith(payload)
        two = frame + frame  # frames of one write follow each other
        assert frame_size(two, len(frame)) == len(frame)


def keeper_msg(seq: int, kind: str = "stream") -> list[bytes]:
    header = json.dumps({"msg_id": f"m{seq}", "msg_type": kind}).encode()
    return [b"msg", b"%d" % seq, b"<IDS|MSG>", b"sig", header, b'{"msg_id": "p"}', b"{}", b"{}"]


@pytest.mark.unit
def test_a_batch_whose_websocket_goes_still_takes_the_keepers_answers():
    """Its messages are not written (nor recorded: the next follow sends
    them), but a follow's answer queued behind them is taken: a lost one
    would leave the session waiting for it, dropping all it gets."""
    import zmq
    from types import SimpleNamespace
    from chspawner.persist.replay import BatchedReplay

    following = [b"following", b'{"last_seq": 9, "missed_replies": []}']
    queue = [keeper_msg(2), keeper_msg(3, "error"), keeper_msg(4), following, keeper_msg(5)]

    class Socket:
        def recv_multipart(self, flags):
            if not queue:
                raise zmq.Again()
            return queue.pop(0)

    class Connection(BatchedReplay):
        annotate_seq, subprotocol, _lost = True, V1, None
        websocket_handler = SimpleNamespace(
            ws_connection=SimpleNamespace(is_closing=lambda: False),
            get_compression_options=lambda: None)
        one_by_one: list[bytes] = []
        written: list[list[int]] = []

        def _replayed_cell(self, stream, parent):
            return None, None

        def _write_batch(self, stream, batch):
            self.written.append([seq for seq, _, _ in batch])
            return False  # the websocket went

        def handle_outgoing_message(self, stream, parts):
            self.one_by_one.append(parts[0])

    stream = SimpleNamespace(socket=Socket(), pending_follows=0, settling=None, replay_until=5,
                             missed_replies={}, delivered=0, pending={})
    c = Connection()
    assert c.replay_batch(stream, keeper_msg(1))
    assert c.written == [[1, 2]]  # then the error (one by one) found it gone
    assert c.one_by_one == [b"following"] and not queue


# ------------------------------------------------------ real server ---

class Relay:
    """A TCP relay in front of the server that can be cut abruptly: it
    stops passing the server's bytes on (reading and dropping them, as a
    dead proxy's socket buffers do), then resets both connections."""

    def __init__(self, port: int):
        self.port, self.cutting = port, False
        self.writers: list[asyncio.StreamWriter] = []
        self.dropped = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers += [writer, up_w]

        async def pump(src, dst, from_server: bool):
            try:
                while data := await src.read(65536):
                    if from_server and self.cutting:
                        self.dropped += len(data)
                        continue
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
        await asyncio.gather(pump(reader, up_w, False), pump(up_r, writer, True))

    async def cut(self, dropping_for: float = 0.5) -> None:
        self.cutting = True
        # (a span of output the server writes into a socket that never
        # delivers; not a wait for an event)
        await asyncio.sleep(dropping_for)
        for w in self.writers:
            w.transport.abort()  # RST: no close frame, no FIN
        self.server.close()


class Client:
    """A page's side of one kernel websocket: what it received, by seq."""

    def __init__(self, v1: bool):
        self.v1 = v1
        self.msgs: list[dict] = []
        self.last_seq = 0

    async def open(self, http, url: str, received: int | None = None):
        if received is not None:
            url += f"&chspawner_received={received}"
        self.ws = await http.ws_connect(url, protocols=(V1,) if self.v1 else ())
        return self

    async def send(self, msg: dict) -> None:
        if self.v1:
            await self.ws.send_bytes(v1_encode(msg, msg.get("channel", "shell")))
        else:
            await self.ws.send_str(json.dumps(msg))

    async def read_until(self, until, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while not until():
                frame = await self.ws.receive()
                if frame.type == aiohttp.WSMsgType.BINARY:
                    msg = v1_decode(frame.data)
                elif frame.type == aiohttp.WSMsgType.TEXT:
                    msg = json.loads(frame.data)
                else:
                    return  # closed
                if msg.get("channel") == "iopub" and "chspawner_seq" in msg["metadata"]:
                    seq = msg["metadata"]["chspawner_seq"]
                    assert seq > self.last_seq, (seq, self.last_seq)  # increasing, no copy
                    self.last_seq = seq
                self.msgs.append(msg)

    def of(self, msg_id: str, kind: str | None = None) -> list[dict]:
        return [m for m in self.msgs if m["parent_header"].get("msg_id") == msg_id
                and (kind is None or m["msg_type"] == kind)]

    def numbers(self, msg_id: str) -> list[int]:
        return [int(x) for m in self.of(msg_id, "stream") if m["content"]["name"] == "stdout"
                for x in m["content"]["text"].split()]

    def done(self, msg_id: str) -> bool:
        return bool(self.of(msg_id, "execute_reply")) and any(
            m["content"]["execution_state"] == "idle" for m in self.of(msg_id, "status"))


@pytest.fixture
def servers(user, user_dir, kernel_store):
    s = Servers(user, user_dir, kernel_store, [])
    yield s
    s.close()


def printing(n: int) -> str:
    return (f"import time\nfor i in range(1, {n + 1}):\n"
            f"    print(i, flush=True)\n    time.sleep(0.004)\n")


async def cut_mid_stream(s: Servers, v1: bool, with_received: bool):
    """A client through a relay runs a cell printing 1..COUNT; the relay is
    cut mid-stream; the client reconnects (straight) with or without
    ``chspawner_received``. Returns the client, the request's id, and
    (seq received before the cut, seq the server had recorded as sent)."""
    s.start()
    host_port = int(s.base.rsplit(":", 1)[1])
    async with aiohttp.ClientSession(headers=s.headers) as http:
        kernel, session = await start_kernel(http, s), uuid.uuid4().hex
        relay = Relay(host_port)
        path = f"/api/kernels/{kernel}/channels?session_id={session}"
        client = await Client(v1).open(http, f"ws://127.0.0.1:{await relay.start()}{path}")
        warm = execute_request("pass", session) | {"channel": "shell"}
        await client.send(warm)
        await client.read_until(lambda: client.done(warm["header"]["msg_id"]))
        request = execute_request(printing(COUNT), session) | {"channel": "shell"}
        msg_id = request["header"]["msg_id"]
        await client.send(request)
        await client.read_until(lambda: len(client.numbers(msg_id)) >= CUT_AT)
        await relay.cut()
        await client.read_until(lambda: False, timeout=10)  # (till it sees the reset)
        received = client.last_seq
        acks = KernelRecords(s.state_dir).acks_dir(kernel)
        sent = read_ack(acks, session)
        assert relay.dropped > 0
        await client.open(http, kernels_url(s).replace("http", "ws", 1) + path.split(
            "/api/kernels", 1)[1], received if with_received else None)
        await client.read_until(lambda: client.done(msg_id), timeout=90)
        await client.ws.close()
        return client, msg_id, (received, sent)


@pytest.mark.parametrize("v1", [True, False], ids=["v1", "legacy"])
def test_a_page_with_received_gets_every_message_exactly_once_after_a_cut(servers, v1):
    client, msg_id, (received, sent) = asyncio.run(cut_mid_stream(servers, v1, True))
    numbers = client.numbers(msg_id)
    assert numbers == list(range(1, COUNT + 1)), numbers[:5]
    # The fault was real: the server had recorded as sent messages the page
    # never got; they were replayed (seqs checked increasing as read).
    assert sent is not None and sent > received
    assert not [m for m in client.msgs if m["metadata"].get("chspawner_notice")]
    kernel_msgs = [m for m in client.msgs if m["channel"] == "iopub"]
    assert all("chspawner_seq" in m["metadata"] for m in kernel_msgs)


def test_a_plain_client_is_told_how_many_may_be_missing(servers):
    client, msg_id, (received, sent) = asyncio.run(cut_mid_stream(servers, False, False))
    numbers = client.numbers(msg_id)
    missing = sorted(set(range(1, COUNT + 1)) - set(numbers))
    assert missing and len(numbers) == len(set(numbers))  # lost, not repeated
    notices = [m for m in client.of(msg_id, "stream") if m["metadata"].get("chspawner_notice")]
    assert len(notices) == 1, [m["content"] for m in notices]
    said = int(re.search(r"up to (\d+) output message", notices[0]["content"]["text"])[1])
    # Everything written in the window that went out counts, received or not.
    assert len(missing) <= said <= len(client.of(msg_id)) + len(missing), (said, len(missing))
    assert sent > received


def test_a_replay_to_another_session_names_the_cell(servers):
    async def run():
        servers.start()
        async with aiohttp.ClientSession(headers=servers.headers) as http:
            kernel = await start_kernel(http, servers)
            base = kernels_url(servers).replace("http", "ws", 1) + f"/{kernel}/channels"
            a, b = uuid.uuid4().hex, uuid.uuid4().hex
            page_a = await Client(True).open(http, f"{base}?session_id={a}")
            request = execute_request("print('hello')", a) | {"channel": "shell"}
            request["metadata"] = {"cellId": "cell-7"}
            await page_a.send(request)
            await page_a.read_until(lambda: page_a.done(request["header"]["msg_id"]))
            await page_a.ws.close()
            # Another page, asking for all the keeper holds, and page A again.
            page_b = await Client(True).open(http, f"{base}?session_id={b}", received=0)
            again = await Client(True).open(http, f"{base}?session_id={a}", received=0)
            msg_id = request["header"]["msg_id"]
            for page in (page_b, again):
                await page.read_until(lambda p=page: any(
                    m["content"].get("execution_state") == "idle"
                    for m in p.of(msg_id, "status")), timeout=30)
                await page.ws.close()
            return page_a, page_b, again, msg_id

    page_a, page_b, again, msg_id = asyncio.run(run())
    replayed = page_b.of(msg_id)
    assert replayed and all(m["metadata"].get("chspawner_cell") == "cell-7" for m in replayed)
    # ... and the count the execution began as (a page reloaded after its
    # execute_input still shows it).
    count = next(m["content"]["execution_count"] for m in page_a.of(msg_id, "execute_input"))
    assert all(m["metadata"].get("chspawner_count") == count for m in replayed)
    assert any(m["msg_type"] == "stream" and m["content"]["text"] == "hello\n" for m in replayed)
    # The page that asked knows its own cells: no cell id for it.
    assert again.of(msg_id) and not any("chspawner_cell" in m["metadata"]
                                        for m in again.of(msg_id))
    assert all("chspawner_cell" not in m["metadata"] for m in page_a.msgs)


def numbering(first: int, last: int, then: str = "") -> str:
    """Prints first..last (paced a little: flat out, the kernel's IOPub
    socket drops some), then runs ``then``."""
    return (f"import time\nfor i in range({first}, {last + 1}):\n"
            f"    print(i, flush=True)\n    i % 100 or time.sleep(0.002)\n{then}\n")


def idle(client: Client, msg_id: str) -> bool:
    """The execution's end (IOPub: every page gets it, not only the one
    that asked)."""
    return any(m["content"].get("execution_state") == "idle" for m in client.of(msg_id, "status"))


@pytest.mark.parametrize("alone", [False, True], ids=["witnessed", "alone"])
@pytest.mark.parametrize("v1", [True, False], ids=["v1", "legacy"])
def test_a_long_replay_comes_in_order_exactly_once(servers, v1, alone):
    """Thousands of messages missed (a replay written in batches), a
    kernel error among them (which goes one by one): the page gets each
    exactly once, in the keeper's order, with its seq, the same messages a
    page that stayed got; all of them are acknowledged. Alone: the page is
    the kernel's only connection, so jupyter_server keeps its streams for
    its return (and, stock, would buffer what they receive meanwhile),
    and it comes back while the kernel still prints."""
    async def run():
        servers.start()
        async with aiohttp.ClientSession(headers=servers.headers) as http:
            kernel = await start_kernel(http, servers)
            base = kernels_url(servers).replace("http", "ws", 1) + f"/{kernel}/channels"
            away, stays = uuid.uuid4().hex, uuid.uuid4().hex
            witness = None if alone else await Client(v1).open(http, f"{base}?session_id={stays}")
            page = await Client(v1).open(http, f"{base}?session_id={away}")
            for c in filter(None, (witness, page)):
                warm = execute_request("pass", c is page and away or stays)
                await c.send(warm | {"channel": "shell"})
                await c.read_until(lambda c=c, w=warm: c.done(w["header"]["msg_id"]))
            first = execute_request(numbering(1, 1500, "raise ValueError('half way')"), away)
            second = execute_request(numbering(1501, 3000), away)
            for r in (first, second):
                r["content"]["stop_on_error"] = False
                await page.send(r | {"channel": "shell"})
            ids = [r["header"]["msg_id"] for r in (first, second)]
            await page.read_until(lambda: page.of(ids[0], "execute_input"))
            await page.ws.close()  # away while both run
            received = page.last_seq
            if alone:  # back once both ended (the keeper's word for it)
                address = servers.records()[kernel]["keeper"]

                async def both_ended():
                    info = await keeper_info(address)
                    return info is not None and info["last_seq"] > received + 3000 \
                        and info["execution_state"] == "idle"
                await until(both_ended, "the kernel done printing", timeout=120)
                # Meanwhile the kernel's output stayed with the keeper, not
                # in the server's memory: it streams to no one.
                assert (await keeper_info(address))["followed"] == []
            else:
                await witness.read_until(lambda: idle(witness, ids[1]), timeout=120)
            await page.open(http, f"{base}?session_id={away}", received)
            await page.read_until(lambda: idle(page, ids[1]), timeout=120)
            await page.ws.close()
            if witness is not None:
                await witness.ws.close()
            acks = KernelRecords(servers.state_dir).acks_dir(kernel)
            # Recorded once tornado has flushed the write: maybe just after
            # it came. (What came after, the new websocket's kernel_info
            # status, may be recorded too.)
            await until(lambda: (read_ack(acks, away) or 0) >= page.last_seq,
                        "the page's last message acknowledged", timeout=10)
            return witness, page, ids, received

    witness, page, (one, two), received = asyncio.run(run())
    assert page.numbers(one) == list(range(1, 1501))
    assert page.numbers(two) == list(range(1501, 3001))
    errors = page.of(one, "error")
    assert len(errors) == 1 and errors[0]["content"]["evalue"] == "half way"

    def seqs(client):
        return [m["metadata"]["chspawner_seq"] for m in client.msgs
                if m["channel"] == "iopub" and m["parent_header"].get("msg_id") in (one, two)
                and m["metadata"].get("chspawner_seq", 0) > received]
    # Exactly the messages the keeper numbered after what the page held
    # (the page's Client checks each seq above the one before: no copy).
    if witness is not None:
        assert seqs(page) == seqs(witness)
    assert len(seqs(page)) > 3000
    # ... every one of them, none skipped: only this session ran anything.
    numbered = [m["metadata"]["chspawner_seq"] for m in page.msgs
                if m["metadata"].get("chspawner_seq", 0) > received]
    assert numbered == list(range(received + 1, numbered[-1] + 1))


@pytest.mark.unit
def test_the_keepers_answer_to_a_follow_waits_out_a_full_pipe(tmp_path):
    """The server drops what comes under an earlier follow until the answer
    ("following") arrives: that answer must not be lost to a full pipe."""
    import zmq
    k = Keeper(tmp_path / "k.json", "ipc://unused", first_seq=1)
    sent: list[list[bytes]] = []
    full = [True]

    def send(ident, frames, raise_again=False):
        if full[0] and raise_again:
            raise zmq.Again()
        sent.append(frames)
    k._send = send
    k._send_msg = lambda ident, seq, frames: send(ident, [b"msg", b"%d" % seq, *frames], True)
    try:
        for n in range(3):
            k.on_iopub([b"frame", str(n).encode()])
        k._follow(b"s", "page", 1)
        k.flush()
        assert sent == [] and k.behind  # pipe full: kept, and soon retried
        full[0] = False
        k.flush()
        assert [f[0] for f in sent] == [b"following", b"msg", b"msg"]
        assert [f[1] for f in sent[1:]] == [b"2", b"3"] and not k.behind
    finally:
        k.close()


@pytest.mark.unit
def test_the_keeper_sends_a_buffered_message_whole_or_not_at_all(tmp_path):
    import zmq
    from chspawner.persist.keeper import Follower
    k = Keeper(tmp_path / "k.json", f"ipc://{tmp_path}/k.sock", first_seq=1)
    dealer = k.ctx.socket(zmq.DEALER)
    dealer.linger = 0
    try:
        k.bind()
        dealer.connect(k.address)
        dealer.send(b"hello")
        ident, _ = k.router.recv_multipart()
        k._send_msg(ident, 7, [b"<IDS|MSG>", b"sig", b"header"])
        assert dealer.poll(5000) and dealer.recv_multipart() == [
            b"msg", b"7", b"<IDS|MSG>", b"sig", b"header"]
        k.followers[b"gone"] = Follower("page", 1)
        with pytest.raises(zmq.ZMQError):  # (ROUTER_MANDATORY: no such peer)
            k._send_msg(b"gone", 8, [b"frame"])
        assert b"gone" not in k.followers
    finally:
        dealer.close()
        k.close()

