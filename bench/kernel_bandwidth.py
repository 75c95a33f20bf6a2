"""GPU kernels: dequantize and quantize bandwidth, entropy-decode rate, and a .kvc in host memory to a cache on
the device against prefilling the same tokens.

    python bench/kernel_bandwidth.py [--tokens 32768] [--repeats 10] [--out FILE]
    python bench/kernel_bandwidth.py --skip tensor --skip end_to_end    # the device path's host costs only, any machine

One JSON line per measurement (device, versions, percentiles of `repeats` timed runs after a warm-up). The model
is a random-weight Qwen2 of Qwen2.5-0.5B's shape (no download), in bfloat16; its cache is encoded at `balanced`
on the CPU with kvcli's encoder. The end-to-end figure is the product's file path, `kvfile.decode(...,
backend="triton")` (what `kvcli decode/generate --backend triton` run), checked bit for bit against the torch
path on the CPU; a cProfile of one run names where its host time goes.

On a CPU, TRITON_INTERPRET=1 with `--tiny` runs every step on a two-layer model in seconds (no figures).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import transformers
from kvcli.codecs import entropy
from kvcli.codecs.kvq_ops import dequantize_triton as dq
from kvcli.codecs.kvq_ops.dequantize_triton import dequantize_rotate
from kvcli.codecs.kvq_ops.quantize_triton import quantize_unrotate
from kvcli.codecs.presets import make_codec
from kvcli.kernels import rans_decode

from kvcli.container import format, kvfile
from kvcli.modeling.kvcache import KVCache
from kvcli.modeling.rope import inv_freq_per_layer

# Datasheet HBM bandwidth, bytes/s: the denominators of the "fraction of peak" figures.
PEAK_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H200": 4.8e12,
                  "A100-SXM4-80GB": 2.04e12, "A100-SXM4-40GB": 1.555e12}
QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=131072, rope_theta=1e6,
                tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096)
IDENT = {"architecture": "Qwen2ForCausalLM", "config_digest": "a" * 64, "weights_digest": "b" * 64,
         "tokenizer_digest": "c" * 64}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: torch.device, first: list | None = None) -> tuple[list[float], object]:
    """Seconds of `repeats` calls after a warm-up call (whose seconds go to `first`, if given)."""
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    if first is not None:
        first.append(time.perf_counter() - t0)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, result


def percentiles(times: list[float]) -> dict:
    p = np.percentile(np.array(times), [10, 50, 90])
    return {"p10_s": round(float(p[0]), 6), "p50_s": round(float(p[1]), 6), "p90_s": round(float(p[2]), 6),
            "runs": len(times)}


def environment(device: torch.device) -> dict:
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
           "numpy": np.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        env.update(device=name, sms=props.multi_processor_count, cuda=torch.version.cuda,
                   peak_bandwidth_GBps=next((v / 1e9 for k, v in PEAK_BANDWIDTH.items() if k in name), None))
    else:
        env.update(device="cpu (TRITON_INTERPRET)", peak_bandwidth_GBps=None)
    return env


def emit(out, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        out.write(line + "\n")
        out.flush()


# ---------------------------------------------------------------- tensor kernels


SWEEP = [(tile, warps) for tile in (2048, 4096, 8192, 16384) for warps in (4, 8)]


def bench_tensor_kernels(env, out, device, tokens, heads, dim, repeats, sweep: bool) -> None:
    default = (dq.TILE_ELEMENTS, dq.NUM_WARPS)
    for config in SWEEP if sweep else [default]:
        dq.TILE_ELEMENTS, dq.NUM_WARPS = config
        bench_tensor_config(env, out, device, tokens, heads, dim, repeats)
    dq.TILE_ELEMENTS, dq.NUM_WARPS = default


def bench_tensor_config(env, out, device, tokens, heads, dim, repeats) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    peak = env["peak_bandwidth_GBps"]
    copy_src = torch.empty(heads * dim * tokens * 3, dtype=torch.int16, device=device)
    copy_dst = torch.empty_like(copy_src)
    times, _ = timed(lambda: copy_dst.copy_(copy_src), repeats, device)
    copy_gbps = 2 * copy_src.numel() * 2 / np.median(times) / 1e9
    emit(out, {"bench": "device_copy", "bytes_moved": 4 * copy_src.numel(), "GBps": round(copy_gbps, 1),
               **percentiles(times), **env})
    del copy_src, copy_dst
    freq = torch.from_numpy(1.0 / (1e6 ** (np.arange(0, dim, 2, dtype=np.float32) / dim)))
    center = torch.randn(heads, dim, device=device, generator=g).half().float()
    step = (torch.rand(heads, dim, device=device, generator=g) * 0.1 + 0.01).half().float()
    x = torch.randn(1, heads, tokens, dim, device=device, generator=g).to(torch.bfloat16)
    for rotate in (True, False):
        f = freq if rotate else None
        table_bytes = 2 * 4 * (dim // 2) * tokens if rotate else 0  # cos and sin, read once per head block
        times, q = timed(lambda: quantize_unrotate(x[0], center, step, f, 0), repeats, device)
        moved = x.numel() * 2 + q.numel() * 4 + table_bytes
        emit(out, {"bench": "quantize", "rope": rotate, "tile": dq.TILE_ELEMENTS, "warps": dq.NUM_WARPS, "heads": heads, "dim": dim, "tokens": tokens,
                   "in_dtype": "bfloat16", "bytes_moved": moved, "GBps": round(moved / np.median(times) / 1e9, 1),
                   "fraction_of_peak": round(moved / np.median(times) / 1e9 / peak, 3) if peak else None,
                   "fraction_of_copy": round(moved / np.median(times) / 1e9 / copy_gbps, 3), **percentiles(times), **env})
        out_cache = torch.empty(1, heads, tokens, dim, dtype=torch.bfloat16, device=device)
        times, _ = timed(lambda: dequantize_rotate(q, center, step, f, 0, out=out_cache[0]), repeats, device)
        moved = q.numel() * 4 + out_cache.numel() * 2 + table_bytes
        emit(out, {"bench": "dequantize", "rope": rotate, "tile": dq.TILE_ELEMENTS, "warps": dq.NUM_WARPS, "heads": heads, "dim": dim, "tokens": tokens,
                   "out_dtype": "bfloat16", "bytes_moved": moved, "GBps": round(moved / np.median(times) / 1e9, 1),
                   "fraction_of_peak": round(moved / np.median(times) / 1e9 / peak, 3) if peak else None,
                   "fraction_of_copy": round(moved / np.median(times) / 1e9 / copy_gbps, 3), **percentiles(times), **env})
        del q, out_cache
        sync(device)


# ---------------------------------------------------------------- the GPU file path


def decode_on_device(data: bytes, device: torch.device) -> KVCache:
    """The product's GPU file path: a .kvc in host memory to cache tensors on `device` (kvfile.decode with the
    triton backend: KvqDecoder.decode_onto, codecs/kvq_ops/decode_triton.py)."""
    src = format.BytesSource(data)
    return kvfile.decode(src, format.read_header(src), device=device, backend="triton")


def host_profile(data: bytes, device: torch.device, top: int = 8) -> list[list]:
    """(function, cumulative seconds) of one synced run's largest host costs, from cProfile."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    decode_on_device(data, device)
    sync(device)
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = sorted(((f"{fn[0].rsplit('/', 1)[-1]}:{fn[2]}", st[3]) for fn, st in stats.items()), key=lambda r: -r[1])
    return [[name, round(sec, 4)] for name, sec in rows[:top]]


