"""Data on stdout arrives whole or kvcli says it did not: `-o -` and the manifest lines against full files, full or
closed or non-blocking pipes, with and without PYTHONUNBUFFERED; progress never touches stdout.

Each case runs in a subprocess, since what it tests is the process's real file descriptor 1.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import resource
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIZE = 400_000  # several times a pipe's 64 KiB, so a reader that waits makes the writer wait
# write_stdout as the CLI calls it, with handled()'s mapping of a StorageError: one line and its exit code.
DRIVER = """
import sys
from kvcli.errors import StorageError
from kvcli.stdio import write_stdout
print("", end="")  # the text layer is in use too, as it is once anything has printed
try:
    write_stdout([bytes(range(256)) * (int(sys.argv[1]) // 256)])
except StorageError as err:
    print(f"Error: {err}", file=sys.stderr)
    sys.exit(err.exit_code)
"""
UNBUFFERED = [pytest.param({"PYTHONUNBUFFERED": "1"}, id="unbuffered"), pytest.param({}, id="buffered")]


def environment(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    # One thread: on a shared, oversubscribed CPU, idle-spinning worker threads slow tiny models tenfold.
    return dict(env, OMP_NUM_THREADS="1", SOURCE_DATE_EPOCH="1767225600", PYTHONPATH=str(ROOT), **extra)


def payload(size: int = SIZE) -> bytes:
    return bytes(range(256)) * (size // 256)


def file_size_limit(limit: int):
    """preexec_fn: a `ulimit -f` of `limit` bytes, and SIGXFSZ ignored, so a write past it fails with EFBIG."""

    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return apply


def run_into_nonblocking_pipe(cmd: list[str], env: dict, timeout: float = 120) -> tuple[int, bytes, str]:
    """Start cmd with stdout on a pipe whose write end is non-blocking, read nothing until it has surely filled
    the pipe, then read slowly to the end."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    proc = subprocess.Popen(cmd, stdout=w, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    os.close(w)
    got = bytearray()
    deadline = time.monotonic() + timeout
    try:
        time.sleep(0.5)
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], 1.0)
            if not ready:
                continue
            block = os.read(r, 8192)
            if not block:
                break
            got += block
            time.sleep(0.0005)  # a slow reader: the writer meets a full pipe again and again
        err = proc.stderr.read().decode()
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), bytes(got), err
    finally:
        os.close(r)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def run_into_closed_pipe(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(cmd, stdout=w, stderr=subprocess.PIPE, env=env, cwd=ROOT, timeout=120, text=True)
    finally:
        os.close(w)


# ---------------------------------------------------------------- write_stdout itself


@pytest.mark.parametrize("env", UNBUFFERED)
def test_a_slow_reader_of_a_nonblocking_pipe_gets_every_byte(env):
    rc, got, err = run_into_nonblocking_pipe([sys.executable, "-c", DRIVER, str(SIZE)], environment(env))
    assert (rc, err) == (0, "")
    assert got == payload()


@pytest.mark.parametrize("env", UNBUFFERED)
def test_a_file_size_limit_is_an_error_naming_the_bytes_written(env, tmp_path):
    out = tmp_path / "out"
    with open(out, "wb") as fh:
        proc = subprocess.run([sys.executable, "-c", DRIVER, str(SIZE)], stdout=fh, stderr=subprocess.PIPE,
                              env=environment(env), cwd=ROOT, timeout=60, text=True,
                              preexec_fn=file_size_limit(100_000))
    assert proc.returncode == 8
    assert proc.stderr == (f"Error: stdout: write failed after 100,000 of {SIZE - SIZE % 256:,} bytes: the file "
                           "size limit was reached (ulimit -f)\n")
    assert out.read_bytes() == payload()[:100_000]


@pytest.mark.parametrize("env", UNBUFFERED)
def test_a_closed_pipe_is_an_error(env):
    proc = run_into_closed_pipe([sys.executable, "-c", DRIVER, str(SIZE)], environment(env))
    assert proc.returncode == 8
    assert proc.stderr == (f"Error: stdout: write failed after 0 of {SIZE - SIZE % 256:,} bytes: the reader "
                           "closed the pipe\n")


def test_a_file_past_the_size_limit_is_an_error_and_leaves_no_temporary(tmp_path):
    write = ("import sys\nfrom kvcli.container import format\nfrom kvcli.errors import StorageError\n"
             "try:\n    format.atomic_write(sys.argv[1], [b'x' * 300_000])\n"
             "except StorageError as err:\n    print(err)\n")
    proc = subprocess.run([sys.executable, "-c", write, str(tmp_path / "out.kvc")], capture_output=True,
                          env=environment({}), cwd=ROOT, timeout=60, text=True, preexec_fn=file_size_limit(100_000))
    assert proc.stdout == f"{tmp_path / 'out.kvc'}: write failed: the file size limit was reached (ulimit -f)\n"
    assert os.listdir(tmp_path) == []


def close_fd(fd: int):
    """preexec_fn: the child starts with `fd` closed (`>&-`), so Python sees sys.stdout or sys.stderr as None."""
    return lambda: os.close(fd)


def test_a_closed_stdout_is_an_error():
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(SIZE)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=environment({}), cwd=ROOT, timeout=60, text=True,
                          preexec_fn=close_fd(1))
    assert proc.returncode == 8
    assert proc.stderr == (f"Error: stdout: write failed after 0 of {SIZE - SIZE % 256:,} bytes: the descriptor "
                           "is closed (>&-)\n")


