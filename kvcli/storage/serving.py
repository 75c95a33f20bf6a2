"""Running the `kvcli serve-cache` app (kvcli.storage.server) under uvicorn, with what uvicorn 0.55 lacks against
slow clients: a bound on the time to send a request head (uvicorn bounds only the idle time between requests) and
on its size however it arrives, a reset for clients that stop reading, a connection limit below the open-file
limit that drops the oldest connections without a request head, and warnings rate-limited per kind (an attack or
a full file table used to write megabytes of tracebacks). docs/server.md, "Security model".
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time
from collections import defaultdict
from http import HTTPStatus

from .server import CUT, IO_TIMEOUT_S

log = logging.getLogger("kvcli.server")

HEADER_TIMEOUT_S = 10.0  # from connecting (or the end of the previous response) to a complete request head
MAX_HEAD = 16 << 10  # h11's limit on an incomplete request head, applied however the bytes arrive
HEAD_SLICE = 1 << 10  # h11 is fed this much at a time while a head is awaited: it sees MAX_HEAD pass (+1 KiB)
FD_RESERVE = 100  # open files kept free of connections: store reads in the thread pool, spools, logs
SHED_DELAY_S = 0.05  # past the connection limit, how long new connections get to be read before the oldest go
WARN_INTERVAL_S = 10.0  # at most one warning line per event class this often


class RateLimited:
    """At most one warning line per event class every `interval_s`; the next line of a class says how many like
    it were dropped meanwhile. Thousands of slow or refused connections must not become megabytes of log."""

    def __init__(self, interval_s: float = WARN_INTERVAL_S):
        self.interval_s = interval_s
        self.last: dict[str, float] = {}
        self.dropped: dict[str, int] = defaultdict(int)

    def allow(self, what: str) -> str | None:
        """None to drop this line, else the suffix it carries."""
        now = time.monotonic()
        if now - self.last.get(what, float("-inf")) < self.interval_s:
            self.dropped[what] += 1
            return None
        self.last[what] = now
        dropped = self.dropped.pop(what, 0)
        return f" ({dropped} more like it in the last {self.interval_s:g} s)" if dropped else ""

    def warn(self, what: str, message: str, *args) -> None:
        suffix = self.allow(what)
        if suffix is not None:
            log.warning(message + "%s", *args, suffix)

    def filter(self, record: logging.LogRecord) -> bool:
        """As a logging filter on uvicorn's and asyncio's loggers: their warnings and errors, one per message."""
        if record.levelno < logging.WARNING:
            return True
        suffix = self.allow(f"{record.name}:{record.msg}")
        if suffix:
            record.msg, record.args = f"{record.getMessage()}{suffix}", None
        return suffix is not None

    def loop_exception(self, loop, context: dict) -> None:
        """The event loop's errors (accept() at the open-file limit above all) as one line each, no traceback."""
        err = context.get("exception")
        what = f"{context.get('message', 'event loop error')}: {type(err).__name__ if err else ''}"
        self.warn(what, "%s%s", context.get("message", "event loop error"), f": {err}" if err else "")


