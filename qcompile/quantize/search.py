"""Accuracy-aware automatic precision: as much int8 as an accuracy budget allows.

1. Sensitivity, on the calibration data: for each layer, the model's output SQNR against fp32
   with only that layer in int8 ("alone"), and with every layer but that one in int8
   ("fallback"). Both are simulated in onnxruntime (simulate.py), a second or so each.
2. Choice, on the validation data: the layers ranked from most to least sensitive (lowest
   "alone" SQNR first); the shortest prefix of that ranking kept in higher precision that meets
   the budget (doubling, then bisecting); then each kept layer is tried back in int8, and stays
   int8 if the budget still holds.
3. The pipeline builds the choice, checks the budget with the compiled model on the validation
   data, and keeps the next-ranked layers in higher precision if the simulation was optimistic.

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
from .rules import LayerSettings, rules_toml
from .simulate import Simulator

log = logging.getLogger(__name__)


@dataclass
class LayerSensitivity:
    name: str
    op: str
    macs: int
    alone_sqnr_db: float      # outputs' SQNR with only this layer in int8
    fallback_sqnr_db: float   # outputs' SQNR with every searched layer but this one in int8

    def to_json(self) -> dict:
        return {"layer": self.name, "op": self.op, "macs": self.macs,
                "alone_sqnr_db": _finite(self.alone_sqnr_db),
                "fallback_sqnr_db": _finite(self.fallback_sqnr_db)}


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
    kept: list[str]                      # layers kept in higher precision, most sensitive first
    ranking: list[str]                   # every searched layer, most sensitive first
    sensitivities: list[LayerSensitivity]
    int8_mac_fraction: float
    evaluations: int
    seconds: float
    calibration_samples: int
    validation_samples: int
    fallback: str = "fp32"
    verified: float | None = None        # the metric of the compiled model on validation
    rounds: list[dict] = field(default_factory=list)

    def rules_text(self) -> str:
        return rules_toml(self.plan, self.base, header=(
            f"Chosen by `qcompile compile --quantize auto` for {self.metric} "
            f"{'>=' if self.higher_is_better else '<='} {self.budget:g}: {len(self.kept)} "
            f"layer(s) kept in higher precision, {self.int8_mac_fraction:.1%} of the MACs "
            "in int8.\nCompile with --quantize int8 --precision-rules THIS_FILE to get the same "
            "mix without searching."))

    def to_json(self) -> dict:
        return {
            "metric": self.metric, "budget": self.budget,
            "higher_is_better": self.higher_is_better,
            "all_int8_estimate": self.all_int8, "all_int8_sqnr_db": _finite(self.all_int8_sqnr_db),
            "chosen_estimate": self.estimate, "verified": self.verified,
            "kept_in_higher_precision": [
                {"layer": name, "precision": self.plan[name].precision} for name in self.kept],
            "int8_mac_fraction": self.int8_mac_fraction,
            "evaluations": self.evaluations, "seconds": round(self.seconds, 3),
            "calibration_samples": self.calibration_samples,
            "validation_samples": self.validation_samples,
            "fallback_precision": self.fallback, "rounds": self.rounds,
            "sensitivity": [s.to_json() for s in self.sensitivities],
        }

    def summary(self) -> str:
        by_name = {s.name: s for s in self.sensitivities}
        lines = [f"precision search: {self.metric} budget {self.budget:g}; all int8 "
                 f"{self.all_int8:.4f} (simulated), chosen mix {self.estimate:.4f} (simulated)"
                 + (f", {self.verified:.4f} compiled" if self.verified is not None else ""),
                 f"{len(self.kept)} layer(s) kept in higher precision; "
                 f"{self.int8_mac_fraction:.1%} of the MACs in int8; {self.evaluations} "
                 f"evaluations in {self.seconds:.0f} s",
                 f"{'rank':>4} {'layer':<32} {'op':<7} {'MACs':>8} {'alone dB':>9} "
                 f"{'fallback dB':>11}  precision"]
        for rank, name in enumerate(self.ranking, start=1):
            s = by_name[name]
            lines.append(f"{rank:>4} {name[:32]:<32} {s.op:<7} {s.macs / 1e6:7.1f}M "
                         f"{s.alone_sqnr_db:9.1f} {s.fallback_sqnr_db:11.2f}  "
                         f"{self.plan[name].precision}")
        return "\n".join(lines)


def _finite(x: float) -> float | str:
    return x if np.isfinite(x) else ("inf" if x > 0 else "-inf")


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
           bias_correction: bool = True, weight_rounding: str = "gptq") -> SearchResult:
    """Choose each layer's precision. `fixed` layers (set by the user's rules) keep their
    settings and are not searched."""
    start = time.perf_counter()
    fixed = dict(fixed or {})
    log.info("precision search: observing %d calibration sample(s) in onnxruntime",
             len(calibration))
    sim = Simulator(onnx_model, calibration, bias_correction=bias_correction, base=base,
                    weight_rounding=weight_rounding)
    searched = [l for l in sim.layers if l.name not in fixed]
    macs = {l.name: l.macs for l in sim.layers}
    evaluations = 0
    ref_cal = sim.reference(calibration)
    ref_val = sim.reference(validation)

    def plan_with(fallen: set[str], only: str | None = None) -> dict[str, LayerSettings]:
        plan = dict(fixed)
        for layer in searched:
            int8 = layer.name == only if only is not None else layer.name not in fallen
            plan[layer.name] = base if int8 else replace(base, precision=fallback)
        return plan

    def score(plan) -> float:
        nonlocal evaluations
        evaluations += 1
        return metric(ref_val, sim.run(plan, validation), validation)

    def sqnr(plan) -> float:
        nonlocal evaluations
        evaluations += 1
        return output_sqnr_db(ref_cal, sim.run(plan, calibration))

    all_int8 = score(plan_with(set()))
    all_int8_sqnr = sqnr(plan_with(set()))
    log.info("precision search: all %d searched layers in int8: %s %.4f (budget %s), output "
             "SQNR %.1f dB", len(searched), metric.name, all_int8, metric.describe(budget),
             all_int8_sqnr)
    sensitivities = []
    for i, layer in enumerate(searched, start=1):
        alone = sqnr(plan_with(set(), only=layer.name))
        fallback_db = sqnr(plan_with({layer.name}))
        sensitivities.append(LayerSensitivity(layer.name, layer.op, layer.macs, alone,
                                              fallback_db))
        if i % 10 == 0 or i == len(searched):
            log.info("precision search: sensitivity of %d/%d layers (%.0f s)", i,
                     len(searched), time.perf_counter() - start)
    ranking = [s.name for s in sorted(sensitivities, key=lambda s: s.alone_sqnr_db)]

    kept: list[str] = []
    estimate = all_int8
    if not metric.meets(all_int8, budget):
        results: dict[int, float] = {}

        def prefix_meets(k: int) -> bool:
            if k not in results:
                results[k] = score(plan_with(set(ranking[:k])))
                log.info("precision search: %d most sensitive layer(s) in %s: %s %.4f", k,
                         fallback, metric.name, results[k])
            return metric.meets(results[k], budget)

        low, high, k = 0, len(ranking), 1
        while k < len(ranking):  # doubling: low fails, high meets (all in fallback meets)
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
        kept = ranking[:high]
        estimate = results.get(high, float("nan"))
        for name in reversed(list(kept)):  # prune: back to int8 where the budget still holds
            trial = [n for n in kept if n != name]
            value = score(plan_with(set(trial)))
            if metric.meets(value, budget):
                kept, estimate = trial, value
                log.info("precision search: %s goes back to int8 (%s %.4f)", name,
                         metric.name, value)
    plan = plan_with(set(kept))
    result = SearchResult(
        plan=plan, base=base, metric=metric.name, budget=budget,
        higher_is_better=metric.higher_is_better, all_int8=all_int8, estimate=estimate,
        all_int8_sqnr_db=all_int8_sqnr, kept=kept, ranking=ranking,
        sensitivities=sensitivities, int8_mac_fraction=int8_fraction(plan, macs),
        evaluations=evaluations, seconds=time.perf_counter() - start,
        calibration_samples=len(calibration), validation_samples=len(validation),
        fallback=fallback)
    log.info("%s", result.summary())
    return result


def int8_fraction(plan: Mapping[str, LayerSettings], macs: Mapping[str, int]) -> float:
    total = sum(macs.values())
    int8 = sum(m for name, m in macs.items() if plan.get(name, LayerSettings("fp32")).precision
               == "int8")
    return int8 / total if total else 0.0


def keep_more(result: SearchResult, count: int) -> SearchResult:
    """The result with the next `count` layers of the ranking also kept in higher precision
    (after the compiled model missed the budget that the simulation met)."""
    extra = [n for n in result.ranking if n not in result.kept][:count]
    kept = result.kept + extra
    plan = dict(result.plan)
    for name in extra:
        plan[name] = replace(result.base, precision=result.fallback)
    macs = {s.name: s.macs for s in result.sensitivities}
    return replace(result, plan=plan, kept=kept, int8_mac_fraction=int8_fraction(plan, macs))
