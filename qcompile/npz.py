"""Reading the user's .npz files (--calibration, --validation, `run --inputs`) without trusting
them: a file that is not a zip, a member that is not an .npy array, a pickled object array, or a
header that claims more data than the member holds is an InputError naming the file and the
array; every header is read, and checked by the caller, before any array's data is.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import InputError

# (array name, shape, dtype) -> None, or raises InputError: checks a header before its data
HeaderCheck = Callable[[str, tuple, np.dtype], None]


def read_npz(path: str | Path, save_hint: str,
             check: HeaderCheck | None = None) -> dict[str, np.ndarray]:
    """{array name: array} of the .npz at `path`. save_hint: how to write a good one (e.g.
    "numpy.savez(path, x=samples)"), for the messages."""
    path = Path(path)
    damaged = f"Save it again with {save_hint}."
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            headers = {}
            for member in members:
                headers[member.filename] = _header(archive, member, path, damaged)
            for member in members:
                name = member.filename[:-len(".npy")]
                shape, dtype, _ = headers[member.filename]
                if check is not None:
                    check(name, shape, dtype)
            arrays = {}
            for member in members:
                name = member.filename[:-len(".npy")]
                with archive.open(member) as f:
                    arrays[name] = np.lib.format.read_array(f, allow_pickle=False)
            return arrays
    except InputError:
        raise
    except MemoryError:
        raise InputError(f"'{path}' holds more data than fits in this machine's memory. "
                         "Pass fewer or smaller arrays.") from None
    except IsADirectoryError:
        raise InputError(f"'{path}' is a directory, not an .npz file. {damaged}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as exc:
        raise InputError(f"'{path}' is not an .npz file, or it is damaged ({exc}). "
                         f"{damaged}") from None


def _header(archive: zipfile.ZipFile, member: zipfile.ZipInfo, path: Path,
            damaged: str) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, data bytes) of an .npy member, read from its header alone."""
    if not member.filename.endswith(".npy"):
        raise InputError(f"'{path}' holds '{member.filename}', which is not a numpy array "
                         f"(.npy); an .npz holds only arrays. {damaged}")
    with archive.open(member) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError as exc:
            raise InputError(f"Array '{member.filename[:-4]}' in '{path}' is not a numpy array "
                             f"({exc}). {damaged}") from None
        offset = f.tell()
    if dtype.hasobject:
        raise InputError(f"Array '{member.filename[:-4]}' in '{path}' holds Python objects "
                         "(pickled data), which qcompile never loads. Save numeric arrays.")
    count = int(np.prod(shape, dtype=np.float64))
    size = count * dtype.itemsize
    if offset + size > member.file_size:
        raise InputError(f"Array '{member.filename[:-4]}' in '{path}' claims shape "
                         f"{list(shape)} {dtype} ({_bytes(size)}), but holds "
                         f"{_bytes(member.file_size - offset)}: the file is damaged. {damaged}")
    return tuple(shape), dtype, size


def _bytes(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return ""