# ---------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def long_doc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("output") / "long.txt"
    path.write_text(("The harbour town of Velmora sits between two cliffs. " * 9)[:480])  # 481 tokens
    return path


@pytest.fixture(scope="module")
def long_kvc(tiny_model_dir, long_doc) -> tuple[Path, bytes]:
    """A lossless cache of about 390 KB, and its decoded export (about 495 KB) written to a file."""
    from typer.testing import CliRunner

    from kvcli.cli import app

    kvc, exported = long_doc.parent / "long.kvc", long_doc.parent / "long.safetensors"
    for args in (["prefill", long_doc, "-o", kvc, "-m", tiny_model_dir("llama"), "-q", "lossless"],
                 ["decode", kvc, "-o", exported]):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.stderr
    return kvc, exported.read_bytes()


@pytest.mark.parametrize("env", UNBUFFERED)
def test_decode_to_a_slowly_read_nonblocking_pipe_is_whole(env, long_kvc):
    kvc, expected = long_kvc
    rc, got, err = run_into_nonblocking_pipe([sys.executable, "-m", "kvcli", "decode", str(kvc), "-o", "-"],
                                             environment(env))
    assert (rc, err) == (0, "")
    assert got == expected


def test_prefill_to_stdout_past_the_file_size_limit_fails_with_exit_8(tiny_model_dir, long_doc, tmp_path):
    out = tmp_path / "out.kvc"
    with open(out, "wb") as fh:
        proc = subprocess.run([sys.executable, "-m", "kvcli", "prefill", str(long_doc), "-o", "-", "-m",
                               str(tiny_model_dir("llama")), "-q", "lossless"], stdout=fh, stderr=subprocess.PIPE,
                              env=environment({"PYTHONUNBUFFERED": "1"}), cwd=ROOT, timeout=120, text=True,
                              preexec_fn=file_size_limit(200_000))
    assert proc.returncode == 8, proc.stderr
    assert proc.stderr.endswith("bytes: the file size limit was reached (ulimit -f)\n")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert out.stat().st_size == 200_000


