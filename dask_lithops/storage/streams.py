"""File-like views of object data: byte ranges of files and line-aligned partitions."""

from __future__ import annotations

import io

_BLOCK = 64 * 1024


class RangeReader(io.RawIOBase):
    """Bytes ``[first, last]`` of an open binary file (``last=None``: to the end)."""

    def __init__(self, f, first: int = 0, last: int | None = None):
        self._f = f
        self._f.seek(first)
        self._left = None if last is None else max(0, last - first + 1)

    def readable(self):
        return True

    def readinto(self, b):
        n = len(b) if self._left is None else min(len(b), self._left)
        if n == 0:
            return 0
        data = self._f.read(n)
        b[:len(data)] = data
        if self._left is not None:
            self._left -= len(data)
        return len(data)

    def close(self):
        self._f.close()
        super().close()


class PartitionStream(io.RawIOBase):
    """The lines of one partition of an object, as Lithops' partitioner defines them.

    ``raw`` yields the object's bytes from ``range_start`` on (a ranged GET).  The
    partition owns the bytes ``[start, start + chunk_size)`` widened to whole lines: a
    line belongs to the partition its first byte falls in.  So the first partial line is
    skipped (unless the byte before ``start`` is a newline), and the line that crosses the
    end is read to its newline.
    """

    def __init__(self, raw, range_start: int, start: int, chunk_size: int, newline: bytes = b"\n"):
        self._raw = raw
        self._newline = newline
        self._pending = b""
        self._pos = range_start  # absolute offset of the next byte taken from raw
        self._start = start
        self._end = start + chunk_size
        self._skipped = start == 0
        self._done = False

    def readable(self):
        return True

    def _take(self, n: int) -> bytes:
        if self._pending:
            data, self._pending = self._pending[:n], self._pending[n:]
        else:
            data = self._raw.read(n) or b""
        self._pos += len(data)
        return data

    def _skip_to_first_line(self) -> None:
        before = b""
        while self._pos < self._start:  # the ranged read starts at the byte before start
            before = self._take(self._start - self._pos)
            if not before:
                self._done = True
                return
        if before[-1:] == self._newline:
            return  # a line begins at start
        while True:  # the first line began in the previous partition: it owns it
            block = self._take(_BLOCK)
            if not block:
                self._done = True
                return
            i = block.find(self._newline)
            if i >= 0:
                self._push_back(block[i + 1:])
                break
        if self._pos >= self._end:  # no line begins inside this partition
            self._done = True

    def _push_back(self, rest: bytes) -> None:
        self._pending = rest + self._pending
        self._pos -= len(rest)

    def readinto(self, b):
        if not self._skipped:
            self._skipped = True
            self._skip_to_first_line()
        if self._done:
            return 0
        block = self._take(len(b))
        if not block:
            self._done = True
            return 0
        end_in_block = self._end - (self._pos - len(block))  # offset of the partition end in block
        if end_in_block <= len(block):
            # past the end: stop at the newline that ends the line holding byte end-1
            i = block.find(self._newline, max(0, end_in_block - 1))
            if i >= 0:
                self._push_back(block[i + 1:])
                block = block[:i + 1]
                self._done = True
            else:
                self._end = self._pos + 1  # still inside that line: keep reading to its newline
        n = len(block)
        b[:n] = block
        return n

    def close(self):
        close = getattr(self._raw, "close", None)
        if close:
            close()
        super().close()


def buffered(raw: io.RawIOBase) -> io.BufferedReader:
    """A file-like object with ``read``, ``readline``, iteration over lines."""
    return io.BufferedReader(raw, buffer_size=_BLOCK)
