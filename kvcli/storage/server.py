"""`kvcli serve-cache`: a Starlette app over one store (kvcli.store), stateless, so replicas scale out.

Reads: GET/HEAD /v1/caches/{key} (Range, ETag = key), listing, lookup, GET/HEAD /v1/dicts/{sha} (a dictionary).
Writes (--writable, bearer token): PUT validates the whole upload (magic, version, header, every CRC, key against
content, and that the store has the dictionary the file names) before the store makes it visible atomically;
PUT /v1/dicts/{sha} takes a dictionary whose bytes hash to its name and parse; DELETE; resumable uploads in parts
under /v1/uploads/{key}/{upload}, staged in the store itself (kvcli.store), so any replica takes the next part.
Plus /healthz, /metrics (Prometheus text) and /openapi.json, generated from the same route table (ENDPOINTS) as the
routes. docs/server.md.

kvcli.storage.serving runs it under uvicorn, with a protocol that bounds what slow clients can hold.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__
from ..container import dictionary
from ..container.keys import KEY_PATTERN
from ..errors import FormatError, InputError, KvcliError, StorageError, UsageError
from .index import MAX_CHUNKS, check_chunk_keys
from .store import UploadConflict, checked_key, open_data, stored_soundly, validate

log = logging.getLogger("kvcli.server")

DEFAULT_MAX_UPLOAD = 4 << 30
IO_TIMEOUT_S = 60.0  # longest wait for one chunk of a request body, or for a client to take any of a response
CLIENT_GONE = 499  # nginx's "client closed request": a response the client did not take whole
MAX_LOGGED_PATH = 300  # characters of a path in a log line (heads can be 16 KiB)
CUT = "kvcli.cut"  # the scope extension through which serving's protocol lets the app end a connection at once
STREAM_BLOCK = 1 << 20
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SWEEP_INTERVAL_S = 600.0  # how often a replica looks for abandoned uploads (on upload requests only)
_RANGE = re.compile(r"(\d*)-(\d*)")
_UNIT = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+)=(.*)", re.S)
_ETAG = re.compile(r'\s*(?:W/)?("[^"]*")\s*(?:,|\Z)')
HEX64 = "^[0-9a-f]{64}$"  # the OpenAPI pattern of keys, upload ids and digests
_OFFSET = re.compile(r"0|[1-9][0-9]{0,18}")
HTTP_STATUS = {UploadConflict: 409, UsageError: 400, InputError: 404, FormatError: 422, StorageError: 503}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# ---------------------------------------------------------------- metrics


class Metrics:
    """Counters and a latency histogram in Prometheus text format, kept in this process (per replica, as
    Prometheus scrapes them)."""

    def __init__(self):
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.errors: dict[str, int] = defaultdict(int)
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def observe(self, route: str, method: str, status: int, seconds: float, sent: int) -> None:
        self.requests[(route, method, status)] += 1
        self.bytes_sent += sent
        if status >= 500:
            self.errors[route] += 1
        self.latency_sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
                break
        else:
            self.buckets[-1] += 1

    def render(self) -> str:
        lines = ["# HELP kvcli_requests_total HTTP requests by route, method and status.",
                 "# TYPE kvcli_requests_total counter"]
        for (route, method, status), n in sorted(self.requests.items()):
            lines.append(f'kvcli_requests_total{{route="{route}",method="{method}",status="{status}"}} {n}')
        lines += ["# HELP kvcli_response_bytes_total Response body bytes sent.",
                  "# TYPE kvcli_response_bytes_total counter", f"kvcli_response_bytes_total {self.bytes_sent}",
                  "# HELP kvcli_upload_bytes_total Request body bytes received by uploads.",
                  "# TYPE kvcli_upload_bytes_total counter", f"kvcli_upload_bytes_total {self.bytes_received}",
                  "# HELP kvcli_errors_total Responses with a 5xx status, by route.",
                  "# TYPE kvcli_errors_total counter"]
        for route, n in sorted(self.errors.items()):
            lines.append(f'kvcli_errors_total{{route="{route}"}} {n}')
        lines += ["# HELP kvcli_request_seconds Time from request to the end of the response.",
                  "# TYPE kvcli_request_seconds histogram"]
        cumulative = 0
        for bound, n in zip(LATENCY_BUCKETS, self.buckets):
            cumulative += n
            lines.append(f'kvcli_request_seconds_bucket{{le="{bound}"}} {cumulative}')
        total = cumulative + self.buckets[-1]
        lines += [f'kvcli_request_seconds_bucket{{le="+Inf"}} {total}',
                  f"kvcli_request_seconds_sum {self.latency_sum:.6f}", f"kvcli_request_seconds_count {total}"]
        return "\n".join(lines) + "\n"


def printable(text: str) -> str:
    """Client-controlled text made safe for one log line: spaces, backslashes, control and non-ASCII characters
    escaped, so a path cannot forge a line (%0a) or write a NUL (%00)."""
    return "".join(c if " " < c < "\x7f" and c != "\\" else "\\x20" if c == " " else c.encode("unicode_escape").decode()
                   for c in text)


class Observe:
    """ASGI middleware: one log line and the metrics per request. A response that did not reach the client whole
    (the client stopped reading or went away, or the store failed while it streamed) is logged as one warning
    line with the reason and counted under what happened (499, 500), never under the status it started with."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        facts = {"status": 500, "sent": 0, "started": False, "complete": False, "gone": False}

        async def watched_receive():
            message = await receive()
            facts["gone"] |= message["type"] == "http.disconnect" and not facts["complete"]
            return message

        async def counted_send(message):
            if message["type"] == "http.response.start":
                facts["status"], facts["started"] = message["status"], True
            elif message["type"] == "http.response.body":
                facts["sent"] += len(message.get("body", b""))
                facts["complete"] = not message.get("more_body", False)
            await send(message)

        failure = None
        try:
            await self.app(scope, watched_receive, counted_send)
        except Exception as err:  # noqa: BLE001 - raised after the response started, so no handler could answer
            if not facts["started"]:
                raise
            # Starlette wraps an error it has a handler for in a RuntimeError once the response has started.
            failure = err.__cause__ if isinstance(err.__cause__, (KvcliError, OSError)) else err
        cutter = scope.get("extensions", {}).get(CUT)
        status, reason = facts["status"], None
        if failure is not None and not facts["complete"]:
            status, reason = 500, printable(str(failure) if isinstance(failure, (KvcliError, OSError))
                                            else f"{type(failure).__name__}: {failure}")
            if cutter is None:
                raise failure  # not under serve(): let the server close the connection
            cutter(reason)
            await asyncio.sleep(0)  # let the transport report the loss, so uvicorn sees no unfinished response
        elif cutter is not None and cutter.reason:
            status, reason = CLIENT_GONE, cutter.reason
        elif facts["started"] and (facts["gone"] or not facts["complete"]):
            status, reason = CLIENT_GONE, "the client went away"
        seconds = time.perf_counter() - started
        route = scope.get("route")
        method = scope["method"] if scope["method"] in METHODS else "OTHER"  # labels a client cannot multiply
        self.metrics.observe(route.path if route is not None else "other", method, status, seconds, facts["sent"])
        client = (scope.get("client") or ("-", 0))[0]
        path = printable(scope.get("raw_path", b"").decode("latin-1") or scope["path"])
        path = path if len(path) <= MAX_LOGGED_PATH else path[:MAX_LOGGED_PATH] + "..."
        line = f"{client} {scope['method']} {path} {status} {facts['sent']}B {seconds * 1000:.1f}ms"
        if failure is not None and not isinstance(failure, (KvcliError, OSError)):
            log.error("%s: %s", line, reason, exc_info=failure)  # a bug in kvcli: the traceback is wanted
        elif failure is not None and facts["complete"]:
            log.error("%s", line, exc_info=failure)
        elif reason:
            log.warning("%s: %s", line, reason)
        else:
            log.info("%s", line)


