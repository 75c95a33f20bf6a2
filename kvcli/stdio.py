"""Data on stdout: every byte arrives, or kvcli says it did not (one line, exit 8).

Python's own stdout can lose data silently. With PYTHONUNBUFFERED=1 `sys.stdout.buffer` is a raw FileIO whose
short writes (a file at its `ulimit -f`, a full non-blocking pipe) are dropped with no error; without it, a
non-blocking pipe (a reader such as Node sets O_NONBLOCK on it) raises BlockingIOError when full, and the flush at
interpreter exit fails again (exit 120). So everything kvcli prints as data goes through write_stdout, which
writes the file descriptor itself: it loops on short writes and waits on a full non-blocking pipe. Progress and
error lines go through write_stderr_text, for stderr is often the same pipe.
"""

from __future__ import annotations

import errno
import os
import select
import sys
from typing import Iterable, TextIO

from .errors import StorageError

# What a failed write most likely means, where strerror alone would puzzle.
REASONS = {
    errno.EPIPE: "the reader closed the pipe",
    errno.EFBIG: "the file size limit was reached (ulimit -f)",
    errno.ENOSPC: "no space left on device",
    errno.EBADF: "the descriptor is closed (>&-)",
}


def reason(err: OSError) -> str:
    return REASONS.get(err.errno, err.strerror or str(err))


class ShortWrite(OSError):
    """A write that failed after `done` bytes."""

    def __init__(self, err: OSError, done: int):
        super().__init__(err.errno, err.strerror)
        self.done = done


def write_stdout(data: bytes | Iterable[bytes], closed_reader_ok: bool = False) -> int:
    """Write all of `data` to stdout and return its length.

    A failure is a StorageError naming how many bytes got through, and stdout then points at /dev/null, so the
    flush at exit cannot fail again. `closed_reader_ok` is for text a person pipes into `head`: a reader that
    closed the pipe is then a BrokenPipeError, which the CLI ends quietly with exit 141.
    """
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    total = sum(len(c) for c in chunks)
    try:
        write_all(sys.stdout, chunks)
    except ShortWrite as err:
        abandon_stdout()
        if err.errno == errno.EPIPE and closed_reader_ok:
            raise BrokenPipeError(err.errno, err.strerror) from None
        raise StorageError(f"stdout: write failed after {err.done:,} of {total:,} bytes: {reason(err)}") from None
    return total


def write_stdout_text(text: str) -> None:
    """A line (or lines) of text for people and scripts; `| head` may close the pipe early."""
    write_stdout(text.encode("utf-8", errors="surrogateescape"), closed_reader_ok=True)


def write_stderr_text(text: str) -> None:
    """A progress or error line. A stderr that cannot take it is let be: there is nowhere left to say so."""
    try:
        write_all(sys.stderr, [text.encode("utf-8", errors="backslashreplace")])
    except (OSError, ValueError):
        pass


def write_all(stream: TextIO, chunks: list) -> None:
    """Every byte of `chunks` after whatever `stream` holds, on its file descriptor; ShortWrite on failure."""
    if stream is None:  # Python found the descriptor closed when it started
        raise ShortWrite(OSError(errno.EBADF, os.strerror(errno.EBADF)), 0)
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (CliRunner, a notebook): its own write is whole
        _write_stream(stream, chunks)
        return
    done = 0
    try:
        _flush(stream, fd)
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            while view:
                n = _write_some(fd, view)
                view, done = view[n:], done + n
    except OSError as err:
        raise ShortWrite(err, done) from None


def is_terminal(stream: TextIO | None) -> bool:
    """False for a closed standard stream too (None: `2>&-`)."""
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError):
        return False


def abandon_stdout() -> None:
    """Point stdout at /dev/null: nothing later, the flush at exit included, can fail on it or add to it."""
    try:
        fd = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass


def _write_some(fd: int, view: memoryview) -> int:
    """One write(2), waiting first whenever a non-blocking descriptor is full."""
    while True:
        try:
            return os.write(fd, view)
        except BlockingIOError:
            _wait_writable(fd)


def _wait_writable(fd: int) -> None:
    # No timeout: a blocking descriptor would wait for the reader just as long. Signals still interrupt it.
    select.select([], [fd], [])


def _flush(stream: TextIO, fd: int) -> None:
    """Whatever Python holds for the stream goes first, so the bytes keep their order."""
    while True:
        try:
            stream.flush()
            return
        except BlockingIOError:
            _wait_writable(fd)


def _write_stream(stream: TextIO, chunks: list) -> None:
    buffer = getattr(stream, "buffer", None)
    for chunk in chunks:
        if buffer is not None:
            buffer.write(chunk)
        else:
            stream.write(bytes(chunk).decode("utf-8", errors="surrogateescape"))
    stream.flush()