def bench_host(env, out, tokens: int, chunk: int, repeats: int) -> None:
    """The device path's per-segment host work without a device: read and CRC32, size checks and cuts
    (KvqDecoder.split), and packing the upload, on a synthetic cache of Qwen2.5-0.5B's shape."""
    from kvcli.codecs.kvq_ops import decode_triton

    layers, heads, dim = QWEN_05B["num_hidden_layers"], QWEN_05B["num_key_value_heads"], 64
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(heads, tokens, dim, generator=g) + torch.randn(heads, 1, dim, generator=g) * 3
            for _ in range(layers)]
    values = [torch.randn(heads, tokens, dim, generator=g) for _ in range(layers)]
    freqs = [1.0 / (1e6 ** (np.arange(0, dim, 2, dtype=np.float32) / dim)) for _ in range(layers)]
    meta, parts = kvfile.encode(KVCache(list(range(tokens)), keys, values), IDENT,
                                make_codec("balanced", None, freqs), chunk)
    src = format.BytesSource(format.build_header(meta, parts) + b"".join(p.data for p in parts))
    header = format.read_header(src)
    _, decoder = kvfile.open_decoder(src, header)
    segs, ctxs = kvfile._segments(header)
    datas = [format.read_segment(src, header, seg) for seg in segs]
    split = decoder.split(list(zip(ctxs, datas)))
    state = decode_triton.DeviceState(decoder, torch.device("cpu"))
    counts = [state.layout(c.layer, ("k", "v").index(c.kind), c.tokens - skip).symbols for c, (_, skip, _) in
              zip(ctxs, split)]
    stages = {"read_and_crc32": lambda: [format.read_segment(src, header, seg) for seg in segs],
              "split_and_check": lambda: decoder.split(list(zip(ctxs, datas))),
              "pack_upload": lambda: rans_decode.upload(state.tables, counts, [s[2].stream for s in split])}
    for stage, fn in stages.items():
        times, _ = timed(fn, repeats, torch.device("cpu"))
        emit(out, {"bench": "device_path_host", "stage": stage, "segments": len(segs), "tokens": tokens,
                   "chunk_tokens": chunk, "us_per_segment": round(float(np.median(times)) / len(segs) * 1e6, 1),
                   **percentiles(times), **env})


