"""The connector's settings, read from vLLM's kv_connector_extra_config and checked once at engine start."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ...codecs.presets import QUALITIES
from ...errors import UsageError
from ...container.level import QUALITY_RANK
from ...reuse.controller import parse_deadline
from ...storage.remote import DEFAULT_CACHE_DIR_BYTES


@dataclass(frozen=True)
class Settings:
    store: str  # a directory, s3://bucket/prefix, or a serve-cache URL
    token_file: str | None = None  # the serve-cache bearer token, first line of this file
    # The preset saves are written at, or several ("high,balanced,small": each its own file, the levels a deadline
    # load chooses among), or "none" to only load.
    quality: str = "balanced"
    cache_dir: str | None = None  # local copies of remote caches, least recently used evicted first
    cache_dir_bytes: int = DEFAULT_CACHE_DIR_BYTES
    max_loads: int = 2  # caches decoded at once (threads)
    max_pending_saves: int = 4  # prefixes waiting to be encoded; beyond, a save is skipped and counted
    load_timeout_s: float = 30.0  # a layer not loaded by then is recomputed by vLLM
    stats_dir: str | None = None  # the counters as JSON, scheduler.json and worker.json, rewritten after each step
    # Seconds (or "1.5s", "800ms") from when the scheduler first sees a request to its first token: each load then
    # claims the level and tokens that fit, and plans again chunk by chunk (deadline.py). None: the best file, whole.
    deadline: float | str | None = None
    min_quality: str = "small"  # no level below this one is loaded under a deadline

    @classmethod
    def from_extra(cls, extra: dict | None) -> "Settings":
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"kvcli connector: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if not extra.get("store"):
            raise ValueError("kvcli connector: kv_connector_extra_config needs 'store' (a directory, s3://bucket/prefix "
                             "or a serve-cache URL)")
        return cls(**extra)

    def __post_init__(self) -> None:
        names = self.qualities
        if self.quality != "none" and (not names or any(q not in QUALITIES for q in names) or len(set(names)) != len(names)):
            raise ValueError(f"kvcli connector: quality must be none, or one or more of {', '.join(QUALITIES)} separated "
                             f"by commas, each once, not {self.quality!r}")
        for name in ("max_loads", "max_pending_saves", "cache_dir_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "cache_dir_bytes" else 1):
                raise ValueError(f"kvcli connector: {name} must be a positive integer, not {value!r}")
        if self.deadline is not None:
            object.__setattr__(self, "deadline", _seconds(self.deadline))
        if self.min_quality not in QUALITY_RANK:
            raise ValueError(f"kvcli connector: min_quality must be one of {', '.join(QUALITY_RANK)}, not "
                             f"{self.min_quality!r}")
        if not isinstance(self.load_timeout_s, (int, float)) or not self.load_timeout_s > 0:
            raise ValueError(f"kvcli connector: load_timeout_s must be a number above 0, not {self.load_timeout_s!r}")

    @property
    def qualities(self) -> tuple[str, ...]:
        """The presets saves are written at, in the order given; () when saves are off."""
        if not isinstance(self.quality, str) or self.quality == "none":
            return ()
        return tuple(name.strip() for name in self.quality.split(","))

    @property
    def saves(self) -> bool:
        return self.quality != "none"


def _seconds(value) -> float:
    """A deadline as `generate --deadline` takes it (a number of seconds, "1.5s", "800ms"), in seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"kvcli connector: deadline must be a time such as 1.5 or \"1.5s\", not {value!r}")
    try:
        return parse_deadline(str(value))
    except UsageError as err:
        raise ValueError("kvcli connector: " + str(err).replace("--deadline ", "deadline ", 1)) from None
