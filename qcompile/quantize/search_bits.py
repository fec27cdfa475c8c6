"""--quantize auto --weight-bits 4: after the int8 mix is chosen, as many of its int8 layers with
4-bit weights as the accuracy budget still allows, the fewest bytes first.

1. Candidates: the layers the int8 search left in plain int8 whose weights have a 4-bit kernel
   (MatMul/Gemm and pointwise convolutions: schemes/int4.py).
2. Cost, on the calibration data: the model's output SQNR with only that layer's weights in 4
   bits (the others as chosen), in dB lost per byte that 4 bits save (a weight of 8 bits
   becomes 4.5 with fp16 scales per group of 32). Cheapest first: large layers that barely
   notice 4 bits (a classifier) before small ones that do.
3. Choice, on the validation data: the longest prefix of that ranking that still meets the
   budget (doubling, then bisecting, as the int8 search does).

A model whose int8 mix misses the budget gets no 4-bit layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from .metrics import Metric
from .rules import LayerSettings

log = logging.getLogger(__name__)

Plan = Mapping[str, LayerSettings]


@dataclass(frozen=True)
class FourBitChoice:
    plan: dict[str, LayerSettings]
    layers: list[str]          # the layers given 4-bit weights, cheapest first
    estimate: float            # the metric of `plan` (simulated)
    costs: dict[str, float]    # {candidate: dB of output SQNR lost per kB saved}


def saved_bytes(weights: int, group: int) -> float:
    """Bytes saved by storing `weights` in 4 bits with an fp16 scale per group instead of 8."""
    return weights * (8.0 - (4.0 + 16.0 / group)) / 8.0


def choose_four_bits(plan: Plan, candidates: Sequence[tuple[str, int]], four: LayerSettings,
                     metric: Metric, budget: float, start_value: float,
                     score: Callable[[Plan], float], sqnr: Callable[[Plan], float]
                     ) -> FourBitChoice:
    """`plan` with 4-bit weights (`four`) on the longest cheapest-first prefix of
    `candidates` ((layer, weight count) of int8 layers with a 4-bit kernel) that meets
    `budget`; `start_value`: the metric of `plan`; `score`: a plan's metric on the validation
    data; `sqnr`: its output SQNR on the calibration data."""
    plan = dict(plan)
    if not candidates or not metric.meets(start_value, budget):
        return FourBitChoice(plan, [], start_value, {})
    base_db = sqnr(plan)
    costs = {}
    for name, weights in candidates:
        lost = base_db - sqnr({**plan, name: four})
        costs[name] = max(lost, 0.0) / (saved_bytes(weights, four.group_size) / 1e3)
    ranking = sorted(costs, key=lambda n: costs[n])
    results: dict[int, float] = {0: start_value}

    def with_prefix(k: int) -> dict[str, LayerSettings]:
        return {**plan, **{name: four for name in ranking[:k]}}

    def meets(k: int) -> bool:
        if k not in results:
            results[k] = score(with_prefix(k))
            log.info("4-bit search: %d cheapest layer(s) in 4 bits: %s %.4f", k, metric.name,
                     results[k])
        return metric.meets(results[k], budget)

    low, high, k = 0, len(ranking) + 1, 1  # low meets; high fails (len + 1: never tried)
    while k <= len(ranking):  # doubling
        if not meets(k):
            high = k
            break
        low = k
        k = min(k * 2, len(ranking)) if k < len(ranking) else k + 1
    while high - low > 1 and high <= len(ranking):
        middle = (low + high) // 2
        if meets(middle):
            low = middle
        else:
            high = middle
    chosen = ranking[:low]
    log.info("4-bit search: %d of %d candidate layer(s) in 4 bits (%s %.4f, budget %s); %.2f MB "
             "of weights saved", len(chosen), len(ranking), metric.name, results[low],
             metric.describe(budget),
             sum(saved_bytes(w, four.group_size) for n, w in candidates if n in chosen) / 1e6)
    return FourBitChoice(with_prefix(low), chosen, results[low],
                         {n: float(np.round(c, 4)) for n, c in costs.items()})


__all__ = ["FourBitChoice", "choose_four_bits", "saved_bytes"]
