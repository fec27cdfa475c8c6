"""Device classes as data: `targets/<name>.toml` -> Target.

A target file holds the TVM target (a JSON-like table, never a CLI string), an optional host
target (for GPUs, the CPU that drives them), the cross compiler that links the .so, the default
RPC key under which such devices register with a tracker, and a one-line description.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import TargetError, ToolchainError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# TVM's own variable for an Android NDK compiler (tvm.support.ndk reads it too).
NDK_CC_ENV = "TVM_NDK_CC"
_KNOWN_KINDS = ("llvm", "opencl")
_TOP_LEVEL_FIELDS = {"description", "rpc_key", "target", "host", "compiler", "android"}
_COMPILER_FIELDS = {"cc", "debian_package"}
# platform.machine() and triple prefixes -> one architecture name
_ARCH_NAMES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


@dataclass(frozen=True)
class Compiler:
    """The C++ compiler that links a .so for the device."""

    cc: str
    debian_package: str = ""


@dataclass(frozen=True)
class Target:
    """A device class: what to generate code for and how to link it."""

    name: str
    description: str
    target: dict[str, Any]
    rpc_key: str
    host: dict[str, Any] | None = None
    compiler: Compiler | None = None
    android: dict[str, Any] | None = None  # CPU target overrides for an NDK build
    source: str = ""
    os: str = "linux"
    cc: str | None = field(default=None, compare=False)

    @property
    def kind(self) -> str:
        return str(self.target["kind"])

    @property
    def is_gpu(self) -> bool:
        return self.kind != "llvm"

    @property
    def cpu(self) -> dict[str, Any]:
        """The CPU's TVM target: the target itself, or a GPU's host."""
        return self.host if self.is_gpu and self.host is not None else self.target

    @property
    def is_cross(self) -> bool:
        return self.compiler is not None

    def to_tvm(self):
        """The tvm.target.Target (with its host, for GPU targets)."""
        import tvm

        config = dict(self.target)
        if self.host is not None:
            config["host"] = dict(self.host)
        return tvm.target.Target(config)

    def to_json(self) -> dict[str, Any]:
        """What the manifest records about the target."""
        return {
            "name": self.name,
            "description": self.description,
            "target": self.target,
            "host": self.host,
            "os": self.os,
            "cc": self.cc,
            "rpc_key": self.rpc_key,
        }

    def with_compiler(self, cc: str | None = None) -> "Target":
        """Resolve the compiler that links the .so, and check that it is installed.

        The choice is, first to last: `cc` (the CLI's --cc), $TVM_NDK_CC (an Android NDK
        clang), the target file's Debian cross compiler. An NDK clang (its name contains
        "android") applies the file's [android] overrides (triple, float ABI) to the CPU
        target.
        """
        chosen = cc or (os.environ.get(NDK_CC_ENV) if self.is_cross else None)
        if chosen is None and self.compiler is not None:
            chosen = self.compiler.cc
        if chosen is None:
            return self  # the host's default compiler, as TVM finds it
        if shutil.which(chosen) is None:
            raise ToolchainError(self._missing_compiler_message(chosen, given=cc is not None))
        resolved = replace(self, cc=chosen)
        if "android" in Path(chosen).name and self.android:
            cpu = self.host if self.is_gpu else self.target
            cpu = {**cpu, **self.android}
            if self.is_gpu:
                resolved = replace(resolved, host=cpu, os="android")
            else:
                resolved = replace(resolved, target=cpu, os="android")
        return resolved

    def _missing_compiler_message(self, chosen: str, given: bool) -> str:
        if given:
            return (f"The compiler '{chosen}' given with --cc was not found. "
                    "Pass the full path of a C++ compiler for the target.")
        if os.environ.get(NDK_CC_ENV) == chosen:
            return (f"${NDK_CC_ENV} points to '{chosen}', which does not exist. Set it to the "
                    "NDK's clang++ for the target, e.g. "
                    "$NDK/toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android28-clang++.")
        package = self.compiler.debian_package if self.compiler else ""
        where = self.source or "the target file"
        install = (f"On Debian/Ubuntu: `apt-get install {package}`." if package else
                   f"Install it, or name an installed compiler in {where} ([compiler] cc) or "
                   "with --cc.")
        return (f"Target '{self.name}' links with the cross compiler '{chosen}', which is not "
                f"installed. {install} For Android, set ${NDK_CC_ENV} (or pass --cc) to the "
                "NDK's clang++ for this CPU.")


def _targets_dir() -> Path:
    """targets/ of the source checkout, or the copy installed inside the package."""
    package = Path(__file__).resolve().parent
    installed = package / "data" / "targets"  # where pyproject.toml installs targets/
    return installed if installed.is_dir() else package.parent / "targets"


def list_targets() -> list[Target]:
    """All targets shipped with qcompile, sorted by name."""
    return [load_target(name) for name in target_names()]


def target_names() -> list[str]:
    return sorted(p.stem for p in _targets_dir().glob("*.toml"))


def load_target(name_or_path: str | os.PathLike | Target) -> Target:
    """Load a target by its name (`arm64-dotprod`) or from a path to a .toml target file."""
    if isinstance(name_or_path, Target):
        return name_or_path
    text = str(name_or_path)
    path = Path(text)
    if text.endswith(".toml") or os.sep in text:
        if path.is_dir():
            raise TargetError(f"Target file '{text}' is a directory. Pass the path of a .toml "
                              "target file, like targets/arm64.toml.")
        if not path.is_file():
            raise TargetError(f"Target file '{text}' does not exist. Pass one of the known "
                              f"targets ({', '.join(target_names())}) or a path to a .toml file.")
    else:
        path = _targets_dir() / f"{text}.toml"
        if not path.is_file():
            raise TargetError(f"Unknown target '{text}'. Known targets: "
                              f"{', '.join(target_names())}; or pass a path to your own .toml "
                              "target file (see `qcompile targets`).")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise TargetError(f"Target file '{path}' is not a text file (byte {exc.start} is not "
                          "UTF-8). Write it as TOML in UTF-8, like targets/arm64.toml.") from None
    except OSError as exc:
        raise TargetError(f"Target file '{path}' cannot be read ({exc.strerror or exc}). Pass "
                          "the path of a .toml file.") from None
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"Target file '{path}' is not valid TOML: {exc}.") from None
    return _parse(path, data)


def _parse(path: Path, data: dict[str, Any]) -> Target:
    def bad(field_name: str, problem: str) -> TargetError:
        return TargetError(f"Target file '{path}': field '{field_name}' {problem}. "
                           "See targets/arm64.toml for a complete example.")

    unknown = set(data) - _TOP_LEVEL_FIELDS
    if unknown:
        raise bad(sorted(unknown)[0], f"is not a known field (known: {sorted(_TOP_LEVEL_FIELDS)})")
    for key in ("description", "rpc_key"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise bad(key, "is missing or not a non-empty string")
    target = data.get("target")
    if not isinstance(target, dict):
        raise bad("target", "is missing: it must be a table such as "
                  "[target] kind = \"llvm\" mtriple = \"aarch64-linux-gnu\"")
    if target.get("kind") not in _KNOWN_KINDS:
        raise bad("target.kind", f"is {target.get('kind')!r}; it must be one of {_KNOWN_KINDS}")
    host = data.get("host")
    if host is not None and (not isinstance(host, dict) or host.get("kind") != "llvm"):
        raise bad("host", "must be a table with kind = \"llvm\"")
    if target["kind"] != "llvm" and host is None:
        raise bad("host", "is missing: a GPU target needs the [host] CPU target that drives it")
    compiler = data.get("compiler")
    if compiler is not None:
        if not isinstance(compiler, dict) or not isinstance(compiler.get("cc"), str):
            raise bad("compiler.cc", "is missing: name the C++ cross compiler, "
                      "e.g. cc = \"aarch64-linux-gnu-g++\"")
        extra = set(compiler) - _COMPILER_FIELDS
        if extra:
            raise bad(f"compiler.{sorted(extra)[0]}", f"is not a known field "
                      f"(known: {sorted(_COMPILER_FIELDS)})")
        compiler = Compiler(**compiler)
    android = data.get("android")
    if android is not None and not isinstance(android, dict):
        raise bad("android", "must be a table of CPU target overrides, e.g. "
                  "mtriple = \"aarch64-linux-android\"")
    target = _resolve_native(target)
    for key, cpu in (("target", target), ("host", host)):
        problem = _unknown_cpu(cpu) if cpu is not None else None
        if problem:
            raise bad(f"{key}.mcpu", problem)
    result = Target(name=path.stem, description=data["description"],
                    target=target, rpc_key=data["rpc_key"], host=host,
                    compiler=compiler, android=android, source=str(path))
    try:
        result.to_tvm()
    except Exception as exc:  # TVM raises several error types for bad attributes
        raise bad("target", f"is not accepted by TVM ({str(exc).strip().splitlines()[-1]})")
    return result


def _unknown_cpu(cpu: dict[str, Any]) -> str | None:
    """Why LLVM does not know the CPU target's mcpu for its triple (None if it does): LLVM
    would fall back to a generic CPU with a warning, and the code would not use the CPU's
    features."""
    mcpu = cpu.get("mcpu")
    if cpu.get("kind") != "llvm" or not isinstance(mcpu, str):
        return None
    import difflib

    import tvm
    from tvm.target import codegen

    triple = cpu.get("mtriple")
    try:
        known = list(codegen.llvm_get_cpu_archlist(
            tvm.target.Target({"kind": "llvm", **({"mtriple": triple} if triple else {})})))
    except Exception:  # noqa: BLE001 - a triple TVM refuses is reported with the target
        return None
    if not known or mcpu in known:
        return None
    close = difflib.get_close_matches(mcpu, known, n=3)
    llc = f"llc -mtriple={triple} -mcpu=help" if triple else "llc -mcpu=help"
    return (f"is {mcpu!r}, a CPU that LLVM does not know for {triple or 'this machine'}"
            + (f" (close: {', '.join(close)})" if close else "") +
            f". The {len(known)} it knows: `{llc}`, or in Python "
            "tvm.target.codegen.llvm_get_cpu_archlist(tvm.target.Target(...))")


def _resolve_native(target: dict[str, Any]) -> dict[str, Any]:
    """Replace "native" CPU and core count with this machine's."""
    resolved = dict(target)
    if resolved.get("mcpu") == "native":
        from tvm.target import codegen

        resolved["mcpu"] = codegen.llvm_get_system_cpu()
    if resolved.get("num-cores") == "native":
        resolved["num-cores"] = os.cpu_count() or 1
    return resolved


def host_arch() -> str:
    """This machine's architecture: x86_64, aarch64, ..."""
    import platform

    machine = platform.machine().lower()
    return _ARCH_NAMES.get(machine, machine)


def manifest_arch(target: dict[str, Any]) -> str:
    """The CPU architecture a manifest's target (Target.to_json) runs on: its triple's, or this
    machine's when it was built for the machine that compiled it."""
    cpu = target.get("host") or target.get("target") or {}
    triple = str(cpu.get("mtriple") or "")
    if not triple:
        return host_arch()
    arch = triple.split("-")[0]
    if arch in _ARCH_NAMES:
        return _ARCH_NAMES[arch]
    return "arm" if arch.startswith("arm") else arch


def manifest_kind(target: dict[str, Any]) -> str:
    """The TVM target kind a manifest's target was built for: llvm (a CPU) or opencl."""
    return str((target.get("target") or {}).get("kind", "llvm"))
