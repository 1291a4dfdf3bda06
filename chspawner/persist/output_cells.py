"""A kernel's output, as the notebook shows it: IOPub messages folded into
each cell's nbformat outputs, bounded.

:class:`CellOutputs` takes a kernel's IOPub messages, in order, each with
the notebook cell its execution came from, and keeps, per cell, the
outputs of the cell's latest execution as nbformat 4 output dicts, the way
JupyterLab's output area builds them: consecutive ``stream`` messages of
one name merged into one output (carriage returns and backspaces applied,
so a progress bar stays one line), ``display_data``, ``execute_result``
(with its execution count), ``error``, ``clear_output`` (``wait``: at the
next output) and ``update_display_data`` (every output shown with that
``display_id``, in any cell). Nothing here does I/O: the writer
(:mod:`chspawner.persist.notebook_outputs`) feeds it and saves what it
holds.

Bounded per cell (outputs and bytes) and for all cells together (bytes):
beyond a bound the oldest outputs go, and the cell's outputs then begin
with one saying, in words, how many went and why (``[chspawner] ...``).
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from chspawner.images.progress import format_size

#: How the words the notebook is told begin (the protocol's mark).
NOTICE = "[chspawner] "
_DROPPED = re.compile(r"^\[chspawner\] (\d+) bytes of this cell's earliest output"
                      r"(?: \((\d+) whole output\(s\)\))? were dropped")


def apply_overwrites(text: str) -> str:
    """``text`` as a terminal shows it: a backspace erases the character
    before it, a carriage return goes back to the line's start and what
    follows overwrites it. A line still open at the end that was sent
    back to its start keeps its carriage return, so that the next piece of
    the stream overwrites it as it should."""
    while True:  # a backspace after a character takes both
        shorter = re.sub(r"[^\n\x08]\x08", "", text)
        if len(shorter) == len(text):
            break
        text = shorter
    text = re.sub(r"\r+\n", "\n", text)
    if "\r" not in text:
        return text
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if "\r" not in line:
            continue
        shown = ""
        for piece in line.split("\r"):
            shown = piece + shown[len(piece):]
        lines[i] = shown + ("\r" if line.endswith("\r") else "")
    return "\n".join(lines)


def output_size(output: dict) -> int:
    """Roughly the bytes an output takes in the saved notebook."""
    if output.get("output_type") == "stream":
        return len(output.get("text", "").encode())
    return len(json.dumps(output, default=str).encode())


@dataclass
class Output:
    """One output of a cell: the nbformat dict, its size, and the
    ``display_id`` it was shown with (an update replaces it). A stream's
    text is kept in pieces, joined when written: appending to a long text
    message by message must not copy it each time."""
    data: dict
    size: int
    display_id: str | None = None
    chunks: deque[str] | None = None

    @classmethod
    def stream(cls, name: str, text: str = "") -> Output:
        return cls({"output_type": "stream", "name": name}, len(text.encode()),
                   chunks=deque([text]))

    def rendered(self) -> dict:
        if self.chunks is None:
            return dict(self.data)
        text = "".join(self.chunks)
        self.chunks = deque([text])  # (joined once, not at every write)
        return {**self.data, "text": text}


@dataclass
class Cell:
    """What one cell's latest execution has shown."""
    cell_id: str
    msg_id: str
    execution_count: int | None = None
    outputs: list[Output] = field(default_factory=list)
    #: a clear_output(wait=True) waiting for the next output
    clear_pending: bool = False
    #: what the bounds dropped (since the last clear): whole outputs, bytes
    dropped: int = 0
    dropped_bytes: int = 0
    #: words to put first (the start of the output could not be recovered)
    gap: str = ""
    #: the execution's start (its execute_input) was seen: outputs are complete
    from_start: bool = False
    ended: bool = False
    last_seq: int = 0
    #: the bytes of its outputs (kept up to date: bounds are checked per message)
    size: int = 0


@dataclass
class Limits:
    outputs_per_cell: int = 1000
    bytes_per_cell: int = 8 << 20
    bytes_per_kernel: int = 64 << 20


