"""Compile a decoder with a KV cache: the model's symbolic sequence lengths kept, its cache in
place (kv_cache.py), and these functions on the same caches and weights:

    main          any number of new tokens after `past` cached ones (the answer, one per
                  call)
    prefill       exactly --prefill-chunk tokens (a prompt's whole chunks), its kernels
                  compiled for that many rows; the logits of the chunk's last position only
    prefill_tail  the same for a quarter of the chunk (a prompt's last tokens; fewer are fed
                  from earlier, cached, tokens on: generate.py)

The decoder is found by its interface (the common export: input_ids, attention_mask,
position_ids, past_key_values.N.key/value -> logits, present.N.key/value). Its named
dimensions are set: batch 1, the new tokens a symbol `tokens` (or the chunk's size), the past
length a symbol `past`. Our default CPU schedules compile a kernel for any `tokens` without
tiling it into rows (one token would pay for a tile of eight); the chunk's kernels are tiled.
The model is imported and quantized once per function; the library stores equal weights once.
decoder.json beside the library records the caches it expects.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import InputError, ModelError
from .text import copy_text_files

log = logging.getLogger(__name__)

DECODER_FILE = "decoder.json"
PAST, TOKENS = "past", "tokens"  # the symbols of the compiled function's lengths
PREFILL = "prefill"  # the function that takes a prompt's chunk of a fixed length
PREFILL_TAIL = "prefill_tail"  # the same for a prompt's last tokens, a shorter fixed length
TAIL_PART = 4  # the tail function takes 1/TAIL_PART of the chunk's tokens
NO_CALIBRATION = ("--quantize {quantize} calibrates the activations' ranges, which qcompile "
                  "does not do for decoders (one static range per tensor does not hold a "
                  "language model's outliers): use the model's own 4-bit weights (W4A16, "
                  "the default), int8-dynamic (int8 inputs quantized at run time per token; "
                  "W4A8 on 4-bit weights), int8-weights, fp16 or fp32. On a float model, "
                  "--weight-bits 4 makes 4-bit weights, and --calibration TEXT rounds them by "
                  "GPTQ.")
ROUNDING_ONLY = ("--calibration on a decoder rounds the weights that qcompile quantizes, by "
                 "GPTQ: add --quantize int8-dynamic or int8-weights (with --weight-bits 4 for "
                 "4-bit weights), or leave out --calibration.")


@dataclass(frozen=True)
class DecoderInfo:
    """What a caller needs to run the compiled decoder: written to OUT_DIR/decoder.json."""

    max_context: int
    prefill_chunk: int       # tokens per call of "prefill" (0: no such function)
    caches: list             # input names, in the order the function takes them
    cache_shape: list        # [1, kv_heads, max_context, head_dim]
    cache_dtype: str
    vocabulary: int
    tail_chunk: int = 0      # tokens per call of "prefill_tail" (0: no such function)

    def save(self, directory: Path) -> None:
        (directory / DECODER_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def open(cls, directory: str | Path) -> "DecoderInfo":
        path = Path(directory) / DECODER_FILE
        if not path.is_file():
            raise ModelError(f"'{directory}' holds no compiled decoder (no {DECODER_FILE}). "
                             "Compile the language model with `qcompile compile MODEL "
                             "--max-context N`.")
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:  # not JSON, or not these fields
            raise ModelError(f"'{path}' is not a decoder description this qcompile reads "
                             f"({exc}). Compile the model again.") from None


def find_layout(model):
    """The KV cache layout (kv_cache.CacheLayout) of an ONNX decoder, or a ModelError that
    says which part of the common export layout is missing."""
    from ..frontend import graph_inputs
    from .kv_cache import CacheLayout

    inputs = {i.name: i for i in graph_inputs(model)}
    outputs = [o.name for o in model.graph.output]
    past = tuple(n for n in inputs if n.startswith("past_key_values."))
    present = tuple(n.replace("past_key_values.", "present.", 1) for n in past)
    missing = [n for n in ("input_ids",) if n not in inputs] + \
        [n for n in ("logits", *present) if n not in outputs]
    extra = [n for n in inputs if n not in ("input_ids", "attention_mask", "position_ids")
             and n not in past]
    if not past or missing or extra:
        why = ("it has no past_key_values.N.key/value inputs" if not past else
               f"it lacks {', '.join(missing)}" if missing else
               f"it has inputs qcompile does not fill in ({', '.join(extra)})")
        raise ModelError(f"The model is not a decoder in the common export layout: {why}. "
                         "--max-context compiles a decoder with inputs input_ids, "
                         "attention_mask, position_ids and past_key_values.N.key/value, and "
                         "outputs logits and present.N.key/value (Optimum's or onnxruntime-"
                         "genai's export). Compile other models without --max-context.")
    dims = [inputs[n].type.tensor_type.shape.dim for n in past]
    shapes = {tuple(d.dim_value if d.dim_value else d.dim_param for d in dim) for dim in dims}
    elem = {inputs[n].type.tensor_type.elem_type for n in past}
    shape = next(iter(shapes))
    if len(shapes) != 1 or len(elem) != 1 or len(shape) != 4 or \
            not all(isinstance(v, int) and v > 0 for v in shape[1::2]):
        raise ModelError("The model's past_key_values inputs do not all have one shape "
                         "[batch, kv_heads, past, head_dim] with kv_heads and head_dim fixed, "
                         "so qcompile cannot allocate their cache.")
    import onnx

    dtype = str(onnx.helper.tensor_dtype_to_np_dtype(elem.pop()))
    return CacheLayout(past=past, present=present, heads=shape[1], head_dim=shape[3],
                       dtype=dtype), shape[2]


def import_decoder(path, tokens: int | None = None, loaded=None):
    """The FloatModel of the decoder at `path` with the past length symbolic and the new
    tokens' too (or `tokens` of them), and its cache layout. `loaded`: the file as
    frontend.load_onnx read it, to import it again without reading it again."""
    from ..frontend import graph_inputs, import_onnx, load_onnx

    model = load_onnx(path) if loaded is None else loaded
    layout, past_dim = find_layout(model)
    dims = {}
    for inp in graph_inputs(model):
        shape = inp.type.tensor_type.shape.dim
        named = [d.dim_param for d in shape]
        if inp.name == "input_ids" and len(shape) == 2:
            dims.update({named[0]: 1, named[1]: TOKENS if tokens is None else tokens})
    if not isinstance(past_dim, str) or not past_dim:
        raise ModelError("The model's past_key_values inputs have a fixed length; qcompile "
                         "keeps the cache in place only for a past length named in the model "
                         "(a symbolic dimension).")
    dims[past_dim] = PAST
    for inp in graph_inputs(model):
        if inp.name == "attention_mask":
            total = inp.type.tensor_type.shape.dim[1].dim_param
            if total:
                dims[total] = f"{PAST} + {TOKENS if tokens is None else tokens}"
        for dim in inp.type.tensor_type.shape.dim:
            if dim.dim_param and dim.dim_param not in dims and dim.dim_param.startswith("batch"):
                dims[dim.dim_param] = 1
    return import_onnx(path, dims=dims, loaded=model), layout


def decoder_module(quantized, layout, max_context: int):
    """The quantized model's module with the cache in place."""
    from .kv_cache import cache_in_place

    main = quantized.mod["main"]
    names = [s.name for s in quantized.inputs]
    past_var = main.params[names.index(layout.past[0])].ty.shape.values[2]
    tokens_var = main.params[names.index("input_ids")].ty.shape.values[1]
    return cache_in_place(quantized.mod, layout, names, [s.name for s in quantized.outputs],
                          max_context, tokens_var, past_var)


