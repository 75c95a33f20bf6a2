"""`kvcli calibrate`: measure a model's sensitivity to cache loss once; lossy presets then use the profile."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from ..stdio import is_terminal, write_stdout_text
from .common import ModelOpt, emit_json, handled


def calibrate(
    model: Optional[str] = ModelOpt,
    text: Optional[list[str]] = typer.Option(None, "--text", "-t", help="Calibration document (repeatable) [default: the two bundled texts]"),
    out: Optional[str] = typer.Option(None, "--output", "-o", help="Write the profile here instead of the profile directory (its transform dictionary still goes to the user cache)"),
    method: str = typer.Option("fisher", "--method", help="fisher (a few passes per text) or probes (one pass per head: slow, the reference)"),
    as_json: bool = typer.Option(False, "--json", help="Print the profile's summary as JSON"),
    transform: bool = typer.Option(True, "--transform/--no-transform", help="Also learn kvq's per-head transform (a dictionary in the user's cache, named by the profile)"),
) -> None:
    """Measure MODEL's sensitivity to cache loss once; lossy presets then use the stored profile."""
    from pathlib import Path

    from rich.progress import Progress

    from ..calibration import calibrate as calib
    from ..calibration import profiles
    from ..errors import UsageError
    from ..modeling import inference, models
    from .common import check_output, stderr_console

    if method not in calib.METHODS:
        raise UsageError(f"--method must be one of {', '.join(calib.METHODS)}, not {method!r}")
    if out is not None:
        check_output(out, text or [], binary=False)
    texts = [(t, inference.read_document(t).text) for t in text] if text else calib.default_texts()
    lm = models.load(model, "float32")
    layers = lm.model.config.get_text_config(decoder=True).num_hidden_layers
    # On stderr, as all progress: rich's default console is stdout, where --json and the summary go.
    with Progress(console=stderr_console(), transient=True, redirect_stdout=False,
                  disable=not is_terminal(sys.stderr)) as bar:
        task = bar.add_task("calibrating", total=calib.passes(lm, len(texts), method))
        result = calib.calibrate(lm, texts, method=method, progress=lambda: bar.advance(task), transform=transform)
    path = calib.store(lm, result, Path(out) if out else None)
    stored = profiles.read(path)  # as stored: the digest must describe the rounded numbers the codec will use
    profile, s = stored.profile, stored.profile.sensitivity
    summary = {"profile": str(path), "name": profile.name, "digest": profile.digest(), "layers": layers,
               "sensitivity_range": [float(s.min()), float(s.max())], "texts": result.details["texts"],
               "method": method, "dictionary": stored.dictionary, "token_alpha": stored.token_alpha,
               "scales": stored.scales}
    if as_json:
        emit_json(summary)
    else:
        named = f"; transform in dictionary {stored.dictionary}" if stored.dictionary else ""
        write_stdout_text(f"wrote profile {path} (sensitivity spans {s.max() / max(s.min(), 1e-12):.0f}x across "
                          f"layers{named}; token alpha {stored.token_alpha:g})\n")


def register(app: typer.Typer) -> None:
    app.command()(handled(calibrate))
