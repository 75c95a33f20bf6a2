"""`kvcli prefill --out-dir`: many documents into a store, one JSON line each, idempotent, sharded, split."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvcli.container import format, kvfile
from kvcli.errors import StorageError
from kvcli.modeling import inference
from kvcli.reuse import ingest

TEXTS = {
    "harbour.txt": "The harbour town of Velmora sits between two cliffs.",
    "keeper.txt": "Its lighthouse keeper, Anna Brisk, has kept the lamp burning for thirty years.",
    "steps.txt": "Every evening she climbs 112 steps.",
    "boats.txt": "Fishing boats leave before dawn and come back with the tide.",
}


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    for i, (name, text) in enumerate(TEXTS.items()):
        (root / ("sub" if i % 2 else "") / name).write_text(text + "\n")
    (root / ".hidden.txt").write_text("never read")
    return root


def lines_of(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def run_store(cli, *args):
    return cli("prefill", *[str(a) for a in args])


def test_directory_is_walked_and_every_document_gets_a_line_and_a_file(cli, llama, corpus, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    result = run_store(cli, corpus, "--out-dir", store, "--model", llama, "-q", "lossless")
    assert result.exit_code == 0, result.stderr
    lines = lines_of(result)
    assert sorted(Path(line["id"]).name for line in lines) == sorted(TEXTS)  # hidden file left out
    for line in lines:
        assert line["status"] == "written" and line["error"] is None
        assert line["path"] == str(store / f"{line['key']}.kvc")
        assert line["bytes"] == os.path.getsize(line["path"])
        with format.FileSource(line["path"]) as src:
            header = format.read_header(src)
            assert header.num_tokens == line["tokens"]
            assert line["bits_per_element"] == round(line["bytes"] * 8 / header.elements(), 3)
            assert kvfile.decode(src, header).num_tokens == line["tokens"]
    assert sorted(os.listdir(store)) == sorted(f"{line['key']}.kvc" for line in lines)
    assert "4/4 documents (4 written, 0 skipped, 0 failed)" in result.stderr


def test_rerun_skips_everything_and_writes_nothing(cli, llama, corpus, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    first = lines_of(run_store(cli, corpus, "--out-dir", store, "--model", llama))
    mtimes = {p: p.stat().st_mtime_ns for p in store.iterdir()}
    again = run_store(cli, corpus, "--out-dir", store, "--model", llama)
    assert again.exit_code == 0
    second = lines_of(again)
    assert [line["status"] for line in second] == ["skipped"] * len(TEXTS)
    assert [(line["id"], line["key"], line["path"], line["tokens"]) for line in second] == \
        [(line["id"], line["key"], line["path"], line["tokens"]) for line in first]
    assert {p: p.stat().st_mtime_ns for p in store.iterdir()} == mtimes


def test_one_at_a_time_files_equal_the_single_document_command(cli, llama, corpus, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    lines = lines_of(run_store(cli, corpus, "--out-dir", store, "--model", llama, "-q", "lossless",
                               "--batch-tokens", "1"))
    for line in lines:
        single = tmp_path / "single.kvc"
        assert cli("prefill", line["id"], "-o", single, "--model", llama, "-q", "lossless").exit_code == 0
        assert Path(line["path"]).read_bytes() == single.read_bytes(), line["id"]


def test_batched_files_hold_the_caches_of_one_at_a_time(cli, llama, corpus, tmp_path, tiny_lm):
    stores = {}
    for batch in ("1", "4096"):
        stores[batch] = tmp_path / f"store-{batch}"
        stores[batch].mkdir()
        result = run_store(cli, corpus, "--out-dir", stores[batch], "--model", llama, "-q", "lossless",
                           "--batch-tokens", batch)
        assert result.exit_code == 0
    assert sorted(os.listdir(stores["1"])) == sorted(os.listdir(stores["4096"]))  # keys do not depend on batching
    for name in os.listdir(stores["1"]):
        kvs = []
        for store in stores.values():
            with format.FileSource(store / name) as src:
                kvs.append(kvfile.decode(src, format.read_header(src)))
        for a, b in zip(kvs[0].keys + kvs[0].values, kvs[1].keys + kvs[1].values):
            assert (a - b).abs().max() <= 1e-4


def test_bad_documents_are_reported_and_the_others_carry_on(cli, llama, corpus, tmp_path):
    (corpus / "latin1.txt").write_bytes("café".encode("latin-1"))
    (corpus / "empty.txt").write_text(" \n")
    store = tmp_path / "store"
    store.mkdir()
    result = run_store(cli, corpus, tmp_path / "missing.txt", str(corpus / "*.none"), "--out-dir", store,
                       "--model", llama)
    assert result.exit_code == 3  # the first failure's class: an input error
    by_name = {Path(line["id"]).name: line for line in lines_of(result)}
    assert by_name["latin1.txt"]["error"].endswith("not UTF-8 text (invalid byte at offset 3)")
    assert by_name["empty.txt"]["error"].endswith("document is empty")
    assert by_name["missing.txt"]["error"].endswith("no such file")
    assert by_name["*.none"]["error"].endswith("no files match")
    assert all(by_name[name]["status"] == "written" for name in TEXTS)
    failed = [line for line in by_name.values() if line["status"] == "failed"]
    assert len(failed) == 4 and all(line["key"] is None and line["path"] is None for line in failed)
    assert len(os.listdir(store)) == len(TEXTS)
    tail = result.stderr.strip().splitlines()
    assert tail[-2].startswith("kvcli: 8/8 documents (4 written, 0 skipped, 4 failed)")
    assert tail[-1] == "Error: 4 of 8 documents failed; their lines on stdout say why"


def test_globs_and_stdin(cli, llama, corpus, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    result = cli("prefill", str(corpus / "**" / "*.txt"), "-", "--out-dir", store, "--model", llama,
                 input=b"A document from stdin.")
    assert result.exit_code == 0, result.stderr
    ids = [line["id"] for line in lines_of(result)]
    assert sorted(Path(i).name for i in ids[:-1]) == sorted(TEXTS) and ids[-1] == "<stdin>"


def test_jsonl_records_carry_their_fields_through(cli, llama, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    records = [{"id": "a", "text": TEXTS["harbour.txt"], "url": "https://x/a", "n": 1},
               {"id": 7, "text": TEXTS["steps.txt"], "path": "mine", "status": "draft"},
               {"id": "empty", "text": ""},
               {"id": "notext"},
               {"id": ["no"], "text": "x"},
               {"id": "number", "text": 5}]
    body = "\n".join(json.dumps(r) for r in records) + "\n\nnot json\n"
    result = cli("prefill", "--jsonl", "-", "--out-dir", store, "--model", llama, input=body.encode())
    assert result.exit_code == 3
    lines = lines_of(result)
    assert [line["id"] for line in lines] == ["a", "7", "empty", "notext", "<stdin>:5", "number", "<stdin>:8"]
    assert lines[0]["url"] == "https://x/a" and lines[0]["n"] == 1 and lines[0]["status"] == "written"
    assert lines[1]["status"] == "written" and lines[1]["extra"] == {"path": "mine", "status": "draft"}
    assert lines[2]["error"] == "empty: document is empty"
    assert lines[3]["error"] == 'notext: no "text" field'
    assert "must be a non-empty string or an integer" in lines[4]["error"]
    assert lines[5]["error"] == 'number: "text" must be a string'
    assert lines[6]["error"].startswith("<stdin>:8: not valid JSON")


def test_jsonl_over_long_line_is_skipped_unread(monkeypatch, tmp_path):
    monkeypatch.setattr(inference, "MAX_DOCUMENT_BYTES", 50)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "big", "text": "x" * 500}) + "\n" + json.dumps({"id": "ok", "text": "y"}) + "\n")
    sources = list(ingest.jsonl_sources(str(path)))
    assert [s.id for s in sources] == [f"{path}:1", "ok"]
    with pytest.raises(Exception, match="line longer than 100 bytes"):
        sources[0].read()
    assert sources[1].read().text == "y"


def test_shards_partition_the_documents_by_a_stable_hash(cli, llama, corpus, tmp_path):
    assert ingest.shard_of("doc-1", 1000) == 401  # SHA-256, the same in every process (hash() is salted)
    seen = []
    for i in range(3):
        store = tmp_path / f"store{i}"
        store.mkdir()
        result = run_store(cli, corpus, "--out-dir", store, "--model", llama, "--shard", f"{i}/3")
        assert result.exit_code == 0
        ids = [line["id"] for line in lines_of(result)]
        assert all(ingest.shard_of(x, 3) == i for x in ids)
        seen += ids
    assert sorted(Path(x).name for x in seen) == sorted(TEXTS)


@pytest.mark.parametrize("shard", ["3/3", "-1/2", "1", "a/b", "0/0"])
def test_bad_shard_is_a_usage_error(cli, llama, corpus, tmp_path, shard):
    result = run_store(cli, corpus, "--out-dir", tmp_path, "--model", llama, "--shard", shard)
    assert result.exit_code == 2 and result.stderr.startswith("Error: --shard")


def test_split_cuts_long_documents_into_segments_on_token_boundaries(cli, llama, tmp_path, tiny_lm):
    lm = tiny_lm("llama")
    text = " ".join(TEXTS.values()) * 3
    ids = inference.document_ids(lm, text)
    doc = tmp_path / "long.txt"
    doc.write_text(text)
    store = tmp_path / "store"
    store.mkdir()
    refused = run_store(cli, doc, "--out-dir", store, "--model", llama, "--max-tokens", "100")
    assert refused.exit_code == 3
    assert f"the document is {len(ids)} tokens, more than the 100 allowed" in lines_of(refused)[0]["error"]
    result = run_store(cli, doc, "--out-dir", store, "--model", llama, "--max-tokens", "100", "--split",
                       "-q", "lossless")
    assert result.exit_code == 0, result.stderr
    lines = lines_of(result)
    count = -(-(len(ids) - 1) // 99)  # each segment: the BOS and up to 99 tokens of the document
    assert [line["id"] for line in lines] == [f"{doc}#{i}" for i in range(count)]
    assert all(line["segments"] == count and line["tokens"] <= 100 for line in lines)
    body = []
    for line in lines:
        with format.FileSource(line["path"]) as src:
            seg = format.read_header(src).token_ids
        assert seg[0] == ids[0]  # every segment starts like a document: with the BOS
        body += seg[1:]
    assert body == ids[1:]


def test_split_needs_room_after_the_special_tokens(tiny_lm):
    with pytest.raises(Exception, match="leaves no room"):
        ingest.split_ids(list(range(10)), [0], 1)


def test_usage_errors_come_before_the_model_loads(cli, corpus, tmp_path):
    missing_model = tmp_path / "no-model"
    cases = [
        (("prefill", corpus / "harbour.txt", corpus / "steps.txt", "-o", tmp_path / "x.kvc"), 2, "-o writes one document"),
        (("prefill", corpus / "harbour.txt", "-o", tmp_path / "x.kvc", "--split"), 2, "-o writes one document"),
        (("prefill", corpus / "harbour.txt"), 2, "give -o FILE for one document, or --out-dir DIR"),
        (("prefill", "--out-dir", tmp_path), 2, "no documents"),
        (("prefill", "-", "--jsonl", "-", "--out-dir", tmp_path), 2, "stdin can be read once"),
        (("prefill", corpus, "--out-dir", corpus / "harbour.txt" / "store"), 8, "cannot create the store"),
        (("prefill", "--jsonl", tmp_path / "none.jsonl", "--out-dir", tmp_path), 3, "no such file"),
    ]
    for args, code, fragment in cases:
        result = cli(*args, "--model", missing_model)
        assert result.exit_code == code, (args, result.stderr)
        assert result.stdout == "" and result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr


def test_missing_store_directory_is_created(cli, llama, corpus, tmp_path):
    store = tmp_path / "new" / "store"
    result = run_store(cli, corpus / "harbour.txt", "--out-dir", store, "--model", llama)
    assert result.exit_code == 0, result.stderr
    assert os.listdir(store) == [lines_of(result)[0]["key"] + ".kvc"]


def test_heartbeat_reports_tokens_inside_a_long_group_of_forward_passes(cli, llama, corpus, tmp_path, monkeypatch):
    """All four documents fall in one window of several forward passes, whose lines come only at its end: the
    heartbeat must still show the tokens through the model meanwhile, and a summary closes the run."""
    from kvcli.modeling import batching

    real = batching.prefill_batch

    def slow_forward(*args, **kwargs):  # the real forward pass, made long enough for several heartbeats
        caches = real(*args, **kwargs)
        time.sleep(0.15)
        return caches

    monkeypatch.setattr(batching, "prefill_batch", slow_forward)
    monkeypatch.setenv("KVCLI_PROGRESS_SECONDS", "0.02")
    store = tmp_path / "store"
    result = run_store(cli, corpus, "--out-dir", store, "--model", llama, "--batch-tokens", "24")
    assert result.exit_code == 0, result.stderr
    total = sum(line["tokens"] for line in lines_of(result))
    beats = [line for line in result.stderr.splitlines() if re.match(r"kvcli: \d", line)]
    assert len(beats) >= 4
    before_any_line = {int(re.search(r"\), ([\d,]+) tokens prefilled", b)[1].replace(",", "")) for b in beats
                       if b.startswith("kvcli: 0/4 documents")}
    assert len(before_any_line - {0}) >= 2, beats  # tokens rose, pass by pass, while no document had finished
    assert max(before_any_line) < total
    assert beats[-1].startswith(f"kvcli: 4/4 documents (4 written, 0 skipped, 0 failed), {total} tokens prefilled")


def test_one_failed_document_is_told_in_the_singular(cli, llama, tmp_path):
    result = run_store(cli, tmp_path / "missing.txt", "--out-dir", tmp_path / "store", "--model", llama)
    assert result.exit_code == 3
    summary, error = result.stderr.splitlines()[-2:]
    assert summary.startswith("kvcli: 1/1 document (0 written, 0 skipped, 1 failed), 0 tokens prefilled in ")
    assert error == "Error: 1 of 1 document failed; its line on stdout says why"


def test_progress_counts_one_document_in_the_singular(tmp_path):
    from kvcli.commands.prefill import Progress

    for total, expected in ((1, "1/1 document ("), (None, "1 document ("), (2, "1/2 documents (")):
        progress = Progress(total)
        progress.counts["written"] = 1
        assert progress.describe().startswith(expected), progress.describe()
    assert Progress(None).describe().startswith("0 documents (")


def test_killed_run_leaves_no_partial_files_and_a_rerun_finishes(cli, llama, tmp_path):
    """SIGTERM halfway through: exit 143, only complete files; the rerun skips those and writes the rest."""
    docs = tmp_path / "docs"
    docs.mkdir()
    # Enough work that the run is still going when the signal comes: 12 one-line documents took 0.1 s in all on
    # a quiet CI machine, and the SIGTERM then arrived after the run had finished.
    count = 40
    for i in range(count):
        (docs / f"d{i:02}.txt").write_text(f"Document number {i}: the tide comes in and goes out. " * 7)
    store = tmp_path / "store"
    store.mkdir()
    cmd = [sys.executable, "-m", "kvcli", "prefill", str(docs), "--out-dir", str(store), "--model", llama,
           "--batch-tokens", "1", "-q", "lossless"]
    # One thread: on a shared, oversubscribed CPU, idle-spinning worker threads slow tiny models tenfold.
    env = dict(os.environ, SOURCE_DATE_EPOCH="1767225600", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = proc.stdout.readline()
    assert json.loads(first)["status"] == "written"
    time.sleep(0.05)  # somewhere in the middle of a later document
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "Error: terminated (SIGTERM)"
    done = [json.loads(line) for line in (first + rest).splitlines()]
    assert 1 <= len(done) < count
    names = [n for n in os.listdir(store) if n != ".index"]
    assert not [n for n in names if n.startswith(".")]  # no temporaries
    assert not [p for p in (store / ".index").rglob(".*")]  # nor among the prefix index's entries
    for name in names:  # every file there is whole
        with format.FileSource(store / name) as src:
            format.read_header(src)
    rerun = cli(*cmd[3:])
    assert rerun.exit_code == 0, rerun.stderr
    lines = lines_of(rerun)
    assert len(lines) == count
    assert {line["key"] for line in lines if line["status"] == "skipped"} == {n[:-4] for n in names}
    assert sum(line["status"] == "written" for line in lines) == count - len(names)


# ---------------------------------------------------------------- options, checked once when built


@pytest.mark.parametrize("fields, message", [
    ({"quality": "best"}, "unknown --quality 'best'"),
    ({"step_scale": 0.0}, "--step-scale must be a finite number above 0"),
    ({"step_scale": float("nan")}, "--step-scale must be a finite number above 0"),
    ({"sinks": -1}, "--sinks must be an integer in [0, 4194304]"),
    ({"sinks": True}, "--sinks must be an integer"),
    ({"chunk_tokens": 0}, "--chunk-tokens must be an integer in [1, 4194304]"),
    ({"backend": "cuda"}, "backend must be torch or triton"),
])
def test_encode_options_are_checked_when_built(fields, message):
    from kvcli.errors import UsageError
    from kvcli.reuse.pipeline import EncodeOptions

    with pytest.raises(UsageError) as info:
        EncodeOptions(**fields)
    assert message in str(info.value)


def test_settings_are_checked_when_built():
    from kvcli.errors import UsageError

    for fields in ({"batch_tokens": 0}, {"max_tokens": -5}):
        with pytest.raises(UsageError, match="must be an integer of at least 1"):
            ingest.Settings(**fields)


def test_each_presets_options_know_whether_its_codec_is_lossless():
    """Options answer `lossless` from the preset's codec class, before a codec (or a profile) exists: the codec
    the preset then builds must agree."""
    from kvcli.codecs.presets import QUALITIES, make_codec
    from kvcli.reuse.pipeline import EncodeOptions

    assert {q: EncodeOptions(q).lossless for q in QUALITIES} == {q: make_codec(q).lossless for q in QUALITIES}
    assert [q for q in QUALITIES if EncodeOptions(q).lossless] == ["lossless", "raw"]


def test_a_bad_dtype_is_refused_before_the_store_is_created(cli, llama, corpus, tmp_path):
    store = tmp_path / "new-store"
    result = run_store(cli, corpus, "--out-dir", store, "--model", llama, "--dtype", "float8")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == "Error: unknown dtype 'float8'; choose one of float32, bfloat16, float16"
    assert not store.exists()


@pytest.mark.slow  # starts moto_server
def test_an_s3_store_is_checked_before_the_model_loads_and_then_written(cli, llama, corpus, tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    from servers import AWS_SETTINGS, moto_server

    for name in AWS_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    with moto_server() as env:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        s3 = boto3.client("s3")
        missing = run_store(cli, corpus, "--out-dir", "s3://missing-bucket/p", "--model", tmp_path / "no-model")
        assert missing.exit_code == 8 and missing.stdout == "", missing.stderr  # not 7: before the model load
        assert missing.stderr.count("\n") == 1 and "bucket does not exist" in missing.stderr
        with pytest.raises(StorageError, match="bucket does not exist"):  # Ray's entry point, alike
            ingest.PrefillBatches("s3://missing-bucket/p", model=str(tmp_path / "no-model"))
        s3.create_bucket(Bucket="caches")
        result = run_store(cli, corpus / "harbour.txt", "--out-dir", "s3://caches/p", "--model", llama)
        assert result.exit_code == 0, result.stderr
        [line] = lines_of(result)
        assert line["status"] == "written" and line["path"] == f"s3://caches/p/{line['key']}.kvc"
        stored = [o["Key"] for o in s3.list_objects_v2(Bucket="caches").get("Contents", [])]
        assert stored == [f"p/{line['key']}.kvc"]  # the writability probe left nothing behind


# A writer that stalls halfway through a file, as a process killed with -9 mid-write leaves it.
STALLED_WRITER = """
import sys, time
from kvcli.container import format

