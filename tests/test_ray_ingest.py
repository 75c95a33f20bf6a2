"""Ray Data scale-out: a local Ray instance with 2 CPUs writes the same files as `kvcli prefill --out-dir`,
into a directory and into S3 (moto_server on loopback), through examples/ray_ingest.py."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
boto3 = pytest.importorskip("boto3")

from servers import moto_server  # noqa: E402

pytestmark = pytest.mark.slow  # starts servers, moto or Ray: outside the fast `-m 'not slow'` loop

EXAMPLE = Path(__file__).parent.parent / "examples" / "ray_ingest.py"
EPOCH = "1767225600"
WORDS = "harbour lighthouse keeper tide herring cliff lamp steps evening dawn".split()


def documents() -> list[dict]:
    docs = [{"id": f"doc-{i}", "text": f"Document {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(6 + i)),
             "lang": "en"} for i in range(12)]
    docs[5]["text"] = "   "  # reported as failed by both, the others carry on
    return docs


def load_example():
    spec = importlib.util.spec_from_file_location("ray_ingest", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ray_writes_the_files_the_cli_writes(cli, tiny_model_dir, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    llama = str(tiny_model_dir("llama"))
    docs = documents()
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(d) + "\n" for d in docs))
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist(docs), parquet)
    settings = ["--model", llama, "--batch-tokens", "1"]  # one at a time: the same float operations, the same bytes

    ref = tmp_path / "cli"
    result = cli("prefill", "--jsonl", jsonl, "--out-dir", ref, "-q", "lossless", *settings)
    assert result.exit_code == 3
    expected = {json.loads(line)["id"]: json.loads(line) for line in result.stdout.splitlines()}

    example = load_example()
    with moto_server() as aws:
        for name, value in aws.items():
            monkeypatch.setenv(name, value)
        boto3.client("s3").create_bucket(Bucket="caches")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"SOURCE_DATE_EPOCH": EPOCH, "OMP_NUM_THREADS": "1", **aws}})
        try:
            runs = {"dir": (jsonl, str(tmp_path / "ray")), "s3": (parquet, "s3://caches/ray")}
            for kind, (source, store) in runs.items():
                manifest = tmp_path / f"{kind}.jsonl"
                started = time.perf_counter()
                code = example.main([str(source), "--store", store, "--manifest", str(manifest), "--actors", "2",
                                     "--actor-cpus", "0.5", "--blocks", "3", "--batch-size", "4", "--quality", "lossless", *settings])
                print(f"{kind}: {time.perf_counter() - started:.1f} s")
                assert code == 1  # one document failed
                rows = {r["id"]: r for r in map(json.loads, manifest.read_text().splitlines())}
                assert rows.keys() == expected.keys()
                for doc_id, want in expected.items():
                    got = rows[doc_id]
                    assert (got["status"], got["key"], got["tokens"], got["bytes"], got["lang"]) == \
                        (want["status"], want["key"], want["tokens"], want["bytes"], "en"), doc_id
                    if want["status"] != "written":
                        assert got["error"] == want["error"]
                        continue
                    local = (ref / f"{want['key']}.kvc").read_bytes()
                    if kind == "dir":
                        assert got["path"] == str(tmp_path / "ray" / f"{want['key']}.kvc")
                        assert Path(got["path"]).read_bytes() == local, doc_id
                    else:
                        assert got["path"] == f"s3://caches/ray/{want['key']}.kvc"
                        body = boto3.client("s3").get_object(Bucket="caches", Key=f"ray/{want['key']}.kvc")["Body"]
                        assert body.read() == local, doc_id
            assert sorted(os.listdir(tmp_path / "ray")) == sorted(os.listdir(ref))
        finally:
            ray.shutdown()