def with_function(mod, other, name: str):
    """`mod` with `other`'s main added as `name`, and the kernels it calls added under names
    that do not collide with `mod`'s (a kernel equal to one of `mod`'s is added once)."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder(mod)
    renamed = {gvar: bb.add_func(func, f"{name}_{gvar.name_hint}")
               for gvar, func in other.functions.items() if isinstance(func, tvm.tirx.PrimFunc)}

    @relax.expr_functor.mutator
    class Rename(relax.PyExprMutator):
        def visit_global_var_(self, gvar):
            return renamed.get(gvar, gvar)

    main = Rename().visit_expr(other["main"])
    bb.add_func(main.with_attr("global_symbol", name), name)
    return bb.get()


def last_position_only(graph, tokens: int):
    """The chunk function's FloatModel `graph` with its logits at the last position only
    (last_position.py), when its output projection is found."""
    from ..specs import TensorSpec
    from .last_position import last_position_logits

    names = [s.name for s in graph.outputs]
    mod = last_position_logits(graph.mod, tokens, names.index("logits"))
    if mod is graph.mod:
        return graph
    outputs = tuple(TensorSpec(s.name, (*s.shape[:-2], 1, s.shape[-1]), s.dtype)
                    if s.name == "logits" else s for s in graph.outputs)
    return replace(graph, mod=mod, outputs=outputs)


def rounded_on(mode, calibration, model, graph, layout, target):
    """`mode` (DynamicInt8, WeightOnlyInt8) with the moments GPTQ rounds the weights with,
    collected once on `calibration` (text files, an .npz of the inputs, or feeds) through the
    any-length function's `graph` (import_decoder's, with its cache `layout`); both
    functions' weights are rounded with them."""
    from ..modes import DynamicInt8, WeightOnlyInt8
    from ..quantize.hessians import weight_moments
    from ..tvm_noise import quiet
    from .calibration import text_samples

    if not isinstance(mode, (DynamicInt8, WeightOnlyInt8)):
        raise InputError(ROUNDING_ONLY)
    samples = calibration
    if isinstance(calibration, (str, Path)) and not str(calibration).endswith(".npz"):
        samples = text_samples(calibration, model, graph.inputs, layout)
    kind = "dynamic" if isinstance(mode, DynamicInt8) else "weight-only"
    with quiet():  # building the float model for the samples prints TVM's take warning
        moments = weight_moments(graph, kind, mode.config, target, samples)
    return replace(mode, calibration=moments)


