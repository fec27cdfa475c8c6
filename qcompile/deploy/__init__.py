"""Deploy without Python: a bundle that the device's TVM runtime runs from C.

    qcompile package OUT_DIR -o BUNDLE [--cc CXX] [--runtime-dir DIR]

BUNDLE/
    model.so, model.json      the compiled model and its manifest (as `compile` wrote them)
    lib/libtvm_runtime.so     TVM's runtime for the device's architecture (from the PyPI wheel
    lib/libtvm_ffi.so         of the TVM version that compiled the model)
    lib/libqcompile.so        qcompile.h's C API (load, inputs, run, outputs, timing)
    bin/qcompile-run          the native runner: `qcompile run` without Python
    include/qcompile.h        the API, and share/example.c: a C program embedding it
    bundle.json               what the bundle holds: architecture, versions, bytes by part

libqcompile.so and qcompile-run are built here from native/ with the target's (cross)
compiler. Nothing in the bundle needs Python; the device needs its libc and libstdc++.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..artifact import LIBRARY_FILE, MANIFEST_FILE, Artifact
from ..errors import DeviceError, ToolchainError
from ..targets import manifest_arch, manifest_kind
from .runtime_libs import RUNTIME_DIR_ADVICE, RUNTIME_LIBRARIES, runtime_libraries

log = logging.getLogger(__name__)

BUNDLE_FILE = "bundle.json"
NATIVE = ("qcompile.h", "qcompile_api.cc", "qcompile_run.cc", "sha256.h", "example.c")


@dataclass(frozen=True)
class Bundle:
    directory: Path
    arch: str
    parts: dict[str, int]  # part -> bytes: model, runtime, api, runner

    @property
    def runner(self) -> Path:
        return self.directory / "bin" / "qcompile-run"

    def describe(self) -> str:
        total = sum(self.parts.values())
        parts = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in self.parts.items())
        return f"bundle {self.directory} for {self.arch}: {total / 1e6:.1f} MB ({parts})"


def native_sources() -> Path:
    """The directory of the C/C++ sources (installed inside the package)."""
    return Path(str(resources.files("qcompile.deploy") / "native"))


def _ffi_include() -> Path:
    import tvm_ffi

    return Path(tvm_ffi.__file__).resolve().parent / "include"


def _compile(cc: str, args: list[str], what: str) -> None:
    command = [cc, *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if "error" in line][:3] or \
            done.stderr.splitlines()[-3:]
        raise ToolchainError(f"Building {what} with '{cc}' failed: {' / '.join(lines)}. Check "
                             "that this compiler builds C++17 for the target's architecture.")


def package(out_dir: str | Path, bundle_dir: str | Path, cc: str | None = None,
            runtime_dir: str | Path | None = None) -> Bundle:
    """Make BUNDLE from a compile's OUT_DIR (see the module docstring). cc: the C++ compiler
    for the device (default: the one that linked model.so, else the host's g++); runtime_dir:
    a directory holding the device's libtvm_runtime.so and libtvm_ffi.so (default: from the
    TVM wheel for its architecture)."""
    artifact = Artifact.open(out_dir)  # the manifest, and model.so checked against it
    target = artifact.manifest.target
    arch = manifest_arch(target)
    if manifest_kind(target) == "opencl" and runtime_dir is None:
        raise DeviceError("The model is an OpenCL (GPU) build, and PyPI's TVM runtime has no "
                          "OpenCL. Build TVM's runtime with USE_OPENCL=ON for the device and "
                          "pass its directory with --runtime-dir.")
    if target.get("os") == "android" and runtime_dir is None:
        raise DeviceError("The model was linked for Android, and PyPI has no TVM runtime for "
                          "it. " + RUNTIME_DIR_ADVICE)
    cc = cc or target.get("cc") or os.environ.get("CXX") or "g++"
    if shutil.which(cc) is None:
        raise ToolchainError(f"The compiler '{cc}' for the bundle's {arch} code was not found: "
                             "install it, or pass its path with --cc.")
    libraries = runtime_libraries(arch, artifact.manifest.versions, runtime_dir)
    bundle_dir = Path(bundle_dir)
    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".qcompile-bundle-", dir=bundle_dir.parent))
    try:
        for sub in ("lib", "bin", "include", "share"):
            (staging / sub).mkdir()
        for name in (LIBRARY_FILE, MANIFEST_FILE):
            shutil.copy2(artifact.directory / name, staging / name)
        for library in libraries:
            shutil.copy2(library, staging / "lib" / library.name)
        native = native_sources()
        shutil.copy2(native / "qcompile.h", staging / "include" / "qcompile.h")
        shutil.copy2(native / "example.c", staging / "share" / "example.c")
        log.info("building libqcompile.so and qcompile-run with %s", cc)
        _compile(cc, ["-std=c++17", "-O2", "-fPIC", "-shared", "-s", f"-I{native}",
                      f"-I{_ffi_include()}", str(native / "qcompile_api.cc"),
                      "-o", str(staging / "lib" / "libqcompile.so"), f"-L{staging / 'lib'}",
                      "-ltvm_ffi", "-ldl", "-Wl,-rpath,$ORIGIN"], "libqcompile.so")
        _compile(cc, ["-std=c++17", "-O2", "-s", f"-I{native}", str(native / "qcompile_run.cc"),
                      "-o", str(staging / "bin" / "qcompile-run"), "-ldl"], "qcompile-run")
        parts = {"model": (staging / LIBRARY_FILE).stat().st_size,
                 "runtime": sum((staging / "lib" / name).stat().st_size
                                for name in RUNTIME_LIBRARIES),
                 "api": (staging / "lib" / "libqcompile.so").stat().st_size,
                 "runner": (staging / "bin" / "qcompile-run").stat().st_size}
        info = {"format": 1, "arch": arch, "target": target.get("name"), "compiler": cc,
                "versions": artifact.manifest.versions, "bytes": parts}
        (staging / BUNDLE_FILE).write_text(json.dumps(info, indent=1) + "\n")
        if bundle_dir.exists():
            shutil.rmtree(bundle_dir)
        os.replace(staging, bundle_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    bundle = Bundle(bundle_dir, arch, parts)
    log.info("%s", bundle.describe())
    return bundle


__all__ = ["BUNDLE_FILE", "Bundle", "native_sources", "package"]
