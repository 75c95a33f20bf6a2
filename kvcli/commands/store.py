"""Commands on cache stores: `serve-cache`, `push`, `pull`, `ls` (docs/server.md), `index rebuild` (docs/format.md)."""

from __future__ import annotations

import sys
import time
from typing import Optional

import typer

from ..stdio import write_stderr_text, write_stdout_text
from .common import BackendOpt, DeviceOpt, check_output, emit_json, handled

TokenFileOpt = typer.Option(None, "--token-file", help="File whose first line is the bearer token "
                            "[default: $KVCLI_TOKEN_FILE, then $KVCLI_TOKEN]")
PULL_BLOCK = 1 << 20


def serve_cache(
    root: str = typer.Argument(..., help="Store: a directory or an fsspec URL such as s3://bucket/prefix"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback unless you say otherwise)"),
    port: int = typer.Option(8088, "--port", min=0, max=65535, help="Port (0: any free port, printed at start)"),
    token_file: Optional[str] = typer.Option(None, "--token-file", help="File whose first line is the bearer token"),
    writable: bool = typer.Option(False, "--writable", help="Accept PUT and DELETE (with the token)"),
    read_token: bool = typer.Option(False, "--read-token", help="Require the token for reads too"),
    max_upload: int = typer.Option(4 << 30, "--max-upload-bytes", min=1, help="Largest accepted upload"),
    io_timeout: float = typer.Option(60.0, "--io-timeout", min=0.1, max=3600.0, help="Seconds to wait for the next "
                                     "chunk of an upload (then 408), or for a client to take any response data (then "
                                     "the connection is reset)"),
    header_timeout: float = typer.Option(10.0, "--header-timeout", min=0.1, max=3600.0, help="Seconds a connection "
                                         "has to send a complete request head, from connecting or from the previous "
                                         "response (then it is closed)"),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error"),
) -> None:
    """Serve a cache store over HTTP: range reads, listing, lookup; validated uploads with --writable."""
    import logging
    import socket

    from rich.console import Console
    from rich.logging import RichHandler

    from ..errors import StorageError, UsageError
    from ..storage import remote, server, serving, store

    if log_level not in ("debug", "info", "warning", "error"):
        raise UsageError(f"unknown --log-level {log_level!r}")
    token = remote.read_token(None, token_file) if token_file else None
    backend = store.open_store(root, create=writable)
    if isinstance(backend, store.ServerStore):
        raise UsageError(f"{root}: serve a directory or an object store, not another server")
    app = server.create_app(backend, token, writable, read_token, max_upload, io_timeout)
    logging.basicConfig(level=log_level.upper(), format="%(message)s", force=True,
                        handlers=[RichHandler(console=Console(stderr=True, width=None if sys.stderr.isatty() else 200),
                                              show_path=False, rich_tracebacks=False, markup=False)])
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on connections of such a socket, and without it a
        # response's body waited for the client's delayed ACK of its head (40 ms for every small answer).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except (OSError, OverflowError) as err:
        raise StorageError(f"cannot listen on {host}:{port}: {getattr(err, 'strerror', None) or err}") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    # One plain line first, for scripts and tests that start the server on port 0.
    write_stderr_text(f"kvcli serve-cache: listening on http://{shown}:{bound} "
                      f"({'writable' if writable else 'read-only'}, store {backend.url})\n")
    if host not in ("127.0.0.1", "::1", "localhost") and not (token and read_token):
        logging.getLogger("kvcli.server").warning("listening on %s: reads are open to anyone who can reach it", host)
    with sock:
        serving.serve(app, sock, log_level=log_level, header_timeout_s=header_timeout, io_timeout_s=io_timeout)
    logging.getLogger("kvcli.server").info("stopped")