class CellOutputs:
    """The outputs of a kernel's executions, by notebook cell."""

    def __init__(self, limits: Limits | None = None):
        self.limits = limits or Limits()
        #: cell id -> its latest execution's outputs, least recently changed first
        self.cells: OrderedDict[str, Cell] = OrderedDict()
        #: execution (request msg_id) -> cell id
        self.executions: dict[str, str] = {}
        self.total_bytes = 0
        #: the cells the last add() changed (an update of a display: maybe several)
        self.changed: list[Cell] = []

    # -- in --

    def add(self, seq: int, msg_type: str, parent_id: str, content: dict,
            cell_id: str | None) -> Cell | None:
        """One IOPub message (``parent_id``: the msg_id of the request it
        answers; ``cell_id``: that request's cell, if known). The cell it
        changed, or None."""
        if msg_type == "update_display_data":
            return self._update_display(seq, content)
        if not cell_id:
            return None
        cell = self.cells.get(cell_id)
        if msg_type == "execute_input":
            # A new execution of the cell: JupyterLab cleared its outputs.
            self._forget(cell_id)
            cell = self._new(cell_id, parent_id)
            cell.from_start = True
            cell.execution_count = content.get("execution_count")
        elif cell is None or cell.msg_id != parent_id:
            # An execution whose start we did not see (see the writer).
            self._forget(cell_id)
            cell = self._new(cell_id, parent_id)
        cell.last_seq = max(cell.last_seq, seq)
        self.cells.move_to_end(cell_id)
        if msg_type == "stream":
            self._stream(cell, content.get("name", "stdout"), content.get("text", ""))
        elif msg_type in ("display_data", "execute_result", "error"):
            self._output(cell, msg_type, content)
        elif msg_type == "clear_output":
            if content.get("wait"):
                cell.clear_pending = True
            else:
                self._clear(cell)
        elif msg_type == "status" and content.get("execution_state") == "idle":
            cell.ended = True
        elif msg_type != "execute_input":
            return None
        self.changed = [cell]
        return cell

    def seed(self, cell_id: str, msg_id: str, outputs: list[dict],
             execution_count: int | None) -> Cell:
        """Start a cell's execution from what the notebook already holds of
        it (the outputs a writer saved before, its notice of dropped
        outputs read back as counts)."""
        self._forget(cell_id)
        cell = self._new(cell_id, msg_id)
        cell.execution_count = execution_count
        outputs = [dict(o) for o in outputs]
        if outputs and outputs[0].get("output_type") == "stream":
            found = _DROPPED.match("".join(outputs[0].get("text", "")))
            if found:
                cell.dropped_bytes, cell.dropped = int(found[1]), int(found[2] or 0)
                outputs.pop(0)
        for data in outputs:
            if data.get("output_type") == "stream":
                text = data.get("text", "")
                self._append(cell, Output.stream(data.get("name", "stdout"),
                                                 "".join(text) if isinstance(text, list)
                                                 else text))
            else:
                self._append(cell, Output(data, output_size(data)))
        return cell

    def mark_gap(self, cell: Cell, words: str) -> None:
        cell.gap = words

    # -- out --

    def nbformat_outputs(self, cell: Cell) -> list[dict]:
        """The cell's outputs as the notebook keeps them, words first."""
        notices = []
        if cell.gap:
            notices.append(_stderr(cell.gap))
        if cell.dropped_bytes:
            limits = self.limits
            notices.append(_stderr(
                f"{NOTICE}{cell.dropped_bytes} bytes of this cell's earliest output"
                + (f" ({cell.dropped} whole output(s))" if cell.dropped else "")
                + " were dropped from the saved notebook: "
                f"while no browser is open, the server keeps at most "
                f"{limits.outputs_per_cell} outputs and "
                f"{format_size(limits.bytes_per_cell, 0, 'bytes')} per cell, and "
                f"{format_size(limits.bytes_per_kernel, 0, 'bytes')} for all cells "
                "of a kernel. The newest follow."))
        return notices + [o.rendered() for o in cell.outputs]

    # -- internals --

    def _new(self, cell_id: str, msg_id: str) -> Cell:
        cell = self.cells[cell_id] = Cell(cell_id, msg_id)
        self.executions[msg_id] = cell_id
        return cell

    def _forget(self, cell_id: str) -> None:
        old = self.cells.pop(cell_id, None)
        if old is not None:
            self.total_bytes -= old.size
            self.executions.pop(old.msg_id, None)

    def _stream(self, cell: Cell, name: str, text: str) -> None:
        self._clear_if_pending(cell)
        last = cell.outputs[-1] if cell.outputs else None
        if last is None or last.chunks is None or last.data.get("name") != name:
            last = Output.stream(name)
            self._append(cell, last)
        self._extend(cell, last, text)
        self._bound(cell)

    def _extend(self, cell: Cell, output: Output, text: str) -> None:
        """Append to a stream's text. A carriage return or backspace acts
        on the line it is on only: that line (the text after the last
        newline) is taken back out and written again, overwritten."""
        chunks = output.chunks
        old = ""
        if "\r" in text or "\x08" in text or (chunks and chunks[-1].endswith("\r")):
            tail: list[str] = []
            while chunks:
                piece = chunks.pop()
                start = piece.rfind("\n") + 1
                if start:  # the line begins in this piece
                    chunks.append(piece[:start])
                    tail.append(piece[start:])
                    break
                tail.append(piece)
            old = "".join(reversed(tail))
            text = apply_overwrites(old + text)
        chunks.append(text)
        delta = len(text.encode()) - len(old.encode())
        output.size += delta
        cell.size += delta
        self.total_bytes += delta

    def _output(self, cell: Cell, kind: str, content: dict) -> None:
        self._clear_if_pending(cell)
        if kind == "error":
            data = {"output_type": "error", "ename": content.get("ename", ""),
                    "evalue": content.get("evalue", ""),
                    "traceback": list(content.get("traceback", []))}
        else:
            data = {"output_type": kind, "data": content.get("data", {}),
                    "metadata": content.get("metadata", {})}
            if kind == "execute_result":
                data["execution_count"] = content.get("execution_count")
        display_id = (content.get("transient") or {}).get("display_id")
        self._append(cell, Output(data, output_size(data), display_id or None))
        self._bound(cell)

    def _update_display(self, seq: int, content: dict) -> Cell | None:
        display_id = (content.get("transient") or {}).get("display_id")
        changed = None
        for cell in self.cells.values():
            for output in cell.outputs:
                if display_id and output.display_id == display_id:
                    self._resize(cell, output, {**output.data,
                                                "data": content.get("data", {}),
                                                "metadata": content.get("metadata", {})})
                    changed = cell
            if changed is cell:
                cell.last_seq = max(cell.last_seq, seq)
                self.changed.append(cell)
                self._bound(cell)
        return changed

    def _append(self, cell: Cell, output: Output) -> None:
        cell.outputs.append(output)
        cell.size += output.size
        self.total_bytes += output.size

    def _resize(self, cell: Cell, output: Output, data: dict) -> None:
        size = output_size(data)
        cell.size += size - output.size
        self.total_bytes += size - output.size
        output.data, output.size = data, size

    def _clear_if_pending(self, cell: Cell) -> None:
        if cell.clear_pending:
            self._clear(cell)

    def _clear(self, cell: Cell) -> None:
        self.total_bytes -= cell.size
        cell.size = 0
        cell.outputs.clear()
        cell.clear_pending = False
        cell.dropped = cell.dropped_bytes = 0

    def _bound(self, cell: Cell) -> None:
        """Drop the oldest outputs of ``cell`` beyond its bounds, then those
        of the least recently changed cells beyond the kernel's."""
        limits = self.limits
        while len(cell.outputs) > max(1, limits.outputs_per_cell):
            self._drop_first(cell)
        while cell.outputs and cell.size > limits.bytes_per_cell:
            if len(cell.outputs) == 1:
                self._trim_head(cell, cell.size - limits.bytes_per_cell)
                break
            self._drop_first(cell)
        for other in list(self.cells.values()):
            if self.total_bytes <= limits.bytes_per_kernel:
                break
            while other.outputs and self.total_bytes > limits.bytes_per_kernel:
                if len(other.outputs) == 1 and other is cell:
                    self._trim_head(cell, self.total_bytes - limits.bytes_per_kernel)
                    break
                self._drop_first(other)

    def _drop_first(self, cell: Cell) -> None:
        gone = cell.outputs.pop(0)
        cell.size -= gone.size
        self.total_bytes -= gone.size
        cell.dropped += 1
        cell.dropped_bytes += gone.size

    def _trim_head(self, cell: Cell, excess: int) -> None:
        """Cut ``excess`` bytes (or more, to a line's start) off the front
        of the cell's one output, when it is a stream; else drop it."""
        output = cell.outputs[0]
        if output.chunks is None:
            self._drop_first(cell)
            return
        chunks, cut, line_start = output.chunks, 0, True
        while chunks and (cut < excess or not line_start):
            raw = chunks[0].encode()
            # to the end of the line holding byte ``excess`` (or the next line's start)
            want = max(excess - cut, 1)
            end = raw.find(b"\n", want - 1) + 1 if want <= len(raw) else 0
            if not end:  # the piece goes whole
                chunks.popleft()
                cut += len(raw)
                line_start = raw.endswith(b"\n") if raw else line_start
                continue
            chunks[0] = raw[end:].decode(errors="ignore")
            cut += end
            line_start = True
        output.size -= cut
        cell.size -= cut
        self.total_bytes -= cut
        cell.dropped_bytes += cut  # (part of one: not a whole output)


def _stderr(text: str) -> dict[str, Any]:
    return {"output_type": "stream", "name": "stderr",
            "text": text if text.endswith("\n") else text + "\n"}
