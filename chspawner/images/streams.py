"""Byte streams for unpacking: decompression, hashing, counting.

A layer or tarball may be plain, gzip, xz, bzip2 or zstd; which one is told
by its first bytes, not its name. Decompression runs in a worker thread that
stays a few chunks ahead: zlib, lzma, bz2 and zstandard release the GIL while
they work, so decompressing and writing files overlap on two cores, as with
``tar -xz`` and its gzip process.
"""
from __future__ import annotations

import hashlib
import io
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

CHUNK = 1 << 20

MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


class StreamError(Exception):
    """A stream could not be read (corrupt compressed data, say)."""


def compression_of(head: bytes) -> str | None:
    for magic, name in MAGIC:
        if head.startswith(magic):
            return name
    return None


def _decompressor(kind: str, raw: BinaryIO) -> BinaryIO:
    if kind == "gzip":
        import gzip
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if kind == "xz":
        import lzma
        return lzma.LZMAFile(raw)
    if kind == "bzip2":
        import bz2
        return bz2.BZ2File(raw)
    import zstandard
    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)


class ThreadedReader(io.RawIOBase):
    """Reads ``source`` in a worker thread, a bounded number of chunks ahead.

    Errors in the worker are raised by ``read``; ``close`` stops the worker.
    """

    def __init__(self, source: BinaryIO, ahead: int = 8):
        super().__init__()
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._buffer = memoryview(b"")
        self._eof = False
        self._thread = threading.Thread(target=self._work, args=(source,),
                                        daemon=True, name="chspawner-decompress")
        self._thread.start()

    def _work(self, source: BinaryIO) -> None:
        try:
            while not self._stop.is_set():
                chunk = source.read(CHUNK)
                self._put(chunk)
                if not chunk:
                    return
        except Exception as e:  # handed to the reader, raised there
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if not self._buffer:
            if self._eof:
                return 0
            item = self._queue.get()
            if isinstance(item, Exception):
                self._eof = True
                raise StreamError(f"corrupt compressed data: {item}") from item
            if not item:
                self._eof = True
                return 0
            self._buffer = memoryview(item)
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        super().close()


class TapReader(io.RawIOBase):
    """Passes reads through, feeding every byte to ``tap`` (a hash's
    update, a progress counter)."""

    def __init__(self, source: BinaryIO, *taps: Callable[[bytes], object]):
        super().__init__()
        self._source = source
        self._taps = taps

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._source.read(len(b))
        n = len(data)
        b[:n] = data
        for tap in self._taps:
            tap(data)
        return n

    def drain(self) -> None:
        """Read to the end (so a hash covers all of it)."""
        while self.read(CHUNK):
            pass


class ForwardReader(io.RawIOBase):
    """A stream that can seek forward, by reading and dropping bytes.

    tarfile's streaming mode ("r|") copies its whole read buffer on every
    512-byte header it reads; its random-access mode ("r:") over this reader
    reads headers and data straight from a C-buffered stream, and all its
    seeks go forward. That difference is most of the cost of unpacking.
    """

    def __init__(self, source: BinaryIO):
        super().__init__()
        self._source = source
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self._position += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self._position + offset
        if whence not in (io.SEEK_SET, io.SEEK_CUR) or target < self._position:
            raise io.UnsupportedOperation("this stream only seeks forward")
        while self._position < target:
            if not self.read(min(target - self._position, CHUNK)):
                break
        return self._position


class Sha256Tap:
    """A sha256 fed by a :class:`TapReader`, checked against a digest."""

    def __init__(self):
        self.hash = hashlib.sha256()

    def __call__(self, data: bytes) -> None:
        self.hash.update(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


@contextmanager
def decompressed(raw: BinaryIO) -> Iterator[BinaryIO]:
    """A reader of ``raw``'s bytes, decompressed if they are compressed."""
    buffered = raw if hasattr(raw, "peek") else io.BufferedReader(raw, CHUNK)
    kind = compression_of(buffered.peek(8)[:8])
    if kind is None:
        yield buffered
        return
    reader = ThreadedReader(_decompressor(kind, buffered))
    try:
        yield io.BufferedReader(reader, CHUNK)
    finally:
        reader.close()
