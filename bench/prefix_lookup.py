"""The prefix index: how long `store.lookup_prefix` takes for prompts of growing length, on a directory, on S3
(moto_server on loopback, behind a proxy that delays every forwarded piece by half a round trip) and through
`kvcli serve-cache`; reading the first N tokens of a hit with kvfile.PrefixReader; and `rebuild_index` of the
directory after `--stale` entries of files that are gone were planted in its index.

    python bench/prefix_lookup.py [--tokens 2048 --tokens 8192 --tokens 32768] [--rtt-ms 20] [--repeats 5]
                                  [--stale 5000]

One stored file per prompt length (raw codec, 2 layers, 1 head of 8: the lookup reads headers only) and
`--others` unrelated files. The prompt is that file's tokens and a 50-token question. One JSON line per
measurement; `round_trips` is the median time over the link's round trip.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import emit, environment, spread, timed

from kvcli.codecs.presets import make_codec
from kvcli.container import format, kvfile
from kvcli.modeling.kvcache import KVCache
from kvcli.reuse.ingest import encode_file
from kvcli.storage import store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from servers import MODEL, CacheServer, free_port, moto_server  # noqa: E402


def cache_bytes(ids: list[int], seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    n = len(ids)
    kv = KVCache(ids, [torch.randn(1, n, 8, generator=gen) for _ in range(2)],
                 [torch.randn(1, n, 8, generator=gen) for _ in range(2)])
    meta, parts = kvfile.encode(kv, MODEL, make_codec("raw"), chunk_tokens=256)
    return encode_file(meta, parts)


class DelayProxy:
    """TCP on loopback to `port`, every piece forwarded after `delay` seconds each way: a link with that much
    added round trip (2 * delay) and no bandwidth limit."""

    def __init__(self, port: int, delay: float):
        self.target, self.delay = port, delay
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for s in (client, upstream):  # else Nagle and delayed ACKs add 40 ms to a request sent in two pieces
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopping = True
        self.sock.close()


def fill(st, lengths: list[int], others: int) -> dict[int, list[int]]:
    gen = torch.Generator().manual_seed(0)
    docs = {}
    for i, n in enumerate(lengths):
        docs[n] = torch.randint(0, 50000, (n,), generator=gen).tolist()
        st.put(None, cache_bytes(docs[n], i))
    for j in range(others):
        st.put(None, cache_bytes(torch.randint(0, 50000, (600,), generator=gen).tolist(), 100 + j))
    return docs


def measure(kind: str, st, docs: dict[int, list[int]], repeats: int, rtt_s: float, facts: dict) -> None:
    for n, ids in docs.items():
        prompt = ids + list(range(50))
        times, hit = timed(lambda: st.lookup_prefix(MODEL, "float32", prompt), repeats)
        assert hit is not None and hit.tokens == n // 256 * 256, hit
        line = {"what": "lookup_prefix", "store": kind, "prompt_tokens": len(prompt), "chunks": n // 256,
                "rtt_ms": rtt_s * 1000, "seconds": spread(times), **facts}
        if rtt_s:
            line["round_trips"] = round(line["seconds"]["median"] / rtt_s, 2)
        emit(line)


def rebuild(local: store.DirStore, stale: int, repeats: int, facts: dict) -> None:
    """Each time: `stale` entries under as many chunk folders, all naming a file that is not stored, then one
    rebuild_index, which removes them (and rewrites the stored files' own entries)."""
    times = []
    for _ in range(repeats):
        for i in range(stale):
            folder = local.root / ".index" / os.urandom(32).hex()
            folder.mkdir(parents=True)
            (folder / ("e" * 64)).write_bytes(b"{}\n")  # planted without fsync: only the rebuild is timed
        started = time.perf_counter()
        summary = local.rebuild_index()
        times.append(time.perf_counter() - started)
        assert summary["removed"] == stale, summary
    emit({"what": "rebuild_index", "store": "dir", "stale_entries": stale, "files": summary["files"],
          "entries": summary["entries"], "seconds": spread(times), **facts})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, action="append")
    parser.add_argument("--others", type=int, default=20)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stale", type=int, default=5000)
    args = parser.parse_args()
    lengths = args.tokens or [2048, 8192, 32768]
    facts = environment()
    rtt = args.rtt_ms / 1000
    with tempfile.TemporaryDirectory() as tmp:
        local = store.DirStore(Path(tmp) / "dir", create=True)
        docs = fill(local, lengths, args.others)
        measure("dir", local, docs, args.repeats, 0.0, facts)
        with CacheServer(local.root) as server:
            proxy = DelayProxy(int(server.url.rsplit(":", 1)[1]), rtt / 2)
            client = store.ServerStore(f"http://127.0.0.1:{proxy.port}")
            measure("serve-cache", client, docs, args.repeats, rtt, facts)
            client.close()
            proxy.close()
        for n, ids in docs.items():  # reading the first 2,048 tokens of the hit, on a directory
            with local.open(local.lookup_prefix(MODEL, "float32", ids).file_key) as src:
                header = format.read_header(src)
                times, _ = timed(lambda: kvfile.PrefixReader(src, header, 2048).cache(), args.repeats)
            emit({"what": "prefix_read", "store": "dir", "file_tokens": n, "tokens": 2048, "seconds": spread(times),
                  **facts})
        if args.stale:
            rebuild(local, args.stale, args.repeats, facts)
        with moto_server() as env:
            os.environ.update(env)
            import boto3

            boto3.client("s3").create_bucket(Bucket="bench")
            port = int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
            proxy = DelayProxy(port, rtt / 2)
            os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"
            s3 = store.open_store("s3://bench/p")
            docs = fill(s3, lengths, args.others)
            measure("s3-moto", s3, docs, args.repeats, rtt, facts)
            proxy.close()


if __name__ == "__main__":
    main()
