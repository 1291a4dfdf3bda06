"""Progress of long image work, as events a caller can show.

Everything that takes a while (downloading layers, unpacking) reports
through one callback: ``progress(Progress(...))``. The CLI draws bars from
these events (:class:`ProgressBars`, on tqdm); the spawners will turn them
into spawn-page progress messages. A callback must be cheap and must not
raise; it may be called from a worker thread.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """One step's state: ``done`` of ``total`` units (None: unknown)."""

    step: str            # "resolve", "download", "unpack", "done"
    message: str
    done: int = 0
    total: int | None = None
    unit: str = "B"      # "B" for bytes, "" for items

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return min(self.done / self.total, 1.0)


ProgressCallback = Callable[[Progress], None]


def no_progress(_event: Progress) -> None:
    """The default callback: say nothing."""


class ByteCounter:
    """Adds up bytes from several workers (parallel layer downloads) into
    one step and reports the total, at most every ``every`` bytes."""

    def __init__(self, progress: ProgressCallback, step: str, message: str,
                 total: int | None, every: int = 1 << 20):
        self.progress, self.step, self.message = progress, step, message
        self.total, self.every = total, every
        self.done = 0
        self._reported = 0
        self._lock = threading.Lock()
        progress(Progress(step, message, 0, total))

    def add(self, count: int) -> None:
        with self._lock:
            self.done += count
            if self.done - self._reported < self.every:
                return
            self._reported = self.done
        self.progress(Progress(self.step, self.message, self.done, self.total))

    def finish(self) -> None:
        self.progress(Progress(self.step, self.message, self.done, self.total))


class Stalled(Exception):
    """Raised by :class:`StallWatch` when its work stopped making progress."""


class StallWatch:
    """A stall deadline for network work: ``async with StallWatch(s, n) as
    watch`` and ``watch.add(count)`` for each byte received; if a window of
    ``seconds`` passes in which fewer than ``min_bytes`` arrived, the task
    inside is cancelled and the ``async with`` raises :class:`Stalled`.

    A window starts when the work does and again each time ``min_bytes``
    have arrived, so a slow but steady transfer never trips it however long
    it takes, while a peer that trickles a byte now and then (which resets a
    per-read socket timeout forever) is stopped within ``seconds``.

    Not ``asyncio.timeout`` with a reschedule per chunk: the deadline is only
    looked at when it falls due, so counting a chunk costs an addition, and
    this also runs on Python 3.10.
    """

    def __init__(self, seconds: float, min_bytes: int):
        self.seconds, self.min_bytes = seconds, min_bytes
        self._got = 0
        self._fired = False

    async def __aenter__(self) -> StallWatch:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._window_start = self._loop.time()
        self._handle = self._loop.call_at(self._window_start + self.seconds, self._due)
        return self

    def add(self, count: int) -> None:
        self._got += count
        if self._got >= self.min_bytes:
            self._got = 0
            self._window_start = self._loop.time()

    def _due(self) -> None:
        deadline = self._window_start + self.seconds
        if self._loop.time() < deadline:  # progress since: look again then
            self._handle = self._loop.call_at(deadline, self._due)
            return
        self._fired = True
        self._task.cancel()

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        self._handle.cancel()
        if self._fired and exc_type is not None:
            # Our cancellation, or whatever the cancelled work turned it into.
            uncancel = getattr(self._task, "uncancel", None)  # Python >= 3.11
            if uncancel is not None:
                uncancel()
            raise Stalled(f"fewer than {self.min_bytes} bytes in {self.seconds:g} s")
        return False


class JsonProgress:
    """A progress callback that writes each event as one JSON line on
    stdout, for a program following the work (the spawners, which show
    it on the spawn page). Lines never interleave across threads."""

    def __init__(self):
        import sys
        self._out = sys.stdout
        self._lock = threading.Lock()

    def __call__(self, event: Progress) -> None:
        import json
        line = json.dumps({"step": event.step, "message": event.message,
                           "done": event.done, "total": event.total,
                           "fraction": event.fraction})
        with self._lock:
            print(line, file=self._out, flush=True)

    def __enter__(self) -> JsonProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass


class ProgressBars:
    """A progress callback that draws one tqdm bar per step on stderr (on a
    terminal, as tqdm decides; elsewhere it prints each step's message once).
    Steps can interleave (layers unpack while others download)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._bars: dict = {}

    def __call__(self, event: Progress) -> None:
        if self.quiet:
            return
        bar = self._bars.get(event.step)
        if bar is None:
            from tqdm import tqdm
            bar = self._bars[event.step] = tqdm(
                total=event.total, desc=event.message, unit=event.unit or "it",
                unit_scale=bool(event.unit), unit_divisor=1024, leave=True,
                disable=None, dynamic_ncols=True, position=len(self._bars))
            if bar.disable:  # not a terminal: one line per step
                import sys
                print(event.message, file=sys.stderr, flush=True)
        if event.total is not None and bar.total != event.total:
            bar.total = event.total
        bar.update(event.done - bar.n)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_size(n: float, decimals: int = 1, byte_unit: str = "B") -> str:
    """``n`` bytes in the largest of B, KiB, MiB, GiB that keeps it under
    1024 (whole bytes as they are; larger units with ``decimals``)."""
    for unit in (byte_unit, "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == byte_unit else f"{n:.{decimals}f} {unit}"
        n /= 1024
    return str(n)