# ---------------------------------------------------------------- the app


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One byte range as [start, end) within `size`, or None for the whole file. A unit other than bytes (any
    case) is ignored and several ranges get the whole file, as RFC 9110 allows; a malformed or unsatisfiable
    byte range is a 416."""
    unit = _UNIT.fullmatch(header.strip()) if header is not None else None
    if header is None or (unit and unit.group(1).lower() != "bytes") or "," in header:
        return None
    match = _RANGE.fullmatch(unit.group(2).strip()) if unit else None
    if not match or match.groups() == ("", ""):
        raise HTTPError(416, f"unsupported Range {header[:80]!r}", {"Content-Range": f"bytes */{size}"})
    first, last = match.groups()
    if first == "":  # the last N bytes
        start, end = max(0, size - int(last)), size
    else:
        start, end = int(first), size if last == "" else min(size, int(last) + 1)
    if start >= size or start >= end:
        raise HTTPError(416, f"Range {header[:80]!r} is outside the {size}-byte file",
                        {"Content-Range": f"bytes */{size}"})
    return start, end


def none_match(header: str | None, etag: str) -> bool:
    """If-None-Match (RFC 9110 13.1.2): `*`, or a list of entity tags compared weakly (W/ ignored)."""
    if header is None:
        return False
    if header.strip() == "*":
        return True
    pos, tags = 0, []
    while pos < len(header):
        match = _ETAG.match(header, pos)
        if not match:
            return False  # not a list of entity tags: the condition is not met, send the file
        tags.append(match.group(1))
        pos = match.end()
    return etag in tags


@dataclass(frozen=True)
class Settings:
    """What one server was started with; handlers read it from `request.app.state.settings`."""

    store: object
    secret: bytes  # the bearer token, or b"" for none
    writable: bool
    read_token: bool
    max_upload: int
    io_timeout_s: float
    spool_dir: str | None


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def check_auth(request: Request, required: bool) -> None:
    if not required:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise HTTPError(401, "a bearer token is required", {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), settings_of(request).secret):
        raise HTTPError(403, "the bearer token is wrong")


def check_readable(request: Request) -> None:
    check_auth(request, settings_of(request).read_token)


def check_writable(request: Request) -> None:
    if not settings_of(request).writable:
        raise HTTPError(405, "this server is read-only (start it with --writable)", {"Allow": "GET, HEAD"})
    check_auth(request, True)


def path_key(request: Request) -> str:
    key = request.path_params["key"]
    if not KEY_PATTERN.fullmatch(key):
        raise HTTPError(400, "a cache key is 64 lowercase hex digits")
    return key


def hex_param(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    if value is not None and not KEY_PATTERN.fullmatch(value):
        raise HTTPError(400, f"{name} must be 64 lowercase hex digits")
    return value


# ---------------------------------------------------------------- handlers


async def get_cache(request: Request) -> Response:
    check_readable(request)
    key = path_key(request)
    store = settings_of(request).store
    size = await run_in_threadpool(store.size, key)
    if size is None:
        raise HTTPError(404, f"no cache {key}")
    headers = {"ETag": f'"{key}"', "Accept-Ranges": "bytes", "Cache-Control": "public, max-age=31536000, immutable"}
    if none_match(request.headers.get("if-none-match"), headers["ETag"]):
        return Response(status_code=304, headers=headers)
    span = parse_range(request.headers.get("range"), size)
    if span and request.headers.get("if-range", headers["ETag"]).strip() != headers["ETag"]:
        span = None  # a range of some other version (or a date, or a weak tag) is no use to the client: send all
    start, end = span or (0, size)
    headers["Content-Length"] = str(end - start)
    status = 206 if span else 200
    if span:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type="application/octet-stream")

    async def body():
        offset = start
        while offset < end:
            n = min(STREAM_BLOCK, end - offset)
            chunk = await run_in_threadpool(store.read, key, offset, n)
            if len(chunk) != n:  # truncated under us: Observe cuts the connection, the client sees a short body
                raise StorageError(f"{key}: changed while being served")
            yield chunk
            offset += n

    return StreamingResponse(body(), status_code=status, headers=headers, media_type="application/octet-stream")


async def receive_body(request: Request, cap: int, what: str):
    """The request body in chunks, refused (413) past `cap` bytes, declared or streamed, and (408) when the
    client stalls; a body shorter than its Content-Length is a 400."""
    timeout = settings_of(request).io_timeout_s
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > cap):
        raise HTTPError(413, f"{what} are limited to {cap} bytes")
    received = 0
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), timeout)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise HTTPError(408, f"no upload data for {timeout:g} s") from None
        except ClientDisconnect:
            raise HTTPError(400, "the client went away during the upload") from None
        received += len(chunk)
        if received > cap:
            raise HTTPError(413, f"{what} are limited to {cap} bytes")
        yield chunk
    request.app.state.metrics.bytes_received += received
    if declared is not None and received != int(declared):
        raise HTTPError(400, f"the upload ended after {received} of {declared} bytes")


def stored_response(request: Request, key: str, size: int, existed: bool) -> Response:
    return JSONResponse({"key": key, "url": str(request.url_for("cache", key=key)), "bytes": size},
                        status_code=200 if existed else 201)


def keep_or_put(store, key: str, spool) -> int | None:
    """First writer wins: the ETag is the key and responses say `immutable`, so a key's bytes must never change
    (equal keys may carry other bytes: another created_at, another batching). A valid upload of a stored key
    leaves the stored file; returns its size, or None when this upload was stored."""
    try:  # exclusive: two concurrent PUTs of a key store one file, not both
        store.put(key, spool, exclusive=keeps(store, key))
    except FileExistsError:
        return store.size(key)
    return None


def kept_size(store, key: str) -> int | None:
    """The size of a sound file stored under `key`, which uploads of the key leave in place."""
    size = store.size(key)
    return size if size is not None and stored_soundly(store, key) else None


def keeps(store, key: str) -> bool:
    """Whether an upload of `key` must leave the stored file: unless it is damaged or another cache's (a truncated
    copy, a file put there by hand), which no client can have read as the key's bytes and push means to mend."""
    return store.size(key) is None or kept_size(store, key) is not None


