"""TVM's C++ code (and onnxsim's) writes some warnings straight to the process's stderr that
mean nothing to a user of qcompile: one line per Gather, "Fast mode segfaults when there are
out-of-bounds indices" (the ONNX importer's take ops; TVM has no switch for them); one about the
importer's builder after an import failed (qcompile reports the failure); onnxsim's note on
each node it leaves for TVM to fold. `quiet()` drops the lines that match NOISE while such a
step runs, and passes every other line on as it comes, so real errors and qcompile's own
messages are not hidden or delayed.

Wrap only steps that start no process that outlives them: such a process would keep writing
into the filter.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading

NOISE = (
    re.compile(rb"Fast mode segfaults when there are out-of-bounds indices"),
    re.compile(rb"BlockBuilder destroyed with remaining blocks"),  # after an import failed
    # onnxsim, on a node it leaves for TVM to compute (not a failure of the model)
    re.compile(rb'^WARNING: failed to run ".*" op \(name is ".*"\), skip\.\.\.'),
)


def _forward(read_fd: int, out_fd: int) -> None:
    """Copy lines from `read_fd` to `out_fd` until end of file, without the NOISE ones."""
    pending = b""
    with os.fdopen(read_fd, "rb", buffering=0) as source:
        while True:
            chunk = source.read(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            kept = b"".join(line + b"\n" for line in lines
                            if not any(p.search(line) for p in NOISE))
            if kept:
                _write(out_fd, kept)
    if pending and not any(p.search(pending) for p in NOISE):
        _write(out_fd, pending)


def _write(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):  # keep reading: a writer must never block on the pipe
        os.write(fd, data)


@contextlib.contextmanager
def quiet():
    """Filter NOISE out of what is written to file descriptor 2 during the block."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr: nothing to filter
        yield
        return
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    thread = threading.Thread(target=_forward, args=(read_fd, saved), daemon=True,
                              name="qcompile-stderr-filter")
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last writer: the thread sees its end
        thread.join(timeout=10)
        if not thread.is_alive():  # else a process started in the block still writes
            os.close(saved)
