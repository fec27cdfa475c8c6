"""An emulated ARM64 Linux device on this machine: a real TVM RPC server under qemu user mode.

No phone is needed to exercise the device side (cross-compiled code executing, RPC sessions,
tracker keys, uploads, remote timing, tuning measurements). The device is made of:

- Debian's `qemu-aarch64-static`, called explicitly (binfmt_misc is not assumed), with
  QEMU_LD_PREFIX pointing at an arm64 Debian userland and QEMU_CPU choosing the emulated CPU
  (`max`, the default, executes dot-product and i8mm instructions; `cortex-a53` has neither);
- that userland, built once with `debootstrap --foreign` (first stage only; the remaining
  packages are unpacked here) and cached under the user's cache directory;
- the aarch64 wheels of apache-tvm/apache-tvm-ffi (the versions that compile here) and numpy,
  installed into it with this machine's pip;
- a wrapper `python` that runs the guest's Python through qemu. It is the guest's
  sys.executable, so the RPC server's re-executed workers go through qemu too.

Timings measured on this device are emulated: they say nothing about a phone's speed.

Exposure: TVM RPC has no authentication, and the device runs whatever native code a client
uploads, under qemu user mode, which is not a sandbox (the guest's system calls are this
machine's, as the user who started it). The server therefore listens on 127.0.0.1 unless a
host is given explicitly.

One concern in one file (building the userland, starting servers, serving), a little over 400
lines with the small module it writes into the guest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from ..errors import DeviceError
from .processes import stop_process_group

log = logging.getLogger(__name__)

SUITE = "bookworm"  # Debian release of the userland: its Python (3.11) matches the wheels
MIRROR_ENV = "QCOMPILE_DEBIAN_MIRROR"
CACHE_ENV = "QCOMPILE_CACHE_DIR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
READY_FILE = "qcompile-userland.json"
RECIPE = 1  # bump when the userland's recipe changes, so that caches are rebuilt


@dataclass(frozen=True)
class GuestArch:
    """How to emulate one CPU architecture."""

    name: str            # our name, as in the targets
    debian_arch: str     # debootstrap --arch
    qemu: str            # the qemu user-mode binary
    wheel_platform: str  # pip --platform of the TVM wheels
    default_cpu: str


ARCHES = {
    "arm64": GuestArch("arm64", "arm64", "qemu-aarch64-static", "manylinux_2_28_aarch64", "max"),
}

# Guest Python packages: the TVM runtime (same versions as the compiler here) and what
# tvm.rpc and MetaSchedule's RPC runner import on the device (the versions installed here too
# when this Python is the guest's, 3.11, so that a new release cannot change the device).
_PINNED = ("apache-tvm", "apache-tvm-ffi")
_RUNTIME_DEPENDENCIES = ("numpy", "ml_dtypes", "typing_extensions", "psutil", "cloudpickle",
                         "tornado")
GUEST_PYTHON = (3, 11)  # Debian bookworm's


def cache_dir() -> Path:
    """$QCOMPILE_CACHE_DIR, else $XDG_CACHE_HOME/qcompile, else ~/.cache/qcompile."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qcompile"


def _tvm_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in _PINNED}


def _runtime_dependencies() -> list[str]:
    """pip requirements of the guest's other packages: this machine's versions, where this
    Python is the guest's (their wheels then exist for it), else the newest."""
    if sys.version_info[:2] != GUEST_PYTHON:
        return list(_RUNTIME_DEPENDENCIES)
    requirements = []
    for name in _RUNTIME_DEPENDENCIES:
        try:
            requirements.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            requirements.append(name)
    return requirements


@dataclass(frozen=True)
class Userland:
    """A built, cached guest: its root filesystem and the wrapper that runs its Python."""

    arch: GuestArch
    directory: Path

    @property
    def root(self) -> Path:
        return self.directory / "root"

    @property
    def python(self) -> Path:
        return self.directory / "python"

    @property
    def site_packages(self) -> Path:
        return self.root / "usr/lib/python3/dist-packages"

    @property
    def runtime_extra(self) -> Path:
        """The runtime library with random_fill etc., which MetaSchedule's RPC runner needs."""
        return self.site_packages / "tvm/lib/libtvm_runtime_extra.so"

    def info(self) -> dict:
        return json.loads((self.directory / READY_FILE).read_text())


def _userland_name(arch: GuestArch) -> str:
    versions = _tvm_versions()
    return (f"{arch.name}-{SUITE}-tvm{versions['apache-tvm']}-"
            f"ffi{versions['apache-tvm-ffi']}-r{RECIPE}")


