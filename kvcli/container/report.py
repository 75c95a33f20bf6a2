"""`kvcli inspect`: a .kvc header summarized as a dict, and that dict as text."""

from __future__ import annotations

from . import dictionary, format

FP16_BYTES = 2


def describe(header: format.Header, file_size: int) -> dict:
    elements = header.elements()
    per_layer = []
    for li, shape in enumerate(header.layers):
        k = sum(s.length for s in header.segments if s.layer == li and s.kind == "k")
        v = sum(s.length for s in header.segments if s.layer == li and s.kind == "v")
        held = header.num_tokens - shape.token_start
        k_el = shape.kv_heads * held * shape.key_dim
        v_el = shape.kv_heads * held * shape.value_dim
        per_layer.append({"layer": li, "tokens": held, "k_bytes": k, "v_bytes": v,
                          "k_bits_per_element": round(8 * k / k_el, 3), "v_bits_per_element": round(8 * v / v_el, 3)})
    aux = sum(s.length for s in header.segments if s.kind == "aux")
    first = header.layers[0]
    sha = dictionary.named_by(header)
    return {
        "format_version": f"{header.major}.{header.minor}",
        "model": header.model,
        "tokens": header.num_tokens,
        "layers": len(header.layers),
        "kv_heads": first.kv_heads,
        "head_dim": first.key_dim,
        "dtype": header.dtype,
        "codec": header.codec,
        "dictionary": {"sha256": sha, "embedded": dictionary.embeds(header), "name": dictionary.name_of(sha)} if sha else None,
        "chunk_tokens": header.chunk_tokens,
        "segments": len(header.segments),
        "file_bytes": file_size,
        "header_bytes": header.data_offset,
        "aux_bytes": aux,
        "elements": elements,
        "bits_per_element": round(8 * file_size / elements, 4),
        "ratio_vs_fp16": round(elements * FP16_BYTES / file_size, 3),
        "created_by": header.created_by or None,
        "created_at": header.created_at or None,
        "source": header.source,
        "per_layer": per_layer,
        **({"extra": header.extra} if header.extra else {}),
    }


def _versus_fp16(ratio: float) -> str:
    """`ratio` is fp16 bytes over file bytes: above 1 the file is smaller than fp16, below 1 larger."""
    if ratio >= 1:
        return f"{ratio:.2f}x smaller"
    return f"{1 / ratio:.2f}x larger"


def render(info: dict) -> str:
    m = info["model"]
    codec = info["codec"]
    params = ", ".join(f"{k}={v}" for k, v in sorted(codec["params"].items()) if not isinstance(v, (list, dict)))
    lines = [
        f"format       .kvc {info['format_version']}",
        f"model        {m.get('name', '?')} ({m['architecture']})",
        f"  config     {m['config_digest'][:16]}",
        f"  weights    {m['weights_digest'][:16]}",
        f"  tokenizer  {m['tokenizer_digest'][:16]}",
        f"tokens       {info['tokens']}",
        f"layers       {info['layers']} x {info['kv_heads']} kv heads x head_dim {info['head_dim']}, {info['dtype']}",
        f"codec        {codec['name']}" + (f" ({params})" if params else ""),
        *([f"dictionary   {info['dictionary']['sha256']} ("
           + ("embedded in the file)" if info["dictionary"]["embedded"]
              else f"{info['dictionary']['name']}, not embedded: from the file's store or directory, or a cache)")]
          if info.get("dictionary") else []),
        f"segments     {info['segments']} (chunks of {info['chunk_tokens']} tokens)",
        f"size         {info['file_bytes']:,} bytes (header {info['header_bytes']:,}, tables {info['aux_bytes']:,})",
        f"bits/element {info['bits_per_element']}",
        f"vs fp16      {_versus_fp16(info['ratio_vs_fp16'])}",
    ]
    if info["created_at"] or info["created_by"]:
        lines.append(f"created      {info['created_at'] or '?'} by {info['created_by'] or '?'}")
    if info["source"]:
        lines.append(f"source       sha256 {info['source']['sha256'][:16]}…, {info['source']['bytes']:,} bytes")
    lines += [
        "",
        "layer  tokens    K bytes    V bytes  K bits/el  V bits/el",
    ]
    for row in info["per_layer"]:
        lines.append(f"{row['layer']:>5}  {row['tokens']:>6}  {row['k_bytes']:>9,}  {row['v_bytes']:>9,}  "
                     f"{row['k_bits_per_element']:>9.3f}  {row['v_bits_per_element']:>9.3f}")
    return "\n".join(lines)
