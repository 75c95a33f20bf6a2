"""The prefix index from the command line: `prefill --out-dir` and `push` keep it, `index rebuild` remakes it,
`generate --store` answers from the longest stored prefix, `prefill --chat-prefix` stores what a chat prompt starts
with (docs/format.md, "Prefix index")."""

from __future__ import annotations

import json
import shutil

import pytest
from servers import CacheServer

from kvcli.container import format, keys
from kvcli.modeling import models
from kvcli.storage import store

WORDS = ("harbour", "lamp", "tide", "cliff", "keeper", "boat", "dawn", "steps", "gull", "rope", "salt", "fog")
QUESTION = " Who keeps the lamp?"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def text(seed: int, chars: int) -> str:
    out, i = [], seed
    while sum(len(w) + 1 for w in out) < chars:
        out.append(WORDS[(i * 7 + len(out) * 5) % len(WORDS)])
        i += 3
    return " ".join(out)[:chars]


def written(path, body: str):
    path.write_text(body)
    return path


def lines(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def ok(result):
    assert result.exit_code == 0, result.stderr
    return result


def entries(root) -> list[tuple[str, str]]:
    return sorted(store.DirStore(root)._entries())


@pytest.fixture
def stored_doc(cli, llama, tmp_path):
    """A 400-character document (401 tokens with the BOS of the byte-level tiny Llama) prefilled into a store."""
    doc = written(tmp_path / "doc.txt", text(1, 400))
    root = tmp_path / "store"
    [line] = lines(ok(cli("prefill", doc, "--out-dir", root, "--model", llama, "-q", "lossless")))
    return doc, root, line["key"]


def test_prefill_out_dir_indexes_and_generate_store_loads_the_longest_prefix(cli, llama, tmp_path, stored_doc):
    doc, root, key = stored_doc
    lm = models.load(llama, "float32")
    ids = list(lm.tokenizer(doc.read_text())["input_ids"])
    assert entries(root) == [(keys.chunk_keys(lm.identity, "float32", ids)[0], key)]

    args = ("--model", llama, "-n", "6", "--json")
    from_store = json.loads(ok(cli("generate", "--store", root, "--document", doc, QUESTION, *args)).stdout)
    reference = json.loads(ok(cli("generate", "--document", doc, QUESTION, *args)).stdout)
    assert from_store["stored_tokens"] == 256 and from_store["stored_key"] == key
    assert from_store["computed_tokens"] == 401 + len(QUESTION) - 256
    assert from_store["stored_quality"] == "lossless" and from_store["text"] == reference["text"]

    # a document sharing only its first 300 characters (301 tokens) with the stored one: 256 from the store
    shares = written(tmp_path / "shares.txt", doc.read_text()[:300] + text(9, 100))
    assert json.loads(ok(cli("generate", "--store", root, "--document", shares, QUESTION, *args)).stdout)[
        "stored_tokens"] == 256
    # a longer document that starts with the stored one
    longer = written(tmp_path / "longer.txt", doc.read_text() + text(5, 60))
    assert json.loads(ok(cli("generate", "--store", root, "--document", longer, QUESTION, *args)).stdout)[
        "stored_tokens"] == 256
    # nothing in common past the BOS: all computed, and the same answer as without a store
    other = written(tmp_path / "other.txt", "Q" + doc.read_text()[1:])
    none = json.loads(ok(cli("generate", "--store", root, "--document", other, QUESTION, *args)).stdout)
    assert none["stored_tokens"] == 0 and none["stored_key"] is None
    assert none["text"] == json.loads(ok(cli("generate", "--document", other, QUESTION, *args)).stdout)["text"]


def test_a_rerun_of_prefill_indexes_a_stored_file_that_has_no_entries(cli, llama, stored_doc):
    doc, root, key = stored_doc
    before = entries(root)
    shutil.rmtree(root / ".index")  # as a run killed between the file and its entries leaves it
    [line] = lines(ok(cli("prefill", doc, "--out-dir", root, "--model", llama, "-q", "lossless")))
    assert line["status"] == "skipped" and entries(root) == before


def test_generate_store_through_a_server(cli, llama, tmp_path, stored_doc):
    doc, root, key = stored_doc
    with CacheServer(root) as server:
        result = json.loads(ok(cli("generate", "--store", server.url, "--document", doc, QUESTION, "--model", llama,
                                   "-n", "4", "--json")).stdout)
    assert result["stored_tokens"] == 256 and result["stored_key"] == key


def test_generate_store_skips_a_stale_entry_and_a_damaged_file(cli, llama, tmp_path, stored_doc):
    doc, root, key = stored_doc
    args = ("--model", llama, "-n", "4", "--json")
    path = root / f"{key}.kvc"
    data = path.read_bytes()
    path.write_bytes(data[:100])  # damaged in place, entries still there
    assert json.loads(ok(cli("generate", "--store", root, "--document", doc, QUESTION, *args)).stdout)[
        "stored_tokens"] == 0
    path.unlink()  # gone: a stale entry
    assert json.loads(ok(cli("generate", "--store", root, "--document", doc, QUESTION, *args)).stdout)[
        "stored_tokens"] == 0
    assert entries(root)  # a lookup never writes: the stale entries stay until a rebuild
    summary = json.loads(ok(cli("index", "rebuild", root)).stdout)
    assert summary == {"store": str(root), "files": 0, "indexed": 0, "entries": 0, "removed": 1}
    assert entries(root) == []


def test_generate_store_computes_the_tokens_of_a_file_that_fails_to_decode(cli, llama, tmp_path, stored_doc):
    """A file whose header (and so its chunk keys) is sound but whose first segment is damaged passes the lookup and
    fails the decode: one warning line, every token computed, the answer of a full prefill."""
    doc, root, key = stored_doc
    args = ("--model", llama, "-n", "6", "--json")
    path = root / f"{key}.kvc"
    data = bytearray(path.read_bytes())
    header = format.read_header(format.BytesSource(bytes(data)))
    seg = next(s for s in header.segments if s.kind == "k" and s.layer == 0 and s.token_start == 0)
    data[header.data_offset + seg.offset] ^= 0x40
    path.write_bytes(bytes(data))
    result = ok(cli("generate", "--store", root, "--document", doc, QUESTION, *args))
    answer = json.loads(result.stdout)
    assert answer["stored_tokens"] == 0 and answer["stored_key"] is None
    assert answer["text"] == json.loads(ok(cli("generate", "--document", doc, QUESTION, *args)).stdout)["text"]
    [warning] = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
    assert key in warning and "checksum" in warning and "computing its 256 tokens" in warning


def test_a_damaged_hit_gives_way_to_another_file_of_the_same_prefix(cli, llama, stored_doc, capfd):
    from kvcli.modeling import inference
    from kvcli.reuse import prefix

    doc, root, key = stored_doc
    [raw] = lines(ok(cli("prefill", doc, "--out-dir", root, "--model", llama, "-q", "raw")))
    path = root / f"{key}.kvc"  # the lossless file, the first hit (as exact as raw, and smaller)
    data = bytearray(path.read_bytes())
    header = format.read_header(format.BytesSource(bytes(data)))
    seg = next(s for s in header.segments if s.kind == "v" and s.layer == 1 and s.token_start == 0)
    data[header.data_offset + seg.offset + seg.length // 2] ^= 0x01
    path.write_bytes(bytes(data))
    lm = models.load(llama, "float32")
    ids = inference.document_ids(lm, doc.read_text()) + inference.prompt_ids(lm, QUESTION)
    assert [hit.file_key for hit in store.DirStore(root).prefix_hits(lm.identity, lm.dtype, ids)] == [key, raw["key"]]
    kv, hit = prefix.load_stored_prefix(store.DirStore(root), lm, ids)
    assert hit.file_key == raw["key"] and kv.num_tokens == 256
    [warning] = capfd.readouterr().err.splitlines()
    assert warning.startswith(f"Warning: {key}: cannot load the stored prefix, trying another stored file: ")


def test_index_rebuild_from_the_files_alone(cli, tmp_path, stored_doc):
    doc, root, key = stored_doc
    before = entries(root)
    shutil.rmtree(root / ".index")
    first = json.loads(ok(cli("index", "rebuild", root)).stdout)
    assert first == {"store": str(root), "files": 1, "indexed": 1, "entries": 1, "removed": 0}
    assert entries(root) == before
    assert json.loads(ok(cli("index", "rebuild", root)).stdout) == first  # idempotent
    missing = cli("index", "rebuild", tmp_path / "nowhere")
    assert missing.exit_code == 3 and missing.stderr.startswith("Error: ") and len(missing.stderr.splitlines()) == 1
    served = cli("index", "rebuild", "http://127.0.0.1:9")
    assert served.exit_code == 2 and "server's own store" in served.stderr


def test_push_keeps_the_index_of_a_directory_and_of_a_server(cli, tmp_path, stored_doc, monkeypatch):
    doc, root, key = stored_doc
    source = root / f"{key}.kvc"
    target = tmp_path / "pushed"
    ok(cli("push", source, target))
    assert entries(target) == entries(root)
    (tmp_path / "served").mkdir()
    (tmp_path / "token").write_text("t0ken")
    with CacheServer(tmp_path / "served", "--writable", "--token-file", tmp_path / "token") as server:
        ok(cli("push", source, server.url, "--token-file", tmp_path / "token"))
        assert entries(tmp_path / "served") == entries(root)
        # a multipart upload's completion indexes too
        other = tmp_path / "served-parts"
        st = store.DirStore(other, create=True)
        st.part_bytes = 4096
        data = source.read_bytes()
        with format.BytesSource(data) as src:
            upload = store.header_digest(src, format.read_header(src))
        for offset in range(0, len(data), 4096):
            st.put_part(key, upload, offset, data[offset : offset + 4096])
        st.complete_upload(key, upload, len(data))
        assert entries(other) == entries(root)


@pytest.fixture
def chat_llama(llama, tmp_path):
    """The tiny Llama with a chat template."""
    from transformers import AutoTokenizer

    directory = tmp_path / "chat-llama"
    shutil.copytree(llama, directory)
    tok = AutoTokenizer.from_pretrained(directory)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(directory)
    return str(directory)


def test_chat_prefix_stores_what_a_chat_prompt_starts_with(cli, chat_llama, llama, tmp_path):
    doc = written(tmp_path / "doc.txt", text(2, 360))
    root = tmp_path / "store"
    [line] = lines(ok(cli("prefill", doc, "--out-dir", root, "--model", chat_llama, "-q", "lossless",
                          "--chat-prefix")))
    # the template's opening, the document, the separator: what every question's prompt starts with
    assert line["tokens"] == len("<|user|>\n") + 360 + len("\n\n")
    one = json.loads(ok(cli("prefill", doc, "-o", tmp_path / "one.kvc", "--model", chat_llama, "-q", "lossless",
                            "--chat-prefix", "--json")).stdout)
    assert one["tokens"] == line["tokens"] and (tmp_path / "one.kvc").read_bytes() == (
        root / f"{line['key']}.kvc").read_bytes()
    args = ("--model", chat_llama, "-n", "5", "--json", "--chat")
    from_store = json.loads(ok(cli("generate", "--store", root, "--document", doc, QUESTION, *args)).stdout)
    empty = tmp_path / "empty"
    empty.mkdir()
    computed = json.loads(ok(cli("generate", "--store", empty, "--document", doc, QUESTION, *args)).stdout)
    assert from_store["stored_tokens"] == 256 and computed["stored_tokens"] == 0
    assert from_store["context_tokens"] == computed["context_tokens"] == line["tokens"] + len(QUESTION) + len(
        "\n<|assistant|>\n")
    assert from_store["text"] == computed["text"]
    # a plain prefill of the same document is no prefix of the chat prompt
    plain = tmp_path / "plain"
    ok(cli("prefill", doc, "--out-dir", plain, "--model", chat_llama, "-q", "lossless"))
    assert json.loads(ok(cli("generate", "--store", plain, "--document", doc, QUESTION, *args)).stdout)[
        "stored_tokens"] == 0

    for bad, words in ((("prefill", doc, "--out-dir", root, "--model", llama, "--chat-prefix", "-q", "lossless"),
                        "has no chat template"),
                       (("prefill", doc, "--out-dir", root, "--model", chat_llama, "--chat-prefix", "--split",
                         "--max-tokens", "100"), "--chat-prefix"),
                       (("generate", "--store", root, "--cache", root / f"{line['key']}.kvc", QUESTION), "--store")):
        result = cli(*bad)
        assert result.exit_code == 2 and words in result.stderr and len(result.stderr.splitlines()) == 1, \
            (bad, result.stderr)


def test_the_loaded_prefix_gives_the_logits_of_a_full_prefill(llama, tmp_path, stored_doc):
    import torch

    from kvcli.modeling import inference
    from kvcli.reuse import prefix

    doc, root, key = stored_doc
    lm = models.load(llama, "float32")
    ids = inference.document_ids(lm, doc.read_text()[:300] + text(3, 80)) + inference.prompt_ids(lm, QUESTION)
    kv, hit = prefix.load_stored_prefix(store.DirStore(root), lm, ids)
    assert hit.file_key == key and kv.num_tokens == 256 and kv.token_ids == ids[:256]
    loaded = inference.logits_after(lm, kv, ids[256:])[-1]
    full = inference.logits_after(lm, None, ids)[-1]
    assert torch.allclose(loaded, full, atol=1e-4), (loaded - full).abs().max()
    shifted = inference.logits_after(lm, kv, ids[257:])[-1]  # the test can tell a wrong continuation apart
    assert not torch.allclose(shifted, full, atol=1e-2)


def test_a_server_killed_or_a_file_deleted_between_lookup_and_read_leaves_the_tokens_to_compute(
        llama, stored_doc, capfd):
    from kvcli.modeling import inference
    from kvcli.reuse import prefix

    doc, root, key = stored_doc
    lm = models.load(llama, "float32")
    ids = inference.document_ids(lm, doc.read_text()) + inference.prompt_ids(lm, QUESTION)
    with CacheServer(root) as server:
        class KilledAfterLookup(store.ServerStore):
            def prefix_hits_for(self, keys):
                hits = super().prefix_hits_for(keys)
                server.stop()
                return hits

        client = KilledAfterLookup(server.url, timeout_s=10)
        assert prefix.load_stored_prefix(client, lm, ids) == (None, None)
        client.close()

    class DeletedAfterLookup(store.DirStore):
        def prefix_hits_for(self, keys):
            hits = super().prefix_hits_for(keys)
            (root / f"{key}.kvc").unlink()  # another process's delete, between this lookup and its read
            return hits

    assert prefix.load_stored_prefix(DeletedAfterLookup(root), lm, ids) == (None, None)
    warnings = capfd.readouterr().err.splitlines()
    assert len(warnings) == 2 and all(line.startswith(f"Warning: {key}: cannot load") for line in warnings), warnings


def test_a_prompt_of_whole_chunks_and_one_shorter_than_a_chunk(cli, llama, tmp_path):
    import torch

    from kvcli.modeling import inference
    from kvcli.reuse import prefix

    doc = written(tmp_path / "doc.txt", text(6, 511))  # 512 tokens with the BOS: exactly two chunks
    root = tmp_path / "store"
    [line] = lines(ok(cli("prefill", doc, "--out-dir", root, "--model", llama, "-q", "lossless")))
    assert line["tokens"] == 512 and len(entries(root)) == 2
    lm = models.load(llama, "float32")
    ids = inference.document_ids(lm, doc.read_text())
    # the prompt is the whole stored file: all but its last token loaded, that one computed for the logits
    kv, hit = prefix.load_stored_prefix(store.DirStore(root), lm, ids)
    assert hit.tokens == 512 and kv.num_tokens == 511
    assert torch.allclose(inference.logits_after(lm, kv, ids[511:])[-1], inference.logits_after(lm, None, ids)[-1],
                          atol=1e-4)
    args = ("--model", llama, "-n", "4", "--json")
    short = written(tmp_path / "short.txt", doc.read_text()[:40])  # shares 41 tokens, no whole chunk
    answer = json.loads(ok(cli("generate", "--store", root, "--document", short, QUESTION, *args)).stdout)
    assert answer["stored_tokens"] == 0 and answer["text"] == json.loads(
        ok(cli("generate", "--document", short, QUESTION, *args)).stdout)["text"]


@pytest.mark.slow  # starts moto_server
def test_prefill_generate_and_rebuild_on_s3(cli, llama, tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    from servers import moto_server

    doc = written(tmp_path / "doc.txt", text(4, 400))
    with moto_server() as env:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        boto3.client("s3").create_bucket(Bucket="caches")
        url = "s3://caches/p"
        [line] = lines(ok(cli("prefill", doc, "--out-dir", url, "--model", llama, "-q", "lossless")))
        args = ("--model", llama, "-n", "4", "--json")
        result = json.loads(ok(cli("generate", "--store", url, "--document", doc, QUESTION, *args)).stdout)
        assert result["stored_tokens"] == 256 and result["stored_key"] == line["key"]
        st = store.open_store(url)
        for chunk, key in list(st._entries()):
            st._remove_entry(chunk, key)
        assert json.loads(ok(cli("index", "rebuild", url)).stdout) == {
            "store": url, "files": 1, "indexed": 1, "entries": 1, "removed": 0}
        assert [key for _, key in st._entries()] == [line["key"]]
        env.proc.terminate()  # the store goes away: a storage error, one line, exit 8
        env.proc.wait(10)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        down = cli("generate", "--store", url, "--document", doc, QUESTION, *args)
        assert down.exit_code == 8 and down.stderr.startswith("Error: ") and len(down.stderr.splitlines()) == 1, \
            down.stderr
