"""The command line: files written, outputs, and one-paragraph errors with exit code 2."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import compile_for_host
from models import (assert_close, conv_relu, dynamic_batch, onnxruntime_outputs, random_inputs,
                    two_inputs_two_outputs, unsupported_op)
from qcompile.cli import main


def test_help_explains_the_verbs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for verb in ("compile", "run", "targets", "example"):
        assert verb in text


def test_compile_then_run_from_the_command_line(save_model, tmp_path, capsys):
    model = two_inputs_two_outputs()
    out = tmp_path / "out"
    assert main(["compile", str(save_model(model)), "--target", "host", "-o", str(out)]) == 0
    assert (out / "model.so").is_file() and (out / "model.json").is_file()

    feeds = random_inputs(model)
    np.savez(tmp_path / "x.npz", **feeds)
    assert main(["run", str(out), "--inputs", str(tmp_path / "x.npz"), "--output",
                 str(tmp_path / "y.npz"), "--repeat", "3"]) == 0
    printed = capsys.readouterr().out
    assert "output y: float32[2, 3]" in printed
    assert "mean" in printed and "median" in printed and "p90" in printed
    expected = onnxruntime_outputs(model, feeds)
    with np.load(tmp_path / "y.npz") as saved:
        for name, value in expected.items():
            assert_close(saved[name], value)


def test_targets_lists_every_target(capsys):
    assert main(["targets"]) == 0
    text = capsys.readouterr().out
    for name in ("host", "arm64", "arm64-dotprod", "arm64-i8mm", "armv7", "mali", "adreno"):
        assert f"\n{name} " in f"\n{text}"


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("qcompile: error: ")
    return err


def test_compile_errors(save_model, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "does not exist" in _error(capsys, ["compile", str(tmp_path / "no.onnx"), "-o", out])
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a model\n" * 10)
    assert "ONNX" in _error(capsys, ["compile", str(junk), "-o", out])
    err = _error(capsys, ["compile", str(save_model(unsupported_op())), "-o", out])
    assert "LSTM" in err and "encoder_lstm" in err
    err = _error(capsys, ["compile", str(save_model(dynamic_batch(), "d.onnx")), "-o", out])
    assert "Input 'x'" in err and "--input-shape" in err
    err = _error(capsys, ["compile", str(save_model(conv_relu(), "c.onnx")), "--target",
                          "iphone", "-o", out])
    assert "Unknown target 'iphone'" in err and "arm64-dotprod" in err
    err = _error(capsys, ["compile", str(save_model(conv_relu(), "c.onnx")), "--target",
                          "arm64", "--cc", "/opt/nowhere/clang++", "-o", out])
    assert "/opt/nowhere/clang++" in err


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_for_host(tmp_path_factory.mktemp("cli"), two_inputs_two_outputs())


@pytest.mark.parametrize("feeds, message", [
    ({"x": np.zeros((2, 3), np.float32)}, "missing 'n'"),
    ({"x": np.zeros((2, 3), np.float32), "n": np.zeros((2, 3), np.int64),
      "z": np.zeros(1)}, "unknown 'z'"),
    ({"x": np.zeros((3, 3), np.float32), "n": np.zeros((2, 3), np.int64)},
     "Input 'x' has shape [3, 3]"),
    ({"x": np.zeros((2, 3), np.float64), "n": np.zeros((2, 3), np.int64)},
     "Input 'x' has dtype float64"),
])
def test_run_rejects_inputs_that_do_not_match(compiled, tmp_path, capsys, feeds, message):
    np.savez(tmp_path / "bad.npz", **feeds)
    err = _error(capsys, ["run", str(compiled), "--inputs", str(tmp_path / "bad.npz")])
    assert message in err
    assert "x: float32[2,3]; n: int64[2,3]" in err or "Input 'x'" in err


def test_run_errors(compiled, tmp_path, capsys):
    assert "no model.json" in _error(capsys, ["run", str(tmp_path)])
    assert "does not exist" in _error(capsys, ["run", str(compiled), "--inputs",
                                               str(tmp_path / "none.npz")])


def test_replaced_library_is_refused(compiled, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(compiled, copy)
    with open(copy / "model.so", "ab") as f:
        f.write(b"\0")
    assert "sha256 differs" in _error(capsys, ["run", str(copy)])


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "qcompile", "targets"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "arm64-dotprod" in result.stdout
    result = subprocess.run([sys.executable, "-m", "qcompile", "compile", "missing.onnx"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_damaged_manifest_or_missing_library_is_refused(compiled, tmp_path, capsys):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(compiled, damaged)
    (damaged / "model.json").write_text("{not json")
    assert "not a valid qcompile manifest" in _error(capsys, ["run", str(damaged)])
    missing = tmp_path / "missing"
    shutil.copytree(compiled, missing)
    (missing / "model.so").unlink()
    assert "no model.so" in _error(capsys, ["run", str(missing)])


@pytest.mark.parametrize("args,message", [
    (["--calibration", "calib.npz"], "--quantize is not: add --quantize int8"),
    (["--quantize", "int8"], "--quantize int8 needs calibration data"),
    (["--quantize", "int8-dynamic", "--calibration", "calib.npz", "--weight-rounding",
      "nearest"], "--quantize int8-dynamic uses calibration data only to round the weights"),
    (["--quantize", "int8-dynamic", "--activations", "int16"],
     "--activations int16 needs static int8"),
])
def test_quantize_option_errors(save_model, tmp_path, capsys, args, message):
    path = save_model(conv_relu())
    assert main(["compile", str(path), "-o", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_quantize_mode_from_python(save_model, tmp_path):
    import qcompile
    from qcompile.errors import InputError

    with pytest.raises(InputError) as err:
        qcompile.compile(save_model(conv_relu()), "host", tmp_path / "out", quantize="int4")
    assert "Unknown --quantize mode 'int4'" in str(err.value)


@pytest.mark.parametrize("args,message", [
    (["tune", "MODEL", "--trials", "0"], "--trials must be at least 1"),
    (["device", "emulate", "--count", "0"], "--count must be at least 1"),
])
def test_counts_must_be_positive(save_model, capsys, args, message):
    args = [str(save_model(conv_relu())) if a == "MODEL" else a for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err
