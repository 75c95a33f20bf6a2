"""Real servers for the store tests, started on free loopback ports and stopped afterwards: `kvcli serve-cache`,
`moto_server` (S3), and a TCP proxy that throttles the bytes it forwards. Also small valid .kvc files."""

from __future__ import annotations

import contextlib
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from kvcli.container import format

REPO = Path(__file__).resolve().parent.parent
KVCLI = [sys.executable, "-m", "kvcli"]
MODEL = {"architecture": "TinyForCausalLM", "name": "tiny", "config_digest": "c" * 64, "weights_digest": "a" * 64,
         "tokenizer_digest": "b" * 64}


def make_cache(tokens: int = 40, layers: int = 2, dim: int = 16, chunk: int = 8, seed: int = 0,
               model: dict | None = None, source: str | None = None, created_at: str = "2026-01-31T12:00:00Z",
               codec_params: dict | None = None, aux: dict[str, bytes] | None = None) -> bytes:
    """A valid .kvc (raw codec, random float16 values): the store checks containers, not what they decode to
    (`codec_params` {"dictionary": SHA}: a file that names a dictionary, for what carries dictionaries; `aux`:
    aux segments by name, {"dictionary": .kvd bytes} for one that carries its own)."""
    rng = random.Random(seed)
    parts = [format.SegmentData("aux", -1, 0, 0, data, name) for name, data in (aux or {}).items()]
    for start in range(0, tokens, chunk):
        count = min(chunk, tokens - start)
        for layer in range(layers):
            for kind in ("k", "v"):
                parts.append(format.SegmentData(kind, layer, start, count, rng.randbytes(count * dim * 2)))
    meta = {"model": model or MODEL, "dtype": "float16", "token_ids": [rng.randrange(50000) for _ in range(tokens)],
            "layers": [{"kv_heads": 1, "key_dim": dim, "value_dim": dim, "token_start": 0}] * layers,
            "chunk_tokens": chunk, "codec": {"name": "raw", "params": codec_params or {}}, "created_by": "tests",
            "created_at": created_at}
    if source:
        meta["source"] = {"sha256": source, "bytes": 123}
    return format.build_header(meta, parts) + b"".join(p.data for p in parts)


def make_big_cache(seed: int, mib: float) -> bytes:
    """A valid .kvc of about `mib` MiB in 256-token segments of 128 KiB: several upload parts."""
    return make_cache(seed=seed, tokens=256 * max(1, round(mib * 4)), layers=1, dim=256, chunk=256)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def foreign_server(answers: dict[str, tuple[int, str | None, bytes]]):
    """A loopback HTTP server that is not kvcli's (a proxy's sign-in page, a broken service): every path answers
    answers[method] = (status, content type or None, body); yields its URL and stops it."""
    import http.server

    class Canned(http.server.BaseHTTPRequestHandler):
        def answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, kind, body = answers[self.command]
            self.send_response(status)
            if kind is not None:
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_HEAD = do_GET = do_POST = do_PUT = answer

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


class CacheServer:
    """`kvcli serve-cache ROOT --port 0 …` as a subprocess; `url` is known once it has printed its address."""

    def __init__(self, root, *args: str, env: dict | None = None, open_files: int | None = None):
        self.args = [str(root), "--port", "0", *args]
        self.env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
        self.open_files = open_files  # a lower limit on open files (soft and hard), to reach it in a test
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log: list[str] = []

    def start(self) -> "CacheServer":
        self.proc = subprocess.Popen(KVCLI + ["serve-cache", *self.args], stderr=subprocess.PIPE, text=True,
                                     env=self.env, cwd=REPO, preexec_fn=self._limit if self.open_files else None)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.5)
            if ready:
                line = self.proc.stderr.readline()
                if not line:
                    break
                self.log.append(line)
                match = re.search(r"listening on (http://\S+)", line)
                if match:
                    self.url = match.group(1)
                    threading.Thread(target=self._drain, daemon=True).start()
                    return self
        self.stop()
        raise RuntimeError("serve-cache did not start:\n" + "".join(self.log))

    def _limit(self) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> "CacheServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


AWS_SETTINGS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
                "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI")


def aws_free_env(**extra: str) -> dict:
    """This process's environment for a kvcli subprocess with no AWS settings of the host's: no credentials, no
    profile, empty config and credentials files, no instance metadata lookup, and one attempt per request (botocore
    retries a refused connection for seconds, and kvcli tries again on top)."""
    env = {k: v for k, v in os.environ.items() if k not in AWS_SETTINGS}
    env.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true",
               AWS_MAX_ATTEMPTS="1", AWS_DEFAULT_REGION="us-east-1", TQDM_DISABLE="1")
    env.update(extra)
    return env


class MotoEnv(dict):
    """The AWS environment for a moto_server; `proc` is the server, for tests that kill it."""

    proc: subprocess.Popen


@contextlib.contextmanager
def moto_server():
    """`moto_server` on a free loopback port, with the AWS environment a real S3 client would read (config files
    pointed at empty ones, so the host's own AWS profile never mixes in)."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        raise RuntimeError("moto_server not found")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        env = MotoEnv(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
        env.proc = proc
        yield env
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)


class ThrottleProxy:
    """A TCP proxy on loopback forwarding to `target` (host, port), server-to-client at `rate` bytes/s and
    client-to-server at `up_rate` bytes/s (None: as fast as it goes). With `shared`, those rates are one link's,
    shared by all connections (a client reading on several connections gets no more); without, each connection
    gets them. While `stalled` is set, nothing more is forwarded either way, on open connections too: a store that
    stopped answering."""

    def __init__(self, target: tuple[str, int], rate: float | None = None, up_rate: float | None = None,
                 shared: bool = False):
        self.target, self.rate, self.up_rate, self.shared = target, rate, up_rate, shared
        self.link_lock = threading.Lock()
        self.link_free_at: dict[str, float] = {}  # per direction: when the shared link is next idle
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.stalled = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> "ThrottleProxy":
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        return self

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:  # the target died: so does this connection, as if made to the target
                client.close()
                continue
            for src, dst, rate, way in ((client, upstream, self.up_rate, "up"), (upstream, client, self.rate, "down")):
                t = threading.Thread(target=self._pipe, args=(src, dst, rate, way), daemon=True)
                t.start()
                self.threads.append(t)

    def _pipe(self, src: socket.socket, dst: socket.socket, rate: float | None, way: str) -> None:
        chunk = 16384 if rate is None else max(1024, int(rate / 50))
        try:
            while not self.stopped.is_set():
                data = src.recv(chunk)
                if not data:
                    break
                while self.stalled.is_set() and not self.stopped.is_set():
                    time.sleep(0.01)
                if rate and self.shared:
                    time.sleep(self._reserve(way, rate, len(data)))
                dst.sendall(data)
                if rate and not self.shared:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def _reserve(self, way: str, rate: float, nbytes: int) -> float:
        """Seconds to wait before sending nbytes on the shared link: its time slot after everything queued."""
        with self.link_lock:
            now = time.monotonic()
            start = max(now, self.link_free_at.get(way, now))
            self.link_free_at[way] = start + nbytes / rate
            return self.link_free_at[way] - now

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()

    def __enter__(self) -> "ThrottleProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
