"""Deploying without Python: `qcompile package` makes a bundle (the model, TVM's runtime
libraries for the device, the C API, a native runner); the runner gives exactly the outputs
of `qcompile run`, here and (emulated) on ARM64 under qemu with no Python in the guest; every
bad bundle or input is a message and exit code 2, never a signal; a C program embeds the API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import onnx
import pytest

import qcompile
from models import packed_convnet, random_inputs, two_inputs_two_outputs
from qcompile.cli import main
from qcompile.deploy import BUNDLE_FILE, package

QEMU = "qemu-aarch64-static"
ARM_SYSROOT = "/usr/aarch64-linux-gnu"  # the cross compiler's libc and libstdc++


def _compiled(tmp_path, model, target: str = "host", name: str = "out"):
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    calibration = [random_inputs(model, seed=10 + i) for i in range(4)]
    return qcompile.compile(path, target, tmp_path / name, quantize="int8",
                            calibration=calibration, tuning_log=False)


def _run(runner, *args, env=None, prefix=()):
    done = subprocess.run([*prefix, str(runner), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})
    assert done.returncode >= 0, f"killed by signal {-done.returncode}: {done.stderr}"
    return done


@pytest.fixture(scope="module")
def host_bundle(tmp_path_factory):
    work = tmp_path_factory.mktemp("deploy")
    artifact = _compiled(work, packed_convnet())
    feeds = random_inputs(packed_convnet(), seed=99)
    np.savez(work / "x.npz", **feeds)
    return {"work": work, "artifact": artifact, "feeds": feeds,
            "bundle": package(artifact.directory, work / "bundle")}


def test_the_native_runner_gives_qcompile_runs_outputs(host_bundle):
    work, bundle = host_bundle["work"], host_bundle["bundle"]
    done = _run(bundle.runner, bundle.directory, "--inputs", work / "x.npz", "--output",
                work / "y.npz", "--repeat", 5, "--threads", 1)
    assert done.returncode == 0, done.stderr
    assert "latency on this machine: mean" in done.stdout and "(5 runs)" in done.stdout
    assert "peak resident memory:" in done.stdout
    with qcompile.load(host_bundle["artifact"].directory) as model:
        expected = model.run(host_bundle["feeds"])
    with np.load(work / "y.npz") as native:
        assert set(native.files) == set(expected)
        for name, value in expected.items():
            np.testing.assert_array_equal(native[name], value)  # bit-identical
    info = json.loads((bundle.directory / BUNDLE_FILE).read_text())
    assert info["arch"] == bundle.arch and set(info["bytes"]) == {"model", "runtime", "api",
                                                                    "runner"}
    assert not list(bundle.directory.rglob("libtvm_runtime_extra.so"))
    assert (bundle.directory / "include" / "qcompile.h").is_file()


def test_an_npy_input_random_inputs_and_two_inputs(host_bundle, tmp_path):
    bundle = host_bundle["bundle"]
    np.save(tmp_path / "x.npy", host_bundle["feeds"]["x"])
    assert _run(bundle.runner, bundle.directory, "--inputs", tmp_path / "x.npy",
                "--repeat", 2).returncode == 0
    done = _run(bundle.runner, bundle.directory, "--repeat", 2)
    assert done.returncode == 0 and "random data" in done.stderr
    # a model with two inputs (one int64) and two outputs
    model = two_inputs_two_outputs()
    path = tmp_path / "two.onnx"
    onnx.save(model, str(path))
    artifact = qcompile.compile(path, "host", tmp_path / "two")
    two = package(artifact.directory, tmp_path / "two-bundle")
    feeds = random_inputs(model, seed=3)
    np.savez(tmp_path / "two.npz", **feeds)
    done = _run(two.runner, two.directory, "--inputs", tmp_path / "two.npz", "--output",
                tmp_path / "two-y.npz", "--repeat", 2)
    assert done.returncode == 0, done.stderr
    with qcompile.load(artifact.directory) as loaded, np.load(tmp_path / "two-y.npz") as got:
        for name, value in loaded.run(feeds).items():
            np.testing.assert_array_equal(got[name], value)


def _broken(bundle, tmp_path, name):
    copy = tmp_path / name
    shutil.copytree(bundle.directory, copy, symlinks=True)
    return copy


def test_bad_bundles_and_inputs_are_messages_and_exit_code_2(host_bundle, tmp_path):
    bundle, work = host_bundle["bundle"], host_bundle["work"]
    x = host_bundle["feeds"]["x"]
    np.savez(tmp_path / "name.npz", images=x)
    np.savez(tmp_path / "shape.npz", x=x[..., :-1])
    np.savez(tmp_path / "dtype.npz", x=x.astype(np.float64))
    np.savez_compressed(tmp_path / "compressed.npz", x=x)
    cases = {"name.npz": "has no array 'x'; the model's inputs: x float32[",
             "shape.npz": "input 'x' is float32[",
             "dtype.npz": "input 'x' is float64[",
             "compressed.npz": "save it with numpy.savez, not savez_compressed",
             "missing.npz": "does not exist"}
    for file, message in cases.items():
        done = _run(bundle.runner, bundle.directory, "--inputs", tmp_path / file)
        assert done.returncode == 2 and message in done.stderr, (file, done.stderr)
    damaged = _broken(bundle, tmp_path, "damaged")
    with open(damaged / "model.so", "ab") as f:
        f.write(b"x")
    done = _run(damaged / "bin" / "qcompile-run", damaged)
    assert done.returncode == 2 and "is not the library model.json describes" in done.stderr
    no_runtime = _broken(bundle, tmp_path, "no-runtime")
    (no_runtime / "lib" / "libtvm_runtime.so").unlink()
    done = _run(no_runtime / "bin" / "qcompile-run", no_runtime, env={"LD_LIBRARY_PATH": ""})
    assert done.returncode == 2 and "the TVM runtime could not be loaded" in done.stderr
    no_ffi = _broken(bundle, tmp_path, "no-ffi")
    (no_ffi / "lib" / "libtvm_ffi.so").unlink()
    done = _run(no_ffi / "bin" / "qcompile-run", no_ffi, env={"LD_LIBRARY_PATH": ""})
    assert done.returncode == 2 and "libtvm_ffi.so" in done.stderr
    assert _run(bundle.runner).returncode == 2  # no bundle: usage
    assert _run(bundle.runner, work / "nothing").returncode == 2


def test_a_model_for_another_architecture_says_which(host_bundle, tmp_path):
    """The host runner on an aarch64 model: refused, naming both architectures."""
    arm = _compiled(tmp_path, packed_convnet(), "arm64", "arm")
    mixed = _broken(host_bundle["bundle"], tmp_path, "mixed")
    for name in ("model.so", "model.json"):
        shutil.copy2(arm.directory / name, mixed / name)
    done = _run(mixed / "bin" / "qcompile-run", mixed)
    assert done.returncode == 2
    assert "built for target 'arm64' (aarch64); this is x86_64" in done.stderr


def test_package_errors_say_what_to_do(host_bundle, tmp_path, capsys):
    assert main(["package", str(tmp_path / "nothing"), "-o", str(tmp_path / "b")]) == 2
    assert "is not a compiled model" in capsys.readouterr().err
    assert main(["package", str(host_bundle["artifact"].directory), "-o", str(tmp_path / "b"),
                 "--cc", "no-such-compiler"]) == 2
    assert "no-such-compiler" in capsys.readouterr().err
    assert main(["package", str(host_bundle["artifact"].directory), "-o", str(tmp_path / "b"),
                 "--runtime-dir", str(tmp_path)]) == 2
    assert "has no" in capsys.readouterr().err


def test_a_c_program_embeds_the_api(host_bundle, tmp_path):
    bundle = host_bundle["bundle"].directory
    example = tmp_path / "example"
    subprocess.run(["gcc", "-I", str(bundle / "include"), str(bundle / "share" / "example.c"),
                    "-o", str(example), "-L", str(bundle / "lib"), "-lqcompile",
                    f"-Wl,-rpath,{bundle / 'lib'}"], check=True)
    done = _run(example, bundle)
    assert done.returncode == 0 and done.stdout.startswith("y:"), done.stderr
    assert len(done.stdout.split()) == 5  # the name and 4 values
    done = _run(example, tmp_path)
    assert done.returncode == 2 and "model.json" in done.stderr


def _emulated_ready():
    return shutil.which(QEMU) and os.path.isfile(f"{ARM_SYSROOT}/lib/libstdc++.so.6") and \
        shutil.which("aarch64-linux-gnu-g++")


@pytest.mark.emulated
@pytest.mark.parametrize("target", ["arm64", "arm64-dotprod", "arm64-i8mm"])
def test_aarch64_bundles_run_under_qemu_without_python(target, tmp_path, arm64_device):
    """The aarch64 bundle's runner under qemu user mode: only the bundle and the cross
    toolchain's libc and libstdc++ (no Python, no TVM wheel); its outputs are exactly those
    of the same library run by the Python runtime on the emulated device."""
    if not _emulated_ready():
        pytest.fail("qemu-aarch64-static and the aarch64 cross compiler are needed: "
                    "bash tests/run installs them")
    artifact = _compiled(tmp_path, packed_convnet(), target, target)
    bundle = package(artifact.directory, tmp_path / f"{target}-bundle")
    assert bundle.arch == "aarch64"
    feeds = random_inputs(packed_convnet(), seed=5)
    np.savez(tmp_path / "x.npz", **feeds)
    qemu = (QEMU, "-L", ARM_SYSROOT)
    done = _run(bundle.runner, bundle.directory, "--inputs", tmp_path / "x.npz", "--output",
                tmp_path / "y.npz", "--repeat", 2, prefix=qemu)
    assert done.returncode == 0, done.stderr
    with qcompile.load(artifact.directory, rpc_tracker=arm64_device["tracker"],
                       rpc_key=arm64_device["key"]) as remote:
        expected = remote.run(feeds)
    with np.load(tmp_path / "y.npz") as native:
        for name, value in expected.items():
            np.testing.assert_array_equal(native[name], value)
    if target != "arm64":  # a CPU without the instruction: a message, not SIGILL
        done = _run(bundle.runner, bundle.directory, prefix=qemu,
                    env={"QEMU_CPU": "cortex-a53"})
        assert done.returncode == 2 and "which this CPU does not have" in done.stderr


@pytest.mark.emulated
def test_the_c_example_cross_compiles_and_runs_under_qemu(tmp_path):
    if not _emulated_ready():
        pytest.fail("qemu-aarch64-static and the aarch64 cross compiler are needed: "
                    "bash tests/run installs them")
    artifact = _compiled(tmp_path, packed_convnet(), "arm64-dotprod", "dot")
    bundle = package(artifact.directory, tmp_path / "bundle").directory
    example = tmp_path / "example"
    subprocess.run(["aarch64-linux-gnu-gcc", "-I", str(bundle / "include"),
                    str(bundle / "share" / "example.c"), "-o", str(example), "-L",
                    str(bundle / "lib"), "-lqcompile", f"-Wl,-rpath,{bundle / 'lib'}"],
                   check=True)
    done = _run(example, bundle, prefix=(QEMU, "-L", ARM_SYSROOT))
    assert done.returncode == 0 and done.stdout.startswith("y:"), done.stderr


@pytest.mark.slow
def test_efficientnet_int8_runs_natively_with_the_same_outputs(tmp_path):
    """EfficientNet-Lite0 in int8 (the example's model), packaged for this machine: the native
    runner's logits are exactly the Python runtime's."""
    from qcompile.examples import efficientnet_lite0 as effnet
    from qcompile.examples.photos import photos

    path = effnet.export(tmp_path / "efficientnet-lite0.onnx")
    images = [{"images": effnet.preprocess(image)} for image in photos().values()]
    artifact = qcompile.compile(path, "host", tmp_path / "out", quantize="int8",
                                calibration=images)
    bundle = package(artifact.directory, tmp_path / "bundle")
    np.savez(tmp_path / "x.npz", **images[0])
    done = _run(bundle.runner, bundle.directory, "--inputs", tmp_path / "x.npz", "--output",
                tmp_path / "y.npz", "--repeat", 5)
    assert done.returncode == 0, done.stderr
    with qcompile.load(artifact.directory) as model, np.load(tmp_path / "y.npz") as native:
        np.testing.assert_array_equal(native["logits"], model.run(images[0])["logits"])
