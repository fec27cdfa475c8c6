"""Read a legacy (non-zip, torch < 1.6) PyTorch checkpoint into numpy arrays, without torch.

The legacy format is a sequence of pickles: a magic number, a protocol version, system info,
the object itself (tensors refer to storages by key through pickle's persistent ids), the list of
storage keys, then each storage's raw bytes preceded by its element count (int64, little
endian). Tensors are rebuilt with their offset, shape and strides (ported TF weights are often
not contiguous).
"""

from __future__ import annotations

import collections
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _TensorRef:
    def __init__(self, storage, offset, shape, strides, *_unused):
        _, self.storage_type, self.storage_key = storage[:3]
        self.offset, self.shape, self.strides = offset, tuple(shape), tuple(strides)


class _Unpickler(pickle.Unpickler):
    """Allows only what a state dict needs: tensors, storages, OrderedDict."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _TensorRef
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in checkpoint")

    def persistent_load(self, pid):
        return pid  # ('storage', storage_type, key, location, numel, view_metadata)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """{parameter name: array} from a legacy torch checkpoint holding a state dict."""
    with open(path, "rb") as f:  # every pickle through _Unpickler: no global but a tensor's
        if _Unpickler(f).load() != _MAGIC:
            raise ValueError(f"{path} is not a legacy PyTorch checkpoint")
        _Unpickler(f).load()  # protocol version
        _Unpickler(f).load()  # system info
        state = _Unpickler(f).load()
        keys = _Unpickler(f).load()
        dtypes = {ref.storage_key: np.dtype(_STORAGE_DTYPES[ref.storage_type])
                  for ref in state.values() if isinstance(ref, _TensorRef)}
        storages = {}
        for key in keys:  # every storage of a state dict belongs to one of its tensors
            (count,) = struct.unpack("<q", f.read(8))
            dtype = dtypes[key]
            storages[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype)
    return {name: _materialize(ref, storages[ref.storage_key])
            for name, ref in state.items() if isinstance(ref, _TensorRef)}


def _materialize(ref: _TensorRef, storage: np.ndarray) -> np.ndarray:
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset:], shape=ref.shape, strides=[s * itemsize for s in ref.strides])
    return np.array(view)  # contiguous copy
