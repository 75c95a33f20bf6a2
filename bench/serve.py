"""Caches over a network: time to first token over a throttled link, and the server's throughput on loopback.

    python bench/serve.py [--corpus DIR] [--rate-mbit 100 --rate-mbit 1000] [--repeats 3] [--seconds 10]
    python bench/serve.py --trace [--tokens 256 --tokens 1024] [--deadline 0.5 --deadline 1 --deadline 2]
    python bench/serve.py --judge TRACE_RUN.jsonl     # the summary and the goal again from a --trace run's lines

With --trace: the streaming controller (`generate --deadline`, kvcli/reuse/controller.py) against streaming one
fixed level and against recomputing, over a link whose rate follows a trace (1 Gbit/s for 1 s, 20 Mbit/s for 1.5 s,
and again), each run starting at another point of it. Each corpus document is cut to each --tokens and stored at
every level from one prefill. Per run: time to first token, whether each deadline was met, and quality: the KL
divergence of the next-token distributions over the question from those of the exact cache, from the chunks the
run actually used. A fixed-level run still going after --give-up-s is stopped and counts as missing every deadline.

For every document in the corpus and every link rate, three ways to the first answer token on the default model
(float32): streaming the `balanced` .kvc from `kvcli serve-cache` (decode overlaps the download); fetching the
fp16 cache (raw codec) as a whole file, then loading it; recomputing prefill from the text (no transfer). The
link is throttled in the client: every response byte passes one shared token bucket at the given rate, so
concurrent range requests share the link as they would share a real one (no added latency per request).

Then the server alone on loopback: `--clients` threads reading random 1 MiB ranges for `--seconds`.
One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from common import DEFAULT_CORPUS, corpus, emit, environment, spread
from kvcli.codecs.presets import make_codec

from kvcli.container import format, kvfile
from kvcli.modeling import inference, models
from kvcli.modeling.kvcache import KVCache
from kvcli.reuse import pipeline
from kvcli.storage import remote, store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from servers import CacheServer  # noqa: E402

QUESTION = "\nQuestion: What is this document about?\nAnswer:"
MIB = 1 << 20


class Link:
    """One shared link of `bits_per_s`: each chunk waits until the bytes before it have crossed."""

    def __init__(self, bits_per_s: float):
        self.bytes_per_s = bits_per_s / 8
        self.lock = threading.Lock()
        self.free_at = 0.0

    def cross(self, n: int) -> None:
        with self.lock:
            start = max(time.perf_counter(), self.free_at)
            self.free_at = start + n / self.bytes_per_s
            done = self.free_at
        delay = done - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


class ThrottledStream(httpx.SyncByteStream):
    def __init__(self, inner, link: Link):
        self.inner, self.link = inner, link

    def __iter__(self):
        for chunk in self.inner:
            self.link.cross(len(chunk))
            yield chunk

    def close(self) -> None:
        self.inner.close()


class ThrottledTransport(httpx.BaseTransport):
    def __init__(self, link: Link):
        self.inner, self.link = httpx.HTTPTransport(), link

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        return httpx.Response(response.status_code, headers=response.headers,
                              stream=ThrottledStream(response.stream, self.link), extensions=response.extensions)

    def close(self) -> None:
        self.inner.close()


class TraceLink(Link):
    """A link whose rate follows `trace` ([(bits_per_s, seconds), ...], repeated), entered `offset` seconds in.
    Past `give_up_at` (perf_counter) a transfer raises TooLate: the run has missed every deadline."""

    def __init__(self, trace: list[tuple[float, float]], offset: float, give_up_at: float = math.inf):
        self.trace, self.period = trace, sum(d for _, d in trace)
        self.origin = time.perf_counter() - offset
        self.lock = threading.Lock()
        self.free_at = 0.0
        self.give_up_at = give_up_at

    def _phase(self, t: float) -> tuple[float, float]:
        """The rate at time t, in bytes/s, and when it next changes."""
        into = (t - self.origin) % self.period
        for bits, seconds in self.trace:
            if into < seconds:
                return bits / 8, t + (seconds - into)
            into -= seconds
        return self.trace[0][0] / 8, t + self.trace[0][1]

    def cross(self, n: int) -> None:
        with self.lock:
            t = max(time.perf_counter(), self.free_at)
            while n > 0:
                rate, change = self._phase(t)
                fits = (change - t) * rate
                if fits >= n:
                    t += n / rate
                    n = 0
                else:
                    n -= fits
                    t = change
            self.free_at = t
        if t > self.give_up_at:
            raise TooLate()
        delay = t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


class TooLate(Exception):
    pass


def first_token(lm, kv, prompt: list[int]) -> int:
    return int(inference.logits_after(lm, kv, prompt)[-1].argmax())


def ttft_stream(lm, url: str, prompt: list[int], rate: float) -> tuple[float, int]:
    t0 = time.perf_counter()
    with remote.open_source(url, transport=ThrottledTransport(Link(rate))) as src:
        kv = pipeline.load_cache(src, src.header, lm).kv
    return time.perf_counter() - t0, first_token(lm, kv, prompt)


def ttft_file(lm, url: str, prompt: list[int], rate: float, tmp: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    path = tmp / "fetched.kvc"
    with httpx.Client(transport=ThrottledTransport(Link(rate)), timeout=600) as client:
        with client.stream("GET", url) as response, open(path, "wb") as fh:
            response.raise_for_status()
            for chunk in response.iter_bytes(MIB):
                fh.write(chunk)
    with format.FileSource(path) as src:
        kv = pipeline.load_cache(src, format.read_header(src), lm).kv
    return time.perf_counter() - t0, first_token(lm, kv, prompt)


def ttft_prefill(lm, ids: list[int], prompt: list[int]) -> tuple[float, int]:
    t0 = time.perf_counter()
    token = first_token(lm, None, ids + prompt)
    return time.perf_counter() - t0, token


def median_of(fn, repeats: int) -> tuple[list[float], int]:
    times, token = [], None
    for _ in range(repeats):
        seconds, token = fn()
        times.append(seconds)
    return times, token


def throughput(url: str, keys_sizes: list[tuple[str, int]], clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine = []
        with httpx.Client(timeout=30) as http:
            while time.perf_counter() < stop:
                key, size = keys_sizes[rng.randrange(len(keys_sizes))]
                start = rng.randrange(max(1, size - MIB))
                t0 = time.perf_counter()
                r = http.get(f"{url}/v1/caches/{key}", headers={"Range": f"bytes={start}-{start + MIB - 1}"})
                if r.status_code != 206 or len(r.content) != min(MIB, size - start):
                    with lock:
                        errors[0] += 1
                mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"requests": len(lat), "errors": errors[0], "seconds": round(wall, 3),
            "req_per_s": round(len(lat) / wall, 1), "mb_per_s": round(len(lat) * MIB / wall / 1e6, 1),
            "p50_ms": round(1000 * statistics.median(lat), 2), "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 2)}


TRACE = [(1e9, 1.0), (20e6, 1.5)]  # bits/s and seconds, repeated
LEVELS = ("lossless", "high", "balanced", "small")


def logprobs(lm, kv, prompt: list[int]) -> torch.Tensor:
    return torch.log_softmax(inference.logits_after(lm, kv, prompt).float(), -1)


def kl(exact: torch.Tensor, got: torch.Tensor) -> float:
    """Mean over the question's positions of KL(exact || got), in nats."""
    return float((exact.exp() * (exact - got)).sum(-1).mean())


