"""CacheGen's streaming controller: a context streamed chunk by chunk so that it is in place before a
time-to-first-token deadline, each chunk at the best quality that arrives in time: from a stored quality level, or
recomputed from its tokens, which is exact (docs/streaming.md).

The levels of one document are the files of a store with its tokens (`store.lookup(tokens_sha256=…)`) whose
headers can be mixed (docs/format.md, "Mixed-level decoding"). Before the first chunk the throughput is the last
run's against the same store (kept in $KVCLI_CACHE_DIR/links/) unless the first range read (the header's) took
over twice what that predicts or was faster: then the first read's. Once a chunk's bytes are in, the next chunk
is planned from the throughput, decode and prefill speeds measured so far, and its fetch starts while this one
decodes. The speeds of this machine are kept in $KVCLI_CACHE_DIR/speeds/, so a later run starts from them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FetchTimeout
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ..container import format, kvfile
from ..container.identity import cache_root
from ..container.keys import KEY_PATTERN, tokens_sha256
from ..container.level import EXACT, QUALITY_RANK, quality_of
from ..errors import FormatError, InputError, StorageError, UsageError
from ..modeling import inference, models
from ..modeling.kvcache import KVCache
from ..stdio import write_stderr_text
from ..storage.store import StoredSource

RECOMPUTE = "recompute"
# A recomputed chunk's predicted time, as the plan weighs it against fetches: the prefill estimate is the least
# reliable one on a busy machine (other work slows the forward pass, not the link).
RECOMPUTE_MARGIN = 1.25
# Before anything is measured on this machine: prefill costs 2 × parameters FLOPs per token at this rate.
ASSUMED_FLOPS = {"cpu": 2e10, "cuda": 2e12}
# Before a chunk has been decoded on this machine (the first decode replaces it).
ASSUMED_DECODE_S_PER_ELEMENT = 2e-8
EWMA = 0.5  # weight of the newest measurement in the running estimates of this machine's speeds
WINDOW = 4  # the link's throughput is that of the last few chunk fetches
# A fetch is never abandoned sooner than this plus twice its predicted time: a busy machine pauses a thread for tens
# of milliseconds, which is not a stalled store.
STALL_FLOOR_S = 0.25
STALL_CAP_S = 60.0  # a model that cannot recompute (inf) still gives up on a stalled store
HEAD_BYTES = 16 << 10  # a header of 240 segments (30 layers, 4 chunks) is about 15 KiB
# The named file's first read (an eighth of it, within these bounds): large enough that its time says something
# of the throughput and not only of the latency (on loopback a kvcli server answers a 16 KiB read in about 40 ms
# on this 2-core machine, a 1 Gbit/s link moves 256 KiB in 2 ms), small next to the file itself.
PROBE_BYTES = 256 << 10
# The remembered throughput is stale when the probe takes this many times longer than it predicts (a busy machine's
# pauses alone come to tens of milliseconds; a link down from 1 Gbit/s to 20 Mbit/s is 50 times slower).
STALE = 2.0
_DEADLINE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*\Z")


def parse_deadline(text: str) -> float:
    """`1.5s`, `1500ms` or `1.5` (seconds) as seconds, in (0, 3600]."""
    match = _DEADLINE.match(text or "")
    seconds = float(match.group(1)) / (1000 if match.group(2) == "ms" else 1) if match else -1.0
    if not 0 < seconds <= 3600:
        raise UsageError(f"--deadline {text!r}: expected a time such as 1.5s or 800ms, above 0 and at most 1 hour")
    return seconds


def check_quality(name: str) -> str:
    if name not in QUALITY_RANK:
        raise UsageError(f"--min-quality {name!r}: choose one of {', '.join(QUALITY_RANK)}")
    return name


def locate(url: str, token: str | None = None, timeout_s: float = 60.0):
    """The store holding the cache a --cache URL or path names, and its key."""
    from ..storage import remote
    from ..storage import store as stores

    if "://" in url:
        key = remote.url_key(remote.check_url(url))
        scheme = urlsplit(url).scheme
        if key and scheme in ("http", "https") and "/v1/caches/" in url:
            return stores.ServerStore(url[: url.index("/v1/caches/")], remote.read_token(token),
                                      timeout_s=timeout_s), key
        if key and scheme not in ("http", "https"):
            return stores.open_store(url.rsplit("/", 1)[0]), key
    else:
        key = Path(url).stem if Path(url).suffix == ".kvc" and KEY_PATTERN.fullmatch(Path(url).stem) else None
        if key:
            return stores.open_store(str(Path(url).parent)), key
    raise UsageError(f"{url}: --deadline needs a cache in a store, named by its key "
                     "(http://HOST/v1/caches/KEY, s3://BUCKET/PREFIX/KEY.kvc or DIR/KEY.kvc)")


# ---------------------------------------------------------------- what this machine and the link measured


def _memory(kind: str, name: str) -> Path:
    return cache_root() / kind / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.json"


def _recall(path: Path) -> dict[str, float]:
    """Remembered measurements by name: those that are sound (a damaged file is measured again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0}


