"""TVM's runtime libraries for a device's architecture: libtvm_runtime.so and libtvm_ffi.so from
the PyPI wheels of the TVM version that compiled the model. This machine's come from the
installed packages; another architecture's (aarch64) from its wheels, downloaded once with pip
and cached (~/.cache/qcompile/runtime, as the emulator's userland). PyPI has no runtime for
32-bit ARM or Android: those are built from TVM's sources and given with --runtime-dir.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import DeviceError, ToolchainError
from ..targets import host_arch

RUNTIME_LIBRARIES = ("libtvm_runtime.so", "libtvm_ffi.so")
# wheel member of each library
MEMBERS = {"libtvm_runtime.so": "tvm/lib/libtvm_runtime.so",
           "libtvm_ffi.so": "tvm_ffi/lib/libtvm_ffi.so"}
WHEEL_PLATFORMS = {"aarch64": "manylinux_2_28_aarch64", "x86_64": "manylinux_2_28_x86_64"}
RUNTIME_DIR_ADVICE = ("Build TVM's runtime for it (cmake with the device's compiler: "
                      "docs/guide/devices.md) and pass the directory holding "
                      "libtvm_runtime.so and libtvm_ffi.so with --runtime-dir.")


def _installed() -> list[Path]:
    import tvm
    import tvm_ffi

    found = [Path(tvm.__file__).resolve().parent / "lib" / "libtvm_runtime.so",
             Path(tvm_ffi.__file__).resolve().parent / "lib" / "libtvm_ffi.so"]
    missing = [str(p) for p in found if not p.is_file()]
    if missing:
        raise ToolchainError(f"The installed TVM has no {', '.join(missing)}: reinstall "
                             "apache-tvm and apache-tvm-ffi.")
    return found


def _cache_dir() -> Path:
    from ..devices.emulator import cache_dir

    return cache_dir() / "runtime"


def _downloaded(arch: str, versions: dict[str, str]) -> list[Path]:
    tvm, ffi = versions.get("tvm"), _ffi_version()
    directory = _cache_dir() / f"{arch}-tvm{tvm}-ffi{ffi}"
    found = [directory / name for name in RUNTIME_LIBRARIES]
    if all(p.is_file() for p in found):
        return found
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                   "--disable-pip-version-check", "--only-binary=:all:",
                   "--platform", WHEEL_PLATFORMS[arch], "--python-version", "3.11",
                   "--implementation", "cp", "--abi", "cp311", "-d", work,
                   f"apache-tvm=={tvm}", f"apache-tvm-ffi=={ffi}"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise DeviceError(f"Could not download the {arch} wheels of apache-tvm {tvm} and "
                              f"apache-tvm-ffi {ffi} for their runtime libraries: "
                              f"{(done.stderr.strip().splitlines() or ['?'])[-1]}. Check the "
                              "network to PyPI, or pass --runtime-dir.")
        staging = Path(tempfile.mkdtemp(prefix=".runtime-", dir=_ensure(directory.parent)))
        try:
            for wheel in Path(work).glob("*.whl"):
                with zipfile.ZipFile(wheel) as archive:
                    for name, member in MEMBERS.items():
                        if member in archive.namelist():
                            with archive.open(member) as src, open(staging / name, "wb") as dst:
                                shutil.copyfileobj(src, dst)
            missing = [name for name in RUNTIME_LIBRARIES if not (staging / name).is_file()]
            if missing:
                raise DeviceError(f"The {arch} wheels hold no {', '.join(missing)}.")
            if directory.exists():
                shutil.rmtree(directory)
            staging.rename(directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return found


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ffi_version() -> str:
    from importlib import metadata

    return metadata.version("apache-tvm-ffi")


def runtime_libraries(arch: str, versions: dict[str, str],
                      runtime_dir: str | Path | None = None) -> list[Path]:
    """libtvm_runtime.so and libtvm_ffi.so for `arch` (paths), from `runtime_dir` when given.
    The model must come from the installed TVM (`versions`: the manifest's)."""
    if runtime_dir is not None:
        found = [Path(runtime_dir) / name for name in RUNTIME_LIBRARIES]
        missing = [str(p) for p in found if not p.is_file()]
        if missing:
            raise DeviceError(f"--runtime-dir {runtime_dir} has no {', '.join(missing)}.")
        return found
    import tvm

    if versions.get("tvm") != tvm.__version__:
        raise DeviceError(f"The model was compiled by TVM {versions.get('tvm')}, and this "
                          f"machine has TVM {tvm.__version__}: compile it again here, or pass "
                          "the runtime of its TVM version with --runtime-dir.")
    machine = host_arch()
    if arch == machine:
        return _installed()
    if arch not in WHEEL_PLATFORMS:
        raise DeviceError(f"PyPI has no TVM runtime for {arch}. " + RUNTIME_DIR_ADVICE)
    return _downloaded(arch, versions)


__all__ = ["RUNTIME_LIBRARIES", "runtime_libraries"]