def find_qemu(arch: GuestArch) -> str:
    path = shutil.which(arch.qemu)
    if path is None:
        raise DeviceError(f"'{arch.qemu}' is not installed; the emulated {arch.name} device needs "
                          "it. Install Debian's package qemu-user-static: "
                          "`sudo apt-get install qemu-user-static`.")
    return path


def _run(args: list[str], what: str, **kwargs) -> None:
    result = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.strip().splitlines()[-15:])
        raise DeviceError(f"Building the emulated device failed while {what} "
                          f"(`{' '.join(args[:4])} ...` exited with {result.returncode}):\n{tail}")


def _debootstrap(arch: GuestArch, root: Path) -> None:
    debootstrap = shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if Path("/usr/sbin/debootstrap").exists() else None)
    if debootstrap is None:
        raise DeviceError("'debootstrap' is not installed; building the emulated device's Debian "
                          "userland needs it. Install Debian's package debootstrap: "
                          "`sudo apt-get install debootstrap`.")
    if os.geteuid() != 0 and shutil.which("fakeroot") is None:
        raise DeviceError("debootstrap runs only as root or under fakeroot: run this once as "
                          "root, or install Debian's package fakeroot.")
    mirror = os.environ.get(MIRROR_ENV, DEFAULT_MIRROR)
    prefix = [] if os.geteuid() == 0 else ["fakeroot"]
    log.info("emulated device: downloading the Debian %s %s userland from %s "
             "(python3, about 60 MB of packages) ...", SUITE, arch.debian_arch, mirror)
    # First stage only: it downloads every package and unpacks the essential ones; the
    # second stage would need to run inside the guest as root. We unpack the rest ourselves.
    _run(prefix + [debootstrap, "--foreign", f"--arch={arch.debian_arch}", "--variant=minbase",
                   "--include=python3,libstdc++6", SUITE, str(root), mirror],
         f"downloading the Debian userland from {mirror} (set ${MIRROR_ENV} to use another "
         "mirror)")
    archives = sorted((root / "var/cache/apt/archives").glob("*.deb"))
    log.info("emulated device: unpacking %d packages ...", len(archives))
    for deb in archives:
        # `dpkg -x` would replace the usrmerge links (lib -> usr/lib), and qemu would not
        # find the dynamic loader; tar keeps them.
        unpack = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                                  stdout=subprocess.PIPE)
        _run(["tar", "-x", "--keep-directory-symlink", "-C", str(root)],
             f"unpacking {deb.name}", stdin=unpack.stdout)
        unpack.wait()
        deb.unlink()


def _install_wheels(arch: GuestArch, root: Path) -> None:
    site = root / "usr/lib/python3/dist-packages"
    pinned = [f"{name}=={version}" for name, version in _tvm_versions().items()]
    log.info("emulated device: installing %s and numpy for %s with pip ...",
             " and ".join(pinned), arch.wheel_platform)
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
          "--no-compile", "--platform", arch.wheel_platform, "--only-binary=:all:",
          "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
          "--target", str(site), *pinned, *_runtime_dependencies()],
         f"installing the {arch.wheel_platform} wheels of {', '.join(pinned)} with pip")
    # The device runs the runtime only (TVM_USE_RUNTIME_LIB=1); the 250 MB compiler goes.
    for unused in (site / "tvm/lib").glob("libtvm_compiler*"):
        unused.unlink()
    for unused in ("include", "src", "3rdparty"):
        shutil.rmtree(site / "tvm" / unused, ignore_errors=True)
    # An empty local dist-packages, so that the guest never falls back to this machine's
    # (qemu resolves a path missing from QEMU_LD_PREFIX on the host).
    (root / "usr/local/lib/python3.11/dist-packages").mkdir(parents=True, exist_ok=True)
    for cache in ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                  "usr/share/locale"):
        shutil.rmtree(root / cache, ignore_errors=True)


def _write_wrapper(userland: Userland) -> None:
    qemu = find_qemu(userland.arch)
    root = userland.root
    # "$0" as the guest's argv[0] makes this script the guest's sys.executable.
    script = ("#!/bin/sh\n"
              "# The emulated device's Python: qemu user mode over the cached Debian userland.\n"
              f"QEMU_LD_PREFIX='{root}' TVM_USE_RUNTIME_LIB=1 QCOMPILE_EMULATED=1 "
              f"QEMU_CPU=\"${{QEMU_CPU:-{userland.arch.default_cpu}}}\" "
              f"exec '{qemu}' -0 \"$0\" '{root}/usr/bin/python3.11' \"$@\"\n")
    _write_atomic(userland.python, script, 0o755)
    _write_atomic(userland.site_packages / "qcompile_device_info.py", _DEVICE_INFO_MODULE, 0o644)
    _write_atomic(userland.site_packages / "qcompile_device_info.pth",
                  "import qcompile_device_info\n", 0o644)