def entropy_inputs(data: bytes, device: torch.device):
    """Every kvq segment's stream and table ids of a file, on the device: what the rANS launch takes."""
    src = format.BytesSource(data)
    header = format.read_header(src)
    _, decoder = kvfile.open_decoder(src, header)
    tables = rans_decode.DeviceTables(decoder.tables.coder, device)
    ids, counts, streams, elements = [], [], [], 0
    for seg, ctx in zip(*kvfile._segments(header)):
        _, skip, lim = decoder._segment(ctx)
        coded = entropy.split_segment(format.read_segment(src, header, seg), lim)
        kind = ("k", "v").index(ctx.kind)
        tid = decoder._table_ids(ctx, skip, decoder._entropy_layout(ctx.layer, kind, ctx.tokens - skip))
        if tid is None:  # before version 4: each group's class table
            tid = np.concatenate([np.full(g.tuples(ctx.tokens - skip), decoder.tables.index(g.cls), np.uint16)
                                  for g in decoder._groups[(ctx.layer, kind)]] + [np.zeros(0, np.uint16)])
        ids.append(tid.astype(np.uint8 if decoder.tables.coder.count <= 256 else np.int32))
        counts.append(len(tid))
        streams.append(coded.stream)
        elements += ctx.heads * ctx.dim * (ctx.tokens - skip)
    return tables, torch.from_numpy(np.concatenate(ids)).to(device), counts, streams, elements


# ---------------------------------------------------------------- model, prefill, end to end


def build_model(config: dict, device: torch.device, dtype: torch.dtype):
    cfg = transformers.Qwen2Config(**config)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(cfg)
    return model.to(dtype).eval()


def prefill(model, ids: torch.Tensor):
    with torch.inference_mode():
        result = model(input_ids=ids[None], use_cache=True, logits_to_keep=1)
    return result.past_key_values