def _remember(path: Path, values: dict) -> None:
    """Kept for the next run; failing to keep it only costs that run a guess."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        format.atomic_write(str(path), [json.dumps(values, sort_keys=True).encode()])
    except (OSError, StorageError):
        pass


class Speeds:
    """This machine's speeds for one model, each measured (now or by an earlier run, and kept) or else a prior:
    `prefill_s_per_token` (recomputing a chunk), `first_token_s` (the question's forward pass after the context),
    and `decode_s_per_element.QUALITY` per level."""

    def __init__(self, prefill_s_per_token: float, decode_s_per_element: float = ASSUMED_DECODE_S_PER_ELEMENT,
                 measured: dict[str, float] | None = None):
        self.priors = {"prefill_s_per_token": prefill_s_per_token, "decode_s_per_element": decode_s_per_element}
        self.measured = dict(measured or {})

    @staticmethod
    def name(lm: models.LoadedModel) -> str:
        device = next(lm.model.parameters()).device.type
        return f"{lm.identity['weights_digest']}/{device}/{lm.dtype}"

    @classmethod
    def recall(cls, lm: models.LoadedModel) -> "Speeds":
        device = next(lm.model.parameters()).device.type
        # The embedding table is looked up, not multiplied: it costs no FLOPs.
        params = sum(p.numel() for p in lm.model.parameters()) - lm.model.get_input_embeddings().weight.numel()
        return cls.recall_as(cls.name(lm), 2 * max(params, 1) / ASSUMED_FLOPS.get(device, ASSUMED_FLOPS["cpu"]))

    @classmethod
    def recall_as(cls, name: str, prefill_s_per_token: float) -> "Speeds":
        """The speeds kept under `name` (an engine other than kvcli's own keeps its own), over this prior."""
        return cls(prefill_s_per_token, measured=_recall(_memory("speeds", name)))

    def get(self, name: str) -> float:
        return self.measured.get(name, self.priors.get(name.split(".")[0], 0.0))

    @property
    def prefill_s_per_token(self) -> float:
        return self.get("prefill_s_per_token")

    def first_token_s(self, prompt_tokens: int) -> float:
        return self.measured.get("first_token_s", prompt_tokens * self.prefill_s_per_token)

    def measure(self, name: str, value: float) -> None:
        """A new measurement: blended into the last one, or replacing the prior."""
        self.measured[name] = _blend(self.measured[name], value) if name in self.measured else value

    def keep(self, lm: models.LoadedModel) -> None:
        self.keep_as(self.name(lm))

    def keep_as(self, name: str) -> None:
        if self.measured:
            _remember(_memory("speeds", name), self.measured)


def remember_first_token(lm: models.LoadedModel, seconds: float) -> None:
    """The question's forward pass after a streamed context, measured by the caller: the next plan reserves it."""
    speeds = Speeds.recall(lm)
    speeds.measure("first_token_s", seconds)
    speeds.keep(lm)


def recall_link(store_url: str) -> dict[str, float]:
    """The last run's throughput to this store, if there was one (latency is measured afresh by every run)."""
    known = _recall(_memory("links", store_url))
    return known if "bytes_per_s" in known else {}


def keep_link(store_url: str, bytes_per_s: float) -> None:
    _remember(_memory("links", store_url), {"bytes_per_s": bytes_per_s})


def _blend(old: float, new: float) -> float:
    return (1 - EWMA) * old + EWMA * new


# ---------------------------------------------------------------- levels


@dataclass
class Level:
    quality: str
    key: str
    source: format.ByteSource
    header: format.Header
    spans: list[tuple[int, int]]
    decoder: kvfile.LevelDecoder | None = None  # built when first used: its aux segments are fetched then

    @property
    def rank(self) -> int:
        return QUALITY_RANK[self.quality]

    def aux_reads(self) -> tuple[int, int]:
        """Reads and bytes of the aux segments still to fetch before this level's first chunk decodes."""
        if self.decoder is not None:
            return 0, 0
        head = len(self.source.head)
        aux = [s for s in self.header.segments
               if s.kind == "aux" and self.header.data_offset + s.offset + s.length > head]
        return len(aux), sum(s.length for s in aux)

    def open(self) -> kvfile.LevelDecoder:
        if self.decoder is None:
            self.decoder = kvfile.LevelDecoder(self.source, self.header)
        return self.decoder


def _open(store, key: str) -> tuple[StoredSource, format.Header, float]:
    """The file's source and header, and the seconds of its size request (a request that moves no data). Its first
    HEAD_BYTES are kept (StoredSource's 64 KiB would fetch a small level whole before it is chosen)."""
    started = time.perf_counter()
    size = store.size(key)
    request_s = time.perf_counter() - started
    if size is None:
        raise InputError(f"{store.url_for(key)}: no such cache")
    src = StoredSource(store, key, size, HEAD_BYTES)
    return src, format.read_header(src), request_s


def open_levels(store, key: str, min_quality: str) -> tuple[format.Header, list[Level], dict]:
    """The named cache's header, the levels of its document at min_quality or better (best first), and the
    probe: the bytes and seconds of the named file's first read, made alone on the link so that its time is latency
    plus transfer, and the link's latency: the shortest of the size requests (one per level; they move no data,
    and the shortest is the one least delayed by this machine's other work)."""
    started = time.perf_counter()
    size = store.size(key)
    if size is None:
        raise InputError(f"{store.url_for(key)}: no such cache")
    request_s = time.perf_counter() - started
    started = time.perf_counter()
    src = StoredSource(store, key, size, min(max(size // 8, HEAD_BYTES), PROBE_BYTES))
    head = src.head  # the probe: read now, alone on the link
    probe = {"bytes": len(head), "seconds": time.perf_counter() - started, "request_s": request_s}
    header = format.read_header(src)
    entries = store.lookup(model=header.model["weights_digest"], tokens_sha256=tokens_sha256(header.token_ids))
    others = sorted(e["key"] for e in entries if e["key"] != key and e.get("dtype") == header.dtype)

    def level(other: str):
        try:
            got = _open(store, other)
            kvfile.check_mixable([header, got[1]], [src.path, got[0].path])
        except (FormatError, InputError, StorageError):
            return None  # not a level of this cache (or unreadable now): the others still serve
        return other, got

    found = {key: (src, header, request_s)}
    if others:
        with ThreadPoolExecutor(max_workers=min(4, len(others)), thread_name_prefix="kvcli-levels") as pool:
            found.update(item for item in pool.map(level, others) if item is not None)
    probe["request_s"] = min(r for _, _, r in found.values())
    levels: dict[str, Level] = {}
    for k, (s, h, _) in found.items():
        quality = quality_of(h.codec)
        if quality is None or QUALITY_RANK[quality] < QUALITY_RANK[min_quality] or quality in levels:
            continue
        try:
            spans = kvfile.chunk_spans(h, kvfile.chunk_segments(h, s.path))
        except FormatError:
            continue
        levels[quality] = Level(quality, k, s, h, spans)
    return header, sorted(levels.values(), key=lambda lv: -lv.rank), probe


# ---------------------------------------------------------------- the controller


@dataclass
class Plan:
    choice: str  # a level's quality, or RECOMPUTE
    seconds: float  # predicted for this chunk and the rest
    meets: bool


@dataclass
class ReadAhead:
    """A chunk's fetch started while the chunk before it decodes."""

    chunk: int
    plan: Plan
    started: float
    future: object


@dataclass
class Stream:
    """One cache streamed under a deadline. run() returns the cache; `report` says what was chosen and why."""

    lm: models.LoadedModel
    store: object
    key: str
    deadline_s: float
    min_quality: str = "small"
    prompt_tokens: int = 0
    speeds: Speeds | None = None
    report: dict = field(default_factory=dict)

    def run(self) -> KVCache:
        self.open()
        return self.stream()

    def open(self) -> None:
        """Before the first chunk: the levels, their headers, the first throughput estimate. The clock starts."""
        from . import pipeline

        self.started = started = time.perf_counter()
        self.speeds = self.speeds or Speeds.recall(self.lm)
        header, self.levels, probe = open_levels(self.store, self.key, self.min_quality)
        where = self.store.url_for(self.key)
        pipeline.check_identity(header, self.lm, where)
        pipeline.check_layout(header.layers, header.token_ids, self.lm, where)
        remembered = recall_link(self.store.url)
        # The latency as this run measured it, from requests that move no data: the other levels' small reads share
        # the link, so on a slow one their times are mostly transfer, and latency taken from them made the probe's
        # transfer look short (a 100 kB/s link read as 475 kB/s); one size request alone, slowed by a busy moment of
        # this machine, made 4 KiB fetches over that link read as 280 kB/s.
        self.request_s = min(probe["request_s"], probe["seconds"])
        moving = max(probe["seconds"] - self.request_s, 0.1 * probe["seconds"], 1e-6)
        probed = probe["bytes"] / moving
        # The last run's throughput may be stale (a link that has slowed since), and this run's probe has just
        # measured the link as it is now; but on a fast link the probe is mostly latency and understates it. So
        # the last run's holds unless the probe took over STALE times what it predicts, or says the link is faster.
        remembered_bytes_per_s = remembered.get("bytes_per_s", 0.0)
        from_history = bool(remembered) and remembered_bytes_per_s >= probed and probe["seconds"] <= STALE * (
            self.request_s + probe["bytes"] / remembered_bytes_per_s)
        self.initial_bytes_per_s = remembered_bytes_per_s if from_history else probed
        self.samples: deque[tuple[int, float]] = deque(maxlen=WINDOW)
        self.recomputable = all(layer.token_start == 0 for layer in header.layers)
        self.header = header
        self.ahead: ReadAhead | None = None
        size = header.chunk_tokens
        self.bounds = [(lo, min(lo + size, header.num_tokens)) for lo in range(0, header.num_tokens, size)]
        self.elements = kvfile.chunk_elements(header)
        self.report = {"deadline_s": self.deadline_s, "min_quality": self.min_quality,
                       "levels": [{"quality": lv.quality, "key": lv.key, "bytes": lv.source.size} for lv in self.levels],
                       "initial_mbit_s": round(self.initial_bytes_per_s * 8e-6, 3),
                       "initial_from": "history" if from_history else "probe",
                       "probe_mbit_s": round(probed * 8e-6, 3),
                       "open_s": round(time.perf_counter() - started, 4), "chunks": []}

    def stream(self) -> KVCache:
        """Every chunk fetched at its chosen level or recomputed, re-planned after each."""
        header, started = self.header, self.started
        keys, values = kvfile.allocate(header, next(self.lm.model.parameters()).device)
        stalled, warned, fetched = False, False, False
        # Two threads: a chunk fetched again after a damaged one need not queue behind the next chunk's read-ahead.
        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvcli-stream")
        try:
            for chunk, (lo, hi) in enumerate(self.bounds):
                tried: set[str] = set()
                while True:
                    budget = self.deadline_s - (time.perf_counter() - started) - self.reserve()
                    ahead = self.ahead if self.ahead is not None and self.ahead.chunk == chunk else None
                    if ahead is not None:
                        self.ahead = None
                    if ahead is not None and not tried and not stalled:
                        plan = ahead.plan  # made once the last chunk's bytes were in, while it decoded
                    else:
                        plan, ahead = self.plan(chunk, budget, tried, stalled), None
                    if "predicted_s" not in self.report:
                        self.report["predicted_s"] = round(plan.seconds + time.perf_counter() - started, 4)
                        self.report["predicted_ttft_s"] = round(self.report["predicted_s"] + self.reserve(), 4)
                    if not plan.meets and not warned:
                        warned = True
                        write_stderr_text(f"kvcli: the deadline of {self.deadline_s:g} s cannot be met at "
                                          f"--min-quality {self.min_quality} or by recomputing; taking the fastest "
                                          "path\n")
                    note = self.attempt(pool, chunk, plan, budget, keys, values, ahead, stalled)
                    if note is None:
                        fetched |= plan.choice != RECOMPUTE
                        break
                    tried.add(plan.choice)
                    if note.startswith("stalled") or note.startswith("store failed"):
                        stalled = True
                    self.report["chunks"].append({"chunk": chunk, "tokens": [lo, hi], "choice": plan.choice,
                                                  "failed": note})
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        self.report["measured_mbit_s"] = round(self.bytes_per_s * 8e-6, 3)
        self.report["cache_s"] = round(time.perf_counter() - started, 4)
        if fetched:
            keep_link(self.store.url, self.bytes_per_s)
        self.speeds.keep(self.lm)
        return KVCache(list(header.token_ids), keys, values)

    @property
    def bytes_per_s(self) -> float:
        """The link's throughput over the last WINDOW chunk fetches, or the first estimate before any."""
        if not self.samples:
            return self.initial_bytes_per_s
        moving = sum(max(s - self.request_s, 0.1 * s) for _, s in self.samples)  # less each read's latency
        return sum(b for b, _ in self.samples) / max(moving, 1e-6)

    def reserve(self) -> float:
        """The prompt's own forward pass, which comes after the context and before the first token."""
        return self.speeds.first_token_s(self.prompt_tokens)

    def fetch_s(self, level: Level, chunk: int) -> float:
        offset, length = level.spans[chunk]
        if offset + length <= len(level.source.head) and level.aux_reads()[0] == 0:  # already here
            return self.decode_s(level, chunk)
        reads, aux = level.aux_reads()  # a level's first chunk fetches its codec tables too
        return (1 + reads) * self.request_s + (length + aux) / self.bytes_per_s + self.decode_s(level, chunk)

    def decode_s(self, level: Level, chunk: int) -> float:
        return self.elements[chunk] * self.speeds.get(f"decode_s_per_element.{level.quality}")

    def recompute_s(self, chunk: int) -> float:
        lo, hi = self.bounds[chunk]
        return (hi - lo) * self.speeds.prefill_s_per_token if self.recomputable else math.inf

    def recompute_cost(self, chunk: int) -> float:
        """Recomputing as the plan weighs it: its prefill estimate is the least reliable one on a busy machine."""
        return RECOMPUTE_MARGIN * self.recompute_s(chunk)

    def plan(self, chunk: int, budget: float, tried: set[str], stalled: bool) -> Plan:
        """This chunk's choice. For each quality, best first (recomputing is exact, as good as `lossless`): can
        this chunk and every later one be had at that quality or better in the time left, each by its fastest way
        (a level at least that good, or recomputing)? The first quality that fits gives this chunk its fastest
        way at that quality; if none fits, the fastest path. A level this chunk already failed at is not chosen
        again for it."""
        rest = range(chunk + 1, len(self.bounds))
        levels = [] if stalled else self.levels
        usable = [lv for lv in levels if lv.quality not in tried]
        for rank in sorted({lv.rank for lv in levels} | {EXACT}, reverse=True):
            # Recomputing last: on a tie the fetch is taken.
            options = [(self.fetch_s(lv, chunk), lv.quality) for lv in usable if lv.rank >= rank] + [
                (self.recompute_cost(chunk), RECOMPUTE)]
            first, choice = min(options, key=lambda o: (o[0], -QUALITY_RANK.get(o[1], EXACT)))
            seconds = first + sum(self.cost(j, [lv for lv in levels if lv.rank >= rank]) for j in rest)
            if seconds <= budget:
                return Plan(choice, seconds, True)
        options = [(self.fetch_s(lv, chunk), lv.quality) for lv in usable] + [(self.recompute_cost(chunk), RECOMPUTE)]
        seconds, choice = min(options, key=lambda o: (o[0], -QUALITY_RANK.get(o[1], EXACT)))
        if not math.isfinite(seconds):
            raise (StorageError if stalled else FormatError)(
                f"{self.store.url_for(self.key)}: chunk {chunk} can be neither fetched (every level failed) nor "
                "recomputed (the model has sliding-window layers)")
        seconds += sum(self.cost(j, levels) for j in rest)
        return Plan(choice, seconds, seconds <= budget)

    def cost(self, chunk: int, levels: list[Level]) -> float:
        """A later chunk's predicted time in a plan: its fastest way among these levels and recomputing."""
        return min([self.recompute_cost(chunk)] + [self.fetch_s(lv, chunk) for lv in levels])

    def attempt(self, pool: ThreadPoolExecutor, chunk: int, plan: Plan, budget: float, keys, values,
                ahead: "ReadAhead | None" = None, stalled: bool = False) -> str | None:
        """The chunk done as planned (None), or why not. Its fetch is `ahead`'s where that was started already;
        once its bytes are in (or before it is recomputed), the next chunk is planned and, if it is to be fetched,
        its read starts while this one decodes (or is recomputed)."""
        lo, hi = self.bounds[chunk]
        entry = {"chunk": chunk, "tokens": [lo, hi], "choice": plan.choice}
        if plan.choice == RECOMPUTE:
            if not stalled:  # the link is idle while this chunk is prefilled: the next chunk's read can start now
                self.read_ahead(pool, chunk + 1, self.recompute_s(chunk), only_if_met=True)
            t0 = time.perf_counter()
            self.recompute(lo, hi, keys, values)
            done = time.perf_counter()
            self.speeds.measure("prefill_s_per_token", (done - t0) / (hi - lo))
            self.report["chunks"].append({**entry, "bytes": 0, "seconds": round(done - t0, 4),
                                          "span_s": [round(t0 - self.started, 4), round(done - self.started, 4)]})
            return None
        level = next(lv for lv in self.levels if lv.quality == plan.choice)
        predicted = self.fetch_s(level, chunk)
        # When the fetch is abandoned for recomputing this chunk and the rest: at the last moment at which that still
        # meets the deadline; or, where it cannot, once the fetch has taken as long as recomputing would (a slow
        # link misread as a stalled store would cost the whole recompute). Never before twice the prediction.
        rest = sum(self.recompute_s(j) for j in range(chunk, len(self.bounds)))
        wait = max(budget - rest if budget > rest else rest, 2 * predicted + STALL_FLOOR_S)
        wait = min(wait, STALL_CAP_S)
        t0 = ahead.started if ahead is not None else time.perf_counter()
        future = ahead.future if ahead is not None else pool.submit(self.fetch, level, chunk)
        try:
            decoder, data, fetch_seconds = future.result(timeout=max(wait - (time.perf_counter() - t0), 0.0))
        except FetchTimeout:
            return f"stalled: no answer in {wait:.3f} s"
        except (StorageError, InputError) as err:
            return f"store failed: {err}"
        except FormatError as err:
            return f"damaged: {err}"
        size = level.spans[chunk][1]
        if fetch_seconds is not None:
            self.samples.append((size, fetch_seconds))
        self.read_ahead(pool, chunk + 1, self.decode_s(level, chunk))
        t1 = time.perf_counter()
        try:
            decoder.decode_chunk(chunk, decoder.split(chunk, data), keys, values)
        except FormatError as err:
            return f"damaged: {err}"
        decode_seconds = time.perf_counter() - t1
        if self.elements[chunk]:
            self.speeds.measure(f"decode_s_per_element.{level.quality}", decode_seconds / self.elements[chunk])
        done = time.perf_counter()
        if fetch_seconds is None:
            entry["with_header"] = True  # its bytes came with the first read: it cost no transfer of its own
        self.report["chunks"].append({**entry, "bytes": size, "seconds": round(done - t0, 4),
                                      "decode_s": round(decode_seconds, 4),
                                      "span_s": [round(t0 - self.started, 4), round(done - self.started, 4)]})
        return None

    def read_ahead(self, pool: ThreadPoolExecutor, chunk: int, decoding_s: float, only_if_met: bool = False) -> None:
        """The next chunk planned now, the current one's decode (or prefill) still to come, and its fetch started
        if it is one (a recomputed chunk has to wait for the chunks before it). `only_if_met`: not where the plan
        misses the deadline, since then the prediction for the current chunk may be what is wrong (a prefill
        estimate not yet measured), and the next chunk is better planned once the current one is done."""
        if chunk >= len(self.bounds):
            return
        budget = self.deadline_s - (time.perf_counter() - self.started) - self.reserve() - decoding_s
        plan = self.plan(chunk, budget, set(), False)
        if plan.choice != RECOMPUTE and (plan.meets or not only_if_met):
            level = next(lv for lv in self.levels if lv.quality == plan.choice)
            self.ahead = ReadAhead(chunk, plan, time.perf_counter(), pool.submit(self.fetch, level, chunk))

    @staticmethod
    def fetch(level: Level, chunk: int) -> tuple[kvfile.LevelDecoder, bytes, float | None]:
        """On the fetch thread: the level's decoder (its aux, on first use), then the chunk's bytes, timed alone
        (None when they came with the header's range read and measured nothing)."""
        decoder = level.open()
        offset, length = level.spans[chunk]
        if offset + length <= len(level.source.head):
            return decoder, level.source.read(offset, length), None
        t0 = time.perf_counter()
        data = level.source.read(offset, length)
        return decoder, data, time.perf_counter() - t0

    def recompute(self, lo: int, hi: int, keys, values) -> None:
        """Prefill of the chunk's tokens after the tokens before it, as they stand (loaded or recomputed)."""
        ids = self.header.token_ids
        dtype = self.lm.model.dtype
        prefix = KVCache(ids[:lo], [k[:, :lo].to(dtype) for k in keys], [v[:, :lo].to(dtype) for v in values])
        full = inference.extend(self.lm, prefix if lo else None, ids[lo:hi])
        for layer in range(len(keys)):
            keys[layer][:, lo:hi] = full.keys[layer][:, lo:hi].to(keys[layer].dtype)
            values[layer][:, lo:hi] = full.values[layer][:, lo:hi].to(values[layer].dtype)


def stored_dtype(url: str, token: str | None = None) -> str:
    """The dtype the named cache was made in (the model is loaded in it unless --dtype says otherwise)."""
    store, key = locate(url, token)
    try:
        return _open(store, key)[1].dtype
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            close()


def load(lm: models.LoadedModel, url: str, deadline_s: float, min_quality: str = "small", prompt_tokens: int = 0,
         token: str | None = None) -> tuple[KVCache, dict]:
    """generate --deadline: the cache `url` names, streamed by the controller; its report."""
    # A read that stalls past the deadline is useless, and the abandoned fetch thread ends with it.
    store, key = locate(url, token, timeout_s=deadline_s + 1.0)
    stream = Stream(lm, store, key, deadline_s, min_quality, prompt_tokens)
    try:
        kv = stream.run()
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            close()
    if kv.dtype != lm.model.dtype:
        kv = KVCache(kv.token_ids, [k.to(lm.model.dtype) for k in kv.keys], [v.to(lm.model.dtype) for v in kv.values])
    return kv, stream.report

