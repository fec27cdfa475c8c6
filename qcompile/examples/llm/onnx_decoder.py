"""A LLaMA decoder with a KV cache as ONNX, built with onnx.helper from a GGUF file's weights.

The layout is the common export of decoder models (onnxruntime-genai, Optimum):

    inputs   input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64,
             position_ids [batch, seq] int64,
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim] float32
    outputs  logits [batch, seq, vocab] float32,
             present.{i}.key / .value [batch, kv_heads, past + seq, head_dim] float32

Plain ONNX ops only (opset 17), so that TVM's importer reads them: RMSNorm as
Pow/ReduceMean/Add/Sqrt/Div/Mul, RoPE ("rotate half", the Hugging Face layout) from cos/sin
tables gathered by position_ids, the causal mask from attention_mask and the slots of the
new tokens (the last `seq` of `past + seq`), grouped-query attention by repeating the KV heads,
SwiGLU, the final norm, and the output projection (the token embedding when tied, by Gemm with
transB so that one table serves both).

Two forms: `four_bit=False`, every weight dequantized to float32 (the reference); `four_bit`,
each linear layer whose GGUF weight is Q4_0/Q4_1 a com.microsoft.MatMulNBits (bits 4, block
32) on the file's own codes: Q4_1 scales d with float zero points -m/d, Q4_0 scales d with
the default zero point 8. The embedding stays float in both.
"""

from __future__ import annotations

import numpy as np

from .gguf_file import Q4_BLOCK, GgufModel

OPSET = 17
MS_DOMAIN = "com.microsoft"
BATCH, SEQ, PAST, TOTAL = ("batch_size", "sequence_length", "past_sequence_length",
                           "total_sequence_length")
MASK_VALUE = float(np.finfo(np.float32).min)  # what masked scores get, as in transformers


def past_names(i: int) -> tuple[str, str]:
    return f"past_key_values.{i}.key", f"past_key_values.{i}.value"


def present_names(i: int) -> tuple[str, str]:
    return f"present.{i}.key", f"present.{i}.value"


