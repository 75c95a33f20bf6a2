"""What every command shares: error handling, options, spinners, and the checks made on outputs before any work."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path

import typer

from ..errors import InternalError, KvcliError, StorageError, Terminated, UsageError
from ..stdio import abandon_stdout, is_terminal, write_stderr_text, write_stdout_text

state = {"debug": False}

ModelOpt = typer.Option(None, "--model", "-m", help="Model directory, .gguf file or hub id [default: bundled SmolLM2-135M-Instruct]")
QualityOpt = typer.Option("balanced", "--quality", "-q", help="lossless, high, balanced, small, tiny, or raw")
StepScaleOpt = typer.Option(1.0, "--step-scale", min=1e-3, max=1e3, help="Expert: multiply the preset's quantization steps (recorded in the header)")
SinksOpt = typer.Option(None, "--sinks", min=0, max=4096, help="Expert: leading tokens kept exact by lossy presets [default: the first token]")
ChunkOpt = typer.Option(256, "--chunk-tokens", min=1, max=65536, help="Tokens per segment")
CacheDirBytesOpt = typer.Option(None, "--cache-dir-bytes", min=0, help="Bound on --cache-dir in bytes; the least "
                                "recently used copies go first [default: $KVCLI_CACHE_DIR_BYTES, else 4 GiB]")
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda, or auto (cuda when torch sees one)")
BackendOpt = typer.Option("auto", "--backend", help="The codec's kernels: torch, triton (a GPU, or TRITON_INTERPRET=1 "
                          "on a CPU), or auto (triton on CUDA, torch on CPU)")


def print_error(message: str) -> None:
    write_stderr_text(f"Error: {message}\n")


def handled(fn):
    """Expected failures print one line and exit with their class's code; --debug keeps the traceback.

    Anything else is a bug in kvcli or an exhausted resource, never the user's file: it says so, with exit 10.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KvcliError as err:
            if state["debug"]:
                raise
            print_error(str(err))
            raise typer.Exit(err.exit_code) from None
        except (KeyboardInterrupt, Terminated) as err:
            if state["debug"]:
                raise
            print_error("interrupted" if isinstance(err, KeyboardInterrupt) else "terminated (SIGTERM)")
            raise typer.Exit(130 if isinstance(err, KeyboardInterrupt) else Terminated.exit_code) from None
        except BrokenPipeError:
            # The reader of text went away (`| head`): not an error worth a message; keep Python from complaining
            # at exit.
            abandon_stdout()
            raise typer.Exit(141) from None
        except MemoryError:
            if state["debug"]:
                raise
            print_error("out of memory")
            raise typer.Exit(InternalError.exit_code) from None
        except Exception as err:  # noqa: BLE001 - the last line of defence: one line, and a way to the traceback
            if state["debug"]:
                raise
            first = (str(err).splitlines() or [""])[0][:300]
            print_error(f"internal error: {type(err).__name__}: {first} (a bug in kvcli; rerun with --debug "
                        "for the traceback and report it)")
            raise typer.Exit(InternalError.exit_code) from None

    return wrapper


def status(message: str):
    """A spinner on stderr while something slow runs, only when a person is watching. It leaves sys.stdout
    alone (rich's own status() would take it over), so data written meanwhile still goes to stdout."""
    if not is_terminal(sys.stderr):
        return contextlib.nullcontext()
    from rich.live import Live
    from rich.spinner import Spinner

    return Live(Spinner("dots", message), console=stderr_console(), transient=True, redirect_stdout=False)


def stderr_console():
    """The rich console every display draws on: stderr, so stdout holds only data."""
    from rich.console import Console

    return Console(file=sys.stderr)


def emit_json(obj: dict) -> None:
    """One JSON object on one line of stdout: what every --json prints."""
    write_stdout_text(json.dumps(obj, ensure_ascii=False) + "\n")


def check_output(out: str, inputs: list[str] = (), binary: bool = True) -> None:
    """Refuse an output before any work: a terminal for binary data, a missing or read-only directory, a
    directory as the target, or the same file as one of the inputs (which the write would destroy)."""
    if out == "-":
        if sys.stdout is None:
            raise StorageError("stdout is closed (>&-); redirect it to where the output should go")
        if binary and is_terminal(sys.stdout):
            raise UsageError("refusing to write binary data to a terminal; redirect stdout or pass -o FILE")
        return
    target = Path(out)
    if target.is_dir():
        raise UsageError(f"{out}: is a directory; give a file name")
    from ..container.format import is_stream

    if is_stream(out):  # /dev/null, /dev/stdout, a FIFO: written through, so its directory does not matter
        return
    directory = target.parent
    if not directory.is_dir():
        raise StorageError(f"{out}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StorageError(f"{out}: directory {directory} is not writable")
    if target.exists():
        for inp in inputs:
            if inp != "-" and Path(inp).exists() and os.path.samefile(inp, target):
                raise UsageError(f"{out}: is the same file as the input {inp}; choose another output")
