"""Decoders compiled with their KV cache in place (`qcompile compile --max-context`): the
logits of a prompt fed at once and then token by token equal onnxruntime's on the ONNX model
with its own concat cache, in float and on 4-bit weights (MatMulNBits); greedy generation
gives onnxruntime's tokens; a cache that would overflow, a model that is not a decoder and
options that do not apply are refused in one paragraph. The models are small random LLaMA
decoders (tiny_llama.py) converted by qcompile.examples.llm; SmolLM2 is in test_llm_convert.py
and bench/llm.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

import qcompile
from qcompile.cli import main
from qcompile.decoder.compile import DecoderInfo, compile_decoder
from qcompile.decoder.generate import Decoder
from qcompile.errors import InputError, ModelError
from qcompile.examples.llm import gguf_file
from qcompile.examples.llm.converter import save
from qcompile.examples.llm.generate import OnnxDecoder
from qcompile.examples.llm.onnx_decoder import build_decoder
from tiny_llama import TINY, write_gguf

MAX_CONTEXT = 24
CHUNK = 16  # the prompt's function; its tail function takes 4: PROMPT is one tail, then
            # three tokens through the tail again after the last cached token
PROMPT = [3, 17, 42, 5, 9, 60, 1]


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    model = gguf_file.read(write_gguf(folder / "tiny.gguf"))
    return {"float": save(build_decoder(model, False), folder / "float.onnx"),
            "4-bit": save(build_decoder(model, True), folder / "four_bit.onnx")}


@pytest.fixture(scope="module")
def compiled(onnx_models, tmp_path_factory):
    """The float and 4-bit models as they come, and the 4-bit one on int8 inputs quantized
    at run time (W4A8, --quantize int8-dynamic)."""
    out = {}
    for form, path, quantize in [(*item, None) for item in onnx_models.items()] + \
            [("W4A8", onnx_models["4-bit"], "int8-dynamic")]:
        directory = tmp_path_factory.mktemp(f"decoder_{form}")
        artifact, info = compile_decoder(path, "host", directory, max_context=MAX_CONTEXT,
                                         prefill_chunk=CHUNK, quantize=quantize)
        out[form] = (directory, info)
    return out


def reference_logits(path, tokens: list[int]) -> np.ndarray:
    """onnxruntime's logits [tokens, vocab] for the tokens fed at once from an empty cache."""
    session = OnnxDecoder(path)
    logits, _ = session.forward(np.array([tokens]), session.empty_cache())
    return logits[0]