def _write_atomic(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # several processes may write
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)


# Every guest Python started by the wrapper registers `qcompile.device_info`, through which a
# client of the RPC server learns that the device is emulated (and labels its timings). A .pth
# line runs at interpreter start, so it is in place in every process of TVM's server.
_DEVICE_INFO_MODULE = '''\
"""Written by qcompile.emulator: tells RPC clients that this device is emulated, and makes a
server that stopped serving exit, so that its supervisor starts it again."""
import os

if os.environ.get("QCOMPILE_EMULATED"):
    import json
    import platform
    import sys
    import threading

    import tvm_ffi

    @tvm_ffi.register_global_func("qcompile.device_info", override=True)
    def _device_info():
        return json.dumps({"emulated": True, "emulator": "qemu user mode",
                           "machine": platform.machine(),
                           "cpu": os.environ.get("QEMU_CPU", "max")})

    # TVM's server ends its listening thread when a session's worker dies, but its process
    # lives on, unseen, and may stay registered with the tracker. Exit instead.
    _print_exception = threading.excepthook

    def _exit_when_listening_stops(args):
        _print_exception(args)
        if "_listen_loop" in getattr(args.thread, "name", ""):
            sys.stderr.flush()
            os._exit(70)

    threading.excepthook = _exit_when_listening_stops
'''


def _disk_usage(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def prepare(arch: str = "arm64", rebuild: bool = False) -> Userland:
    """The cached userland for `arch`, built first if needed (about a minute, ~400 MB)."""
    if arch not in ARCHES:
        raise DeviceError(f"No emulated device for '{arch}'. Emulated: {', '.join(ARCHES)}.")
    spec = ARCHES[arch]
    find_qemu(spec)
    parent = cache_dir() / "emulator"
    userland = Userland(spec, parent / _userland_name(spec))
    if rebuild and userland.directory.exists():
        shutil.rmtree(userland.directory)
    if not (userland.directory / READY_FILE).exists():
        _build(userland, parent)
    _write_wrapper(userland)
    return userland


def _build(userland: Userland, parent: Path) -> None:
    parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    log.info("emulated device: building the %s userland once, into %s",
             userland.arch.name, userland.directory)
    # Built beside its final place and renamed when complete: an interrupted build leaves
    # nothing that looks ready, and two builds at once do not mix.
    work = Path(tempfile.mkdtemp(prefix=f".{userland.directory.name}.", dir=parent))
    try:
        _debootstrap(userland.arch, work / "root")
        _install_wheels(userland.arch, work / "root")
        info = {"arch": userland.arch.name, "suite": SUITE, **_tvm_versions(),
                "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "build_seconds": round(time.time() - started, 1),
                "bytes": _disk_usage(work / "root")}
        (work / READY_FILE).write_text(json.dumps(info, indent=1) + "\n")
        try:
            work.rename(userland.directory)
        except OSError:  # another process finished first: use theirs
            if not (userland.directory / READY_FILE).exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = userland.info()
    log.info("emulated device: userland ready in %.0f s (%.0f MB on disk)",
             info["build_seconds"], info["bytes"] / 1e6)


def guest_env(cpu: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "QEMU_"))}
    if cpu:
        env["QEMU_CPU"] = cpu
    return env


def check_guest(userland: Userland, cpu: str | None = None) -> str:
    """Import tvm inside the guest; its machine and TVM version (a smoke test of the device)."""
    code = "import platform, tvm; print(platform.machine(), tvm.__version__)"
    result = subprocess.run([str(userland.python), "-c", code], capture_output=True, text=True,
                            env=guest_env(cpu), timeout=300)
    if result.returncode != 0:
        raise DeviceError("The emulated device's Python does not start: "
                          f"{result.stderr.strip().splitlines()[-1:] or result.returncode}. "
                          "Rebuild it with `qcompile device emulate --rebuild`.")
    return result.stdout.strip()


