"""The quantization report: per layer its op, precision, scales and zero points, and its error
against fp32 on calibration data; the outputs' error; the weights' size in fp32 and int8.
Printed after quantizing and saved beside the .so as quantization.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPORT_FILE = "quantization.json"


@dataclass
class TensorError:
    """Accumulated error of an approximation against its fp32 reference."""

    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    approx_energy: float = 0.0
    max_abs: float = 0.0

    def add(self, reference: np.ndarray, approx: np.ndarray) -> None:
        ref = reference.astype(np.float64).ravel()
        app = approx.astype(np.float64).ravel()
        self.signal += float(ref @ ref)
        self.noise += float((ref - app) @ (ref - app))
        self.dot += float(ref @ app)
        self.approx_energy += float(app @ app)
        self.max_abs = max(self.max_abs, float(np.abs(ref - app).max(initial=0.0)))

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return float("inf")
        return 10.0 * float(np.log10(self.signal / self.noise)) if self.signal else float("-inf")

    @property
    def cosine(self) -> float:
        denom = np.sqrt(self.signal * self.approx_energy)
        return float(self.dot / denom) if denom else 1.0

    def to_json(self) -> dict[str, float]:
        return {"sqnr_db": finite(self.sqnr_db), "cosine": self.cosine, "max_abs": self.max_abs}


def finite(x: float) -> float | str:
    return x if np.isfinite(x) else ("inf" if x > 0 else "-inf")


def layer_errors(fp32_vm, int8_vm, feeds, names, observed, layer_vars, output_vars, run):
    """(per layer, per model output) TensorErrors of the int8 model against fp32.

    fp32_vm returns the `observed` vars; int8_vm returns the model outputs, then the float
    value of each var in `layer_vars`."""
    index = {var: i for i, var in enumerate(observed)}
    layers = [TensorError() for _ in layer_vars]
    # outputs that are not float tensors (an input passed through) have no error: None
    outputs = [TensorError() if var in index else None for var in output_vars]
    n = len(output_vars)
    for feed in feeds:
        reference = run(fp32_vm, feed, names)
        approx = run(int8_vm, feed, names)
        for var, err, value in zip(output_vars, outputs, approx[:n]):
            if err is not None:
                err.add(reference[index[var]], value)
        for var, err, value in zip(layer_vars, layers, approx[n:]):
            err.add(reference[index[var]], value)
    return layers, outputs


@dataclass
class QuantReport:
    method: str
    activations: str
    per_channel: bool
    samples: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)  # lookup tables (embeddings)
    reconstruction: dict[str, Any] | None = None  # reconstruct.Reconstruction.to_json()

    def add_reconstruction(self, reconstruction: dict[str, Any]) -> None:
        """Record what reconstruction did: in total, and on each refitted layer's row."""
        self.reconstruction = {k: v for k, v in reconstruction.items() if k != "layers"}
        by_layer = {layer["layer"]: layer for layer in reconstruction["layers"]}
        for row in self.rows:
            fit = by_layer.get(row["layer"])
            if fit is not None:
                row["reconstruction"] = {k: v for k, v in fit.items() if k != "layer"}

    @classmethod
    def build(cls, model, results, layer_names, errors, config, activations, samples,
              tables=()):
        """layer_names: {relax var name: ONNX node name}; tables: values.TableResult."""
        layer_errs, output_errs = errors
        measured = [r for r in results if r.output_var is not None]
        err_of = {r.var: e for r, e in zip(measured, layer_errs)}
        onnx_name = dict(layer_names)
        rows = []
        for result in results:
            err = err_of.get(result.var)
            rows.append({
                "layer": onnx_name.get(result.var, result.var), "relax_var": result.var,
                "op": result.op, "precision": result.precision, "reason": result.reason,
                "input": result.input_qp.to_json() if result.input_qp else None,
                "output": result.output_qp.to_json() if result.output_qp else "float",
                "weight_scale_min": min(result.weight_scales) if result.weight_scales else None,
                "weight_scale_max": max(result.weight_scales) if result.weight_scales else None,
                "weight_sqnr_db": finite(result.weight_sqnr_db)
                if result.weight_sqnr_db is not None else None,
                "weight_rounding": result.rounding or None,
                "weights": result.weights,
                "weight_bits": result.weight_bits,
                "fused": list(result.fused),
                "error_vs_fp32": err.to_json() if err else None,
                **({"palette": list(result.palette)} if result.palette else {}),
            })
        outputs = [{"name": spec.name, **err.to_json()}
                   for spec, err in zip(model.outputs, output_errs) if err is not None]
        return cls(config.method, activations, config.per_channel, samples, rows, outputs,
                   [t.to_json() for t in tables])

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "activations": self.activations,
                "weights": "per-channel" if self.per_channel else "per-tensor",
                "calibration_samples": self.samples, "layers": self.rows,
                "tables": self.tables, "outputs": self.outputs,
                **({"reconstruction": self.reconstruction} if self.reconstruction else {})}

    def save(self, directory: Path) -> Path:
        path = Path(directory) / REPORT_FILE
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    def summary(self) -> str:
        int8 = sum(1 for r in self.rows if r["precision"].startswith("int8"))
        four = sum(1 for r in self.rows if r["precision"].startswith(("int4", "lut4")))
        if self.method.startswith("none ("):
            mode = self.method[len("none ("):-1]
            head = (f"{mode} int8: {int8 + four} of {len(self.rows)} layers with int8 weights "
                    f"({'per-channel' if self.per_channel else 'per-tensor'}"
                    + (f"; {four} of them in 4 bits" if four else "") + "), no calibration"
                    + (f", {self.activations} activations quantized at run time"
                       if mode == "dynamic" else ", fp32 arithmetic"))
        elif self.samples:
            wide = sum(1 for r in self.rows if r["precision"] == "int8-a16")
            notes = [f"{wide} of them with 16-bit inputs"] if wide else []
            notes += [f"{four} of them with 4-bit weights"] if four else []
            head = (f"quantized {int8 + four} of {len(self.rows)} layers to int8 "
                    + (f"({', '.join(notes)}) " if notes else "") +
                    f"({self.method} "
                    f"calibration on {self.samples} samples, {self.activations} activations, "
                    f"{'per-channel' if self.per_channel else 'per-tensor'} int8 weights)")
        else:
            head = (f"pre-quantized model: {int8} of {len(self.rows)} layers run in int8"
                    + (f" and {four} with 4-bit weights" if four else "")
                    + " with the model's own scales and weights")
        tables = [f"lookup table {t['lookup']} {t['shape'][0]}x{t['shape'][1]}: "
                  f"{t['precision']}" + (f" (SQNR {t['sqnr_db']:.1f} dB)"
                                         if isinstance(t["sqnr_db"], float) else "")
                  for t in self.tables]
        return "\n".join([head, weights_line(self.rows), *reconstruction_line(self.rows),
                          *tables, *layer_table(self.rows, self.outputs)])


