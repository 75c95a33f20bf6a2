"""The .kvd dictionary file (kvcli/container/dictionary.py): its layout and every refusal, where readers look for
one and what they say when it is nowhere."""

from __future__ import annotations

import json
import os
import struct

import pytest

from kvcli.container import dictionary, format
from kvcli.errors import FormatError

MODEL = {"architecture": "LlamaForCausalLM", "name": "tiny", "config_digest": "c" * 64, "weights_digest": "d" * 64,
         "tokenizer_digest": "e" * 64}
PAYLOAD = bytes(range(256)) * 3


def made(payload: bytes = PAYLOAD, model: dict = MODEL) -> dictionary.Dictionary:
    return dictionary.parse(dictionary.build(payload, model))


def test_round_trip_names_the_file_by_its_sha256():
    data = dictionary.build(PAYLOAD, MODEL)
    d = dictionary.parse(data)
    assert d.sha == dictionary.sha_of(data) and d.payload == PAYLOAD and d.data == data
    assert d.kind == "kvq-transform"
    assert d.model == {k: MODEL[k] for k in dictionary.MODEL_FIELDS}  # the tokenizer does not shape the transform
    assert d.name == f"dicts/{d.sha}.kvd"
    assert data[:8] == b"KVCDICT\x00" and struct.unpack_from("<H", data, 8) == (1,)
    # Content-addressed: the same contents give the same name on every machine.
    assert dictionary.build(PAYLOAD, MODEL) == data


def test_bytes_checked_once_are_not_hashed_again_and_other_bytes_are(monkeypatch):
    """A process decoding many files of one model checks its dictionary's bytes once: equal bytes later are that
    dictionary (under the new place's name, with what codecs derived from it); any other bytes under its name are
    checked in full, so a damaged copy is still refused."""
    data = dictionary.build(PAYLOAD + b"once", MODEL)
    sha = dictionary.sha_of(data)
    first = dictionary.parse(data, sha, "a.kvd")
    first.derived["transforms"] = object()
    hashed = []
    monkeypatch.setattr(dictionary, "sha_of", lambda b: hashed.append(len(b)) or dictionary.hashlib.sha256(b).hexdigest())
    again = dictionary.parse(bytes(data), sha, "b.kvd")
    assert hashed == [] and (again.sha, again.data, again.payload) == (first.sha, first.data, first.payload)
    assert again.where == "b.kvd"
    assert again.derived["transforms"] is first.derived["transforms"]
    damaged = bytearray(data)
    damaged[-1] ^= 1
    with pytest.raises(FormatError, match="c.kvd: holds dictionary"):
        dictionary.parse(bytes(damaged), sha, "c.kvd")
    assert hashed


def test_the_process_keeps_only_the_last_dictionaries_checked(monkeypatch):
    """At most CHECKED_KEEP: one checked before that many others is checked in full again; the last used stays."""
    monkeypatch.setattr(dictionary, "_CHECKED", dictionary.OrderedDict())
    datas = [dictionary.build(PAYLOAD + bytes([i]), MODEL) for i in range(dictionary.CHECKED_KEEP + 1)]
    shas = [dictionary.sha_of(d) for d in datas]
    for d, sha in zip(datas, shas):
        dictionary.parse(d, sha)
    assert list(dictionary._CHECKED) == shas[1:]
    hashed = []
    real = dictionary.sha_of
    monkeypatch.setattr(dictionary, "sha_of", lambda b: hashed.append(1) or real(b))
    dictionary.parse(datas[-1], shas[-1])
    assert hashed == []
    assert dictionary.parse(datas[0], shas[0]).sha == shas[0] and hashed  # evicted: hashed again
    assert list(dictionary._CHECKED)[-1] == shas[0] and shas[1] not in dictionary._CHECKED


def rebuilt(header: dict, payload: bytes = PAYLOAD, version: int = 1, magic: bytes = dictionary.MAGIC) -> bytes:
    raw = json.dumps(header).encode()
    return dictionary.PREAMBLE.pack(magic, version, len(raw)) + raw + payload


def good_header() -> dict:
    data = dictionary.build(PAYLOAD, MODEL)
    hlen = struct.unpack_from("<I", data, 10)[0]
    return json.loads(data[14 : 14 + hlen])


