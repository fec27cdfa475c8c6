"""Import stage: an ONNX file -> FloatModel (a Relax IRModule with static shapes).

Real exported models often compute shapes at run time (a Pad whose pads come from the graph,
a Reshape fed by Shape/Gather/Concat) that TVM's importer rejects. The input shapes are fixed
first and the constant subgraphs folded (onnxsim), and every op is checked against TVM's importer
before importing, so that an unsupported op is reported by name and node. The graph is checked
as it is loaded (onnx_checks.py: structure, inputs, weights, node names), and the constants that
folding computes are bounded first (constant_sizes.py).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import io
import logging
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import ModelError, ShapeError, UnsupportedOpError, last_line
from .constant_sizes import check_constant_sizes, check_relax_constants, out_of_memory
from .symbolic_range import symbolic_range
from .onnx_checks import check_model, import_failure
from .relax_main import rewrite_main
from .specs import TensorSpec
from .tvm_noise import quiet
from .squares import squares_to_products

log = logging.getLogger(__name__)

# ONNX ops whose weights make a "layer": the unit of per-layer precision.
LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulInteger",
                       "ConvInteger", "QLinearConv", "QLinearMatMul"})


@dataclass(frozen=True)
class Layer:
    """A weighted op of the model (conv, matmul, gemm) and the precision it runs in. `weight`:
    a key of its constant weight's values (weight_key), by which the layer is found again in
    the imported Relax graph whatever order or layout that has; "" without a constant weight."""

    name: str
    op: str
    precision: str = "fp32"
    weight: str = field(default="", compare=False)

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "op": self.op, "precision": self.precision}


@dataclass(frozen=True)
class FloatModel:
    """The imported model: a Relax module in fp32, its interface and its layers."""

    mod: Any  # tvm.IRModule
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    layers: tuple[Layer, ...]
    onnx: Any = field(repr=False)  # the simplified onnx.ModelProto, static shapes
    source: str = ""
    sha256: str = ""
    weight_codes: Any = None  # qdq.WeightCodes when the model arrived quantized (QDQ, 4-bit)

    @property
    def prequantized(self) -> bool:
        return self.weight_codes is not None

    @property
    def four_bit_only(self) -> bool:
        """Arrived with 4-bit weights and nothing else quantized (no int8 weight, no
        QuantizeLinear): calibration may still quantize the rest."""
        codes = self.weight_codes
        return codes is not None and bool(codes.groups) and not codes.entries and \
            not any(node.op_type == "QuantizeLinear" for node in self.onnx.graph.node)


def load_onnx(path: str | Path):
    """Read an ONNX file, with an error that says what is wrong with it; checked
    (onnx_checks.check_model): its nodes sorted and uniquely named."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Model file '{path}' does not exist. Pass the path of an .onnx file.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, onnx raises several others
        raise ModelError(f"'{path}' is not an ONNX model ({type(exc).__name__}: {exc}). qcompile "
                         "reads ONNX files; export the model to ONNX first (e.g. "
                         "torch.onnx.export or tf2onnx).") from None
    if not model.graph.node:
        raise ModelError(f"'{path}' holds no ONNX graph (no nodes). Is it really an .onnx file?")
    _load_external_data(model, path)
    check_model(model, path)
    return model


def _load_external_data(model, path: Path) -> None:
    """The weights kept in files beside the model; onnx refuses locations outside its folder."""
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if location and not Path(location).is_absolute() and ".." not in Path(location).parts \
                and not (path.parent / location).exists():
            raise ModelError(f"'{path}' keeps weight '{tensor.name}' in the file '{location}', "
                             f"which is not in {path.parent.resolve()}: put '{location}' (written "
                             "by the export next to the .onnx) beside the model.")
    try:
        load_external_data_for_model(model, str(path.parent))
    except Exception as exc:  # onnx raises ValueError, OSError and its ValidationError
        raise ModelError(f"'{path}' keeps weights in external data that cannot be read "
                         f"({type(exc).__name__}: {exc}). Keep the data files in the model's "
                         "folder, under the names the model gives.") from None