async def put_cache(request: Request) -> Response:
    check_writable(request)
    key = path_key(request)
    settings = settings_of(request)
    with tempfile.TemporaryFile(dir=settings.spool_dir) as spool:  # unlinked: a killed server leaves nothing
        received = 0
        async for chunk in receive_body(request, settings.max_upload, "uploads"):
            received += len(chunk)
            await run_in_threadpool(spool.write, chunk)
        await run_in_threadpool(spool.flush)
        kept = await run_in_threadpool(keep_or_put, settings.store, key, spool)
    return stored_response(request, key, received if kept is None else kept, kept is not None)


def path_sha(request: Request) -> str:
    sha = request.path_params["sha"]
    if not KEY_PATTERN.fullmatch(sha):
        raise HTTPError(400, "a dictionary is named by 64 lowercase hex digits (the SHA-256 of its bytes)")
    return sha


async def get_dictionary(request: Request) -> Response:
    check_readable(request)
    sha = path_sha(request)
    st = settings_of(request).store
    headers = {"ETag": f'"{sha}"', "Cache-Control": "public, max-age=31536000, immutable"}
    if request.method == "HEAD" or none_match(request.headers.get("if-none-match"), headers["ETag"]):
        size = await run_in_threadpool(st.dictionary_size, sha)
        if size is None:
            raise HTTPError(404, f"no dictionary {sha}")
        if request.method != "HEAD":
            return Response(status_code=304, headers=headers)
        return Response(headers={**headers, "Content-Length": str(size)}, media_type="application/octet-stream")
    data = await run_in_threadpool(st.read_dictionary, sha)
    if data is None:
        raise HTTPError(404, f"no dictionary {sha}")
    return Response(data, headers=headers, media_type="application/octet-stream")