def compile_decoder(model, target="host", out_dir="build", *, max_context: int = 512,
                    prefill_chunk: int = 32, quantize=None, calibration=None,
                    cc: str | None = None):
    """Compile the ONNX decoder at `model` into OUT_DIR (model.so, model.json, decoder.json):
    "main" takes any number of new tokens after `past` cached ones (the answer, one at a
    time), "prefill" exactly `prefill_chunk` (a prompt's chunks: its kernels are compiled for
    that many rows; 0 leaves it out); caches of `max_context` positions. `quantize`: None (a
    4-bit model keeps its codes, W4A16; a float model stays float), a mode or its name
    without calibration: "fp32", "fp16", "int8-weights", "int8-dynamic" (W4A8 on 4-bit
    weights). `calibration` (text files, with those two): the weights qcompile quantizes are
    rounded by GPTQ on it. Equal weights of the two functions are stored once."""
    from ..build import build
    from ..frontend import load_onnx
    from ..modes import NEEDS_CALIBRATION, DynamicInt8, Mode, apply, mode_from
    from ..paths import check_out_dir
    from ..quantize import QuantizedModel
    from ..specs import TensorSpec
    from ..targets import load_target
    from ..tvm_noise import quiet

    if max_context < 2:
        raise InputError(f"--max-context {max_context} is too small: give the number of "
                         "tokens (prompt and answer) the cache holds, e.g. 512.")
    if prefill_chunk < 0:
        raise InputError(f"--prefill-chunk {prefill_chunk}: give 0 (no prompt function) or "
                         "the tokens per call of the prompt's function, e.g. 32.")
    prefill_chunk = min(prefill_chunk, max_context)
    name = getattr(quantize, "name", quantize)  # a Mode, or its name
    if name in NEEDS_CALIBRATION:
        raise InputError(NO_CALIBRATION.format(quantize=name))
    resolved = load_target(target).with_compiler(cc)
    check_out_dir(out_dir)
    mode = quantize if isinstance(quantize, Mode) else mode_from(quantize)
    if isinstance(mode, DynamicInt8):  # a few input channels dwarf the rest: scale per group
        mode = replace(mode, config=replace(mode.config, input_groups=True))

    loaded = load_onnx(model)  # read once, imported once per function
    graph, layout = import_decoder(model, None, loaded)  # the any-length function's
    if calibration is not None:
        mode = rounded_on(mode, calibration, model, graph, layout, resolved)

    def decoder(graph, layout):
        with quiet():  # folding the position tables' Gathers prints TVM's take warning
            built = apply(mode, graph, resolved)
        return built, decoder_module(built, layout, max_context)

    built, mod = decoder(graph, layout)
    tail_chunk = prefill_chunk // TAIL_PART if prefill_chunk // TAIL_PART > 1 else 0
    for name, rows in ((PREFILL, prefill_chunk), (PREFILL_TAIL, tail_chunk)):
        if rows > 1:
            log.info("the prompt's function %s, for %d tokens a call", name, rows)
            chunk, chunk_layout = import_decoder(model, rows, loaded)
            mod = with_function(mod, decoder(last_position_only(chunk, rows),
                                             chunk_layout)[1], name)
    cache_shape = [1, layout.heads, max_context, layout.head_dim]
    vocabulary = int(next(s for s in built.outputs if s.name == "logits").shape[-1])
    interface = replace(built, mod=mod,
                        inputs=(TensorSpec("input_ids", (1, TOKENS), "int64"),
                                *(TensorSpec(n, tuple(cache_shape), layout.dtype)
                                  for n in layout.past)),
                        outputs=(TensorSpec("logits", (1, TOKENS, vocabulary), "float32"),))
    info = DecoderInfo(max_context=max_context,
                       prefill_chunk=prefill_chunk if prefill_chunk > 1 else 0,
                       caches=list(layout.past), cache_shape=cache_shape,
                       cache_dtype=layout.dtype, vocabulary=vocabulary,
                       tail_chunk=tail_chunk)
    report = built.report if isinstance(built, QuantizedModel) else None

    def extras(directory: Path) -> None:
        info.save(directory)
        found = copy_text_files(model, directory)
        log.info("tokenizer and generation settings: %s", ", ".join(found) or
                 "none beside the model (qcompile generate needs tokenizer.json)")
        if report is not None:
            report.save(directory)

    return build(interface, resolved, out_dir, extras=extras), info
