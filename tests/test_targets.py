"""Targets as data: the shipped files, user target files, and their errors."""

import os
import stat

import pytest

import qcompile
from qcompile.errors import TargetError, ToolchainError
from qcompile.targets import list_targets, load_target

REQUIRED = {"host", "arm64", "arm64-dotprod", "arm64-i8mm", "armv7", "mali", "adreno"}


def test_shipped_targets_load_into_tvm():
    targets = {t.name: t for t in list_targets()}
    assert REQUIRED <= set(targets)
    for target in targets.values():
        tvm_target = target.to_tvm()
        assert target.description and target.rpc_key
        assert tvm_target.kind.name == target.kind
    assert targets["arm64-dotprod"].to_tvm().attrs["feature.has_dotprod"]
    assert targets["arm64-i8mm"].to_tvm().attrs["feature.has_matmul_i8"]
    assert not targets["arm64"].to_tvm().attrs["feature.has_dotprod"]
    assert "mali" in targets["mali"].to_tvm().keys
    assert targets["adreno"].to_tvm().host.attrs["mtriple"] == "aarch64-linux-gnu"


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(TargetError) as err:
        load_target("pixel9")
    assert "Unknown target 'pixel9'" in str(err.value)
    for name in REQUIRED:
        assert name in str(err.value)


GOOD = """
description = "my board"
rpc_key = "board"
[target]
kind = "llvm"
mtriple = "aarch64-linux-gnu"
mattr = ["+neon"]
[compiler]
cc = "aarch64-linux-gnu-g++"
debian_package = "g++-aarch64-linux-gnu"
"""


@pytest.mark.parametrize("text, field", [
    (GOOD.replace('description = "my board"\n', ""), "description"),
    (GOOD.replace('kind = "llvm"', 'kind = "cuda"'), "target.kind"),
    (GOOD.replace("[target]", "[targets]"), "targets"),
    (GOOD.replace('cc = "aarch64-linux-gnu-g++"', 'gcc = "x"'), "compiler.cc"),
    (GOOD.replace('mattr = ["+neon"]', 'mattr = "+neon"'), "target"),
    (GOOD.replace('kind = "llvm"', 'kind = "opencl"'), "host"),
])
def test_bad_target_file_names_the_field(tmp_path, text, field):
    path = tmp_path / "board.toml"
    path.write_text(text)
    with pytest.raises(TargetError) as err:
        load_target(str(path))
    assert f"field '{field}'" in str(err.value)
    assert str(path) in str(err.value)


def test_invalid_toml(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text("description = \n")
    with pytest.raises(TargetError, match="not valid TOML"):
        load_target(str(path))


def test_user_target_file_compiles(tmp_path, save_model):
    from models import conv_relu

    path = tmp_path / "board.toml"
    path.write_text(GOOD)
    artifact = qcompile.compile(save_model(conv_relu()), str(path), tmp_path / "out")
    assert artifact.manifest.target["name"] == "board"


def test_missing_cross_compiler_names_the_package(tmp_path, save_model):
    from models import conv_relu

    path = tmp_path / "board.toml"
    path.write_text(GOOD.replace('cc = "aarch64-linux-gnu-g++"', 'cc = "no-such-g++"'))
    with pytest.raises(ToolchainError) as err:
        qcompile.compile(save_model(conv_relu()), str(path), tmp_path / "out")
    message = str(err.value)
    assert "'no-such-g++'" in message and "apt-get install g++-aarch64-linux-gnu" in message
    assert "TVM_NDK_CC" in message
    assert not (tmp_path / "out").exists()


def test_ndk_compiler_switches_to_the_android_triple(tmp_path, save_model, monkeypatch):
    """A compiler named like the NDK's clang links the .so for Android's triple."""
    from models import conv_relu

    fake_ndk = tmp_path / "ndk" / "aarch64-linux-android28-clang++"
    fake_ndk.parent.mkdir()
    fake_ndk.write_text('#!/bin/sh\nexec aarch64-linux-gnu-g++ "$@"\n')
    fake_ndk.chmod(fake_ndk.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("TVM_NDK_CC", str(fake_ndk))
    artifact = qcompile.compile(save_model(conv_relu()), "arm64", tmp_path / "out")
    target = artifact.manifest.target
    assert target["os"] == "android" and target["cc"] == str(fake_ndk)
    assert target["target"]["mtriple"] == "aarch64-linux-android"


def test_armv7_android_uses_soft_float_abi():
    target = load_target("armv7")
    assert target.target["mfloat-abi"] == "hard"
    assert target.android == {"mtriple": "armv7a-linux-androideabi", "mfloat-abi": "soft"}
    assert os.path.basename(target.compiler.cc) == "arm-linux-gnueabihf-g++"


def test_compiler_for_the_wrong_machine_fails_with_a_clear_error(tmp_path, save_model):
    """An armv7 compiler cannot link aarch64 objects: the error names compiler and triple."""
    from models import conv_relu

    with pytest.raises(ToolchainError) as err:
        qcompile.compile(save_model(conv_relu()), "arm64", tmp_path / "out",
                         cc="arm-linux-gnueabihf-g++")
    assert "'arm-linux-gnueabihf-g++' failed" in str(err.value)
    assert "aarch64-linux-gnu" in str(err.value)
    assert not (tmp_path / "out").exists()