async def put_dictionary(request: Request) -> Response:
    """Content-addressed: the bytes must hash to the name and parse as a dictionary before the store keeps them."""
    check_writable(request)
    sha = path_sha(request)
    settings = settings_of(request)
    cap = min(dictionary.MAX_FILE_BYTES, settings.max_upload)
    data = b"".join([chunk async for chunk in receive_body(request, cap, "dictionaries")])
    found = await run_in_threadpool(dictionary.parse, data, sha, f"dictionary {sha}")
    written = await run_in_threadpool(settings.store.put_dictionary, found)
    return JSONResponse({"sha256": sha, "url": str(request.url_for("dictionary", sha=sha)), "bytes": len(data)},
                        status_code=201 if written else 200)


async def delete_cache(request: Request) -> Response:
    check_writable(request)
    key = path_key(request)
    if not await run_in_threadpool(settings_of(request).store.delete, key):
        raise HTTPError(404, f"no cache {key}")
    return Response(status_code=204)


# -- resumable uploads: parts staged in the store (kvcli.store), so every replica sees them


async def upload_ids(request: Request) -> tuple[str, str]:
    check_writable(request)
    key = path_key(request)
    upload = request.path_params["upload"]
    if not KEY_PATTERN.fullmatch(upload):
        raise HTTPError(400, "an upload id is 64 lowercase hex digits (SHA-256 of the file's header bytes)")
    state = request.app.state
    if time.monotonic() - state.last_sweep > SWEEP_INTERVAL_S:
        state.last_sweep = time.monotonic()
        try:
            swept = await run_in_threadpool(state.settings.store.sweep_uploads)
            if swept:
                log.info("swept %d abandoned upload(s)", swept)
        except StorageError as err:
            log.warning("could not sweep abandoned uploads: %s", err)
    return key, upload


async def upload_state(request: Request) -> Response:
    key, upload = await upload_ids(request)
    settings = settings_of(request)
    state = await run_in_threadpool(settings.store.upload_state, key, upload)
    return JSONResponse({**state, "max_bytes": settings.max_upload})


async def abort_upload(request: Request) -> Response:
    key, upload = await upload_ids(request)
    if not await run_in_threadpool(settings_of(request).store.abort_upload, key, upload):
        raise HTTPError(404, f"no upload {upload} of {key}")
    return Response(status_code=204)