def graph_inputs(model) -> list:
    """The model's real inputs (older exporters also list the initializers as inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _onnx_dtype(value_info) -> str:
    import onnx

    elem = value_info.type.tensor_type.elem_type
    return str(onnx.helper.tensor_dtype_to_np_dtype(elem))


def resolve_input_shapes(model, given: Mapping[str, Sequence[int]] | None) -> dict[str, tuple]:
    """Static shapes for every input: the model's own, completed by `given`."""
    given = dict(given or {})
    inputs = graph_inputs(model)
    names = [i.name for i in inputs]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ShapeError(f"--input-shape names '{unknown[0]}', which is not an input of the "
                         f"model. Its inputs are: {', '.join(names)}.")
    shapes = {}
    for inp in inputs:
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in inp.type.tensor_type.shape.dim]
        empty = [axis for axis, d in enumerate(inp.type.tensor_type.shape.dim)
                 if d.HasField("dim_value") and d.dim_value == 0]
        if empty and inp.name not in given:
            example = ",".join(str(d) if d is not None else "1" for d in dims)
            raise ShapeError(f"Input '{inp.name}' has size 0 on axis {empty[0]} in the model "
                             "(an empty tensor), which cannot be compiled. If the exporter "
                             "meant a size unknown until run time there, give the size with "
                             f"--input-shape {inp.name}:{example}.")
        if inp.name in given:
            shape = tuple(int(d) for d in given[inp.name])
            if len(shape) != len(dims):
                raise ShapeError(f"--input-shape gives input '{inp.name}' {len(shape)} "
                                 f"dimensions, but the model's input has {len(dims)}.")
            for axis, (fixed, new) in enumerate(zip(dims, shape)):
                if fixed is not None and fixed != new:
                    raise ShapeError(f"--input-shape gives input '{inp.name}' size {new} on axis "
                                     f"{axis}, but the model fixes that axis to {fixed}.")
        elif any(d is None for d in dims):
            example = ",".join("N" if d is None else str(d) for d in dims)
            raise ShapeError(f"Input '{inp.name}' has a dynamic shape [{example}] "
                             f"(N = unknown). Give its size with --input-shape "
                             f"{inp.name}:{example.replace('N', '1', 1)} (replace every N).")
        else:
            shape = tuple(dims)
        shapes[inp.name] = shape
    return shapes


def name_dims(model, dims: Mapping[str, int | str]):
    """A copy of `model` whose inputs' named dimensions are set from `dims` (a size, or a
    symbol or expression such as "p + 1"), and the inputs' shapes that result (ints and
    strings). A named dimension that `dims` does not give is an error."""
    import onnx

    named = onnx.ModelProto()
    named.CopyFrom(model)
    shapes = {}
    for inp in graph_inputs(named):
        shape = []
        for axis, dim in enumerate(inp.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value)
                continue
            if dim.dim_param not in dims:
                raise ShapeError(f"Input '{inp.name}' has a dimension '{dim.dim_param}' on axis "
                                 f"{axis} that qcompile cannot size here; it knows "
                                 f"{', '.join(sorted(dims))}.")
            size = dims[dim.dim_param]
            dim.Clear()
            if isinstance(size, int):
                dim.dim_value = size
            else:
                dim.dim_param = size
            shape.append(size)
        shapes[inp.name] = tuple(shape)
    return named, shapes


def simplify(model, shapes: Mapping[str, tuple] | None):
    """Fix the input shapes (None: as the model has them) and fold constant subgraphs
    (onnxsim); the model if that fails."""
    import onnx
    import onnxsim

    try:
        with quiet():  # onnxsim notes every node it cannot fold
            simplified, ok = onnxsim.simplify(
                model, overwrite_input_shapes=dict(shapes) if shapes is not None else None)
        if ok:
            return simplified
        log.warning("onnxsim could not verify the simplified model; importing the original")
    except Exception as exc:  # onnxsim raises whatever onnxruntime or onnx raise
        if out_of_memory(exc):
            raise ModelError(f"Folding the constants of the model ran out of memory "
                             f"({last_line(str(exc), type(exc).__name__)}): a node makes a "
                             "tensor larger than this machine holds. Check the shapes the "
                             "model computes (`qcompile inspect MODEL`), and re-export it.") \
                from None
        log.warning("onnxsim failed (%s); importing the model without simplification", exc)
    if shapes is None:
        return model
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in graph_inputs(fixed):
        for dim, size in zip(inp.type.tensor_type.shape.dim, shapes[inp.name]):
            dim.Clear()
            dim.dim_value = size
    return fixed


