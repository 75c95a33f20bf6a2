"""Assertions shared by the CLI test files."""

from __future__ import annotations


def one_line_error(result, code: int, fragment: str) -> None:
    """The exit code, nothing on stdout, and exactly one `Error:` line on stderr containing `fragment`."""
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], result.stderr
