"""Calibration text for a decoder: text files turned into the samples that GPTQ rounds the
weights on.

The text is tokenized with the tokenizer.json beside the model and cut into samples of
SAMPLE_TOKENS tokens, each fed as a prompt from an empty cache (input_ids [1, T], the
attention mask all ones, positions 0 .. T-1, past keys and values of length 0). At most
MAX_SAMPLES samples are taken, spread evenly over the text. GPTQ generalizes to other text
once the samples hold more tokens than the widest layer's input (SmolLM2-135M: 1536, the FFN's
down projection); the defaults give 8192.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from .text import TOKENIZER

SAMPLE_TOKENS = 128
MAX_SAMPLES = 64


def text_files(source: str | Path) -> list[Path]:
    """The text files `source` names: a file, or every file in a folder (sorted)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        files = []
    if not files:
        raise InputError(f"Calibration text '{source}' is neither a file nor a folder of "
                         "files. For a decoder, --calibration takes text (a file, or a folder "
                         "of them): any text in the language the model will see.")
    return files


def text_samples(source: str | Path, model: str | Path, inputs, cache_layout) -> list[dict]:
    """Calibration feeds for the decoder at `model` (its importer's `inputs`, TensorSpecs,
    and kv_cache.CacheLayout) from the text at `source`."""
    from tokenizers import Tokenizer

    tokenizer_file = Path(model).parent / TOKENIZER
    if not tokenizer_file.is_file():
        raise InputError(f"Calibration text needs the model's tokenizer, {tokenizer_file}, "
                         f"which is missing. Put {TOKENIZER} beside the .onnx file, or give "
                         "--calibration as an .npz of the model's inputs.")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    ids: list[int] = []
    for path in text_files(source):
        text = path.read_bytes().decode("utf-8", errors="replace")
        ids.extend(tokenizer.encode(text, add_special_tokens=False).ids)
    count = min(len(ids) // SAMPLE_TOKENS, MAX_SAMPLES)
    if count == 0:
        raise InputError(f"Calibration text '{source}' has {len(ids)} tokens; a sample is "
                         f"{SAMPLE_TOKENS}. Give more text (thousands of tokens: GPTQ needs "
                         "more than the widest layer's input length).")
    starts = np.linspace(0, len(ids) - SAMPLE_TOKENS, count).astype(int)
    specs = {s.name: s for s in inputs}
    feeds = []
    for start in starts:
        tokens = np.array([ids[start:start + SAMPLE_TOKENS]], np.int64)
        feed = {"input_ids": tokens}
        if "attention_mask" in specs:
            feed["attention_mask"] = np.ones_like(tokens, specs["attention_mask"].dtype)
        if "position_ids" in specs:
            feed["position_ids"] = np.arange(SAMPLE_TOKENS, dtype=specs["position_ids"].dtype
                                             )[None]
        empty = np.zeros((1, cache_layout.heads, 0, cache_layout.head_dim), cache_layout.dtype)
        feed.update({name: empty for name in cache_layout.past})
        feeds.append(feed)
    return feeds


__all__ = ["MAX_SAMPLES", "SAMPLE_TOKENS", "text_files", "text_samples"]
