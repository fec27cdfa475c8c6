"""TVM's C++ warnings that mean nothing to a user are dropped from stderr; every other line
passes, in order, the last one even without a newline."""

import os

from qcompile.tvm_noise import quiet

TAKE_WARNING = (b"[02:50:00] /workspace/tvm/include/tvm/topi/transform.h:1085: Warning: Fast "
                b"mode segfaults when there are out-of-bounds indices. Make sure input indices "
                b"are in bound\n")


def test_noise_is_dropped_and_the_rest_passes(capfd):
    with quiet():
        os.write(2, b"before\n" + TAKE_WARNING)
        os.write(2, b"Error: a real problem\n")
        os.write(2, TAKE_WARNING + b"no newline at the end")
    os.write(2, b"\nafter\n")
    err = capfd.readouterr().err
    assert "Fast mode" not in err
    assert err == "before\nError: a real problem\nno newline at the end\nafter\n"


def test_an_error_in_the_block_still_restores_stderr(capfd):
    try:
        with quiet():
            raise ValueError("inside")
    except ValueError:
        pass
    os.write(2, TAKE_WARNING)
    assert "Fast mode" in capfd.readouterr().err