async def put_part(request: Request) -> Response:
    key, upload = await upload_ids(request)
    settings = settings_of(request)
    text = request.path_params["offset"]
    if not _OFFSET.fullmatch(text):
        raise HTTPError(400, f"a part offset is a byte count, not {text[:40]!r}")
    offset, part, cap = int(text), settings.store.part_bytes, settings.max_upload
    if offset % part:
        raise HTTPError(400, f"a part starts at a multiple of {part} bytes, not at {offset}")
    if offset >= cap:
        raise HTTPError(413, f"uploads are limited to {cap} bytes")
    data = bytearray()
    async for chunk in receive_body(request, min(part, cap - offset), "parts at this offset"):
        data += chunk
    await run_in_threadpool(settings.store.put_part, key, upload, offset, bytes(data))
    return JSONResponse({"key": key, "upload": upload, "offset": offset, "bytes": len(data)})


async def complete_upload(request: Request) -> Response:
    key, upload = await upload_ids(request)
    settings = settings_of(request)
    text = request.query_params.get("bytes", "")
    if not _OFFSET.fullmatch(text):
        raise HTTPError(400, "give the file's size as ?bytes=N")
    size = int(text)
    if size > settings.max_upload:
        raise HTTPError(413, f"uploads are limited to {settings.max_upload} bytes")
    store = settings.store
    try:
        stored = await run_in_threadpool(complete_or_keep, store, key, upload, size)
    except (InputError, UploadConflict):
        # Two pushes of one file share its upload id: the other's completion took the parts this one completes.
        if await run_in_threadpool(kept_size, store, key) is None:
            raise
        stored = None
    if stored is None:  # first writer wins, as in keep_or_put; parts staged meanwhile are not needed
        await run_in_threadpool(store.abort_upload, key, upload)
        return stored_response(request, key, await run_in_threadpool(store.size, key), True)
    return stored_response(request, stored, size, False)


def complete_or_keep(store, key: str, upload: str, size: int) -> str | None:
    """The key, completed from the staged parts; None when a sound file of the key is stored (it stays)."""
    if kept_size(store, key) is not None:
        store.mend_entries(key)
        return None
    try:
        return store.complete_upload(key, upload, size, exclusive=keeps(store, key))
    except FileExistsError:
        return None


async def list_caches(request: Request) -> Response:
    check_readable(request)
    model = hex_param(request, "model")
    return JSONResponse({"caches": await run_in_threadpool(settings_of(request).store.list, model)})


async def lookup(request: Request) -> Response:
    check_readable(request)
    wanted = {name: hex_param(request, name) for name in ("model", "tokens_sha256", "source_sha256")}
    if not (wanted["tokens_sha256"] or wanted["source_sha256"]):
        raise HTTPError(400, "give tokens_sha256 or source_sha256")
    store = settings_of(request).store
    return JSONResponse({"caches": await run_in_threadpool(lambda: store.lookup(**wanted))})


PREFIX_BODY_BYTES = 80 * MAX_CHUNKS  # {"chunk_keys": [...]}: 67 bytes a key, with room for spaces


async def prefix_lookup(request: Request) -> Response:
    """The batch lookup of the prefix index: every chunk key of a prompt in one request, the verified hits of its
    longest stored prefix in the answer (index.best_hits)."""
    check_readable(request)
    body = b"".join([chunk async for chunk in receive_body(request, PREFIX_BODY_BYTES, "prefix lookups")])
    try:
        keys = json.loads(body)["chunk_keys"]
    except (ValueError, TypeError, KeyError, RecursionError):  # RecursionError: arrays nested past Python's stack
        raise HTTPError(400, 'the body must be a JSON object {"chunk_keys": [...]}') from None
    check_chunk_keys(keys)
    hits = await run_in_threadpool(settings_of(request).store.prefix_hits_for, keys)
    return JSONResponse({"hits": [hit.to_json() for hit in hits]})


async def healthz(request: Request) -> Response:
    settings = settings_of(request)
    await run_in_threadpool(settings.store.probe)  # a dead mount or an unreachable bucket is a 503
    return JSONResponse({"status": "ok", "writable": settings.writable, "version": __version__})


