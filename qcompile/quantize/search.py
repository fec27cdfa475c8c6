"""Accuracy-aware automatic precision: as much int8 as an accuracy budget allows.

1. Sensitivity, on the calibration data: for each layer, the model's output SQNR against fp32
   with only that layer in int8 ("alone"), and with every layer but that one in int8
   ("fallback"). Both are simulated in onnxruntime (simulate.py), a second or so each.
2. Choice, on the validation data: the layers ranked by the output noise each brings in int8
   (from its "alone" SQNR: the noise powers of layers add, nearly) per unit of what keeping it
   in higher precision costs: its kernel's extra time where every layer was timed, else its
   MACs; the shortest prefix of that ranking kept in higher precision that meets the budget
   (doubling, then bisecting); then each kept layer is tried back in int8, and stays int8 if
   the budget still holds. (A greedy answer to "the least cost for the most noise removed";
   ranked by SQNR alone, a large layer came before a small one of equal noise. On
   EfficientNet-Lite0, in simulation, the two rankings give nearly the same output SQNR for
   the same fraction of MACs in int8, 30.6 against 30.0 dB at 80%: its noisiest layers are
   small ones; docs/studies/2026-12-07-precision-search-ranking.md.)
3. The pipeline builds the choice, checks the budget with the compiled model on the validation
   data, and keeps the next-ranked layers in higher precision if the simulation was optimistic.

Fallback precisions: fp32, fp16, or int8-a16 (int8 weights, 16-bit inputs taken as two bytes: the
same int8 kernels, twice the MACs), which keeps an outlier-heavy or wide-ranged input exact
enough without leaving int8 weights; its MACs do not count as int8 in `int8_mac_fraction`, and
`int8_weight_mac_fraction` counts them.

Latency: when each layer's kernel was timed on the target in int8 and in the fallback precision
(layer_latency.py), a layer whose int8 kernel is slower than its fallback kernel by more than
LATENCY_MARGIN stays in the fallback precision from the start: int8 would cost accuracy and
time. The search then spends the budget on the others.

The result is written as a rules file (precision-rules.toml), so the same mix compiles again
without searching, and as search.json with the sensitivity table and the search's cost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np

from .metrics import Metric
from .report import finite
from .rules import FALLBACKS, LayerSettings, rules_toml
from .schemes import Int8A16, scheme_for
from .onnx_view import takes_rows
from .search_bits import choose_four_bits
from .simulate import Simulator

log = logging.getLogger(__name__)

# the fallback must be this much faster than int8 to take a layer out of int8: a float layer
# among int8 ones costs a dequantize and a quantize that its own kernel's time does not show,
# its weights are 4x larger, and two timings of the same kernel differ by a few percent. (The
# margin once went the other way, int8 having to be 10% faster: EfficientNet-Lite0's search
# at a 0.99 budget kept 71% of its MACs in int8, 85% with this rule.)
LATENCY_MARGIN = 0.10
# search.json: the layers left out of int8 for its time (older files: "..._is_not_faster")
SLOWER_IN_INT8_KEY = "kept_because_int8_is_slower"
COST_FLOOR = 0.01  # rank(): the least cost of a timed layer, as a fraction of its int8 time
WIDE_OF = Int8A16.WIDE_OF  # the 16-bit input type of an 8-bit one


def fallback_settings(base: LayerSettings, fallback: str) -> LayerSettings:
    """The settings of a layer kept out of plain int8: `base` in fp32 or fp16, or, for
    int8-a16, `base` with 16-bit inputs (of the same signedness)."""
    if fallback == "int8-a16":
        if base.activations not in WIDE_OF:
            raise ValueError(f"int8-a16 fallback of layers whose inputs are already "
                             f"{base.activations}")
        return replace(base, activations=WIDE_OF[base.activations])
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback precision {fallback!r}")
    return replace(base, precision=fallback)


def precision_label(settings: LayerSettings) -> str:
    """int8, int8-a16 (16-bit inputs), fp16 or fp32: as the report and the manifest say."""
    return scheme_for(settings).label


@dataclass
class LayerSensitivity:
    name: str
    op: str
    macs: int
    alone_sqnr_db: float      # outputs' SQNR with only this layer in int8
    fallback_sqnr_db: float   # outputs' SQNR with every searched layer but this one in int8
    int8_us: float | None = None      # its kernel's time in int8 on the target, if measured
    fallback_us: float | None = None  # ... and in the fallback precision

    def to_json(self) -> dict:
        return {"layer": self.name, "op": self.op, "macs": self.macs,
                "alone_sqnr_db": finite(self.alone_sqnr_db),
                "fallback_sqnr_db": finite(self.fallback_sqnr_db),
                **({"int8_us": self.int8_us, "fallback_us": self.fallback_us}
                   if self.int8_us is not None or self.fallback_us is not None else {})}


@dataclass
class SearchResult:
    plan: dict[str, LayerSettings]
    base: LayerSettings
    metric: str
    budget: float
    higher_is_better: bool
    all_int8: float                      # the metric, every searched layer in int8 (simulated)
    estimate: float                      # the metric of the chosen plan (simulated)
    all_int8_sqnr_db: float
    kept: list[str]                      # layers kept in higher precision, in ranking order
    ranking: list[str]                   # every searched layer, the first to keep first (rank)
    sensitivities: list[LayerSensitivity]
    macs: dict[str, int]                 # every layer's MACs, the searched and the fixed
    evaluations: int
    seconds: float
    calibration_samples: int
    validation_samples: int
    fallback: str = "fp32"
    verified: float | None = None        # the metric of the compiled model on validation
    rounds: list[dict] = field(default_factory=list)
    slower_in_int8: list[str] = field(default_factory=list)  # in fallback for latency
    latency_where: str | None = None     # where the layers were timed (None: not timed)
    latency_seconds: float = 0.0         # how long timing them took (before the search)
    four_bit: list[str] = field(default_factory=list)  # int8 layers given 4-bit weights
    four_bit_costs: dict[str, float] = field(default_factory=dict)  # dB lost per kB saved

    @property
    def int8_mac_fraction(self) -> float:
        return int8_fraction(self.plan, self.macs)

    @property
    def int8_weight_mac_fraction(self) -> float:
        """The MACs with int8 weights: int8-a16 layers included."""
        return int8_fraction(self.plan, self.macs, weights_only=True)

    def rules_text(self) -> str:
        return rules_toml(self.plan, self.base, header=(
            f"Chosen by `qcompile compile --quantize auto` for {self.metric} "
            f"{'>=' if self.higher_is_better else '<='} {self.budget:g}: {len(self.kept)} "
            f"layer(s) kept in higher precision for accuracy, {len(self.slower_in_int8)} "
            f"because int8 is slower, {self.int8_mac_fraction:.1%} of the MACs "
            f"in int8{self._weights_note()}{self._four_bit_note()}.\n"
            "Compile with --quantize int8 --precision-rules "
            "THIS_FILE to get the same mix without searching."))

    def to_json(self) -> dict:
        return {
            "metric": self.metric, "budget": self.budget,
            "higher_is_better": self.higher_is_better,
            "all_int8_estimate": self.all_int8, "all_int8_sqnr_db": finite(self.all_int8_sqnr_db),
            "chosen_estimate": self.estimate, "verified": self.verified,
            "kept_in_higher_precision": [
                {"layer": name, "precision": precision_label(self.plan[name])}
                for name in self.kept],
            SLOWER_IN_INT8_KEY: [
                {"layer": name, "precision": precision_label(self.plan[name])}
                for name in self.slower_in_int8],
            "latency_measured_on": self.latency_where,
            "latency_seconds": round(self.latency_seconds, 1),
            "int8_mac_fraction": self.int8_mac_fraction,
            "int8_weight_mac_fraction": self.int8_weight_mac_fraction,
            "evaluations": self.evaluations, "seconds": round(self.seconds, 3),
            "calibration_samples": self.calibration_samples,
            "validation_samples": self.validation_samples,
            "fallback_precision": self.fallback, "rounds": self.rounds,
            "four_bit_weights": self.four_bit,
            "four_bit_cost_db_per_kb": self.four_bit_costs,
            "sensitivity": [s.to_json() for s in self.sensitivities],
        }

    def summary(self) -> str:
        by_name = {s.name: s for s in self.sensitivities}
        lines = [f"precision search: {self.metric} budget {self.budget:g}; all int8 "
                 f"{self.all_int8:.4f} (simulated), chosen mix {self.estimate:.4f} (simulated)"
                 + (f", {self.verified:.4f} compiled" if self.verified is not None else ""),
                 f"{len(self.kept)} layer(s) kept in higher precision for accuracy, "
                 f"{len(self.slower_in_int8)} because int8 is slower"
                 + (f" (timed on {self.latency_where} in {self.latency_seconds:.0f} s)"
                    if self.latency_where else " (not timed)")
                 + f"; {self.int8_mac_fraction:.1%} of the MACs in int8"
                 f"{self._weights_note()}{self._four_bit_note()}; "
                 f"{self.evaluations} evaluations in {self.seconds:.0f} s",
                 f"{'rank':>4} {'layer':<32} {'op':<7} {'MACs':>8} {'alone dB':>9} "
                 f"{'fallback dB':>11} {'int8 us':>8} {self.fallback + ' us':>8}  precision"]
        for rank, name in enumerate(self.ranking + self.slower_in_int8, start=1):
            s = by_name[name]
            why = " (int8 slower)" if name in self.slower_in_int8 else ""
            lines.append(f"{rank if not why else '-':>4} {name[:32]:<32} {s.op:<7} "
                         f"{s.macs / 1e6:7.1f}M {s.alone_sqnr_db:9.1f} "
                         f"{s.fallback_sqnr_db:11.2f} {_us(s.int8_us)} {_us(s.fallback_us)}  "
                         f"{precision_label(self.plan[name])}{why}")
        return "\n".join(lines)

    def _weights_note(self) -> str:
        return weights_note(self.int8_mac_fraction, self.int8_weight_mac_fraction)

    def _four_bit_note(self) -> str:
        return f", {len(self.four_bit)} of them with 4-bit weights" if self.four_bit else ""


def weights_note(int8_mac_fraction: float, int8_weight_mac_fraction: float | None) -> str:
    """With layers in int8-a16: the fraction of MACs with int8 weights, those included."""
    if int8_weight_mac_fraction is None or int8_weight_mac_fraction == int8_mac_fraction:
        return ""
    return f" ({int8_weight_mac_fraction:.1%} with int8 weights, int8-a16 included)"


def _us(value: float | None) -> str:
    return f"{value:8.1f}" if value is not None else f"{'-':>8}"


def slower_in_int8(latencies: Mapping, names: Sequence[str],
                   margin: float = LATENCY_MARGIN) -> list[str]:
    """The layers (of `names`) whose int8 kernel is slower than their fallback kernel by more
    than `margin`, as measured (`latencies`: {name: layer_latency.LayerLatency}); a layer not
    measured in both precisions stays int8."""
    slow = []
    for name in names:
        t = latencies.get(name)
        if t is not None and t.int8_us is not None and t.fallback_us is not None and \
                t.int8_us > t.fallback_us * (1.0 + margin):
            slow.append(name)
    return slow


def rank(sensitivities: Sequence[LayerSensitivity], slow=frozenset()) -> list[str]:
    """The layers not in `slow`, the most worth keeping out of int8 first: the highest output
    noise (relative to the signal, 10^(-alone dB / 10)) per unit of cost. The cost is the time
    the layer's kernel adds in the fallback precision (at least COST_FLOOR of its int8 time:
    a layer as fast in both costs nearly nothing to keep) when every layer was timed in both,
    else its MACs."""
    layers = [s for s in sensitivities if s.name not in slow]
    timed = all(s.int8_us is not None and s.fallback_us is not None for s in layers)

    def cost(s: LayerSensitivity) -> float:
        if timed:
            return max(s.fallback_us - s.int8_us, COST_FLOOR * s.int8_us, 1e-9)
        return max(s.macs, 1)

    def noise(s: LayerSensitivity) -> float:
        return 10.0 ** (-s.alone_sqnr_db / 10.0) if np.isfinite(s.alone_sqnr_db) else \
            (0.0 if s.alone_sqnr_db > 0 else float("inf"))

    return [s.name for s in sorted(layers, key=lambda s: (-noise(s) / cost(s), s.name))]


def output_sqnr_db(references, outputs) -> float:
    """SQNR of every floating-point output together, over all samples."""
    signal = noise = 0.0
    for ref_sample, out_sample in zip(references, outputs):
        for r, o in zip(ref_sample, out_sample):
            r = np.asarray(r)
            if not np.issubdtype(r.dtype, np.floating):
                continue
            r = r.astype(np.float64)
            o = np.asarray(o, dtype=np.float64)
            signal += float(np.sum(r * r))
            noise += float(np.sum((r - o) ** 2))
    if noise == 0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal else float("-inf")


def search(onnx_model, calibration: Sequence[Mapping], validation: Sequence[Mapping],
           base: LayerSettings, metric: Metric, budget: float, fallback: str = "fp32",
           fixed: Mapping[str, LayerSettings] | None = None,
           bias_correction: bool = True, weight_rounding: str = "gptq",
           latencies: Mapping | None = None, latency_where: str | None = None,
           latency_seconds: float = 0.0, tables: str | None = "int8",
           four_bits: LayerSettings | None = None) -> SearchResult:
    """Choose each layer's precision. `fixed` layers (set by the user's rules) keep their
    settings and are not searched. `latencies` ({layer: layer_latency.LayerLatency}, timed
    on `latency_where`): layers whose int8 kernel is slower stay in `fallback`. `four_bits`
    (int4 settings): then give as many int8 layers 4-bit weights as the budget allows
    (search_bits.py)."""
    start = time.perf_counter()
    fixed = dict(fixed or {})
    kept_settings = fallback_settings(base, fallback)
    log.info("precision search: observing %d calibration sample(s) in onnxruntime",
             len(calibration))
    sim = Simulator(onnx_model, calibration, bias_correction=bias_correction, base=base,
                    weight_rounding=weight_rounding, tables=tables)
    searched = [l for l in sim.layers if l.name not in fixed]
    macs = {l.name: l.macs for l in sim.layers}
    latencies = dict(latencies or {})
    slow = set(slower_in_int8(latencies, [l.name for l in searched]))
    if latencies:
        log.info("precision search: %d of %d layer(s) are slower in int8 than in %s on %s: "
                 "they stay in %s", len(slow), len(searched), fallback, latency_where,
                 fallback)
    evaluations = 0
    ref_cal = sim.reference(calibration)
    ref_val = sim.reference(validation)

    def plan_with(fallen: set[str], only: str | None = None) -> dict[str, LayerSettings]:
        """`fallen` (and the layers slower in int8) in the fallback precision, the other
        searched layers in int8; or only the layer `only` in int8."""
        plan = dict(fixed)
        for layer in searched:
            int8 = layer.name == only if only is not None else \
                layer.name not in fallen and layer.name not in slow
            plan[layer.name] = base if int8 else kept_settings
        return plan

    def score(plan) -> float:
        nonlocal evaluations
        evaluations += 1
        return metric(ref_val, sim.run(plan, validation), validation)

    def sqnr(plan) -> float:
        nonlocal evaluations
        evaluations += 1
        return output_sqnr_db(ref_cal, sim.run(plan, calibration))

    every_int8 = {layer.name: base for layer in searched}
    all_int8 = score({**fixed, **every_int8})
    all_int8_sqnr = sqnr({**fixed, **every_int8})
    log.info("precision search: all %d searched layers in int8: %s %.4f (budget %s), output "
             "SQNR %.1f dB", len(searched), metric.name, all_int8, metric.describe(budget),
             all_int8_sqnr)
    start_value = all_int8 if not slow else score(plan_with(set()))
    if slow:
        log.info("precision search: with the %d layer(s) slower in int8 in %s: %s %.4f",
                 len(slow), fallback, metric.name, start_value)
    sensitivities = []
    for i, layer in enumerate(searched, start=1):
        alone = sqnr(plan_with(set(), only=layer.name))
        fallback_db = sqnr(plan_with({layer.name}))
        timed = latencies.get(layer.name)
        sensitivities.append(LayerSensitivity(
            layer.name, layer.op, layer.macs, alone, fallback_db,
            timed.int8_us if timed is not None else None,
            timed.fallback_us if timed is not None else None))
        if i % 10 == 0 or i == len(searched):
            log.info("precision search: sensitivity of %d/%d layers (%.0f s)", i,
                     len(searched), time.perf_counter() - start)
    ranking = rank(sensitivities, slow)

    kept: list[str] = []
    estimate = start_value
    if not metric.meets(start_value, budget) and ranking:
        results: dict[int, float] = {}

        def prefix_meets(k: int) -> bool:
            if k not in results:
                results[k] = score(plan_with(set(ranking[:k])))
                log.info("precision search: the first %d layer(s) of the ranking in %s: "
                         "%s %.4f", k, fallback, metric.name, results[k])
            return metric.meets(results[k], budget)

        low, high, k = 0, len(ranking), 1
        while k < len(ranking):  # doubling: low fails, high meets
            if prefix_meets(k):
                high = k
                break
            low = k
            k *= 2
        while high - low > 1:
            middle = (low + high) // 2
            if prefix_meets(middle):
                high = middle
            else:
                low = middle
        reachable = high < len(ranking) or prefix_meets(high)
        if not reachable:  # fp32 meets any budget; int8-a16 and fp16 may not, nor int8 rules
            # the best prefix tried (the fewest layers among equals): more is not always better
            high = 0
            for k in sorted(results):
                if metric.better(results[k], results.get(high, start_value)):
                    high = k
            log.warning("precision search: even with all %d searched layer(s) in %s, %s is "
                        "%.4f, short of the budget %s; the best mix tried keeps the %d most "
                        "sensitive in %s (%s %.4f). Fall back to a higher precision "
                        "(--fallback-precision fp32), or loosen the budget", len(ranking),
                        fallback, metric.name, results[len(ranking)], metric.describe(budget),
                        high, fallback, metric.name, results.get(high, start_value))
        kept = ranking[:high]
        estimate = results.get(high, start_value)
        pruning = list(kept) if reachable else []
        for name in reversed(pruning):  # prune: back to int8 where the budget still holds
            trial = [n for n in kept if n != name]
            value = score(plan_with(set(trial)))
            if metric.meets(value, budget):
                kept, estimate = trial, value
                log.info("precision search: %s goes back to int8 (%s %.4f)", name,
                         metric.name, value)
    plan = plan_with(set(kept))
    four = None
    if four_bits is not None:
        candidates = [(l.name, int(np.prod(l.weight_shape))) for l in searched
                      if plan[l.name] == base and takes_rows(sim.nodes[l.node_index],
                                                             l.weight_shape)]
        four = choose_four_bits(plan, candidates, four_bits, metric, budget, estimate, score,
                                sqnr)
        plan, estimate = four.plan, four.estimate
    result = SearchResult(
        plan=plan, base=base, metric=metric.name, budget=budget,
        higher_is_better=metric.higher_is_better, all_int8=all_int8, estimate=estimate,
        all_int8_sqnr_db=all_int8_sqnr, kept=kept, ranking=ranking,
        sensitivities=sensitivities, macs=macs,
        evaluations=evaluations, seconds=time.perf_counter() - start,
        calibration_samples=len(calibration), validation_samples=len(validation),
        fallback=fallback, slower_in_int8=[s.name for s in sensitivities if s.name in slow],
        latency_where=latency_where if latencies else None, latency_seconds=latency_seconds,
        four_bit=four.layers if four is not None else [],
        four_bit_costs=four.costs if four is not None else {})
    log.info("%s", result.summary())
    return result


def int8_fraction(plan: Mapping[str, LayerSettings], macs: Mapping[str, int],
                  weights_only: bool = False) -> float:
    """The fraction of the MACs that multiply int8 by int8 (a layer with 16-bit inputs does
    not count: it runs twice the int8 MACs, one pass per byte of its input); `weights_only`:
    the fraction whose weights are int8, 16-bit inputs or not (each scheme counts its own)."""
    total = sum(macs.values())
    int8 = 0
    for name, m in macs.items():
        scheme = scheme_for(plan.get(name, LayerSettings("fp32")))
        int8 += scheme.int8_weight_macs(m) if weights_only else scheme.int8_macs(m)
    return int8 / total if total else 0.0


def keep_more(result: SearchResult, count: int) -> SearchResult:
    """The result with the next `count` layers of the ranking also kept in higher precision
    (after the compiled model missed the budget that the simulation met); with 4-bit layers,
    the costlier half of those back in int8 instead."""
    if result.four_bit:
        back = result.four_bit[len(result.four_bit) // 2:]
        plan = {**result.plan, **{name: result.base for name in back}}
        return replace(result, plan=plan, four_bit=result.four_bit[:len(result.four_bit) // 2])
    extra = [n for n in result.ranking if n not in result.kept][:count]
    kept = result.kept + extra
    plan = dict(result.plan)
    for name in extra:
        plan[name] = fallback_settings(result.base, result.fallback)
    return replace(result, plan=plan, kept=kept)