def blocks():
    yield b"half a cache"
    print("writing", flush=True)
    time.sleep(120)
    yield b"never"

format.atomic_write(sys.argv[1], blocks())
"""


def stalled_writer(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", STALLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert proc.stdout.readline() == "writing\n"
    return proc


def temporaries(store: Path) -> list[str]:
    return sorted(name for name in os.listdir(store) if name.startswith("."))


def test_temporaries_of_writers_killed_with_sigkill_are_swept_by_the_next_run(cli, llama, corpus, tmp_path):
    """kill -9 mid-write leaves the temporary: the next run removes it whether it writes that key again or skips
    it, and leaves a live writer's temporary alone."""
    store = tmp_path / "store"
    first = run_store(cli, corpus, "--out-dir", store, "--model", llama)
    assert first.exit_code == 0, first.stderr
    rewritten, skipped, busy = (store / f"{line['key']}.kvc" for line in lines_of(first)[:3])
    rewritten.unlink()
    live = stalled_writer(busy)
    try:
        killed = [stalled_writer(target) for target in (rewritten, skipped)]  # all alive: none sweeps another's
        for proc in killed:
            proc.kill()  # SIGKILL: no handler runs, the temporary stays
            proc.wait(timeout=10)
            proc.stdout.close()
        left = temporaries(store)
        assert len(left) == 3 and all(format.TEMP_NAME.match(name) for name in left)
        again = run_store(cli, corpus, "--out-dir", store, "--model", llama)
        assert again.exit_code == 0, again.stderr
        assert sorted(line["status"] for line in lines_of(again)) == ["skipped"] * 3 + ["written"]
        assert temporaries(store) == [name for name in left if name.startswith(f".{busy.name}")]
    finally:
        live.kill()
        live.wait(timeout=10)
        live.stdout.close()