def run_fixed(lm, url: str, prompt: list[int], link: TraceLink, exact: torch.Tensor) -> dict:
    t0 = time.perf_counter()
    try:
        with remote.open_source(url, transport=ThrottledTransport(link)) as src:
            kv = pipeline.load_cache(src, src.header, lm).kv
    except TooLate:
        return {"ttft_s": None, "kl": None}
    got = logprobs(lm, kv, prompt)
    return {"ttft_s": time.perf_counter() - t0, "kl": kl(exact, got)}


def run_controller(lm, base: str, key: str, deadline: float, prompt: list[int], link: TraceLink,
                   exact: torch.Tensor) -> dict:
    from kvcli.reuse.controller import Stream, remember_first_token

    target = store.ServerStore(base, transport=ThrottledTransport(link), timeout_s=deadline + 1.0)
    t0 = time.perf_counter()
    try:
        stream = Stream(lm, target, key, deadline, "small", len(prompt))
        kv = stream.run()
    except TooLate:
        return {"ttft_s": None, "kl": None, "choices": None}
    finally:
        target.close()
    t1 = time.perf_counter()
    got = logprobs(lm, kv, prompt)
    remember_first_token(lm, time.perf_counter() - t1)  # as generate does after its first answer
    choices = [c["choice"] for c in stream.report["chunks"] if "failed" not in c]
    return {"ttft_s": time.perf_counter() - t0, "kl": kl(exact, got), "choices": choices,
            "predicted_ttft_s": stream.report["predicted_ttft_s"]}