def reconstruction_line(rows: list[dict]) -> list[str]:
    """What reconstruction changed: the refitted layers' output error against fp32 on the
    calibration data (relative to the output), their median before and after."""
    fits = [r["reconstruction"] for r in rows if r.get("reconstruction")]
    pairs = [(f["error_before"], f["error_after"]) for f in fits
             if f["error_before"] is not None and f["error_after"] is not None]
    if not pairs:
        return []
    before, after = (float(np.median(v)) for v in zip(*pairs))
    return [f"reconstruction: {len(fits)} layers refitted on the calibration data; their output "
            f"error (relative to fp32), median {before:.3g} -> {after:.3g}"]


def weights_line(rows: list[dict]) -> str:
    """The layers' weights: how many, their stored size and bits per weight on average."""
    counted = [r for r in rows if r.get("weights") and r.get("weight_bits") is not None]
    total = sum(r["weights"] for r in counted)
    stored = sum(r["weights"] * r["weight_bits"] for r in counted) / 8
    if not total:
        return "layer weights: none"
    return (f"layer weights: {total:,}, stored in {_size(stored)}, {8 * stored / total:.2f} "
            f"bits each on average (fp32: {_size(4 * total)})")


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


def layer_table(rows: list[dict], outputs: list[dict], width: int = 28) -> list[str]:
    """The report's rows (as saved in quantization.json) as a table: per layer its op,
    precision, bits stored per weight, output type, error against fp32 and why it is not int8;
    then each output's."""
    lines = [f"{'layer':<{width}} {'op':<7} {'precision':<16} {'bits':>5} {'out':<6} "
             f"{'SQNR dB':>8} {'cosine':>8}  note"]
    for row in rows:
        err = row.get("error_vs_fp32") or {}
        sqnr = err.get("sqnr_db", "")
        sqnr = f"{sqnr:8.1f}" if isinstance(sqnr, (int, float)) else f"{sqnr:>8}"
        cosine = f"{err['cosine']:8.5f}" if err else f"{'':>8}"
        out = "float" if row["output"] == "float" else row["output"]["dtype"]
        bits = row.get("weight_bits")
        bits = f"{bits:5.2f}" if isinstance(bits, (int, float)) else f"{'':>5}"
        lines.append(f"{row['layer'][:width]:<{width}} {row['op']:<7} {row['precision']:<16} "
                     f"{bits} {out:<6} {sqnr} {cosine}  {row.get('reason') or ''}".rstrip())
    for out in outputs:
        sqnr = out["sqnr_db"]
        sqnr = f"{sqnr:.1f}" if isinstance(sqnr, (int, float)) else sqnr
        lines.append(f"output {out['name']}: SQNR {sqnr} dB, cosine {out['cosine']:.5f} "
                     "against fp32")
    return lines