def push(
    file: str = typer.Argument(..., help=".kvc file to upload"),
    url: str = typer.Argument(..., help="Store: http(s)://host:port (a kvcli server), a directory or s3://bucket/prefix"),
    quality: Optional[str] = typer.Option(None, "--quality", "-q", help="Store these levels of FILE's document "
                                          "instead of FILE alone, each encoded from FILE (high,balanced,small); "
                                          "FILE's own level is FILE, and no level better than FILE is made"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="With --quality: the model that made FILE, for "
                                        "the lossy levels' calibration [default: bundled SmolLM2-135M-Instruct]"),
    device: str = DeviceOpt,
    backend: str = BackendOpt,
    token_file: Optional[str] = TokenFileOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Validate FILE and store it under its key; print the key and the cache's URL. A cache already there is not
    sent again; a large file goes to a server or object store in parts, and a push that broke off resumes. With
    --quality, one line per level: quality, key, URL."""
    from ..errors import UsageError
    from ..storage import remote, store

    qualities = where = None
    if quality is not None:
        from ..kernels.placement import resolve
        from ..reuse import ingest, levels

        qualities = ingest.check_qualities(ingest.parse_qualities(quality))
        where = resolve(device, backend)
    elif model is not None:
        raise UsageError("--model serves the levels of --quality; without it push stores FILE as it is")
    target = store.open_store(url, remote.read_token(None, token_file), create=True)
    target.check_writable()  # even when the cache is there already: a client that cannot write is never told it wrote
    if qualities is None:
        result = store.push(target, file)
        if as_json:
            emit_json(result)
        else:
            write_stdout_text(f"{result['key']} {result['url']}\n")
        return
    result = levels.push_levels(target, file, qualities, model, where.device, where.backend)
    if as_json:
        emit_json(result)
    else:
        write_stdout_text("".join(f"{lv['quality']} {lv['key']} {lv['url']}\n" for lv in result["levels"]))


def ls(
    url: str = typer.Argument(..., help="Store: a directory, s3://bucket/prefix or http(s)://host:port"),
    levels_of: Optional[str] = typer.Option(None, "--levels-of", help="Only the files of this .kvc file's document "
                                            "(its model and tokens): its quality levels"),
    model: Optional[str] = typer.Option(None, "--model-digest", help="Only files of this model (weights digest)"),
    tokens: Optional[str] = typer.Option(None, "--tokens-sha256", help="Only files of these tokens"),
    source: Optional[str] = typer.Option(None, "--source-sha256", help="Only files made from this document"),
    token_file: Optional[str] = TokenFileOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object, the server's listing"),
) -> None:
    """List a store's caches, one line each: KEY QUALITY TOKENS BYTES (--json: every field of the listing)."""
    from ..container import format, keys
    from ..errors import UsageError
    from ..storage import remote, store

    if levels_of is not None:
        if model or tokens:
            raise UsageError("--levels-of names the model and tokens itself; give it without --model-digest or "
                             "--tokens-sha256")
        with format.FileSource(levels_of) as src:
            header = format.read_header(src)
        model, tokens = header.model["weights_digest"], keys.tokens_sha256(header.token_ids)
    target = store.open_store(url, remote.read_token(None, token_file))
    entries = target.lookup(model, tokens, source) if tokens or source else target.list(model)
    if as_json:
        emit_json({"caches": entries})
    else:
        # '-': the entries of a server older than the quality field
        write_stdout_text("".join(f"{e['key']} {e.get('quality') or '-'} {e['tokens']} {e['bytes']}\n"
                                  for e in entries))


def pull(
    url: str = typer.Argument(..., help="http(s)://host:port/v1/caches/KEY or s3://bucket/prefix/KEY.kvc"),
    out: str = typer.Option(..., "--output", "-o", help="Output .kvc file"),
    token_file: Optional[str] = TokenFileOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Download a cache, resuming an interrupted pull to the same file, and verify every checksum before the file
    appears."""
    from ..errors import UsageError
    from ..storage import remote

    from ..container.format import is_stream

    if out == "-" or is_stream(out):  # a rename over a device or FIFO would replace the node (as root, /dev/null)
        raise UsageError("pull needs a file name for -o (it resumes into a hidden file beside it)")
    if "://" not in url:
        raise UsageError(f"{url}: expected an http(s):// or s3:// URL")
    check_output(out)
    token = remote.read_token(None, token_file)
    fetcher = remote.make_fetcher(url, token)
    try:
        result = download(fetcher, url, out, token)
    except remote.ConnectionFailed as err:
        if str(err).startswith(url):
            raise
        raise remote.ConnectionFailed(f"{url}: {err}") from None  # the fetcher's retries do not name what failed
    finally:
        fetcher.close()
    if as_json:
        emit_json(result)
    else:
        resumed = f", resumed at byte {result['resumed_from']:,}" if result["resumed_from"] else ""
        write_stderr_text(f"wrote {out}: {result['bytes']:,} bytes{resumed}\n")


def download(fetcher, url: str, out: str, token: str | None = None) -> dict:
    """Append the missing bytes to a hidden partial file (named for the URL, so another URL never resumes it),
    verify header and CRCs, refetch any damaged segment, check that the content's key is the one the URL names,
    put the dictionary the file names in OUT's directory's dicts/ (from the store, else this machine's own places),
    then rename the file into place."""
    import hashlib
    import os
    from pathlib import Path

    from ..container import dictionary, format, keys
    from ..errors import FormatError, StorageError
    from ..storage import remote, store

    target = Path(out)
    # Content-addressed: one key is one file wherever it is fetched from; other URLs are told apart by a digest.
    tag = remote.url_key(url) or hashlib.sha256(url.encode()).hexdigest()[:16]
    partial = target.parent / f".{target.name}.{tag}.kvcli-partial"
    size = remote.retried(fetcher.size)
    have = partial.stat().st_size if partial.exists() else 0
    if have > size:
        partial.unlink()
        have = 0
    resumed_from = have
    try:
        with open(partial, "ab") as fh:
            while have < size:
                n = min(PULL_BLOCK, size - have)
                data = remote.retried(lambda: fetcher.fetch(have, n))
                if len(data) != n:
                    raise StorageError(f"{url}: expected {n} bytes at {have}, got {len(data)}")
                fh.write(data)
                fh.flush()
                have += n
            os.fsync(fh.fileno())
        repair(fetcher, partial)
        with format.FileSource(partial) as src:
            header = store.validate(src)
            key = keys.checked_key(remote.url_key(url), header, url)
    except FormatError as err:
        partial.unlink(missing_ok=True)  # the remote file itself is bad: nothing to resume
        raise type(err)(str(err).replace(str(partial), url)) from None  # the removed partial means nothing to a user
    except OSError as err:
        raise StorageError(f"{partial}: {err.strerror}") from None
    # Missing everywhere: the error names every place, and the partial stays for a run that finds it.
    place = store.url_place(url, token)
    found = dictionary.to_carry(None, header, url, ([place] if place else []) + dictionary.own_places())
    if found is not None:
        dictionary.save(found, target.parent)
    os.replace(partial, target)
    return {"output": out, "key": key, "bytes": size, "resumed_from": resumed_from}


def repair(fetcher, partial) -> None:
    """Fetch again every segment whose CRC fails (a response damaged on the way, or by an earlier broken run)."""
    import os
    import zlib

    from ..container import format
    from ..storage import remote

    with format.FileSource(partial) as src:
        header = format.read_header(src)
        bad = [s for s in header.segments
               if zlib.crc32(src.read(header.data_offset + s.offset, s.length)) != s.crc32]
    if not bad:
        return
    with open(partial, "r+b") as fh:
        for seg in bad:
            offset = header.data_offset + seg.offset
            for attempt in range(remote.RETRIES):
                data = remote.retried(lambda: fetcher.fetch(offset, seg.length))
                if len(data) == seg.length and zlib.crc32(data) == seg.crc32:
                    os.pwrite(fh.fileno(), data, offset)
                    break
                time.sleep(0.1 * 2**attempt)
        os.fsync(fh.fileno())


def index_rebuild(
    root: str = typer.Argument(..., help="Store: a directory or an fsspec URL such as s3://bucket/prefix"),
) -> None:
    """Rebuild a store's prefix index from its files alone: every stored file's entries written, every other entry
    removed. Idempotent; prints a JSON summary."""
    from ..errors import UsageError
    from ..storage import store

    target = store.open_store(root)
    if isinstance(target, store.ServerStore):
        raise UsageError(f"{root}: rebuild the index of the server's own store (its directory or bucket); a server "
                         "keeps the index of what is uploaded to it")
    target.check_writable()
    emit_json(target.rebuild_index())


def register(app: typer.Typer) -> None:
    app.command("serve-cache")(handled(serve_cache))
    for command in (push, pull, ls):
        app.command()(handled(command))
    index = typer.Typer(no_args_is_help=True, help="The prefix index of a store (docs/format.md, \"Prefix index\").")
    index.command("rebuild")(handled(index_rebuild))
    app.add_typer(index, name="index")
