"""Static int8 in three stages, each returning a frozen value:

    plan(model, config, target)     -> QuantPlan          (plan.py: settings per layer)
    calibrate(plan, calibration)    -> CalibrationTable   (the fp32 model run on the samples)
    realize(plan, table)            -> QuantizedModel     (integer kernels, and the report)

`quantize` runs the three. A table is saved with CalibrationTable.save and loaded back, so a
model can be re-realized under other rules without running the samples again, as long as the
new plan's int8 layers were int8 when the table was made (their inputs' moments and means are
collected only for those).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..errors import InputError, last_line
from ..frontend import Layer, reimport
from ..relax_main import rebuild_main
from .calibrate import CalibrationTable, calibrate as run_calibration
from .calibration_data import load_calibration
from .flow import wide_tensors
from .graph import Graph, relax_flow
from .observers import WIDE_DTYPES, activation_qparams, choose_range
from .plan import CALIBRATED, QuantPlan
from .config import QuantizedModel
from .realize import Realizer, verify
from .report import QuantReport, layer_errors
from .values import LayerResult, RealizeConfig

log = logging.getLogger(__name__)

MEASURE_SAMPLES = 16


def calibrate(plan: QuantPlan, calibration: str | Path | Iterable[Mapping[str, Any]]
              ) -> CalibrationTable:
    """Run the plan's fp32 model on the `calibration` samples (an .npz or an iterable of
    {input name: array}) and return what it observed, keyed by tensor and layer names."""
    table, _ = _calibrate(plan, _feeds(plan, calibration))
    return table


def realize(plan: QuantPlan, table: CalibrationTable,
            measure_on: str | Path | Iterable[Mapping[str, Any]] | None = None):
    """The QuantizedModel of `plan` with the ranges of `table`; with `measure_on` (samples),
    its report holds each layer's error against fp32 on them."""
    feeds = _feeds(plan, measure_on) if measure_on is not None else []
    return _realize(plan, table, feeds[:MEASURE_SAMPLES], None)


def quantize(model, calibration, config=None, target=None):
    """Static int8 post-training quantization of `model` with `calibration` samples; with
    config.reconstruct, of the model reconstruction refits for its plan."""
    from .plan import plan as make_plan

    p = make_plan(model, config, target)
    feeds = _feeds(p, calibration)
    refitted = None
    if p.config.reconstruct:
        refitted = _reconstruct(p, feeds)
        p = make_plan(reimport(model, refitted.onnx), config, target)
    table, probe = _calibrate(p, feeds)
    if refitted is not None:  # GPTQ rounds for the quantized inputs the refit saw
        table = dataclasses.replace(table, moments={**table.moments, **{
            var: refitted.moments[name] for var, name in p.names.items()
            if name in refitted.moments}})
    result = _realize(p, table, feeds[:MEASURE_SAMPLES], probe)
    if refitted is not None:
        result.report.add_reconstruction(refitted.to_json())
    return result


def _reconstruct(plan: QuantPlan, feeds: list):
    from .reconstruct import reconstruct

    config = plan.config
    # the settings of the integer ops between layers, as the search gives the simulator
    base = dataclasses.replace(plan.base, precision="int8")
    return reconstruct(plan.model.onnx, plan.onnx_settings(), feeds, base=base,
                       bias_correction=config.bias_correction,
                       weight_rounding=config.weight_rounding, tables=config.table_precision,
                       seconds=config.reconstruct_seconds)




def _feeds(plan: QuantPlan, samples) -> list:
    return load_calibration(samples, plan.model.inputs, plan.config.method)


def _calibrate(plan: QuantPlan, feeds: list):
    tensors = plan.tensors()
    names, observed = list(tensors), list(tensors.values())
    start = time.perf_counter()
    log.info("calibrating: running the fp32 model on %d sample(s), observing %d tensors (%s)",
             len(feeds), len(observed), plan.config.method)
    probe = host_vm(observing_module(plan, observed))
    inputs = [s.name for s in plan.model.inputs]
    table = run_calibration(lambda feed: dict(zip(names, run_vm(probe, feed, inputs))), feeds,
                            names, plan.layer_inputs(), means=plan.config.bias_correction,
                            histogram=plan.needs_histograms())
    log.info("calibrated in %.1f s", time.perf_counter() - start)
    return dataclasses.replace(table, model=plan.model.sha256), probe