@pytest.mark.parametrize("form", ["float", "4-bit"])
def test_prompt_then_tokens_give_onnxruntimes_logits(form, onnx_models, compiled):
    directory, info = compiled[form]
    assert info.max_context == MAX_CONTEXT and len(info.caches) == 2 * TINY["layers"]
    assert info.prefill_chunk == CHUNK and info.tail_chunk == CHUNK // 4
    assert info.cache_shape == [1, TINY["kv_heads"], MAX_CONTEXT,
                                TINY["hidden"] // TINY["heads"]]
    follow = [11, 23, 7, 50]
    expected = reference_logits(onnx_models[form], PROMPT + follow)
    with qcompile.load(directory) as loaded:
        decoder = Decoder(loaded, info)
        got = [decoder.step(PROMPT)]  # a chunk, then the rest at once: the last logits
        for token in follow:  # then one at a time, each on the cache the others left
            got.append(decoder.step([token]))
        assert decoder.past == len(PROMPT) + len(follow)
    got = np.stack(got)
    want = expected[len(PROMPT) - 1:]
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale, np.abs(got - want).max() / scale


def test_prompts_of_any_length_give_onnxruntimes_logits(onnx_models, compiled):
    """A prompt goes through the chunk's function, the tail's, the tail's again from earlier
    cached tokens, and "main", as its length makes it (1-3: main; 5: a tail and main; 7: a
    tail and a tail from one token back; 16: a chunk; 19: a chunk and a tail from one token
    back; 21: a chunk, a tail and main); the last position's logits are onnxruntime's."""
    directory, info = compiled["4-bit"]
    prompt = (PROMPT * 3)[:21]
    want = reference_logits(onnx_models["4-bit"], prompt)
    with qcompile.load(directory) as loaded:
        decoder = Decoder(loaded, info)
        for n in (1, 2, 3, 5, 7, 16, 19, 21):
            decoder.reset()
            got = decoder.step(prompt[:n])
            assert decoder.past == n
            err = np.abs(got - want[n - 1]).max()
            assert err <= 1e-4 * np.abs(want[n - 1]).max(), (n, err)


def test_the_chunks_function_projects_its_last_position_only(onnx_models):
    """The prompt's function computes the output projection for the chunk's last position
    only, the logits generation reads (the test above checks their values)."""
    from qcompile.decoder.compile import import_decoder, last_position_only

    for path in onnx_models.values():
        graph, _ = import_decoder(path, CHUNK)
        sliced = last_position_only(graph, CHUNK)
        assert sliced is not graph
        assert next(s.shape for s in sliced.outputs if s.name == "logits") == \
            (1, 1, TINY["vocab"])
        returned = sliced.mod["main"].ret_ty.fields
        shapes = [[getattr(d, "value", None) for d in field.shape]  # caches: symbolic
                  for field in returned]
        assert [1, 1, TINY["vocab"]] in shapes and [1, CHUNK, TINY["vocab"]] not in shapes


def test_w4a8_quantizes_each_token_on_its_own(onnx_models, compiled):
    """With int8 inputs quantized at run time per token and group, a token's logits do not
    depend on which tokens share its call: the prompt fed at once (a chunk, then three tokens
    in one call) and token by token give the same logits (one range for the call's tokens
    moved them by 2% here), near onnxruntime's float arithmetic on the same 4-bit weights.
    Only to float rounding: the two paths' float kernels sum in different orders, and a
    difference in the last bit can move an input across a rounding boundary."""
    directory, info = compiled["W4A8"]
    report = json.loads((directory / "quantization.json").read_text())
    precisions = {row["precision"] for row in report["layers"]}
    assert {"int4-g32-dynamic", "int8-g32-dynamic"} <= precisions, precisions  # + the Gemm head
    with qcompile.load(directory) as loaded:
        decoder = Decoder(loaded, info)
        at_once = decoder.step(PROMPT)
        decoder.reset()
        one_by_one = [decoder.step([token]) for token in PROMPT]
    want = reference_logits(onnx_models["4-bit"], PROMPT)
    scale = np.abs(want).max()
    assert np.abs(at_once - one_by_one[-1]).max() <= 1e-3 * scale
    error = np.abs(np.stack(one_by_one) - want)  # the arithmetic is exact in test_nbits.py
    assert error.max() <= 0.1 * scale and error.mean() <= 0.01 * scale, error.mean() / scale


def greedy_reference(path, count: int, prompt: list[int] = PROMPT) -> list[int]:
    """onnxruntime's greedy tokens after `prompt`, its concat cache fed back."""
    session = OnnxDecoder(path)
    logits, cache = session.forward(np.array([prompt]), session.empty_cache())
    tokens = []
    for _ in range(count):
        tokens.append(int(np.argmax(logits[0, -1])))
        logits, cache = session.forward(np.array([[tokens[-1]]]), cache)
    return tokens


def test_generation_through_the_tracker_gives_onnxruntimes_tokens(onnx_models, compiled,
                                                                  host_device, tmp_path,
                                                                  capsys):
    """On a device reached through the RPC tracker (here this machine's own RPC server) the
    caches stay on the device between calls: the greedy tokens are onnxruntime's, from
    Python and from `qcompile generate --rpc-tracker`."""
    import shutil

    directory, info = compiled["4-bit"]
    expected = greedy_reference(onnx_models["4-bit"], 8)
    device = ["--rpc-tracker", host_device["tracker"], "--rpc-key", host_device["key"]]
    with qcompile.load(directory, rpc_tracker=device[1], rpc_key=device[3]) as loaded:
        assert loaded.remote
        assert Decoder(loaded, info).generate(PROMPT, max_new_tokens=8).tokens == expected
    out = tmp_path / "out"
    shutil.copytree(directory, out)
    word_tokenizer(out / "tokenizer.json", TINY["vocab"])
    prompt = " ".join(f"w{t}" for t in PROMPT)
    assert main(["generate", str(out), "--prompt", prompt, "--max-new-tokens", "8",
                 *device]) == 0
    assert capsys.readouterr().out.split() == [f"w{t}" for t in expected]


def test_greedy_generation_gives_onnxruntimes_tokens(onnx_models, compiled):
    directory, info = compiled["4-bit"]
    expected = greedy_reference(onnx_models["4-bit"], 8)
    seen = []
    with qcompile.load(directory) as loaded:
        result = Decoder(loaded, info).generate(PROMPT, max_new_tokens=8, on_token=seen.append)
    assert result.tokens == expected == seen
    assert result.prompt_tokens == len(PROMPT) and result.decode_tokens_per_s > 0


def test_reset_starts_again_from_the_first_position(compiled):
    directory, info = compiled["float"]
    with qcompile.load(directory) as loaded:
        decoder = Decoder(loaded, info)
        first = decoder.step(PROMPT)
        decoder.step([4, 4, 4])
        decoder.reset()
        again = decoder.step(PROMPT)
    np.testing.assert_array_equal(first, again)


def test_sampling_follows_the_seed(compiled):
    directory, info = compiled["float"]
    with qcompile.load(directory) as loaded:
        decoder = Decoder(loaded, info)
        runs = []
        for seed in (1, 1, 2):
            decoder.reset()
            runs.append(decoder.generate(PROMPT, max_new_tokens=6, temperature=5.0,
                                         seed=seed).tokens)
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_a_full_cache_is_refused(compiled):
    directory, info = compiled["float"]
    with qcompile.load(directory) as loaded:
        decoder = Decoder(loaded, info)
        with pytest.raises(InputError, match="--max-context"):
            decoder.step(list(range(MAX_CONTEXT + 1)))
        result = decoder.generate(PROMPT, max_new_tokens=100)  # cut to what the cache holds
        assert len(PROMPT) + len(result.tokens) <= MAX_CONTEXT


def test_a_model_without_a_cache_is_refused(tmp_path, capsys):
    import onnx
    from models import gemm_matmul

    path = tmp_path / "mlp.onnx"
    onnx.save(gemm_matmul(), path)
    with pytest.raises(ModelError, match="past_key_values"):
        compile_decoder(path, "host", tmp_path / "out", max_context=16)
    assert main(["compile", str(path), "--max-context", "16", "-o",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not a decoder" in err and "Traceback" not in err


def edited(path, tmp_path, edit):
    """A copy of the ONNX model at `path` changed by edit(model)."""
    import onnx

    model = onnx.load(str(path))
    edit(model)
    out = tmp_path / "edited.onnx"
    onnx.save(model, out)
    return out


def fixed_past(model) -> None:
    for inp in model.graph.input:
        if inp.name.startswith("past_key_values."):
            inp.type.tensor_type.shape.dim[2].dim_value = 8


def past_scaled_before_the_concat(model) -> None:
    """The first cache's past is doubled before it is appended to: not a plain append."""
    from onnx import helper, numpy_helper

    past = next(i.name for i in model.graph.input if i.name.startswith("past_key_values."))
    concat = next(n for n in model.graph.node if n.op_type == "Concat" and past in n.input)
    model.graph.initializer.append(numpy_helper.from_array(np.float32(2.0), "two"))
    model.graph.node.insert(0, helper.make_node("Mul", [past, "two"], ["doubled_past"]))
    concat.input[list(concat.input).index(past)] = "doubled_past"


@pytest.mark.parametrize("edit, message", [(fixed_past, "fixed length"),
                                           (past_scaled_before_the_concat,
                                            "other than by appending")])
def test_a_cache_that_cannot_stay_in_place_is_refused(edit, message, onnx_models, tmp_path,
                                                      capsys):
    path = edited(onnx_models["float"], tmp_path, edit)
    assert main(["compile", str(path), "--max-context", "16", "-o",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


@pytest.mark.parametrize("option, message", [(["--prefill-chunk", "-1"], "--prefill-chunk -1"),
                                             (["--max-context", "1"], "--max-context 1"),
                                             (["--quantize", "int8"], "int8-dynamic (int8 inputs"),
                                             (["--calibration", "text.txt"],
                                              "--quantize is not: add --quantize int8 ")])
def test_bad_lengths_are_refused(option, message, onnx_models, tmp_path, capsys):
    args = ["compile", str(onnx_models["float"]), "--max-context", "16", *option]
    assert main([*args, "-o", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--input-shape", "input_ids:1,4"],
                                    ["--tuning-log", "log"]])
def test_options_that_do_not_apply_are_refused(option, onnx_models, tmp_path, capsys):
    code = main(["compile", str(onnx_models["float"]), "--max-context", "16", *option,
                 "-o", str(tmp_path / "out")])
    assert code == 2
    assert option[0] in capsys.readouterr().err


def test_generate_without_a_decoder_is_refused(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
    assert "no compiled decoder" in capsys.readouterr().err
    with pytest.raises(ModelError):
        DecoderInfo.open(tmp_path)
    (tmp_path / "decoder.json").write_text('{"max_context": 16}')
    assert main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
    assert "Compile the model again" in capsys.readouterr().err


@pytest.mark.slow
def test_the_llm_example_answers(tmp_path, capsys):
    """`qcompile example llm`: SmolLM2-135M converted, compiled with its own 4-bit codes and
    asked the question whose answer llama.cpp gives (test_llm_convert.py)."""
    assert main(["example", "llm", "-o", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "The capital of France is Paris." in captured.out and "tokens/s" in captured.err
    assert (tmp_path / "host" / "decoder.json").is_file()


def word_tokenizer(path, words: int) -> None:
    """A tokenizer.json of `words` words w0, w1, ... (token i is wi)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer.save(str(path))


def test_generate_streams_the_greedy_answer(compiled, tmp_path, capsys):
    """`qcompile generate`: the prompt tokenized with the tokenizer beside the library, the
    greedy answer's text on stdout (the Decoder's tokens), the speeds on stderr."""
    import shutil

    directory, info = compiled["float"]
    out = tmp_path / "out"
    shutil.copytree(directory, out)
    word_tokenizer(out / "tokenizer.json", TINY["vocab"])
    assert main(["generate", str(out), "--prompt", "w3 w17 w42", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    with qcompile.load(out) as loaded:
        tokens = Decoder(loaded, info).generate([3, 17, 42], max_new_tokens=5).tokens
    assert captured.out.split() == [f"w{t}" for t in tokens]
    assert "prompt: 3 tokens" in captured.err and "answer: 5 tokens" in captured.err


def test_another_models_tokenizer_is_refused(tmp_path, capsys):
    """A tokenizer.json with more tokens than the model's logits: refused before loading."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)}, unk_token="w0")).save(
        str(tmp_path / "tokenizer.json"))
    DecoderInfo(max_context=16, prefill_chunk=0, caches=[], cache_shape=[1, 1, 16, 8],
                cache_dtype="float32", vocabulary=64).save(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "w1 w2"]) == 2
    err = capsys.readouterr().err
    assert "100 tokens" in err and "64" in err and "Traceback" not in err


PHONE_PROMPTS = [PROMPT, [8, 30, 2], [61, 12, 40, 33, 19, 12]]
ANSWER = 32  # tokens generated after each


def answers(directory, info, **device) -> list[list[int]]:
    """The greedy ANSWER tokens after each of PHONE_PROMPTS, on one set of caches."""
    with qcompile.load(directory, **device) as loaded:
        decoder = Decoder(loaded, info)
        out = []
        for prompt in PHONE_PROMPTS:
            decoder.reset()
            out.append(decoder.generate(prompt, max_new_tokens=ANSWER).tokens)
    return out


def long_decoder(path, target, folder, quantize=None):
    """`path` compiled for `target` with room for a prompt and ANSWER tokens."""
    return compile_decoder(path, target, folder, max_context=ANSWER + 8, prefill_chunk=CHUNK,
                           quantize=quantize)[1]


@pytest.fixture(scope="module")
def long_answers(onnx_models, tmp_path_factory):
    """The host's greedy answers of the 4-bit model: as it comes (W4A16), and W4A8."""
    out = {}
    for form, quantize in [("W4A16", None), ("W4A8", "int8-dynamic")]:
        directory = tmp_path_factory.mktemp(f"long_{form}")
        out[form] = answers(directory, long_decoder(onnx_models["4-bit"], "host", directory,
                                                    quantize))
    return out


def test_long_answers_are_onnxruntimes(onnx_models, long_answers):
    """32 greedy tokens after each of three prompts: W4A16 gives onnxruntime's tokens on the
    same 4-bit weights."""
    for prompt, got in zip(PHONE_PROMPTS, long_answers["W4A16"]):
        assert got == greedy_reference(onnx_models["4-bit"], ANSWER, prompt), prompt


@pytest.mark.slow
@pytest.mark.parametrize("target, form", [("arm64-dotprod", "W4A8"), ("arm64-i8mm", "W4A8"),
                                          ("arm64-dotprod", "W4A16")])
def test_the_phone_generates_the_hosts_tokens(target, form, onnx_models, long_answers,
                                              arm64_device, tmp_path):
    """On the emulated ARM phone, the first 32 greedy tokens after each of three prompts
    equal the host's: with W4A16 those are onnxruntime's; with W4A8 the library multiplies on
    the int8 dot-product instruction (the same integer sums as the host's; the float parts
    summed in another order): sdot on both targets, as the group kernels multiply one row at
    a time."""
    from test_int8_kernels import instruction_counts

    quantize = "int8-dynamic" if form == "W4A8" else None
    info = long_decoder(onnx_models["4-bit"], target, tmp_path, quantize)
    if form == "W4A8":
        counts = instruction_counts(tmp_path / "model.so", "aarch64-linux-gnu-objdump")
        assert counts["sdot"] > 0, counts
    assert answers(tmp_path, info, rpc_tracker=arm64_device["tracker"],
                   rpc_key=arm64_device["key"]) == long_answers[form]


def test_calibration_text_rounds_the_weights_by_gptq(onnx_models, tmp_path, capsys):
    """`--quantize int8-weights --weight-bits 4 --calibration TEXT` on the float decoder: the
    text tokenized with the model's tokenizer.json, its moments collected once, the 4-bit
    weights of both functions rounded by GPTQ; on held-out tokens the logits are closer to
    onnxruntime's float ones than round to nearest's. A missing file, too little text, a
    model without its tokenizer, and calibration without a mode that quantizes weights are
    refused in one paragraph."""
    import shutil

    model = tmp_path / "float.onnx"
    shutil.copyfile(onnx_models["float"], model)
    word_tokenizer(tmp_path / "tokenizer.json", TINY["vocab"])
    rng = np.random.default_rng(3)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{t}" for t in rng.integers(0, TINY["vocab"], 9000)))
    held_out = [int(t) for t in rng.integers(0, TINY["vocab"], MAX_CONTEXT)]
    want = reference_logits(model, held_out)
    errors = {}
    for rounding, calibration in [("gptq", ["--calibration", str(text)]), ("nearest", [])]:
        out = tmp_path / rounding
        assert main(["compile", str(model), "--max-context", str(MAX_CONTEXT),
                     "--prefill-chunk", str(CHUNK), "--quantize", "int8-weights",
                     "--weight-bits", "4", *calibration, "-o", str(out)]) == 0
        report = json.loads((out / "quantization.json").read_text())
        assert {row["weight_rounding"] for row in report["layers"]
                if row["precision"] != "fp32"} == {rounding}  # attention: two activations
        with qcompile.load(out) as loaded:
            decoder = Decoder(loaded, DecoderInfo.open(out))
            got = np.stack([decoder.step([t]) for t in held_out])
        errors[rounding] = np.square(got - want).mean()
    assert errors["gptq"] < 0.8 * errors["nearest"], errors  # 0.66 when written
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    alone = tmp_path / "alone" / "float.onnx"  # no tokenizer.json beside it
    alone.parent.mkdir()
    shutil.copyfile(model, alone)
    for path, source, message in [(model, tmp_path / "none.txt", "neither a file nor a folder"),
                                  (model, short, "a sample is 128"),
                                  (alone, text, "needs the model's tokenizer")]:
        assert main(["compile", str(path), "--max-context", "16", "--quantize",
                     "int8-dynamic", "--calibration", str(source), "-o",
                     str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    with pytest.raises(InputError, match="--calibration on a decoder rounds the weights"):
        compile_decoder(model, "host", tmp_path / "bad", max_context=16, calibration=text)