def cache_tensors(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [la.keys[0] for la in layers], [la.values[0] for la in layers]
    return [k[0] for k in cache.key_cache], [v[0] for v in cache.value_cache]


def bench_end_to_end(env, out, device, model_config, tokens, repeats, chunks) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(model_config, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model_config["vocab_size"], (tokens,), generator=torch.Generator().manual_seed(1)).to(device)
    prefill_times, cache = timed(lambda: prefill(model, ids), max(2, repeats // 3), device)
    keys, values = cache_tensors(cache)
    kv = KVCache(ids.tolist(), [k.cpu() for k in keys], [v.cpu() for v in values])
    del cache, keys, values
    codec = make_codec("balanced", None, inv_freq_per_layer(model))
    elements = sum(k.numel() + v.numel() for k, v in zip(kv.keys, kv.values))
    base = {"model": "random Qwen2 " + ("0.5B shape" if model_config is QWEN_05B else "tiny"), "params": params,
            "tokens": tokens, "quality": "balanced", "cache_dtype": str(dtype), "kv_elements": elements, **env}
    emit(out, {"bench": "prefill", **percentiles(prefill_times), **base})
    for chunk in chunks:
        t0 = time.perf_counter()
        meta, parts = kvfile.encode(kv, IDENT, codec, chunk)
        data = format.build_header(meta, parts) + b"".join(p.data for p in parts)
        common = {"chunk_tokens": chunk, "kvc_bytes": len(data), **base}
        emit(out, {"bench": "encode_cpu", "seconds": round(time.perf_counter() - t0, 3), **common})
        end_to_end(out, device, data, prefill_times, repeats, common)


def end_to_end(out, device, data, prefill_times, repeats, common) -> None:
    first: list = []
    load_times, got = timed(lambda: decode_on_device(data, device), repeats, device, first)
    emit(out, {"bench": "kvc_to_device_cache", **percentiles(load_times), "first_call_s": round(first[0], 4),
               "host_profile_top": host_profile(data, device),
               "speedup_vs_prefill_p50": round(float(np.median(prefill_times) / np.median(load_times)), 2), **common})
    src = format.BytesSource(data)
    t0 = time.perf_counter()
    want = kvfile.decode(src, format.read_header(src), backend="torch")
    cpu_s = time.perf_counter() - t0
    same = all(torch.equal(a.cpu(), b) for a, b in zip(got.keys + got.values, want.keys + want.values))
    emit(out, {"bench": "cpu_decode_reference", "seconds": round(cpu_s, 3), "device_path_bit_identical": same,
               **common})
    tables, table_ids, counts, streams, coded_elements = entropy_inputs(data, device)
    times, _ = timed(lambda: rans_decode.decode_checked(tables, table_ids, counts, streams), repeats, device)
    batch = rans_decode.upload(tables, counts, streams)
    kernel_times, _ = timed(lambda: rans_decode.launch(tables, table_ids, batch), repeats, device)
    for what, t in (("upload of states and words, launch, status check", times), ("launch only", kernel_times)):
        emit(out, {"bench": "entropy_decode", "includes": what, "streams": len(streams), "symbols": sum(counts),
                   "lanes_per_program": batch.block, "elements": coded_elements,
                   "elements_per_s": round(coded_elements / float(np.median(t))), **percentiles(t), **common})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--chunk", type=int, action="append", help="chunk tokens of the file (repeatable; 256)")
    ap.add_argument("--tiny", action="store_true", help="a two-layer model and small tensors (CPU dry run)")
    ap.add_argument("--skip", action="append", default=[], choices=["tensor", "end_to_end", "host"])
    ap.add_argument("--sweep", action="store_true", help="time the kernels at every tile size and warp count")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    out = open(args.out, "a") if args.out else None
    if "tensor" not in args.skip:
        if args.tiny:
            bench_tensor_kernels(env, out, device, 33, 2, 8, args.repeats, False)
        else:  # one layer of an 8B model
            bench_tensor_kernels(env, out, device, args.tokens, 8, 128, args.repeats, args.sweep)
    if "host" not in args.skip:
        bench_host(env, out, 2048 if args.tiny else min(args.tokens, 8192), (args.chunk or [256])[0], args.repeats)
    if "end_to_end" not in args.skip:
        bench_end_to_end(env, out, device, TINY if args.tiny else QWEN_05B, args.tokens, args.repeats,
                         args.chunk or [256])
    if out:
        out.close()


if __name__ == "__main__":
    sys.exit(main())