def test_closed_standard_streams(long_kvc, tmp_path):
    """`>&-` is refused before any work when stdout is the output; `2>&-` costs the message, not the exit code;
    `<&-` is an input error."""
    kvc, _ = long_kvc
    cmd = [sys.executable, "-m", "kvcli"]
    decode = subprocess.run(cmd + ["decode", str(kvc), "-o", "-"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=environment({}), cwd=ROOT, timeout=60, text=True, preexec_fn=close_fd(1))
    assert (decode.returncode, decode.stderr) == (8, "Error: stdout is closed (>&-); redirect it to where the "
                                                     "output should go\n")
    missing = subprocess.run(cmd + ["inspect", str(tmp_path / "none.kvc")], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, env=environment({}), cwd=ROOT, timeout=60,
                             preexec_fn=close_fd(2))
    assert (missing.returncode, missing.stdout) == (3, b"")
    no_stdin = subprocess.run(cmd + ["inspect", "-"], capture_output=True, env=environment({}), cwd=ROOT,
                              timeout=60, text=True, preexec_fn=close_fd(0))
    assert (no_stdin.returncode, no_stdin.stderr) == (3, "Error: <stdin>: stdin is closed (<&-); pipe a .kvc file "
                                                         "in or give its path\n")


def test_binary_input_from_a_terminal_is_refused(long_kvc):
    """Nobody types a .kvc file: `kvcli decode -` with no pipe would wait forever."""
    main, child = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "kvcli", "decode", "-", "-o", os.devnull], stdin=child,
                              capture_output=True, env=environment({}), cwd=ROOT, timeout=60, text=True)
    finally:
        os.close(child)
        os.close(main)
    assert (proc.returncode, proc.stderr) == (2, "Error: refusing to read binary data from a terminal; pipe a .kvc "
                                                 "file in or give its path\n")


def test_a_document_typed_at_the_terminal_is_read_to_ctrl_d(tiny_model_dir, tmp_path):
    out = tmp_path / "typed.kvc"
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "kvcli", "prefill", "-", "-o", str(out), "-m",
                             str(tiny_model_dir("llama")), "-q", "lossless"], stdin=child, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=environment({}), cwd=ROOT, text=True)
    os.close(child)
    try:
        os.write(main, b"The harbour town of Velmora sits between two cliffs.\n\x04")  # a line, then Ctrl-D
        _, err = proc.communicate(timeout=120)
    finally:
        os.close(main)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert err.splitlines()[0] == "kvcli: reading from the terminal; end the input with Ctrl-D"
    assert out.stat().st_size > 0


