"""What a manifest's target says about where the model runs: the architecture (from the CPU's
triple, the GPU's host, or this machine) and the kind, for every shipped target."""

import pytest

from qcompile.targets import host_arch, list_targets, manifest_arch, manifest_kind

EXPECTED_ARCH = {"arm64": "aarch64", "arm64-dotprod": "aarch64", "arm64-i8mm": "aarch64",
                 "armv7": "arm"}


@pytest.mark.parametrize("target", list_targets(), ids=lambda t: t.name)
def test_every_shipped_target_names_its_arch_and_kind(target):
    recorded = target.to_json()
    assert manifest_kind(recorded) == target.kind
    arch = manifest_arch(recorded)
    if target.name in EXPECTED_ARCH:
        assert arch == EXPECTED_ARCH[target.name]
    elif not (target.cpu or {}).get("mtriple"):
        assert arch == host_arch()  # built for the machine that compiles it
    assert arch in {"x86_64", "aarch64", "arm"}, arch


def test_a_gpus_arch_is_its_hosts():
    gpu = {"target": {"kind": "opencl"}, "host": {"kind": "llvm",
                                                  "mtriple": "aarch64-linux-android"}}
    assert manifest_kind(gpu) == "opencl" and manifest_arch(gpu) == "aarch64"
