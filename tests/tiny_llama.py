"""A small random LLaMA-architecture GGUF file, written with the gguf package: for the converter's
tests and for compiling a decoder without the real model's size."""

from __future__ import annotations

import numpy as np

TINY = dict(layers=2, hidden=64, ffn=96, heads=4, kv_heads=2, vocab=64)
TINY_TYPES = {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "F16",
              "ffn_gate": "Q4_1", "ffn_up": "Q4_0", "ffn_down": "F32"}


def write_gguf(path, arch: str = "llama", types: dict | None = None,
               claimed_layers: int | None = None, output: str | None = None, **meta) -> str:
    """A small random LLaMA GGUF (TINY), linear weights of `types`, embedding Q8_0; tied
    unless `output` gives the type of an output.weight."""
    import gguf

    cfg = {**TINY, **meta}
    types = {**TINY_TYPES, **(types or {})}
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(claimed_layers or cfg["layers"])
    writer.add_embedding_length(cfg["hidden"])
    writer.add_feed_forward_length(cfg["ffn"])
    writer.add_head_count(cfg["heads"])
    writer.add_head_count_kv(cfg["kv_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_context_length(128)

    def add(name, shape, kind, scale=0.2):
        values = (rng.standard_normal(shape) * scale).astype(np.float32)
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            writer.add_tensor(name, values)
        elif kind == "F16":
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)

    h, f = cfg["hidden"], cfg["ffn"]
    kv = h // cfg["heads"] * cfg["kv_heads"]
    add("token_embd.weight", (cfg["vocab"], h), "Q8_0", 1.0)
    shapes = {"attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, h),
              "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}
    for i in range(cfg["layers"]):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", 1 + 0.1 * rng.standard_normal(h)
                          .astype(np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + 0.1 * rng.standard_normal(h)
                          .astype(np.float32))
        for part, shape in shapes.items():
            add(f"blk.{i}.{part}.weight", shape, types[part])
    writer.add_tensor("output_norm.weight", np.ones(h, np.float32))
    if output:
        add("output.weight", (cfg["vocab"], h), output)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)
