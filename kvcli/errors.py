"""The one exception hierarchy of kvcli. Each class owns its exit code; the CLI maps nothing by hand."""


class KvcliError(Exception):
    """Base of every expected failure. `str(err)` is the one line the CLI prints."""

    exit_code = 1


class UsageError(KvcliError):
    """The command line or an argument value is wrong."""

    exit_code = 2


class InputError(KvcliError):
    """An input document or file cannot be used: missing, empty, not UTF-8, too long."""

    exit_code = 3


class FormatError(KvcliError):
    """A .kvc file (or a tensor file) is malformed, truncated or fails a checksum."""

    exit_code = 4


class VersionError(FormatError):
    """A .kvc file has a major version this build cannot read."""

    exit_code = 5


class ModelMismatchError(KvcliError):
    """A cache was made by a different model, tokenizer or config than the one given."""

    exit_code = 6


class ModelLoadError(KvcliError):
    """A model path does not exist or cannot be loaded."""

    exit_code = 7


class StorageError(KvcliError):
    """Reading or writing the destination failed (permissions, full disk)."""

    exit_code = 8


class DeviceError(KvcliError):
    """The requested device or dtype is not available here."""

    exit_code = 9


class InternalError(KvcliError):
    """A bug in kvcli (or an exhausted resource), never the user's input: report it with --debug."""

    exit_code = 10


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, so that no `except Exception` swallows it on the way out and every
    `finally` and cleanup handler (temporary files, forked workers) runs as it would for Ctrl-C."""

    exit_code = 143
