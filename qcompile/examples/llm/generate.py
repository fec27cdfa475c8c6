"""Greedy decoding of an ONNX decoder with a KV cache (onnx_decoder's layout) in onnxruntime,
numpy and onnxruntime only: prefill the prompt, then one token at a time, each step's
present.* fed back as the next step's past_key_values.*."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PAST_PREFIX = "past_key_values."


@dataclass
class Cache:
    """The keys and values of the tokens seen so far: {past input name: array}."""

    tensors: dict[str, np.ndarray]
    length: int = 0


@dataclass
class Generation:
    tokens: list[int]                                   # the new tokens, EOS excluded
    prompt_logits: np.ndarray                           # [vocab]: the prefill's last position
    step_logits: list[np.ndarray] = field(default_factory=list)  # [vocab] per decode step


class OnnxDecoder:
    """An onnxruntime session of a decoder model, run step by step."""

    def __init__(self, model: str | Path | bytes, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.past = [i for i in self.session.get_inputs() if i.name.startswith(PAST_PREFIX)]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def empty_cache(self, batch: int = 1) -> Cache:
        return Cache({i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
                      for i in self.past})

    def forward(self, ids: np.ndarray, cache: Cache,
                attention_mask: np.ndarray | None = None) -> tuple[np.ndarray, Cache]:
        """Logits [B, S, vocab] of the tokens `ids` [B, S] after those in `cache`, and the
        cache with them added. attention_mask [B, past + S]: ones when not given."""
        ids = np.asarray(ids, np.int64)
        batch, seq = ids.shape
        total = cache.length + seq
        mask = np.ones((batch, total), np.int64) if attention_mask is None else \
            np.asarray(attention_mask, np.int64)
        positions = np.broadcast_to(np.arange(cache.length, total, dtype=np.int64),
                                    (batch, seq))
        feeds = {"input_ids": ids, "attention_mask": mask,
                 "position_ids": np.ascontiguousarray(positions), **cache.tensors}
        results = dict(zip(self.outputs, self.session.run(self.outputs, feeds)))
        present = {PAST_PREFIX + name[len("present."):]: value
                   for name, value in results.items() if name.startswith("present.")}
        return results["logits"], Cache(present, total)

    def greedy(self, prompt: list[int], max_new_tokens: int,
               eos_token_id: int | None = None, keep_logits: bool = False) -> Generation:
        """The most probable token at each step, up to `max_new_tokens` or EOS."""
        logits, cache = self.forward(np.array([prompt]), self.empty_cache())
        last = logits[0, -1]
        result = Generation([], last.copy())
        for _ in range(max_new_tokens):
            token = int(np.argmax(last))
            if token == eos_token_id:
                break
            result.tokens.append(token)
            if len(result.tokens) == max_new_tokens:
                break
            logits, cache = self.forward(np.array([[token]]), cache)
            last = logits[0, -1]
            if keep_logits:
                result.step_logits.append(last.copy())
        return result