def test_several_levels_come_from_one_prefill_and_equal_the_single_level_files(cli, llama, corpus, tmp_path):
    store = tmp_path / "store"
    result = run_store(cli, corpus, "--out-dir", store, "--model", llama, "-q", "lossless,high,small",
                       "--batch-tokens", "1")
    assert result.exit_code == 0, result.stderr
    lines = lines_of(result)
    assert [line["quality"] for line in lines] == ["lossless", "high", "small"] * len(TEXTS)
    assert all(line["status"] == "written" for line in lines)
    assert len({line["key"] for line in lines}) == 3 * len(TEXTS)
    # One forward pass per document, not one per level: the tokens prefilled are the documents' tokens once.
    tokens = sum(line["tokens"] for line in lines[::3])
    assert f"{tokens:,} tokens prefilled" in result.stderr
    assert f"{3 * len(TEXTS)}/{3 * len(TEXTS)}" in result.stderr
    for line in lines[:3]:
        single = tmp_path / "single.kvc"
        assert cli("prefill", line["id"], "-o", single, "--model", llama, "-q", line["quality"]).exit_code == 0
        assert Path(line["path"]).read_bytes() == single.read_bytes(), line["quality"]


def test_a_level_missing_from_the_store_is_the_only_one_written(cli, llama, corpus, tmp_path):
    store = tmp_path / "store"
    first = lines_of(run_store(cli, corpus, "--out-dir", store, "--model", llama, "-q", "lossless,small"))
    removed = first[1]
    os.unlink(removed["path"])
    again = lines_of(run_store(cli, corpus, "--out-dir", store, "--model", llama, "-q", "lossless,small"))
    assert [line["status"] for line in again] == ["written" if line["key"] == removed["key"] else "skipped"
                                                  for line in first]


@pytest.mark.parametrize("quality, message", [("high,,small", "preset names separated by commas"),
                                              ("high,high", "names a preset twice"),
                                              ("high,huge", "unknown --quality 'huge'")])
def test_bad_level_lists_are_usage_errors(cli, llama, corpus, tmp_path, quality, message):
    result = run_store(cli, corpus, "--out-dir", tmp_path / "store", "--model", llama, "-q", quality)
    assert result.exit_code == 2 and message in result.stderr and result.stdout == ""


def test_several_levels_need_a_store(cli, llama, doc_file, tmp_path):
    result = cli("prefill", doc_file, "-o", tmp_path / "x.kvc", "--model", llama, "-q", "high,small")
    assert result.exit_code == 2 and "several --quality levels use --out-dir" in result.stderr