def trace_bench(args, lm, env: dict) -> None:
    from kvcli.reuse.controller import Speeds
    from kvcli.reuse.ingest import encode_file

    prompt = inference.prompt_ids(lm, QUESTION)
    period = sum(d for _, d in TRACE)
    offsets = [period * i / args.offsets for i in range(args.offsets)]
    results: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        st = store.open_store(str(root), create=True)
        docs = []
        for doc in corpus(args.corpus):
            full = inference.document_ids(lm, doc.read_text())
            for n in args.tokens or [256, 1024]:
                ids = full[:n]
                kv = inference.prefill(lm, ids, attention=True)  # one prefill, one encode per level
                keys = {}
                for quality in LEVELS:
                    meta, parts = pipeline.encode_cache(kv, lm.identity, pipeline.codec_for(quality, lm),
                                                        args.chunk_tokens)
                    keys[quality] = st.put(None, encode_file(meta, parts))
                docs.append((doc.name, ids, keys, logprobs(lm, kv, prompt)))
        with CacheServer(root, "--log-level", "warning") as srv:
            name, ids, keys, exact = docs[0]  # untimed once: lazy initialisation is not a network cost
            run_fixed(lm, f"{srv.url}/v1/caches/{keys['small']}", prompt, TraceLink(TRACE, 0.0), exact)
            for name, ids, keys, exact in docs:
                t0 = time.perf_counter()
                first_token(lm, None, ids + prompt)
                recompute_s = time.perf_counter() - t0
                speeds = Speeds.recall(lm)  # the controller's prefill cost: measured on this machine, kept
                speeds.measure("prefill_s_per_token", recompute_s / len(ids + prompt))
                speeds.keep(lm)
                rows = {("recompute", None): [{"ttft_s": recompute_s, "kl": 0.0}] * len(offsets)}
                for quality in LEVELS:
                    rows[(quality, None)] = [
                        run_fixed(lm, f"{srv.url}/v1/caches/{keys[quality]}", prompt,
                                  TraceLink(TRACE, off, time.perf_counter() + args.give_up_s), exact)
                        for off in offsets]
                for deadline in args.deadline or [0.5, 1.0, 2.0]:
                    rows[("controller", deadline)] = [
                        run_controller(lm, srv.url, keys["lossless"], deadline, prompt,
                                       TraceLink(TRACE, off, time.perf_counter() + args.give_up_s), exact)
                        for off in offsets]
                for (method, deadline), runs in rows.items():
                    emit({"what": "trace_runs", "document": name, "tokens": len(ids), "method": method,
                          "deadline_s": deadline, "runs": [{k: (round(v, 4) if isinstance(v, float) else v)
                                                            for k, v in r.items()} for r in runs],
                          "offsets_s": offsets, "trace": TRACE, "model": lm.name, **env})
                    results.setdefault((len(ids), method, deadline), []).append(runs)
    summarize(results, args.deadline or [0.5, 1.0, 2.0], env)
    judge(results, args.deadline or [0.5, 1.0, 2.0], env)


