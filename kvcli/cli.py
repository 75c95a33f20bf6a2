"""The command line: the typer app, error-to-exit-code mapping and signals. Commands live in kvcli/commands/."""

from __future__ import annotations

import os
import signal
import sys

import typer
from typer import _click as click  # typer vendors click; its exceptions are these classes
from typer.core import TyperGroup
from typer.exceptions import Abort

from . import __version__
from .commands import calibrate, files, generate, prefill, store
from .commands.common import print_error, state
from .errors import Terminated
from .stdio import write_stdout_text


class KvcliGroup(TyperGroup):
    """Usage errors as one `Error:` line and exit 2, like every other expected failure (no boxed help); flags
    without a type in --help."""

    def get_params(self, ctx):
        return flags_without_metavar(super().get_params(ctx))

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            flags_without_metavar(command.get_params(ctx))  # --help included, which click makes on first use
        return command

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as err:
            err.show()
            code = 2
        except click.exceptions.UsageError as err:
            hint = f" (see `{err.ctx.command_path} --help`)" if err.ctx and err.ctx.parent else " (see `kvcli --help`)"
            print_error(" ".join(err.format_message().split()) + hint)
            code = err.exit_code
        except click.exceptions.ClickException as err:
            print_error(" ".join(err.format_message().split()))
            code = err.exit_code
        except Abort:
            print_error("aborted")
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code or 0)


def flags_without_metavar(params: list) -> list:
    """typer labels every flag `<bool>` in --help, though a flag takes no value: an empty metavar shows none."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


app = typer.Typer(
    cls=KvcliGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Offline KV-cache files for language models: prefill a document once, answer from the cache later.",
)


def _version(value: bool) -> None:
    if value:
        write_stdout_text(f"kvcli {__version__}\n")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for expected errors too"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version"),
) -> None:
    state["debug"] = debug


for module in (prefill, generate, files, calibrate, store):
    module.register(app)


def _terminate(signum, frame) -> None:
    raise Terminated("terminated by SIGTERM")


def main() -> None:
    # transformers' GGUF reader draws a tqdm bar that ignores its own progress switch; tqdm reads this variable
    # only when it is first imported, so it is set before anything imports it.
    os.environ.setdefault("TQDM_DISABLE", "1")
    # SIGTERM (timeout, docker stop, systemd) unwinds like Ctrl-C: temporary files are removed on the way out.
    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="kvcli")
