"""Damaged or malformed files beside the model: calibration and input .npz files, precision rules,
target files and --metric modules. Each is refused with one paragraph naming the file and what is
wrong with it (exit code 2, no traceback), before its data is read or anything is built."""

import zipfile

import numpy as np
import onnx
import pytest

from conftest import GENERIC_TARGET
from models import conv_relu, gemm_matmul
from qcompile.cli import main


def refused(capsys, argv, *words) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("qcompile: error: ")
    for word in words:
        assert word in err
    return err


def npy_header(shape, descr="<f4") -> bytes:
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (118 - len(header)) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def damaged_npz(path, kind):
    """A file named .npz that numpy cannot read as one, of the given kind."""
    if kind == "cut in half":
        np.savez(path, x=np.ones((4, 1, 3, 32, 32), np.float32))
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "member not an npy":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x.npy", b"not an npy header at all")
    elif kind == "member of another name":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x.txt", b"1 2 3")
    elif kind == "header claims 10^12 floats":  # 4 TB claimed by a 200-byte file
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x.npy", npy_header((10 ** 12,)) + b"\0" * 16)
    elif kind == "object array":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x.npy", npy_header((1,), "|O") + b"\x80\x04N.")
    return path


DAMAGED = {
    "cut in half": ["is not an .npz file, or it is damaged"],
    "member not an npy": ["Array 'x'", "is not a numpy array", "magic string"],
    "member of another name": ["'x.txt'", "not a numpy array (.npy)"],
    "header claims 10^12 floats": ["'x'", "claims shape [1000000000000]", "4.0 TB",
                                   "the file is damaged"],
    "object array": ["'x'", "Python objects", "never loads"],
}


@pytest.mark.parametrize("kind", DAMAGED)
def test_damaged_calibration_file(kind, save_model, tmp_path, capsys):
    calib = damaged_npz(tmp_path / "calib.npz", kind)
    refused(capsys, ["compile", str(save_model(conv_relu())), "-o", str(tmp_path / "out"),
                     "--quantize", "int8", "--calibration", str(calib)],
            str(calib), "numpy.savez" if kind != "object array" else "numeric",
            *DAMAGED[kind])


@pytest.fixture(scope="module")
def generic_build(tmp_path_factory):
    """conv_relu compiled for a generic llvm target (seconds)."""
    directory = tmp_path_factory.mktemp("generic")
    onnx.save(conv_relu(), str(directory / "model.onnx"))
    (directory / "cpu.toml").write_text(GENERIC_TARGET)
    assert main(["compile", str(directory / "model.onnx"), "--target",
                 str(directory / "cpu.toml"), "-o", str(directory / "out"),
                 "--no-tuning-log"]) == 0
    return directory / "out"


@pytest.mark.parametrize("kind", ["cut in half", "member not an npy",
                                  "header claims 10^12 floats", "object array"])
def test_damaged_inputs_file(kind, generic_build, tmp_path, capsys):
    inputs = damaged_npz(tmp_path / "x.npz", kind)
    refused(capsys, ["run", str(generic_build), "--inputs", str(inputs)], str(inputs),
            *DAMAGED[kind])


RULES = {
    "regex that does not compile": ('[[rule]]\nname = "re:([a-"\nprecision = "fp32"\n',
                                    ["rule 1", "'re:([a-'", "not a valid regular expression"]),
    "rule is a list of numbers": ("rule = [1, 2]\n", ["[[rule]] tables"]),
    "defaults is a string": ('defaults = "fp32"\n', ["'defaults' must be a table"]),
    "not UTF-8": (b"\xff\xfe[[rule]]\n", ["is not a text file", "UTF-8"]),
    "a directory": (None, ["cannot be read"]),
}


def _write(path, content):
    """A file with `content` (text or bytes), or a directory of that name (None)."""
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("case", RULES)
def test_bad_precision_rules(case, save_model, tmp_path, capsys):
    content, words = RULES[case]
    rules = _write(tmp_path / "rules.toml", content)
    np.savez(tmp_path / "calib.npz", x=np.ones((2, 4, 64), np.float32))
    refused(capsys, ["compile", str(save_model(gemm_matmul())), "-o", str(tmp_path / "out"),
                     "--quantize", "int8", "--calibration", str(tmp_path / "calib.npz"),
                     "--precision-rules", str(rules)], str(rules), *words)


TARGETS = {
    "mcpu LLVM does not know": (GENERIC_TARGET + 'mcpu = "nonsense-cpu-9000"\n',
                                ["field 'target.mcpu'", "'nonsense-cpu-9000'",
                                 "LLVM does not know", "-mcpu=help"]),
    "mcpu of another architecture": (
        GENERIC_TARGET + 'mtriple = "aarch64-linux-gnu"\nmcpu = "skylake"\n',
        ["'skylake'", "aarch64-linux-gnu"]),
    "not UTF-8": (b"\xff\xfe", ["is not a text file", "UTF-8"]),
    "a directory": (None, ["is a directory"]),
    "compiler without a package": (
        GENERIC_TARGET.replace("[target]", '[compiler]\ncc = "/nonexistent/aarch64-g++"\n'
                               "[target]"),
        ["'/nonexistent/aarch64-g++'", "not installed", "[compiler] cc"]),
}


@pytest.mark.parametrize("case", TARGETS)
def test_bad_target_file(case, save_model, tmp_path, capsys):
    content, words = TARGETS[case]
    target = _write(tmp_path / "board.toml", content)
    err = refused(capsys, ["compile", str(save_model(conv_relu())), "--target", str(target),
                           "-o", str(tmp_path / "out")], *words)
    assert "apt-get install `" not in err


@pytest.mark.parametrize("source, words", [
    ("def f(references, outputs, feeds)\n    return 1.0\n", ["line 1", "expected ':'"]),
    ("raise RuntimeError('no data here')\n", ["raised RuntimeError: no data here"]),
])
def test_metric_module_that_does_not_import(source, words, save_model, tmp_path, capsys):
    metric = tmp_path / "badmetric.py"
    metric.write_text(source)
    np.savez(tmp_path / "calib.npz", x=np.ones((2, 4, 64), np.float32))
    refused(capsys, ["compile", str(save_model(gemm_matmul())), "-o", str(tmp_path / "out"),
                     "--quantize", "auto", "--calibration", str(tmp_path / "calib.npz"),
                     "--accuracy-budget", "0.9", "--metric", f"python:{metric}:f"],
            f"python:{metric}:f", *words)
