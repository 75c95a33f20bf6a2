"""Run the entropy stage of decoding on two cores.

constriction holds the GIL while it decodes, so threads cannot share that work. A forked child decodes half
of the segments into shared memory while the parent decodes the other half. The child runs only numpy and
constriction (never torch, whose thread pools are not safe across fork) and exits with os._exit; errors come
back as a one-line message in the shared error area. Nothing is pickled.
"""

from __future__ import annotations

import mmap
import os
from typing import Callable

ERROR_BYTES = 4096


class WorkerError(Exception):
    """An exception raised in the forked child: its class name and message."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def fork_available() -> bool:
    return hasattr(os, "fork") and (os.cpu_count() or 1) > 1


def split_run(items: list, work: Callable[[int], None], weights: list[int]) -> None:
    """Call work(i) for every index of `items`, about half of the weight in a forked child.

    `work` must write its results into memory shared with the parent (an mmap made before this call).
    Raises the first error from either side; the child's comes back as WorkerError.
    """
    order = sorted(range(len(items)), key=lambda i: -weights[i])
    mine, theirs, load = [], [], [0, 0]
    for i in order:  # greedy balance by weight
        side = 0 if load[0] <= load[1] else 1
        (mine if side == 0 else theirs).append(i)
        load[side] += weights[i]
    errors = mmap.mmap(-1, ERROR_BYTES)
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            for i in theirs:
                work(i)
        except BaseException as err:  # report anything, then leave without running the parent's cleanup
            message = f"{type(err).__name__}\n{err}".encode()[: ERROR_BYTES - 1]
            errors[: len(message)] = message
            code = 1
        os._exit(code)
    try:
        for i in mine:
            work(i)
    except BaseException:
        _reap(pid, kill=True)
        raise
    status = _reap(pid, kill=False)
    if status != 0:
        text = errors[:].split(b"\0", 1)[0].decode(errors="replace")
        kind, _, message = text.partition("\n")
        raise WorkerError(kind or "unknown", message or f"decoding worker exited with status {status}")


def _reap(pid: int, kill: bool) -> int:
    if kill:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