def check_ops(model) -> None:
    """Raise UnsupportedOpError naming each op type TVM cannot import and its nodes."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    supported = set(_get_convert_map()) | {"Constant", "If"}
    missing: dict[str, list[str]] = {}
    for index, node in enumerate(model.graph.node):
        domain_ok = node.domain in ("", "ai.onnx")
        if not domain_ok or node.op_type not in supported:
            op = node.op_type if domain_ok else f"{node.domain}.{node.op_type}"
            missing.setdefault(op, []).append(node.name or f"#{index}")
    if missing:
        parts = [f"{op} (node {', '.join(repr(n) for n in nodes[:3])}"
                 f"{' and %d more' % (len(nodes) - 3) if len(nodes) > 3 else ''})"
                 for op, nodes in sorted(missing.items())]
        raise UnsupportedOpError(
            f"TVM's ONNX importer has no converter for: {'; '.join(parts)}. Re-export the model "
            "without these ops (another opset, or decompose them in the exporter), or replace "
            "them with supported ONNX ops before compiling.")


def import_onnx(path: str | Path, input_shapes: Mapping[str, Sequence[int]] | None = None,
                dims: Mapping[str, int | str] | None = None, loaded=None) -> FloatModel:
    """Import an ONNX file into Relax with static input shapes; or, with `dims`, with the
    inputs' named dimensions set by name ({"sequence_length": 1, "past_sequence_length": "p",
    "total_sequence_length": "p + 1"}: a size, or a symbol or expression that stays symbolic
    in the Relax module). `loaded`: the file as load_onnx read it (not changed here), to
    import it again without reading it again."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    import tvm

    from .nbits import fold_nbits, has_nbits
    from .qdq import (WeightCodes, fold_constant_dequantize, integer_ops_to_float, is_qdq,
                      is_qoperator, qoperator_to_qdq)

    path = Path(path)
    original = load_onnx(path) if loaded is None else copy.deepcopy(loaded)
    weight_codes = None
    if is_qoperator(original):  # QLinearConv & co.: the same model in QDQ form
        original, count = qoperator_to_qdq(original)
        log.info("rewrote %d QOperator node(s) (QLinearConv, QLinearMatMul, ...) as QDQ", count)
    original, count = integer_ops_to_float(original)
    if count:
        log.info("rewrote %d ConvInteger node(s) as float Conv on zero-point-centered "
                 "integers", count)
    if is_qdq(original):  # arrives quantized: keep the weights' int8 (or 4-bit) codes
        original, weight_codes = fold_constant_dequantize(original)
    if has_nbits(original):  # MatMulNBits: a float MatMul, its 4-bit codes kept
        weight_codes = WeightCodes() if weight_codes is None else weight_codes
        original, count = fold_nbits(original, weight_codes)
        log.info("read %d MatMulNBits node(s) as MatMul on their 4-bit weights", count)
    if dims is not None:
        original, shapes = name_dims(original, dims)
        model = simplify(original, None)
    else:
        shapes = resolve_input_shapes(original, input_shapes)
        check_constant_sizes(original, shapes, path)
        model = simplify(original, shapes)
    check_ops(model)
    inputs = tuple(TensorSpec(i.name, shapes[i.name], _onnx_dtype(i))
                   for i in graph_inputs(model))
    printed = io.StringIO()  # the importer prints the operator it failed on: in the paragraph
    failure = None
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed), quiet():
        warnings.simplefilter("ignore")  # the ONNX checker's warnings are not ours to show
        try:
            with symbolic_range():
                mod = from_onnx(model, shape_dict=None if dims is not None else
                                {s.name: list(s.shape) for s in inputs},
                                dtype_dict={s.name: s.dtype for s in inputs},
                                keep_params_in_input=False)
        except tvm.error.OpNotImplemented as exc:
            failure = UnsupportedOpError(f"TVM cannot import the model: {exc}")
        except Exception as exc:
            why = last_line(str(exc), type(exc).__name__)
            failure = UnsupportedOpError(import_failure(model, path, why, printed.getvalue(),
                                                        inputs, dynamic=bool(input_shapes)))
        if failure is not None:
            gc.collect()  # the importer's half-built module: TVM warns as it is freed
    if failure is not None:
        raise failure from None
    if printed.getvalue().strip():
        log.debug("TVM's ONNX importer printed: %s", printed.getvalue().strip())
    mod = relax.transform.DecomposeOpsForInference()(mod)
    check_relax_constants(mod, path)
    try:
        with quiet():  # folding a constant Gather prints TVM's take warning
            mod = squares_to_products(clip_calls_to_ops(relax.transform.FoldConstant()(mod)))
    except Exception as exc:  # TVM raises its InternalError for a C++ std::bad_alloc
        if not out_of_memory(exc):
            raise
        raise ModelError(f"Folding the constants of '{path.name}' ran out of memory: a node "
                         "makes a tensor larger than this machine holds. Check the shapes the "
                         "model computes, and re-export it.") from None
    outputs = _output_specs(mod, [o.name for o in model.graph.output], dims is not None)
    return FloatModel(mod=mod, inputs=inputs, outputs=outputs, layers=_layers(model),
                      onnx=model, source=str(path),
                      sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                      weight_codes=weight_codes)