class Cutter:
    """Handed to the app as scope["extensions"]["kvcli.cut"] by serve()'s protocol: ends the connection at once
    and keeps the first reason, which Observe logs. A reset, not a close: close() would first flush what waits in
    the buffers to a client that may never read it, and the kernel would hold megabytes per socket meanwhile."""

    def __init__(self, transport):
        self.transport, self.reason = transport, None

    def __call__(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        reset(self.transport)


def reset(transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already gone
    transport.abort()


def guarded_protocol(header_timeout_s: float, io_timeout_s: float, max_connections: int, warnings: RateLimited):
    """uvicorn's h11 protocol with what it lacks against slow clients (uvicorn 0.55 bounds only the idle time
    between requests): a request head must be complete `header_timeout_s` after connecting or after the previous
    response (a new connection that sends nothing counts too); a client that takes no response data for
    `io_timeout_s` is reset; past `max_connections` the oldest connection still without a request head is closed,
    so that a flood of slow connections cannot use up the open-file limit. Malformed requests get JSON errors."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    timeout_reply = error_reply(408, f"no complete request head within {header_timeout_s:g} s")

    class GuardedProtocol(H11Protocol):
        waiting: dict = {}  # connections still without a request head, oldest first (ordered like a queue)
        shedding = None  # the pending call of shed()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.head_timer = self.stall_timer = self.cutter = None
            self.await_head()
            if len(self.connections) > max_connections and not self.shedding:
                # Not now: a connection accepted in this burst has not been read yet, and may hold a whole request.
                GuardedProtocol.shedding = self.loop.call_later(SHED_DELAY_S, self.shed)

        def connection_lost(self, exc) -> None:
            self.stop_waiting()
            self.cancel_stall()
            super().connection_lost(exc)

        def await_head(self) -> None:
            self.stop_waiting()
            self.head_bytes = 0
            self.waiting[self] = None
            self.head_timer = self.loop.call_later(header_timeout_s, self.head_overdue)

        def stop_waiting(self) -> None:
            self.waiting.pop(self, None)
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def data_received(self, data: bytes) -> None:
            # h11 refuses a head still incomplete past MAX_HEAD, but a longer one that arrives in one read (up to
            # 256 KiB) would pass whole: feed it in slices while a head is awaited.
            while self.head_timer is not None and len(data) > HEAD_SLICE and not self.transport.is_closing():
                self.head_bytes += HEAD_SLICE
                super().data_received(data[:HEAD_SLICE])
                data = data[HEAD_SLICE:]
            if self.head_timer is not None:
                self.head_bytes += len(data)
            if not self.transport.is_closing():
                super().data_received(data)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request head arrived and its task is created, not yet started
                self.stop_waiting()
                self.cutter = Cutter(self.transport)
                self.cycle.scope.setdefault("extensions", {})[CUT] = self.cutter

        def on_response_complete(self) -> None:
            cycle = self.cycle
            super().on_response_complete()
            if self.cycle is cycle and not self.transport.is_closing():
                self.await_head()

        def head_overdue(self) -> None:
            self.head_timer = None
            self.waiting.pop(self, None)
            if self.transport.is_closing():
                return
            if self.head_bytes:
                self.transport.write(timeout_reply)
            self.transport.close()
            warnings.warn("header timeout", "closed a connection from %s: no complete request head within %g s",
                          (self.client or ("-",))[0], header_timeout_s)

        def shed(self) -> None:
            GuardedProtocol.shedding = None
            excess = len(self.connections) - max_connections
            victims = list(self.waiting)[:max(0, excess)]  # a connection in a request is never dropped
            for victim in victims:
                victim.stop_waiting()
                reset(victim.transport)
            if victims:
                warnings.warn("shed", "%d connections, the most the open-file limit allows: closed the %d oldest "
                              "without a complete request head", max_connections, len(victims))

        def pause_writing(self) -> None:
            super().pause_writing()
            if self.stall_timer is None:
                self.stall_timer = self.loop.call_later(io_timeout_s, self.reader_stalled)

        def resume_writing(self) -> None:
            super().resume_writing()
            self.cancel_stall()

        def cancel_stall(self) -> None:
            if self.stall_timer is not None:
                self.stall_timer.cancel()
                self.stall_timer = None

        def reader_stalled(self) -> None:
            self.stall_timer = None
            (self.cutter or Cutter(self.transport))(f"the client took no data for {io_timeout_s:g} s")

        def send_400_response(self, msg: str) -> None:
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                self.transport.write(error_reply(400, msg))
            self.transport.close()

    return GuardedProtocol


def error_reply(status: int, message: str) -> bytes:
    """A whole JSON error response as bytes, for answers the protocol gives before any request reaches the app."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def open_file_limit() -> int:
    """Raise the soft limit on open files to the hard one (shells often start at 1024) and return it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


def serve(app, sock, *, log_level: str = "info", header_timeout_s: float = HEADER_TIMEOUT_S,
          io_timeout_s: float = IO_TIMEOUT_S) -> None:
    """Run uvicorn on an already bound socket until SIGTERM or SIGINT, then finish open requests and return."""
    import signal

    import anyio.to_thread
    import uvicorn

    warnings = RateLimited()
    for name in ("uvicorn.error", "asyncio"):
        logging.getLogger(name).addFilter(warnings.filter)
    max_connections = max(16, open_file_limit() - FD_RESERVE)
    protocol = guarded_protocol(header_timeout_s, io_timeout_s, max_connections, warnings)
    config = uvicorn.Config(app, http=protocol, loop="asyncio", log_config=None, log_level=log_level,
                            access_log=False, timeout_keep_alive=5, h11_max_incomplete_event_size=MAX_HEAD, timeout_graceful_shutdown=10, server_header=False,
                            proxy_headers=False, lifespan="off")
    server = uvicorn.Server(config)

    async def run() -> None:
        asyncio.get_running_loop().set_exception_handler(warnings.loop_exception)
        # anyio imports its event-loop backend (21 modules) on the first hand-off to the thread pool. Done by the
        # first request, that import could meet a file table that a flood of connections has filled (EMFILE: a
        # 500 with a traceback); done here, before any connection, it cannot.
        await anyio.to_thread.run_sync(lambda: None)
        await server.serve(sockets=[sock])

    # uvicorn re-raises the signal that stopped it once it has shut down; a no-op handler makes a requested
    # stop an ordinary return (exit 0) instead of the CLI's "terminated" error.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        asyncio.run(run())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
