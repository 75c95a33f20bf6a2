"""Cache keys: the documented derivation, stable across processes, sensitive to every input it covers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from servers import MODEL, make_cache

from kvcli.container import format, keys
from kvcli.errors import UsageError

CODEC = {"name": "kvq", "params": {"step": 0.25, "bits": [2, 3], "sinks": 1}}
IDS = [1, 2, 3, 70000, 0]


def test_key_follows_the_spec_byte_for_byte():
    # docs/format.md, "Cache keys", written out independently of the implementation.
    what = {"architecture": MODEL["architecture"], "config_digest": MODEL["config_digest"],
            "weights_digest": MODEL["weights_digest"], "tokenizer_digest": MODEL["tokenizer_digest"],
            "dtype": "float32", "codec": CODEC}
    text = json.dumps(what, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    token_bytes = b"".join(i.to_bytes(4, "little") for i in IDS)
    expected = hashlib.sha256(b"kvcli-cache-key-v1\0" + text.encode() + b"\0" + token_bytes).hexdigest()
    assert keys.derive_key(MODEL, "float32", CODEC, IDS) == expected
    assert keys.tokens_sha256(IDS) == hashlib.sha256(token_bytes).hexdigest()


def test_golden_key():
    # Pinned: changing the derivation orphans every stored cache, so it must be a deliberate, versioned change.
    assert keys.derive_key(MODEL, "float32", CODEC, IDS) == GOLDEN


GOLDEN = "c4193d2cfcd3f65e6317da9f9f1cecfcf9f6f5d1ec206f6aeb408543a6d45d7a"


def test_key_ignores_the_informational_name_and_covers_everything_else():
    base = keys.derive_key(MODEL, "float32", CODEC, IDS)
    assert keys.derive_key({**MODEL, "name": "renamed"}, "float32", CODEC, IDS) == base
    variants = [
        keys.derive_key({**MODEL, "weights_digest": "d" * 64}, "float32", CODEC, IDS),
        keys.derive_key({**MODEL, "tokenizer_digest": "d" * 64}, "float32", CODEC, IDS),
        keys.derive_key({**MODEL, "config_digest": "d" * 64}, "float32", CODEC, IDS),
        keys.derive_key({**MODEL, "architecture": "Other"}, "float32", CODEC, IDS),
        keys.derive_key(MODEL, "bfloat16", CODEC, IDS),
        keys.derive_key(MODEL, "float32", {**CODEC, "name": "kvq2"}, IDS),
        keys.derive_key(MODEL, "float32", {"name": "kvq", "params": {**CODEC["params"], "step": 0.5}}, IDS),
        keys.derive_key(MODEL, "float32", CODEC, IDS[:-1]),
        keys.derive_key(MODEL, "float32", CODEC, IDS[::-1]),
    ]
    assert len(set(variants + [base])) == len(variants) + 1


def test_key_of_a_header_equals_the_key_of_its_fields():
    data = make_cache()
    header = format.read_header(format.BytesSource(data))
    assert keys.key_of_header(header) == keys.derive_key(header.model, header.dtype, header.codec, header.token_ids)


def test_same_key_in_processes_with_different_hash_seeds():
    code = ("from kvcli.container import keys; import json, sys; a = json.loads(sys.argv[1]);"
            "print(keys.derive_key(a['m'], 'float32', a['c'], a['i']))")
    arg = json.dumps({"m": MODEL, "c": CODEC, "i": IDS})
    seen = set()
    for seed in ("0", "1", "12345", "random"):
        out = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed})
        seen.add(out.stdout.strip())
    assert seen == {GOLDEN}


@pytest.mark.parametrize("bad", ["", "A" * 64, "g" * 64, "a" * 63, "a" * 65, "../" + "a" * 61, "/etc/passwd",
                                 "a" * 63 + "\n", None])
def test_check_key_refuses_anything_but_64_lowercase_hex(bad):
    with pytest.raises(UsageError):
        keys.check_key(bad)


def test_token_ids_out_of_u32_range_are_refused():
    with pytest.raises(ValueError):
        keys.token_bytes([1 << 32])
    with pytest.raises(ValueError):
        keys.token_bytes([-1])
