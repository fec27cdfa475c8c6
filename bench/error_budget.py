"""Where EfficientNet-Lite0's int8 error comes from, and how much error its own top-1 tolerates.

    python bench/error_budget.py [--json bench/results/error-budget.json]

How close can post-training int8 get to 99% top-1 agreement with fp32 with at least 95% of
the MACs in int8? This measures, on the bundled photos (32 to calibrate, the other 277 to evaluate), with the
precision search's simulator (`qcompile/quantize/simulate.py`, the same scales, codes and bias
correction as the compiled model):

- the fp32 model itself with its input rounded to whole pixel values (what a uint8 camera
  frame or resizer gives) and with +-0.5 pixel of noise: how stable its top-1 is;
- each source of int8 error alone: the weights of one group of layers rounded to int8 (every
  activation float), or the inputs of one group quantized to 8 bits (every weight float);
- the int8 plans themselves.

Agreement is top-1 against fp32; SQNR is the logits' signal-to-quantization-noise ratio. The
sources' noise powers add up roughly: a plan's SQNR is what its sources leave together.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

GROUPS = {  # a layer's group, from its name in the bundled export
    "stem": "conv_stem", "depthwise": "depthwise_conv", "expand": "expand_conv",
    "project": "project_conv", "head": "conv_head", "fc": "fc"}


def _group(name: str) -> str:
    return next(g for g, key in GROUPS.items() if key in name)


def _rewired(model, keep):
    """`model` (fake-quantized) with the QuantizeLinear/DequantizeLinear pairs removed from
    the inputs of the nodes for which keep(node) is false: those read the float tensor."""
    source = {n.output[0]: n.input[0] for n in model.graph.node
              if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "Add", "GlobalAveragePool") and not keep(node):
            for k, tensor in enumerate(node.input):
                while tensor in source:
                    tensor = source[tensor]
                node.input[k] = tensor
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path("bench/results/error-budget.json"))
    args = parser.parse_args()

    import onnx

    from qcompile.examples import efficientnet_lite0 as effnet
    from qcompile.examples.photos import calibration_split, photo_collection
    from qcompile.quantize.rules import LayerSettings
    from qcompile.quantize.simulate import Simulator, ort_session

    start = time.perf_counter()
    model = effnet.build_onnx()
    calibration, held_out = calibration_split(photo_collection())
    calibration = [{"images": effnet.preprocess(image)} for _, image in calibration]
    held_out = [{"images": effnet.preprocess(image)} for _, image in held_out]
    print(f"EfficientNet-Lite0: {len(calibration)} calibration photos, {len(held_out)} "
          "evaluation photos; observing the calibration photos ...", file=sys.stderr)
    sim = Simulator(model, calibration)
    reference = [r[0] for r in sim.reference(held_out)]
    macs = {layer.name: layer.macs for layer in sim.layers}
    total = sum(macs.values())
    originals = {i.name: i for i in model.graph.initializer}
    rows = []

    def record(label: str, outputs, int8_macs: float | None = None) -> None:
        agree = float(np.mean([np.argmax(r) == np.argmax(o)
                               for r, o in zip(reference, outputs)]))
        ref, out = np.concatenate([r.ravel() for r in reference]), \
            np.concatenate([o.ravel() for o in outputs])
        sqnr = float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2)))
        rows.append({"variant": label, "agreement": agree,
                     "agree": f"{round(agree * len(held_out))}/{len(held_out)}",
                     "sqnr_db": sqnr, "int8_mac_fraction": int8_macs})
        print(f"  {label:58s} {rows[-1]['agree']:>8s} {agree:7.1%} {sqnr:7.2f} dB",
              file=sys.stderr, flush=True)

    def run(fake) -> list:
        session = ort_session(fake)
        return [session.run(sim.output_names, dict(feed))[0] for feed in held_out]

    # 1. the fp32 model's own tolerance
    session = ort_session(model)
    mean = np.asarray(effnet.MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(effnet.STD, np.float32).reshape(1, 3, 1, 1)
    rng = np.random.default_rng(0)
    record("fp32, input rounded to whole pixel values",
           [session.run(None, {"images": ((np.round(f["images"] * std + mean) - mean) / std)
                                .astype(np.float32)})[0] for f in held_out])
    record("fp32, input +-0.5 pixel uniform noise",
           [session.run(None, {"images": (f["images"] + rng.uniform(
               -0.5, 0.5, f["images"].shape) / std).astype(np.float32)})[0]
            for f in held_out])

    # 2. each source alone
    every = {layer.name: LayerSettings() for layer in sim.layers}
    for group in GROUPS:
        plan = {name: s for name, s in every.items() if _group(name) == group}
        record(f"int8 weights of {group} only (activations float)",
               run(_rewired(sim.fake_quantized(plan), lambda node: False)))

    def inputs_of(groups):
        fake = sim.fake_quantized(every)
        for init in fake.graph.initializer:  # every weight and bias back to float
            if init.name in originals:
                init.CopyFrom(originals[init.name])
        return _rewired(fake, lambda node: any(
            (node.op_type == "Add") if g == "add" else
            (node.op_type in ("Gemm", "GlobalAveragePool")) if g == "fc" else
            (GROUPS[g] in node.name) for g in groups))

    for groups in (("stem",), ("depthwise",), ("expand",), ("project",), ("add",),
                   ("head", "fc")):
        record(f"8-bit inputs of {'+'.join(groups)} only (weights float)",
               run(inputs_of(groups)))

    # 3. the plans
    def plan_macs(plan) -> float:
        return sum(macs[n] for n, s in plan.items() if s.precision == "int8" and
                   s.activations in ("uint8", "int8")) / total

    plans = {
        "int8 everywhere": every,
        "int8, stem fp32 (the default)": {n: s for n, s in every.items()
                                          if _group(n) != "stem"},
        "int8, stem and depthwise fp32": {n: s for n, s in every.items()
                                          if _group(n) not in ("stem", "depthwise")},
    }
    for label, plan in plans.items():
        record(label, run(sim.fake_quantized(plan)), plan_macs(plan))

    seconds = time.perf_counter() - start
    print(f"\n| variant | agree | agreement | logits SQNR | int8 MACs |\n|---|---|---|---|---|")
    for row in rows:
        share = "" if row["int8_mac_fraction"] is None else f"{row['int8_mac_fraction']:.1%}"
        print(f"| {row['variant']} | {row['agree']} | {row['agreement']:.1%} | "
              f"{row['sqnr_db']:.2f} dB | {share} |")
    print(f"\n{len(rows)} variants in {seconds:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": "efficientnet-lite0", "onnx": onnx.__version__,
                                     "calibration": len(calibration),
                                     "evaluation": len(held_out), "seconds": seconds,
                                     "rows": rows}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