@pytest.mark.parametrize("mutate, message", [
    (lambda: b"KVC", "truncated"),
    (lambda: rebuilt(good_header(), magic=b"NOTADICT"), "bad magic"),
    (lambda: rebuilt(good_header(), version=2), "version 2 is not supported"),
    (lambda: dictionary.PREAMBLE.pack(dictionary.MAGIC, 1, 10**6) + b"{}", "beyond the file"),
    (lambda: rebuilt(good_header())[:-1], "payload is 767 bytes"),
    (lambda: rebuilt(good_header(), PAYLOAD[:-1] + b"\x00"), "checksum mismatch"),
    (lambda: rebuilt({**good_header(), "kind": "zstd"}), "unknown dictionary kind"),
    (lambda: rebuilt({**good_header(), "extra": 1}), "exactly kind, model"),
    (lambda: rebuilt({**good_header(), "model": {"name": "x"}}), "model must hold"),
    (lambda: rebuilt({**good_header(), "payload_bytes": True}), "header says True"),
    (lambda: dictionary.PREAMBLE.pack(dictionary.MAGIC, 1, 3) + b"{x}", "not JSON"),
])
def test_every_malformed_dictionary_is_refused_by_name(mutate, message):
    with pytest.raises(FormatError, match=message) as err:
        dictionary.parse(mutate(), where="somewhere/x.kvd")
    assert str(err.value).startswith("somewhere/x.kvd: ")


def test_a_dictionary_under_another_name_is_refused():
    a, b = made(), made(PAYLOAD[::-1])
    with pytest.raises(FormatError, match="damaged or misnamed"):
        dictionary.parse(a.data, b.sha)


def test_a_dictionary_for_another_model_is_refused():
    d = made()
    dictionary.check_model(d, MODEL, "f.kvc")
    with pytest.raises(FormatError, match="weights_digest differs"):
        dictionary.check_model(d, {**MODEL, "weights_digest": "x" * 64}, "f.kvc")


def test_header_names_are_checked():
    assert dictionary.check_sha("a" * 64, "h") == "a" * 64
    for bad in ("A" * 64, "a" * 63, 7, None, "../" + "a" * 61):
        with pytest.raises(FormatError, match="64 lowercase hex"):
            dictionary.check_sha(bad, "h")


def test_find_takes_the_first_place_holding_it_and_checks_its_bytes(tmp_path):
    d = made()
    first, second = tmp_path / "first", tmp_path / "second"
    dictionary.save(d, second)
    assert dictionary.find(d.sha, [dictionary.DirPlace(first), dictionary.DirPlace(second)], "f.kvc").where \
        == f"{second}/dicts/{d.sha}.kvd"
    # A damaged copy in the first place is an error, not a reason to look further: it names the damaged file.
    (first / "dicts").mkdir(parents=True)
    (first / d.name).write_bytes(d.data[:-1] + b"\x00")
    with pytest.raises(FormatError, match=f"{first}/dicts/{d.sha}.kvd: holds dictionary"):
        dictionary.find(d.sha, [dictionary.DirPlace(first), dictionary.DirPlace(second)], "f.kvc")


def test_decoding_reads_an_unchanged_file_once_and_a_changed_or_removed_one_again(tmp_path, monkeypatch):
    """find(reread=False), as decoders open a file: a dictionary file this process read and checked is not read
    again while its signature holds; a rewrite (even of the same size) is read and checked, a removal is missing.
    find() by default (kvcli verify) reads every time."""
    monkeypatch.setattr(dictionary.time, "time_ns", lambda: 1 << 62)  # long after any write: not racy
    d = made(PAYLOAD + b"seen")
    places = [dictionary.DirPlace(tmp_path)]
    path = dictionary.save(d, tmp_path)
    reads = []
    real = dictionary.read_file
    monkeypatch.setattr(dictionary, "read_file", lambda p: reads.append(p) or real(p))
    assert dictionary.find(d.sha, places, "f.kvc", reread=False).data == d.data and len(reads) == 1
    made(PAYLOAD + b"other")
    again = dictionary.find(d.sha, places, "g.kvc", reread=False)
    assert len(reads) == 1 and again.data == d.data and again.where == f"{tmp_path}/dicts/{d.sha}.kvd"
    assert list(dictionary._CHECKED)[-1] == d.sha  # used last, so evicted last
    dictionary.find(d.sha, places, "h.kvc")
    assert len(reads) == 2
    damaged = bytearray(d.data)
    damaged[-1] ^= 1
    path.write_bytes(bytes(damaged))
    with pytest.raises(FormatError, match="holds dictionary"):
        dictionary.find(d.sha, places, "f.kvc", reread=False)
    assert len(reads) == 3
    path.write_bytes(d.data)
    dictionary.find(d.sha, places, "f.kvc", reread=False)
    before = path.stat()
    path.write_bytes(bytes(damaged))  # in place, its modification time put back (cp -p, rsync -t): ctime moves
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(FormatError, match="holds dictionary"):
        dictionary.find(d.sha, places, "f.kvc", reread=False)
    path.write_bytes(d.data)
    dictionary.find(d.sha, places, "f.kvc", reread=False)
    path.unlink()
    with pytest.raises(dictionary.DictionaryMissing):
        dictionary.find(d.sha, places, "f.kvc", reread=False)


