"""The bytes every preset writes for one fixed cache, pinned by SHA-256: a restructuring of the codec's code must
not change one of them. The lossy presets are pinned twice: in version 3 (the default) and in version 4, which the
encoder writes when asked (make_codec(version=4)).

The digests were taken at cc2a417, before kvq's arithmetic moved into codecs/kvq_ops/, and must never be edited
to make this test pass: a change of a digest is a change of the format's bytes, which needs a new bitstream
version. The cache is built from numpy's PCG64, whose stream numpy keeps stable across releases, and exercises
what changes bytes: rotary keys, a sliding-window layer, sinks, a profile with key weights, token weights, three
dtypes, several chunks. Both backends must give the same bytes (the triton one under TRITON_INTERPRET=1).

Those digests pin the codec's arithmetic with the encoder's full range of token exponents. `tiny` and later `small`
and `balanced` got a cap on them (codecs/presets.py TOKEN_COARSEST: an encoder policy within the same format, which every decoder
reads as it did), so their presets' own bytes are pinned apart (CAPPED_DIGESTS, taken when each cap was added), and
the arithmetic pins are checked with the caps lifted.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from kvcli.codecs.kvq import TOKEN_EXPONENT_LIMIT, Profile
from kvcli.codecs.presets import QUALITIES, TOKEN_COARSEST, make_codec

from kvcli.container import kvfile
from kvcli.modeling.kvcache import KVCache

IDENT = {"architecture": "X", "config_digest": "a" * 64, "weights_digest": "b" * 64, "tokenizer_digest": "c" * 64}
LAYERS, HEADS, TOKENS, DIM, WINDOW = 3, 2, 80, 16, 50
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# (quality, dtype) -> SHA-256 of the codec's params and every segment (fixed_digest), computed at cc2a417.
DIGESTS = {
    ('lossless', 'bfloat16'): "03e6f49547bda8c6f318afa51b7aace66432e19c7293ac2c18ee05b3aa7eea5f",
    ('lossless', 'float16'): "d61d73f4535addbe077387e0aebc931cd6f563a6672cf1f513762d301c92f7a9",
    ('lossless', 'float32'): "f8cb5ee29a1e29339e286a3dcbf5bbe42256936fdd834f34626d5abac4918fd9",
    ('high', 'bfloat16'): "c32e93de5d71dd94e5778d5ecc3acd7d9d77abaccd6b2291d3d1cbebd3010d44",
    ('high', 'float16'): "c671c9f46a2c8a79f64c4640c4251302d482a89c303a47afccbe79355328a8fd",
    ('high', 'float32'): "926d1cbb4d647ec2c741e330d91260c85d08e8407d9a4c2e8824e65c44c2a9b1",
    ('balanced', 'bfloat16'): "2b63f84ee78ae2607a3471141a3c4db8a1d90b4dac023c5c434be16adf6da47c",
    ('balanced', 'float16'): "b2f6baa53fb4d66e663bc7ae2e4dff734d63b9378fb271fa834021ea72eaf9b2",
    ('balanced', 'float32'): "452375725f44fee6695e83390a06f9583700e8c5d20b277720e9391e2805eb64",
    ('small', 'bfloat16'): "f2486e621f7fd9016acc5c1dfb609ebfda335cc72160793f753b678a54038578",
    ('small', 'float16'): "6e0de8dc7157e290df93cee92551b60574200c4fd12c093e982d186cb82ac74c",
    ('small', 'float32'): "ff84b0a037f4751fbcbb41b5b193e9f3ffdfb065c1b78a2f0d7ef6a8134e751e",
    ('tiny', 'bfloat16'): "28afc13d0f4930b57a24c6b70a0dd5c381016cd89c880c43666253213cd12752",
    ('tiny', 'float16'): "4c01c86111d0476825e2cee70713be09ab3778502c9aedaf72e6c00dbf1f85a6",
    ('tiny', 'float32'): "51f69d2669098ca159ea947551bb58d5754d224e200f975a2eb8bb92cbfed815",
    ('raw', 'bfloat16'): "e08fd3a96bb2e36977e777104708e60570376df4c98418a554c941cc26692d46",
    ('raw', 'float16'): "e5a8cdeb8e4b1542ad6ae234f5e9118bbb5f6cfbfa1cffa08b46eacaca5a41a1",
    ('raw', 'float32'): "4610b89a75b59b4c4104fc8731e1c83fb32750eb4f72a86da2fe4b7c97ebe5f5",
}


# (quality, dtype) -> the same digest for kvq bitstream version 4 (tables per class and token-exponent band),
# taken when version 4 was written (branch h-bands); the encoder writes it when asked.
V4_DIGESTS = {
    ('high', 'bfloat16'): "850f43d5e785be4199f12b023fb631b13435e3f94e17612426e4ad2813c70b5b",
    ('high', 'float16'): "9364941fe53d9c8055645f3ad57e7888b3dceb8f6336103757ce683bafd1b6aa",
    ('high', 'float32'): "ee773c858113bac7273b79cbecd5c064f4c2650553bf5e4afcc117f29383d93a",
    ('balanced', 'bfloat16'): "ab86286d97cfe21737c0b9c1d4ff2df07ed87d37cc3a8776de8b8568005ef89a",
    ('balanced', 'float16'): "f964e6861d44ba6cf3200d0f41249435b75c74fbac36012551b49cccf0f12e99",
    ('balanced', 'float32'): "6bcea221ba421820f92f7f44ed72208ff3fdb3e49cbfc2bafca8dbf17456ac73",
    ('small', 'bfloat16'): "c0f44a2ad999c9c937f644255e166c580951c433c8a3dfb8bb98095fce1ffa9c",
    ('small', 'float16'): "200cd3b867a1b6f854153236680abec076b774916cd2085425a44081a554be97",
    ('small', 'float32'): "3dfa4c8fd015d372e837171edd77d362fc4e59d3c8e53fbbbe41b61add56d68f",
    ('tiny', 'bfloat16'): "542129366f874b116453e20e81a59b00201bc8129461c997338bc3917f303f9b",
    ('tiny', 'float16'): "b95e5a26d36f8a2d3d42c0912314f2d43702dca43cdcd5d339c22c9f177ac03e",
    ('tiny', 'float32'): "5e39c63a8f3c9ef28471686fa5b5e50a6c1915dda86cded71c773c13a0bd7194",
}


# (quality, version, dtype) -> the digest of a capped preset as it writes it, with its token cap (`tiny`'s taken at
# 1f3a542's code, `small`'s and `balanced`'s when their caps were added).
CAPPED_DIGESTS = {
    ('tiny', 3, 'bfloat16'): "c012ab5c809e09af9b8d0baf4d59cb55beef5c59a74d49ad9e5bc108610349d9",
    ('tiny', 3, 'float16'): "2eb15554191bcb9e55e2fe10dcb6b25d5074b8673b9005a0aec6279d75d3b0fe",
    ('tiny', 3, 'float32'): "596b6a0a62145202451d8d595efd588aefca1658f482afc04ddc803396c8f3fa",
    ('tiny', 4, 'bfloat16'): "437e2e8bd24504017fe7c67692630d9f361f5eecb347d05527bf20077bda62c5",
    ('tiny', 4, 'float16'): "fd1736e2771853c45809f479d47bf8063eaa4c2bfe4a1c0b2de6a283ffd80f91",
    ('tiny', 4, 'float32'): "f4c009503714a7ce6c15a899e732858dc95ee51448fc551a76b98eec55eb05b3",
    ('small', 3, 'bfloat16'): "39c1261a9c063c440744b23520264c6a7bbb543428b00c3724fb8dad67c711bb",
    ('small', 3, 'float16'): "5de74c55a4a5f0343f705d99e29dc6f80eec1b91be8b6d13af8fa50a372f8a64",
    ('small', 3, 'float32'): "efb69d895167e558439b22b4c41e583a31314ea8c1db634749b4bf3d45c78f71",
    ('small', 4, 'bfloat16'): "15b6b07480c2a06fbe8c22f1703840bbca2807a4110200e0640ff7ca04e1d371",
    ('small', 4, 'float16'): "9b5b9a08a7440b4b77869d67494b2efd398b5ec0eac07548b1991c75c57f9e20",
    ('small', 4, 'float32'): "51cb67728cecf729a59dc981b0ba3a6d83b806061dbaf025d77e9565bc5dcdc5",
    ('balanced', 3, 'bfloat16'): "9348ca3ac3fa77a1a9a1d89983ae231c0534b4f15f9631f9a5278d64be81097c",
    ('balanced', 3, 'float16'): "31b50af19fbf48c15bcb9517894ea137789f006b08a98fb36fa5822553d14378",
    ('balanced', 3, 'float32'): "e16c2687159795a0a7bacc2cc72c5ff8f0f848b7309183de98d270575102ce3b",
    ('balanced', 4, 'bfloat16'): "5e2cc45bfbcdbab1abb73bbb2f487cf8a4bbb4f24d03143f8e524029a04276d2",
    ('balanced', 4, 'float16'): "d1979bfe2aa2c27e1b90ca25e90ea08cb65f4cb50387b15401dbd2ba7e9b8442",
    ('balanced', 4, 'float32'): "b375faf152c4f7ef4aac358d8ffb850ada2cd1ef2420dd041cab246e464e25af",
}


def fixed_cache(dtype: torch.dtype) -> KVCache:
    rng = np.random.Generator(np.random.PCG64(20261206))
    keys, values, attention = [], [], []
    for layer in range(LAYERS):
        held = WINDOW if layer == 1 else TOKENS  # layer 1 keeps a sliding window: its first position is 30
        drift = rng.standard_normal((HEADS, 1, DIM)) * 4
        keys.append(torch.from_numpy((rng.standard_normal((HEADS, held, DIM)) + drift).astype(np.float32)).to(dtype))
        values.append(torch.from_numpy(rng.standard_normal((HEADS, held, DIM)).astype(np.float32)).to(dtype))
        attention.append(torch.from_numpy(rng.random((HEADS, held)).astype(np.float32) ** 3))
    return KVCache(list(range(TOKENS)), keys, values, attention)


def fixed_profile() -> Profile:
    rng = np.random.Generator(np.random.PCG64(7))
    sensitivity = rng.random((LAYERS, 2, HEADS)) + 0.1
    return Profile("fixed", sensitivity, [rng.random((HEADS, DIM)) + 0.05 for _ in range(LAYERS)])


def fixed_digest(quality: str, dtype: str, backend: str = "torch", version: int | None = None,
                 preset_policy: bool = False) -> str:
    """The digest of what `quality`'s codec writes for the fixed cache: its arithmetic with every token exponent
    allowed, or with `preset_policy` as the preset writes it (its token cap)."""
    inv_freq = [1.0 / (10000 ** (np.arange(0, DIM, 2, dtype=np.float32) / DIM)) for _ in range(LAYERS)]
    codec = make_codec(quality, fixed_profile(), inv_freq, **({"version": version} if version else {}),
                       token_coarsest=None if preset_policy else TOKEN_EXPONENT_LIMIT)
    meta, parts = kvfile.encode(fixed_cache(DTYPES[dtype]), IDENT, codec, 32, backend=backend)
    h = hashlib.sha256(json.dumps(meta["codec"], sort_keys=True).encode())
    for p in parts:
        h.update(json.dumps([p.kind, p.layer, p.token_start, p.token_count, p.name, len(p.data)]).encode())
        h.update(p.data)
    return h.hexdigest()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("quality", QUALITIES)
def test_every_preset_writes_the_bytes_it_wrote_before(quality, dtype):
    """Every preset as it is (kvq at version 3, the default)."""
    assert fixed_digest(quality, dtype) == DIGESTS[(quality, dtype)]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("quality", sorted({q for q, _ in V4_DIGESTS}))
def test_every_lossy_preset_writes_the_version_4_bytes_it_wrote_before(quality, dtype):
    """kvq presets at version 4, written on request (make_codec(version=4))."""
    assert fixed_digest(quality, dtype, version=4) == V4_DIGESTS[(quality, dtype)]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("version", [3, 4])
@pytest.mark.parametrize("quality", sorted(TOKEN_COARSEST))
def test_a_capped_preset_writes_the_bytes_it_wrote_with_its_token_cap(quality, version, dtype):
    assert TOKEN_COARSEST[quality] < TOKEN_EXPONENT_LIMIT  # else the arithmetic pins above already cover it
    assert fixed_digest(quality, dtype, version=version, preset_policy=True) == CAPPED_DIGESTS[(quality, version, dtype)]


@pytest.mark.parametrize("quality", ["high", "small"])
def test_the_triton_backend_writes_the_same_bytes(quality):
    pytest.importorskip("triton")
    assert fixed_digest(quality, "float32", "triton") == DIGESTS[(quality, "float32")]


@pytest.mark.parametrize("quality", ["high", "small"])
def test_the_triton_backend_writes_the_same_version_4_bytes(quality):
    pytest.importorskip("triton")
    assert fixed_digest(quality, "float32", "triton", version=4) == V4_DIGESTS[(quality, "float32")]
