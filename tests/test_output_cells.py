"""A kernel's IOPub messages folded into each notebook cell's outputs as
JupyterLab shows them and nbformat keeps them, within the admin's bounds
(chspawner.persist.output_cells: what the server writes into a notebook
while no browser holds its kernel)."""
from __future__ import annotations

import nbformat
import pytest

from chspawner.persist.notebook_outputs import pages_sent, WRITER_SESSION
from chspawner.persist.output_cells import CellOutputs, Limits, apply_overwrites
from chspawner.persist.records import AckFile

pytestmark = pytest.mark.unit


class Run:
    """Feeds a CellOutputs as a kernel would, numbering the messages."""

    def __init__(self, limits: Limits | None = None):
        self.cells = CellOutputs(limits)
        self.seq = 0

    def msg(self, kind: str, content: dict, parent: str = "r1", cell: str | None = "c1"):
        self.seq += 1
        return self.cells.add(self.seq, kind, parent, content, cell)

    def start(self, parent: str = "r1", cell: str = "c1", count: int = 1):
        return self.msg("execute_input", {"code": "", "execution_count": count}, parent, cell)

    def out(self, cell: str = "c1") -> list[dict]:
        return self.cells.nbformat_outputs(self.cells.cells[cell])


def valid(outputs: list[dict]) -> list[dict]:
    """The outputs pass nbformat's schema inside a code cell."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[
        nbformat.from_dict(o) for o in outputs])])
    nbformat.validate(nb)
    return outputs


def test_streams_merge_per_name_and_outputs_keep_their_kinds():
    r = Run()
    r.start(count=7)
    for i in range(1, 4):
        r.msg("stream", {"name": "stdout", "text": f"{i}\n"})
    r.msg("stream", {"name": "stderr", "text": "warning\n"})
    r.msg("stream", {"name": "stdout", "text": "4\n"})
    r.msg("display_data", {"data": {"text/plain": "<img>"}, "metadata": {}})
    r.msg("execute_result", {"data": {"text/plain": "42"}, "metadata": {},
                             "execution_count": 7})
    r.msg("error", {"ename": "ValueError", "evalue": "no", "traceback": ["tb"]})
    cell = r.msg("status", {"execution_state": "idle"})
    assert cell.ended and cell.execution_count == 7 and cell.from_start
    assert valid(r.out()) == [
        {"output_type": "stream", "name": "stdout", "text": "1\n2\n3\n"},
        {"output_type": "stream", "name": "stderr", "text": "warning\n"},
        {"output_type": "stream", "name": "stdout", "text": "4\n"},
        {"output_type": "display_data", "data": {"text/plain": "<img>"}, "metadata": {}},
        {"output_type": "execute_result", "data": {"text/plain": "42"}, "metadata": {},
         "execution_count": 7},
        {"output_type": "error", "ename": "ValueError", "evalue": "no", "traceback": ["tb"]},
    ]


def test_a_new_execution_of_a_cell_replaces_its_outputs_and_others_stay():
    r = Run()
    r.start("r1", "c1", 1)
    r.msg("stream", {"name": "stdout", "text": "old\n"}, "r1", "c1")
    r.start("r2", "c2", 2)
    r.msg("stream", {"name": "stdout", "text": "other\n"}, "r2", "c2")
    r.start("r3", "c1", 3)
    r.msg("stream", {"name": "stdout", "text": "new\n"}, "r3", "c1")
    assert r.out("c1") == [{"output_type": "stream", "name": "stdout", "text": "new\n"}]
    assert r.cells.cells["c1"].execution_count == 3
    assert r.out("c2")[0]["text"] == "other\n"
    # A message nobody can place (no cell known) changes nothing.
    assert r.msg("stream", {"name": "stdout", "text": "x"}, "r9", None) is None


def test_clear_output_now_and_at_the_next_output():
    r = Run()
    r.start()
    r.msg("stream", {"name": "stdout", "text": "a\n"})
    r.msg("clear_output", {"wait": False})
    assert r.out() == []
    r.msg("stream", {"name": "stdout", "text": "b\n"})
    r.msg("clear_output", {"wait": True})
    assert r.out()[0]["text"] == "b\n"  # still shown until something replaces it
    r.msg("stream", {"name": "stdout", "text": "c\n"})
    assert r.out() == [{"output_type": "stream", "name": "stdout", "text": "c\n"}]


def test_a_display_is_updated_in_place_wherever_it_was_shown():
    r = Run()
    r.start("r1", "c1")
    r.msg("display_data", {"data": {"text/plain": "0%"}, "metadata": {},
                           "transient": {"display_id": "bar"}}, "r1", "c1")
    r.start("r2", "c2", 2)
    r.msg("display_data", {"data": {"text/plain": "0%"}, "metadata": {},
                           "transient": {"display_id": "bar"}}, "r2", "c2")
    r.msg("stream", {"name": "stdout", "text": "after\n"}, "r2", "c2")
    r.msg("update_display_data", {"data": {"text/plain": "100%"}, "metadata": {},
                                  "transient": {"display_id": "bar"}}, "r2", None)
    assert {c.cell_id for c in r.cells.changed} == {"c1", "c2"}
    assert r.out("c1") == [{"output_type": "display_data",
                            "data": {"text/plain": "100%"}, "metadata": {}}]
    assert [o.get("data", o.get("text")) for o in r.out("c2")] == [
        {"text/plain": "100%"}, "after\n"]


@pytest.mark.parametrize("text, shown", [
    ("abc\rxy", "xyc"),
    ("10%\r20%\r30%\n", "30%\n"),
    ("ab\bc", "ac"),
    ("line\r\nnext", "line\nnext"),
    ("50%\r", "50%\r"),  # still open: the next piece overwrites it
])
def test_carriage_returns_and_backspaces_as_a_terminal_shows_them(text, shown):
    assert apply_overwrites(text) == shown


def test_a_progress_bar_printed_in_pieces_stays_one_line():
    r = Run()
    r.start()
    for pct in range(0, 101, 10):
        r.msg("stream", {"name": "stderr", "text": f"\r{pct:3d}%"})
    r.msg("stream", {"name": "stderr", "text": "\n"})
    assert r.out()[0]["text"] == "100%\n"


def test_beyond_the_outputs_per_cell_the_oldest_go_and_the_cell_says_so():
    r = Run(Limits(outputs_per_cell=5))
    r.start()
    for i in range(20):
        r.msg("display_data", {"data": {"text/plain": str(i)}, "metadata": {}})
    out = valid(r.out())
    assert [o["data"]["text/plain"] for o in out[1:]] == ["15", "16", "17", "18", "19"]
    notice = out[0]
    assert notice["name"] == "stderr" and notice["text"].startswith("[chspawner] ")
    assert "(15 whole output(s))" in notice["text"] and "at most 5 outputs" in notice["text"]


def test_beyond_the_bytes_per_cell_a_long_text_loses_its_first_lines():
    r = Run(Limits(bytes_per_cell=100))
    r.start()
    for i in range(1, 201):
        r.msg("stream", {"name": "stdout", "text": f"{i}\n"})
    notice, text = r.out()
    kept = text["text"].splitlines()
    assert kept[-1] == "200" and len(text["text"]) <= 100
    assert [int(n) for n in kept] == list(range(int(kept[0]), 201))  # whole lines, in order
    dropped = sum(len(f"{i}\n") for i in range(1, int(kept[0])))
    assert notice["text"].startswith(f"[chspawner] {dropped} bytes of this cell's earliest")


def test_beyond_the_bytes_per_kernel_the_least_recently_changed_cells_give_way():
    r = Run(Limits(bytes_per_kernel=300))
    r.start("r1", "c1")
    r.msg("display_data", {"data": {"text/plain": "a" * 100}, "metadata": {}}, "r1", "c1")
    r.start("r2", "c2", 2)
    for i in range(3):
        r.msg("display_data", {"data": {"text/plain": "b" * 100}, "metadata": {}}, "r2", "c2")
    assert r.cells.total_bytes <= 300
    assert r.out("c1")[0]["text"].startswith("[chspawner] ")  # c1 gave way, and says so
    assert len([o for o in r.out("c2") if o["output_type"] == "display_data"]) >= 1


def test_seeded_from_the_notebook_the_dropped_count_is_read_back():
    r = Run(Limits(outputs_per_cell=2))
    r.start()
    for i in range(4):
        r.msg("display_data", {"data": {"text/plain": str(i)}, "metadata": {}})
    saved = r.out()  # notice (2 dropped) + 2
    later = Run(Limits(outputs_per_cell=2))
    later.cells.seed("c1", "r1", saved, 1)
    later.seq = 100
    later.msg("display_data", {"data": {"text/plain": "4"}, "metadata": {}})
    out = later.out()
    assert "(3 whole output(s))" in out[0]["text"]
    assert [o["data"]["text/plain"] for o in out[1:]] == ["3", "4"]


def test_what_the_pages_were_sent_leaves_out_the_writers_own_session(tmp_path):
    assert pages_sent(tmp_path / "none") == 0
    for session, seq in (("page-1", 40), ("page-2", 55), (WRITER_SESSION, 1000)):
        ack = AckFile(tmp_path, session)
        ack.write(seq)
        ack.close()
    assert pages_sent(tmp_path) == 55