def summarize(results: dict, deadlines: list[float], env: dict) -> None:
    """Per document length, deadline and method: deadlines met, median time to first token, mean KL."""
    for tokens in sorted({t for t, _, _ in results}):
        for deadline in deadlines:
            for (t, method, d), per_doc in sorted(results.items(), key=lambda kv: str(kv[0])):
                if t != tokens or d not in (None, deadline):
                    continue
                runs = [r for doc_runs in per_doc for r in doc_runs]
                met = [r["ttft_s"] is not None and r["ttft_s"] <= deadline for r in runs]
                done = [r for r in runs if r["ttft_s"] is not None]
                emit({"what": "trace_summary", "tokens": tokens, "deadline_s": deadline, "method": method,
                      "runs": len(runs), "met": round(sum(met) / len(runs), 3),
                      "ttft_median_s": round(statistics.median([r["ttft_s"] for r in done]), 3) if done else None,
                      "kl_mean": round(statistics.mean([r["kl"] for r in done]), 5) if done else None,
                      "kl_mean_met": round(statistics.mean([r["kl"] for r, m in zip(runs, met) if m]), 5)
                      if any(met) else None, **env})


# Two KLs this close are the same quality: recomputed chunks differ from one whole prefill by rounding (about 1e-6
# nats), and no two stored levels were ever measured closer than 7e-4 apart.
SAME_KL = 1e-4


def judge(results: dict, deadlines: list[float], env: dict) -> None:
    """The issue's goal, run by run (the same document entering the trace at the same point). Where recomputing
    met the deadline: did the controller, and, where some fixed level met it too, with KL no higher than the best
    such level's (`*_there`: the goal as the issue words it, "wherever recompute alone could meet them"). And over
    every run where some fixed level met the deadline (`fixed_met`, `controller_as_good`): the stricter reading,
    against levels that met it only because the link sped up later, which no controller can know in advance."""
    met = lambda r, d: r["ttft_s"] is not None and r["ttft_s"] <= d  # noqa: E731
    names = ("recompute_met", "controller_met_there", "fixed_met_there", "controller_as_good_there", "fixed_met",
             "controller_as_good")
    totals = dict.fromkeys(names, 0)
    for tokens in sorted({t for t, _, _ in results}):
        for deadline in deadlines:
            cell = dict.fromkeys(names, 0)
            for doc, runs in enumerate(results[(tokens, "controller", deadline)]):
                for i, run in enumerate(runs):
                    there = met(results[(tokens, "recompute", None)][doc][i], deadline)
                    meeting = [results[(tokens, q, None)][doc][i] for q in LEVELS]
                    meeting = [r["kl"] for r in meeting if met(r, deadline)]
                    good = met(run, deadline) and bool(meeting) and run["kl"] <= min(meeting or [0.0]) + SAME_KL
                    cell["recompute_met"] += there
                    cell["controller_met_there"] += there and met(run, deadline)
                    cell["fixed_met_there"] += there and bool(meeting)
                    cell["controller_as_good_there"] += there and good
                    cell["fixed_met"] += bool(meeting)
                    cell["controller_as_good"] += good
            emit({"what": "trace_goal", "tokens": tokens, "deadline_s": deadline, **cell, **env})
            for k in totals:
                totals[k] += cell[k]
    emit({"what": "trace_goal", "tokens": "all", "deadline_s": "all", **totals, **env})