def _qparams(plan: QuantPlan, table: CalibrationTable):
    """({var: QParams} of every observed tensor, {relax layer: its input's QParams} where the
    layer's own settings differ from the model's, the 16-bit tensors {var: (dtype, sym)})."""
    config, base = plan.config, plan.base
    tensors = plan.tensors()
    foreign = table.model and plan.model.sha256 and table.model != plan.model.sha256
    if foreign or (tensors and not any(name in table.observers for name in tensors)):
        source = plan.model.source or "the model"
        raise InputError(f"The calibration table does not belong to this model ({source}): it "
                         "was made from another ONNX file. Calibrate this model "
                         "(qcompile.quantize.calibrate) or load the table saved for it.")
    observer_of = {tensors[name]: obs for name, obs in table.observers.items() if name in tensors}
    qparams = {var: activation_qparams(choose_range(obs, config.method, config.percentile),
                                       plan.activations, config.symmetric)
               for var, obs in observer_of.items()}
    weighted = plan.weighted()
    int8 = {var: s for var, s in plan.settings.items()
            if var in weighted and s.precision in CALIBRATED}
    # 16-bit inputs, and the integer ops before them (flow.py): {var: (dtype, symmetric)}
    wide = wide_tensors(relax_flow(plan.graph), {
        var: (s.activations, s.symmetric) for var, s in int8.items()
        if s.activations in WIDE_DTYPES})
    for var, (dtype, symmetric) in wide.items():
        if var in observer_of:  # 16 bits need no clipping: their ranges are min/max
            qparams[var] = activation_qparams(choose_range(observer_of[var], "minmax"), dtype,
                                              symmetric)
    input_qparams = {}
    for var, s in int8.items():
        x = weighted[var].args[0]
        if x not in observer_of:
            continue
        if x in wide and s.activations in WIDE_DTYPES:
            input_qparams[var] = qparams[x]
        elif x in wide or (s.method, s.activations, s.symmetric) != (
                base.method, base.activations, base.symmetric):
            input_qparams[var] = activation_qparams(
                choose_range(observer_of[x], s.method, config.percentile),
                s.activations if s.activations not in WIDE_DTYPES else plan.activations,
                s.symmetric)
    return qparams, input_qparams


def _realize(plan: QuantPlan, table: CalibrationTable, feeds: list, probe):
    qparams, input_qparams = _qparams(plan, table)
    tensors = plan.tensors()
    config = RealizeConfig(
        plan=plan.schemes(), plane_dtype=plan.plane_dtype, input_qparams=input_qparams,
        input_means={tensors[k]: v for k, v in table.means.items() if k in tensors},
        input_moments=dict(table.moments), tables=plan.config.table_precision,
        group_codes=plan.model.weight_codes)
    realizer = Realizer(plan.mod, plan.graph, qparams, config)
    quantized_mod = verified_module(realizer, config, plan.graph)
    model = plan.model
    errors = ([], [None] * len(plan.graph.output_list))
    if feeds:
        errors = _measure(plan, qparams, config, realizer, feeds, probe)
    report = QuantReport.build(model, realizer.layers, plan.names, errors, plan.config,
                               plan.activations, table.samples, realizer.tables)
    log.info("%s", report.summary())
    return QuantizedModel(quantized_mod, model.inputs, model.outputs,
                          model_layers(plan.names, model, realizer.layers), report, model,
                          model.source, model.sha256)


def _measure(plan, qparams, config, realizer, feeds, probe):
    """Per-layer outputs of the int8 model against fp32 on `feeds`; a failure is a warning
    (the report measures the model; it is not the model)."""
    observed = list(plan.tensors().values())
    measured = [l for l in realizer.layers if l.output_var is not None]
    try:
        if probe is None:
            probe = host_vm(observing_module(plan, observed))
        measure_mod = Realizer(plan.mod, plan.graph, qparams, config).run(
            extra_outputs=tuple(l.output_var for l in measured))
        return layer_errors(probe, host_vm(measure_mod), feeds,
                            [s.name for s in plan.model.inputs], observed,
                            [l.output_var for l in measured], list(plan.graph.output_list),
                            run_vm)
    except Exception as exc:  # noqa: BLE001
        log.warning("the quantization report could not measure the layers' errors (%s); the "
                    "model is built without them", last_line(str(exc)))
        return [], [None] * len(plan.graph.output_list)


def verified_module(realizer: Realizer, config: RealizeConfig, graph: Graph):
    """The realized module, after `verify` (each problem is a warning naming the layer)."""
    mod = realizer.run()
    for problem in verify(mod, config, graph, realizer.layers):
        log.warning("%s", problem)
    return mod


def model_layers(names: Mapping[str, str], model, results: list[LayerResult]
                 ) -> tuple[Layer, ...]:
    """The model's layers with the precision each runs in (names: {relax layer: ONNX node
    name})."""
    ops = {layer.name: layer.op for layer in model.layers}
    return tuple(Layer(names[r.var], ops.get(names[r.var], r.op), r.precision)
                 for r in results)


def host_vm(mod, scheduled: bool = False):
    """A Relax VM on this machine for `mod` (calibration and measuring run here): TVM's
    default pipeline (unscheduled kernels: quick to build), or, `scheduled`, our schedules
    (longer to build, much faster to run: a language model's calibration)."""
    import tvm
    from tvm import relax

    from ..lower import lower
    from ..targets import load_target

    host = load_target("host")
    with host.to_tvm():
        folded = relax.transform.FoldConstant()(mod)
        mod = lower(folded, host) if scheduled else \
            relax.get_default_pipeline(host.to_tvm())(folded)
    executable = tvm.compile(mod, host.to_tvm(), relax_pipeline=None)
    return relax.VirtualMachine(executable, tvm.cpu())


def run_vm(vm, feeds: Mapping[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    import tvm

    vm.set_input("main", *[tvm.runtime.tensor(feeds[n]) for n in names])
    vm.invoke_stateful("main")
    result = vm.get_outputs("main")
    values = list(result) if isinstance(result, (tuple, list)) else [result]
    return [v.numpy() for v in values]


def observing_module(plan: QuantPlan, observed: list):
    """main() returning the values of `observed` vars (a calibration probe)."""
    from tvm import relax

    return rebuild_main(plan.mod, [(node.var, node.value) for node in plan.graph.nodes],
                        relax.Tuple(list(observed)))


__all__ = ["calibrate", "host_vm", "model_layers", "quantize", "realize", "run_vm",
           "verified_module"]
