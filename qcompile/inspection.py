"""`qcompile inspect`: a model's layers, or what a compile made of them, as text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from .errors import InputError


def inspect_path(path: str | Path, input_shapes: Mapping[str, Sequence[int]] | None = None,
                 ) -> str:
    path = Path(path)
    if path.is_dir():
        return inspect_build(path)
    if path.suffix == ".onnx" and path.is_file():
        return inspect_model(path, input_shapes)
    raise InputError(f"'{path}' is neither an .onnx model nor a directory written by "
                     "`qcompile compile -o`.")


def inspect_model(path: Path, input_shapes=None) -> str:
    """Each weighted layer of an ONNX model: the names precision rules use."""
    from .constant_sizes import check_constant_sizes
    from .frontend import load_onnx, resolve_input_shapes, simplify
    from .quantize.onnx_view import weighted_layers

    model = load_onnx(path)
    shapes = resolve_input_shapes(model, input_shapes)
    check_constant_sizes(model, shapes, path)
    model = simplify(model, shapes)
    layers = weighted_layers(model)
    total = sum(l.macs for l in layers) or 1
    lines = [f"{path.name}: {len(layers)} weighted layers, {total / 1e6:.1f} M MACs",
             f"{'#':>3} {'layer':<36} {'op':<7} {'weight':<18} {'output':<20} {'MACs':>8} "
             f"{'share':>6}"]
    for i, l in enumerate(layers):
        lines.append(f"{i:>3} {l.name[:36]:<36} {l.op:<7} {_dims(l.weight_shape):<18} "
                     f"{_dims(l.output_shape):<20} {l.macs / 1e6:7.2f}M "
                     f"{l.macs / total:6.1%}")
    return "\n".join(lines)


def _read_json(path: Path, fix: str) -> dict:
    """A JSON object file written by compile, or an InputError naming it (cut short, edited)."""
    try:
        value = json.loads(path.read_bytes())
    except ValueError as exc:  # also UnicodeDecodeError
        raise InputError(f"'{path}' is not valid JSON ({exc}): it was cut short or damaged. "
                         f"{fix}.") from None
    if not isinstance(value, dict):
        raise InputError(f"'{path}' is not what `qcompile compile` writes (a JSON object). "
                         f"{fix}.")
    return value


def _us(value) -> str:
    return f"{value:8.1f}" if isinstance(value, (int, float)) else f"{'-':>8}"


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else "?"


def inspect_build(directory: Path) -> str:
    """Per layer of a compiled model: precision, error against fp32, why not int8; and the
    precision search's table when --quantize auto chose the mix."""
    try:
        return _inspect_build(directory)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:  # valid JSON, other fields
        raise InputError(f"{directory} holds a model.json, quantization.json or search.json "
                         f"that qcompile cannot read ({type(exc).__name__}: {exc}): edited, or "
                         "written by another version. Compile again into this "
                         "directory.") from None


def _inspect_build(directory: Path) -> str:
    manifest = directory / "model.json"
    if not manifest.is_file():
        raise InputError(f"{directory} has no model.json: is it a `qcompile compile -o` "
                         "directory?")
    meta = _read_json(manifest, "Compile again into this directory")
    source = meta.get("source")
    source = source.get("model", source) if isinstance(source, dict) else source
    target = meta.get("target")
    target = target.get("name", "?") if isinstance(target, dict) else target
    lines = [f"{directory}: {source or '?'} for target {target or '?'}, "
             f"{meta.get('library', {}).get('bytes', 0) / 1e6:.1f} MB library"]
    report_path = directory / "quantization.json"
    if report_path.is_file():
        from .quantize.report import layer_table, weights_line

        report = _read_json(report_path, "Compile again into this directory, or delete it")
        lines.append(f"quantization: {report['method']} calibration, {report['activations']} "
                     f"activations, {report['weights']} weights, "
                     f"{report['calibration_samples']} samples")
        lines.append(weights_line(report["layers"]))
        lines.extend(layer_table(report["layers"], report.get("outputs", []), width=36))
    else:
        layers = meta.get("layers", [])
        lines.append(f"{'layer':<36} {'op':<7} precision")
        lines.extend(f"{l['name'][:36]:<36} {l['op']:<7} {l['precision']}" for l in layers)
    search_path = directory / "search.json"
    if search_path.is_file():
        from .quantize.search import SLOWER_IN_INT8_KEY, weights_note

        search = _read_json(search_path, "Compile again into this directory, or delete it")
        kept = {k["layer"]: k["precision"] for k in search["kept_in_higher_precision"]}
        slow = {k["layer"]: f"{k['precision']} (int8 slower)"
                for k in search.get(SLOWER_IN_INT8_KEY,
                                    search.get("kept_because_int8_is_not_faster", []))}
        fallback = search.get("fallback_precision", "fp32")
        lines.append("")
        lines.append(f"precision search: {search['metric']} budget {search['budget']}; all "
                     f"int8 {search['all_int8_estimate']:.4f} (simulated), chosen "
                     f"{search['chosen_estimate']:.4f} (simulated)" +
                     (f", {search['verified']:.4f} compiled" if search.get("verified")
                      is not None else ""))
        where = search.get("latency_measured_on")
        lines.append(f"{len(kept)} layer(s) in higher precision for accuracy, {len(slow)} "
                     "because int8 is slower" +
                     (f" (timed on {where})" if where else " (layers not timed)") +
                     f"; {search['int8_mac_fraction']:.1%} of MACs in int8"
                     + weights_note(search["int8_mac_fraction"],
                                    search.get("int8_weight_mac_fraction")) +
                     f"; {search['evaluations']} evaluations in {search['seconds']} s")
        lines.append(f"{'layer':<36} {'MACs':>8} {'alone dB':>9} {'fallback dB':>11} "
                     f"{'int8 us':>8} {fallback + ' us':>8}  chosen")
        for row in sorted(search["sensitivity"], key=lambda r: float(r["alone_sqnr_db"])):
            lines.append(f"{row['layer'][:36]:<36} {row['macs'] / 1e6:7.2f}M "
                         f"{float(row['alone_sqnr_db']):9.1f} "
                         f"{float(row['fallback_sqnr_db']):11.2f} "
                         f"{_us(row.get('int8_us'))} {_us(row.get('fallback_us'))}  "
                         f"{slow.get(row['layer']) or kept.get(row['layer'], 'int8')}")
    return "\n".join(lines)
