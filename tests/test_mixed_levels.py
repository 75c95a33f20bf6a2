"""Mixed-level decoding (docs/format.md): chunk i from one level's file, chunk j from another's, equal chunk by
chunk to each level's own decode."""

from __future__ import annotations

import pytest
import torch

from kvcli.container import format, kvfile
from kvcli.errors import FormatError

from servers import make_cache

LEVELS = ("lossless", "high", "small")


@pytest.fixture
def level_files(cli, llama, doc_file, tmp_path):
    paths = []
    for quality in LEVELS:
        out = tmp_path / f"{quality}.kvc"
        result = cli("prefill", doc_file, "-o", out, "--model", llama, "--chunk-tokens", "8", "-q", quality)
        assert result.exit_code == 0, result.stderr
        paths.append(out)
    return paths


def opened(paths):
    sources = [format.FileSource(p) for p in paths]
    return [(src, format.read_header(src)) for src in sources]


def test_a_mixed_decode_equals_each_levels_own_decode_chunk_by_chunk(level_files):
    levels = opened(level_files)
    alone = [kvfile.decode(src, header) for src, header in levels]
    header = levels[0][1]
    chunks = -(-header.num_tokens // header.chunk_tokens)
    assert chunks >= 4
    picks = [(i * 7 // 3) % len(LEVELS) for i in range(chunks)]  # every level, in no simple order
    assert set(picks) == {0, 1, 2}
    mixed = kvfile.decode_mixed(levels, picks)
    assert mixed.token_ids == header.token_ids
    for chunk, pick in enumerate(picks):
        lo, hi = chunk * header.chunk_tokens, min((chunk + 1) * header.chunk_tokens, header.num_tokens)
        for got, want in zip(mixed.keys + mixed.values, alone[pick].keys + alone[pick].values):
            assert torch.equal(got[:, lo:hi], want[:, lo:hi]), (chunk, pick)
    # The levels really differ, so a decode that ignored the picks would not pass.
    assert not torch.equal(alone[0].keys[0], alone[2].keys[0])
    for src, _ in levels:
        src.close()


def test_a_damaged_chunk_is_named_and_the_other_levels_chunk_still_decodes(level_files, tmp_path):
    data = bytearray(level_files[1].read_bytes())
    with format.FileSource(level_files[1]) as src:
        header = format.read_header(src)
    seg = [s for s in header.segments if s.kind != "aux" and s.token_start >= 8][0]
    data[header.data_offset + seg.offset] ^= 0xFF
    damaged = tmp_path / "damaged.kvc"
    damaged.write_bytes(bytes(data))
    levels = opened([level_files[0], damaged])
    rest = [0] * (-(-header.num_tokens // 8) - 2)
    with pytest.raises(FormatError, match=r"damaged.kvc: segment layer 0 K tokens \[8, 16\): checksum mismatch"):
        kvfile.decode_mixed(levels, [0, 1] + rest)
    kvfile.decode_mixed(levels, [1, 0] + rest)  # its chunk 0 is sound
    for src, _ in levels:
        src.close()


def test_files_of_other_tokens_or_chunking_are_not_mixed(tmp_path):
    paths = {}
    for name, kwargs in (("a", {}), ("b", {"seed": 1}), ("c", {"chunk": 4})):
        paths[name] = tmp_path / f"{name}.kvc"
        paths[name].write_bytes(make_cache(tokens=16, **kwargs))
    with pytest.raises(FormatError, match="its token_ids differs"):
        kvfile.decode_mixed(opened([paths["a"], paths["b"]]), [0, 1])
    with pytest.raises(FormatError, match="its chunk_tokens differs"):
        kvfile.decode_mixed(opened([paths["a"], paths["c"]]), [0, 1])


def test_a_segment_across_chunk_boundaries_is_refused(tmp_path):
    data = make_cache(tokens=16, chunk=8)
    with format.FileSource(_write(tmp_path / "a.kvc", data)) as src:
        header = format.read_header(src)
    meta = _meta_of(header)
    meta["chunk_tokens"] = 4  # the 8-token segments now cross the 4-token chunks
    parts = _parts_of(header, data)
    path = _write(tmp_path / "b.kvc", format.build_header(meta, parts) + b"".join(p.data for p in parts))
    (src, header), = opened([path])
    with pytest.raises(FormatError, match="crosses a boundary of its 4-token chunks"):
        kvfile.LevelDecoder(src, header)
    src.close()


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _meta_of(header: format.Header) -> dict:
    return {"model": header.model, "dtype": header.dtype, "token_ids": header.token_ids,
            "layers": [vars(s) for s in header.layers], "chunk_tokens": header.chunk_tokens,
            "codec": header.codec}


def _parts_of(header: format.Header, data: bytes) -> list[format.SegmentData]:
    base = header.data_offset
    return [format.SegmentData(s.kind, s.layer, s.token_start, s.token_count, data[base + s.offset: base + s.offset + s.length])
            for s in header.segments if s.kind != "aux"]