def reimport(model: FloatModel, onnx_model) -> FloatModel:
    """`model` with its ONNX graph replaced by `onnx_model` (a transform's result: refitted
    weights, removed channels; the same inputs and outputs), imported again. The source and
    its checksum stay the original file's."""
    changed = import_onnx(model.source, {s.name: s.shape for s in model.inputs},
                          loaded=onnx_model)
    return replace(changed, onnx=onnx_model, sha256=model.sha256)


_TIR_BOUND = re.compile(r"^(maximum|minimum)\d*$")


def clip_calls_to_ops(mod):
    """TVM's importer turns ONNX Clip into call_tir(maximum/minimum, x, bound) kernels; make
    them R.maximum / R.minimum, which later passes (mixed precision, quantization) know."""
    import tvm
    from tvm import relax

    def bound_op(value):
        if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and
                value.op.name == "relax.call_tir"):
            return None
        callee, args = value.args[0], value.args[1]
        match = _TIR_BOUND.match(getattr(callee, "name_hint", ""))
        fields = list(args.fields) if isinstance(args, relax.Tuple) else []
        if match and len(fields) == 2 and isinstance(fields[1], tvm.ir.expr.GenericConst) \
                and fields[1].value.numpy().size == 1:
            op = relax.op.maximum if match.group(1) == "maximum" else relax.op.minimum
            return op(fields[0], fields[1])
        return None

    rewritten = rewrite_main(mod, bound_op)
    return mod if rewritten is mod else relax.transform.DeadCodeElimination()(rewritten)


def _output_specs(mod, names: list[str], symbolic: bool = False) -> tuple[TensorSpec, ...]:
    import tvm
    from tvm import relax

    ret = mod["main"].ret_ty
    fields = list(ret.fields) if isinstance(ret, tvm.ir.TupleType) else [ret]
    specs = []
    for name, info in zip(names, fields):
        if not isinstance(info, relax.TensorType) or info.shape is None:
            raise ShapeError(f"Output '{name}' has no static shape after import; give every "
                             "dynamic input dimension with --input-shape.")
        try:
            shape = tuple(str(d) if symbolic and not isinstance(getattr(d, "value", None), int)
                          else int(d) for d in info.shape.values)
        except (TypeError, AttributeError):
            raise ShapeError(f"Output '{name}' has a data-dependent shape "
                             f"({info.shape}); qcompile needs static shapes.") from None
        specs.append(TensorSpec(name, shape, str(info.dtype)))
    return tuple(specs)


def weight_key(weight) -> str:
    """A key of a weight's values that layout does not change (a transpose, a reshape): the
    hash of its sorted values."""
    import numpy as np

    values = np.sort(np.asarray(weight, dtype=np.float32).ravel())
    return hashlib.sha1(values.tobytes()).hexdigest()[:16]


def layer_name(node, index: int) -> str:
    """The name a layer goes by in reports and rules: its ONNX node name, or op_index."""
    return node.name or f"{node.op_type}_{index}"


def _layers(model) -> tuple[Layer, ...]:
    from onnx import numpy_helper

    weights = {init.name: init for init in model.graph.initializer}

    def key(node) -> str:
        if len(node.input) < 2 or node.input[1] not in weights:
            return ""
        return weight_key(numpy_helper.to_array(weights[node.input[1]]))

    return tuple(Layer(name=layer_name(node, i), op=node.op_type, weight=key(node))
                 for i, node in enumerate(model.graph.node) if node.op_type in LAYER_OPS)
