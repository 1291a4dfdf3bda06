"""The notebook writer's resumption, message by message: what a server
replacing another writes, given what the notebook holds and what the
keeper still holds (its buffer may have let an execution's start go).

The keeper's stream is played by the test (frames as the keeper sends
them: following, lost, numbered messages signed by a jupyter_client
Session); the notebook is a file saved through jupyter_server's own
contents manager, in a temporary directory. Unit layer: no root, no
services, no kernel.
"""
from __future__ import annotations

import asyncio
import json
import logging
import types
from pathlib import Path

import nbformat
import pytest
from jupyter_client.session import Session
from jupyter_server.services.contents.filemanager import AsyncFileContentsManager

from chspawner.persist.notebook_outputs import NotebookWriters
from chspawner.persist.records import AckFile, CellMap
from tests.harness.wait import until

pytestmark = pytest.mark.unit

KERNEL = "7ab1eacd-f40a-494f-b066-717e217e1809"


class FakeServer:
    """What the writer asks of the server: its sessions and contents."""

    session_manager = None

    def __init__(self, root: Path):
        self.contents_manager = AsyncFileContentsManager(root_dir=str(root))
        self.session_manager = self


class Stream:
    def closed(self) -> bool:
        return False

    def close(self, linger: int = 0) -> None:
        pass


class Manager:
    """The kernel manager's part the writer uses (its traits as defaults)."""

    notebook_outputs = True
    notebook_write_after = 300.0
    notebook_write_interval = 0.05
    notebook_outputs_per_cell = 1000
    notebook_output_bytes_per_cell = 8 << 20
    notebook_output_bytes_per_kernel = 64 << 20

    def __init__(self, root: Path, state: Path):
        self.parent = FakeServer(root)
        self.log = logging.getLogger("test")
        self.records = types.SimpleNamespace(
            notebook_state_path=lambda kid: state / f"{kid}.notebook")
        acks = state / f"{KERNEL}.acks"
        acks.mkdir(parents=True, exist_ok=True)
        self.km = types.SimpleNamespace(
            session=Session(key=b"secret"), acks_dir=str(acks), keeper_address="ipc://x",
            cell_map=CellMap(state / f"{KERNEL}.cells"))

    def get_kernel(self, kernel_id: str):
        assert kernel_id == KERNEL
        return self.km


class Kernel:
    """IOPub frames of one execution of cell ``c1``, as a keeper sends them."""

    def __init__(self, session: Session, cells: CellMap):
        self.session = session
        self.request = session.msg("execute_request", {"code": ""})
        cells.add(self.request["header"]["msg_id"], "c1", "page")

    def frames(self, seq: int, kind: str, content: dict) -> list[bytes]:
        msg = self.session.msg(kind, content, parent=self.request["header"])
        return [b"msg", str(seq).encode(), *self.session.serialize(msg)]

    def stream(self, seq: int, text: str) -> list[bytes]:
        return self.frames(seq, "stream", {"name": "stdout", "text": text})


def following(last_seq: int) -> list[bytes]:
    return [b"following", json.dumps({"last_seq": last_seq, "missed_replies": []}).encode()]


async def writer_of(manager: Manager):
    writers = NotebookWriters(manager)
    writer = writers.writer(KERNEL)
    writer._follow = lambda km: Stream()  # the test plays the keeper
    writer.start()
    await until(lambda: writer.stream is not None, "the writer to begin")
    return writer


def notebook(root: Path) -> dict:
    """The notebook on disk (jupyter_server writes it in place, keeping a
    copy aside until done: a read during a save may find it half written)."""
    try:
        return json.loads((root / "n.ipynb").read_text())
    except ValueError:
        return {"metadata": {}}


def printed(nb: dict) -> str:
    return "".join("".join(o.get("text", "")) for o in nb["cells"][0]["outputs"])


@pytest.fixture
def setup(tmp_path, monkeypatch):
    root, state = tmp_path / "root", tmp_path / "state"
    root.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("count()")])
    nb.cells[0].id = "c1"
    nbformat.write(nb, root / "n.ipynb")

    async def get_session(**kw):
        return {"path": "n.ipynb", "type": "notebook"}
    manager = Manager(root, state)
    manager.parent.get_session = get_session
    return root, manager


def test_a_server_replacing_another_resumes_an_execution_whose_start_is_gone(setup):
    """The first writer wrote 1 and 2 (seq 3); the keeper then let the
    execution's start go: the next writer replays from seq 3, and adds
    only what follows what the notebook holds."""
    root, manager = setup

    async def scenario():
        kernel = Kernel(manager.km.session, manager.km.cell_map)
        first = await writer_of(manager)
        first._on_frames(following(3))
        first._on_frames(kernel.frames(1, "execute_input", {"code": "", "execution_count": 4}))
        first._on_frames(kernel.stream(2, "1\n"))
        first._on_frames(kernel.stream(3, "2\n"))
        await until(lambda: notebook(root)["metadata"].get("chspawner"), "the first write")
        first.stop(forget=True)  # (its server killed)
        assert printed(notebook(root)) == "1\n2\n"

        second = await writer_of(manager)
        second._on_frames(following(6))
        second._on_frames([b"lost", json.dumps({"lost": 2, "capacity": 4}).encode()])
        second._on_frames(kernel.stream(3, "2\n"))  # in the notebook already
        second._on_frames(kernel.stream(4, "3\n"))
        second._on_frames(kernel.stream(5, "4\n"))
        second._on_frames(kernel.frames(6, "status", {"execution_state": "idle"}))
        await until(lambda: notebook(root)["metadata"].get("chspawner", {})
                    .get("outputs", {}).get("seq") == 6, "the second write")
    asyncio.run(scenario())
    nb = notebook(root)
    assert printed(nb) == "1\n2\n3\n4\n"
    assert nb["cells"][0]["execution_count"] == 4
    assert nb["metadata"]["chspawner"]["outputs"] == {"kernel_id": KERNEL, "seq": 6}


