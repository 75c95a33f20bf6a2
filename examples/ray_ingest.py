"""Prefill a document collection on a Ray cluster into a kvcli store, and write the manifest.

    pip install 'kvcli[ray]'
    python examples/ray_ingest.py docs.jsonl --store s3://bucket/caches --manifest manifest.jsonl --actors 8
    python examples/ray_ingest.py docs.parquet --store /shared/caches --manifest manifest.jsonl

Input rows need an "id" and a "text" column (JSONL: one {"id": ..., "text": ...} object per line; Parquet: two
columns); other columns are carried through to the manifest. Each actor loads the model once, writes its .kvc
files to the store itself, and sends back only manifest rows, which this script writes as JSON lines, one per
document or segment (docs/ingest.md). It exits 1 if any document failed. Connects to the cluster named by
RAY_ADDRESS, or starts a local one.
"""

from __future__ import annotations

import argparse
import json
import sys


def read_documents(path: str, blocks: int | None = None):
    """Documents as a Dataset; `blocks` splits a small input (one block to Ray) so that every actor gets a share."""
    import ray.data

    if path.endswith(".parquet") or path.rstrip("/").endswith("parquet"):
        docs = ray.data.read_parquet(path)
    else:
        docs = ray.data.read_json(path, lines=True)
    return docs.repartition(blocks) if blocks else docs


def ingest(path: str, store: str, manifest: str, actors: int = 2, batch_size: int = 16, actor_cpus: float = 1.0,
           blocks: int | None = None, **settings) -> dict:
    """Run the pipeline; returns the count of manifest rows per status. The actor pool holds actors x actor_cpus
    CPUs for as long as it runs: leave some for the tasks that read the input, or they wait forever."""
    from kvcli.reuse.ingest import PrefillBatches

    docs = read_documents(path, blocks)
    rows = docs.map_batches(PrefillBatches, fn_constructor_kwargs={"store": store, **settings},
                            concurrency=actors, batch_size=batch_size, num_cpus=actor_cpus)
    counts = {"written": 0, "skipped": 0, "failed": 0}
    with open(manifest, "w", encoding="utf-8") as out:
        for row in rows.iter_rows():  # streamed: the manifest never has to fit in the driver's memory at once
            out.write(json.dumps(dict(row), ensure_ascii=False, default=str) + "\n")
            counts[row["status"]] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="JSONL or Parquet file (or directory) of documents")
    parser.add_argument("--store", required=True, help="directory, s3://bucket/prefix, or kvcli server URL")
    parser.add_argument("--manifest", required=True, help="output JSON lines, one per document or segment")
    parser.add_argument("--actors", type=int, default=2, help="actors, each with its own copy of the model")
    parser.add_argument("--batch-size", type=int, default=16, help="documents handed to an actor at a time")
    parser.add_argument("--actor-cpus", type=float, default=1.0,
                        help="CPUs each actor reserves; the pool must leave some free for reading the input")
    parser.add_argument("--blocks", type=int, default=None,
                        help="split the input into this many blocks (Ray picks by size; a small file is one block)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quality", default="balanced")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--split", action="store_true")
    parser.add_argument("--batch-tokens", type=int, default=None, help="padded tokens per forward pass")
    args = parser.parse_args(argv)

    import ray

    if not ray.is_initialized():
        ray.init()
    settings = {"model": args.model, "dtype": args.dtype, "quality": args.quality, "max_tokens": args.max_tokens,
                "split": args.split}
    if args.batch_tokens is not None:
        settings["batch_tokens"] = args.batch_tokens
    counts = ingest(args.input, args.store, args.manifest, args.actors, args.batch_size, args.actor_cpus,
                    args.blocks, **settings)
    print(f"ray_ingest: {counts['written']} written, {counts['skipped']} skipped, {counts['failed']} failed; "
          f"manifest in {args.manifest}", file=sys.stderr)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
