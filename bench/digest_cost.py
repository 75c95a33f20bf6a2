"""Cost of the weights digest on the default model's converted safetensors, and its extrapolation to 16 GB.

    python bench/digest_cost.py [--repeats 3]

One JSON line per measurement: hash throughput (SHA-256 vs BLAKE3 on the weight file's bytes in memory), the
first digest of a file (full read; page cache dropped with posix_fadvise, and warm), and a later one (the digest
cache hit: headers and one small JSON file); the same for the tokenizer digest (memoized by its serialized
text). The model must have been loaded once (`kvcli` converts it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import blake3
from common import emit, environment, spread
from transformers import AutoTokenizer

from kvcli.container import identity
from kvcli.modeling import models

SIXTEEN_GB = 16e9


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    directory = models.converted_dir(models.default_gguf_path())
    files = identity.weight_files(directory)
    size = sum(f.stat().st_size for f in files)
    env = environment()
    data = files[0].read_bytes()
    hashes = {"sha256": lambda: hashlib.sha256(data).digest(), "blake3": lambda: blake3.blake3(data).digest()}
    for name, fn in hashes.items():
        times = [seconds(fn) for _ in range(args.repeats)]
        emit({"what": "hash_in_memory", "hash": name, "bytes": len(data), **spread(times),
              "GB_per_s": round(len(data) / min(times) / 1e9, 3), **env})
    del data
    with tempfile.TemporaryDirectory() as cache:
        os.environ["KVCLI_CACHE_DIR"] = cache
        for state in ("cold", "warm"):
            times = []
            for _ in range(args.repeats):
                for entry in Path(cache, "digests").glob("*.json"):
                    entry.unlink()
                if state == "cold":
                    for f in files:
                        drop_page_cache(f)
                times.append(seconds(lambda: identity.weights_digest(files)))
            first = min(times)
            emit({"what": "weights_digest_first", "page_cache": state, "bytes": size, **spread(times),
                  "GB_per_s": round(size / first / 1e9, 3),
                  "extrapolated_16GB_s": round(first * SIXTEEN_GB / size, 1), **env})
        times = [seconds(lambda: identity.weights_digest(files)) for _ in range(args.repeats)]
        emit({"what": "weights_digest_later", "bytes": size, "files": len(files), **spread(times), **env})
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        times = []
        for _ in range(args.repeats):
            for entry in Path(cache, "digests").glob("*.json"):
                entry.unlink()
            times.append(seconds(lambda: identity.tokenizer_digest(tokenizer)))
        emit({"what": "tokenizer_digest_first", **spread(times), **env})
        times = [seconds(lambda: identity.tokenizer_digest(tokenizer)) for _ in range(args.repeats)]
        emit({"what": "tokenizer_digest_later", **spread(times), **env})


if __name__ == "__main__":
    main()