async def metrics_text(request: Request) -> Response:
    return PlainTextResponse(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


async def openapi(request: Request) -> Response:
    settings = settings_of(request)
    return JSONResponse(openapi_document(settings.max_upload, settings.store.part_bytes))


async def on_http_error(request: Request, err: HTTPError) -> Response:
    return error_response(err.status, str(err), err.headers)


async def on_starlette_error(request: Request, err: StarletteHTTPException) -> Response:
    """The router's own answers (404 for an unknown path, 405 with Allow for an unknown method) as JSON too."""
    return error_response(err.status_code, err.detail, err.headers)


async def on_kvcli_error(request: Request, err: KvcliError) -> Response:
    status = next((code for cls, code in HTTP_STATUS.items() if isinstance(err, cls)), 500)
    if status >= 500:
        log.error("%s %s: %s", request.method, printable(request.url.path), printable(str(err)))
    return error_response(status, str(err))


# ---------------------------------------------------------------- the route table


@dataclass(frozen=True)
class Endpoint:
    """One method on one path: its handler and what the OpenAPI document says of it. `responses` maps a status
    to a description and optionally a content kind (a schema name, "octets", "text" or "error"); `summary` may
    name {max_upload} and {part_bytes}."""

    method: str
    path: str
    handler: Callable[[Request], Awaitable[Response]]
    summary: str
    responses: dict[str, tuple[str, str | None]]
    write: bool = False  # needs --writable and the bearer token
    body: bool = False  # takes the file's bytes
    json_body: str | None = None  # takes a JSON object of this schema
    params: tuple[dict, ...] = ()  # query and header parameters


ERROR = ("Error", "error")
READ_ERRORS = {"400": ERROR, "401": ERROR, "403": ERROR, "404": ERROR}
WRITE_ERRORS = {**READ_ERRORS, "405": ERROR}
STORED = {"201": ("Stored", "Stored"), "200": ("Already stored: the stored file stays (first writer wins)", "Stored")}


def hex_query(name: str, text: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": {"type": "string", "pattern": HEX64},
            "description": text}


ENDPOINTS = (
    Endpoint("GET", "/v1/caches/{key}", get_cache, "Read a cache, or one byte range of it",
             {"200": ("The whole file", "octets"), "206": ("The requested range", "octets"),
              "304": ("If-None-Match matched the ETag (the key)", None), "416": ERROR, **READ_ERRORS},
             params=({"name": "Range", "in": "header", "required": False, "schema": {"type": "string"},
                      "description": "bytes=START-END, bytes=START- or bytes=-N; several ranges get the whole file"},)),
    Endpoint("HEAD", "/v1/caches/{key}", get_cache, "Size and ETag of a cache",
             {"200": ("Exists", None), "206": ("Range accepted", None), **READ_ERRORS}),
    Endpoint("PUT", "/v1/caches/{key}", put_cache,
             "Upload a cache (at most {max_upload} bytes); validated before it is visible",
             {**STORED, "408": ERROR, "413": ERROR,
              "422": ("Corrupt file, key does not match the content, or the store lacks the dictionary the file "
                      "names (PUT /v1/dicts/{sha} first)", "error"), **WRITE_ERRORS},
             write=True, body=True),
    Endpoint("DELETE", "/v1/caches/{key}", delete_cache, "Delete a cache", {"204": ("Deleted", None), **WRITE_ERRORS},
             write=True),
    Endpoint("GET", "/v1/uploads/{key}/{upload}", upload_state,
             "The parts of a resumable upload already staged (none yet: an empty list)",
             {"200": ("Staged parts", "Upload"), **WRITE_ERRORS}, write=True),
    Endpoint("DELETE", "/v1/uploads/{key}/{upload}", abort_upload, "Abort an upload: drop its staged parts",
             {"204": ("Dropped", None), **WRITE_ERRORS}, write=True),
    Endpoint("POST", "/v1/uploads/{key}/{upload}/complete", complete_upload,
             "Assemble the staged parts, validate them as PUT /v1/caches/{{key}} does, store the cache atomically "
             "and drop the parts",
             {**STORED, "409": ("Parts missing: send them and complete again", "error"), "413": ERROR,
              "422": ("Corrupt file, or key or upload id does not match the content: the staged parts are dropped; "
                      "or the store lacks the dictionary the file names: the parts stay, PUT /v1/dicts/{sha} and "
                      "complete again", "error"), **WRITE_ERRORS},
             write=True, params=({"name": "bytes", "in": "query", "required": True,
                                  "schema": {"type": "integer", "minimum": 0}, "description": "File size"},)),
    Endpoint("PUT", "/v1/uploads/{key}/{upload}/{offset}", put_part,
             "Stage one part (1 to {part_bytes} bytes); sending it again replaces it",
             {"200": ("Staged", None), "408": ERROR, "413": ERROR, **WRITE_ERRORS}, write=True, body=True),
    Endpoint("GET", "/v1/dicts/{sha}", get_dictionary, "Read a dictionary (docs/format.md, \"Dictionaries\")",
             {"200": ("The .kvd file", "octets"), "304": ("If-None-Match matched the ETag (the SHA-256)", None),
              **READ_ERRORS}),
    Endpoint("HEAD", "/v1/dicts/{sha}", get_dictionary, "Size and ETag of a dictionary",
             {"200": ("Exists", None), **READ_ERRORS}),
    Endpoint("PUT", "/v1/dicts/{sha}", put_dictionary,
             "Store a dictionary, before the first cache that names it; its bytes must hash to {{sha}} and parse",
             {"201": ("Stored", "StoredDictionary"), "200": ("Already stored", "StoredDictionary"), "408": ERROR,
              "413": ERROR, "422": ("Not a dictionary, or its SHA-256 is not the name", "error"), **WRITE_ERRORS},
             write=True, body=True),
    Endpoint("GET", "/v1/caches", list_caches, "List caches with metadata from their headers",
             {"200": ("Matching caches", "Listing"), "400": ERROR, "401": ERROR, "403": ERROR},
             params=(hex_query("model", "weights digest of the model"),)),
    Endpoint("GET", "/v1/lookup", lookup, "Find caches by token or source digest",
             {"200": ("Matching caches", "Listing"), "400": ERROR, "401": ERROR, "403": ERROR},
             params=(hex_query("model", "weights digest of the model"),
                     hex_query("tokens_sha256", "SHA-256 of the token ids as u32 little-endian"),
                     hex_query("source_sha256", "SHA-256 of the source document"))),
    Endpoint("POST", "/v1/prefix", prefix_lookup,
             "Find the longest stored prefix of a prompt from its chunk keys (docs/format.md, \"Prefix index\"); "
             "every file that holds it, verified against its header, best first",
             {"200": ("The hits, all of one length; none: an empty list", "PrefixHits"), "400": ERROR, "401": ERROR,
              "403": ERROR, "408": ERROR, "413": ERROR}, json_body="PrefixLookup"),
    Endpoint("GET", "/healthz", healthz, "Liveness, with a touch of the store", {"200": ("OK", None), "503": ERROR}),
    Endpoint("GET", "/metrics", metrics_text, "Prometheus metrics", {"200": ("Text exposition format", "text")}),
    Endpoint("GET", "/openapi.json", openapi, "This document", {"200": ("OpenAPI", None)}),
)
ROUTE_NAMES = {"/v1/caches/{key}": "cache", "/v1/dicts/{sha}": "dictionary"}  # for url_for
METHODS = {e.method for e in ENDPOINTS}


def dispatcher(handlers: dict[str, Callable]) -> Callable:
    async def endpoint(request: Request) -> Response:
        return await handlers[request.method](request)

    return endpoint


def routes(endpoints=ENDPOINTS) -> list[Route]:
    """One Route per path, so a wrong method answers 405 with every method the path takes in Allow."""
    by_path: dict[str, dict[str, Callable]] = {}
    for e in endpoints:
        by_path.setdefault(e.path, {})[e.method] = e.handler
    return [Route(path, dispatcher(handlers), methods=list(handlers), name=ROUTE_NAMES.get(path))
            for path, handlers in by_path.items()]


def create_app(store, token: str | None = None, writable: bool = False, read_token: bool = False,
               max_upload: int = DEFAULT_MAX_UPLOAD, io_timeout_s: float = IO_TIMEOUT_S,
               spool_dir: str | None = None) -> Observe:
    """The ASGI app. Writes need `writable` and the bearer `token`; reads need it too when `read_token`."""
    if writable and not token:
        raise UsageError("a writable server needs a bearer token (--token-file)")
    if read_token and not token:
        raise UsageError("--read-token needs a bearer token (--token-file)")
    app = Starlette(routes=routes(), exception_handlers={HTTPError: on_http_error, KvcliError: on_kvcli_error,
                                                         StarletteHTTPException: on_starlette_error})
    app.router.redirect_slashes = False  # a 307 to whatever Host the client sent is no use: a trailing / is a 404
    app.state.settings = Settings(store, token.encode() if token else b"", writable, read_token, max_upload,
                                  io_timeout_s, spool_dir)
    app.state.metrics = Metrics()
    app.state.last_sweep = float("-inf")
    return Observe(app, app.state.metrics)


# ---------------------------------------------------------------- OpenAPI, from the route table


PATH_PARAMS = {
    "key": {"schema": {"type": "string", "pattern": HEX64}, "description": "Cache key (docs/format.md)"},
    "upload": {"schema": {"type": "string", "pattern": HEX64},
               "description": "Upload id: SHA-256 of the file's bytes before its first segment (preamble and header)"},
    "sha": {"schema": {"type": "string", "pattern": HEX64},
            "description": "Dictionary name: the SHA-256 of its bytes (docs/format.md, \"Dictionaries\")"},
    "offset": {"schema": {"type": "integer", "minimum": 0}, "multiple_of": "part_bytes",
               "description": "Byte offset of the part, a multiple of {part_bytes}"},
}
SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Entry": {"type": "object", "properties": {
        "key": {"type": "string"}, "bytes": {"type": "integer"},
        "model": {"type": "string", "description": "weights digest of the model"},
        "model_name": {"type": "string"}, "architecture": {"type": "string"},
        "dtype": {"type": "string"}, "tokens": {"type": "integer"},
        "tokens_sha256": {"type": "string", "description": "SHA-256 of the token ids as u32 LE"},
        "codec": {"type": "string"}, "quality": {"type": "string", "description": "The --quality preset"},
        "created_at": {"type": ["string", "null"]},
        "source_sha256": {"type": ["string", "null"]}}},
    "Listing": {"type": "object", "required": ["caches"], "properties": {
        "caches": {"type": "array", "items": {"$ref": "#/components/schemas/Entry"}}}},
    "Stored": {"type": "object", "required": ["key", "url", "bytes"], "properties": {
        "key": {"type": "string"}, "url": {"type": "string"}, "bytes": {"type": "integer"}}},
    "StoredDictionary": {"type": "object", "required": ["sha256", "url", "bytes"], "properties": {
        "sha256": {"type": "string"}, "url": {"type": "string"}, "bytes": {"type": "integer"}}},
    "PrefixLookup": {"type": "object", "required": ["chunk_keys"], "properties": {
        "chunk_keys": {"type": "array", "maxItems": MAX_CHUNKS, "items": {"type": "string", "pattern": HEX64},
                       "description": "The prompt's chunk keys in order (docs/format.md, \"Chunk keys\")"}}},
    "PrefixHits": {"type": "object", "required": ["hits"], "properties": {"hits": {"type": "array", "items": {
        "type": "object", "required": ["file_key", "tokens", "codec", "quality", "bytes", "file_tokens"],
        "properties": {
            "file_key": {"type": "string", "pattern": HEX64, "description": "Cache key of the file"},
            "tokens": {"type": "integer", "description": "Prompt tokens the file holds: a multiple of 256"},
            "codec": {"type": "string"}, "quality": {"type": "string", "description": "The --quality preset"},
            "bytes": {"type": "integer", "description": "The whole file's size"},
            "file_tokens": {"type": "integer", "description": "Tokens in the whole file"}}}}}},
    "Upload": {"type": "object", "required": ["key", "upload", "part_bytes", "parts"], "properties": {
        "key": {"type": "string"}, "upload": {"type": "string"},
        "part_bytes": {"type": "integer", "description": "Parts start at multiples of this and hold at most this "
                       "many bytes"},
        "max_bytes": {"type": "integer", "description": "Largest file the server accepts"},
        "parts": {"type": "array", "description": "Staged parts as [offset, length], by offset",
                  "items": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}}}},
}
OCTETS = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