def test_the_process_remembers_only_the_last_files_read(tmp_path, monkeypatch):
    monkeypatch.setattr(dictionary.time, "time_ns", lambda: 1 << 62)
    monkeypatch.setattr(dictionary, "_SEEN", dictionary.OrderedDict())
    monkeypatch.setattr(dictionary, "SEEN_KEEP", 2)
    d = made(PAYLOAD + b"kept")
    paths = [str(dictionary.save(d, tmp_path / str(i))) for i in range(3)]
    for i in range(3):
        dictionary.find(d.sha, [dictionary.DirPlace(tmp_path / str(i))], "f.kvc", reread=False)
    assert list(dictionary._SEEN) == paths[1:]


def test_a_file_changed_just_before_its_read_is_read_again(tmp_path, monkeypatch):
    """Within RACY_NS of its last change a file could change again within the same timestamp tick: not kept."""
    d = made(PAYLOAD + b"racy")
    path = dictionary.save(d, tmp_path)
    changed = max(path.stat().st_mtime_ns, path.stat().st_ctime_ns)
    monkeypatch.setattr(dictionary.time, "time_ns", lambda: changed + dictionary.RACY_NS - 1)
    reads = []
    real = dictionary.read_file
    monkeypatch.setattr(dictionary, "read_file", lambda p: reads.append(p) or real(p))
    for _ in range(2):
        dictionary.find(d.sha, [dictionary.DirPlace(tmp_path)], "f.kvc", reread=False)
    assert len(reads) == 2
    monkeypatch.setattr(dictionary.time, "time_ns", lambda: changed + dictionary.RACY_NS)
    for _ in range(2):
        dictionary.find(d.sha, [dictionary.DirPlace(tmp_path)], "f.kvc", reread=False)
    assert len(reads) == 3


def test_a_missing_dictionary_names_itself_and_every_place_looked_in(tmp_path):
    sha = made().sha
    places = [dictionary.DirPlace(tmp_path / "a"), dictionary.DirPlace(tmp_path / "b")]
    with pytest.raises(dictionary.DictionaryMissing) as err:
        dictionary.find(sha, places, "doc.kvc")
    assert err.value.exit_code == 4
    assert str(err.value) == f"doc.kvc: its dictionary {sha} is missing: looked in {tmp_path}/a/dicts, {tmp_path}/b/dicts"


def test_save_is_idempotent_and_mends_a_damaged_copy(tmp_path):
    d = made()
    path = dictionary.save(d, tmp_path)
    mtime = path.stat().st_mtime_ns
    assert dictionary.save(d, tmp_path) == path and path.stat().st_mtime_ns == mtime
    path.write_bytes(b"garbage")
    dictionary.save(d, tmp_path)
    assert path.read_bytes() == d.data


def test_a_local_file_is_looked_up_beside_itself_then_in_the_users_cache(tmp_path):
    f = tmp_path / "doc.kvc"
    f.write_bytes(b"x")
    with format.FileSource(f) as src:
        places = dictionary.places_for(src)
    assert [p.where for p in places] == [f"{tmp_path}/dicts", str(dictionary.cache_place().root / "dicts"),
                                         dictionary.ShippedPlace.where]
    # A stream has no beside.
    assert [p.where for p in dictionary.places_for(format.BytesSource(b"", "<stdin>"))] == [p.where for p in places[1:]]


