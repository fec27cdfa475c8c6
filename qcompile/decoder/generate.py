"""Run a compiled decoder: caches allocated once on the device, one call per token, greedy or
sampled choice of the next token, tokens given to a callback as they come."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import InputError
from .compile import PREFILL, PREFILL_TAIL, DecoderInfo


@dataclass
class Generation:
    """The tokens generated and how fast: prompt tokens/s (prefill) and new tokens/s."""

    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first new token comes from the prefill's logits
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_s if self.decode_s else 0.0


class Decoder:
    """A compiled decoder (compile_decoder's OUT_DIR) loaded here or on a device: `loaded` is
    qcompile.load(OUT_DIR, ...)."""

    def __init__(self, loaded, info: DecoderInfo):
        import tvm

        self.info = info
        self._vm, self._device = loaded.new_vm()
        self._loaded = loaded
        self._caches = [tvm.runtime.empty(tuple(info.cache_shape), info.cache_dtype,
                                          self._device) for _ in info.caches]
        self._fed: list[int] = []  # the cached tokens' ids (a tail call may feed some again)

    def close(self) -> None:
        """Free the caches (the loaded model stays open)."""
        self._caches = []
        self._vm = None

    def reset(self) -> None:
        """Forget the cached tokens (the caches are overwritten from position 0)."""
        self._fed = []

    @property
    def past(self) -> int:
        """How many tokens the caches hold."""
        return len(self._fed)

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        """Feed tokens after the cached ones (all at once); the logits for the position after
        the last."""
        import tvm

        tokens = [int(t) for t in tokens]
        if not tokens:
            raise InputError("No tokens to feed: give at least one.")
        if self.past + len(tokens) > self.info.max_context:
            raise InputError(f"The conversation reached the {self.info.max_context} tokens "
                             "the model was compiled for. Compile it with a larger "
                             "--max-context, or start again with a shorter prompt.")
        logits = None
        while tokens:
            function, take, again = self._plan(len(tokens))
            start = self.past - again
            ids = tvm.runtime.tensor(np.array([self._fed[start:] + tokens[:take]], np.int64),
                                     self._device)
            past = tvm.runtime.tensor(np.array([start], np.int64), self._device)
            # a direct call: the caches go as they are (through RPC too, where set_input
            # would copy them and the writes would be lost)
            logits = self._vm[function](ids, *self._caches, past)
            self._fed += tokens[:take]
            tokens = tokens[take:]
        return logits.numpy()[0, -1]

    def _plan(self, count: int) -> tuple[str, int, int]:
        """(function, new tokens it takes, cached tokens it feeds again) for the next call of
        `count` tokens to feed: whole chunks through "prefill" and then "prefill_tail"
        (kernels compiled for that many rows: a few times faster per token than "main"'s);
        fewer than a tail but at least half of one through the tail function too, its first
        tokens the last cached ones fed again (their keys and values come out the same and
        overwrite themselves); the rest through "main" (any count; one token is the answer's
        step)."""
        chunk, tail = self.info.prefill_chunk, self.info.tail_chunk
        if chunk and count >= chunk:
            return PREFILL, chunk, 0
        if tail and count >= tail:
            return PREFILL_TAIL, tail, 0
        if tail and count > 1 and 2 * count >= tail and self.past + count >= tail:
            return PREFILL_TAIL, count, tail - count
        return "main", count, 0

    def generate(self, prompt: Sequence[int], max_new_tokens: int = 64,
                 stop: Sequence[int] = (), temperature: float = 0.0, seed: int = 0,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        """Tokens after `prompt` (token ids), until one in `stop` or `max_new_tokens`.
        temperature 0: the most likely token; above 0: sampled from softmax(logits / T)."""
        if not prompt:
            raise InputError("The prompt is empty: give at least one token.")
        if len(prompt) + max_new_tokens > self.info.max_context - self.past:
            max_new_tokens = max(self.info.max_context - self.past - len(prompt), 0)
            if max_new_tokens == 0:
                raise InputError(f"The prompt ({len(prompt)} tokens) does not fit the "
                                 f"{self.info.max_context} tokens the model was compiled for. "
                                 "Compile it with a larger --max-context.")
        rng = np.random.default_rng(seed)
        result = Generation(prompt_tokens=len(prompt))
        start = time.perf_counter()
        logits = self.step([int(t) for t in prompt])
        result.prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        while len(result.tokens) < max_new_tokens:
            token = choose(logits, temperature, rng)
            result.tokens.append(token)
            if on_token is not None:
                on_token(token)
            if token in stop or len(result.tokens) == max_new_tokens:
                break
            logits = self.step([token])
        result.decode_s = time.perf_counter() - start
        return result


def choose(logits: np.ndarray, temperature: float, rng) -> int:
    """The next token: argmax at temperature 0, else a sample of softmax(logits / T)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))
