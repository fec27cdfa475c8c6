"""A LLaMA-architecture GGUF file (llama.cpp's format), read with PyPI's `gguf`.

What is read: the architecture's hyperparameters, the tensors (dequantized to float32 by
`gguf.quants`, or, for 4-bit Q4_0/Q4_1 weights, their own codes, scales and minimums), and the
tokenizer's metadata (tokenizer.py). Anything else is refused in one paragraph: another
architecture, a tensor type outside SUPPORTED_TYPES, RoPE scaling, tensors it does not know.

llama.cpp's converter stores the rows of the Q and K projections permuted for its
adjacent-pair rotary embedding (it rotates (x[2i], x[2i+1]) of each head); every weight read
here has them put back into the Hugging Face order, in which RoPE rotates (x[i], x[i + d/2])
("rotate half"). For 4-bit weights the permutation moves whole rows, so the codes stay exact.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import MissingPackageError, ModelError

ARCHITECTURE = "llama"
SUPPORTED_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
FOUR_BIT_TYPES = ("Q4_0", "Q4_1")
Q4_BLOCK = 32  # values per block of Q4_0/Q4_1 along a row (the reduction axis K)

# each layer's tensors: the seven linear layers (weight [N, K]) and the two norms
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
LAYER_NORMS = ("attn_norm", "ffn_norm")
# tied: `output.weight` is absent and the token embedding is the output projection
MODEL_TENSORS = ("token_embd.weight", "output_norm.weight")
OPTIONAL_TENSORS = ("output.weight",)


@dataclass(frozen=True)
class LlamaConfig:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    vocab: int
    context: int  # the trained context length: the RoPE tables cover this many positions


@dataclass(frozen=True)
class Q4Weight:
    """A [N, K] weight as its GGUF 4-bit codes, blocks of 32 along K:
    w[n, k] = (codes[n, k] - zero_points[n, k // 32]) * scales[n, k // 32].
    Q4_1 (w = d * q + m): scales d, zero points -m / d (float); Q4_0 (w = d * (q - 8)):
    scales d, zero points None (8)."""

    kind: str                        # "Q4_0" or "Q4_1"
    codes: np.ndarray                # uint8 [N, K], in [0, 16)
    scales: np.ndarray               # float32 [N, K / 32]: d, exactly (fp16 widened)
    zero_points: np.ndarray | None   # float32 [N, K / 32]; None: 8

    def values(self) -> np.ndarray:
        """The float32 weight [N, K] that MatMulNBits computes from the codes."""
        n, k = self.codes.shape
        zero = np.float32(8) if self.zero_points is None else self.zero_points[:, :, None]
        blocks = self.codes.reshape(n, -1, Q4_BLOCK).astype(np.float32)
        return ((blocks - zero) * self.scales[:, :, None]).reshape(n, k)


def require() -> None:
    """Raise MissingPackageError naming the `llm` extra's packages that are not installed."""
    missing = [name for name in ("gguf", "tokenizers") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingPackageError(
            f"Converting GGUF models needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: they are the `llm` extra "
            "of qcompile. Install them with `pip install \"qcompile[llm]\"` (from a checkout: "
            "`pip install \".[llm]\"`).")


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


class GgufModel:
    """An open GGUF file of a LLaMA-architecture model."""

    def __init__(self, path: str | Path):
        require()
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"The GGUF file {self.path} does not exist.")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as err:  # gguf raises ValueError, struct.error, ... on bad files
            raise ModelError(
                f"{self.path} is not a GGUF file that PyPI's gguf can read ({err}). The "
                "converter reads GGUF files of LLaMA-architecture models as llama.cpp "
                "writes them.") from err
        self.tensors = {t.name: t for t in self._reader.tensors}
        self.config = self._check()

    def get(self, key: str, default=None):
        """A metadata value (str, int, float, bool or list), or `default`."""
        return _field(self._reader, key, default)

    def type_of(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def _check(self) -> LlamaConfig:
        arch = self.get("general.architecture")
        if arch != ARCHITECTURE:
            raise ModelError(
                f"{self.path.name} is a GGUF model of architecture '{arch}'. The converter "
                f"handles the '{ARCHITECTURE}' architecture only (LLaMA-style decoders: "
                "RMSNorm, rotary embeddings, grouped-query attention, SwiGLU; such as "
                "SmolLM2, TinyLlama, Llama 2); convert a model of that architecture.")
        self._check_types()
        config = self._config()
        self._check_tensors(config)
        return config

    def _check_types(self) -> None:
        unsupported: dict[str, list[str]] = {}
        for name, tensor in self.tensors.items():
            kind = tensor.tensor_type.name
            if kind not in SUPPORTED_TYPES:
                unsupported.setdefault(kind, []).append(name)
        if unsupported:
            found = "; ".join(f"{kind} ({len(names)} tensor{'s' * (len(names) > 1)}, e.g. "
                              f"{names[0]})" for kind, names in sorted(unsupported.items()))
            raise ModelError(
                f"{self.path.name} has tensors of quantization types the converter does not "
                f"handle: {found}. It reads {', '.join(SUPPORTED_TYPES)} (Q4_0 and Q4_1 "
                "linear weights become 4-bit MatMulNBits with the file's own codes); "
                "requantize the model to one of those with llama.cpp's llama-quantize "
                "(e.g. Q4_1 or Q8_0).")

    def _int(self, key: str) -> int:
        value = self.get(f"{ARCHITECTURE}.{key}")
        if value is None:
            raise ModelError(
                f"{self.path.name} has no '{ARCHITECTURE}.{key}' in its metadata. The "
                "converter needs the hyperparameters that llama.cpp's converter writes for "
                "a LLaMA model (block_count, embedding_length, feed_forward_length, "
                "attention.head_count, ...).")
        return int(value)

    def _config(self) -> LlamaConfig:
        hidden, heads = self._int("embedding_length"), self._int("attention.head_count")
        kv_heads = int(self.get(f"{ARCHITECTURE}.attention.head_count_kv", heads))
        head_dim = hidden // heads
        rope_dims = int(self.get(f"{ARCHITECTURE}.rope.dimension_count", head_dim))
        scaling = self.get(f"{ARCHITECTURE}.rope.scaling.type", "none")
        key_length = int(self.get(f"{ARCHITECTURE}.attention.key_length", head_dim))
        problems = []
        if hidden % heads or heads % kv_heads:
            problems.append(f"{heads} heads for width {hidden} and {kv_heads} KV heads")
        if rope_dims != head_dim or key_length != head_dim:
            problems.append(f"rotary embedding on {rope_dims} of {head_dim} head dimensions "
                            f"(key length {key_length})")
        if scaling not in ("none", None) or "rope_freqs.weight" in self.tensors:
            problems.append(f"RoPE scaling ({scaling}"
                            f"{', rope_freqs.weight' * ('rope_freqs.weight' in self.tensors)})")
        if problems:
            raise ModelError(
                f"{self.path.name} has {'; '.join(problems)}. The converter handles plain "
                "LLaMA attention: every head of width embedding_length / head_count, the "
                "query heads a multiple of the KV heads, rotary embedding over the whole "
                "head without scaling.")
        vocab = self.tensors["token_embd.weight"].shape[-1] if "token_embd.weight" in \
            self.tensors else self._int("vocab_size")
        return LlamaConfig(
            layers=self._int("block_count"), hidden=hidden,
            ffn=self._int("feed_forward_length"), heads=heads, kv_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=float(self.get(f"{ARCHITECTURE}.rope.freq_base", 10000.0)),
            rms_eps=float(self.get(f"{ARCHITECTURE}.attention.layer_norm_rms_epsilon", 1e-5)),
            vocab=int(vocab),
            context=int(self.get(f"{ARCHITECTURE}.context_length", 2048)))

    def _check_tensors(self, config: LlamaConfig) -> None:
        expected = set(MODEL_TENSORS)
        for i in range(config.layers):
            expected |= {f"blk.{i}.{part}.weight" for part in LINEARS + LAYER_NORMS}
        missing = sorted(expected - set(self.tensors))
        unknown = sorted(set(self.tensors) - expected - set(OPTIONAL_TENSORS))
        if missing or unknown:
            def some(names):
                return ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")

            found = "; ".join([f"missing {some(missing)}"] * bool(missing) +
                              [f"unknown {some(unknown)}"] * bool(unknown))
            raise ModelError(
                f"{self.path.name}'s tensors are not those of a plain LLaMA model: {found}. "
                "The converter expects token_embd, output_norm, optionally output, and per "
                "block the attn_q/k/v/output, ffn_gate/up/down weights and attn_norm, "
                "ffn_norm (no biases).")

    # -- tensors ----------------------------------------------------------------------------

    def _rows_order(self, name: str) -> np.ndarray | None:
        """The row order that undoes llama.cpp's Q/K permutation, or None."""
        part = name.split(".")[-2] if name.startswith("blk.") else ""
        heads = {"attn_q": self.config.heads, "attn_k": self.config.kv_heads}.get(part)
        if heads is None:
            return None
        half = self.config.head_dim // 2
        # GGUF row 2i + j of a head is Hugging Face row j * half + i
        return np.arange(heads * 2 * half).reshape(heads, half, 2).transpose(0, 2, 1).ravel()

    def float_weight(self, name: str) -> np.ndarray:
        """A tensor dequantized to float32, rows [N, K] as the GGUF stores them (1-D norms
        as [N]); Q and K projections in the Hugging Face row order."""
        import gguf

        tensor = self.tensors[name]
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        values = np.asarray(values, np.float32)
        rows = self._rows_order(name)
        return np.ascontiguousarray(values if rows is None else values[rows])

    def q4_weight(self, name: str) -> Q4Weight | None:
        """A Q4_0/Q4_1 weight's own codes, scales and zero points (None for other types)."""
        tensor = self.tensors[name]
        kind = tensor.tensor_type.name
        if kind not in FOUR_BIT_TYPES:
            return None
        header = 4 if kind == "Q4_1" else 2  # fp16 d (and m), then 16 bytes of codes
        raw = np.asarray(tensor.data, np.uint8)
        n = raw.shape[0]
        blocks = raw.reshape(n, -1, header + Q4_BLOCK // 2)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        packed = blocks[..., header:]
        # ggml: element j of a block is the low nibble of byte j, element j + 16 the high one
        codes = np.concatenate([packed & 15, packed >> 4], axis=-1)  # [N, blocks, 32]
        zero = None
        if kind == "Q4_1":
            m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            flat = d == 0
            # a block with d = 0 is the constant m: codes 1, scale m, zero point 0 say that
            codes[flat] = 1
            d = np.where(flat, m, d)
            with np.errstate(divide="ignore", invalid="ignore"):
                zero = np.where(flat, np.float32(0), -m / np.where(flat, 1, d)).astype(
                    np.float32)
        codes = codes.reshape(n, -1)
        rows = self._rows_order(name)
        if rows is not None:
            codes, d = codes[rows], d[rows]
            zero = None if zero is None else zero[rows]
        return Q4Weight(kind, np.ascontiguousarray(codes), np.ascontiguousarray(d),
                        None if zero is None else np.ascontiguousarray(zero))


def read(path: str | Path) -> GgufModel:
    """Open and check a GGUF file of a LLaMA-architecture model."""
    return GgufModel(path)