def rope_tables(head_dim: int, theta: float, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [positions, head_dim] for rotate-half RoPE: angle(p, i) = p * theta^(-2i/d)
    for i < d/2, repeated for the second half (computed in float64)."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [N, K] (K a multiple of 32) -> MatMulNBits' B [N, K/32, 16]: two codes per
    byte, the even element in the low nibble."""
    n, k = codes.shape
    pairs = codes.reshape(n, k // 2, 2).astype(np.uint8)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).reshape(n, k // Q4_BLOCK, Q4_BLOCK // 2)


class _Graph:
    def __init__(self):
        self.nodes: list = []
        self.initializers: list = []
        self.names: set[str] = set()

    def const(self, name: str, value) -> str:
        if name not in self.names:
            self.names.add(name)
            self.initializers.append((name, np.ascontiguousarray(value)))
        return name

    def add_initializers(self, graph) -> None:
        """Write the constants into `graph` in place (make_graph would copy 0.5 GB twice)."""
        from onnx import helper

        for name, value in self.initializers:
            tensor = graph.initializer.add()
            tensor.name = name
            tensor.data_type = helper.np_dtype_to_tensor_dtype(value.dtype)
            tensor.dims.extend(value.shape)
            tensor.raw_data = value.tobytes()

    def ints(self, name: str, *values: int) -> str:
        return self.const(f"ints.{name}", np.array(values, np.int64))

    def scalar(self, name: str, value: float) -> str:
        return self.const(f"float.{name}", np.array(value, np.float32))

    def node(self, op: str, inputs: list[str], name: str, outputs: int = 1,
             domain: str = "", output_names: list[str] | None = None, **attrs):
        from onnx import helper

        outs = output_names or ([name] if outputs == 1 else
                                [f"{name}:{i}" for i in range(outputs)])
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None,
                                           **attrs))
        return outs[0] if outputs == 1 else outs


class _Decoder:
    def __init__(self, model: GgufModel, four_bit: bool):
        self.model, self.cfg, self.four_bit = model, model.config, four_bit
        self.g = _Graph()

    # -- layers ---------------------------------------------------------------------------

    def rms_norm(self, x: str, weight: str, name: str) -> str:
        g = self.g
        square = g.node("Pow", [x, g.scalar("two", 2.0)], f"{name}/pow")
        mean = g.node("ReduceMean", [square], f"{name}/mean", axes=[-1], keepdims=1)
        eps = g.node("Add", [mean, g.scalar("rms_eps", self.cfg.rms_eps)], f"{name}/eps")
        rms = g.node("Sqrt", [eps], f"{name}/sqrt")
        normed = g.node("Div", [x, rms], f"{name}/div")
        return g.node("Mul", [normed, g.const(weight, self.model.float_weight(weight))], name)

    def linear(self, x: str, weight: str) -> str:
        """x [..., K] @ weight[N, K]^T, by MatMulNBits on its codes when 4-bit."""
        g, name = self.g, weight.removesuffix(".weight")
        q4 = self.model.q4_weight(weight) if self.four_bit else None
        if q4 is None:
            w = self.model.float_weight(weight)
            return g.node("MatMul", [x, g.const(weight, np.ascontiguousarray(w.T))], name)
        n, k = q4.codes.shape
        inputs = [x, g.const(f"{weight}.codes", pack_nibbles(q4.codes)),
                  g.const(f"{weight}.scales", q4.scales.reshape(-1))]
        if q4.zero_points is not None:
            inputs.append(g.const(f"{weight}.zero_points", q4.zero_points.reshape(-1)))
        return g.node("MatMulNBits", inputs, name, domain=MS_DOMAIN, K=k, N=n, bits=4,
                      block_size=Q4_BLOCK)

    def heads(self, x: str, count: int, name: str) -> str:
        """[B, S, count * D] -> [B, count, S, D]"""
        g = self.g
        split = g.node("Reshape", [x, g.ints(f"heads{count}", 0, 0, count, self.cfg.head_dim)],
                       f"{name}/split")
        return g.node("Transpose", [split], name, perm=[0, 2, 1, 3])

    def rope(self, x: str, cos: str, sin: str, name: str) -> str:
        """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]"""
        g, half = self.g, self.cfg.head_dim // 2
        first = g.node("Slice", [x, g.ints("zero", 0), g.ints("half", half), g.ints("axis3", 3)],
                       f"{name}/x1")
        second = g.node("Slice", [x, g.ints("half", half), g.ints("head_dim", 2 * half),
                                  g.ints("axis3", 3)], f"{name}/x2")
        rotated = g.node("Concat", [g.node("Neg", [second], f"{name}/neg"), first],
                         f"{name}/rotate_half", axis=3)
        return g.node("Add", [g.node("Mul", [x, cos], f"{name}/cos"),
                              g.node("Mul", [rotated, sin], f"{name}/sin")], name)

    def repeat_kv(self, x: str, name: str) -> str:
        """[B, KV, T, D] -> [B, H, T, D]: query head h reads KV head h // (H / KV)."""
        g, cfg = self.g, self.cfg
        times = cfg.heads // cfg.kv_heads
        if times == 1:
            return x
        wide = g.node("Unsqueeze", [x, g.ints("axis2", 2)], f"{name}/unsqueeze")
        tiled = g.node("Concat", [wide] * times, f"{name}/tile", axis=2)
        return g.node("Reshape", [tiled, g.ints("all_heads", 0, cfg.heads, -1, cfg.head_dim)],
                      name)

    def attention(self, x: str, i: int, cos: str, sin: str, mask: str) -> str:
        g, cfg, p = self.g, self.cfg, f"blk.{i}"
        q = self.rope(self.heads(self.linear(x, f"{p}.attn_q.weight"), cfg.heads, f"{p}/q"),
                      cos, sin, f"{p}/q_rope")
        k = self.rope(self.heads(self.linear(x, f"{p}.attn_k.weight"), cfg.kv_heads, f"{p}/k"),
                      cos, sin, f"{p}/k_rope")
        v = self.heads(self.linear(x, f"{p}.attn_v.weight"), cfg.kv_heads, f"{p}/v")
        past_k, past_v = past_names(i)
        present_k, present_v = present_names(i)
        k = g.node("Concat", [past_k, k], f"{p}/present_k", axis=2, output_names=[present_k])
        v = g.node("Concat", [past_v, v], f"{p}/present_v", axis=2, output_names=[present_v])
        k, v = self.repeat_kv(k, f"{p}/k_heads"), self.repeat_kv(v, f"{p}/v_heads")
        kt = g.node("Transpose", [k], f"{p}/kt", perm=[0, 1, 3, 2])
        scores = g.node("MatMul", [q, kt], f"{p}/scores")
        scores = g.node("Mul", [scores, g.scalar("attn_scale", cfg.head_dim ** -0.5)],
                        f"{p}/scaled")
        scores = g.node("Add", [scores, mask], f"{p}/masked")
        probs = g.node("Softmax", [scores], f"{p}/probs", axis=-1)
        out = g.node("MatMul", [probs, v], f"{p}/context")
        out = g.node("Transpose", [out], f"{p}/context_t", perm=[0, 2, 1, 3])
        out = g.node("Reshape", [out, g.ints("merge_heads", 0, 0, cfg.heads * cfg.head_dim)],
                     f"{p}/merge")
        return self.linear(out, f"{p}.attn_output.weight")

    def mlp(self, x: str, i: int) -> str:
        g, p = self.g, f"blk.{i}"
        gate = self.linear(x, f"{p}.ffn_gate.weight")
        silu = g.node("Mul", [gate, g.node("Sigmoid", [gate], f"{p}/sigmoid")], f"{p}/silu")
        up = self.linear(x, f"{p}.ffn_up.weight")
        return self.linear(g.node("Mul", [silu, up], f"{p}/swiglu"), f"{p}.ffn_down.weight")

    # -- the graph ------------------------------------------------------------------------

    def causal_mask(self) -> str:
        """[B, 1, S, T] float: 0 where query slot T - S + s may read key slot t (t <= that
        slot and attention_mask[b, t] = 1), MASK_VALUE elsewhere."""
        g = self.g
        total = g.node("Gather", [g.node("Shape", ["attention_mask"], "mask/shape_t"),
                                  g.const("int.one", np.array(1, np.int64))],
                       "mask/total")
        seq = g.node("Gather", [g.node("Shape", ["input_ids"], "mask/shape_s"),
                                "int.one"], "mask/seq")
        start = g.node("Sub", [total, seq], "mask/past")
        one = "int.one"
        zero = g.const("int.zero", np.array(0, np.int64))
        keys = g.node("Range", [zero, total, one], "mask/keys")                # [T]
        queries = g.node("Range", [start, total, one], "mask/queries")         # [S]
        queries = g.node("Unsqueeze", [queries, g.ints("axis1", 1)], "mask/queries_col")
        causal = g.node("LessOrEqual", [keys, queries], "mask/causal")         # [S, T]
        padding = g.node("Cast", ["attention_mask"], "mask/keep", to=9)        # bool [B, T]
        padding = g.node("Unsqueeze", [padding, g.ints("axes12", 1, 2)], "mask/keep4")
        allowed = g.node("And", [causal, padding], "mask/allowed")            # [B, 1, S, T]
        return g.node("Where", [allowed, g.scalar("zero", 0.0),
                                g.scalar("mask_value", MASK_VALUE)], "mask")

    def build(self):
        from onnx import TensorProto, helper

        g, cfg = self.g, self.cfg
        cos_table, sin_table = rope_tables(cfg.head_dim, cfg.rope_theta, cfg.context)
        cos = g.node("Gather", [g.const("rope.cos", cos_table), "position_ids"], "rope/cos_g")
        sin = g.node("Gather", [g.const("rope.sin", sin_table), "position_ids"], "rope/sin_g")
        cos = g.node("Unsqueeze", [cos, g.ints("axis1", 1)], "rope/cos")   # [B, 1, S, D]
        sin = g.node("Unsqueeze", [sin, g.ints("axis1", 1)], "rope/sin")
        mask = self.causal_mask()
        embedding = g.const("token_embd.weight", self.model.float_weight("token_embd.weight"))
        h = g.node("Gather", [embedding, "input_ids"], "embed")
        for i in range(cfg.layers):
            x = self.rms_norm(h, f"blk.{i}.attn_norm.weight", f"blk.{i}/attn_norm")
            h = g.node("Add", [h, self.attention(x, i, cos, sin, mask)], f"blk.{i}/attn_res")
            x = self.rms_norm(h, f"blk.{i}.ffn_norm.weight", f"blk.{i}/ffn_norm")
            h = g.node("Add", [h, self.mlp(x, i)], f"blk.{i}/ffn_res")
        h = self.rms_norm(h, "output_norm.weight", "output_norm")
        if "output.weight" in self.model.tensors:
            g.node("Identity", [self.linear(h, "output.weight")], "logits_out",
                   output_names=["logits"])
        else:  # tied: logits = h @ embedding^T, the [V, H] table read by Gemm with transB
            rows = g.node("Reshape", [h, g.ints("rows", -1, cfg.hidden)], "output/rows")
            flat = g.node("Gemm", [rows, embedding], "output", transB=1)
            shape = g.node("Concat", [
                g.node("Slice", [g.node("Shape", ["input_ids"], "output/shape_ids"),
                                 g.ints("zero", 0), g.ints("two", 2)], "output/batch_seq"),
                g.ints("vocab", cfg.vocab)], "output/shape", axis=0)
            g.node("Reshape", [flat, shape], "output/logits", output_names=["logits"])

        def value(name, elem, dims):
            return helper.make_tensor_value_info(name, elem, dims)

        kv = [cfg.kv_heads, cfg.head_dim]
        inputs = [value("input_ids", TensorProto.INT64, [BATCH, SEQ]),
                  value("attention_mask", TensorProto.INT64, [BATCH, TOTAL]),
                  value("position_ids", TensorProto.INT64, [BATCH, SEQ])]
        outputs = [value("logits", TensorProto.FLOAT, [BATCH, SEQ, cfg.vocab])]
        for i in range(cfg.layers):
            inputs += [value(n, TensorProto.FLOAT, [BATCH, kv[0], PAST, kv[1]])
                       for n in past_names(i)]
            outputs += [value(n, TensorProto.FLOAT, [BATCH, kv[0], TOTAL, kv[1]])
                        for n in present_names(i)]
        graph = helper.make_graph(g.nodes, "llama_decoder", inputs, outputs)
        opsets = [helper.make_opsetid("", OPSET)]
        if self.four_bit:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="qcompile")
        model.ir_version = 8
        name = self.model.get("general.name")
        if name:
            helper.set_model_props(model, {"source": self.model.path.name, "name": str(name)})
        g.add_initializers(model.graph)
        return model


def build_decoder(model: GgufModel, four_bit: bool = False):
    """The decoder with a KV cache as an onnx.ModelProto (see the module's docstring);
    unchecked: onnx.checker serializes it, so save() checks the bytes it writes."""
    return _Decoder(model, four_bit).build()