def test_an_output_that_is_a_fifo_or_a_device_is_written_through_not_replaced(long_kvc, tmp_path):
    """`-o /dev/null`, `-o /dev/stdout` or `-o FIFO`: the rename of an atomic write replaced the node itself (as
    root, /dev/null became a regular file); a FIFO is the case a test may break."""
    import stat
    import threading

    kvc, expected = long_kvc
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    proc = subprocess.run([sys.executable, "-m", "kvcli", "decode", str(kvc), "-o", str(fifo)], env=environment({}),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    if proc.returncode:  # the reader still waits for a writer: open the FIFO once so its thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)) if reader.is_alive() else None
    reader.join(30)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and got == [expected]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]
    proc = subprocess.run([sys.executable, "-m", "kvcli", "decode", str(kvc), "-o", os.devnull], env=environment({}),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (0, "") and stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_decode_into_a_closed_pipe_fails_with_exit_8(long_kvc):
    kvc, expected = long_kvc
    proc = run_into_closed_pipe([sys.executable, "-m", "kvcli", "decode", str(kvc), "-o", "-"], environment({}))
    assert proc.returncode == 8
    assert proc.stderr == (f"Error: stdout: write failed after 0 of {len(expected):,} bytes: the reader closed "
                           "the pipe\n")


def test_heartbeats_wait_on_a_full_pipe_that_stderr_shares_with_stdout(tiny_model_dir, tmp_path):
    """`2>&1` into a small non-blocking pipe read slowly: progress lines meet it full as often as the manifest."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(20):
        (docs / f"d{i:02}.txt").write_text(f"Document {i}: the tide comes in and goes out.")
    cmd = [sys.executable, "-m", "kvcli", "prefill", str(docs), "--out-dir", str(tmp_path / "store"), "-m",
           str(tiny_model_dir("llama")), "-q", "lossless", "--batch-tokens", "1"]
    env = environment({"PYTHONUNBUFFERED": "1", "KVCLI_PROGRESS_SECONDS": "0.05"})
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)  # one page: a dozen lines fill it
    os.set_blocking(w, False)
    proc = subprocess.Popen(cmd, stdout=w, stderr=w, env=env, cwd=ROOT)
    os.close(w)
    got = bytearray()
    try:
        select.select([r], [], [], 60)  # the first line: the run is under way
        time.sleep(1.0)  # kvcli fills the pipe within 0.3 s here, then heartbeats find it full
        for _ in range(20_000):
            if not select.select([r], [], [], 60)[0]:
                break
            block = os.read(r, 4096)
            if not block:
                break
            got += block
            time.sleep(0.005)
        rc = proc.wait(timeout=60)
    finally:
        os.close(r)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = got.decode()
    assert rc == 0, text[-2000:]
    assert [json.loads(line)["status"] for line in text.splitlines() if line.startswith("{")] == ["written"] * 20
    others = [line for line in text.splitlines() if not line.startswith("{")]
    assert len(others) >= 3 and all(line.startswith("kvcli: ") for line in others), others[:20]


# ---------------------------------------------------------------- progress on a terminal


def run_on_pty(cmd: list[str], env: dict, stdout, timeout: float = 120) -> tuple[int, str]:
    """cmd with stderr (and stdout, if `stdout` is None) on a real pseudo-terminal; returns the exit code and
    everything the terminal showed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave if stdout is None else stdout,
                            stderr=slave, env=dict(env, TERM="xterm-256color", COLUMNS="60"), cwd=ROOT)
    os.close(slave)
    shown = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    block = os.read(master, 65536)
                except OSError:  # EIO: the last process holding the terminal is gone
                    break
                if not block:
                    break
                shown += block
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=10), shown.decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def docs(tmp_path) -> Path:
    root = tmp_path / "docs"
    root.mkdir()
    for i in range(4):
        # Long lines: a terminal 60 columns wide would hard-wrap them if they were drawn there.
        (root / f"d{i}.txt").write_text(f"Document {i}: " + "the tide comes in and goes out. " * 4)
    return root


def test_progress_on_a_terminal_leaves_redirected_stdout_to_the_manifest(tiny_model_dir, docs, tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    cmd = [sys.executable, "-m", "kvcli", "prefill", str(docs), "--out-dir", str(tmp_path / "store"), "-m",
           str(tiny_model_dir("llama")), "-q", "lossless"]
    with open(manifest, "wb") as fh:
        rc, shown = run_on_pty(cmd, environment({}), fh)
    assert rc == 0, shown
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [(line["id"], line["status"]) for line in lines] == [(str(docs / f"d{i}.txt"), "written") for i in range(4)]
    assert '"status"' not in shown  # the terminal got progress, never data
    assert "kvcli: 4/4 documents (4 written" in shown


def test_stdout_on_the_same_terminal_gets_whole_unwrapped_lines(tiny_model_dir, docs, tmp_path):
    cmd = [sys.executable, "-m", "kvcli", "prefill", str(docs), "--out-dir", str(tmp_path / "store"), "-m",
           str(tiny_model_dir("llama")), "-q", "lossless"]
    rc, shown = run_on_pty(cmd, environment({}), None)
    assert rc == 0, shown
    lines = [json.loads(line[line.index("{"):]) for line in shown.replace("\r\n", "\n").split("\n")
             if '"status"' in line]
    assert [line["status"] for line in lines] == ["written"] * 4