def content_of(kind: str | None) -> dict | None:
    if kind is None:
        return None
    if kind == "octets":
        return OCTETS
    if kind == "text":
        return {"text/plain": {"schema": {"type": "string"}}}
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{'Error' if kind == 'error' else kind}"}}}


def operation(e: Endpoint, sizes: dict) -> dict:
    op: dict = {"summary": e.summary.format(**sizes), "responses": {}}
    for status, (description, kind) in e.responses.items():
        op["responses"][status] = {"description": description}
        if content_of(kind):
            op["responses"][status]["content"] = content_of(kind)
    if e.params:
        op["parameters"] = list(e.params)
    if e.write:
        op["security"] = [{"bearer": []}]
    if e.body:
        op["requestBody"] = {"required": True, "content": OCTETS}
    if e.json_body:
        op["requestBody"] = {"required": True, "content": content_of(e.json_body)}
    return op


def path_parameters(path: str, sizes: dict) -> list[dict]:
    params = []
    for name in re.findall(r"{(\w+)}", path):
        spec = PATH_PARAMS[name]
        schema = dict(spec["schema"])
        if "multiple_of" in spec:
            schema["multipleOf"] = sizes[spec["multiple_of"]]
        params.append({"name": name, "in": "path", "required": True, "schema": schema,
                       "description": spec["description"].format(**sizes)})
    return params


def openapi_document(max_upload: int, part_bytes: int, endpoints=ENDPOINTS) -> dict:
    sizes = {"max_upload": max_upload, "part_bytes": part_bytes}
    paths: dict[str, dict] = {}
    for e in endpoints:
        entry = paths.setdefault(e.path, {})
        if "{" in e.path and "parameters" not in entry:
            entry["parameters"] = path_parameters(e.path, sizes)
        entry[e.method.lower()] = operation(e, sizes)
    return {
        "openapi": "3.1.0",
        "info": {"title": "kvcli cache server", "version": __version__,
                 "description": "Content-addressed .kvc KV-cache files (docs/server.md)."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}, "schemas": SCHEMAS},
        "paths": paths,
    }
