"""llama.cpp as one of bench/llm.py's engines: the same GGUF file (SmolLM2-135M-Instruct,
Q4_1 linear weights, Q8_0 embedding) run by llama-cpp-python, which pip builds from source
(`pip install llama-cpp-python`: about 15 minutes on 2 cores; it is not a dependency of
qcompile). The token ids are the bench's own (the tokenizer.json the converter wrote from the
same file), fed with `Llama.eval`, so that every engine sees the same prompts; the logits of
the last position are read after each call.
"""

from __future__ import annotations

import time

import numpy as np


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCpp:
    """A llama.cpp context on `gguf`: `threads` threads, `context` positions."""

    def __init__(self, gguf, threads: int, context: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=context, n_threads=threads,
                         n_threads_batch=threads, n_batch=context, logits_all=False,
                         verbose=False)

    def feed(self, tokens: list[int], reset: bool = False) -> np.ndarray:
        """The logits after the last of `tokens`, fed after the cached ones (or from an empty
        cache, `reset`)."""
        if reset:
            self.llm.reset()
        self.llm.eval(tokens)
        # without logits_all, eval keeps no scores: the context's one row of logits (the
        # last position's) is read directly
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(),
                                     shape=(self.llm.n_vocab(),)).astype(np.float32)


def generate(engine: LlamaCpp, ids: list[int], max_new: int, stop) -> dict:
    """Greedy tokens after the prompt `ids`, timed like the other engines."""
    start = time.perf_counter()
    logits = engine.feed(ids, reset=True)
    prefill = time.perf_counter() - start
    tokens = [int(np.argmax(logits))]
    start = time.perf_counter()
    while len(tokens) < max_new and tokens[-1] not in stop:
        tokens.append(int(np.argmax(engine.feed([tokens[-1]]))))
    return {"prompt_tokens": len(ids), "tokens": tokens, "prefill_s": prefill,
            "decode_s": time.perf_counter() - start}


def forced(engine: LlamaCpp, ids: list[int], answer: list[int]) -> list[int]:
    """The most likely next token at each position of the prompt's answer `answer`, fed."""
    tops = [int(np.argmax(engine.feed(ids, reset=True)))]
    return tops + [int(np.argmax(engine.feed([t]))) for t in answer[:-1]]


def score_logits(engine: LlamaCpp, ids: list[int]) -> np.ndarray:
    """The logits [len(ids), vocab] of held-out text, fed one token per call."""
    first = engine.feed(ids[:1], reset=True)
    return np.stack([first] + [engine.feed([t]) for t in ids[1:]])