def test_the_shipped_place_reads_nothing_it_does_not_hold():
    assert dictionary.ShippedPlace().read("0" * 64) is None


def test_a_file_carrying_a_dictionary_its_codec_does_not_name_is_refused():
    import torch

    from kvcli.codecs.presets import make_codec
    from kvcli.container import kvfile
    from kvcli.modeling.kvcache import KVCache
    from kvcli.reuse import pipeline

    gen = torch.Generator().manual_seed(0)
    kv = KVCache(list(range(5)), [torch.randn(2, 5, 16, generator=gen) for _ in range(2)],
                 [torch.randn(2, 5, 16, generator=gen) for _ in range(2)])
    meta, parts = kvfile.encode(kv, MODEL, make_codec("raw"), chunk_tokens=4)
    data = format.build_header(meta, parts) + b"".join(p.data for p in parts)
    assert kvfile.decode(format.BytesSource(data), format.read_header(format.BytesSource(data))).num_tokens == 5
    parts = pipeline.with_dictionary(parts, made())
    src = format.BytesSource(format.build_header(meta, parts) + b"".join(p.data for p in parts), "x.kvc")
    with pytest.raises(FormatError, match="^x.kvc: carries a dictionary its codec does not name$"):
        kvfile.decode(src, format.read_header(src))


def test_one_directory_reached_by_two_paths_is_one_place(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "store")
    first, second = dictionary.DirPlace(tmp_path / "store"), dictionary.DirPlace(tmp_path / "link")
    assert first == second and len({first, second}) == 1


def test_what_cannot_be_a_dictionary_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A link in dicts/ may point anywhere: a FIFO would block a reader (a server's thread) for ever, /dev/zero or a
    huge file fill its memory. Each is one FormatError naming it, whatever reads: a place, a store, save()."""
    import os
    import threading

    d = made()
    (tmp_path / "dicts").mkdir()
    path = tmp_path / d.name
    place = dictionary.DirPlace(tmp_path)
    os.mkfifo(path)
    outcome = []

    def read():
        try:
            place.read(d.sha)
        except FormatError as err:
            outcome.append(str(err))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # blocked in open(): a writer's open and close lets it go
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
    assert outcome == [f"{path}: not a regular file, so not a dictionary"]
    dictionary.save(d, tmp_path)  # whatever holds the name is replaced
    assert path.read_bytes() == d.data
    path.unlink()
    path.symlink_to("/dev/zero")
    with pytest.raises(FormatError, match="not a regular file"):
        dictionary.find(d.sha, [place], "doc.kvc")
    path.unlink()
    monkeypatch.setattr(dictionary, "MAX_FILE_BYTES", 4096)
    with open(path, "wb") as fh:
        fh.truncate(4097)
    with pytest.raises(FormatError, match=f"^{path}: 4,097 bytes, more than any dictionary \\(4,096\\)$"):
        place.read(d.sha)


def test_save_where_dicts_cannot_be_made_is_a_storage_error(tmp_path):
    from kvcli.errors import StorageError

    (tmp_path / "dicts").write_bytes(b"a user's file")
    with pytest.raises(StorageError, match=f"^{tmp_path}/dicts: cannot create: File exists$"):
        dictionary.save(made(), tmp_path)


def test_a_damaged_copy_in_kvclis_cache_is_discarded_and_the_search_goes_on(tmp_path, capsys):
    d = made()
    cache = dictionary.cache_place()  # the test's own KVCLI_CACHE_DIR (conftest)
    path = dictionary.save(d, cache.root)
    path.write_bytes(d.data[:-1] + b"\x00")
    elsewhere = tmp_path / "elsewhere"
    dictionary.save(d, elsewhere)
    found = dictionary.find(d.sha, [cache, dictionary.DirPlace(elsewhere)], "f.kvc")
    assert found.where == f"{elsewhere}/dicts/{d.sha}.kvd" and not path.exists()
    assert capsys.readouterr().err.count(f"{path}: holds dictionary") == 1
    # Nowhere else to look: missing, so that whoever needs it fetches or learns it again.
    path.write_bytes(b"not a dictionary")
    with pytest.raises(dictionary.DictionaryMissing):
        dictionary.find(d.sha, [cache], "f.kvc")
    assert not path.exists()
