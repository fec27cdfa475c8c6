"""Which hidden channels to remove, and how the consumer makes up for them.

For one hidden group (channels.py), the consumer computes y = W x + b from the C channels x.
With H = sum x x^T over the calibration rows (x extended by a constant 1, so that b is one more
column of W), removing channel j and re-fitting the rest optimally raises the output error
sum ||y' - y||^2 by  ||W[:, j]||^2 / [H^-1]_jj  (Optimal Brain Surgeon, one column at a time),
and the optimal update of the remaining columns, bias included, is
W <- W - W[:, j] [H^-1]_j,: / [H^-1]_jj; H^-1 is then updated as if j had never been there.
`removal_order` removes the cheapest channel repeatedly: the order, the error after each
removal, and the updated weights.

`allocate` then spends a MACs budget over all groups: channels are removed WIDTH at a time
(the packing width of the int8 kernels, so the smaller layers stay whole blocks), the step
with the least error per MAC saved first, each group's error relative to its consumer's output
(comparable across layers), at most MAX_FRACTION of a group.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

WIDTH = 16            # channels removed together (a multiple of every packing width)
MAX_FRACTION = 0.75   # of a group's channels, at most
DAMPING = 0.01        # of H's mean diagonal


@dataclass
class Removal:
    """One group's channels in the order OBS removes them."""

    order: np.ndarray        # channel indices, cheapest first
    error: np.ndarray        # [len(order) + 1]: relative output error after n removals
    weights: list            # weights[n]: W (rows [R, C + 1]) after n removals, for n % WIDTH == 0


def removal_order(rows: np.ndarray, h: np.ndarray, limit: int) -> Removal:
    """OBS removal of up to `limit` of the first C columns of `rows` [R, C + 1] (the last is
    the bias, never removed), with H [C + 1, C + 1] over the same extended inputs."""
    w = np.asarray(rows, np.float64).copy()
    c = w.shape[1] - 1
    h = np.asarray(h, np.float64)
    signal = float(np.einsum("rk,kl,rl->", w, h, w))
    damped = h.copy()
    index = np.arange(c)
    diagonal = damped[index, index]
    diagonal[diagonal <= 0] = 1.0
    damped[index, index] = diagonal + DAMPING * diagonal.mean()
    hinv = np.linalg.inv(damped)
    alive = np.ones(c, bool)
    order, errors, weights = [], [0.0], [w.copy()]
    total = 0.0
    for n in range(1, limit + 1):
        d = np.diagonal(hinv)[:c]
        cost = np.where(alive, np.sum(w[:, :c] ** 2, axis=0) / np.maximum(d, 1e-300), np.inf)
        j = int(np.argmin(cost))
        total += float(cost[j])
        w -= np.outer(w[:, j], hinv[j]) / hinv[j, j]
        w[:, j] = 0.0
        hinv -= np.outer(hinv[:, j], hinv[j]) / hinv[j, j]
        alive[j] = False
        order.append(j)
        errors.append(total / max(signal, 1e-300))
        if n % WIDTH == 0:
            weights.append(w.copy())
    return Removal(np.asarray(order, np.int64), np.asarray(errors), weights)


def limit_for(channels: int) -> int:
    """How many of a group's channels may go: whole WIDTH steps, at most MAX_FRACTION."""
    return int(channels * MAX_FRACTION) // WIDTH * WIDTH


def allocate(removals: dict, macs_per_channel: dict, macs_to_save: float) -> dict[str, int]:
    """{group: channels to remove} saving at least `macs_to_save` MACs (or all it can), the
    cheapest WIDTH-channel steps (relative error per MAC) first."""
    chosen = {name: 0 for name in removals}
    heap = []

    def push(name):
        n, r = chosen[name], removals[name]
        if n + WIDTH <= len(r.order):
            step = (r.error[n + WIDTH] - r.error[n]) / (WIDTH * macs_per_channel[name])
            heapq.heappush(heap, (step, name))

    for name in removals:
        push(name)
    saved = 0.0
    while heap and saved < macs_to_save:
        _, name = heapq.heappop(heap)
        chosen[name] += WIDTH
        saved += WIDTH * macs_per_channel[name]
        push(name)
    return chosen


__all__ = ["MAX_FRACTION", "Removal", "WIDTH", "allocate", "limit_for", "removal_order"]
