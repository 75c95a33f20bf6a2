"""`kvcli push FILE STORE --quality high,balanced,small` (kvcli/reuse/levels.py): the levels of FILE's document,
each encoded from one decode of FILE, stored under their own keys where the streaming controller finds them as
levels (controller.open_levels), to a directory and to a real serve-cache on loopback; a level better than FILE
refused; nothing stored when a level cannot be encoded; a rerun sends nothing. Also the Ray entry point's
levels (ingest.PrefillBatches), which stores them from one prefill as `prefill --out-dir` does."""

from __future__ import annotations

import json
import os

import pytest
from servers import CacheServer

from kvcli.container import format, keys
from kvcli.reuse import controller
from kvcli.storage import store

PROMPT = "Who keeps the lamp?"


def ok(result):
    assert result.exit_code == 0, result.stderr
    return result


def one_line_error(result, code: int, *words: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert result.stdout == "" and result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert all(word in result.stderr for word in words), result.stderr


def stored_files(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.suffix == ".kvc") if root.exists() else []


def file_key(path) -> str:
    with format.FileSource(path) as src:
        return keys.key_of_header(format.read_header(src))


@pytest.fixture
def doc(tmp_path):
    """401 tokens for the byte-level tiny Llama: more than the last 256, whose queries weigh the tokens."""
    path = tmp_path / "doc.txt"
    path.write_text(("The harbour town of Velmora sits between two cliffs. Its lighthouse keeper, Anna Brisk, has "
                     "kept the lamp burning for thirty years. Every evening she climbs 112 steps. " * 3)[:400])
    return path


@pytest.fixture
def cache_of(cli, llama, doc, tmp_path):
    """cache_of(quality) -> doc prefilled by the tiny Llama into one file, in 32-token chunks."""

    def make(quality: str, *extra: str):
        out = tmp_path / f"doc-{quality}{''.join(extra)}.kvc"
        ok(cli("prefill", doc, "-o", out, "--model", llama, "--chunk-tokens", "32", "-q", quality, *extra))
        return out

    return make


def listed_levels(target, path) -> dict[str, str]:
    """{quality: key} of the files a store lists for the document of the file at `path`."""
    with format.FileSource(path) as src:
        header = format.read_header(src)
    entries = target.lookup(model=header.model["weights_digest"], tokens_sha256=keys.tokens_sha256(header.token_ids))
    return {entry["quality"]: entry["key"] for entry in entries}


def found_levels(target, key: str) -> list[tuple[str, str]]:
    """(quality, key) of every level the streaming controller finds for the cache `key`, best first."""
    _, levels, _ = controller.open_levels(target, key, "tiny")
    return [(lv.quality, lv.key) for lv in levels]


def test_levels_pushed_to_a_directory_are_the_documents_levels_and_a_rerun_sends_nothing(cli, llama, cache_of,
                                                                                        tmp_path):
    source = cache_of("lossless")
    root = tmp_path / "store"
    result = ok(cli("push", source, root, "--quality", "lossless,high,small", "--model", llama))
    lines = [line.split(" ") for line in result.stdout.splitlines()]
    assert [q for q, _, _ in lines] == ["lossless", "high", "small"]
    assert all(url == str(root / f"{key}.kvc") for _, key, url in lines)
    level_keys = {q: key for q, key, _ in lines}
    assert level_keys["lossless"] == file_key(source) and len(set(level_keys.values())) == 3
    assert (root / f"{level_keys['lossless']}.kvc").read_bytes() == source.read_bytes()  # the file itself
    assert stored_files(root) == sorted(f"{key}.kvc" for key in level_keys.values())
    assert listed_levels(store.DirStore(root), source) == level_keys
    sizes = {q: os.path.getsize(root / f"{key}.kvc") for q, key in level_keys.items()}
    assert ok(cli("ls", root)).stdout == "".join(f"{key} {q} 401 {sizes[q]}\n" for q, key in
                                                 sorted(level_keys.items(), key=lambda item: item[1]))
    # What the streaming controller sees as the document's levels, named by any one of them.
    assert found_levels(store.DirStore(root), level_keys["small"]) == [(q, level_keys[q]) for q in
                                                                      ("lossless", "high", "small")]
    # generate --deadline takes them as levels, end to end.
    answer = json.loads(ok(cli("generate", "--cache", root / f"{level_keys['high']}.kvc", "--deadline", "30s",
                               "--model", llama, "-n", "2", "--json", PROMPT)).stdout)
    assert [(lv["quality"], lv["key"]) for lv in answer["stream"]["levels"]] == [
        (q, level_keys[q]) for q in ("lossless", "high", "small")]

    # Each encoded level is what a prefill at that preset writes, byte for byte: the attention its tokens receive
    # (which lossy presets weigh them by) measured again from the file.
    for quality in ("high", "small"):
        assert (root / f"{level_keys[quality]}.kvc").read_bytes() == cache_of(quality).read_bytes(), quality

    stamps = {name: os.stat(root / name).st_mtime_ns for name in stored_files(root)}
    again = json.loads(ok(cli("push", source, root, "-q", "lossless,high,small", "--model", llama, "--json")).stdout)
    assert [(lv["quality"], lv["key"], lv["uploaded"], lv["sent"], lv["made"]) for lv in again["levels"]] == [
        ("lossless", level_keys["lossless"], False, 0, "file"), ("high", level_keys["high"], False, 0, "stored"),
        ("small", level_keys["small"], False, 0, "stored")]
    assert again["file"] == str(source) and again["source_quality"] == "lossless"
    assert {name: os.stat(root / name).st_mtime_ns for name in stored_files(root)} == stamps


def test_levels_pushed_to_a_serve_cache_are_found_through_it(cli, llama, cache_of, tmp_path):
    def cache_of_text(path):
        out = path.with_suffix(".kvc")
        ok(cli("prefill", path, "-o", out, "--model", llama, "-q", "lossless"))
        return out

    source = cache_of("raw")
    served = tmp_path / "served"
    served.mkdir()
    token = tmp_path / "token"
    token.write_text("t0ken")
    with CacheServer(served, "--writable", "--token-file", token) as server:
        args = ("push", source, server.url, "-q", "lossless,balanced,tiny", "--model", llama, "--token-file", token,
                "--json")
        first = json.loads(ok(cli(*args)).stdout)
        assert [(lv["quality"], lv["made"], lv["uploaded"]) for lv in first["levels"]] == [
            ("lossless", "encoded", True), ("balanced", "encoded", True), ("tiny", "encoded", True)]
        assert all(lv["url"] == f"{server.url}/v1/caches/{lv['key']}" and lv["sent"] == lv["bytes"] > 0
                   for lv in first["levels"])
        remote = store.open_store(server.url)
        assert listed_levels(remote, source) == {lv["quality"]: lv["key"] for lv in first["levels"]}
        other = tmp_path / "other.txt"
        other.write_text("Another document altogether.")
        ok(cli("push", cache_of_text(other), server.url, "--token-file", token))
        listed = json.loads(ok(cli("ls", server.url, "--levels-of", source, "--json")).stdout)["caches"]
        assert sorted((e["quality"], e["key"]) for e in listed) == sorted((lv["quality"], lv["key"])
                                                                           for lv in first["levels"])
        assert len(json.loads(ok(cli("ls", server.url, "--json")).stdout)["caches"]) == 4
        assert found_levels(remote, first["levels"][2]["key"]) == [(lv["quality"], lv["key"])
                                                                   for lv in first["levels"]]
        again = json.loads(ok(cli(*args)).stdout)
        assert [(lv["key"], lv["uploaded"], lv["sent"]) for lv in again["levels"]] == [
            (lv["key"], False, 0) for lv in first["levels"]]
    # the raw source's lossless level is exact: the same tensors in a zstd file
    lossless = cache_of("lossless")
    assert first["levels"][0]["key"] == file_key(lossless)
    assert (served / f"{first['levels'][0]['key']}.kvc").read_bytes() == lossless.read_bytes()


def test_a_lossy_file_gives_its_own_level_as_itself_and_the_lower_ones(cli, llama, cache_of, tmp_path):
    source = cache_of("high")
    root = tmp_path / "store"
    result = json.loads(ok(cli("push", source, root, "-q", "high,small", "--model", llama, "--json")).stdout)
    assert [(lv["quality"], lv["made"]) for lv in result["levels"]] == [("high", "file"), ("small", "encoded")]
    high, small = (lv["key"] for lv in result["levels"])
    assert high == file_key(source) and (root / f"{high}.kvc").read_bytes() == source.read_bytes()
    assert found_levels(store.DirStore(root), high) == [("high", high), ("small", small)]
    # the small level's key is a prefill's small key: a store holding both keeps one file per level
    assert small == file_key(cache_of("small"))


@pytest.mark.parametrize("quality, asked, words", [
    ("balanced", "small,high", ("is a balanced file", "cannot give the high level")),
    ("small", "lossless", ("is a small file", "cannot give the lossless level")),
    ("high", "raw", ("is a high file", "cannot give the raw level")),
])
def test_a_level_better_than_the_file_is_refused_before_anything_is_stored(cli, llama, cache_of, tmp_path, quality,
                                                                           asked, words):
    root = tmp_path / "store"
    one_line_error(cli("push", cache_of(quality), root, "-q", asked, "--model", llama), 2, *words)
    assert stored_files(root) == []


def test_a_file_of_no_preset_gives_no_level(cli, llama, cache_of, tmp_path):
    root = tmp_path / "store"
    scaled = cache_of("small", "--step-scale", "0.5")
    one_line_error(cli("push", scaled, root, "-q", "tiny", "--model", llama), 2, "no preset", "--step-scale 0.5")
    assert stored_files(root) == []
    assert ok(cli("push", scaled, root)).stdout.split(" ")[0] == file_key(scaled)  # as a file it is pushed as ever


def test_a_level_that_cannot_be_encoded_leaves_nothing_in_the_store(cli, llama, cache_of, tmp_path):
    """A lossless file holding an infinity: the small level cannot store it, so not even the lossless level (the
    file itself, asked for first) is uploaded."""
    from safetensors.torch import load_file, save_file

    exported = tmp_path / "kv.safetensors"
    ok(cli("decode", cache_of("lossless"), "-o", exported))
    tensors = load_file(exported)
    tensors["keys.1"][0, 3, 0] = float("inf")
    save_file(tensors, exported)
    bad = tmp_path / "inf.kvc"
    ok(cli("encode", exported, "-o", bad, "--model", llama, "-q", "lossless", "--chunk-tokens", "32"))
    root = tmp_path / "store"
    one_line_error(cli("push", bad, root, "-q", "lossless,small", "--model", llama), 3, "NaN or Inf")
    assert stored_files(root) == []


def test_usage_and_model_errors(cli, llama, cache_of, tiny_model_dir, tmp_path):
    source, root = cache_of("lossless"), tmp_path / "store"
    one_line_error(cli("push", source, root, "-q", "high,high", "--model", llama), 2, "names a preset twice")
    one_line_error(cli("push", source, root, "-q", "best", "--model", llama), 2, "unknown --quality 'best'")
    one_line_error(cli("push", source, root, "--model", llama), 2, "--model serves the levels of --quality")
    one_line_error(cli("ls", root, "--levels-of", source, "--tokens-sha256", "0" * 64), 2, "--levels-of names")
    # a lossy level needs the model that made the file: its calibration and rotary frequencies
    other = str(tiny_model_dir("llama", 1))
    one_line_error(cli("push", source, root, "-q", "lossless,small", "--model", other), 6, "different model")
    assert stored_files(root) == []
    # exact levels need no model at all
    assert ok(cli("push", source, root, "-q", "raw", "--model", other)).stdout.startswith("raw ")


def test_the_ray_entry_point_stores_every_level_from_one_prefill(cli, llama, doc, tmp_path, monkeypatch):
    from kvcli.reuse import ingest

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    rows = ingest.PrefillBatches(str(tmp_path / "ray"), model=llama, quality="lossless,small", chunk_tokens=32)(
        {"id": ["doc"], "text": [doc.read_text()]})
    assert rows["quality"] == ["lossless", "small"] and rows["status"] == ["written", "written"]
    by_cli = tmp_path / "cli"
    lines = [json.loads(line) for line in ok(cli("prefill", doc, "--out-dir", by_cli, "--model", llama, "-q",
                                                 "lossless,small", "--chunk-tokens", "32")).stdout.splitlines()]
    assert rows["key"] == [line["key"] for line in lines]
    for key in rows["key"]:
        assert (tmp_path / "ray" / f"{key}.kvc").read_bytes() == (by_cli / f"{key}.kvc").read_bytes()
    assert found_levels(store.DirStore(tmp_path / "ray"), rows["key"][1]) == list(zip(rows["quality"], rows["key"]))
