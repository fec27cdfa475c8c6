"""The files and directories qcompile writes: checked before any work, written through a
temporary file and os.replace (a kill or a full disk leaves the old file or the new one,
never half of one), and staging directories of killed builds removed.

Builds stage their files in `.qcompile-PID-XXXXXXXX/` beside OUT_DIR (PID: the process that
made it); a build started later removes those whose process is gone.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

from .errors import InputError

STAGING_PREFIX = ".qcompile-"


def _existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of `path` that exists (a file or a directory)."""
    ancestor = path.absolute().parent
    while not ancestor.exists() and not ancestor.is_symlink() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return ancestor


def _probe(directory: Path) -> str | None:
    """Why no file can be made in `directory` (None: one can)."""
    try:
        made = tempfile.mkdtemp(prefix=STAGING_PREFIX + "probe-", dir=directory)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    os.rmdir(made)
    return None


def check_out_dir(out_dir: str | Path, option: str = "-o") -> None:
    """Refuse, before any work, an OUT_DIR that is a file, lies under a file, or whose parent
    cannot be written (the build stages its files there)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"The output directory '{out}' ({option}) is a file, not a directory. "
                         f"Pass {option} a directory (it is created if missing), or move the "
                         "file away.")
    ancestor = _existing_ancestor(out)
    if not ancestor.is_dir():
        raise InputError(f"The output directory '{out}' ({option}) cannot be created: "
                         f"'{ancestor}' is a file, not a directory. Pass {option} a directory "
                         "path.")
    why = _probe(ancestor)
    if why is not None:
        raise InputError(f"The output directory '{out}' ({option}) cannot be written: no file "
                         f"can be created in '{ancestor}' ({why}). Pass {option} a directory "
                         "you can write to.")


def check_output_file(path: str | Path, option: str = "--output") -> None:
    """Refuse, before any work, an output file that is a directory or whose directory is
    missing or cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} '{path}' is a directory: pass a file name, e.g. "
                         f"{path / 'outputs.npz'}.")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise InputError(f"{option} '{path}' cannot be written: '{parent}' is not a directory. "
                         "Pass a file in an existing directory.")
    why = _probe(parent)
    if why is not None:
        raise InputError(f"{option} '{path}' cannot be written: no file can be created in "
                         f"'{parent}' ({why}). Pass a file in a directory you can write to.")


def write_atomically(path: str | Path, data: str | bytes) -> None:
    """Replace `path` with `data` through a temporary file in the same directory."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_outputs(path: str | Path, outputs: Mapping[str, "object"]) -> Path:
    """Save arrays by name as an .npz at exactly `path` (numpy.savez would add '.npz' to a
    name without it); the path written."""
    import io

    import numpy as np

    path = Path(path)
    buffer = io.BytesIO()
    np.savez(buffer, **outputs)
    try:
        write_atomically(path, buffer.getvalue())
    except OSError as exc:
        raise InputError(f"Cannot write the outputs to '{path}' "
                         f"({exc.strerror or type(exc).__name__}). Pass --output a file in a "
                         "directory you can write to.") from None
    return path


def new_staging(parent: Path) -> Path:
    """A new staging directory in `parent`, named after this process."""
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=parent))


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError as exc:  # EPERM: it exists, as another user's
        return exc.errno == errno.ESRCH
    return False


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove the staging directories in `parent` left by builds whose process is gone (a
    SIGKILL); the directories removed. Others' (a build running now) are left alone."""
    removed = []
    for path in Path(parent).glob(f"{STAGING_PREFIX}*-*"):
        pid = path.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or not path.is_dir() or path.is_symlink():
            continue
        if int(pid) != os.getpid() and _process_gone(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


__all__ = ["check_out_dir", "check_output_file", "new_staging", "remove_stale_staging",
           "save_outputs", "write_atomically"]
