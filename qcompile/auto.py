"""--quantize auto: the precision mix chosen against an accuracy budget, built and checked.

1. each layer's kernel timed in int8 and in the fallback precision on the target (here, or on
   the device at the tracker): layers slower in int8 stay in the fallback (layer_latency);
2. the mix searched in simulation (quantize/search.py); with --weight-bits 4, then as many of
   its int8 layers with 4-bit weights as the budget allows (quantize/search_bits.py);
3. built, and on the host checked with the compiled model on the validation data; when the
   simulation was optimistic, the next layers of the ranking are kept too and it is built
   again (up to VERIFY_ROUNDS), keeping the best build.

The choice is written beside the library as precision-rules.toml (reusable with --quantize
int8 --precision-rules) and search.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from .artifact import Artifact
from .build import build, publish
from .frontend import FloatModel
from .modes import AutoPrecision
from .quantize import (activation_dtype_for, calibrate, layer_plan, load_calibration, plan,
                       realize)
from .quantize.rules import PrecisionRules
from .quantize.schemes import FOUR_BITS
from .quantize.search import keep_more, search
from .quantize.simulate import onnxruntime_outputs
from .runtime import load as load_model
from .targets import Target
from .tuning_log import TuningLog

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

RULES_FILE = "precision-rules.toml"
SEARCH_FILE = "search.json"
VERIFY_ROUNDS = 3


def compile_auto(float_model: FloatModel, target: Target, out_dir: Path, mode: AutoPrecision,
                 tuning_log: TuningLog | None, rpc, save_more=None) -> Artifact:
    """--quantize auto: time each layer in int8 and in the fallback precision (`latency`, on
    the device at `rpc` or here), search the precision mix in simulation, build it, check the
    budget with the compiled model (host targets), keep more layers in higher precision if
    needed."""
    calibration, validation, config = mode.calibration, mode.validation, mode.config
    budget, metric, fallback, latency = mode.budget, mode.metric, mode.fallback, mode.latency
    feeds = load_calibration(calibration, float_model.inputs, config.method)
    if validation is None:
        log.warning("no --validation data: the budget is checked on the calibration samples, "
                    "which flatters it; pass held-out samples with --validation VAL.npz")
        held_out = feeds
    else:
        held_out = load_calibration(validation, float_model.inputs, "minmax")
    activations = config.activations or activation_dtype_for(target)
    fixed = {}
    if config.rules is not None:
        by_name, explicit = layer_plan(float_model,
                                       dataclasses.replace(config, float_stem=False), activations)
        fixed = {name: by_name[name] for name in explicit}
    timing = time.perf_counter()
    if latency and fallback == "int8-a16":
        log.info("layers not timed: int8-a16 runs a layer's int8 kernel on both bytes of its "
                 "input, so it is never faster than int8")
        latency = False
    latencies, where = _layer_latencies(float_model, target, fallback, activations, fixed,
                                        rpc, tuning_log) if latency else ({}, None)
    base = config.base_settings(activations)  # int4 with --weight-bits 4: its candidates
    four_bits = base if base.precision in FOUR_BITS else None
    result = search(float_model.onnx, feeds, held_out,
                    dataclasses.replace(base, precision="int8"), metric, budget, fallback,
                    fixed, config.bias_correction, config.weight_rounding, latencies, where,
                    time.perf_counter() - timing, config.table_precision, four_bits)
    reference = onnxruntime_outputs(float_model.onnx, held_out)
    runs_here = target.name == "host"
    best = None  # (compiled metric, round, result, build directory)
    table = None  # calibrated once, for every round's plan
    for round_ in range(1, (VERIFY_ROUNDS if runs_here else 1) + 1):
        rules = PrecisionRules.from_dict(tomllib.loads(result.rules_text()), RULES_FILE)
        round_plan = plan(float_model, dataclasses.replace(
            config, rules=rules, weight_bits=8, palettes=False), target)
        if table is None:
            table = calibrate(round_plan.with_int8_everywhere(), feeds)
        quantized = realize(round_plan, table, measure_on=feeds)
        directory = out_dir if not runs_here else \
            out_dir.parent / f".{out_dir.name}.round{round_}"
        report, choice = quantized.report, None if runs_here else result

        def extras(staging: Path, report=report, choice=choice) -> None:
            report.save(staging)
            if save_more is not None:  # another stage's report (pruning)
                save_more(staging)
            if choice is not None:  # known now: no compiled check follows
                _save_choice(staging, choice)

        artifact = build(quantized, target, directory, tuning_log=tuning_log, extras=extras)
        if not runs_here:
            log.info("the %s library cannot run here: the budget was checked in simulation "
                     "only (%s %.4f)", target.name, metric.name, result.estimate)
            break
        model = load_model(artifact.directory)
        names = [spec.name for spec in float_model.outputs]
        outputs = [[model.run(feed)[n] for n in names] for feed in held_out]
        result.verified = metric(reference, outputs, held_out)
        result.rounds.append({"round": round_, "kept": len(result.kept),
                              "int8_mac_fraction": result.int8_mac_fraction,
                              "compiled": result.verified})
        log.info("compiled model, round %d: %s %.4f on %d validation sample(s) (budget %s)",
                 round_, metric.name, result.verified, len(held_out),
                 metric.describe(budget))
        improved = best is None or metric.better(result.verified, best[0])
        if improved:
            best = (result.verified, round_, result, artifact.directory)
        if metric.meets(result.verified, budget) or not improved or \
                len(result.kept) == len(result.ranking):
            break
        if round_ < VERIFY_ROUNDS:
            result = keep_more(result, max(1, len(result.kept) // 2))
            log.info("the simulation was optimistic: keeping %d layer(s) in %s and building "
                     "again", len(result.kept), fallback)
    if best is not None:  # the best compiled round (ties: the earlier, with more int8)
        _, chosen_round, chosen, directory = best
        chosen.rounds = result.rounds
        result = chosen
        if not metric.meets(result.verified, budget):
            log.warning("the compiled model misses the budget: %s %.4f (budget %s), with %d "
                        "layer(s) in %s; more layers in higher precision did not help (round "
                        "%d kept)", metric.name, result.verified, metric.describe(budget),
                        len(result.kept), fallback, chosen_round)
        _save_choice(directory, result)
        publish(directory, out_dir)
        for round_dir in out_dir.parent.glob(f".{out_dir.name}.round*"):
            shutil.rmtree(round_dir, ignore_errors=True)
        artifact = Artifact.open(out_dir)
    log.info("precision mix written to %s (reuse it with --quantize int8 --precision-rules)",
             artifact.directory / RULES_FILE)
    return artifact


def _save_choice(directory: Path, result) -> None:
    """The precision mix chosen (reusable rules) and the search's record, into `directory`."""
    (directory / RULES_FILE).write_text(result.rules_text())
    (directory / SEARCH_FILE).write_text(json.dumps(result.to_json(), indent=1) + "\n")


def _layer_latencies(float_model, target: Target, fallback: str, activations: str,
                     fixed, rpc, tuning_log: TuningLog | None) -> tuple[dict, str | None]:
    """({layer: LayerLatency}, where they were timed) for the layers the search chooses, or
    ({}, None) when no tracker is given and the target cannot run here (a tracker that
    fails is an error: the user asked for it)."""
    from . import layer_latency
    from .errors import DeviceError
    from .quantize.onnx_view import weighted_layers

    layers = [l for l in weighted_layers(float_model.onnx) if l.name not in fixed]
    try:
        timed = layer_latency.measure(float_model.onnx, layers, target, fallback, activations,
                                      rpc, tuning_log=tuning_log)
    except DeviceError as exc:
        if rpc is not None:
            raise
        log.warning("layers not timed, the precision mix is chosen for accuracy only: %s", exc)
        return {}, None
    if rpc is None:
        from .devices import LocalDevice

        where = f"{target.name}, {LocalDevice().describe()}"
    else:
        where = f"{target.name}, device '{rpc[1]}' at {rpc[0][0]}:{rpc[0][1]}"
    return timed, where


__all__ = ["RULES_FILE", "SEARCH_FILE", "compile_auto"]
