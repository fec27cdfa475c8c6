"""The realizer's op handlers, one module per op family; importing this registers them all.

    linear       conv2d, matmul: the layer's scheme emits it (schemes/)
    elementwise  add; relu, max/min, clip as integer clamps
    pooling      mean, average and max pooling
    shape        reshapes (integers unchanged), concat
    qdq          a pre-quantized model's quantize/dequantize
    tables       constant lookup tables (embeddings) in int8

Node kinds without a handler (softmax, layer norm, ...) run in float (registry.handle_float).
"""

from __future__ import annotations

from . import elementwise, linear, pooling, qdq, shape, tables  # noqa: F401  (they register)
from .registry import HANDLERS, handle_float

__all__ = ["HANDLERS", "handle_float"]