def test_a_replay_from_the_start_rewrites_the_cell_whole_and_leaves_the_rest(setup):
    """Everything replayed: the cell that had output after what the page
    was sent is written whole (not appended to); the notebook's other
    parts stay as they are on disk."""
    root, manager = setup

    async def scenario():
        kernel = Kernel(manager.km.session, manager.km.cell_map)
        nb = notebook(root)
        nb["cells"][0]["outputs"] = [{"output_type": "stream", "name": "stdout",
                                      "text": "1\n"}]  # what the page had saved
        nb["metadata"]["mine"] = "kept"
        (root / "n.ipynb").write_text(json.dumps(nb))
        ack = AckFile(Path(manager.km.acks_dir), "page")
        ack.write(2)  # the page was sent up to seq 2 (it printed 1)
        ack.close()
        writer = await writer_of(manager)
        writer._on_frames(following(5))
        writer._on_frames(kernel.frames(1, "execute_input", {"code": "", "execution_count": 9}))
        for seq, n in ((2, 1), (3, 2), (4, 3)):
            writer._on_frames(kernel.stream(seq, f"{n}\n"))
        writer._on_frames(kernel.frames(5, "status", {"execution_state": "idle"}))
        await until(lambda: notebook(root)["metadata"].get("chspawner"), "the write")
    asyncio.run(scenario())
    nb = notebook(root)
    assert printed(nb) == "1\n2\n3\n"
    assert nb["cells"][0]["execution_count"] == 9
    assert nb["metadata"]["mine"] == "kept"


def test_nothing_is_written_when_the_page_was_sent_it_all(setup):
    root, manager = setup

    async def scenario():
        kernel = Kernel(manager.km.session, manager.km.cell_map)
        ack = AckFile(Path(manager.km.acks_dir), "page")
        ack.write(3)
        ack.close()
        writer = await writer_of(manager)
        writer._on_frames(following(3))
        writer._on_frames(kernel.frames(1, "execute_input", {"code": "", "execution_count": 1}))
        writer._on_frames(kernel.stream(2, "1\n"))
        writer._on_frames(kernel.frames(3, "status", {"execution_state": "idle"}))
        return writer
    writer = asyncio.run(scenario())
    assert not writer.dirty and writer.writing is None
    assert "chspawner" not in notebook(root)["metadata"]


@pytest.mark.parametrize("protocol", ["v1.kernel.websocket.jupyter.org", None])
def test_the_connection_notes_the_cell_of_each_execute_request(tmp_path, protocol):
    """As JupyterLab 4 sends it (the binary v1 protocol) and as older
    clients do (JSON): the request's ``metadata.cellId`` is on record for
    the writer; other messages are left alone."""
    from jupyter_server.services.kernels.connection.base import serialize_msg_to_ws_v1

    from chspawner.persist.kernel_connection import ReplayingKernelConnection

    session = Session(key=b"secret")
    acks = tmp_path / f"{KERNEL}.acks"
    km = types.SimpleNamespace(acks_dir=str(acks))
    connection = types.SimpleNamespace(subprotocol=protocol, kernel_manager=km,
                                       session=types.SimpleNamespace(session="page-1"),
                                       log=logging.getLogger("test"))
    request = session.msg("execute_request", {"code": "1"}, metadata={"cellId": "cell-7"})
    other = session.msg("kernel_info_request", {})
    for msg in (request, other):
        if protocol:
            wire = serialize_msg_to_ws_v1(msg, "shell", session.pack)
        else:
            wire = json.dumps({**msg, "channel": "shell"}, default=str)
        ReplayingKernelConnection._note_cell(connection, wire)
    cells = CellMap(tmp_path / f"{KERNEL}.cells")
    assert cells.cell(request["header"]["msg_id"]) == "cell-7"
    assert cells.session(request["header"]["msg_id"]) == "page-1"
    assert cells.cell(other["header"]["msg_id"]) is None


def test_a_notebook_deleted_meanwhile_is_not_brought_back(setup):
    root, manager = setup

    async def scenario():
        kernel = Kernel(manager.km.session, manager.km.cell_map)
        writer = await writer_of(manager)
        (root / "n.ipynb").unlink()  # deleted while no page holds the kernel
        writer._on_frames(following(3))
        writer._on_frames(kernel.frames(1, "execute_input", {"code": "", "execution_count": 1}))
        writer._on_frames(kernel.stream(2, "1\n"))
        writer._on_frames(kernel.frames(3, "status", {"execution_state": "idle"}))
        await until(lambda: not writer.active, "the writer to stop")
    asyncio.run(scenario())
    assert not (root / "n.ipynb").exists()
