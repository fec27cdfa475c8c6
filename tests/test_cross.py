"""Cross-compiled libraries are ELF shared objects for the right machine; GPU builds carry
OpenCL kernels; a library built for another machine is refused locally with advice."""

import struct

import pytest

import qcompile
from models import depthwise_grouped
from qcompile.errors import DeviceError

EM_ARM, EM_AARCH64 = 40, 183
ET_DYN = 3


def elf_header(path) -> dict:
    data = path.read_bytes()[:64]
    assert data[:4] == b"\x7fELF", f"{path} is not an ELF file"
    bits = {1: 32, 2: 64}[data[4]]
    e_type, e_machine = struct.unpack("<HH", data[16:20])
    return {"bits": bits, "type": e_type, "machine": e_machine}


@pytest.mark.parametrize("target, bits, machine", [
    ("arm64", 64, EM_AARCH64), ("arm64-dotprod", 64, EM_AARCH64),
    ("arm64-i8mm", 64, EM_AARCH64), ("armv7", 32, EM_ARM),
    ("mali", 64, EM_AARCH64), ("adreno", 64, EM_AARCH64)])
def test_cross_build_is_a_shared_object_for_the_device(target, bits, machine, save_model,
                                                      tmp_path):
    artifact = qcompile.compile(save_model(depthwise_grouped()), target, tmp_path / target)
    header = elf_header(artifact.library)
    assert header == {"bits": bits, "type": ET_DYN, "machine": machine}
    library = artifact.library.read_bytes()
    has_opencl = b"__kernel" in library
    assert has_opencl == (target in ("mali", "adreno"))
    with pytest.raises(DeviceError) as err:
        qcompile.load(artifact.directory)
    assert "--rpc-tracker" in str(err.value) and target in str(err.value)