def judge_file(path: Path, env: dict) -> None:
    """The summary and the goal again, from the trace_runs lines of an earlier --trace run."""
    results: dict[tuple, list[list[dict]]] = {}
    deadlines: list[float] = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("what") == "trace_runs":
            results.setdefault((row["tokens"], row["method"], row["deadline_s"]), []).append(row["runs"])
            if row["deadline_s"] is not None and row["deadline_s"] not in deadlines:
                deadlines.append(row["deadline_s"])
    summarize(results, deadlines, env)
    judge(results, deadlines, env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--rate-mbit", type=float, action="append")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quality", default="balanced")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--trace", action="store_true", help="the streaming controller over a bandwidth trace")
    ap.add_argument("--tokens", type=int, action="append", help="with --trace: cut documents to this many tokens")
    ap.add_argument("--deadline", type=float, action="append", help="with --trace: seconds")
    ap.add_argument("--offsets", type=int, default=3, help="with --trace: runs per setting, entering the trace "
                    "at evenly spaced points")
    ap.add_argument("--chunk-tokens", type=int, default=128)
    ap.add_argument("--give-up-s", type=float, default=5.0)
    ap.add_argument("--judge", type=Path, help="summarize and judge the trace_runs lines of an earlier --trace run")
    args = ap.parse_args()
    if args.judge:
        judge_file(args.judge, environment())
        return
    rates = args.rate_mbit or [100.0, 1000.0]
    env = environment()
    lm = models.load(None, "float32")
    if args.trace:
        trace_bench(args, lm, env)
        return
    prompt = inference.prompt_ids(lm, QUESTION)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "store"
        st = store.open_store(str(root), create=True)
        docs = []
        for doc in corpus(args.corpus):
            ids = inference.document_ids(lm, doc.read_text())
            kv = inference.prefill(lm, ids)
            fp16 = KVCache(kv.token_ids, [k.half() for k in kv.keys], [v.half() for v in kv.values])
            keys = {}
            for name, cache, codec in ((args.quality, kv, pipeline.codec_for(args.quality, lm)),
                                       ("fp16", fp16, make_codec("raw"))):
                path = str(tmp / f"{doc.stem}.{name}.kvc")
                pipeline.write_cache(path, cache, lm.identity, codec, kvfile.DEFAULT_CHUNK_TOKENS)
                keys[name] = st.put(None, path)
            docs.append((doc, ids, keys))
        with CacheServer(root, "--log-level", "warning") as srv:
            sizes = [(k, st.size(k)) for _, _, keys in docs for k in keys.values()]
            if not args.skip_ttft:
                # Untimed once: lazy initialisation (codec tables, kernels, allocator) is not a network cost.
                doc, ids, keys = docs[0]
                ttft_stream(lm, f"{srv.url}/v1/caches/{keys[args.quality]}", prompt, max(rates) * 1e6)
                ttft_file(lm, f"{srv.url}/v1/caches/{keys['fp16']}", prompt, max(rates) * 1e6, tmp)
                ttft_prefill(lm, ids[:256], prompt)
                for doc, ids, keys in docs:
                    prefill_times, prefill_token = median_of(lambda: ttft_prefill(lm, ids, prompt), args.repeats)
                    for rate_mbit in rates:
                        rate = rate_mbit * 1e6
                        stream_url, file_url = (f"{srv.url}/v1/caches/{keys[n]}" for n in (args.quality, "fp16"))
                        stream_times, stream_token = median_of(lambda: ttft_stream(lm, stream_url, prompt, rate),
                                                               args.repeats)
                        file_times, file_token = median_of(lambda: ttft_file(lm, file_url, prompt, rate, tmp),
                                                           args.repeats)
                        emit({"what": "ttft_over_link", "document": doc.name, "tokens": len(ids),
                              "link_mbit_s": rate_mbit, "stream_quality": args.quality,
                              "stream_bytes": st.size(keys[args.quality]), "fp16_bytes": st.size(keys["fp16"]),
                              "ttft_stream_s": spread(stream_times), "ttft_fp16_file_s": spread(file_times),
                              "ttft_prefill_s": spread(prefill_times),
                              "stream_vs_file": round(statistics.median(file_times) / statistics.median(stream_times), 2),
                              "stream_vs_prefill": round(statistics.median(prefill_times) / statistics.median(stream_times), 2),
                              "first_tokens": {"stream": stream_token, "fp16_file": file_token, "prefill": prefill_token},
                              "repeats": args.repeats, "model": lm.name, "dtype": "float32", **env})
            stats = throughput(srv.url, sizes, args.clients, args.seconds)
            emit({"what": "server_loopback", "range_bytes": MIB, "clients": args.clients, "store": "directory",
                  **stats, **env})


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