class EmulatedDevice:
    """A TVM RPC server running under qemu, registered with a tracker under `key`."""

    def __init__(self, userland: Userland, process: subprocess.Popen, key: str,
                 tracker: tuple[str, int], cpu: str, log_path: Path):
        self.userland = userland
        self.process = process
        self.key = key
        self.tracker = tracker
        self.cpu = cpu
        self.log_path = log_path
        self.address: str | None = None  # HOST:PORT of its RPC server, as the tracker lists it

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def registered(self) -> bool:
        """Whether the process runs and the tracker still lists its server (free or busy)."""
        return self.alive() and self.address in _servers(self.tracker, self.key)

    def stop(self) -> None:
        """Stop the server and every worker it re-executed (its whole process group), and
        remove its log."""
        stop_process_group(self.process)
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "EmulatedDevice":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def log_tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start(tracker: tuple[str, int], key: str = "arm64-emu", arch: str = "arm64",
          cpu: str | None = None, port: int = 9090, port_end: int | None = None,
          host: str | None = None, timeout: float = 300.0) -> EmulatedDevice:
    """Start an emulated device and wait until the tracker lists it as free under `key`.

    Its RPC server listens on `host`, 127.0.0.1 by default: anyone who reaches it can run
    code on this machine (see the module's docstring)."""
    from .tracker import connect_tracker, is_loopback

    userland = prepare(arch)
    cpu = cpu or userland.arch.default_cpu
    connect_tracker(tracker)  # fail now, naming the address, if it is not reachable
    tracker_host, tracker_port = tracker
    bind = host or "127.0.0.1"
    if not is_loopback(bind):
        log.warning("the emulated device listens on %s: whoever reaches it there can run code "
                    "on this machine (TVM RPC has no authentication, and qemu user mode is not "
                    "a sandbox)", bind)
    args = [str(userland.python), "-m", "tvm.exec.rpc_server", "--host", bind,
            "--port", str(port), "--port-end", str(port_end or port + 100),
            "--tracker", f"{tracker_host}:{tracker_port}", "--key", key,
            "--load-library", str(userland.runtime_extra)]
    log_file = tempfile.NamedTemporaryFile(prefix=f"qcompile-{key}-", suffix=".log",
                                           delete=False)
    log_path = Path(log_file.name)
    log.info("emulated device: starting a TVM RPC server under qemu (%s CPU) for key '%s' at "
             "the tracker %s:%d; log in %s", cpu, key, tracker_host, tracker_port, log_path)
    process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, env=guest_env(cpu),
                               start_new_session=True)
    log_file.close()
    device = EmulatedDevice(userland, process, key, tracker, cpu, log_path)
    deadline = time.time() + timeout
    try:
        before = _servers(tracker, key)
        while True:
            exited = not device.alive()
            new = _servers(tracker, key) - before
            if new:  # registered (a client may hold it already, or even have crashed it)
                device.address = sorted(new)[0]
                return device
            if exited:
                raise DeviceError(f"The emulated device exited with code {process.returncode} "
                                  f"before it registered with the tracker:\n{device.log_tail()}")
            if time.time() > deadline:
                raise DeviceError(f"The emulated device did not register under key '{key}' at "
                                  f"{tracker_host}:{tracker_port} within {timeout:.0f} s:\n"
                                  f"{device.log_tail()}")
            time.sleep(0.25)
    except BaseException:
        device.stop()
        raise


def _servers(tracker: tuple[str, int], key: str) -> set[str]:
    from .tracker import tracker_status

    return {addr for addr, k in tracker_status(tracker).servers if k == key}


def serve(tracker: tuple[str, int], key: str = "arm64-emu", count: int = 1,
          cpu: str | None = None, port: int = 9090, host: str | None = None,
          ready: Callable[[list[EmulatedDevice]], None] | None = None,
          alive: Callable[[], bool] | None = None, poll: float = 2.0) -> None:
    """Start `count` devices under `key` and keep them serving until interrupted or until
    `alive()` turns false. A device that stops serving is started again, like a phone that
    restarts its RPC server: TVM's server stops when a session's worker dies."""
    slots: list[EmulatedDevice | None] = []
    try:
        for _ in range(count):
            slots.append(start(tracker, key, cpu=cpu, port=port, host=host))
        if ready is not None:
            ready([device for device in slots if device is not None])
        missed = [0] * count
        while alive is None or alive():
            for i, device in enumerate(slots):
                if device is not None:
                    missed[i] = 0 if device.registered() else missed[i] + 1
                    if missed[i] < 2:
                        continue
                    log.warning("emulated device %s (pid %d) stopped serving; starting it "
                                "again. Its log ends:\n%s", device.address, device.pid,
                                device.log_tail(5))
                    device.stop()
                missed[i] = 0
                try:
                    slots[i] = start(tracker, key, cpu=cpu, port=port, host=host)
                except DeviceError as exc:  # e.g. a client crashed it at once: try again
                    slots[i] = None
                    log.warning("emulated device did not come back (%s); trying again", exc)
            time.sleep(poll)
    finally:
        for device in slots:
            if device is not None:
                device.stop()
